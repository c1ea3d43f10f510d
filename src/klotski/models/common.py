"""What the families share: tensor-name rules for the common Hugging Face layout, unit shapes,
and config.json field readers."""

from __future__ import annotations

from klotski.errors import CheckpointError
from klotski.models.spec import (
    ATTN,
    EMBED,
    EXPERT,
    HEAD,
    MOE,
    AttentionSpec,
    ModelSpec,
    NameRule,
    RopeSpec,
    WeightKey,
    rule,
)

# Names every family here uses (Llama-style layout).
BASE_RULES: tuple[NameRule, ...] = (
    rule("model.embed_tokens.weight", EMBED, "weight"),
    rule("model.norm.weight", HEAD, "norm"),
    rule("lm_head.weight", HEAD, "lm_head"),
    rule("model.layers.{L}.input_layernorm.weight", ATTN, "input_norm"),
    rule("model.layers.{L}.post_attention_layernorm.weight", MOE, "post_norm"),
    rule("model.layers.{L}.self_attn.o_proj.weight", ATTN, "o_proj"),
)

GQA_RULES: tuple[NameRule, ...] = tuple(
    rule(f"model.layers.{{L}}.self_attn.{p}_proj.{kind}", ATTN, f"{p}_proj" + ("_bias" if kind == "bias" else ""))
    for p in "qkv"
    for kind in ("weight", "bias")
) + (
    rule("model.layers.{L}.self_attn.q_norm.weight", ATTN, "q_norm"),
    rule("model.layers.{L}.self_attn.k_norm.weight", ATTN, "k_norm"),
)

# `mlp.experts.N.*` per expert (hub layout) and `mlp.experts.{gate_up,down}_proj` fused
# ([E, 2I, H] with gate rows first, [E, H, I]: transformers' in-memory layout).
MLP_EXPERT_RULES: tuple[NameRule, ...] = tuple(
    rule(f"model.layers.{{L}}.mlp.experts.{{E}}.{p}_proj.weight", EXPERT, f"{p}_proj") for p in ("gate", "up", "down")
) + (
    rule("model.layers.{L}.mlp.experts.gate_up_proj", EXPERT, "gate_up_proj", fused="gate_up"),
    rule("model.layers.{L}.mlp.experts.down_proj", EXPERT, "down_proj", fused="down"),
    rule("model.layers.{L}.mlp.gate.weight", MOE, "router"),
)

DENSE_MLP_RULES: tuple[NameRule, ...] = tuple(
    rule(f"model.layers.{{L}}.mlp.{p}_proj.weight", MOE, f"{p}_proj") for p in ("gate", "up", "down")
)


def ffn_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """gate/up [I, H] and down [H, I] of a SwiGLU FFN."""
    return {
        f"{prefix}gate_proj": (inter, hidden),
        f"{prefix}up_proj": (inter, hidden),
        f"{prefix}down_proj": (hidden, inter),
    }


def attention_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Attention unit shapes, GQA or MLA."""
    a, h = spec.attention, spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"input_norm": (h,), "o_proj": (h, a.num_heads * a.v_head_dim)}
    if a.kind == "mla":
        q_out = a.num_heads * a.qk_head_dim
        if a.q_lora_rank:
            shapes |= {"q_a_proj": (a.q_lora_rank, h), "q_a_norm": (a.q_lora_rank,), "q_b_proj": (q_out, a.q_lora_rank)}
        else:
            shapes["q_proj"] = (q_out, h)
        shapes |= {
            "kv_a_proj": (a.kv_lora_rank + a.qk_rope_head_dim, h),
            "kv_a_norm": (a.kv_lora_rank,),
            "kv_b_proj": (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        }
        return shapes
    q_out, kv_out = a.num_heads * a.qk_head_dim, a.num_kv_heads * a.qk_head_dim
    shapes |= {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h)}
    if a.qkv_bias:
        shapes |= {"q_proj_bias": (q_out,), "k_proj_bias": (kv_out,), "v_proj_bias": (kv_out,)}
    if a.qk_norm == "head":
        shapes |= {"q_norm": (a.qk_head_dim,), "k_norm": (a.qk_head_dim,)}
    elif a.qk_norm == "full":
        shapes |= {"q_norm": (q_out,), "k_norm": (kv_out,)}
    return shapes


def moe_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """The per-layer dense part of an MLP block: norm, router, shared experts, or a dense MLP."""
    h = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"post_norm": (h,)}
    if not spec.moe_layers[layer]:
        return shapes | ffn_shapes("", h, spec.dense_intermediate_size)
    shapes["router"] = (spec.num_experts, h)
    if spec.router.correction_bias:
        shapes["router_bias"] = (spec.num_experts,)
    if spec.shared_intermediate_size:
        shapes |= ffn_shapes("shared_", h, spec.shared_intermediate_size)
    if spec.shared_expert_gate:
        shapes["shared_expert_gate"] = (1, h)
    return shapes


def unit_shapes(spec: ModelSpec, key: WeightKey) -> dict[str, tuple[int, ...]]:
    """Expected shapes of every tensor in a unit (derived from the spec, so from config.json)."""
    h = spec.hidden_size
    if key.part == EMBED:
        return {"weight": (spec.vocab_size, h)}
    if key.part == HEAD:
        return {"norm": (h,), "lm_head": (spec.vocab_size, h)}
    if key.part == ATTN:
        return attention_shapes(spec)
    if key.part == MOE:
        return moe_shapes(spec, key.layer)
    return ffn_shapes("", h, spec.moe_intermediate_size)


def need(config: dict, field: str):
    """A required config.json field, or a CheckpointError naming it."""
    if field not in config or config[field] is None:
        raise CheckpointError(
            f"config.json has no '{field}', which a {config.get('architectures', ['?'])[0]} needs; "
            "re-export the checkpoint's config.json"
        )
    return config[field]


def rope_from_config(config: dict, dim: int, interleave: bool = False) -> RopeSpec:
    """RoPE settings from either `rope_theta`/`rope_scaling` (hub) or `rope_parameters` (transformers 5)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or None
    theta = params.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return RopeSpec(dim=dim, theta=float(theta), interleave=interleave, scaling=scaling)


def eos_ids(config: dict) -> tuple[int, ...]:
    """config.json's eos_token_id (an int or a list) as a tuple."""
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def shared_fields(config: dict, names, eps: float, max_positions: int) -> dict:
    """ModelSpec fields every family reads the same way from config.json (defaults differ)."""
    return dict(
        vocab_size=need(config, "vocab_size"),
        hidden_size=need(config, "hidden_size"),
        num_layers=need(config, "num_hidden_layers"),
        rms_norm_eps=config.get("rms_norm_eps", eps),
        hidden_act=config.get("hidden_act", "silu"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings") or max_positions,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
        names=names,
    )


def gqa_attention(config: dict, **extra) -> AttentionSpec:
    """Grouped-query attention as the Llama-style families configure it; `extra` adds their quirks."""
    heads = need(config, "num_attention_heads")
    head_dim = config.get("head_dim") or need(config, "hidden_size") // heads
    return AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        rope=rope_from_config(config, head_dim),
        **extra,
    )
