"""Attention over one batch with its KV cache: GQA (Mixtral, Qwen, OLMoE); MLA lives in mla.py.

Layout: a batch holds B sequences of different lengths, right-padded; each new token sits at its
own position, and each sequence's keys are written into its own row of the cache at those
positions. Masks make padding invisible, so a sequence's result never depends on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    _runs: list[tuple[slice, int, int]] | None = field(default=None)

    def runs(self) -> list[tuple[slice, int, int]]:
        """(rows, real queries, keys) for each run of neighbouring rows alike in both; the same in
        every layer, so computed once (a device sync on CUDA)."""
        if self._runs is None:
            queries = (self.positions < self.total[:, None]).sum(dim=1)  # real queries lead each row
            shapes = torch.stack([queries, self.total], dim=1).tolist()
            self._runs, lo = [], 0
            while lo < len(shapes):
                hi = lo + 1
                while hi < len(shapes) and shapes[hi] == shapes[lo]:
                    hi += 1
                self._runs.append((slice(lo, hi), *shapes[lo]))
                lo = hi
        return self._runs

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
    """Masked attention of q [B, H, S, dk] over the cache; returns [B, S, H * dv].

    A sequence's result must not depend on the other sequences of its batch. Padding to the
    batch's longest row is masked out, yet a kernel's blocking follows the padded sizes and so does
    its rounding; so each sequence attends over exactly its own keys with exactly its own queries,
    and neighbouring sequences alike in both share one call (docs/offloading.md, "Results
    independent of the batch"). A padded query row gets zeros.
    """
    b, h, s, _ = q.shape
    mask = step.mask(spec.sliding_window)  # [B, 1, S, max_total]
    scale = spec.softmax_scale if spec.softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_zeros(b, s, h * v.shape[-1])
    for rows, n, length in step.runs():  # views of the cache, never a gathered copy of it
        if n == 0:  # nothing real in these rows this step
            continue
        args = (q[rows, :, :n], k[rows, :, :length].to(q.dtype), v[rows, :, :length].to(q.dtype))
        if n == 1:  # a decode step
            part = decode_attention(*args, mask[rows, :, :1, :length], scale)
        else:
            part = F.scaled_dot_product_attention(
                *args,
                attn_mask=mask[rows, :, :n, :length],
                scale=scale,
                enable_gqa=spec.num_heads != spec.num_kv_heads,
            )
        out[rows, :n] = part.transpose(1, 2).reshape(part.shape[0], n, -1)
    return out


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one query per row (q [B, H, 1, dk]; mask [B, 1, 1, L]) -> [B, H, 1, dv].

    Written out because torch's CPU kernel rounds a decode row differently with the number of rows
    in the call; batched matmuls over (row, kv head), the heads of a group as a matrix's rows, do
    not. Softmax in fp32, as transformers' eager attention does.
    """
    b, h, _, dk = q.shape
    hkv = k.shape[1]
    scores = torch.matmul(q.reshape(b, hkv, h // hkv, dk), k.transpose(-1, -2)) * scale  # [B, Hkv, g, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(weights, v).reshape(b, h, 1, v.shape[-1])


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
