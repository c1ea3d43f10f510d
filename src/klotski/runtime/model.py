"""The model's compute, one unit at a time: embed, attention per batch, gate per batch, expert
per expert, head. The pipeline decides when each runs and where its weights come from; nothing
here knows about tiers, lanes or schedules, and nothing branches on the model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klotski.layers.attention import KVBlock, StepInfo, gqa_attention
from klotski.layers.linear import linear, swiglu_ffn
from klotski.layers.mla import mla_attention
from klotski.layers.norm import rms_norm
from klotski.layers.rotary import Rotary
from klotski.layers.router import route
from klotski.models.spec import ModelSpec

# B = sequences in a batch, S = new tokens per sequence (padded), T = valid tokens,
# K = top_k, D = hidden, V = vocab
Weights = dict[str, torch.Tensor]
ATTENTION_KINDS = {"gqa": gqa_attention, "mla": mla_attention}  # AttentionSpec.kind -> its layer


@dataclass(slots=True)
class GateOutput:
    """One batch's MoE input after the gate: normed tokens, routing, and the non-expert part."""

    h: torch.Tensor  # [T, D] post-attention-normed valid tokens
    ids: torch.Tensor  # [T, K] expert ids
    weights: torch.Tensor  # [T, K] routing weights (fp32)
    base: torch.Tensor  # [T, D] residual + shared expert output


class ModelRunner:
    """Stateless per-unit compute for one ModelSpec in one compute dtype."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        # Set where a prefill's experts run faster in another dtype (runtime/compute_dtype.prefill_expert_dtype).
        self.prefill_expert_dtype: torch.dtype | None = None
        self.rotary = Rotary(spec.attention.rope, spec.max_position_embeddings)
        self.eps = spec.rms_norm_eps

    def new_kv(self, batch_size: int, capacity: int) -> KVBlock:
        """An empty KV block for one layer of one batch."""
        a = self.spec.attention
        kv_heads = a.num_kv_heads if a.kind == "gqa" else a.num_heads
        k = torch.zeros(batch_size, kv_heads, capacity, a.qk_head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros(batch_size, kv_heads, capacity, a.v_head_dim, dtype=self.dtype, device=self.device)
        return KVBlock(k, v)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token costs in one layer."""
        a = self.spec.attention
        heads = a.num_kv_heads if a.kind == "gqa" else a.num_heads
        return heads * (a.qk_head_dim + a.v_head_dim) * self.dtype.itemsize

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """The embedding rows of token ids [B, S] (the store gathers them) -> hidden [B, S, D]."""
        return rows.to(self.dtype)

    def attention(self, w: Weights, x: torch.Tensor, kv: KVBlock, step: StepInfo) -> torch.Tensor:
        """One batch through one layer's attention block (with residual)."""
        return ATTENTION_KINDS[self.spec.attention.kind](self.spec.attention, self.eps, w, x, kv, step, self.rotary)

    def dense_mlp(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """A dense (non-MoE) MLP block with residual: x [B, S, D] -> [B, S, D]."""
        return x + swiglu_ffn(rms_norm(x, w["post_norm"], self.eps), w, self.spec.hidden_act)

    def gate(self, w: Weights, x: torch.Tensor, valid: torch.Tensor) -> GateOutput:
        """Norm, router and shared expert for one batch's valid tokens (x [B, S, D], valid [B, S])."""
        tokens = x[valid]  # [T, D]
        h = rms_norm(tokens, w["post_norm"], self.eps)
        ids, weights = route(self.spec.router, linear(h, w["router"]), w.get("router_bias"))
        base = tokens
        if "shared_gate_proj" in w:
            shared = swiglu_ffn(h, w, self.spec.hidden_act, prefix="shared_")
            if "shared_expert_gate" in w:
                shared = torch.sigmoid(linear(h, w["shared_expert_gate"])) * shared
            base = base + shared
        return GateOutput(h, ids, weights, base)

    def expert(self, w: Weights, h: torch.Tensor) -> torch.Tensor:
        """One routed expert over its tokens: h [t, D] -> [t, D] (unweighted)."""
        return swiglu_ffn(h, w, self.spec.hidden_act)

    def head(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: x [N, D] -> logits [N, V] in fp32."""
        return linear(rms_norm(x, w["norm"], self.eps), w["lm_head"]).float()
