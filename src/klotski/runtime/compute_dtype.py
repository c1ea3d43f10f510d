"""Pick the CPU compute dtype for low-precision weights by measuring, not assuming.

Two ways to multiply activations by bf16/fp16 weights on a CPU: compute in the weights' dtype,
or upcast the weights to fp32 for each matmul. Which is faster depends on the CPU and the torch
build (docs/offloading.md, "Compute dtype on the CPU", has this project's figures, which flipped
between torch builds), so `dtype="auto"` times both once per machine and caches the answer under
$KLOTSKI_HOME/profiles/.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from pathlib import Path

import torch

from klotski.config import DTYPES
from klotski.errors import KlotskiError
from klotski.paths import home

# Big enough to be memory-bound like a real expert, small enough to time in ~0.1 s.
PROBE_TOKENS, PROBE_IN, PROBE_OUT = 16, 4096, 4096


def cpu_name() -> str:
    """The CPU's model name: what measured figures (dtype timings, profiles) are valid for."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# What decides how fast a CPU multiplies in each dtype (x86 names as /proc/cpuinfo spells them): a
# figure measured with AMX or AVX-512 BF16 is wrong on a machine without them, though the cloud
# hands out both under one model name.
MATMUL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The MATMUL_FLAGS the first processor has, in that order (`cpuinfo`: /proc/cpuinfo's text,
    read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux, or a sandbox without /proc
            return []
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86, arm
            have = set(line.split(":", 1)[1].split())
            return [f for f in MATMUL_FLAGS if f in have]
    return []


def best_time(fn, reps: int = 3) -> float:
    """Seconds of fn's fastest call of `reps`, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(storage: torch.dtype) -> dict[str, float]:
    """Seconds for one probe matmul: computing in `storage` vs upcasting to fp32."""
    w = (torch.randn(PROBE_OUT, PROBE_IN) * 0.02).to(storage)  # [out, in], used as x @ w.T
    x = torch.randn(PROBE_TOKENS, PROBE_IN)
    low = x.to(storage)
    return {"native": best_time(lambda: low @ w.T), "upcast_fp32": best_time(lambda: x @ w.float().T)}


# Row counts of an expert call in a decode step of a small group and in a prefill.
PHASE_ROWS = {"decode": 8, "prefill": 256}


def measure_expert(storage: torch.dtype, hidden: int, intermediate: int) -> dict[str, dict[str, float]]:
    """Seconds for one expert-shaped matmul per phase's row count: in `storage`, and in fp32 over
    the weight upcast in tiles (layers/linear.py's path)."""
    from klotski.layers.linear import linear

    w = (torch.randn(intermediate, hidden) * 0.02).to(storage)  # [I, D]
    out = {}
    for phase, rows in PHASE_ROWS.items():
        x = torch.randn(rows, hidden)
        low = x.to(storage)
        out[phase] = {
            "native": best_time(lambda low=low: low @ w.T, 2),
            "upcast_fp32": best_time(lambda x=x: linear(x, w), 2),
        }
    return out


def _machine_key() -> str:
    return f"{cpu_name()}|{','.join(cpu_flags())}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _cached(key: str, measure_fn):
    """A measurement from $KLOTSKI_HOME/profiles/cpu-compute-dtype.json, measured and saved if new."""
    cache = home() / "profiles" / "cpu-compute-dtype.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        known[key] = measure_fn()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=2))
        except OSError:
            pass  # an unwritable cache only costs a re-measure next time
    return known[key]


@functools.cache
def cpu_compute_dtype(storage: torch.dtype) -> torch.dtype:
    """fp32 for fp32 weights; for bf16/fp16 weights, whichever measured faster on this CPU."""
    if storage == torch.float32:
        return torch.float32
    times = _cached(f"{_machine_key()}|{storage}", lambda: measure(storage))
    return storage if times["native"] <= times["upcast_fp32"] else torch.float32


@functools.cache
def prefill_expert_dtype(storage: torch.dtype, compute: torch.dtype, hidden: int, intermediate: int):
    """The dtype a prefill's experts compute in on this CPU, when it differs from `compute`: fp32 over
    weights upcast in tiles where that measured faster at prefill-sized calls than `compute` (= the
    storage dtype, chosen for small calls); None otherwise. A CPU without bf16 matmul units runs a
    prefill's large calls several times faster in fp32, while a decode's few rows stream the weights
    faster as stored. By phase, not by row count, so a token's arithmetic never depends on how the
    group was batched."""
    if storage == torch.float32 or compute != storage:
        return None
    key = f"{_machine_key()}|{storage}|expert {hidden}x{intermediate}"
    times = _cached(key, lambda: measure_expert(storage, hidden, intermediate))["prefill"]
    return torch.float32 if times["upcast_fp32"] < times["native"] else None


def resolve_dtype(name: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: 'auto' is the checkpoint's on CUDA; on CPU, whichever of the checkpoint's
    dtype and fp32 (upcasting weights per matmul) measured faster on this machine."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return checkpoint_dtype if device.type == "cuda" else cpu_compute_dtype(checkpoint_dtype)
    if name not in DTYPES:
        raise KlotskiError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]
