"""Linear layers over weights stored in any dtype; compute happens in the activations' dtype."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from klotski.models.spec import ACTIVATIONS as ACTIVATION_NAMES

# A weight stored in another dtype than x's is cast TILE_ROWS output rows at a time into one reused
# buffer per thread: an expert's whole fp32 copy per use would be the step's largest transient and
# a fresh allocation each time (runtime/transients.py counts the tile).
TILE_ROWS = 512
_tiles = threading.local()

# A token's result must not depend on how many rows share its matmul (its batch, its group, the
# other requests in flight), yet CPU GEMM kernels round differently for a few rows: measured with
# torch 2.13 on an AMD EPYC (docs/offloading.md, "Results independent of the batch"), a row's fp32
# result changes at 1-3, 5-7 and 9-11 rows against 4, 8 and 12 or more, bf16's at 1 row. So calls
# of fewer than PAD_BELOW rows are padded with zero rows to a multiple of ROW_MULTIPLE.
ROW_MULTIPLE, PAD_BELOW = 4, 12


def tile_bytes(in_features: int, dtype: torch.dtype) -> int:
    """The reused upcast buffer's size for weights with `in_features` columns."""
    return TILE_ROWS * in_features * dtype.itemsize


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), computed in x's dtype; a weight stored in another dtype is cast
    transiently (in tiles, for large ones), so resident weights stay at their storage size.

    Which compute dtype that is comes from runtime/compute_dtype.py: with dtype="auto" on a CPU, the
    faster of the weights' own dtype and fp32 over upcast weights, measured on the machine.
    """
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < PAD_BELOW and rows % ROW_MULTIPLE:
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(-rows % ROW_MULTIPLE, flat.shape[1])])
        return _linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], -1)
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if weight.shape[0] <= TILE_ROWS or weight.device.type != "cpu":
        return F.linear(x, weight.to(x.dtype), bias)
    return _tiled(x, weight, bias)


def _tiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear() with the weight cast TILE_ROWS rows at a time into a reused buffer."""
    out_features, in_features = weight.shape
    buf = getattr(_tiles, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < TILE_ROWS * in_features:
        buf = _tiles.buf = torch.empty(TILE_ROWS * in_features, dtype=x.dtype)
    out = x.new_empty(*x.shape[:-1], out_features)
    for lo in range(0, out_features, TILE_ROWS):
        hi = min(lo + TILE_ROWS, out_features)
        tile = buf[: (hi - lo) * in_features].view(hi - lo, in_features)
        tile.copy_(weight[lo:hi])
        out[..., lo:hi] = F.linear(x, tile, None if bias is None else bias[lo:hi])
    return out


ACTIVATIONS = {name: getattr(F, name) for name in ACTIVATION_NAMES}  # hidden_act -> function


def swiglu_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], act: str, prefix: str = "") -> torch.Tensor:
    """down(act(gate(x)) * up(x)): the expert / shared-expert / dense MLP of every family here."""
    gate = linear(x, w[prefix + "gate_proj"])
    up = linear(x, w[prefix + "up_proj"])
    return linear(ACTIVATIONS[act](gate) * up, w[prefix + "down_proj"])
