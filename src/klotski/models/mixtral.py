"""Mixtral (MixtralForCausalLM): GQA, RoPE, softmax top-k router with renormalisation."""

from __future__ import annotations

from klotski.models import common
from klotski.models.spec import EXPERT, MOE, ModelSpec, NameTable, RouterSpec, rule

ARCHITECTURES = ("MixtralForCausalLM",)

NAMES = NameTable(
    rules=common.BASE_RULES
    + common.GQA_RULES
    + common.MLP_EXPERT_RULES
    + (
        # Mixtral's hub names: w1 = gate, w3 = up, w2 = down.
        rule("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", EXPERT, "gate_proj"),
        rule("model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight", EXPERT, "up_proj"),
        rule("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight", EXPERT, "down_proj"),
        rule("model.layers.{L}.block_sparse_moe.gate.weight", MOE, "router"),
    ),
    shape_fn=common.unit_shapes,
)


def spec_from_config(config: dict) -> ModelSpec:
    """A ModelSpec from a Mixtral config.json."""
    layers = common.need(config, "num_hidden_layers")
    return ModelSpec(
        family="mixtral",
        architecture="MixtralForCausalLM",
        attention=common.gqa_attention(config, sliding_window=config.get("sliding_window")),
        router=RouterSpec(
            num_experts=common.need(config, "num_local_experts"), top_k=common.need(config, "num_experts_per_tok")
        ),
        moe_intermediate_size=common.need(config, "intermediate_size"),
        dense_intermediate_size=0,
        shared_intermediate_size=0,
        shared_expert_gate=False,
        moe_layers=(True,) * layers,
        **common.shared_fields(config, NAMES, eps=1e-5, max_positions=32768),
    )


# create-model presets: tiny test shapes and the real models' shapes.
_BASE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "router_jitter_noise": 0.0,
    "attention_dropout": 0.0,
}
FAMILY_PRESETS = {
    "mixtral": (
        _BASE,
        {
            "tiny": {
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 4096,
            },
            "mixtral-8x7b": {
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 32768,
            },
            "mixtral-8x22b": {
                "vocab_size": 32768,
                "hidden_size": 6144,
                "intermediate_size": 16384,
                "num_hidden_layers": 56,
                "num_attention_heads": 48,
                "num_key_value_heads": 8,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 65536,
            },
        },
    )
}
