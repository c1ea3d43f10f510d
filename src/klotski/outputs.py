"""What generation returns: vLLM-shaped RequestOutput and CompletionOutput records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's CompletionOutput)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} for the top-N and the sampled token; None if not asked.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the sequence; None for EOS, length or unfinished.
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        """True once a stop condition or max_tokens ended the sequence."""
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; logprob keys become strings as JSON requires."""
        out = asdict(self)
        if self.logprobs is not None:
            out["logprobs"] = [{str(k): v for k, v in step.items()} for step in self.logprobs]
        return out


@dataclass
class RequestOutput:
    """A request's prompt and its completions (vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Per prompt token: {token_id: logprob} (top-N and the actual token); None for the first token, or
    # None throughout when not asked (vLLM's prompt_logprobs).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, one line of a JSON-lines results file."""
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "outputs": [o.to_dict() for o in self.outputs],
            "finished": self.finished,
            "prompt_logprobs": None
            if self.prompt_logprobs is None
            else [None if step is None else {str(k): v for k, v in step.items()} for step in self.prompt_logprobs],
        }
