"""config.json validation: every value the modeling code cannot run with is a ConfigError naming
the field and the fix, before anything is loaded; `generate` and `plan` give it in one line."""

from __future__ import annotations

import json

import pytest

from klotski.errors import ConfigError, KlotskiError, UnsupportedModelError
from klotski.models import spec_from_config
from klotski.models.presets import preset_config
from tests.broken import copy_checkpoint
from tests.cli_helpers import assert_one_error, run_cli

DROP = object()  # remove the field

# (family, field edits, words the message must hold)
CASES = [
    # the examples
    ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be between 1 and the number of experts (8)"),
    ("mixtral", {"num_hidden_layers": 0}, "num_hidden_layers=0 is out of range"),
    ("deepseek_v3", {"n_group": 3}, "n_group=3 does not divide the 8 routed experts"),
    ("deepseek_v3", {"topk_group": 5}, "topk_group=5 must be between 1 and n_group=4"),
    ("olmoe", {"clip_qkv": -1.0}, "clip_qkv=-1.0 must be positive"),
    ("mixtral", {"architectures": DROP}, 'add "architectures": ["MixtralForCausalLM"]'),
    # more: counts, types, relations
    ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok=0 is out of range"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts=0 is out of range"),
    ("mixtral", {"num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000 is out of range"),
    ("mixtral", {"num_hidden_layers": 5000}, "more than 4096"),
    ("mixtral", {"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
    ("mixtral", {"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ("mixtral", {"vocab_size": -5}, "vocab_size=-5 is out of range"),
    ("mixtral", {"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("mixtral", {"num_key_value_heads": 8}, "is not a multiple of num_key_value_heads=8"),
    ("mixtral", {"head_dim": 15}, "rotary dimension (head_dim) is 15"),
    ("mixtral", {"rms_norm_eps": 0.0}, "rms_norm_eps=0.0 must be positive"),
    ("mixtral", {"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number"),
    ("mixtral", {"rope_theta": -1.0}, "rope_theta=-1.0 must be positive"),
    ("mixtral", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic' is not supported"),
    ("mixtral", {"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling factor 0 must be a positive number"),
    ("mixtral", {"rope_scaling": "yarn"}, "rope_scaling must be an object or null"),
    ("mixtral", {"hidden_act": "swish2"}, "hidden_act 'swish2' is not supported"),
    ("mixtral", {"sliding_window": -3}, "sliding_window=-3 is out of range"),
    ("mixtral", {"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ("mixtral", {"eos_token_id": 600}, "eos_token_id=600 is outside the vocabulary (0..511)"),
    ("mixtral", {"eos_token_id": "</s>"}, "eos_token_id must be a token id or a list of them"),
    ("mixtral", {"bos_token_id": 512}, "bos_token_id=512 is outside the vocabulary"),
    ("mixtral", {"max_position_embeddings": 0}, "max_position_embeddings=0 is out of range"),
    ("mixtral", {"architectures": []}, "'architectures' must be a non-empty list"),
    ("mixtral", {"architectures": "MixtralForCausalLM"}, "'architectures' must be a non-empty list"),
    ("mixtral", {"architectures": DROP, "model_type": DROP}, "add the model's class, one of:"),
    ("deepseek_v3", {"num_experts_per_tok": 5}, "num_experts_per_tok=5 is more than the 4 experts in the topk_group=2"),
    ("deepseek_v3", {"n_group": 8, "topk_group": 4}, "leaves one expert per group"),
    ("deepseek_v3", {"first_k_dense_replace": 7}, "first_k_dense_replace=7 is more than num_hidden_layers=3"),
    ("deepseek_v3", {"first_k_dense_replace": 3}, "no layer has routed experts"),
    ("deepseek_v3", {"qk_rope_head_dim": 7}, "rotary dimension (qk_rope_head_dim) is 7"),
    ("deepseek_v3", {"kv_lora_rank": 0}, "kv_lora_rank=0 is out of range"),
    ("deepseek_v3", {"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a finite number"),
    ("deepseek_v3", {"n_shared_experts": -1}, "n_shared_experts=-1 is out of range"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 3}, "n_group=3 does not divide"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step=0 is out of range"),
    ("qwen2_moe", {"mlp_only_layers": [0, 9]}, "mlp_only_layers names layer 9"),
    ("qwen2_moe", {"mlp_only_layers": "0,1"}, "mlp_only_layers must be a list"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0 is out of range"),
    ("qwen3_moe", {"num_experts": 0}, "num_experts=0 is out of range"),
    ("qwen3_moe", {"norm_topk_prob": 1}, "norm_topk_prob must be true or false"),
    ("olmoe", {"clip_qkv": float("inf")}, "clip_qkv must be a finite number"),
    ("olmoe", {"num_attention_heads": 0}, "num_attention_heads=0 is out of range"),
]


def _config(family: str, edits: dict) -> dict:
    config = preset_config(family)
    for k, v in edits.items():
        if v is DROP:
            config.pop(k, None)
        else:
            config[k] = v
    return config


def test_the_tiny_presets_pass():
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"):
        spec_from_config(preset_config(family))


@pytest.mark.parametrize("family,edits,words", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CASES])
def test_bad_config_is_a_config_error(family, edits, words):
    with pytest.raises(KlotskiError) as err:
        spec_from_config(_config(family, edits))
    assert isinstance(err.value, (ConfigError, UnsupportedModelError))
    assert words in str(err.value)


def test_missing_architectures_is_not_called_unsupported():
    with pytest.raises(ConfigError) as err:
        spec_from_config(_config("mixtral", {"architectures": DROP}))
    assert "unsupported" not in str(err.value) and "has no 'architectures'" in str(err.value)


@pytest.mark.parametrize(
    "edits,words",
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
        ({"architectures": DROP}, "has no 'architectures'"),
        ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "plan"])
def test_cli_says_it_in_one_line_before_loading(capsys, tiny_mixtral, tmp_path, command, edits, words):
    """generate and plan apply the same checks; the message names the file to fix."""
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    for k, v in edits.items():
        config.pop(k) if v is DROP else config.__setitem__(k, v)
    (path / "config.json").write_text(json.dumps(config))
    argv = (
        ["generate", "--model", str(path), "--prompt", "Hello"]
        if command == "generate"
        else ["plan", "--model", str(path), "--device-memory", "1GiB", "--hardware", "env1"]
    )
    code, out, err = run_cli(capsys, *argv)
    line = assert_one_error(code, err, words)
    assert str(path / "config.json") in line or "architectures" in line
    assert out == ""
