"""The cost model: op and transfer times, the paper's overlap constraints (4)-(7), memory, routing.

Times are seconds for one MoE block of one decode step of a batch group (n batches of bs).
Each constraint is a named function returning its slack (left side minus right side): the
I/O it names is hidden behind compute when the slack is >= 0. Memory is bytes per tier as the
TieredStore counts them (weights, KV cache, in-flight fetch buffers) plus activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from klotski.models.spec import ATTN, EXPERT, MOE, WeightKey
from klotski.planner.profile import HardwareProfile
from klotski.planner.shapes import ModelShape
from klotski.runtime.model import ModelRunner
from klotski.runtime.schedule import Schedule
from klotski.runtime.transients import charged_transient_bytes, step_transient_bytes
from klotski.store.placement import inflight_parts, working_set
from klotski.store.tiers import DEVICE, DISK, HOST

# T = tokens, C = context (keys attended), E = experts, K = hot experts prefetched


class OpCosts:
    """Seconds per op: the profile's measured fits at these shapes, else a roofline estimate."""

    def __init__(self, shape: ModelShape, profile: HardwareProfile, dtype: torch.dtype):
        self.shape, self.profile, self.dtype = shape, profile, dtype
        self.fits = profile.fits(shape.shape_key(), dtype)
        self.kv_token_layer = ModelRunner(shape.spec, dtype).kv_bytes_per_token()
        self.source = "measured fits" if self.fits else "roofline from peak figures"
        # Reads and compute overlap in the pipeline; where they share a CPU each slows the other.
        self.compute_slowdown_under_io = profile.compute_slowdown_under_io
        self.disk_gbps = profile.pipeline_disk_gbps  # the rate the pipeline's reads are predicted at

    def _roof(self, flops: float, nbytes: float) -> float:
        p = self.profile
        return p.op_overhead_s + max(flops / (p.peak_tflops * 1e12 * p.efficiency), nbytes / (p.memory_gbps * 1e9))

    def _fitted(self, op: str, roof: float, *size: int | float) -> float:
        """The measured fit where there is one, never below the roofline of the profile's own peak and
        memory rate: the fits are linear over small sizes, where the weights' read dominates, and
        beyond them fall short of the FLOPs (attention's projections over a 1024-token prefill
        extrapolated to 0.07 s, a third of what the peak allows)."""
        if op in self.fits:
            return max(self.fits[op](*size), roof)
        return roof

    def attention(self, seqs: int, new: int, context: int) -> float:
        """One batch of `seqs` sequences, `new` tokens each, attending `context` keys."""
        tokens = seqs * new
        kv = seqs * context * self.kv_token_layer
        roof = self._roof(self.shape.attention_flops(tokens, context), self.shape.unit_bytes[WeightKey(0, ATTN)] + kv)
        return self._fitted("attention", roof, tokens, context)

    def gate(self, tokens: int) -> float:
        key = WeightKey(self.shape.moe_layers()[0], MOE)
        return self._fitted("gate", self._roof(self.shape.gate_flops(tokens), self.shape.unit_bytes[key]), tokens)

    def expert(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        roof = self._roof(self.shape.expert_flops(tokens), self.shape.expert_bytes())
        return self._fitted("expert", roof, tokens)

    def dense_mlp(self, tokens: int) -> float:
        dense = [l for l in range(self.shape.spec.num_layers) if not self.shape.spec.moe_layers[l]]
        weights = self.shape.unit_bytes[WeightKey(dense[0], MOE)] if dense else 0
        roof = self._roof(self.shape.dense_flops(tokens), weights)
        return self._fitted("dense_mlp", roof, tokens)

    def head(self, tokens: int) -> float:
        roof = self._roof(
            self.shape.head_flops(tokens),
            self.shape.spec.hidden_size * self.shape.spec.vocab_size * self.shape.weight_dtype.itemsize,
        )
        return self._fitted("head", roof, tokens)

    def transfer(self, nbytes: int, tier: str) -> float:
        """Seconds to bring a unit from its tier to the device (disk: disk then link, unpipelined)."""
        p = self.profile
        if tier == DEVICE or (tier == HOST and p.host_to_device_gbps is None):
            return 0.0
        link = 0.0 if p.host_to_device_gbps is None else nbytes / (p.host_to_device_gbps * 1e9)
        disk = nbytes / (self.disk_gbps * 1e9) if tier == DISK else 0.0
        return p.io_latency_s + disk + link


# -- routing statistics --------------------------------------------------------------------------
class RoutingStats:
    """Per MoE layer, the share of token-slots each expert takes (from a table, else uniform)."""

    def __init__(self, probs: np.ndarray, top_k: int, source: str):
        self.probs = probs  # [L_moe, E], rows sum to 1
        self.top_k = top_k
        self.source = source

    @classmethod
    def uniform(cls, num_layers: int, num_experts: int, top_k: int) -> RoutingStats:
        return cls(np.full((num_layers, num_experts), 1.0 / num_experts), top_k, "uniform")

    @classmethod
    def from_table(cls, table, num_layers: int) -> RoutingStats:
        """Layer frequencies of a correlation table (its first layers when the model is shorter)."""
        freq = np.stack([table.frequency(i) for i in range(min(num_layers, table.num_layers))]).astype(float)
        if len(freq) < num_layers:  # a longer model than the table: repeat its last layer
            freq = np.concatenate([freq, np.repeat(freq[-1:], num_layers - len(freq), axis=0)])
        freq = np.maximum(freq, 1e-12)
        return cls(freq / freq.sum(axis=1, keepdims=True), table.top_k, f"table {table.model or 'given'}")

    def hot(self, layer: int, k: int) -> list[int]:
        """The K experts a group most likely uses most (what the predictor converges to)."""
        return [int(e) for e in np.argsort(-self.probs[layer], kind="stable")[:k]]

    def p_used(self, layer: int, tokens: float) -> np.ndarray:
        """Chance each expert is chosen by at least one of `tokens` tokens: [E]."""
        per_token = np.clip(self.top_k * self.probs[layer], 0.0, 1.0)
        return 1.0 - (1.0 - per_token) ** tokens

    def expected_tokens(self, layer: int, tokens: float) -> np.ndarray:
        """Expected token count on each expert: [E]."""
        return tokens * self.top_k * self.probs[layer]

    def expected_queue(self, layer: int, tokens: float, k: int) -> float:
        """|Q|: expected cold experts a group of `tokens` activates (distinct experts used, minus the hot)."""
        cold = np.ones(self.probs.shape[1], dtype=bool)
        cold[self.hot(layer, k)] = False
        return float(self.p_used(layer, tokens)[cold].sum())


# -- the paper's constraints (4)-(7) ----------------------------------------------------------
@dataclass(frozen=True)
class BlockTimes:
    """One MoE block of one decode step: compute per batch and transfer per unit."""

    t_c_A: float  # attention of one batch
    t_c_G: float  # gate of one batch
    t_io_A: float  # the next layer's attention weights
    t_io_G: float  # the gate (router + norm + shared experts)
    t_io_E: float  # one expert
    t_c_hotE: float  # the K hot experts over all their tokens of the group
    t_c_coldE: float  # every expected cold expert over its tokens (sum over Q)
    K: int
    Q: float  # expected |Q|


def gate_covered(n: int, b: BlockTimes) -> float:
    """(4) n * t_c_A >= t_IO_G: the gate arrives while attention runs."""
    return n * b.t_c_A - b.t_io_G


def hot_covered(n: int, b: BlockTimes) -> float:
    """(5) n (t_c_A + t_c_G) >= t_IO_G + K t_IO_E: the hot experts arrive by the end of the gates."""
    return n * (b.t_c_A + b.t_c_G) - (b.t_io_G + b.K * b.t_io_E)


def first_cold_covered(n: int, b: BlockTimes) -> float:
    """(6) ... + t_c_hotE >= t_IO_G + (K+1) t_IO_E: the first cold expert arrives while hot ones compute."""
    if b.Q <= 0:
        return float("inf")
    return n * (b.t_c_A + b.t_c_G) + b.t_c_hotE - (b.t_io_G + (b.K + 1) * b.t_io_E)


def next_attention_covered(n: int, b: BlockTimes) -> float:
    """(7) ... + sum_Q t_c_E >= t_IO_G + (K+|Q|) t_IO_E + t_IO_A: every cold expert and the next attention."""
    return n * (b.t_c_A + b.t_c_G) + b.t_c_hotE + b.t_c_coldE - (b.t_io_G + (b.K + b.Q) * b.t_io_E + b.t_io_A)


CONSTRAINTS = {
    "(4) gate": gate_covered,
    "(5) hot experts": hot_covered,
    "(6) first cold expert": first_cold_covered,
    "(7) cold queue + next attention": next_attention_covered,
}


def block_times(
    costs: OpCosts,
    routing: RoutingStats,
    placement: dict[WeightKey, str],
    layer: int,
    moe_index: int,
    bs: int,
    n: int,
    context: int,
    k: int,
) -> BlockTimes:
    """BlockTimes of one MoE layer for a decode step of n batches of bs at this context."""
    shape, tokens = costs.shape, n * bs
    hot = routing.hot(moe_index, k)
    counts = routing.expected_tokens(moe_index, tokens)
    used = routing.p_used(moe_index, tokens)
    cold = [e for e in range(shape.spec.num_experts) if e not in hot]
    # A cold expert's tokens given that it is used (expected count / chance of use).
    cold_c = sum(used[e] * costs.expert(counts[e] / max(used[e], 1e-12)) for e in cold)
    experts = [WeightKey(layer, EXPERT, e) for e in range(shape.spec.num_experts)]
    nxt = WeightKey(layer + 1, ATTN) if layer + 1 < shape.spec.num_layers else None
    io = {key: costs.transfer(shape.padded(key), placement.get(key, DEVICE)) for key in experts}
    return BlockTimes(
        t_c_A=costs.attention(bs, 1, context),
        t_c_G=costs.gate(bs),
        t_io_A=costs.transfer(shape.padded(nxt), placement.get(nxt, DEVICE)) if nxt else 0.0,
        t_io_G=costs.transfer(shape.padded(WeightKey(layer, MOE)), placement.get(WeightKey(layer, MOE), DEVICE)),
        t_io_E=max(io.values()),
        t_c_hotE=sum(costs.expert(counts[e]) for e in hot),
        t_c_coldE=cold_c,
        K=k,
        Q=routing.expected_queue(moe_index, tokens, k),
    )


def constraint_slack(b: BlockTimes, n: int) -> dict[str, float]:
    """Slack of every constraint (>= 0: satisfied)."""
    return {name: fn(n, b) for name, fn in CONSTRAINTS.items()}


# -- memory -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryModel:
    """Bytes per tier for one plan, in the TieredStore's own accounting plus activations."""

    weights: dict[str, int]  # resident weights per tier (device, host, disk)
    kv_cache: int  # n x bs x (prompt + generated) tokens x layers, on kv_tier
    kv_tier: str
    inflight: int  # fetch buffers the schedule holds at once on the device
    activations: int  # a step's transients, charged to the device budget for the group (the prefill's at most)
    activations_prefill: int  # the prefill step's alone

    @property
    def device_store_peak(self) -> int:
        """What the store's device pool needs at its peak: resident weights + KV + in-flight buffers +
        the step's transients, all charged to it (room beyond this holds cached copies of units)."""
        kv = self.kv_cache if self.kv_tier == DEVICE else 0
        return self.weights.get(DEVICE, 0) + self.inflight + kv + self.activations

    @property
    def device_peak(self) -> int:
        return self.device_store_peak

    @property
    def host_peak(self) -> int:
        return self.weights.get(HOST, 0) + (self.kv_cache if self.kv_tier == HOST else 0)

    def to_dict(self) -> dict:
        return {
            "weights": dict(self.weights),
            "kv_cache": self.kv_cache,
            "kv_tier": self.kv_tier,
            "inflight": self.inflight,
            "activations": self.activations,
            "activations_prefill": self.activations_prefill,
            "device_peak": self.device_peak,
            "device_store_peak": self.device_store_peak,
            "host_peak": self.host_peak,
        }


def kv_cache_bytes(costs: OpCosts, bs: int, n: int, tokens: int) -> int:
    """KV cache of a group: n x bs sequences x tokens x layers x bytes per token and layer."""
    return n * bs * tokens * costs.shape.spec.num_layers * costs.kv_token_layer


def activation_bytes(costs: OpCosts, bs: int, n: int, new_tokens: int, context: int | None = None) -> int:
    """One step's transients for a group of n batches of bs sequences (runtime/transients.py: the
    figure the store charges against the device budget beside the KV cache)."""
    context = new_tokens if context is None else context
    return step_transient_bytes(costs.shape.spec, costs.dtype, n * bs * new_tokens, bs, new_tokens, context)


def inflight_bytes(shape: ModelShape, k: int, placement: dict[WeightKey, str] | None = None) -> int:
    """Device buffers held for non-resident units at once (the store's reserve, any schedule)."""
    return working_set(shape.spec, _padded(shape), k, placement)


def inflight_split(shape: ModelShape, k: int) -> tuple[int, int]:
    """(dense, experts) parts of the in-flight room, before a placement decides whether dense streams."""
    return inflight_parts(shape.spec, _padded(shape), k)


def _padded(shape: ModelShape) -> dict[WeightKey, int]:
    return {key: shape.padded(key) for key in shape.unit_bytes}


def memory_model(
    costs: OpCosts,
    placement: dict[WeightKey, str],
    schedule: Schedule,
    bs: int,
    n: int,
    prompt_len: int,
    gen_len: int,
    k: int,
    kv_tier: str = DEVICE,
) -> MemoryModel:
    """The memory a plan needs per tier."""
    weights = {DEVICE: 0, HOST: 0, DISK: 0}
    for key, tier in placement.items():
        weights[tier] += costs.shape.unit_bytes[key]
    resident = all(t == DEVICE for t in placement.values())
    return MemoryModel(
        weights,
        kv_cache_bytes(costs, bs, n, prompt_len + gen_len),
        kv_tier,
        0 if resident else inflight_bytes(costs.shape, k, placement),
        # What runtime/generate.run_group charges for the whole group: the prefill's transients, at
        # least a decode step's at the group's full context.
        charged_transient_bytes(
            costs.shape.spec, costs.dtype, n * bs * prompt_len, n * bs, bs, prompt_len, prompt_len, prompt_len + gen_len
        ),
        activation_bytes(costs, bs, n, prompt_len),
    )
