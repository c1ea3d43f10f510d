"""Weights: dtypes the model cannot compute with, tensors config.json does not have, index
entries naming absent tensors, and NaN / inf found where they are first read (repack path,
--check-weights) or, failing that, in the logits, before any token is emitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from klotski import LLM, SamplingParams
from klotski.checkpoint.reader import Checkpoint
from klotski.errors import CheckpointError, NumericalError
from tests.broken import _edit_config, copy_checkpoint
from tests.cli_helpers import assert_one_error, run_cli

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1.weight"


def _rewrite(path: Path, edit) -> None:
    """Load model.safetensors, let edit() change the dict of tensors, save it again."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.fixture
def ckpt(tiny_mixtral, tmp_path) -> Path:
    return copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")


def _shard(path: Path, second: set[str]) -> dict:
    """Split model.safetensors into two shards (`second` in the other one) with an index."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    a = {k: v for k, v in tensors.items() if k not in second}
    b = {k: v for k, v in tensors.items() if k in second}
    save_file(a, path / "model-00001-of-00002.safetensors")
    save_file(b, path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    return weight_map


def _write_index(path: Path, weight_map: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# name -> (damage, words)
DAMAGE = {
    "int8-weight": (
        lambda p: _rewrite(p, lambda t: t.__setitem__(EXPERT, t[EXPERT].to(torch.int8))),
        "is stored as I8; klotski runs BF16, F16 or F32 weights",
    ),
    "fp64-weight": (lambda p: _rewrite(p, lambda t: t.__setitem__(EXPERT, t[EXPERT].double())), "is stored as F64"),
    "fp8-weight": (
        lambda p: _rewrite(p, lambda t: t.__setitem__(EXPERT, t[EXPERT].to(torch.float8_e4m3fn))),
        "has dtype F8_E4M3, which klotski does not run",
    ),
    "layer-config-lacks": (
        lambda p: _edit_config(p, num_hidden_layers=1),
        "has weights for layer 1, which config.json does not have (1 layers",
    ),
    "expert-config-lacks": (
        lambda p: _rewrite(
            p, lambda t: t.__setitem__("model.layers.1.block_sparse_moe.experts.8.w1.weight", t[EXPERT].clone())
        ),
        "has weights for expert 8 of layer 1",
    ),
    "index-names-absent-tensor": (
        lambda p: _write_index(
            p, _shard(p, {"lm_head.weight"}) | {"model.layers.0.extra.weight": "model-00002-of-00002.safetensors"}
        ),
        "lists tensor model.layers.0.extra.weight in model-00002-of-00002.safetensors, but no shard holds it",
    ),
    "index-names-wrong-shard": (
        lambda p: _write_index(
            p,
            _shard(p, {"lm_head.weight", "model.norm.weight"}) | {"lm_head.weight": "model-00001-of-00002.safetensors"},
        ),
        "lists tensor lm_head.weight in model-00001-of-00002.safetensors, but it is in",
    ),
    "index-non-string-file": (
        lambda p: _write_index(p, _shard(p, {"lm_head.weight"}) | {"lm_head.weight": 7}),
        "is corrupt",
    ),
    "index-path-outside": (
        lambda p: _write_index(
            p, _shard(p, {"lm_head.weight"}) | {"lm_head.weight": "../model-00002-of-00002.safetensors"}
        ),
        "file names in the checkpoint directory",
    ),
    "index-not-json": (
        lambda p: (_shard(p, set()), (p / "model.safetensors.index.json").write_bytes(b"\xff\xfe{")),
        "is corrupt",
    ),
    "overlapping-shards": (
        lambda p: (
            _write_index(p, _shard(p, {"lm_head.weight"})),
            save_file(
                load_file(p / "model-00001-of-00002.safetensors") | {"lm_head.weight": torch.zeros(512, 64)},
                p / "model-00001-of-00002.safetensors",
            ),
        ),
        "is in both",
    ),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_refused_by_name(name, ckpt):
    damage, words = DAMAGE[name]
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(ckpt)
    assert words in str(err.value)


@pytest.mark.parametrize("name", ["int8-weight", "layer-config-lacks", "index-names-absent-tensor"])
def test_refused_in_one_cli_line(capsys, name, ckpt):
    DAMAGE[name][0](ckpt)
    code, out, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "Hello")
    assert_one_error(code, err, DAMAGE[name][1])
    assert out == ""


def _poison(path: Path, name: str, value: float) -> None:
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[5] = value

    _rewrite(path, edit)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_weights_names_the_weight(ckpt, value):
    _poison(ckpt, "lm_head.weight", value)
    llm = LLM(str(ckpt), check_weights=True)
    with pytest.raises(CheckpointError, match=r"weight head.lm_head .* holds 1 non-finite values"):
        llm.generate(["Hello"], GREEDY)


def test_repacking_finds_a_nan_weight(ckpt, tmp_path):
    """On the offload path every weight is read once to repack it: the NaN is found there, unasked."""
    _poison(ckpt, EXPERT, float("nan"))
    with pytest.raises(CheckpointError, match=r"weight L0.expert3.gate_proj .* non-finite"):
        LLM(str(ckpt), offload_dir=str(tmp_path / "off"), device_memory="700KB", batch_size=1, num_batches=1)


def test_nan_logits_stop_the_run_instead_of_emitting_tokens(ckpt):
    """Without --check-weights the NaN reaches the logits: the run stops (greedy argmax would
    silently return token 0 for every step)."""
    _poison(ckpt, "lm_head.weight", float("nan"))
    llm = LLM(str(ckpt))
    with pytest.raises(NumericalError, match="non-finite logits .* --check-weights"):
        llm.generate(["Hello"], GREEDY)


def test_nan_logits_stop_scoring_too(ckpt):
    _poison(ckpt, "lm_head.weight", float("nan"))
    with pytest.raises(NumericalError, match="while scoring prompts 0..0"):
        LLM(str(ckpt)).prompt_logits(["Hello"])


def test_nan_cli_errors_leave_earlier_results_intact(capsys, ckpt, tmp_path):
    _poison(ckpt, "lm_head.weight", float("nan"))
    out_file = tmp_path / "out.jsonl"
    out_file.write_text('{"id": "earlier", "text": "kept"}\n')
    code, out, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "Hello", "--output", str(out_file))
    assert_one_error(code, err, "non-finite logits")
    assert out_file.read_text() == '{"id": "earlier", "text": "kept"}\n'
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "Hello", "--check-weights")
    assert_one_error(code, err, "weight head.lm_head", "non-finite", "re-download")
