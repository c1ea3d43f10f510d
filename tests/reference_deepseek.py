"""DeepSeek-V2/V3 reference variants (transformers configs) for the parity tests.

MLA needs num_key_value_heads == num_attention_heads in transformers (its keys are already per
head), and head dims that differ (nope, rope, v) so a swapped split shows.
"""

from __future__ import annotations

from tests.reference import COMMON

_MLA = dict(
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=3,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    moe_intermediate_size=32,
    n_shared_experts=2,
    first_k_dense_replace=1,
)


def _v2(**kw):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**(COMMON | _MLA | dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2) | kw))


def _v3(**kw):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **(
            COMMON
            | _MLA
            | dict(
                q_lora_rank=24,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_group=4,
                topk_group=2,
                n_shared_experts=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
            )
            | kw
        )
    )


# mscale != mscale_all_dim so both the cos/sin factor and the softmax-scale correction matter.
_YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=0.8,
)

VARIANTS = {
    "deepseek_v2": lambda: _v2(),  # q_proj, greedy top-k
    # q_a/q_b, group-limited greedy, scaled; transformers ignores V2's norm_topk_prob, so set it.
    "deepseek_v2-grouped": lambda: _v2(
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
    ),
    "deepseek_v2-yarn": lambda: _v2(rope_parameters=_YARN),
    # sigmoid, top-2-sum groups, correction bias (reference.py randomises it), dense first layer.
    "deepseek_v3": lambda: _v3(),
    "deepseek_v3-fused": lambda: _v3(),
    "deepseek_v3-no-interleave-yarn": lambda: _v3(rope_interleave=False, rope_parameters=_YARN | dict(mscale=0.9)),
}
