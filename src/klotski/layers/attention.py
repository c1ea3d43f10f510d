"""Attention over one batch with its KV cache: GQA (Mixtral, Qwen, OLMoE); MLA lives in mla.py.

Layout: a batch holds B sequences of different lengths, right-padded; each new token sits at its
own position, and each sequence's keys are written into its own row of the cache at those
positions. Masks make padding invisible, so a sequence's result never depends on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from klotski.layers.linear import linear
from klotski.layers.norm import rms_norm
from klotski.layers.rotary import Rotary
from klotski.models.spec import AttentionSpec

# B = sequences in the batch, S = new tokens per sequence this step (padded), H = heads,
# Hkv = kv heads, L = cached length attended, D = hidden, dk/dv = head dims


@dataclass(slots=True)
class KVBlock:
    """One layer's KV cache for one batch: k [B, Hkv, cap, dk], v [B, Hkv, cap, dv]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(slots=True)
class StepInfo:
    """Where this step's tokens go: positions [B, S], and each row's length after the step [B]."""

    positions: torch.Tensor
    total: torch.Tensor
    max_total: int
    mask_cache: dict

    def mask(self, window: int | None) -> torch.Tensor:
        """Boolean attention mask [B, 1, S, L]: causal, within each row's length, within the window."""
        if window not in self.mask_cache:
            keys = torch.arange(self.max_total, device=self.positions.device)
            pos = self.positions[:, :, None]  # [B, S, 1]
            ok = (keys <= pos) & (keys < self.total[:, None, None])
            if window:
                ok &= keys > pos - window
            self.mask_cache[window] = ok[:, None]
        return self.mask_cache[window]


def write_kv(
    kv: KVBlock, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store this step's k/v [B, Hkv, S, d] at their positions; return the cache up to the longest row."""
    cap = kv.k.shape[2]
    # Padding tokens sit past their row's length; clamping keeps them in bounds, and whatever
    # they write there is masked out and overwritten before any real token reads it.
    idx = positions.clamp(max=cap - 1)[:, None, :, None]  # [B, 1, S, 1]
    kv.k.scatter_(2, idx.expand_as(k), k.to(kv.k.dtype))
    kv.v.scatter_(2, idx.expand_as(v), v.to(kv.v.dtype))
    return kv.k, kv.v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepInfo, spec: AttentionSpec) -> torch.Tensor:
    """Masked attention of q [B, H, S, dk] over the cache; returns [B, S, H * dv]."""
    length = step.max_total
    k, v = k[:, :, :length].to(q.dtype), v[:, :, :length].to(q.dtype)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=step.mask(spec.sliding_window),
        scale=spec.softmax_scale,
        enable_gqa=spec.num_heads != spec.num_kv_heads,
    )
    b, h, s, dv = out.shape
    return out.transpose(1, 2).reshape(b, s, h * dv)


def gqa_attention(
    spec: AttentionSpec,
    eps: float,
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    kv: KVBlock,
    step: StepInfo,
    rotary: Rotary,
) -> torch.Tensor:
    """Pre-norm GQA attention block with residual: x [B, S, D] -> [B, S, D]."""
    b, s, _ = x.shape
    h = rms_norm(x, w["input_norm"], eps)
    q = linear(h, w["q_proj"], w.get("q_proj_bias"))
    k = linear(h, w["k_proj"], w.get("k_proj_bias"))
    v = linear(h, w["v_proj"], w.get("v_proj_bias"))
    if spec.qk_norm == "full":  # OLMoE normalises the whole projection
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    if spec.clip_qkv is not None:  # OLMoE's clip_qkv, applied before the per-head split as transformers does
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = q.view(b, s, spec.num_heads, spec.qk_head_dim)
    k = k.view(b, s, spec.num_kv_heads, spec.qk_head_dim)
    if spec.qk_norm == "head":  # Qwen3 normalises each head
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, dk]
    v = v.view(b, s, spec.num_kv_heads, spec.v_head_dim).transpose(1, 2)
    cos, sin = rotary.cos_sin(step.positions, q.dtype)
    q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
    k_all, v_all = write_kv(kv, k, v, step.positions)
    return x + linear(sdpa(q, k_all, v_all, step, spec), w["o_proj"])
