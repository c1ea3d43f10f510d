"""Frozen configuration: what the user asked for (EngineConfig) and what the planner decided (Policy)."""

from __future__ import annotations

import math
import re
from dataclasses import Field, dataclass, field, fields
from typing import Any

import torch

from klotski.errors import KlotskiError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: str | int | float | None, what: str = "memory") -> int | None:
    """'20GiB', '1.5 GB', '512MiB' or a plain number of bytes -> bytes; None stays None.

    Anything else (a negative or non-finite number, a bool, an unknown unit, a size beyond
    2**63 bytes) is a KlotskiError naming the value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise KlotskiError(f"cannot read {what} size {value!r:.60}; write bytes or a size like 20GiB, 1.5GB, 512MiB")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise KlotskiError(
                f"cannot read {what} size {value!r:.60}; write bytes or a size like 20GiB, 1.5GB, 512MiB"
            )
        digits = m.group(1)
        number, scale = (int(digits) if digits.isdigit() else float(digits)), _UNITS[m.group(2).lower()]
    else:
        number, scale = value, 1
    if (isinstance(number, float) and not math.isfinite(number)) or number < 0 or number * scale >= 2**63:
        raise KlotskiError(f"{what} size {value!r:.60} is out of range; give a size from 0 to 8 EiB, like 20GiB")
    return int(number * scale)  # exact for integers: no float rounding of a byte count


def format_bytes(n: int | float) -> str:
    """Bytes in the unit that shows them with three significant digits: '512 B', '4.00 KiB',
    '1.50 GiB' (never '0.00 GiB' for a small size)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            digits = 0 if unit == "B" or abs(n) >= 100 else 1 if abs(n) >= 10 else 2
            return f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class Flag:
    """How an EngineConfig field appears on the command line (commands/generate.py adds the flags).

    group: "budget" (memory budgets: every command that runs or plans the engine), "hardware" (the
    profile the planner predicts with: likewise), "policy" (what
    the planner chooses unless fixed: likewise), "engine" (offload dir, prefetch table: the commands
    that run the engine), "dtype", "context" (max_model_len: `serve`), "replay" (the benchmarks' routing
    replay: `generate` only).
    """

    help: str
    group: str
    type: Any = None  # argparse type; sizes stay strings, which EngineConfig.create reads
    metavar: str | None = None
    action: str | None = None  # "store_true" for a switch


def _knob(default: Any, help: str, group: str, **flag: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(help, group, **flag)})


# --hardware's names (planner/profile.py BUNDLED holds env1 / env2's files); anything else is a profile JSON.
HARDWARE_NAMES = ("auto", "builtin", "env1", "env2")


def check_hardware(value: str) -> str:
    """`value` when it names a profile (HARDWARE_NAMES or an existing file); else a KlotskiError with the choices."""
    from pathlib import Path

    if value in HARDWARE_NAMES or (isinstance(value, str) and value and Path(value).is_file()):
        return value
    raise KlotskiError(
        f"unknown hardware profile {value!r:.80}; expected auto (measure this machine once, then the cached profile), "
        "builtin (the uncalibrated estimate), env1, env2, or a profile JSON file"
    )


SIZE_FIELDS = {"device_memory": "device memory", "host_memory": "host memory"}  # bytes, or '20GiB'


@dataclass(frozen=True)
class EngineConfig:
    """What the user asked for: the model, budgets, and the schedule knobs.

    The one declaration of the engine's options: `LLM(**kwargs)` takes these fields, and the
    command-line flags of the fields with a Flag are made from them (name, default, help).
    """

    model: str  # checkpoint directory
    dtype: str | torch.dtype = _knob(  # compute dtype; weights stay in the checkpoint's dtype until used
        "auto",
        "compute dtype: auto (the checkpoint's on CUDA; on CPU whichever of it and float32 measured "
        "faster here) | float32 | bfloat16 | float16",
        "dtype",
    )
    device: str = "auto"  # "cuda" when present, else "cpu"
    seed: int = 0  # fallback seed for requests without their own
    device_memory: int | None = _knob(  # bytes of device memory weights + KV may use (None: unlimited)
        None, "device memory budget, e.g. 20GiB (CPU-only: RAM used as the device)", "budget"
    )
    host_memory: int | None = _knob(  # bytes of host memory for weights (None: 0 on CPU-only, else unlimited)
        None, "host memory budget, e.g. 64GiB (CPU-only default: 0, the device tier is RAM)", "budget"
    )
    offload_dir: str | None = _knob(  # where repacked expert blobs live (disk tier)
        None, "directory for the repacked expert blobs (disk tier)", "engine"
    )
    hardware: str = _knob(  # the planner's profile (planner/api.py pick_profile)
        "auto",
        "the profile the planner predicts with: auto (this machine's cached profile; the first run "
        "measures one, seconds) | builtin (an uncalibrated estimate) | env1 | env2 | PROFILE.json",
        "hardware",
        metavar="PROFILE",
    )
    schedule: str = _knob(  # the ablation ladder's rung
        "klotski", "sequential | overlap | multibatch | hot | klotski", "policy"
    )
    batch_size: int | None = _knob(  # bs: sequences per batch (None: the planner's choice)
        None, "bs: sequences per batch (default: the planner's)", "policy", type=int
    )
    num_batches: int | None = _knob(  # n: batches per group sharing each loaded layer
        None, "n: batches sharing each loaded layer (default: the planner's)", "policy", type=int
    )
    num_hot: int | None = _knob(  # K: hot experts prefetched per layer (None: adaptive)
        None,
        "K: hot experts prefetched per layer, the paper's fixed top-K (default: adaptive, the experts "
        "the group uses with p >= 0.9; 0: none)",
        "policy",
        type=int,
    )
    prefetch_table: str | None = _knob(  # None: a table beside the model or in its offload dir, else frequencies
        None, "correlation table (ours, or the authors' JSON) driving hot-expert prefetch", "engine"
    )
    max_model_len: int | None = _knob(  # cap on prompt + generated tokens (None: the model's)
        None, "context length: prompt + generated tokens (default: the model's)", "context", type=int
    )
    routing_replay: str | None = _knob(  # benchmarks only; never on by default
        None,
        "benchmarks only: replace the router's choices with routing sampled from a real table "
        "(mixtral-8x7b | mixtral-8x22b | TABLE.json) or replayed from TRACE.npz",
        "replay",
        metavar="SOURCE",
    )
    record_timeline: bool = True  # keep every op and transfer of a run (LLM.last_timeline, --trace)
    check_weights: bool = _knob(  # weights repacked into the offload dir are checked whatever this says
        False,
        "check every weight for NaN / inf as it is loaded (one more pass over the weights; weights "
        "repacked into the offload dir are always checked)",
        "engine",
        action="store_true",
    )

    @classmethod
    def create(cls, **kwargs: Any) -> EngineConfig:
        """A config from LLM's keyword arguments: sizes may be strings ('20GiB'); an unknown name is a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option {unknown[0]!r}; the options are: {', '.join(sorted(known))}")
        for name, what in SIZE_FIELDS.items():
            if name in kwargs:
                kwargs[name] = parse_bytes(kwargs[name], what)
        return cls(**kwargs)

    def __post_init__(self):
        for name in ("batch_size", "num_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise KlotskiError(f"{name} must be at least 1, got {value}")
        if self.num_hot is not None and self.num_hot < 0:  # 0: no hot prefetch at all
            raise KlotskiError(f"num_hot must be 0 or more, got {self.num_hot}")
        if self.device_memory is not None and self.device_memory <= 0:
            raise KlotskiError(f"device_memory must be positive, got {self.device_memory}")
        if self.host_memory is not None and self.host_memory < 0:
            raise KlotskiError(f"host_memory cannot be negative, got {self.host_memory}")
        check_hardware(self.hardware)

    @staticmethod
    def flags(*groups: str) -> list[tuple[Field, Flag]]:
        """(field, flag) of every field with a command-line flag in these groups, in declaration order."""
        return [
            (f, f.metadata["flag"])
            for f in fields(EngineConfig)
            if "flag" in f.metadata and f.metadata["flag"].group in groups
        ]

    @property
    def budgeted(self) -> bool:
        """Some memory budget or an offload dir is given: weights are placed across tiers."""
        return self.device_memory is not None or self.host_memory is not None or self.offload_dir is not None


@dataclass(frozen=True)
class Policy:
    """What the planner decided: batch shape, hot experts, and where each kind of tensor lives."""

    batch_size: int  # bs
    num_batches: int  # n
    num_hot: int  # K
    schedule: str
    placement: dict  # tensor kind -> tier (a summary, for stats and the plan's report)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "num_hot": self.num_hot,
            "schedule": self.schedule,
            "placement": self.placement,
        }
