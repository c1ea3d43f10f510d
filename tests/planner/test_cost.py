"""The cost model: each constraint term, routing statistics, and memory against the store's own peak."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from klotski.models.spec import EXPERT, WeightKey
from klotski.planner.cost import (
    BlockTimes,
    OpCosts,
    RoutingStats,
    block_times,
    first_cold_covered,
    gate_covered,
    hot_covered,
    kv_cache_bytes,
    memory_model,
    next_attention_covered,
)
from klotski.planner.profile import builtin_estimate
from klotski.runtime.model import ModelRunner
from klotski.runtime.schedule import get_schedule
from klotski.store.tiers import DEVICE, DISK

# t_c_A=2, t_c_G=1, io: A=4, G=3, E=10, hotE=5, cold sum=6, K=2, Q=1.5
B = BlockTimes(t_c_A=2.0, t_c_G=1.0, t_io_A=4.0, t_io_G=3.0, t_io_E=10.0, t_c_hotE=5.0, t_c_coldE=6.0, K=2, Q=1.5)


def test_constraint_4_gate():
    assert gate_covered(1, B) == 2 - 3
    assert gate_covered(2, B) == 4 - 3


def test_constraint_5_hot_experts():
    assert hot_covered(7, B) == 21 - 23
    assert hot_covered(8, B) == 24 - 23


def test_constraint_6_first_cold_expert():
    assert first_cold_covered(9, B) == 27 + 5 - 33
    assert first_cold_covered(10, B) == 30 + 5 - 33
    assert first_cold_covered(1, BlockTimes(**{**B.__dict__, "Q": 0.0})) == math.inf  # no cold expert


def test_constraint_7_cold_queue_and_next_attention():
    need = 3 + (2 + 1.5) * 10 + 4  # 42
    assert next_attention_covered(10, B) == 30 + 5 + 6 - need
    assert next_attention_covered(11, B) == 33 + 5 + 6 - need


def test_expected_queue_from_routing():
    uniform = RoutingStats.uniform(1, 8, 2)
    assert uniform.expected_queue(0, 1, 2) == pytest.approx(6 * 0.25)  # one token: 2 of 8, 6 candidates at 1/4
    assert uniform.expected_queue(0, 10_000, 2) == pytest.approx(6.0)  # a big group uses every expert
    skewed = RoutingStats(np.array([[0.45, 0.45, 0.025, 0.025, 0.025, 0.025]]), 2, "test")
    assert skewed.hot(0, 2) == [0, 1]
    assert skewed.expected_queue(0, 8, 2) < uniform.expected_queue(0, 8, 2)


def test_block_times_follow_placement(tiny_shape, io_costs):
    routing = RoutingStats.uniform(3, 8, 2)
    on_disk = {k: (DISK if k.part == EXPERT else DEVICE) for k in tiny_shape.unit_bytes}
    b = block_times(io_costs, routing, on_disk, 1, 1, 4, 2, 16, 2)
    assert b.t_io_E == pytest.approx(tiny_shape.padded(WeightKey(1, EXPERT, 0)) / 0.01e9)
    assert b.t_io_G == 0.0 and b.t_io_A == 0.0
    resident = block_times(io_costs, routing, {k: DEVICE for k in tiny_shape.unit_bytes}, 1, 1, 4, 2, 16, 2)
    assert resident.t_io_E == 0.0 and gate_covered(1, resident) > 0


def test_op_costs_use_measured_fits(tiny_shape):
    profile = builtin_estimate("cpu")
    profile.ops = {f"{tiny_shape.shape_key()}|float32": {"expert": {"a": 1.0, "b": 0.5}}}
    costs = OpCosts(tiny_shape, profile, torch.float32)
    assert costs.expert(4) == 3.0 and costs.source == "measured fits"
    assert costs.expert(0) == 0.0


def test_unmeasured_cpu_costs_follow_the_compute_dtype(tiny_shape):
    """The built-in estimate costs bf16 matmuls at bf16's rate: fp32's made plans 10x too pessimistic."""
    from klotski.planner.api import UNCALIBRATED, pick_profile

    assert pick_profile(tiny_shape, torch.bfloat16, "cpu", "builtin")[1] == UNCALIBRATED

    fp32 = OpCosts(tiny_shape, pick_profile(tiny_shape, torch.float32, "cpu", "builtin")[0], torch.float32)
    bf16 = OpCosts(tiny_shape, pick_profile(tiny_shape, torch.bfloat16, "cpu", "builtin")[0], torch.bfloat16)
    assert bf16.expert(4096) < fp32.expert(4096) / 5


def test_kv_bytes_match_the_runner(tiny_shape, io_costs):
    runner = ModelRunner(tiny_shape.spec, torch.float32)
    per = tiny_shape.spec.num_layers * runner.new_kv(3, 20).nbytes
    assert kv_cache_bytes(io_costs, 3, 2, 20) == 2 * per


def test_memory_model_bounds_the_stores_peak(tmp_path, monkeypatch):
    """Run the engine under the planner's placement; the store's own peak (transients charged with
    the KV cache) stays within the model's."""
    from klotski import LLM, SamplingParams
    from klotski.commands.create_model import create_model
    from klotski.planner.engine_glue import engine_shape
    from klotski.store import factory
    from klotski.store.tiered import TieredStore

    model = create_model(tmp_path / "m", "mixtral", "tiny", layers=3, dtype="bfloat16")
    # Cached copies (warm-up reads included) fill any room left up to the budget: the model bounds the need.
    monkeypatch.setattr(factory, "TieredStore", functools.partial(TieredStore, cache=False))
    llm = LLM(str(model), offload_dir=str(tmp_path / "off"), device_memory="600KB", batch_size=2, num_batches=2)
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}] * 4, SamplingParams(max_tokens=5, ignore_eos=True))
        stats, placement = llm.last_stats, llm.store.placement
    finally:
        llm.store.close()
    costs = OpCosts(engine_shape(llm.checkpoint), builtin_estimate("cpu"), llm.dtype)
    m = memory_model(costs, placement, get_schedule("klotski"), 2, 2, 4, 5, 2)
    resident = sum(llm.checkpoint.unit_nbytes(k) for k, t in placement.items() if t == DEVICE)
    assert m.weights[DEVICE] == resident
    assert stats["bytes_read"]["disk"] > 0
    assert resident + m.kv_cache <= stats["peak_bytes"]["device"] <= m.device_store_peak


def test_a_measured_fit_never_predicts_faster_than_the_roofline(tiny_shape):
    """Fits are linear over small sizes (weight-read bound), so far beyond them they can fall below
    what the profile's own peak allows; the cost is then the roofline, and where the fit is slower
    (small sizes, fixed overheads), the fit."""
    import dataclasses

    from klotski.planner.profile import HardwareProfile

    base = builtin_estimate("cpu", torch.float32)
    key = f"{tiny_shape.shape_key()}|float32"
    flat = {"a": 1e-3, "b": 0.0, "c": 0.0}  # as a fit over weight-bound sizes comes out
    ops = {key: {"attention": flat, "expert": {"a": 1e-3, "b": 0.0}, "head": {"a": 1e-3, "b": 0.0}}}
    profile = HardwareProfile(**(dataclasses.asdict(base) | {"source": "measured", "ops": ops}))
    costs = OpCosts(tiny_shape, profile, torch.float32)
    roofline = OpCosts(tiny_shape, base, torch.float32)
    assert costs.fits  # the measured fits are used
    big = 10**6
    assert costs.attention(big, 1, 16) == roofline.attention(big, 1, 16) > 1e-3
    assert costs.expert(big) == roofline.expert(big) > 1e-3
    assert costs.head(big) == roofline.head(big) > 1e-3
    assert costs.expert(1) == max(1e-3, roofline.expert(1))
