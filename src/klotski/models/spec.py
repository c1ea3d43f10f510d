"""ModelSpec: everything the engine knows about an architecture, as data.

The store, runtime, planner and prefetcher read a ModelSpec; none of them branches on the
model family. Families (mixtral.py, qwen_moe.py, deepseek.py, olmoe.py) turn a config.json
into a ModelSpec and a table of checkpoint tensor names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# A weight unit is what the store moves as one piece (one contiguous blob in the offload dir).
EMBED = "embed"  # token embeddings
HEAD = "head"  # final norm + lm_head
ATTN = "attn"  # input norm + attention projections (+ q/k norms)
MOE = "moe"  # post-attention norm + router + shared experts, or a dense MLP
EXPERT = "expert"  # one routed expert's gate/up/down projections


@dataclass(frozen=True, slots=True, order=True)
class WeightKey:
    """Names one weight unit: (layer, part, expert); layer and expert are None where absent."""

    layer: int | None
    part: str
    expert: int | None = None

    def __str__(self) -> str:
        if self.layer is None:
            return self.part
        if self.expert is None:
            return f"L{self.layer}.{self.part}"
        return f"L{self.layer}.{self.part}{self.expert}"


# hidden_act values the layers implement (layers/linear.py maps each to its torch function).
ACTIVATIONS = ("silu", "gelu", "relu")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention magnitude correction."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding: which dims rotate and how frequencies are scaled."""

    dim: int  # rotated dims per head
    theta: float
    interleave: bool = False  # DeepSeek rotates adjacent pairs (x0,x1),(x2,x3)...; others halves
    scaling: dict | None = None  # rope_scaling / rope_parameters beyond "default" (e.g. yarn)


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shapes: GQA (Mixtral, Qwen, OLMoE) or MLA (DeepSeek)."""

    kind: str  # "gqa" | "mla"
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int  # per-head dim of q and k (MLA: nope + rope)
    v_head_dim: int
    rope: RopeSpec
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    sliding_window: int | None = None
    softmax_scale: float | None = None  # None: 1/sqrt(qk_head_dim)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-c, c] after the projections (and q/k norms)
    # MLA only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0


@dataclass(frozen=True)
class RouterSpec:
    """How the gate turns logits into top-k experts and weights."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    num_groups: int = 1  # group-limited routing (DeepSeek); 1 = off
    topk_groups: int = 1
    group_score: str = "max"  # "max" (V2 group_limited_greedy) | "top2_sum" (V3)
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # V3's e_score_correction_bias (selection only)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and semantics of one checkpoint's architecture; the only model knowledge outside models/."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: AttentionSpec
    router: RouterSpec
    moe_intermediate_size: int  # per routed expert
    dense_intermediate_size: int  # dense MLP layers (DeepSeek's first_k_dense, Qwen2 mlp_only)
    shared_intermediate_size: int  # 0 when no shared expert
    shared_expert_gate: bool  # Qwen2-MoE's sigmoid gate on the shared expert
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP (False)
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra_layers: int = 0  # trailing checkpoint layers the model does not run (DeepSeek-V3's MTP)
    names: NameTable = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def weight_keys(self) -> list[WeightKey]:
        """Every weight unit of the model, in execution order."""
        keys = [WeightKey(None, EMBED)]
        for layer in range(self.num_layers):
            keys += [WeightKey(layer, ATTN), WeightKey(layer, MOE)]
            if self.moe_layers[layer]:
                keys += [WeightKey(layer, EXPERT, e) for e in range(self.num_experts)]
        keys.append(WeightKey(None, HEAD))
        return keys

    def unit_shapes(self, key: WeightKey) -> dict[str, tuple[int, ...]]:
        """Expected tensor shapes of one unit, to check a checkpoint against config.json."""
        return self.names.shapes(self, key)


@dataclass(frozen=True)
class NameRule:
    """One checkpoint-name pattern: regex -> (part, local name); groups give layer and expert."""

    pattern: re.Pattern
    part: str
    local: str
    fused: str | None = None  # "gate_up" | "down": a [E, ...] tensor holding every expert
    template: str = ""  # the name with {L} / {E} placeholders, for writing checkpoints


@dataclass(frozen=True)
class NameTable:
    """A family's tensor-name table plus the expected shape of every unit's tensors.

    Reading accepts every rule; writing uses, per (part, local name), the last rule listed, so a
    family lists its own hub names after the shared ones.
    """

    rules: tuple[NameRule, ...]
    shape_fn: object  # (spec, key) -> dict[local name, shape]

    def match(self, name: str) -> tuple[NameRule, int | None, int | None] | None:
        """The rule a checkpoint tensor name matches, with its layer and expert (or None)."""
        for rule in self.rules:
            m = rule.pattern.fullmatch(name)
            if m:
                groups = [int(g) for g in m.groups()]
                layer = groups[0] if groups else None
                expert = groups[1] if len(groups) > 1 else None
                return rule, layer, expert
        return None

    def shapes(self, spec: ModelSpec, key: WeightKey) -> dict[str, tuple[int, ...]]:
        return self.shape_fn(spec, key)


def rule(pattern: str, part: str, local: str, fused: str | None = None) -> NameRule:
    """A NameRule from a pattern where {L} is the layer and {E} the expert index."""
    regex = re.escape(pattern).replace(r"\{L\}", r"(\d+)").replace(r"\{E\}", r"(\d+)")
    return NameRule(re.compile(regex), part, local, fused, pattern)
