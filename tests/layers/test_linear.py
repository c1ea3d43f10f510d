"""linear() over weights stored in another dtype: cast in tiles into one reused buffer, same products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from klotski.layers import linear as lin


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64), (1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_tiled_upcast_matches_a_whole_copy(monkeypatch, shape, bias):
    monkeypatch.setattr(lin, "TILE_ROWS", 16)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g).bfloat16()  # 40 rows: two whole tiles and a short one
    b = torch.randn(40, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    # The same products summed the same way up to the GEMM kernel's blocking, which may differ with N.
    torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w.float(), b), rtol=1e-5, atol=1e-5)
    assert torch.equal(lin.linear(x, w, b), lin.linear(x, w, b))


def test_the_tile_buffer_is_reused_and_bounded(monkeypatch):
    monkeypatch.setattr(lin, "TILE_ROWS", 16)
    monkeypatch.setattr(lin, "_tiles", type(lin._tiles)())
    w = torch.randn(64, 32).bfloat16()
    lin.linear(torch.randn(2, 32), w)
    first = lin._tiles.buf
    lin.linear(torch.randn(7, 32), w)
    assert lin._tiles.buf is first and first.numel() * first.element_size() == lin.tile_bytes(32, torch.float32)


def test_same_dtype_and_small_weights_take_the_plain_path():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
    assert torch.equal(lin.linear(x, w.bfloat16()), F.linear(x, w.bfloat16().float()))
