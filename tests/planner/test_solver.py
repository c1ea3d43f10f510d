"""The solver: smallest n meeting the constraints, memory limits, and infeasible budgets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from klotski.errors import KlotskiError
from klotski.planner.cost import OpCosts, RoutingStats
from klotski.planner.solver import Budgets, Solver, Workload

WORK = Workload(prompt_len=16, gen_len=4)


def _solver(shape, costs, device):
    return Solver(shape, costs, RoutingStats.uniform(3, 8, 2), Budgets(device, 0))


def test_picks_the_smallest_n_meeting_every_constraint(tiny_shape, io_bound):
    """Ops cost 4 ms each here, so enough batches hide the expert reads (1.5 MiB: room for the
    group's prefill transients beside part of the weights)."""
    costs = OpCosts(tiny_shape, dataclasses.replace(io_bound, op_overhead_s=4e-3), torch.float32)
    solver = _solver(tiny_shape, costs, 3 << 19)
    plan = solver.solve(WORK, batch_size=4)
    n = plan.policy.num_batches
    assert all(s >= 0 for s in plan.slack.values())
    assert n > 1
    smaller = solver._plan(4, n - 1, WORK, None)
    assert smaller is None or any(s < 0 for s in smaller.slack.values())


def test_memory_caps_n(tiny_shape, io_costs):
    """Too I/O-bound for any n: the plan takes the fastest n that still fits, and n + 1 would not fit."""
    solver, work = _solver(tiny_shape, io_costs, 1_000_000), Workload(prompt_len=100, gen_len=20)
    plan = solver.solve(work, batch_size=1)
    assert any(s < 0 for s in plan.slack.values())
    assert plan.memory.device_peak <= 1_000_000
    assert solver._plan(1, plan.policy.num_batches + 1, work, None) is None


def test_everything_fits_means_no_io(tiny_shape, io_costs):
    plan = _solver(tiny_shape, io_costs, 1 << 30).solve(WORK, batch_size=4)
    assert set(plan.placement.values()) == {"device"}
    assert plan.memory.inflight == 0


def test_infeasible_budget_names_the_needed_size(tiny_shape, io_costs):
    with pytest.raises(KlotskiError, match=r"device memory of at least [1-9][0-9.]* KiB.*--device-memory is") as err:
        _solver(tiny_shape, io_costs, 10_000).solve(WORK)
    assert "0.00" not in str(err.value)  # sizes in a unit that shows them


def test_too_long_for_the_model(tiny_shape, io_costs):
    with pytest.raises(KlotskiError, match="exceed the model's context"):
        _solver(tiny_shape, io_costs, 1 << 20).solve(Workload(4000, 200))
