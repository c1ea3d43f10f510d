"""SamplingParams (vLLM's fields and defaults) and the Sampler that turns logits into tokens.

Every sequence draws from its own torch.Generator, so a seeded request yields the same tokens
whichever other requests share its batch. Logprobs come from log_softmax of the raw logits,
before temperature or filtering, as vLLM reports them by default.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from klotski.errors import ParameterError

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
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every field's type and range (normalising stop and the numbers); the engine calls it
        again with the model's vocabulary size, since fields can be changed after construction.

        Raises ParameterError naming the field, the value and what to use instead."""
        self.stop = _normalize_stop(self.stop)
        for name, kind, default in _FIELDS:
            setattr(self, name, _typed(name, getattr(self, name), kind, default))
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        for name, problem in _problems(self, vocab_size):
            raise ParameterError(f"SamplingParams: {problem}", name)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token at every step."""
        return self.temperature < _GREEDY_EPS


# (field, kind, default): "int" / "float" / "bool", and whether None is allowed (default None).
_FIELDS = (
    ("n", "int", 1),
    ("temperature", "float", 1.0),
    ("top_p", "float", 1.0),
    ("top_k", "int", 0),
    ("min_p", "float", 0.0),
    ("seed", "int", None),
    ("max_tokens", "int", 16),
    ("min_tokens", "int", 0),
    ("ignore_eos", "bool", False),
    ("logprobs", "int", None),
    ("skip_special_tokens", "bool", True),
    ("include_stop_str_in_output", "bool", False),
)
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _typed(name: str, value, kind: str, default):
    """value as a plain int / float / bool, or ParameterError. A bool is never taken as a number
    (True would silently mean 1), a float never as an integer (2.5 tokens), NaN / inf never at all."""
    if value is None and default is None:
        return None
    want = _KIND_WORDS[kind] + (" or None" if default is None else "")
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass
    elif kind == "int" and isinstance(value, numbers.Integral):
        return int(value)
    elif kind == "float" and isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        raise ParameterError(f"SamplingParams: {name}={value} is not a finite number", name)
    raise ParameterError(f"SamplingParams: {name} must be {want}, got {type(value).__name__} {value!r:.60}", name)


def _token_ids(name: str, ids) -> list[int]:
    """A list of non-negative integer token ids (bools and floats refused)."""
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ParameterError(f"SamplingParams: {name} must be a list of token ids, got {type(ids).__name__}", name)
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ParameterError(f"SamplingParams: {name} must hold non-negative integers, got {t!r:.60}", name)
        out.append(int(t))
    return out


def _normalize_stop(stop) -> tuple[str, ...]:
    """Turn None / one string / a list of strings into a tuple of non-empty, valid UTF-8 strings."""
    if stop is None:
        return ()
    single = isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable)
    stops: list[str] = []
    for s in (stop,) if single else tuple(stop):
        if not isinstance(s, str) or not s:
            raise ParameterError(f"SamplingParams: stop must be non-empty strings, got {s!r:.60}", "stop")
        if not is_utf8(s):
            raise ParameterError(f"SamplingParams: stop string {s!r:.60} is not valid UTF-8 text", "stop")
        stops.append(s)
    return tuple(stops)


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (bytes that were not UTF-8, kept by surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def _problems(p: SamplingParams, vocab_size: int | None) -> list[tuple[str, str]]:
    """(field, message) for every invalid field of p (types already checked): the problem and the fix."""
    checks = [
        ("n", p.n == 1, f"n={p.n} is not supported: use n=1 and submit the prompt several times"),
        ("temperature", p.temperature >= 0, f"temperature={p.temperature} is negative: use 0 (greedy) or more"),
        ("top_p", 0 < p.top_p <= 1, f"top_p={p.top_p} is outside (0, 1]: use 1.0 to disable it"),
        ("top_k", p.top_k >= -1, f"top_k={p.top_k} is invalid: use a positive k, or 0 / -1 to disable it"),
        ("min_p", 0 <= p.min_p <= 1, f"min_p={p.min_p} is outside [0, 1]: use 0.0 to disable it"),
        ("max_tokens", p.max_tokens >= 1, f"max_tokens={p.max_tokens} is below 1: ask for at least one token"),
        (
            "min_tokens",
            0 <= p.min_tokens <= p.max_tokens,
            f"min_tokens={p.min_tokens} must lie in [0, max_tokens={p.max_tokens}]",
        ),
        (
            "logprobs",
            p.logprobs is None or p.logprobs >= 0,
            f"logprobs={p.logprobs} is negative: use None, 0 (sampled token only) or N top tokens",
        ),
        (
            "seed",
            p.seed is None or 0 <= p.seed <= SEED_MAX,
            f"seed={p.seed} does not fit in 64 bits: use a seed from 0 to 2**64 - 1",
        ),
    ]
    if vocab_size is not None:
        checks += [
            (
                "logprobs",
                p.logprobs is None or p.logprobs <= vocab_size,
                f"logprobs={p.logprobs} is more than the model's vocabulary ({vocab_size} tokens): ask for fewer",
            ),
            (
                "stop_token_ids",
                all(t < vocab_size for t in p.stop_token_ids or ()),
                f"stop_token_ids {[t for t in p.stop_token_ids or () if t >= vocab_size][:3]} are outside "
                f"the vocabulary (0..{vocab_size - 1})",
            ),
        ]
    return [(name, message) for name, ok, message in checks if not ok]


def derive_seed(engine_seed: int, request_index: int) -> int:
    """A per-request seed from the engine seed, stable across runs and Python versions."""
    digest = hashlib.sha256(f"{engine_seed}:{request_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, fallback_seed: int, device: str | torch.device = "cpu") -> torch.Generator:
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

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppress_ids: Sequence[Sequence[int]] | None = None,
    ) -> SampleResult:
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
    ks = logits.new_tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]).long()  # [R]
    top_ps = logits.new_tensor([p.top_p for p in params]).unsqueeze(1)  # [R, 1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V] each
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    sorted_logits = sorted_logits.masked_fill(ranks >= ks.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays
    # (said outright: a top_p below fp32's smallest number rounds to 0, and 0 >= 0 would drop it too).
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_ps) & (ranks > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    min_ps = logits.new_tensor([p.min_p for p in params]).unsqueeze(1)  # [R, 1]
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_ps  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SampleResult:
    """Attach the sampled token's logprob and the top-N pairs for rows that asked for them."""
    result = SampleResult(token_ids=token_ids, logprobs=[None] * len(params), top_logprobs=[None] * len(params))
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return result
    logprobs = torch.log_softmax(raw[wanted], dim=-1)  # [W, V]
    chosen = logprobs.gather(1, token_ids[wanted].unsqueeze(1)).squeeze(1)  # [W]
    for j, row in enumerate(wanted):
        result.logprobs[row] = float(chosen[j])
        top = params[row].logprobs
        assert top is not None  # `wanted` holds the rows that asked
        values, ids = logprobs[j].topk(min(top, logprobs.shape[1]))
        result.top_logprobs[row] = list(zip(ids.tolist(), values.tolist()))
    return result
