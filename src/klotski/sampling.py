"""SamplingParams (vLLM's fields and defaults) and the Sampler that turns logits into tokens.

Every sequence draws from its own torch.Generator, so a seeded request yields the same tokens
whichever other requests share its batch. Logprobs come from log_softmax of the raw logits,
before temperature or filtering, as vLLM reports them by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from klotski.errors import KlotskiError

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing by ~0 overflows.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop (vLLM's names and defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or ()]
        for problem in _problems(self):
            raise KlotskiError(f"SamplingParams: {problem}")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token at every step."""
        return self.temperature < _GREEDY_EPS


def _normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Turn None / one string / a list of strings into a tuple of non-empty strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise KlotskiError(f"SamplingParams: stop must be non-empty strings, got {stop!r}")
    return stops


def _problems(p: SamplingParams) -> list[str]:
    """Every invalid field of p, each phrased as the problem and the fix."""
    checks = [
        (p.n == 1, f"n={p.n} is not supported: use n=1 and submit the prompt several times"),
        (p.temperature >= 0, f"temperature={p.temperature} is negative: use 0 (greedy) or more"),
        (0 < p.top_p <= 1, f"top_p={p.top_p} is outside (0, 1]: use 1.0 to disable it"),
        (p.top_k >= -1, f"top_k={p.top_k} is invalid: use a positive k, or 0 / -1 to disable it"),
        (0 <= p.min_p <= 1, f"min_p={p.min_p} is outside [0, 1]: use 0.0 to disable it"),
        (p.max_tokens >= 1, f"max_tokens={p.max_tokens} is below 1: ask for at least one token"),
        (0 <= p.min_tokens <= p.max_tokens,
         f"min_tokens={p.min_tokens} must lie in [0, max_tokens={p.max_tokens}]"),
        (p.logprobs is None or p.logprobs >= 0,
         f"logprobs={p.logprobs} is negative: use None, 0 (sampled token only) or N top tokens"),
        (p.seed is None or isinstance(p.seed, int), f"seed={p.seed!r} must be an int or None"),
    ]
    return [message for ok, message in checks if not ok]


def derive_seed(engine_seed: int, request_index: int) -> int:
    """A per-request seed from the engine seed, stable across runs and Python versions."""
    digest = hashlib.sha256(f"{engine_seed}:{request_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, fallback_seed: int,
                   device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own generator: its seed, or the engine-derived fallback when seed is None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(fallback_seed if seed is None else seed)
    return generator


@dataclass
class SampleResult:
    """One step's picks: token ids [B] and, for rows that asked, logprobs of the raw logits."""

    token_ids: torch.Tensor
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def logprob_dict(self, row: int) -> dict[int, float] | None:
        """vLLM's per-token logprobs entry: the top-N tokens plus the sampled one."""
        logprob = self.logprobs[row]
        if logprob is None:
            return None
        entry = dict(self.top_logprobs[row] or ())
        entry[int(self.token_ids[row])] = logprob
        return entry


class Sampler:
    """Picks one token per row: greedy argmax, or temperature/top-k/top-p/min-p sampling."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None],
               suppress_ids: Sequence[Sequence[int]] | None = None) -> SampleResult:
        """Token ids [B] from logits [B, V]; each row's suppress_ids are never picked (min_tokens)."""
        if not (logits.dim() == 2 and len(params) == len(generators) == logits.shape[0]):
            raise ValueError("logits must be [B, V] with one SamplingParams and generator per row")
        raw = logits.float()
        masked = _suppress(raw, suppress_ids)
        token_ids = masked.argmax(dim=-1)  # [B]; ties go to the lowest id
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            probs = _filtered_probs(masked[random_rows], [params[i] for i in random_rows])
            for row, probs_row in zip(random_rows, probs):
                token_ids[row] = _draw(probs_row, generators[row])
        return _with_logprobs(raw, token_ids, params)


def _suppress(logits: torch.Tensor, suppress_ids: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Set the listed ids of each row to -inf (a copy): used to hold back EOS before min_tokens."""
    if not suppress_ids or not any(suppress_ids):
        return logits
    out = logits.clone()
    for row, ids in enumerate(suppress_ids):
        if ids:
            out[row, list(ids)] = float("-inf")
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from probs [V] with the row's own generator."""
    if generator is None:
        raise ValueError("a sampled (temperature > 0) row needs its own generator: see make_generator")
    return int(torch.multinomial(probs, 1, generator=generator))


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, V] after temperature, top-k, top-p and min-p, row by row settings."""
    temps = logits.new_tensor([p.temperature for p in params]).unsqueeze(1)  # [R, 1]
    logits = logits / temps
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        logits = _top_k_top_p(logits, params)
    if any(p.min_p > 0 for p in params):
        logits = _min_p(logits, params)
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask logits [R, V] outside each row's top-k, then outside its top-p nucleus."""
    vocab = logits.shape[1]
    ks = logits.new_tensor([p.top_k if p.top_k > 0 else vocab for p in params]).long()  # [R]
    top_ps = logits.new_tensor([p.top_p for p in params]).unsqueeze(1)  # [R, 1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V] each
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    sorted_logits = sorted_logits.masked_fill(ranks >= ks.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_ps, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    min_ps = logits.new_tensor([p.min_p for p in params]).unsqueeze(1)  # [R, 1]
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_ps  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor,
                   params: list[SamplingParams]) -> SampleResult:
    """Attach the sampled token's logprob and the top-N pairs for rows that asked for them."""
    result = SampleResult(token_ids=token_ids, logprobs=[None] * len(params),
                          top_logprobs=[None] * len(params))
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return result
    logprobs = torch.log_softmax(raw[wanted], dim=-1)  # [W, V]
    chosen = logprobs.gather(1, token_ids[wanted].unsqueeze(1)).squeeze(1)  # [W]
    for j, row in enumerate(wanted):
        result.logprobs[row] = float(chosen[j])
        top = params[row].logprobs
        assert top is not None  # `wanted` holds the rows that asked
        values, ids = logprobs[j].topk(top)
        result.top_logprobs[row] = list(zip(ids.tolist(), values.tolist()))
    return result
