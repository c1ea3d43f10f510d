"""Measuring a profile: `klotski profile` (full) and the automatic one of a first plan or run (quick).

`measure_profile` reads the disk as the store does, times the host -> device link on CUDA, then
times the real ModelRunner ops at a model's shapes and dtype: each op runs on random weights of
the model's unit shapes (storage dtype) at a few sizes, and a linear model is fitted: seconds =
a + b * tokens (+ c * tokens * context for attention). Sizes are few and small, so
Mixtral-8x7B's shapes profile in well under a minute on two CPU cores.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from klotski.layers.attention import StepInfo
from klotski.models.spec import ATTN, EXPERT, HEAD, MOE, WeightKey
from klotski.planner.profile import (
    HardwareProfile,
    machine_fingerprint,
    measure_contention,
    measure_host_to_device,
    scratch_file,
    timed_read,
)
from klotski.planner.shapes import ModelShape
from klotski.runtime.model import ModelRunner
from klotski.store.tiered import READERS, reads_in_parts

# B = sequences, S = new tokens per sequence, C = context, D = hidden, T = tokens

# Up to a prefill group's tokens per expert (n 2 x bs 64 x 16 tokens x top-2 / 8 = 512): the fit is
# linear, and a range ending at 128 mispredicted 256-token calls by +50% at Mixtral-8x7B's shapes,
# one ending at 256 512-token calls by -13% (427 ms against 490 measured, AMD EPYC, 2 threads).
EXPERT_TOKENS = (1, 8, 32, 128, 256, 512)
CONTENTION_TOKENS = (8, 128)  # a decode-sized and a prefill-sized expert call
GATE_TOKENS = (1, 64, 512)
HEAD_TOKENS = (1, 16, 64)
# (B, S, C): decode at 1-64 rows and prefill up to a 1024-token batch. Without the 64-row points the
# T and T*C terms could not be told apart: the fit put all on T*C and gave a 64 x 16-token prefill
# 77 ms against 290 measured, a 64-row decode 13 ms against 22.
ATTENTION_POINTS = ((1, 1, 128), (8, 1, 512), (32, 1, 128), (64, 1, 32), (1, 64, 64), (2, 64, 64), (64, 16, 16))


@dataclass(frozen=True)
class Effort:
    """How hard a profile measures: `klotski profile` (FULL) or the automatic first one (QUICK)."""

    reps: int  # timed repetitions per op size (best of)
    min_op_s: float  # ...and more, up to this much time per size: one noisy call skewed a fit by 2x
    disk_bytes: int  # the scratch file read for the disk rate (at least two expert blobs)
    contention_s: float  # seconds per phase (alone, beside reads) of the contention measurement
    host_to_device_bytes: int


FULL = Effort(reps=2, min_op_s=0.1, disk_bytes=256 << 20, contention_s=0.5, host_to_device_bytes=256 << 20)
# Best of two per size (one call alone was noisy enough on a busy machine to double a fit's
# overhead) and short contention phases; at Mixtral-8x7B's shapes the scratch file is two 336 MiB
# expert blobs whatever disk_bytes says.
QUICK = Effort(reps=2, min_op_s=0.01, disk_bytes=8 << 20, contention_s=0.1, host_to_device_bytes=64 << 20)


def measure_profile(
    shape: ModelShape,
    dtype: torch.dtype,
    device: str,
    effort: Effort = FULL,
    disk_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> HardwareProfile:
    """This machine's profile at these shapes and dtype, the disk read in `disk_dir` (the offload dir).

    Reads as the store issues them: O_DIRECT, one pread of a whole expert blob at a time, from a
    fresh scratch file of at least two blobs (one file for the disk rate and the contention)."""
    chunk = max(-(-max(shape.expert_bytes(), 1) // 4096) * 4096, 4096)
    size = max(effort.disk_bytes // chunk, 2) * chunk
    split = reads_in_parts(chunk, READERS, device != "cpu")  # as the store's reader threads share a blob
    with scratch_file(disk_dir, size, chunk, "klotski-profile-") as scratch:
        disk, method = timed_read(scratch, size, chunk, READERS, split)
        log(f"disk -> memory: {disk:.2f} GB/s ({method}, {READERS} reader threads, blobs of {chunk} bytes)")
        h2d = measure_host_to_device(effort.host_to_device_bytes)
        ops = measure_ops(shape, dtype, device, effort.reps, log=log, min_s=effort.min_op_s)
        profile = _measured(shape, dtype, device, disk, method, h2d, ops, machine_fingerprint(disk_dir))
        if device == "cpu":  # reads and compute share the cores and memory: measure how they slow each other
            contention = [
                measure_contention(
                    expert_call(shape, dtype, device, t),
                    size,
                    chunk,
                    effort.contention_s,
                    READERS,
                    path=scratch,
                    split=split,
                )
                for t in CONTENTION_TOKENS
            ]
            profile.compute_slowdown_under_io = float(np.mean([c["compute_slowdown_under_io"] for c in contention]))
            profile.disk_gbps_beside_compute = float(np.mean([c["disk_gbps_beside_compute"] for c in contention]))
            log(
                f"beside compute: ops x{profile.compute_slowdown_under_io:.2f} slower while reading, "
                f"disk {profile.disk_gbps_beside_compute:.2f} GB/s ({READERS} reader threads)"
            )
    return profile


def _measured(shape, dtype, device, disk, method, h2d, ops, machine) -> HardwareProfile:
    """A measured profile: fits at these shapes, plus peak figures derived from the expert fit."""
    expert = ops.get("expert", {"a": 1e-3, "b": 1e-3})
    flops_per_token = shape.expert_flops(1) or 1.0
    return HardwareProfile(
        name=socket.gethostname(),
        source="measured",
        device=device,
        disk_gbps=disk,
        host_to_device_gbps=h2d,
        peak_tflops=flops_per_token / max(expert["b"], 1e-12) / 1e12,
        efficiency=1.0,
        memory_gbps=shape.expert_bytes() / max(expert["a"], 1e-9) / 1e9,
        machine=machine,
        ops={f"{shape.shape_key()}|{str(dtype).removeprefix('torch.')}": ops},
        notes=f"disk read with {method}; op times fitted at {shape.name}'s shapes",
    )


def measure_ops(
    shape: ModelShape,
    dtype: torch.dtype,
    device: str = "cpu",
    reps: int = 2,
    log: Callable[[str], None] = lambda _: None,
    min_s: float = 0.0,
) -> dict[str, dict]:
    """Fitted op times {op: {a, b, c}} for these shapes in this compute dtype on this device."""
    runner = ModelRunner(shape.spec, dtype, device)
    timer = _Timer(device, reps, min_s)
    layer = shape.moe_layers()[0] if shape.moe_layers() else 0
    out: dict[str, dict] = {}
    if shape.moe_layers():
        w = _weights(shape, WeightKey(layer, EXPERT, 0), device)
        out["expert"] = _fit(
            EXPERT_TOKENS, [timer(lambda t=t: runner.expert(w, _x(t, shape, dtype, device))) for t in EXPERT_TOKENS]
        )
        log(f"expert: {out['expert']}")
        w = _weights(shape, WeightKey(layer, MOE), device)
        out["gate"] = _fit(
            GATE_TOKENS, [timer(lambda t=t: _gate(runner, w, t, shape, dtype, device)) for t in GATE_TOKENS]
        )
    dense = [l for l in range(shape.spec.num_layers) if not shape.spec.moe_layers[l]]
    if dense:
        w = _weights(shape, WeightKey(dense[0], MOE), device)
        out["dense_mlp"] = _fit(
            EXPERT_TOKENS,
            [timer(lambda t=t: runner.dense_mlp(w, _x(t, shape, dtype, device)[None])) for t in EXPERT_TOKENS],
        )
    w = _weights(shape, WeightKey(None, HEAD), device)
    out["head"] = _fit(
        HEAD_TOKENS, [timer(lambda t=t: runner.head(w, _x(t, shape, dtype, device))) for t in HEAD_TOKENS]
    )
    out["attention"] = _attention(shape, runner, timer, dtype, device)
    log(f"attention: {out['attention']}")
    return out


def expert_call(shape: ModelShape, dtype: torch.dtype, device: str, tokens: int) -> Callable[[], object]:
    """One expert FFN over `tokens` tokens at the model's shapes (what contention is measured with)."""
    runner = ModelRunner(shape.spec, dtype, device)
    layer = shape.moe_layers()[0] if shape.moe_layers() else 0
    key = WeightKey(layer, EXPERT, 0) if shape.moe_layers() else WeightKey(layer, MOE)
    w, x = _weights(shape, key, device), _x(tokens, shape, dtype, device)
    if not shape.moe_layers():
        return lambda: runner.dense_mlp(w, x[None])
    return lambda: runner.expert(w, x)


class _Timer:
    """Median wall time of a callable after one warm-up (synchronising CUDA): at least `reps`
    calls, more while they took under `min_s` in all (cheap ops get many tries, costly ones
    `reps`). The median, not the best: a run's time is a sum of many calls, and the best of a few
    on a shared machine was 10-20% under a run's typical call."""

    def __init__(self, device: str, reps: int, min_s: float = 0.0):
        self.cuda, self.reps, self.min_s = device.startswith("cuda"), max(reps, 1), min_s

    def __call__(self, fn) -> float:
        fn()
        times: list[float] = []
        while len(times) < self.reps or (sum(times) < self.min_s and len(times) < 50):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times))


def _weights(shape: ModelShape, key: WeightKey, device: str) -> dict[str, torch.Tensor]:
    """Random weights of a unit's shapes in the storage dtype (norms are ones)."""
    out = {}
    for name, s in shape.spec.unit_shapes(key).items():
        t = torch.empty(s, dtype=shape.weight_dtype, device=device)
        out[name] = t.fill_(1.0) if len(s) == 1 else t.uniform_(-0.02, 0.02)
    if "lm_head" not in out and key.part == HEAD:
        out["lm_head"] = torch.empty(
            shape.spec.vocab_size, shape.spec.hidden_size, dtype=shape.weight_dtype, device=device
        ).uniform_(-0.02, 0.02)
    return out


def _x(tokens: int, shape: ModelShape, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(tokens, shape.spec.hidden_size, dtype=dtype, device=device)  # [T, D]


def _gate(runner: ModelRunner, w, tokens: int, shape: ModelShape, dtype, device):
    x = _x(tokens, shape, dtype, device)[None]  # [1, T, D]
    return runner.gate(w, x, torch.ones(1, tokens, dtype=torch.bool, device=device))


def _attention(shape: ModelShape, runner: ModelRunner, timer: _Timer, dtype, device) -> dict:
    """Fit a + b*T + c*T*C over decode and prefill points (T = B*S new tokens, C = keys attended)."""
    w = _weights(shape, WeightKey(0, ATTN), device)
    rows, times = [], []
    for b, s, c in ATTENTION_POINTS:
        kv = runner.new_kv(b, c)
        positions = torch.arange(c - s, c).expand(b, s)  # [B, S]
        step = StepInfo(positions=positions, total=torch.full((b,), c), max_total=c, mask_cache={})
        x = torch.randn(b, s, shape.spec.hidden_size, dtype=dtype, device=device)  # [B, S, D]
        times.append(timer(lambda x=x, kv=kv, step=step: runner.attention(w, x, kv, step)))
        rows.append((1.0, b * s, b * s * c))
    return _lstsq(np.array(rows), np.array(times))


def _fit(tokens: tuple[int, ...], times: list[float]) -> dict:
    return _lstsq(np.array([(1.0, t, 0.0) for t in tokens]), np.array(times))


def _lstsq(rows: np.ndarray, times: np.ndarray) -> dict:
    """Least squares weighted by 1/time (relative error), coefficients clamped at zero."""
    weight = 1.0 / np.maximum(times, 1e-9)
    coef, *_ = np.linalg.lstsq(rows * weight[:, None], times * weight, rcond=None)
    a, b, c = (max(float(v), 0.0) for v in coef)
    return {"a": a, "b": b, "c": c} if rows[:, 2].any() else {"a": a, "b": b}
