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


# fp32 rounds differently at 1-3, 5-7 and 9-11 rows on this project's CPUs even at small shapes;
# bf16 in a few outputs of 1 row, from about 1024 x 4096.
@pytest.mark.parametrize(
    "dtype, weight_dtype, shape",
    [
        (torch.float32, torch.float32, (600, 256)),
        (torch.float32, torch.bfloat16, (600, 256)),  # the tiled upcast path
        (torch.bfloat16, torch.bfloat16, (1024, 4096)),
    ],
)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, weight_dtype, shape):
    # A token's output must be the same alone, in a batch, or in a group of any size.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g).to(weight_dtype)
    x = torch.randn(80, shape[1], generator=g).to(dtype)
    every = lin.linear(x, w)
    for rows in range(1, 41):
        assert torch.equal(lin.linear(x[:rows], w), every[:rows]), f"{rows} rows"
    for row in range(x.shape[0]):  # bf16 differs in few outputs: every row alone
        assert torch.equal(lin.linear(x[row : row + 1], w), every[row : row + 1]), f"row {row} alone"
    assert torch.equal(lin.linear(x[:3].view(1, 3, -1), w)[0], every[:3])  # leading dims too
