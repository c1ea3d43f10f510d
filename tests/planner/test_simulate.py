"""The simulator drives the real Pipeline and run_group on a virtual clock."""

from __future__ import annotations

import json

import pytest

from klotski.config import Policy
from klotski.models.spec import EXPERT
from klotski.planner.simulate import simulate
from klotski.prefetch.table import bundled_table
from klotski.runtime import pipeline as pipeline_module
from klotski.store.tiers import DEVICE, DISK


def _run(shape, costs, schedule, bs=4, n=4, budget=None, table=None):
    placement = {k: (DISK if k.part == EXPERT else DEVICE) for k in shape.unit_bytes}
    n = n if schedule not in ("sequential", "overlap") else 1
    return simulate(shape, costs, Policy(bs, n, 2, schedule, {}), placement, 8, 4, bs * n, table, budget)


def test_schedule_switches_order_the_bubble(tiny_shape, io_costs):
    """I/O-bound, real routing, a group that leaves some experts unused: klotski <= hot <= multibatch bubble."""
    table = bundled_table("mixtral-8x7b")
    bubble = {
        s: _run(tiny_shape, io_costs, s, bs=2, n=2, table=table).summary["bubble_s"]
        for s in ("multibatch", "hot", "klotski")
    }
    eps = 1e-9  # equal bubbles may differ in the last bit of a float sum
    assert bubble["klotski"] <= bubble["hot"] + eps <= bubble["multibatch"] + 2 * eps
    assert bubble["klotski"] < bubble["multibatch"]


def test_it_is_the_real_pipeline(tiny_shape, io_costs, monkeypatch):
    calls = []
    real = pipeline_module.Pipeline._experts

    def spy(self, *a, **kw):
        calls.append(type(self.store).__name__)
        return real(self, *a, **kw)

    monkeypatch.setattr(pipeline_module.Pipeline, "_experts", spy)
    _run(tiny_shape, io_costs, "klotski")
    assert calls and set(calls) == {"SimStore"}


def test_deterministic_and_consistent(tiny_shape, io_costs):
    a, b = _run(tiny_shape, io_costs, "klotski"), _run(tiny_shape, io_costs, "klotski")
    assert a.wall_s == b.wall_s > 0
    assert a.tokens_per_s == pytest.approx(a.generated_tokens / a.wall_s)
    s = a.summary
    assert s["compute_busy_s"] + s["bubble_s"] <= a.wall_s + 1e-9
    assert 0 < s["bubble_ratio"] < 1


def test_budget_makes_fetches_wait(tiny_shape, io_costs):
    free = _run(tiny_shape, io_costs, "klotski")
    tight = _run(tiny_shape, io_costs, "klotski", budget=free.peak_device * 3 // 4)
    assert tight.wall_s >= free.wall_s
    assert tight.peak_device <= free.peak_device


def test_chrome_trace_has_the_real_runs_lanes(tiny_shape, io_costs, tmp_path):
    sim = _run(tiny_shape, io_costs, "klotski")
    path = tmp_path / "t.json"
    sim.timeline.write_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "prefetch", "ondemand"} <= names
    kinds = {e["name"].split()[0] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"attention", "gate", "expert", "wait", "read"} <= kinds


def test_routing_from_the_real_table(io_costs):
    """A skewed real table at 32 layers: the hot experts cover more, so fewer waits than uniform."""
    from klotski.planner.cost import OpCosts
    from klotski.planner.shapes import shape_from_preset

    shape = shape_from_preset("tiny", layers=3)
    table = bundled_table("mixtral-8x22b")
    costs = OpCosts(shape, io_costs.profile, io_costs.dtype)
    real = _run(shape, costs, "klotski", table=table)
    uniform = _run(shape, costs, "klotski")
    assert real.wall_s < uniform.wall_s


def test_reads_slow_compute_by_the_profiles_contention(tiny_shape, io_bound):
    """A profile measuring that reads slow compute (and compute slows reads) predicts a longer run."""
    import dataclasses

    import torch

    from klotski.planner.cost import OpCosts

    quiet = _run(tiny_shape, OpCosts(tiny_shape, io_bound, torch.float32), "klotski")
    shared = dataclasses.replace(
        io_bound, compute_slowdown_under_io=2.0, disk_gbps_beside_compute=io_bound.disk_gbps / 1.5
    )
    loud = _run(tiny_shape, OpCosts(tiny_shape, shared, torch.float32), "klotski")
    assert loud.summary["compute_busy_s"] > quiet.summary["compute_busy_s"]
    assert loud.wall_s > quiet.wall_s


def test_embedding_rows_from_disk_cost_their_checksum_chunks(tiny_shape, io_costs):
    """The simulated prompts are all token 0; a batch's rows are still priced as spread over the
    vocabulary, each read with the checksum chunk it lies in (as store/offload.py reads them): more
    tokens cost more, and a row costs its chunk, not its own bytes. bytes_read stays the rows' bytes,
    as the real store counts them."""
    import torch

    from klotski.models.spec import EMBED, WeightKey
    from klotski.planner.simulate import SimStore, VirtualClock
    from klotski.store.offload import check_chunk
    from klotski.timeline import Timeline

    embed = WeightKey(None, EMBED)
    placement = {k: DEVICE for k in tiny_shape.unit_bytes} | {embed: DISK}
    table, vocab = tiny_shape.unit_bytes[embed], tiny_shape.spec.vocab_size

    def read(tokens):
        clock = VirtualClock()
        store = SimStore(tiny_shape, placement, io_costs, clock, Timeline(clock=clock))
        store.gather(embed, "weight", torch.zeros(tokens, dtype=torch.long))
        return clock.t, store.bytes_read[DISK]

    one, many = read(1), read(64)
    rate = io_costs.disk_gbps * 1e9
    assert one[0] >= check_chunk(embed, table) / rate and one[1] == table // vocab
    assert many[0] > one[0] and table // vocab < many[1] <= 64 * table // vocab
