"""YaRN inverse frequencies and attention factor against transformers' implementation."""

from __future__ import annotations

import pytest
import torch

from klotski.layers.rotary import inv_freq_and_scale
from klotski.models.common import rope_from_config

YARN = dict(rope_type="yarn", rope_theta=10000.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)


@pytest.mark.parametrize(
    "params",
    [
        YARN | dict(factor=40.0, mscale=0.707, mscale_all_dim=0.707),  # DeepSeek-V2-Lite
        YARN | dict(factor=40.0, mscale=1.0, mscale_all_dim=0.8),
        YARN | dict(factor=4.0),
        YARN | dict(factor=None, truncate=False),  # factor from max_position_embeddings / original
    ],
)
def test_yarn_matches_reference(params):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=dict(params))
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = rope_from_config(config.to_dict(), 64)
    inv_freq, scale = inv_freq_and_scale(rope, config.max_position_embeddings)
    torch.testing.assert_close(inv_freq, want_freq, rtol=0, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
