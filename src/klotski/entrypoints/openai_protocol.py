"""The OpenAI wire format: request bodies in, Completion / ChatCompletion bodies and batch lines out.

One module for `run-batch` and the server, so both accept and answer requests the same way:

- `parse_request(url, body)` validates a /v1/completions or /v1/chat/completions body
  (pydantic, unknown fields rejected by name);
- `request_prompts(request)` lists the prompts it carries, for the engine to tokenize;
- `sampling_settings(request, prompt_lens, max_model_len)` is THE mapping from a body to klotski
  `SamplingParams` plus n / echo / logprobs, raising `ProtocolError` (an OpenAI-style error);
- `completion_body` / `chat_completion_body` turn RequestOutputs into response bodies that the
  `openai` package's own types parse; `batch_result_line` / `batch_error_line` wrap them as
  OpenAI batch output lines.

Only the fields that make sense for an offline engine are accepted. OpenAI fields the engine does
not implement (penalties, logit_bias, tools, ...) are accepted at their neutral value and refused
otherwise, with a message that says so, rather than silently ignored.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from klotski.errors import KlotskiError
from klotski.outputs import CompletionOutput, RequestOutput
from klotski.sampling import SamplingParams

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
URLS = (COMPLETIONS_URL, CHAT_URL)
# vLLM's default max_logprobs: more top tokens per position than this is refused.
MAX_LOGPROBS = 20
MAX_N = 128

Float = Annotated[float, Strict()]  # strict: "0.5" (a string) is an error, 1 (an int) is fine


class ProtocolError(KlotskiError):
    """A request the OpenAI API would answer with an error: status, code, message, param."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        status_code: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.status_code, self.type = message, code, param, status_code, type

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error object: {"message", "type", "param", "code"}."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def as_protocol_error(exc: KlotskiError, code: str = "invalid_value", param: str | None = None) -> ProtocolError:
    """Any user error (a SamplingParams check, a prompt the engine refuses) as a 400 error."""
    if isinstance(exc, ProtocolError):
        return exc
    message = str(exc).removeprefix("SamplingParams: ")
    # SamplingParams says "temperature=-1 is negative: ..."; the field name is the param.
    if param is None:  # ParameterError names its field
        param = getattr(exc, "field", None) or getattr(exc, "param", None)
    if param is None and "=" in message.split(" ", 1)[0]:
        param = message.split("=", 1)[0]
    return ProtocolError(message, code=code, param=param)


# -- request bodies -----------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(_Strict):
    """Fields both endpoints share (OpenAI's, plus vLLM's sampling extensions)."""

    model: StrictStr | None = None
    temperature: Float | None = None  # None: 1.0, OpenAI's and vLLM's default
    top_p: Float | None = None
    top_k: StrictInt | None = None  # vLLM extension
    min_p: Float | None = None  # vLLM extension
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension
    n: StrictInt = 1
    ignore_eos: StrictBool = False  # vLLM extension
    min_tokens: StrictInt = 0  # vLLM extension
    include_stop_str_in_output: StrictBool = False  # vLLM extension
    skip_special_tokens: StrictBool = True  # vLLM extension
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Body):
    """A /v1/completions body."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default; 0 with echo scores the prompt only
    echo: StrictBool = False
    logprobs: StrictInt | None = None  # top-N per token (OpenAI allows 0..5; vLLM and klotski 0..20)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Body):
    """A /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: StrictInt | None = None  # None: up to the context (as vLLM)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True  # vLLM extension


Request = CompletionRequest | ChatCompletionRequest
_MODELS: dict[str, type[_Body]] = {COMPLETIONS_URL: CompletionRequest, CHAT_URL: ChatCompletionRequest}

# OpenAI fields klotski does not implement: fine at their neutral value, refused otherwise.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "logit_bias": lambda v: v in (None, {}),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: v in (None, {"type": "text"}),
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "audio": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}
# Bookkeeping fields that do not change the answer: accepted and ignored.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})

_EXPECTED = {
    "prompt": "a string, a list of token ids, a list of strings or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}


def parse_request(url: str, body: Any) -> Request:
    """Validate a request body for url; raises ProtocolError naming the first problem."""
    if url not in _MODELS:
        raise ProtocolError(
            f"url {url!r} is not served: use {COMPLETIONS_URL!r} or {CHAT_URL!r}", code="unknown_url", param="url"
        )
    if not isinstance(body, dict):
        raise ProtocolError(
            f"the body must be a JSON object, got {_json_type(body)}", code="invalid_type", param="body"
        )
    body = dict(body)
    for name in list(body):
        if name in _IGNORED:
            del body[name]
        elif name in _NEUTRAL:
            if not _NEUTRAL[name](body[name]):
                raise ProtocolError(
                    f"'{name}' is not supported by klotski; remove it (or give its neutral value)",
                    code="unsupported_field",
                    param=name,
                )
            del body[name]
    model = _MODELS[url]
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc, url, model) from None


def _validation_error(exc: ValidationError, url: str, model: type[_Body]) -> ProtocolError:
    """pydantic's first error, as one OpenAI-style message."""
    errors = exc.errors()
    first = errors[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    # Union members' errors carry the member's type name in loc; the param is the field path.
    param = _param(loc)
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), param)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_allowed_fields(model, loc)))
        return ProtocolError(
            f"unknown field '{param}' in a {url} body; accepted fields: {allowed}", code="unknown_field", param=param
        )
    if first["type"] == "missing":
        return ProtocolError(f"'{param}' is required in a {url} body", code="missing_field", param=param)
    same_field = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    if len(same_field) > 1 and field in _EXPECTED:
        return ProtocolError(
            f"'{param}' must be {_EXPECTED[field]}, got {_short(first['input'])}", code="invalid_type", param=param
        )
    code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return ProtocolError(f"'{param}': {first['msg'].lower()}, got {_short(first['input'])}", code=code, param=param)


def _allowed_fields(model: type[BaseModel], loc: list) -> list[str]:
    """The fields accepted where the unknown one was found (the body, or a chat message)."""
    if loc and loc[0] == "messages" and len(loc) > 2:
        return list(ChatMessage.model_fields)
    return [f for f in model.model_fields if f not in ("stream_options",)]


def _param(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# -- batch input lines ---------------------------------------------------------------------------------
class BatchRequestInput(_Strict):
    """One line of an OpenAI batch input file."""

    custom_id: StrictStr = Field(min_length=1)
    method: StrictStr
    url: StrictStr
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    url: str
    request: Request


def batch_custom_id(line: Any) -> str | None:
    """The custom_id of a parsed line when it has a usable one (for naming an error line)."""
    if isinstance(line, dict) and isinstance(line.get("custom_id"), str) and line["custom_id"]:
        return line["custom_id"]
    return None


def parse_batch_request(line: Any) -> BatchRequest:
    """A parsed batch input line -> (custom_id, url, validated body); raises ProtocolError."""
    if not isinstance(line, dict):
        raise ProtocolError(f"a batch line must be a JSON object, got {_json_type(line)}", code="invalid_line")
    try:
        head = BatchRequestInput.model_validate(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(list(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = f"unknown field '{param}' in a batch line; a line has custom_id, method, url and body"
            return_code = "unknown_field"
        elif first["type"] == "missing":
            message, return_code = f"a batch line needs '{param}'", "missing_field"
        else:
            message = f"'{param}': {first['msg'].lower()}, got {_short(first['input'])}"
            return_code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
        raise ProtocolError(message, code=return_code, param=param) from None
    if head.method.upper() != "POST":
        raise ProtocolError(
            f"method {head.method!r} is not supported: batch requests are POST",
            code="unsupported_method",
            param="method",
        )
    return BatchRequest(head.custom_id, head.url, parse_request(head.url, head.body))


# -- prompts and sampling ------------------------------------------------------------------------------
def request_prompts(request: Request) -> list[dict[str, Any]]:
    """The prompts a request carries, as engine prompt dicts.

    Completions: {"prompt": text} or {"prompt_token_ids": [...]}, one per prompt of a list.
    Chat: one {"messages": [{"role", "content"}...], "add_generation_prompt": bool}; the caller renders it
    with the checkpoint's chat template.
    """
    if isinstance(request, ChatCompletionRequest):
        messages = []
        for m in request.messages:
            content = (
                m.content
                if isinstance(m.content, str) or m.content is None
                else "".join(part.text for part in m.content)
            )
            messages.append({"role": m.role, "content": content or ""})
        return [{"messages": messages, "add_generation_prompt": request.add_generation_prompt}]
    prompt = request.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise ProtocolError("the prompt is empty; give at least one token", code="invalid_prompt", param="prompt")
    if isinstance(prompt[0], int):
        return [{"prompt_token_ids": list(prompt)}]
    return [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompt]


@dataclass(frozen=True)
class RequestSettings:
    """What the engine needs from a body beyond the prompts."""

    params: SamplingParams | None  # None: echo with max_tokens 0, the prompt is only scored
    n: int  # samples per prompt
    max_tokens: int
    echo: bool  # completions: the prompt comes back before the completion (with its logprobs)
    logprobs: int | None  # top-N logprobs per generated token; None: not asked
    prompt_logprobs: int | None  # top-N logprobs per prompt token (echo + logprobs); None: not asked

    def sample_params(self, default_seed: int | None = None) -> list[SamplingParams]:
        """SamplingParams for each of the n samples, each with its own seed.

        Sample 0 uses the request's seed (else default_seed); sample j > 0 a seed derived from it, so a
        seeded request's samples are reproducible one by one, however they are batched or resumed.
        default_seed None leaves unseeded requests to the engine's own per-request seeds.
        """
        if self.params is None:
            return []
        base = self.params.seed if self.params.seed is not None else default_seed
        if base is None or self.params.greedy:
            return [self.params] * self.n
        return [_with_seed(self.params, base if j == 0 else sample_seed(base, j)) for j in range(self.n)]


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """params with another seed. A copy, not dataclasses.replace: the fields were validated already and
    a 63-bit seed is valid, and validating again per sample costs more than a small model's step."""
    if params.seed == seed:
        return params
    out = copy.copy(params)
    out.seed = seed
    return out


def sample_seed(seed: int, sample: int) -> int:
    """Sample j's seed from the request's seed: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}:sample:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_settings(
    request: Request,
    prompt_lens: list[int],
    max_model_len: int,
    *,
    allow_stream: bool = False,
    vocab_size: int | None = None,
) -> RequestSettings:
    """THE mapping from a body to SamplingParams + n / echo / logprobs; raises ProtocolError.

    prompt_lens are the token counts of request_prompts(request) (the context check needs them).
    allow_stream: the caller can stream (the server); a batch job cannot, and refuses stream=true.
    vocab_size: check stop_token_ids and logprobs against the model's vocabulary too.
    """
    chat = isinstance(request, ChatCompletionRequest)
    if request.stream and not allow_stream:
        raise ProtocolError(
            "stream=true is not available here: batch results are whole responses", code="invalid_value", param="stream"
        )
    if not 1 <= request.n <= MAX_N:
        raise ProtocolError(f"n={request.n} is outside [1, {MAX_N}]", param="n")
    for i, length in enumerate(prompt_lens):
        where = "messages" if chat else ("prompt" if len(prompt_lens) == 1 else f"prompt[{i}]")
        if length == 0:
            raise ProtocolError("the prompt is empty; give at least one token", code="invalid_prompt", param=where)
        if length >= max_model_len:
            raise ProtocolError(
                f"the prompt has {length} tokens but the model's context is {max_model_len}; shorten the prompt",
                code="context_length_exceeded",
                param=where,
            )
    longest = max(prompt_lens, default=0)
    if chat:
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        tokens_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = max_model_len - longest
        echo = False
        if request.top_logprobs is not None and not request.logprobs:
            raise ProtocolError("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        logprobs_param = "top_logprobs"
    else:
        max_tokens, tokens_param, echo = request.max_tokens, "max_tokens", request.echo
        if max_tokens is None:
            max_tokens = max_model_len - longest
        logprobs, logprobs_param = request.logprobs, "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ProtocolError(f"{logprobs_param}={logprobs} is outside [0, {MAX_LOGPROBS}]", param=logprobs_param)
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise ProtocolError(
            f"{tokens_param}={max_tokens} is below 1: ask for at least one token "
            "(0 only with echo=true, to score the prompt)",
            param=tokens_param,
        )
    if longest + max_tokens > max_model_len:
        raise ProtocolError(
            f"this model's context is {max_model_len} tokens, but {longest + max_tokens} were "
            f"requested ({longest} in the prompt, {max_tokens} to generate); lower {tokens_param} "
            "or shorten the prompt",
            code="context_length_exceeded",
            param=tokens_param,
        )
    params = None
    if max_tokens > 0:
        stop = request.stop if request.stop is None or isinstance(request.stop, str) else tuple(request.stop)
        try:
            params = _sampling_params(
                1.0 if request.temperature is None else request.temperature,
                1.0 if request.top_p is None else request.top_p,
                0 if request.top_k is None else request.top_k,
                0.0 if request.min_p is None else request.min_p,
                request.seed,
                max_tokens,
                request.min_tokens,
                stop,
                None if request.stop_token_ids is None else tuple(request.stop_token_ids),
                request.ignore_eos,
                logprobs,
                request.skip_special_tokens,
                request.include_stop_str_in_output,
                vocab_size,
            )
        except KlotskiError as exc:
            raise as_protocol_error(exc) from None
    elif request.min_tokens:
        raise ProtocolError(f"min_tokens={request.min_tokens} must lie in [0, max_tokens=0]", param="min_tokens")
    prompt_logprobs = logprobs if echo and logprobs is not None else None
    return RequestSettings(params, request.n, max_tokens, echo, logprobs, prompt_logprobs)


@functools.lru_cache(maxsize=4096)
def _sampling_params(
    temperature,
    top_p,
    top_k,
    min_p,
    seed,
    max_tokens,
    min_tokens,
    stop,
    stop_token_ids,
    ignore_eos,
    logprobs,
    skip_special_tokens,
    include_stop_str_in_output,
    vocab_size,
) -> SamplingParams:
    """One validated SamplingParams per distinct setting: a batch file's requests mostly share theirs, and
    validating costs more per request than the rest of the mapping. Shared instances are never mutated."""
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=list(stop) if isinstance(stop, tuple) else stop,
        stop_token_ids=None if stop_token_ids is None else list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=skip_special_tokens,
        include_stop_str_in_output=include_stop_str_in_output,
    )
    if vocab_size is not None:
        params.validate(vocab_size)
    return params


def score_only_outputs(settings: RequestSettings) -> list[CompletionOutput]:
    """The n empty completions of a request that only scores its prompt (echo, max_tokens 0)."""
    return [CompletionOutput(index=j, text="", token_ids=[], finish_reason="length") for j in range(settings.n)]


def prompt_logprobs_from_logits(logits, token_ids: list[int], top_n: int) -> list[dict[int, float] | None]:
    """vLLM's prompt_logprobs from prompt logits [T, V]: None for the first token (nothing precedes it),
    then {top-N ids and the actual token: logprob} for each following position."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]; row t predicts token t + 1
    out: list[dict[int, float] | None] = [None]
    for t in range(1, len(token_ids)):
        row = logprobs[t - 1]
        entry = {}
        if top_n:
            values, ids = row.topk(top_n)
            entry = dict(zip(ids.tolist(), values.tolist()))
        entry[token_ids[t]] = float(row[token_ids[t]])
        out.append(entry)
    return out


# -- response bodies -----------------------------------------------------------------------------------
TokenText = Callable[[int], str]


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _entry_logprob(entry: dict[int, float] | None, token: int) -> tuple[float, dict[int, float]]:
    """(the token's logprob, its top entries). The first prompt token has no context: OpenAI sent null
    there, which openai's own types reject, so it counts as given (logprob 0.0)."""
    if entry is None:
        return 0.0, {token: 0.0}
    return entry[token], entry


def _envelope(
    obj: str,
    choices: list[dict[str, Any]],
    outputs: list[RequestOutput],
    id: str,
    created: int,
    model: str,
    system_fingerprint: str | None,
) -> dict[str, Any]:
    """What a Completion and a ChatCompletion body share around their choices."""
    body = {"id": id, "object": obj, "created": created, "model": model, "choices": choices, "usage": _usage(outputs)}
    if system_fingerprint is not None:
        body["system_fingerprint"] = system_fingerprint
    return body


def completion_body(
    outputs: list[RequestOutput],
    settings: RequestSettings,
    *,
    model: str,
    id: str,
    created: int,
    token_text: TokenText,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A Completion body: one choice per (prompt, sample), index = prompt * n + sample."""
    choices = []
    for out in outputs:
        for sample in out.outputs:
            choice: dict[str, Any] = {
                "index": len(choices),
                "text": sample.text,
                "finish_reason": sample.finish_reason or "length",
                "logprobs": None,
            }
            if settings.echo:
                choice["text"] = (out.prompt or "") + sample.text
            if settings.logprobs is not None:
                choice["logprobs"] = _completion_logprobs(out, sample, settings, token_text)
            choices.append(choice)
    return _envelope("text_completion", choices, outputs, id, created, model, system_fingerprint)


def _completion_logprobs(
    out: RequestOutput, sample: CompletionOutput, settings: RequestSettings, token_text: TokenText
) -> dict[str, Any]:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs and text_offset into the choice's text.
    top_logprobs holds the N most likely tokens plus the chosen one, as vLLM reports them."""
    pairs: list[tuple[int, dict[int, float] | None]] = []
    if settings.echo:
        prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        pairs += list(zip(out.prompt_token_ids, prompt_entries))
    pairs += list(zip(sample.token_ids, sample.logprobs or [None] * len(sample.token_ids)))
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for token, entry in pairs:
        text = token_text(token)
        value, entries = _entry_logprob(entry, token)
        tokens.append(text)
        token_logprobs.append(value)
        top.append({token_text(t): v for t, v in entries.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_completion_body(
    outputs: list[RequestOutput],
    settings: RequestSettings,
    *,
    model: str,
    id: str,
    created: int,
    token_text: TokenText,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A ChatCompletion body: one assistant message per sample."""
    choices = []
    for out in outputs:
        for sample in out.outputs:
            logprobs = None
            if settings.logprobs is not None:
                logprobs = {
                    "content": [
                        _chat_token(t, e, settings.logprobs, token_text)
                        for t, e in zip(sample.token_ids, sample.logprobs or [])
                    ],
                    "refusal": None,
                }
            choices.append(
                {
                    "index": len(choices),
                    "message": {"role": "assistant", "content": sample.text},
                    "finish_reason": sample.finish_reason or "length",
                    "logprobs": logprobs,
                }
            )
    return _envelope("chat.completion", choices, outputs, id, created, model, system_fingerprint)


def _chat_token(token: int, entry: dict[int, float] | None, top_n: int, token_text: TokenText) -> dict[str, Any]:
    value, entries = _entry_logprob(entry, token)
    text = token_text(token)
    # The engine's entry is the top-N plus the sampled token: the N largest are the top-N.
    best = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    return {
        "token": text,
        "logprob": value,
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [
            {"token": token_text(t), "logprob": v, "bytes": list(token_text(t).encode("utf-8"))} for t, v in best
        ],
    }


def response_body(
    request: Request,
    outputs: list[RequestOutput],
    settings: RequestSettings,
    *,
    model: str,
    id: str,
    created: int,
    token_text: TokenText,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """completion_body or chat_completion_body, whichever the request's endpoint answers with."""
    build = chat_completion_body if isinstance(request, ChatCompletionRequest) else completion_body
    return build(
        outputs,
        settings,
        model=model,
        id=id,
        created=created,
        token_text=token_text,
        system_fingerprint=system_fingerprint,
    )


def response_id(request: Request, key: str) -> str:
    """A deterministic body id ("cmpl-..." / "chatcmpl-...") from a stable key (a batch line's custom_id)."""
    prefix = "chatcmpl-" if isinstance(request, ChatCompletionRequest) else "cmpl-"
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:24]


# -- batch output lines --------------------------------------------------------------------------------
def batch_result_line(custom_id: str, body: dict[str, Any], *, id: str, request_id: str) -> dict[str, Any]:
    """An OpenAI batch output line for a request that succeeded."""
    return {
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def batch_error_line(
    custom_id: str | None, error: ProtocolError, *, id: str, request_id: str, line: int | None = None
) -> dict[str, Any]:
    """An OpenAI batch output line for a request that failed: the response carries OpenAI's error body
    (status 400), and `error` the {code, message} summary (with the input line number when given)."""
    summary: dict[str, Any] = {"code": error.code, "message": error.message}
    if line is not None:
        summary["line"] = line
    return {
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": error.status_code, "request_id": request_id, "body": {"error": error.to_dict()}},
        "error": summary,
    }


# -- streaming (the server's server-sent events) -------------------------------------------------------
class StreamChunks:
    """The chunks of one streamed response: `text_completion` chunks (completions) or
    `chat.completion.chunk`s (chat), one choice per (prompt, sample), numbered as the whole body numbers
    them; the text of a choice's chunks joined is the whole body's text."""

    def __init__(
        self, request: Request, settings: RequestSettings, *, model: str, id: str, created: int, token_text: TokenText
    ) -> None:
        self.chat = isinstance(request, ChatCompletionRequest)
        self.settings, self.model, self.id, self.created, self.token_text = settings, model, id, created, token_text
        self._offsets: dict[int, int] = {}  # completions: text_offset reached per choice (echo included)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def start(self, choice: int) -> dict[str, Any] | None:
        """Chat's first chunk of a choice announces the assistant role; completions have none."""
        if not self.chat:
            return None
        return self._chunk(
            [{"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def update(
        self,
        choice: int,
        text: str,
        token_ids: list[int],
        logprobs: list[dict[int, float]] | None,
        finish_reason: str | None,
        *,
        prompt_text: str | None = None,
        prompt_ids: list[int] | None = None,
        prompt_logprobs: list[dict[int, float] | None] | None = None,
    ) -> dict[str, Any] | None:
        """The chunk for what one choice produced since its last chunk (None when there is nothing to say).
        A completions choice's first chunk starts with the prompt under echo (and its logprobs)."""
        pairs: list[tuple[int, dict[int, float] | None]] = []
        first = choice not in self._offsets
        if first:
            self._offsets[choice] = 0
        if first and self.settings.echo and not self.chat:
            text = (prompt_text or "") + text
            ids = prompt_ids or []
            pairs += list(zip(ids, prompt_logprobs or [None] * len(ids)))
        pairs += list(zip(token_ids, logprobs or [None] * len(token_ids)))
        if not text and finish_reason is None and (not pairs or self.settings.logprobs is None):
            return None  # a token whose text is still held back (a partial character, a possible stop string)
        out_logprobs = None
        if self.settings.logprobs is not None:
            if self.chat:
                out_logprobs = {
                    "content": [_chat_token(t, e, self.settings.logprobs, self.token_text) for t, e in pairs],
                    "refusal": None,
                }
            else:
                out_logprobs = self._completion_logprobs(choice, pairs)
        if self.chat:
            body: dict[str, Any] = {
                "index": choice,
                "delta": {"content": text} if text else {},
                "logprobs": out_logprobs,
                "finish_reason": finish_reason,
            }
        else:
            body = {"index": choice, "text": text, "logprobs": out_logprobs, "finish_reason": finish_reason}
        return self._chunk([body])

    def _completion_logprobs(self, choice: int, pairs: list[tuple[int, dict[int, float] | None]]) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token, entry in pairs:
            text = self.token_text(token)
            value, entries = _entry_logprob(entry, token)
            tokens.append(text)
            token_logprobs.append(value)
            top.append({self.token_text(t): v for t, v in entries.items()})
            offsets.append(self._offsets[choice])
            self._offsets[choice] += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """stream_options.include_usage: the last chunk, with no choices and the request's usage."""
        chunk = self._chunk([])
        chunk["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return chunk
