"""The planner's front door: profile + routing + budgets + workload -> a simulated plan."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski.config import check_hardware
from klotski.planner.cost import OpCosts, RoutingStats
from klotski.planner.profile import (
    HardwareProfile,
    builtin_estimate,
    cache_path,
    cached_profile,
    load_profile,
)
from klotski.planner.shapes import ModelShape
from klotski.planner.simulate import SimResult, simulate
from klotski.planner.solver import Budgets, Plan, Solver, Workload
from klotski.prefetch.runtime import moe_index
from klotski.prefetch.table import CorrelationTable
from klotski.runtime.schedule import get_schedule
from klotski.store.tiers import DEVICE, HOST


@dataclass
class PlanReport:
    """A plan with its simulated prediction and where its inputs came from."""

    plan: Plan
    sim: SimResult | None
    profile: HardwareProfile
    profile_from: str  # "cached: PATH" | "measured now: PATH" | UNCALIBRATED | a file or env1 / env2
    cost_source: str  # measured fits or roofline
    routing: str
    budgets: Budgets
    workload: Workload

    def to_dict(self) -> dict:
        p, m = self.plan.policy, self.plan.memory
        out = {
            "batch_size": p.batch_size,
            "num_batches": p.num_batches,
            "num_hot": p.num_hot,
            "schedule": p.schedule,
            "placement": p.placement,
            "memory": m.to_dict(),
            "budgets": {DEVICE: self.budgets.device, HOST: self.budgets.host},
            "constraints_slack_s": self.plan.slack,
            "binding_constraints": self.plan.binding,
            "estimate_tokens_per_s": self.plan.estimate_tokens_per_s,
            "workload": {
                "prompt_len": self.workload.prompt_len,
                "gen_len": self.workload.gen_len,
                "num_prompts": self.workload.num_prompts,
            },
            "profile": {
                "name": self.profile.name,
                "source": self.profile.source,
                "from": self.profile_from,
                "calibrated": self.profile.calibrated,
                "op_costs": self.cost_source,
            },
            "routing": self.routing,
        }
        if self.sim is not None:
            out |= self.sim.to_dict()
        return out


UNCALIBRATED = "built-in estimate (uncalibrated)"


def pick_profile(
    shape: ModelShape,
    dtype: torch.dtype,
    device: str,
    hardware: str | None = "auto",
    disk_dir: str | Path | None = None,
) -> tuple[HardwareProfile, str]:
    """The profile `hardware` names, and where it came from.

    auto: this machine's cached measurement for these shapes, dtype and disk (`disk_dir`: where the
    disk tier will be), else a quick one measured now and cached; builtin: the roofline estimate
    (UNCALIBRATED); env1 / env2: the bundled ones; else a profile JSON path."""
    hardware = check_hardware(hardware or "auto")
    if hardware == "builtin":
        return builtin_estimate(device, dtype), UNCALIBRATED
    if hardware != "auto":
        return load_profile(hardware), hardware
    cached = cached_profile(shape.shape_key(), dtype, device, disk_dir)
    if cached is not None:
        return cached[0], f"cached: {cached[1]}"
    start = time.perf_counter()
    profile = measure_quick(shape, dtype, device, disk_dir)
    path = cache_path(shape.shape_key(), dtype, device, disk_dir)
    profile.save(path)
    print(
        f"klotski: no profile for this machine; measured one in {time.perf_counter() - start:.1f} s "
        f"({profile_summary(profile, shape, dtype)}); cached at {path}; `klotski profile --force` re-measures",
        file=sys.stderr,
    )
    return profile, f"measured now: {path}"


def measure_quick(shape: ModelShape, dtype: torch.dtype, device: str, disk_dir: str | Path | None) -> HardwareProfile:
    """The automatic profile of a first plan or run (tests replace this: their plans must not depend on timing)."""
    from klotski.planner.measure import QUICK, measure_profile

    return measure_profile(shape, dtype, device, QUICK, disk_dir)


def profile_summary(profile: HardwareProfile, shape: ModelShape, dtype: torch.dtype) -> str:
    """'disk 1.10 GB/s, expert 16 tokens 40.0 ms': the two figures a plan here mostly rests on."""
    disk = profile.pipeline_disk_gbps
    parts = [f"disk {disk:.2f} GB/s"]
    expert = profile.fits(shape.shape_key(), dtype).get("expert")
    if expert is not None:
        parts.append(f"expert 16 tokens {expert(16) * 1e3:.1f} ms")
    return ", ".join(parts)


def routing_stats(shape: ModelShape, table: CorrelationTable | None) -> RoutingStats:
    layers, spec = len(moe_index(shape.spec)), shape.spec
    if table is not None and table.num_experts == spec.num_experts:
        return RoutingStats.from_table(table, layers)
    return RoutingStats.uniform(layers, max(spec.num_experts, 1), spec.top_k)


def make_plan(
    shape: ModelShape,
    profile: HardwareProfile,
    budgets: Budgets,
    work: Workload,
    dtype: torch.dtype,
    *,
    profile_from: str = "",
    table: CorrelationTable | None = None,
    schedule: str = "klotski",
    kv_tier: str = DEVICE,
    batch_size: int | None = None,
    num_batches: int | None = None,
    num_hot: int | None = None,
    placement: dict | None = None,
    run_simulation: bool = True,
    seed: int = 0,
    batch_sizes: tuple[int, ...] | None = None,
    max_batches: int | None = None,
) -> PlanReport:
    """Solve, then play the chosen plan on the simulated backend of the real pipeline."""
    costs = OpCosts(shape, profile, dtype)
    routing = routing_stats(shape, table)
    solver = Solver(shape, costs, routing, budgets, get_schedule(schedule), kv_tier, num_hot)
    solver.batch_sizes = batch_sizes or solver.batch_sizes
    solver.max_batches = max_batches or solver.max_batches
    plan = solver.solve(work, batch_size, num_batches, placement)
    sim = None
    if run_simulation:
        p = plan.policy
        prompts = work.num_prompts or p.batch_size * p.num_batches
        sim = simulate(
            shape,
            costs,
            p,
            plan.placement,
            work.prompt_len,
            work.gen_len,
            prompts,
            table,
            budgets.device,
            kv_tier,
            seed,
            adaptive_hot=num_hot is None,
        )
    return PlanReport(plan, sim, profile, profile_from, costs.source, routing.source, budgets, work)
