"""Checkpoint reading: clear errors for every kind of broken directory, and sharded checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from klotski import LLM
from klotski.checkpoint.reader import Checkpoint
from klotski.errors import CheckpointError, KlotskiError, UnsupportedModelError
from klotski.models import supported_architectures
from klotski.tokenizer import write_tokenizer
from tests.broken import BREAKAGES, copy_checkpoint
from tests.reference import PROMPTS, make_reference, reference_logits

# The tokenizer is not the reader's business: the engine test covers it.
READER_BREAKAGES = sorted(set(BREAKAGES) - {"corrupt-tokenizer"})


def test_opens_a_good_checkpoint(tiny_mixtral):
    ckpt = Checkpoint.open(tiny_mixtral)
    assert ckpt.spec.architecture == "MixtralForCausalLM"
    assert ckpt.dtype == torch.float32
    assert ckpt.nbytes > 0


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


@pytest.mark.parametrize("name", READER_BREAKAGES)
def test_broken_checkpoint_is_a_clear_error(name, tiny_mixtral, tmp_path):
    damage, words = BREAKAGES[name]
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    damage(path)
    with pytest.raises(KlotskiError) as err:
        Checkpoint.open(path)
    assert words in str(err.value)


def test_unknown_architecture_lists_supported(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    BREAKAGES["unknown-architecture"][0](path)
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint.open(path)
    assert "LlamaForCausalLM" in str(err.value)
    assert all(arch in str(err.value) for arch in supported_architectures())


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory):
    """The same reference model saved as one file and as many 50 KB shards with an index."""
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model = make_reference("mixtral", single)
    model.save_pretrained(sharded, max_shard_size="50KB", save_original_format=True)
    write_tokenizer(sharded, model.config.vocab_size)
    return model, single, sharded


def test_sharded_checkpoint_matches_single_file(single_and_sharded):
    model, single, sharded = single_and_sharded
    assert len(list(sharded.glob("*.safetensors"))) > 3
    assert (sharded / "model.safetensors.index.json").is_file()
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    one = LLM(model=str(single), dtype="float32").prompt_logits(prompts)
    many = LLM(model=str(sharded), dtype="float32").prompt_logits(prompts)
    for a, b, ref in zip(one, many, reference_logits(model, PROMPTS)):
        assert torch.equal(a, b)
        assert (b - ref).abs().max().item() < 1e-4


def test_index_naming_a_missing_shard(single_and_sharded, tmp_path):
    _, _, sharded = single_and_sharded
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (path / gone).unlink()
    with pytest.raises(CheckpointError, match=gone):
        Checkpoint.open(path)


def test_deepseek_v3_mtp_layers_are_skipped_like_the_reference(tmp_path):
    """V3 hub checkpoints carry a multi-token-prediction layer after the last; it is not run."""
    from safetensors.torch import load_file, save_file

    from klotski.commands.create_model import create_model

    path = create_model(tmp_path / "v3", "deepseek_v3", dtype="float32")
    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    weights = load_file(path / "model.safetensors")
    weights[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not belong"):
        Checkpoint.open(path)  # without the config's say-so, an extra layer is an error
    (path / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    assert Checkpoint.open(path).spec.num_layers == layers
