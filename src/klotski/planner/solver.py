"""The solver: placement per tensor kind and layer, bs, n and K that fit the budgets and hide the I/O.

For each batch size of a small set, n grows from 1 until the paper's constraints (4)-(7) hold
for the worst MoE layer (the smallest such n, as the paper prescribes), stopping where memory
runs out. Placement follows the store's order (dense units, then experts layer by layer, device
first, then host, then disk) after keeping room for the KV cache, the schedule's in-flight
buffers and activations. Batch sizes are ranked by an analytic throughput estimate; the chosen
plan is then simulated on the real pipeline (simulate.py) for the numbers users see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from klotski.config import Policy, format_bytes
from klotski.errors import KlotskiError
from klotski.models.spec import EXPERT, WeightKey
from klotski.planner.cost import (
    BlockTimes,
    MemoryModel,
    OpCosts,
    RoutingStats,
    block_times,
    constraint_slack,
    inflight_bytes,
    inflight_split,
    memory_model,
)
from klotski.planner.shapes import ModelShape
from klotski.runtime.schedule import Schedule, get_schedule
from klotski.store.placement import greedy_placement, summarize
from klotski.store.tiers import DEVICE, HOST

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
MAX_BATCHES = 64


@dataclass(frozen=True)
class Workload:
    """What the user will run: prompt and generation lengths and how many prompts."""

    prompt_len: int
    gen_len: int
    num_prompts: int | None = None  # None: as many as the plan wants (a long batch job)


@dataclass(frozen=True)
class Budgets:
    """Bytes per tier the plan may use (None: unlimited)."""

    device: int | None
    host: int | None


@dataclass
class Plan:
    """The solver's answer: the policy, its memory, the constraints' slack, and why."""

    policy: Policy
    placement: dict[WeightKey, str]
    memory: MemoryModel
    slack: dict[str, float]  # per constraint, worst MoE layer (>= 0: I/O hidden)
    estimate_tokens_per_s: float  # the analytic estimate the solver ranked by
    kv_tier: str
    notes: list[str] = field(default_factory=list)

    @property
    def binding(self) -> list[str]:
        """Constraints that do not hold, or hold with the least slack when all do."""
        unmet = [name for name, s in self.slack.items() if s < 0]
        if unmet:
            return unmet
        finite = {n: s for n, s in self.slack.items() if math.isfinite(s)}
        return [min(finite, key=finite.get)] if finite else []


@dataclass
class Solver:
    """Plans one model on one machine; see the module docstring."""

    shape: ModelShape
    costs: OpCosts
    routing: RoutingStats
    budgets: Budgets
    schedule: Schedule = field(default_factory=lambda: get_schedule("klotski"))
    kv_tier: str = DEVICE  # the runtime keeps KV on the device; the paper's KV offload is "host"
    num_hot: int | None = None
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    max_batches: int = MAX_BATCHES

    @property
    def k(self) -> int:
        """Hot experts per layer: as asked (0 = no hot prefetch), else top-k."""
        return self.shape.spec.top_k if self.num_hot is None else self.num_hot

    def solve(
        self,
        work: Workload,
        batch_size: int | None = None,
        num_batches: int | None = None,
        placement: dict[WeightKey, str] | None = None,
    ) -> Plan:
        """The best plan, or a KlotskiError naming the smallest budgets that would work."""
        self._check_lengths(work)
        sizes = [batch_size] if batch_size else [b for b in self.batch_sizes if b <= (work.num_prompts or b)]
        plans = [p for bs in sizes if (p := self._best_n(bs, work, num_batches, placement)) is not None]
        if not plans and placement is not None:
            raise KlotskiError(self._no_room(placement, work, batch_size or 1, num_batches or 1))
        if not plans:
            raise KlotskiError(self._infeasible(work, batch_size or 1, num_batches or 1))
        return max(plans, key=lambda p: (round(p.estimate_tokens_per_s, 9), -p.memory.device_peak))

    # -- per batch size ----------------------------------------------------------------------------
    def _best_n(self, bs: int, work: Workload, fixed_n: int | None, placement) -> Plan | None:
        """The smallest n meeting every constraint within memory; else the fastest n that fits."""
        if fixed_n is not None or not self.schedule.multibatch:
            return self._plan(bs, fixed_n or 1, work, placement)
        cap = self.max_batches if work.num_prompts is None else max(1, math.ceil(work.num_prompts / bs))
        fitting = []
        for n in range(1, min(cap, self.max_batches) + 1):
            plan = self._plan(bs, n, work, placement)
            if plan is None:
                break
            if all(s >= 0 for s in plan.slack.values()):
                return plan
            fitting.append(plan)
        return max(fitting, key=lambda p: p.estimate_tokens_per_s, default=None)

    def _plan(self, bs: int, n: int, work: Workload, placement) -> Plan | None:
        """Placement, memory and constraint slack for (bs, n); None when it does not fit."""
        k = self.k
        probe = memory_model(self.costs, {}, self.schedule, bs, n, work.prompt_len, work.gen_len, k, self.kv_tier)
        reserve = probe.kv_cache * (self.kv_tier == DEVICE) + probe.activations
        if placement is None:
            placement = self.place(reserve, probe.kv_cache * (self.kv_tier == HOST))
            if placement is None:
                return None
        memory = memory_model(
            self.costs, placement, self.schedule, bs, n, work.prompt_len, work.gen_len, k, self.kv_tier
        )
        if not self._fits(memory):
            return None
        slack = self._slack(placement, bs, n, work, k)
        policy = Policy(
            batch_size=bs,
            num_batches=n,
            num_hot=k,
            schedule=self.schedule.name,
            placement=placement_summary(self.shape, placement, self.kv_tier),
        )
        return Plan(policy, placement, memory, slack, self.estimate(placement, bs, n, work, k), self.kv_tier)

    def _inflight(self, k: int) -> int:
        return inflight_bytes(self.shape, k)

    def place(self, reserve: int, host_reserve: int = 0) -> dict[WeightKey, str] | None:
        """Device first (after the reserve and the in-flight room), then host, then disk; None when the
        reserves themselves do not fit."""
        device, host = self.budgets.device, self.budgets.host
        dense, experts = inflight_split(self.shape, self.k)
        if (device is not None and device < reserve + dense + experts) or (host is not None and host < host_reserve):
            return None
        if device is None or self.shape.total_bytes + reserve <= device:
            return {key: DEVICE for key in self.shape.unit_bytes}  # nothing is fetched: no in-flight room
        if host is None and self.costs.profile.host_to_device_gbps is None:
            host = 0  # CPU-only: the device tier is host RAM already
        host = None if host is None else host - host_reserve
        return greedy_placement(self.shape.spec, self.shape.unit_bytes, device, host, reserve + experts, dense)

    def _fits(self, memory: MemoryModel) -> bool:
        device, host = self.budgets.device, self.budgets.host
        if device is not None and memory.device_peak > device:
            return False
        return host is None or memory.host_peak <= host

    def _slack(self, placement, bs: int, n: int, work: Workload, k: int) -> dict[str, float]:
        """Every constraint's slack at the worst MoE layer (decode at the mean context)."""
        context = work.prompt_len + max(work.gen_len // 2, 1)
        worst: dict[str, float] = {}
        for i, layer in enumerate(self.shape.moe_layers()):
            times = block_times(self.costs, self.routing, placement, layer, i, bs, n, context, k)
            for name, s in constraint_slack(times, n).items():
                worst[name] = min(worst.get(name, math.inf), s)
        return worst

    # -- the analytic estimate used to rank plans ---------------------------------------------------
    def estimate(self, placement, bs: int, n: int, work: Workload, k: int) -> float:
        """Tokens/s if each layer takes max(compute, I/O): bubbles only where I/O exceeds compute."""
        context = work.prompt_len + max(work.gen_len // 2, 1)
        decode = self._step_time(placement, bs, n, 1, context, k)
        prefill = self._step_time(placement, bs, n, work.prompt_len, work.prompt_len, k)
        total = prefill + work.gen_len * decode
        return n * bs * work.gen_len / total if total > 0 else 0.0

    def _step_time(self, placement, bs: int, n: int, new: int, context: int, k: int) -> float:
        total = n * self.costs.head(bs)
        for i, layer in enumerate(self.shape.moe_layers()):
            b = block_times(self.costs, self.routing, placement, layer, i, bs, n * new, context, k)
            compute, io = self._layer_times(b, bs, n, new, context)
            total += max(compute, io)
        return total

    def _layer_times(self, b: BlockTimes, bs: int, n: int, new: int, context: int) -> tuple[float, float]:
        attention = n * self.costs.attention(bs, new, context) + n * self.costs.gate(bs * new)
        compute = attention + b.t_c_hotE + b.t_c_coldE
        io = b.t_io_A + b.t_io_G + (b.K + b.Q) * b.t_io_E
        if io > 0:  # reads run beside this layer's compute and slow it where they share a CPU
            compute *= self.costs.compute_slowdown_under_io
        return compute, io

    # -- errors ------------------------------------------------------------------------------------
    def _check_lengths(self, work: Workload) -> None:
        limit = self.shape.spec.max_position_embeddings
        if work.prompt_len < 1 or work.gen_len < 1:
            raise KlotskiError("--prompt-len and --gen-len must be at least 1")
        if work.prompt_len + work.gen_len > limit:
            raise KlotskiError(
                f"prompt + generated tokens ({work.prompt_len + work.gen_len}) exceed the model's "
                f"context ({limit}); shorten --prompt-len or --gen-len"
            )

    def _no_room(self, placement, work: Workload, bs: int, n: int) -> str:
        """The weights are laid out already: say what this run needs beside them."""
        k = self.k
        m = memory_model(self.costs, placement, self.schedule, bs, n, work.prompt_len, work.gen_len, k, self.kv_tier)
        return (
            f"this run does not fit beside the weights already on the device: bs={bs}, n={n} with "
            f"{work.prompt_len} + {work.gen_len} tokens needs {m.device_peak / 2**20:.1f} MiB of device memory "
            f"(weights {m.weights[DEVICE] / 2**20:.1f}, KV cache {m.kv_cache / 2**20:.1f}, in-flight "
            f"{m.inflight / 2**20:.1f}, activations {m.activations / 2**20:.1f} MiB) but the budget is "
            f"{(self.budgets.device or 0) / 2**20:.1f} MiB; shorten the prompts or max_tokens, "
            "or raise --device-memory"
        )

    def _infeasible(self, work: Workload, bs: int, n: int) -> str:
        """The smallest budgets that would work: bs, n as asked (1, 1 by default), weights off the device."""
        k = self.k
        m = memory_model(self.costs, {}, self.schedule, bs, n, work.prompt_len, work.gen_len, k, self.kv_tier)
        need = m.kv_cache * (self.kv_tier == DEVICE) + self._inflight(k) + m.activations
        gb = format_bytes
        have = "unlimited" if self.budgets.device is None else gb(self.budgets.device)
        host_need = ""
        if self.budgets.host is not None and self.kv_tier == HOST and m.kv_cache > self.budgets.host:
            host_need = f", and host memory of at least {gb(m.kv_cache)} for the KV cache"
        return (
            f"nothing fits: the smallest plan (bs={bs}, n={n}, prompt {work.prompt_len} + {work.gen_len} tokens, "
            f"every weight off the device) needs device memory of at least {gb(need)} "
            f"(in-flight fetches {gb(self._inflight(k))}, KV cache {gb(m.kv_cache * (self.kv_tier == DEVICE))}, "
            f"activations {gb(m.activations)}){host_need}; --device-memory is {have}. "
            f"Raise --device-memory to {gb(need)} or more, or shorten the prompt or generation"
        )


def placement_summary(shape: ModelShape, placement: dict[WeightKey, str], kv_tier: str) -> dict:
    """Per tensor kind: which layers sit on which tier, and bytes per tier (what Policy.placement shows)."""
    out: dict = {"kv_cache": kv_tier}
    for kind, tiers in summarize(placement, shape.unit_bytes).items():
        out[kind] = {tier: {"units": v["units"], "bytes": v["bytes"]} for tier, v in tiers.items()}
    experts: dict[str, list[int]] = {}
    for key, tier in placement.items():
        if key.part == EXPERT and key.layer not in experts.setdefault(tier, []):
            experts[tier].append(key.layer)
    out["expert_layers"] = {tier: _ranges(layers) for tier, layers in experts.items()}
    return out


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans, layers = [], sorted(layers)
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def compute_dtype(shape: ModelShape, device: str) -> torch.dtype:
    """The engine's 'auto' compute dtype for this device (runtime.compute_dtype.resolve_dtype)."""
    from klotski.runtime.compute_dtype import resolve_dtype

    return resolve_dtype("auto", shape.weight_dtype, torch.device(device))
