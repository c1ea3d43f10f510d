"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM).

Both: GQA with RoPE, a softmax top-k router (renormalised only when `norm_topk_prob`), and dense
MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so. Qwen2-MoE adds q/k/v biases and
a shared expert behind a sigmoid gate; Qwen3-MoE adds a per-head RMSNorm on q and k.
"""

from __future__ import annotations

from klotski.errors import KlotskiError
from klotski.models import common
from klotski.models.spec import MOE, ModelSpec, NameTable, RouterSpec, rule

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

SHARED_EXPERT_RULES = tuple(
    rule(f"model.layers.{{L}}.mlp.shared_expert.{p}_proj.weight", MOE, f"shared_{p}_proj")
    for p in ("gate", "up", "down")
) + (rule("model.layers.{L}.mlp.shared_expert_gate.weight", MOE, "shared_expert_gate"),)

NAMES = NameTable(
    rules=common.BASE_RULES + common.GQA_RULES + common.MLP_EXPERT_RULES + common.DENSE_MLP_RULES + SHARED_EXPERT_RULES,
    shape_fn=common.unit_shapes,
)


def sparse_layers(config: dict, layers: int) -> tuple[bool, ...]:
    """Which layers hold routed experts: transformers' Qwen*MoeDecoderLayer rule, verbatim."""
    dense = set(config.get("mlp_only_layers") or ())
    step = config.get("decoder_sparse_step") or 1
    experts = _num_experts(config)
    return tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))


def _num_experts(config: dict) -> int:
    # transformers 5 saves Qwen3-MoE's `num_experts` as `num_local_experts` (an attribute_map alias).
    for field in ("num_experts", "num_local_experts"):
        if config.get(field) is not None:
            return config[field]
    return common.need(config, "num_experts")


def _qwen2_window(config: dict, layers: int) -> None:
    """Qwen2-MoE slides the window on some layers only (layer_types); the engine has one window per model."""
    types = config.get("layer_types") or [
        "sliding_attention"
        if (i + 1) % 2 and i < config.get("max_window_layers", 28) and config.get("use_sliding_window")
        else "full_attention"
        for i in range(layers)
    ]
    if "sliding_attention" in types:
        raise KlotskiError(
            "this Qwen2-MoE config enables a per-layer sliding window (use_sliding_window / layer_types), "
            "which klotski does not support; set use_sliding_window to false in config.json "
            "to run it with full attention (exact for prompts shorter than sliding_window)"
        )


def _qwen3_window(config: dict) -> int | None:
    """Qwen3-MoE slides one window over every layer, and only when use_sliding_window is set."""
    return config.get("sliding_window") if config.get("use_sliding_window") else None


def spec_from_config(config: dict) -> ModelSpec:
    """A ModelSpec from a Qwen2-MoE or Qwen3-MoE config.json."""
    qwen3 = "Qwen3MoeForCausalLM" in (config.get("architectures") or ())
    layers = common.need(config, "num_hidden_layers")
    if config.get("attention_bias"):
        raise KlotskiError("Qwen3-MoE with attention_bias (an o_proj bias) is not supported; no released model uses it")
    if not qwen3:
        _qwen2_window(config, layers)
    moe_layers = sparse_layers(config, layers)
    return ModelSpec(
        family="qwen3_moe" if qwen3 else "qwen2_moe",
        architecture="Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM",
        attention=common.gqa_attention(
            config,
            qkv_bias=False if qwen3 else bool(config.get("qkv_bias", True)),
            qk_norm="head" if qwen3 else "none",
            sliding_window=_qwen3_window(config) if qwen3 else None,
        ),
        router=RouterSpec(
            num_experts=_num_experts(config),
            top_k=common.need(config, "num_experts_per_tok"),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        ),
        moe_intermediate_size=common.need(config, "moe_intermediate_size"),
        dense_intermediate_size=common.need(config, "intermediate_size") if not all(moe_layers) else 0,
        # transformers always builds Qwen2-MoE's shared expert and its gate.
        shared_intermediate_size=0 if qwen3 else common.need(config, "shared_expert_intermediate_size"),
        shared_expert_gate=not qwen3,
        moe_layers=moe_layers,
        **common.shared_fields(config, NAMES, eps=1e-6, max_positions=32768),
    )


# create-model presets: tiny test shapes and the published models' config.json values.
_QWEN2 = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": False,
    "qkv_bias": True,
    "attention_dropout": 0.0,
}
_QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_theta": 1e6,
}
FAMILY_PRESETS = {
    "qwen2_moe": (
        _QWEN2,
        {
            "tiny": {
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "rope_theta": 1e6,
                "max_position_embeddings": 4096,
            },
            "qwen1.5-moe-a2.7b": {
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 5632,
                "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "num_experts": 60,
                "num_experts_per_tok": 4,
                "rope_theta": 1e6,
                "max_position_embeddings": 8192,
                "sliding_window": 32768,
                "max_window_layers": 21,
            },
        },
    ),
    "qwen3_moe": (
        _QWEN3,
        {
            "tiny": {
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 4096,
            },
            "qwen3-30b-a3b": {
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "max_position_embeddings": 40960,
            },
            "qwen3-235b-a22b": {
                "vocab_size": 151936,
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "moe_intermediate_size": 1536,
                "num_hidden_layers": 94,
                "num_attention_heads": 64,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "max_position_embeddings": 40960,
            },
        },
    ),
}
