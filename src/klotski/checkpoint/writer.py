"""Write random-weight checkpoints of any shape, streaming: one tensor in memory at a time.

Used by `klotski create-model`, the tests and the benchmarks. The safetensors library saves
only whole in-memory state dicts; a multi-GB checkpoint must stream, so the (simple) format is
written here: an 8-byte header length, a JSON header, then the tensors' bytes in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from klotski.checkpoint.reader import DTYPES
from klotski.config import format_bytes
from klotski.errors import KlotskiError
from klotski.models import ModelSpec, WeightKey, spec_from_config

ST_NAMES = {v: k for k, v in DTYPES.items()}
SHARD_BYTES = 4 << 30  # shard size, as the hub's checkpoints do


def checkpoint_names(spec: ModelSpec, key: WeightKey) -> dict[str, str]:
    """Hub-layout tensor names for one unit: local name -> checkpoint name (the family's preferred rule)."""
    names = {}
    for rule in spec.names.rules:  # later rules win: a family lists its own names last
        if rule.part != key.part or rule.fused:
            continue
        names[rule.local] = rule.template.format(L=key.layer, E=key.expert)
    return names


def init_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A deterministic random tensor: norms are ones, biases small, matrices N(0, 0.02) (HF's init)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    std = 0.02
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def plan_tensors(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every (checkpoint name, shape) of the model, in execution order."""
    out = []
    for key in spec.weight_keys():
        names = checkpoint_names(spec, key)
        for local, shape in spec.unit_shapes(key).items():
            if key.part == "head" and local == "lm_head" and spec.tie_word_embeddings:
                continue
            out.append((names[local], tuple(shape)))
    return out


def _shards(tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nbytes = dtype.itemsize * _numel(shape)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    return shards + [cur] if cur else shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(out: str | os.PathLike, config: dict, dtype: torch.dtype, seed: int = 0, progress=None) -> Path:
    """Write config.json and random weights (sharded safetensors + index) for `config`."""
    out = Path(out)
    spec = spec_from_config(config)
    tensors = plan_tensors(spec)
    total = sum(dtype.itemsize * _numel(s) for _, s in tensors)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < total:
        raise KlotskiError(
            f"{out} has {format_bytes(free)} free but the checkpoint needs {format_bytes(total)}; "
            "free space or choose another --out"
        )
    shards = _shards(tensors, dtype)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / fname, shard, dtype, seed, progress)
        weight_map |= {name: fname for name, _ in shard}
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config, torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _write_shard(path: Path, shard, dtype: torch.dtype, seed: int, progress) -> None:
    """Header first (sizes are known from shapes), then each tensor generated and written in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shard:
            tensor = init_tensor(name, shape, dtype, seed)
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            if progress is not None:
                progress(tensor.nbytes)
    os.replace(tmp, path)
