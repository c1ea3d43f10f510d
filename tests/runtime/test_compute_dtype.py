"""dtype="auto" on CPU: the faster of native low precision and fp32-upcast, measured once and cached."""

from __future__ import annotations

import json

import pytest
import torch

from klotski.runtime import compute_dtype


def test_fp32_weights_compute_in_fp32():
    assert compute_dtype.cpu_compute_dtype(torch.float32) == torch.float32


def test_the_faster_measurement_wins_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("KLOTSKI_HOME", str(tmp_path))
    calls = []

    def slow_native(storage):
        calls.append(storage)
        return {"native": 2.0, "upcast_fp32": 1.0}

    monkeypatch.setattr(compute_dtype, "measure", slow_native)
    compute_dtype.cpu_compute_dtype.cache_clear()
    assert compute_dtype.cpu_compute_dtype(torch.bfloat16) == torch.float32
    compute_dtype.cpu_compute_dtype.cache_clear()
    assert compute_dtype.cpu_compute_dtype(torch.bfloat16) == torch.float32  # from the disk cache
    assert calls == [torch.bfloat16]
    cached = json.loads((tmp_path / "profiles" / "cpu-compute-dtype.json").read_text())
    assert list(cached.values()) == [{"native": 2.0, "upcast_fp32": 1.0}]


@pytest.mark.real_timing
def test_measure_times_both_ways():
    times = compute_dtype.measure(torch.bfloat16)
    assert set(times) == {"native", "upcast_fp32"} and all(t > 0 for t in times.values())
