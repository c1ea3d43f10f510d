"""sdpa(): a sequence's attention does not depend on the other sequences of its batch."""

from __future__ import annotations

import pytest
import torch

from klotski.layers.attention import StepInfo, sdpa
from klotski.models.spec import AttentionSpec, RopeSpec

H, HKV, D = 4, 2, 32


def _spec(window: int | None = None) -> AttentionSpec:
    return AttentionSpec("gqa", H, HKV, D, D, RopeSpec(D, 10000.0), sliding_window=window)


def _step(positions: torch.Tensor, total: torch.Tensor) -> StepInfo:
    return StepInfo(positions=positions, total=total, max_total=int(total.max()), mask_cache={})


def _prefill(lengths: list[int], dtype: torch.dtype, g: torch.Generator):
    """q, k, v of a prefill batch right-padded to its longest prompt, and its step."""
    width = max(lengths)
    q = torch.randn(len(lengths), H, width, D, generator=g).to(dtype)
    k, v = (torch.randn(len(lengths), HKV, width, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, _step(torch.arange(width).expand(len(lengths), width), torch.tensor(lengths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
def test_a_prefill_row_is_the_same_alone_and_beside_longer_ones(dtype, window):
    # The batch's longest row (300) pads the others' keys and queries; masked out, yet the kernel's
    # blocking, and so its rounding, would follow the padded sizes.
    g = torch.Generator().manual_seed(0)
    lengths = [9, 300, 9, 33, 1]
    q, k, v, step = _prefill(lengths, dtype, g)
    together = sdpa(q, k, v, step, _spec(window))  # [B, S, H*D]
    for i, n in enumerate(lengths):
        alone = sdpa(
            q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n], _prefill([n], dtype, g)[3], _spec(window)
        )
        assert torch.equal(together[i, :n], alone[0]), f"row {i} ({n} tokens)"
        assert not together[i, n:].any()  # padded queries: zeros, never NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_row_is_the_same_alone_and_beside_longer_ones(dtype):
    g = torch.Generator().manual_seed(1)
    totals = [17, 100, 17, 640]
    cap = max(totals)
    q = torch.randn(len(totals), H, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(len(totals), HKV, cap, D, generator=g).to(dtype) for _ in range(2))
    total = torch.tensor(totals)
    together = sdpa(q, k, v, _step((total - 1)[:, None], total), _spec())
    for i, n in enumerate(totals):
        one = torch.tensor([n])
        alone = sdpa(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], _step((one - 1)[:, None], one), _spec())
        assert torch.equal(together[i], alone[0]), f"row {i} ({n} keys)"
