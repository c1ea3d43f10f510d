"""DeepSeek-V2 and V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): MLA attention, shared
experts, dense first layers, and group-limited routing, as transformers computes them.

V2 and V3 differ only in data: V2 scores with softmax and (in transformers) never renormalises
the top-k; V3 scores with sigmoid, steers selection with e_score_correction_bias, ranks groups by
their top-2 sum and renormalises. Both rotate the rope dims as interleaved pairs (V3 unless
`rope_interleave` is false).
"""

from __future__ import annotations

from dataclasses import dataclass

from klotski.errors import UnsupportedModelError
from klotski.models import common
from klotski.models.spec import ATTN, MOE, AttentionSpec, ModelSpec, NameTable, RopeSpec, RouterSpec, rule, yarn_mscale

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")

_ATTN = "model.layers.{L}.self_attn."
MLA_RULES = (
    rule(_ATTN + "q_proj.weight", ATTN, "q_proj"),
    rule(_ATTN + "q_a_proj.weight", ATTN, "q_a_proj"),
    rule(_ATTN + "q_a_layernorm.weight", ATTN, "q_a_norm"),
    rule(_ATTN + "q_b_proj.weight", ATTN, "q_b_proj"),
    rule(_ATTN + "kv_a_proj_with_mqa.weight", ATTN, "kv_a_proj"),
    rule(_ATTN + "kv_a_layernorm.weight", ATTN, "kv_a_norm"),
    rule(_ATTN + "kv_b_proj.weight", ATTN, "kv_b_proj"),
)

NAMES = NameTable(
    rules=common.BASE_RULES
    + MLA_RULES
    + common.MLP_EXPERT_RULES
    + common.DENSE_MLP_RULES
    + tuple(
        rule(f"model.layers.{{L}}.mlp.shared_experts.{p}_proj.weight", MOE, f"shared_{p}_proj")
        for p in ("gate", "up", "down")
    )
    + (rule("model.layers.{L}.mlp.gate.e_score_correction_bias", MOE, "router_bias"),),
    shape_fn=common.unit_shapes,
)


@dataclass(frozen=True)
class _Version:
    """What separates V2 from V3 (the rest is read from config.json)."""

    family: str
    scoring: str  # router scores: softmax (V2) or sigmoid (V3)
    correction_bias: bool  # V3's e_score_correction_bias
    group_score: str  # how groups are ranked: best expert (V2) or sum of best two (V3)
    default_positions: int  # transformers' default max_position_embeddings


_VERSIONS = {
    "DeepseekV2ForCausalLM": _Version("deepseek_v2", "softmax", False, "max", 2048),
    "DeepseekV3ForCausalLM": _Version("deepseek_v3", "sigmoid", True, "top2_sum", 4096),
}


def spec_from_config(config: dict) -> ModelSpec:
    """A ModelSpec from a DeepSeek-V2 or V3 config.json."""
    arch = next(a for a in config["architectures"] if a in _VERSIONS)
    _reject_biases(config)
    layers = common.need(config, "num_hidden_layers")
    dense = config.get("first_k_dense_replace") or 0
    shared = config.get("n_shared_experts") or 0
    return ModelSpec(
        family=_VERSIONS[arch].family,
        architecture=arch,
        attention=mla_spec(config, arch),
        router=router_spec(config, arch),
        moe_intermediate_size=common.need(config, "moe_intermediate_size"),
        dense_intermediate_size=common.need(config, "intermediate_size") if dense else 0,
        shared_intermediate_size=shared * config["moe_intermediate_size"],
        shared_expert_gate=False,
        # transformers ignores the hub's moe_layer_freq (always 1 in published configs).
        moe_layers=tuple(layer >= dense for layer in range(layers)),
        # V3 checkpoints carry multi-token-prediction layers after the last one; the reference skips them.
        extra_layers=int(config.get("num_nextn_predict_layers") or 0),
        **common.shared_fields(config, NAMES, eps=1e-6, max_positions=_VERSIONS[arch].default_positions),
    )


def mla_spec(config: dict, arch: str) -> AttentionSpec:
    """MLA shapes; the cache holds decompressed per-head k/v, so kv heads = heads."""
    heads = common.need(config, "num_attention_heads")
    nope, rope_dim = common.need(config, "qk_nope_head_dim"), common.need(config, "qk_rope_head_dim")
    # V2 rotates complex pairs (always interleaved); V3 does so unless rope_interleave is false.
    interleave = arch == "DeepseekV2ForCausalLM" or config.get("rope_interleave", True)
    rope = common.rope_from_config(config, rope_dim, interleave=bool(interleave))
    return AttentionSpec(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,
        qk_head_dim=nope + rope_dim,
        v_head_dim=common.need(config, "v_head_dim"),
        rope=rope,
        softmax_scale=softmax_scale(nope + rope_dim, rope),
        q_lora_rank=config.get("q_lora_rank") or None,
        kv_lora_rank=common.need(config, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
    )


def softmax_scale(qk_head_dim: int, rope: RopeSpec) -> float:
    """1/sqrt(dk), times mscale(factor, mscale_all_dim)^2 under scaled rope (DeepSeek's YaRN correction)."""
    scale = qk_head_dim**-0.5
    if rope.scaling and rope.scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(rope.scaling["factor"], rope.scaling["mscale_all_dim"]) ** 2
    return scale


def router_spec(config: dict, arch: str) -> RouterSpec:
    """V2: softmax, greedy or group-limited by max, scaled but never renormalised (transformers
    ignores V2's norm_topk_prob). V3: sigmoid + correction bias, groups ranked by top-2 sum."""
    version = _VERSIONS[arch]
    groups, topk_groups = config.get("n_group") or 1, config.get("topk_group") or 1
    if version.scoring == "softmax":
        method = config.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"DeepSeek-V2 topk_method {method!r} is not supported; supported: greedy, group_limited_greedy"
            )
        if method == "greedy":
            groups = topk_groups = 1
    return RouterSpec(
        num_experts=common.need(config, "n_routed_experts"),
        top_k=common.need(config, "num_experts_per_tok"),
        scoring=version.scoring,
        norm_topk_prob=version.scoring == "sigmoid" and bool(config.get("norm_topk_prob", True)),
        num_groups=groups,
        topk_groups=topk_groups,
        group_score=version.group_score,
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        correction_bias=version.correction_bias,
    )


def _reject_biases(config: dict) -> None:
    """attention_bias / mlp_bias add tensors no published DeepSeek checkpoint has."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UnsupportedModelError(f"DeepSeek with {flag}=true is not supported (no published checkpoint uses it)")


# create-model presets: tiny test shapes and the real models' shapes.
_V2_BASE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
}
_V3_BASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "rope_interleave": True,
}
_TINY_MLA = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
}
# Published rope_scaling of DeepSeek-V2(-Lite) and V3: YaRN from 4k to 160k positions.
_V2_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
_V3_YARN = _V2_YARN | {"mscale": 1.0, "mscale_all_dim": 1.0}

FAMILY_PRESETS = {
    "deepseek_v2": (
        _V2_BASE,
        {
            "tiny": _TINY_MLA
            | {
                "q_lora_rank": None,
                "n_routed_experts": 8,
                "n_shared_experts": 2,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "topk_group": 1,
            },
            "deepseek-v2-lite": {
                "vocab_size": 102400,
                "hidden_size": 2048,
                "intermediate_size": 10944,
                "moe_intermediate_size": 1408,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "kv_lora_rank": 512,
                "q_lora_rank": None,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "n_routed_experts": 64,
                "n_shared_experts": 2,
                "num_experts_per_tok": 6,
                "n_group": 1,
                "topk_group": 1,
                "first_k_dense_replace": 1,
                "moe_layer_freq": 1,
                "max_position_embeddings": 163840,
                "rope_scaling": _V2_YARN,
            },
            "deepseek-v2": {
                "vocab_size": 102400,
                "hidden_size": 5120,
                "intermediate_size": 12288,
                "moe_intermediate_size": 1536,
                "num_hidden_layers": 60,
                "num_attention_heads": 128,
                "num_key_value_heads": 128,
                "kv_lora_rank": 512,
                "q_lora_rank": 1536,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "n_routed_experts": 160,
                "n_shared_experts": 2,
                "num_experts_per_tok": 6,
                "n_group": 8,
                "topk_group": 3,
                "topk_method": "group_limited_greedy",
                "routed_scaling_factor": 16.0,
                "first_k_dense_replace": 1,
                "moe_layer_freq": 1,
                "max_position_embeddings": 163840,
                "rope_scaling": _V2_YARN,
            },
        },
    ),
    "deepseek_v3": (
        _V3_BASE,
        {
            "tiny": _TINY_MLA
            | {
                "q_lora_rank": 24,
                "n_routed_experts": 8,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "n_group": 4,
                "topk_group": 2,
                "routed_scaling_factor": 2.5,
            },
            "deepseek-v3": {
                "vocab_size": 129280,
                "hidden_size": 7168,
                "intermediate_size": 18432,
                "moe_intermediate_size": 2048,
                "num_hidden_layers": 61,
                "num_attention_heads": 128,
                "num_key_value_heads": 128,
                "kv_lora_rank": 512,
                "q_lora_rank": 1536,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "n_routed_experts": 256,
                "n_shared_experts": 1,
                "num_experts_per_tok": 8,
                "n_group": 8,
                "topk_group": 4,
                "routed_scaling_factor": 2.5,
                "first_k_dense_replace": 3,
                "moe_layer_freq": 1,
                "max_position_embeddings": 163840,
                "rope_scaling": _V3_YARN,
            },
        },
    ),
}
