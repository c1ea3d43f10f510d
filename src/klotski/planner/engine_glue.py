"""What LLM asks of the planner: a placement at load time and a policy with a prediction per run.

The placement is chosen once, when the store is laid out, for a nominal workload (prompts are not
known yet); each generate() call then picks bs and n for its real prompt and generation lengths
within the room that placement leaves. The profile is the one `hardware` names; by default this
machine's cached measurement for these shapes and this disk, which the first budgeted run makes
(a quick profile, seconds; planner/api.py pick_profile).
"""

from __future__ import annotations

import torch

from klotski.config import EngineConfig, Policy
from klotski.errors import KlotskiError
from klotski.planner.api import PlanReport, make_plan, pick_profile
from klotski.planner.shapes import ModelShape
from klotski.planner.solver import Budgets, Workload
from klotski.prefetch.replay import RoutingReplay
from klotski.prefetch.table import CorrelationTable
from klotski.store.factory import host_budget
from klotski.store.offload import default_offload_dir
from klotski.store.tiers import DEVICE

# Load-time placement assumes this workload: a few modest groups of short prompts.
NOMINAL = Workload(prompt_len=128, gen_len=32, num_prompts=64)
SMALL = Workload(prompt_len=8, gen_len=8, num_prompts=1)


def engine_shape(checkpoint) -> ModelShape:
    """The checkpoint's own unit sizes (exactly what the store will hold)."""
    units = {k: checkpoint.unit_nbytes(k) for k in checkpoint.spec.weight_keys()}
    return ModelShape(checkpoint.path.name, checkpoint.spec, checkpoint.dtype, units)


def disk_dir(checkpoint, config: EngineConfig):
    """Where the store's disk tier will be (the profile's disk is measured there)."""
    return config.offload_dir or default_offload_dir(checkpoint)


def _profile(checkpoint, config: EngineConfig, shape: ModelShape, dtype: torch.dtype, device: torch.device):
    return pick_profile(shape, dtype, device.type, config.hardware, disk_dir(checkpoint, config))


def _budgets(config: EngineConfig, device: torch.device) -> Budgets:
    return Budgets(config.device_memory, host_budget(config.host_memory, device))


def _engine_plan(checkpoint, config, device, dtype, schedule: str, work: Workload, **kw) -> PlanReport:
    """make_plan for this engine's checkpoint, budgets, profile and policy flags."""
    shape = engine_shape(checkpoint)
    profile, source = _profile(checkpoint, config, shape, dtype, device)
    return make_plan(
        shape,
        profile,
        _budgets(config, device),
        work,
        dtype,
        profile_from=source,
        schedule=schedule,
        batch_size=config.batch_size,
        num_batches=config.num_batches,
        num_hot=config.num_hot,
        **kw,
    )


def load_placement(checkpoint, config, device: torch.device, dtype: torch.dtype, schedule: str) -> dict:
    """Tier per unit for the store, planned for the nominal workload (bs / n flags respected)."""
    work = (
        NOMINAL
        if config.max_model_len is None
        else Workload(
            min(NOMINAL.prompt_len, config.max_model_len // 2), min(NOMINAL.gen_len, config.max_model_len // 4), 64
        )
    )
    try:
        return _engine_plan(checkpoint, config, device, dtype, schedule, work, run_simulation=False).plan.placement
    except KlotskiError:
        # A budget too small for the nominal workload's prefill may still run short prompts: place
        # for those (each run charges its own transients and moves experts to disk if it must).
        return _engine_plan(checkpoint, config, device, dtype, schedule, SMALL, run_simulation=False).plan.placement


def run_policy(
    checkpoint,
    config,
    device: torch.device,
    dtype: torch.dtype,
    schedule: str,
    placement: dict | None,
    num_requests: int,
    prompt_len: int,
    gen_len: int,
    table: CorrelationTable | None,
) -> tuple[Policy, dict]:
    """bs, n, K for this run within the store's placement, and the stats lines about the plan."""
    placement = placement or {k: DEVICE for k in checkpoint.spec.weight_keys()}
    work = Workload(prompt_len, gen_len, num_requests)
    report = _engine_plan(checkpoint, config, device, dtype, schedule, work, table=table, placement=placement)
    return report.plan.policy, plan_stats(report)


def plan_stats(report: PlanReport) -> dict:
    """What a run's stats say about the plan: the prediction and what it was based on."""
    d = report.to_dict()
    return {
        "predicted_tokens_per_s": d.get("predicted_tokens_per_s"),
        "prediction_profile": d["profile"]["from"],
        "planner": {
            "predicted_tokens_per_s": d.get("predicted_tokens_per_s"),
            "predicted_bubble_ratio": d.get("predicted_bubble_ratio"),
            "predicted_wall_s": d.get("predicted_wall_s"),
            "predicted_prefill_s": d.get("predicted_prefill_s"),
            "binding_constraints": d["binding_constraints"],
            "profile": d["profile"],
            "routing": d["routing"],
        },
    }


def prediction_error(stats: dict) -> float | None:
    """Measured tokens/s over the plan's prediction, minus 1 (+0.10: 10% faster than predicted)."""
    predicted, measured = stats.get("predicted_tokens_per_s"), stats.get("tokens_per_s")
    return measured / predicted - 1 if predicted and measured is not None else None


def routing_table(
    prefetch_table: CorrelationTable | None, replay: RoutingReplay | None, top_k: int
) -> CorrelationTable | None:
    """The routing the run will see: a replayed table's (benchmarks), else the prefetch table, else none."""
    source = replay.source if replay is not None else None
    if source is not None and not source.endswith(".npz"):
        from klotski.prefetch.table import load_table

        return load_table(source, top_k)
    return prefetch_table
