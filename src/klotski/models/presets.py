"""Shapes for `klotski create-model`: tiny test shapes and real models' shapes, per family.

Each preset is the config.json (transformers' field names) of a model; `--layers` overrides
the layer count, so a real model's layer shapes fit on a small disk.
"""
from __future__ import annotations

from klotski.errors import KlotskiError

# family -> base config.json fields every preset of the family shares
FAMILY_BASE: dict[str, dict] = {
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "router_jitter_noise": 0.0, "attention_dropout": 0.0,
    },
}

# family -> preset name -> fields
PRESETS: dict[str, dict[str, dict]] = {
    "mixtral": {
        "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
                 "num_experts_per_tok": 2, "max_position_embeddings": 4096},
        "mixtral-8x7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768},
        "mixtral-8x22b": {"vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                          "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                          "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536},
    },
}


def families() -> list[str]:
    """Families create-model can write."""
    return sorted(PRESETS)


def preset_config(family: str, preset: str | None = None, layers: int | None = None, **overrides) -> dict:
    """config.json for a family's preset (default: its first, tiny one), with overrides."""
    if family not in PRESETS:
        raise KlotskiError(f"unknown family {family!r}; choose one of: {', '.join(families())}")
    presets = PRESETS[family]
    preset = preset or next(iter(presets))
    if preset not in presets:
        raise KlotskiError(f"unknown preset {preset!r} for {family}; choose one of: {', '.join(presets)}")
    config = dict(FAMILY_BASE[family]) | dict(presets[preset])
    if layers is not None:
        if layers < 1:
            raise KlotskiError(f"--layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
    return config | overrides
