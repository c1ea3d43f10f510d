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


def _prefill_faster_in_fp32(monkeypatch, home):
    monkeypatch.setenv("KLOTSKI_HOME", str(home))  # not the conftest-measured choice cached on disk
    slow = {"native": 2.0, "upcast_fp32": 1.0}
    fast = {"native": 1.0, "upcast_fp32": 2.0}
    monkeypatch.setattr(compute_dtype, "measure_expert", lambda *a: {"decode": fast, "prefill": slow})
    compute_dtype.prefill_expert_dtype.cache_clear()


def test_prefill_experts_upcast_only_where_measured_faster(monkeypatch, tmp_path):
    assert compute_dtype.prefill_expert_dtype(torch.bfloat16, torch.bfloat16, 64, 128) is None  # conftest: native
    _prefill_faster_in_fp32(monkeypatch, tmp_path / "home")
    assert compute_dtype.prefill_expert_dtype(torch.bfloat16, torch.bfloat16, 64, 128) == torch.float32
    # already computing in fp32, or fp32 weights: nothing to choose
    assert compute_dtype.prefill_expert_dtype(torch.bfloat16, torch.float32, 64, 128) is None
    assert compute_dtype.prefill_expert_dtype(torch.float32, torch.float32, 64, 128) is None


def test_prefill_in_fp32_gives_tokens_independent_of_batching(monkeypatch, tmp_path):
    """Where a prefill's experts compute in fp32 and a decode's in bf16, a token's arithmetic depends
    on its phase only: every batch shape and schedule gives the same tokens, and the transients the
    store charges include the upcast tile."""
    from klotski import LLM, SamplingParams
    from klotski.commands.create_model import create_model
    from klotski.runtime.transients import step_transient_bytes

    model = create_model(tmp_path / "m", "mixtral", "tiny", layers=2, dtype="bfloat16")
    _prefill_faster_in_fp32(monkeypatch, tmp_path / "home")
    prompts = [{"prompt_token_ids": [3, 1 + i, 7, 2 * i][: 2 + i % 3]} for i in range(5)]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seen = []
    for kw in ({}, {"batch_size": 1, "num_batches": 5}, {"batch_size": 2, "num_batches": 2, "schedule": "hot"}):
        llm = LLM(str(model), offload_dir=str(tmp_path / "off"), device_memory="700KB", **kw) if kw else LLM(str(model))
        assert llm.runner.prefill_expert_dtype == torch.float32 and llm.dtype == torch.bfloat16
        seen.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy)])
        llm.store.close()
    assert seen[0] == seen[1] == seen[2]
    spec = llm.spec
    plain = step_transient_bytes(spec, torch.bfloat16, 64, 8, 8, 8)
    assert step_transient_bytes(spec, torch.bfloat16, 64, 8, 8, 8, torch.float32) > plain
