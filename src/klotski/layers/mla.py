"""Multi-head latent attention (DeepSeek-V2/V3), caching the decompressed per-head k and v.

Keys are a per-head part decompressed from a low-rank latent (no position) plus one rope part
shared by every head; the query has the same two parts. Rope rotates only the shared part.
Caching decompressed k/v keeps the cache layout (and sdpa) the same as GQA's.
"""

from __future__ import annotations

import torch

from klotski.layers.attention import KVBlock, StepInfo, sdpa, write_kv
from klotski.layers.linear import linear
from klotski.layers.norm import rms_norm
from klotski.layers.rotary import Rotary
from klotski.models.spec import AttentionSpec

# B = sequences, S = new tokens per sequence, H = heads, D = hidden, r = kv_lora_rank,
# dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim


def mla_attention(
    spec: AttentionSpec,
    eps: float,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    kv: KVBlock,
    step: StepInfo,
    rotary: Rotary,
) -> torch.Tensor:
    """Pre-norm MLA block with residual: x [B, S, D] -> [B, S, D]."""
    b, s, _ = x.shape
    h = rms_norm(x, w["input_norm"], eps)
    q = _query(spec, eps, w, h).view(b, s, spec.num_heads, spec.qk_head_dim).transpose(1, 2)  # [B, H, S, dn+dr]
    q_nope, q_rope = q.split([spec.qk_nope_head_dim, spec.qk_rope_head_dim], dim=-1)
    latent, k_rope = linear(h, w["kv_a_proj"]).split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
    k_rope = k_rope.view(b, 1, s, spec.qk_rope_head_dim)  # one rope key shared by all heads
    cos, sin = rotary.cos_sin(step.positions, q.dtype)
    q_rope, k_rope = rotary.apply(q_rope, cos, sin), rotary.apply(k_rope, cos, sin)
    k_nope, v = _decompress(spec, eps, w, latent)
    k = torch.cat((k_nope, k_rope.expand(-1, spec.num_heads, -1, -1)), dim=-1)  # [B, H, S, dn+dr]
    k_all, v_all = write_kv(kv, k, v, step.positions)
    out = sdpa(torch.cat((q_nope, q_rope), dim=-1), k_all, v_all, step, spec)  # [B, S, H*dv]
    return x + linear(out, w["o_proj"])


def _query(spec: AttentionSpec, eps: float, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """q [B, S, H*(dn+dr)]: one projection, or V2/V3's low-rank q_a -> norm -> q_b."""
    if spec.q_lora_rank:
        return linear(rms_norm(linear(h, w["q_a_proj"]), w["q_a_norm"], eps), w["q_b_proj"])
    return linear(h, w["q_proj"])


def _decompress(
    spec: AttentionSpec, eps: float, w: dict[str, torch.Tensor], latent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed latent [B, S, r] -> per-head k_nope [B, H, S, dn] and v [B, H, S, dv]."""
    b, s, _ = latent.shape
    kv = linear(rms_norm(latent, w["kv_a_norm"], eps), w["kv_b_proj"])  # [B, S, H*(dn+dv)]
    kv = kv.view(b, s, spec.num_heads, spec.qk_nope_head_dim + spec.v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=-1)
    return k_nope, v
