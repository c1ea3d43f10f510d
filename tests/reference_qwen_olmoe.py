"""Reference variants of Qwen2-MoE, Qwen3-MoE and OLMoE (transformers configs at tests/reference.py sizes)."""

from __future__ import annotations

from tests.reference import COMMON

# Expert sizes differ from COMMON's dense intermediate_size (96), so a dense layer read with the
# expert shape (or the reverse) fails the shape check instead of passing by accident.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _qwen2(**kw):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**(COMMON | _MOE | dict(shared_expert_intermediate_size=48) | kw))


def _qwen3(**kw):
    from transformers import Qwen3MoeConfig

    # head_dim 32 != hidden / heads (16): the config's head_dim must win.
    return Qwen3MoeConfig(**(COMMON | _MOE | dict(head_dim=32, norm_topk_prob=True) | kw))


def _olmoe(**kw):
    from transformers import OlmoeConfig

    return OlmoeConfig(**(COMMON | dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32) | kw))


VARIANTS = {
    "qwen2_moe": lambda: _qwen2(),
    # Dense layer 0 (mlp_only_layers), routed layers 1-2, renormalised top-k.
    "qwen2_moe-mixed": lambda: _qwen2(num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=True),
    "qwen3_moe": lambda: _qwen3(),
    "qwen3_moe-fused": lambda: _qwen3(),  # saved in transformers' fused-expert layout
    # decoder_sparse_step 2 routes layers 1 and 3; mlp_only_layers makes 3 dense again.
    "qwen3_moe-sparse-step": lambda: _qwen3(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen3_moe-sliding-window": lambda: _qwen3(use_sliding_window=True, sliding_window=5),
    "olmoe": lambda: _olmoe(),
    # Small enough that q, k and v are all clamped somewhere.
    "olmoe-clip-qkv": lambda: _olmoe(clip_qkv=0.15, norm_topk_prob=True),
}
