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


def _best_time(fn, reps: int = 3) -> float:
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
    return {"native": _best_time(lambda: low @ w.T), "upcast_fp32": _best_time(lambda: x @ w.float().T)}


@functools.cache
def cpu_compute_dtype(storage: torch.dtype) -> torch.dtype:
    """fp32 for fp32 weights; for bf16/fp16 weights, whichever measured faster on this CPU."""
    if storage == torch.float32:
        return torch.float32
    key = f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{storage}"
    cache = home() / "profiles" / "cpu-compute-dtype.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        known[key] = measure(storage)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=2))
        except OSError:
            pass  # an unwritable cache only costs a re-measure next time
    times = known[key]
    return storage if times["native"] <= times["upcast_fp32"] else torch.float32


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
