"""OLMoE (OlmoeForCausalLM): GQA with RMSNorm over the whole q and k projections, optional
clip_qkv, and a softmax top-k router that does not renormalise by default."""

from __future__ import annotations

from klotski.errors import KlotskiError
from klotski.models import common
from klotski.models.spec import ModelSpec, NameTable, RouterSpec

ARCHITECTURES = ("OlmoeForCausalLM",)

NAMES = NameTable(rules=common.BASE_RULES + common.GQA_RULES + common.MLP_EXPERT_RULES, shape_fn=common.unit_shapes)


def spec_from_config(config: dict) -> ModelSpec:
    """A ModelSpec from an OLMoE config.json."""
    layers = common.need(config, "num_hidden_layers")
    if config.get("attention_bias"):
        raise KlotskiError("OLMoE with attention_bias (an o_proj bias) is not supported; no released model uses it")
    clip = config.get("clip_qkv")
    return ModelSpec(
        family="olmoe",
        architecture="OlmoeForCausalLM",
        attention=common.gqa_attention(config, qk_norm="full", clip_qkv=float(clip) if clip is not None else None),
        router=RouterSpec(
            num_experts=common.need(config, "num_experts"),
            top_k=common.need(config, "num_experts_per_tok"),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        ),
        moe_intermediate_size=common.need(config, "intermediate_size"),  # OLMoE's experts use intermediate_size
        dense_intermediate_size=0,
        shared_intermediate_size=0,
        shared_expert_gate=False,
        moe_layers=(True,) * layers,
        **common.shared_fields(config, NAMES, eps=1e-5, max_positions=4096),
    )


# create-model presets: a tiny test shape and OLMoE-1B-7B's published config.json values.
_BASE = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "norm_topk_prob": False,
}
FAMILY_PRESETS = {
    "olmoe": (
        _BASE,
        {
            "tiny": {
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 4096,
            },
            "olmoe-1b-7b": {
                "vocab_size": 50304,
                "hidden_size": 2048,
                "intermediate_size": 1024,
                "num_hidden_layers": 16,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "num_experts": 64,
                "num_experts_per_tok": 8,
                "max_position_embeddings": 4096,
            },
        },
    )
}
