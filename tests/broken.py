"""Ways to break a checkpoint directory, each with the words its error message must contain.

Shared by the reader tests (Checkpoint.open raises) and the CLI tests (exit code 2, no traceback).
Every breaker takes a fresh copy of a good checkpoint written by create-model and damages it.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint to damage."""
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | fields))


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite model.safetensors' JSON header in place (padded to its old length)."""
    file = path / "model.safetensors"
    data = file.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= hlen, "the edited header must not grow"
    file.write_bytes(data[:8] + raw.ljust(hlen) + data[8 + hlen :])


def _first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _shard_index(path: Path) -> None:
    """Split nothing: an index that names the real file and one that is not there."""
    weight_map = {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# name -> (damage, words the error message must contain)
BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "corrupt-config": (lambda p: (p / "config.json").write_text('{"architectures": ["Mixtral'), "not valid JSON"),
    "config-not-object": (lambda p: (p / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "config-wrong-type": (lambda p: _edit_config(p, hidden_size="sixty-four"), "hidden_size must be an integer"),
    "unknown-architecture": (lambda p: _edit_config(p, architectures=["LlamaForCausalLM"]), "supported: "),
    "shape-disagrees": (lambda p: _edit_config(p, intermediate_size=96), "config.json implies"),
    "missing-safetensors": (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors"),
    "corrupt-safetensors": (
        lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 4096),
        "corrupt safetensors header",
    ),
    "truncated-safetensors": (_truncate, "is truncated"),
    "corrupt-header-entry": (lambda p: _edit_header(p, lambda h: _first_tensor(h).pop("data_offsets")), "header entry"),
    "byte-range-mismatch": (
        lambda p: _edit_header(p, lambda h: _first_tensor(h).update(shape=[3])),
        "does not fit its shape",
    ),
    "index-names-missing-shard": (_shard_index, "model-00002-of-00002.safetensors"),
    "corrupt-tokenizer": (lambda p: (p / "tokenizer.json").write_text("{broken"), "tokenizer.json cannot be read"),
}
