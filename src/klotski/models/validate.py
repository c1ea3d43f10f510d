"""config.json checked against what the modeling code needs, before anything is loaded or computed.

Two passes, like transformers' config classes: field types and ranges on the raw dict (before a
ModelSpec is built, so a `num_hidden_layers` of 10**12 never allocates anything), then the
relations between fields on the built spec (top-k within the experts, groups dividing them,
heads dividing evenly, ...). Every failure is a ConfigError naming the field, its value and the
fix; `klotski plan` and `Checkpoint.open` both go through here.
"""

from __future__ import annotations

import math
import numbers

from klotski.errors import ConfigError
from klotski.models.spec import ACTIVATIONS, ModelSpec

# Counts the code allocates per unit of: bounded so a typo cannot ask for 10**12 layers.
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_DIM = 2**31  # any size, width or vocabulary

INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
    "sliding_window",
    "decoder_sparse_step",
    "num_nextn_predict_layers",
    "bos_token_id",
    "max_window_layers",
)
# Fields that may be 0 (the rest must be at least 1 when given).
ZERO_OK = {
    "n_shared_experts",
    "first_k_dense_replace",
    "qk_nope_head_dim",
    "num_nextn_predict_layers",
    "bos_token_id",
    "q_lora_rank",
    "max_window_layers",
    "sliding_window",
}
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "clip_qkv")
BOOL_FIELDS = (
    "tie_word_embeddings",
    "norm_topk_prob",
    "use_sliding_window",
    "attention_bias",
    "qkv_bias",
    "mlp_bias",
    "rope_interleave",
)
ROPE_TYPES = ("default", "linear", "yarn")

# model_type -> the architecture to name when `architectures` is missing.
MODEL_TYPES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def _fail(message: str) -> None:
    raise ConfigError(f"config.json: {message}; fix config.json (or re-export it from the model's source)")


def check_architectures(config: dict, supported: list[str]) -> list[str]:
    """The `architectures` list, or a ConfigError that says it is missing and what to write."""
    archs = config.get("architectures")
    if archs is None:
        model_type = config.get("model_type")
        guess = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        hint = (
            f'add "architectures": ["{guess}"] (its model_type is {model_type!r})'
            if guess
            else "add the model's class, one of: " + ", ".join(supported)
        )
        raise ConfigError(f"config.json has no 'architectures' list, so the model class is unknown; {hint}")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ConfigError(
            f"config.json: 'architectures' must be a non-empty list of class names, got {archs!r:.80}; "
            'write e.g. ["MixtralForCausalLM"]'
        )
    return archs


def check_fields(config: dict) -> None:
    """Types and ranges of the fields any family reads (those present and not null)."""
    for name in INT_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{name} must be an integer, got {value!r:.60}")
        low = 0 if name in ZERO_OK else 1
        if not low <= value <= MAX_DIM:
            _fail(
                f"{name}={value} is out of range (it must be {low} or more"
                + (f", at most {MAX_DIM})" if value > 0 else ")")
            )
    for name in FLOAT_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            _fail(f"{name} must be a finite number, got {value!r:.60}")
        if value <= 0:
            _fail(f"{name}={value} must be positive")
    for name in BOOL_FIELDS:
        value = config.get(name)
        if value is not None and not isinstance(value, bool):
            _fail(f"{name} must be true or false, got {value!r:.60}")
    if "num_hidden_layers" in config and isinstance(config["num_hidden_layers"], int):
        if config["num_hidden_layers"] > MAX_LAYERS:
            _fail(f"num_hidden_layers={config['num_hidden_layers']} is more than {MAX_LAYERS}")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(config.get(name), int) and config[name] > MAX_EXPERTS:
            _fail(f"{name}={config[name]} is more than {MAX_EXPERTS} experts")
    eos = config.get("eos_token_id")
    if eos is not None and not _ints(eos if isinstance(eos, list) else [eos]):
        _fail(f"eos_token_id must be a token id or a list of them, got {eos!r:.60}")
    layers = config.get("mlp_only_layers")
    if layers is not None and (not isinstance(layers, list) or not _ints(layers)):
        _fail(f"mlp_only_layers must be a list of layer indices, got {layers!r:.60}")
    for name in ("rope_scaling", "rope_parameters"):
        value = config.get(name)
        if value is not None and not isinstance(value, dict):
            _fail(f"{name} must be an object or null, got {value!r:.60}")
    act = config.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        _fail(f"hidden_act {act!r:.40} is not supported (supported: {', '.join(ACTIVATIONS)})")


def _ints(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def check_spec(spec: ModelSpec, config: dict) -> None:
    """Relations between fields the modeling code relies on, on the built spec."""
    a, r = spec.attention, spec.router
    if spec.num_layers < 1:
        _fail(f"num_hidden_layers={spec.num_layers}: a model needs at least one layer")
    if a.num_heads % a.num_kv_heads:
        _fail(
            f"num_attention_heads={a.num_heads} is not a multiple of num_key_value_heads={a.num_kv_heads} "
            "(each key/value head serves a whole group of query heads)"
        )
    if a.num_kv_heads > a.num_heads:
        _fail(f"num_key_value_heads={a.num_kv_heads} is more than num_attention_heads={a.num_heads}")
    if a.qk_head_dim < 1 or a.v_head_dim < 1:
        _fail(
            f"the head dimension is {a.qk_head_dim} (hidden_size={spec.hidden_size} / num_attention_heads="
            f"{a.num_heads}, or head_dim); it must be at least 1"
        )
    if a.rope.dim < 2 or a.rope.dim % 2:
        field = "qk_rope_head_dim" if a.kind == "mla" else "head_dim"
        _fail(f"the rotary dimension ({field}) is {a.rope.dim}; rotary embeddings rotate pairs, so it must be even")
    if not (math.isfinite(a.rope.theta) and a.rope.theta > 0):
        _fail(f"rope_theta={a.rope.theta} must be a positive number")
    if a.rope.scaling:
        kind = a.rope.scaling.get("rope_type", a.rope.scaling.get("type"))
        if kind not in ROPE_TYPES:
            raise_unsupported(f"rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        factor = a.rope.scaling.get("factor")
        if kind != "default" and not (
            isinstance(factor, numbers.Real) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0
        ):
            _fail(f"rope_scaling factor {factor!r:.40} must be a positive number")
    if a.sliding_window is not None and (not isinstance(a.sliding_window, int) or a.sliding_window < 1):
        _fail(f"sliding_window={a.sliding_window!r} must be a positive number of tokens or null")
    if a.clip_qkv is not None and not (math.isfinite(a.clip_qkv) and a.clip_qkv > 0):
        _fail(f"clip_qkv={a.clip_qkv} must be a positive number or null (it clamps q, k, v to [-clip, clip])")
    if r.num_experts < 1:
        _fail(f"the number of experts is {r.num_experts}; a MoE model needs at least one")
    if not 1 <= r.top_k <= r.num_experts:
        _fail(f"num_experts_per_tok={r.top_k} must be between 1 and the number of experts ({r.num_experts})")
    if r.num_groups > 1 or r.topk_groups > 1:
        _check_groups(r)
    if not (math.isfinite(r.routed_scaling_factor) and r.routed_scaling_factor > 0):
        _fail(f"routed_scaling_factor={r.routed_scaling_factor} must be a positive number")
    if not (math.isfinite(spec.rms_norm_eps) and spec.rms_norm_eps > 0):
        _fail(f"rms_norm_eps={spec.rms_norm_eps} must be a small positive number (e.g. 1e-6): 0 divides by zero")
    if spec.moe_intermediate_size < 1:
        _fail(f"the experts' intermediate size is {spec.moe_intermediate_size}; it must be at least 1")
    if not all(spec.moe_layers) and spec.dense_intermediate_size < 1:
        _fail("intermediate_size must be at least 1: some layers are dense MLPs")
    dense = config.get("first_k_dense_replace")
    if isinstance(dense, int) and dense > spec.num_layers:
        _fail(f"first_k_dense_replace={dense} is more than num_hidden_layers={spec.num_layers}")
    for layer in config.get("mlp_only_layers") or ():
        if layer >= spec.num_layers:
            _fail(f"mlp_only_layers names layer {layer}, but num_hidden_layers={spec.num_layers}")
    if not any(spec.moe_layers):
        _fail(
            "no layer has routed experts (decoder_sparse_step, mlp_only_layers or first_k_dense_replace make every "
            "layer dense); this is not a mixture-of-experts model"
        )
    if spec.max_position_embeddings < 1:
        _fail(f"max_position_embeddings={spec.max_position_embeddings} must be at least 1")
    ids = [("bos_token_id", spec.bos_token_id)] + [("eos_token_id", t) for t in spec.eos_token_ids]
    for name, token in ids:
        if token is not None and not 0 <= token < spec.vocab_size:
            _fail(f"{name}={token} is outside the vocabulary (0..{spec.vocab_size - 1})")


def _check_groups(r) -> None:
    """DeepSeek's group-limited routing: groups split the experts evenly, and the chosen groups
    hold at least top-k experts (transformers' topk over the masked scores fails otherwise)."""
    if r.num_groups < 1 or r.num_experts % r.num_groups:
        _fail(f"n_group={r.num_groups} does not divide the {r.num_experts} routed experts (n_routed_experts) evenly")
    if not 1 <= r.topk_groups <= r.num_groups:
        _fail(f"topk_group={r.topk_groups} must be between 1 and n_group={r.num_groups}")
    per_group = r.num_experts // r.num_groups
    if r.top_k > r.topk_groups * per_group:
        _fail(
            f"num_experts_per_tok={r.top_k} is more than the {r.topk_groups * per_group} experts in the "
            f"topk_group={r.topk_groups} groups routing may choose from"
        )
    if r.group_score == "top2_sum" and per_group < 2:
        _fail(f"n_group={r.num_groups} leaves one expert per group, but DeepSeek-V3 ranks groups by their best two")


def raise_unsupported(message: str) -> None:
    from klotski.errors import UnsupportedModelError

    raise UnsupportedModelError(message)
