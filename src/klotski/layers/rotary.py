"""Rotary position embeddings: inverse frequencies per scaling type, and applying them."""

from __future__ import annotations

import math

import torch

from klotski.errors import KlotskiError
from klotski.models.spec import RopeSpec, yarn_mscale


def inv_freq_and_scale(rope: RopeSpec, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor applied to cos/sin (1.0 except for yarn)."""
    base = rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim)
    inv_freq = 1.0 / base
    scaling = rope.scaling
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(rope, scaling, base, max_positions)
    raise KlotskiError(f"rope scaling type {kind!r} is not supported; supported: default, linear, yarn")


def _yarn(rope: RopeSpec, s: dict, pos_freqs: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend with a linear ramp between."""
    dim = rope.dim
    original = s.get("original_max_position_embeddings") or max_positions
    # No factor: transformers derives it from the context extension (DeepSeek-V3-style configs).
    factor = s.get("factor") or max_positions / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables for a RopeSpec, applied to q and k at arbitrary per-token positions."""

    def __init__(self, rope: RopeSpec, max_positions: int):
        self.rope = rope
        self.inv_freq, self.scale = inv_freq_and_scale(rope, max_positions)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, S, dim] for positions [B, S]."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype)[:, None], (emb.sin() * self.scale).to(dtype)[:, None]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, H, S, dim]; interleaved (pairwise) layouts are de-interleaved first, as the reference does."""
        if self.rope.interleave:
            b, h, s, d = x.shape
            x = x.view(b, h, s, d // 2, 2).transpose(-1, -2).reshape(b, h, s, d)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
