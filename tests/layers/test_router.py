"""route() against transformers' DeepSeek routers, including the corners the parity models rarely hit."""

from __future__ import annotations

import pytest
import torch

from klotski.layers.router import route
from klotski.models.deepseek import router_spec

# T = tokens, E = experts, D = hidden
T, E, D = 64, 16, 32


def _compare(arch: str, config, **overrides) -> None:
    """Same experts and weights as the reference router for random tokens [T, D]."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    gen = torch.Generator().manual_seed(0)
    ref = (DeepseekV2TopkRouter if arch == "DeepseekV2ForCausalLM" else DeepseekV3TopkRouter)(config)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, D, generator=gen))
        bias = getattr(ref, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(E, generator=gen))  # large enough to push some choices below 0
    x = torch.randn(T, D, generator=gen)
    _, want_w, want_ids = ref(x)
    spec = router_spec(config.to_dict() | {"architectures": [arch]}, arch)
    ids, weights = route(spec, x @ ref.weight.T, bias)
    # Compare per-expert weights [T, E]: order-free, and a zero-weight pick (ties broken either way) adds nothing.
    dense = torch.zeros(T, E).scatter_add_(1, ids, weights)
    want = torch.zeros(T, E).scatter_add_(1, want_ids, want_w)
    torch.testing.assert_close(dense, want)


@pytest.mark.parametrize(
    "kw",
    [
        dict(topk_method="greedy", num_experts_per_tok=4),
        dict(topk_method="greedy", num_experts_per_tok=4, norm_topk_prob=True, routed_scaling_factor=16.0),
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=4),
        # top_k larger than the kept groups' experts: the extra picks weigh 0 in V2
        dict(topk_method="group_limited_greedy", n_group=8, topk_group=2, num_experts_per_tok=6),
    ],
)
def test_v2_router_matches_reference(kw):
    from transformers import DeepseekV2Config

    _compare("DeepseekV2ForCausalLM", DeepseekV2Config(hidden_size=D, n_routed_experts=E, **kw))


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_group=4, topk_group=2, num_experts_per_tok=4),
        dict(n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False),
        # every kept expert picked, some with a negative biased score: masking must be -inf, not 0
        dict(n_group=4, topk_group=1, num_experts_per_tok=4),
        dict(n_group=1, topk_group=1, num_experts_per_tok=6, routed_scaling_factor=1.0),
    ],
)
def test_v3_router_matches_reference(kw):
    from transformers import DeepseekV3Config

    _compare("DeepseekV3ForCausalLM", DeepseekV3Config(hidden_size=D, n_routed_experts=E, **kw))
