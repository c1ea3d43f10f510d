"""Read a Hugging Face checkpoint directory lazily: config.json, safetensors headers, byte ranges.

Nothing here loads tensor data until asked: `Checkpoint.open(dir)` parses only the JSON headers
(a few KB per file), so opening a 90 GB checkpoint costs nothing. Every tensor becomes a
`TensorRef` (file, byte offset, dtype, shape), and the model's tensor-name table groups them into
weight units (`WeightKey`), the pieces the store moves.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski.errors import CheckpointError, ConfigError, KlotskiError
from klotski.models import ModelSpec, WeightKey, spec_from_config
from klotski.models.spec import EMBED, EXPERT, HEAD

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# What the modeling code computes with; anything else (int8 / fp8 quantized, fp64) is refused by name.
WEIGHT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
WEIGHT_DTYPE_NAMES = "BF16, F16 or F32"


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one tensor (or a contiguous slice of one) lives on disk."""

    path: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorRef]:
    """Parse one safetensors file's header and check every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-save it")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path} has a corrupt safetensors header (length {hlen}); re-download it")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    base = 8 + hlen
    return {name: _tensor_ref(path, size, base, name, info) for name, info in header.items() if name != "__metadata__"}


def _tensor_ref(path: Path, size: int, base: int, name: str, info) -> TensorRef:
    """One header entry as a TensorRef, after checking it is well formed and inside the file."""
    try:
        dtype_name, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"{path}: the header entry of tensor {name} is corrupt ({info!r}); re-download it"
        ) from None
    if dtype_name not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} has dtype {dtype_name}, which klotski does not run "
            f"(weights must be {WEIGHT_DTYPE_NAMES}); convert the checkpoint to bf16 first"
        )
    dtype = DTYPES[dtype_name]
    if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name} has byte range [{start}, {end}) that does not fit its "
            f"shape {list(shape)} and dtype {dtype_name}; the file is corrupt, re-download it"
        )
    if base + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes; "
            "re-download or re-save the checkpoint"
        )
    return TensorRef(str(path), base + start, end - start, dtype, shape)


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """Read one tensor's bytes from disk into a fresh CPU tensor."""
    buf = bytearray(ref.nbytes)
    with open(ref.path, "rb", buffering=0) as f:
        got = _pread_into(f, buf, ref.offset)
    if got != ref.nbytes:
        raise CheckpointError(f"{ref.path}: short read at byte {ref.offset}; the file changed or is truncated")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=ref.dtype)
    return torch.frombuffer(buf, dtype=ref.dtype).reshape(ref.shape)


def check_finite(tensor: torch.Tensor, name: str, path: str) -> None:
    """A weight holding NaN or inf makes every token after it garbage: refuse it by name."""
    if not tensor.is_floating_point():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(
            f"weight {name} (in {path}) holds {bad} non-finite values (NaN or inf); the checkpoint "
            "is corrupt or was saved after a diverged training step: re-download or re-export it"
        )


def _pread_into(f, buf: bytearray, offset: int) -> int:
    view, done = memoryview(buf), 0
    while done < len(buf):
        chunk = os.preadv(f.fileno(), [view[done:]], offset + done)
        if chunk == 0:
            break
        done += chunk
    return done


def _slice_rows(ref: TensorRef, index: int, row_lo: int, row_hi: int) -> TensorRef:
    """Rows [row_lo, row_hi) of matrix `index` of a [E, R, C] tensor: one contiguous byte range."""
    _, rows, cols = ref.shape
    esize = ref.dtype.itemsize
    offset = ref.offset + (index * rows + row_lo) * cols * esize
    return TensorRef(ref.path, offset, (row_hi - row_lo) * cols * esize, ref.dtype, (row_hi - row_lo, cols))


@dataclass
class Checkpoint:
    """An opened checkpoint directory: config, ModelSpec, and every unit's tensor references."""

    path: Path
    config: dict
    spec: ModelSpec
    units: dict[WeightKey, dict[str, TensorRef]]
    dtype: torch.dtype  # the dominant floating dtype of the weights

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Parse config.json and the safetensors headers; check every unit against config.json."""
        path = Path(path)
        config = load_config(path)
        spec = spec_of(config, path)
        tensors: dict[str, TensorRef] = {}
        for file in safetensors_files(path):
            for name, ref in read_header(file).items():
                if name in tensors:
                    raise CheckpointError(
                        f"tensor {name} is in both {tensors[name].path} and {ref.path}; "
                        "the checkpoint's shards overlap, re-download it"
                    )
                tensors[name] = ref
        check_index(path, tensors)
        units = group_units(spec, tensors)
        check_units(spec, units, path)
        return cls(path, config, spec, units, dominant_dtype(units))

    def unit_nbytes(self, key: WeightKey) -> int:
        """Bytes of one unit as stored."""
        return sum(ref.nbytes for ref in self.units[key].values())

    check_weights: bool = False  # check every weight read for NaN / inf (--check-weights)

    def load_unit(self, key: WeightKey) -> dict[str, torch.Tensor]:
        """Read one unit's tensors from the checkpoint files (checked for NaN / inf when asked)."""
        unit = {local: read_tensor(ref) for local, ref in self.units[key].items()}
        if self.check_weights:
            for local, tensor in unit.items():
                check_finite(tensor, f"{key}.{local}", self.units[key][local].path)
        return unit

    @property
    def nbytes(self) -> int:
        """Bytes of all weights (tied embeddings counted once)."""
        seen = {(r.path, r.offset): r.nbytes for u in self.units.values() for r in u.values()}
        return sum(seen.values())


def load_config(path: Path) -> dict:
    """config.json as a dict, with clear errors for a missing directory or file."""
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass --model the checkpoint's directory ({path.parent})")
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist; pass --model a local checkpoint directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face checkpoint directory needs one")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc}); restore the file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg} is not a JSON object; restore the checkpoint's config.json")
    return config


def spec_of(config: dict, path: Path) -> ModelSpec:
    """spec_from_config, with a field of the wrong type reported as a config.json problem."""
    try:
        return spec_from_config(config)
    except ConfigError as exc:  # name the file the user must fix
        raise ConfigError(str(exc).replace("config.json", str(path / "config.json"), 1)) from None
    except KlotskiError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path / 'config.json'} has a field of the wrong type or value "
            f"({type(exc).__name__}: {exc}); restore the checkpoint's config.json"
        ) from None


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is corrupt ({exc}); re-download it") from None
        bad = [n for n in names if not isinstance(n, str) or not n or Path(n).name != n]
        if bad or not all(isinstance(k, str) for k in weight_map):
            raise CheckpointError(
                f"{index} is corrupt: its weight_map must map tensor names to file names in "
                f"the checkpoint directory (got {(bad or list(weight_map))[0]!r:.60}); re-download it"
            )
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names files that are missing: {', '.join(missing)}; download them")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files; klotski reads safetensors checkpoints only")
    return files


def group_units(spec: ModelSpec, tensors: dict[str, TensorRef]) -> dict[WeightKey, dict[str, TensorRef]]:
    """Group checkpoint tensors into weight units via the family's name table."""
    units: dict[WeightKey, dict[str, TensorRef]] = {}
    unknown = []
    for name, ref in tensors.items():
        if _extra_layer(spec, name):
            continue
        match = spec.names.match(name)
        if match is None:
            unknown.append(name)
            continue
        rule, layer, expert = match
        if rule.fused:
            _split_fused(spec, units, rule.fused, layer, ref, name)
        else:
            units.setdefault(WeightKey(layer, rule.part, expert), {})[rule.local] = ref
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors do not belong to a {spec.architecture}, e.g. {unknown[0]!r}; "
            "is config.json for this checkpoint?"
        )
    head = units.setdefault(WeightKey(None, HEAD), {})
    if "lm_head" not in head and WeightKey(None, EMBED) in units:
        if not spec.tie_word_embeddings:
            raise CheckpointError("the checkpoint has no lm_head.weight and config.json does not tie embeddings")
        head["lm_head"] = units[WeightKey(None, EMBED)]["weight"]
    return units


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _extra_layer(spec: ModelSpec, name: str) -> bool:
    """A tensor of a trailing layer the model does not run (e.g. DeepSeek-V3's MTP layer)."""
    m = _LAYER.match(name)
    return bool(m) and spec.num_layers <= int(m.group(1)) < spec.num_layers + spec.extra_layers


def _split_fused(spec, units, fused: str, layer: int, ref: TensorRef, name: str) -> None:
    """Split a fused [E, ...] expert tensor into per-expert references (no data is read)."""
    if len(ref.shape) != 3 or ref.shape[0] != spec.num_experts:
        raise CheckpointError(
            f"{name} has shape {list(ref.shape)}; expected [{spec.num_experts}, ..., ...] per config.json"
        )
    for e in range(spec.num_experts):
        unit = units.setdefault(WeightKey(layer, EXPERT, e), {})
        if fused == "down":
            unit["down_proj"] = _slice_rows(ref, e, 0, ref.shape[1])
        else:
            inter = ref.shape[1] // 2
            unit["gate_proj"] = _slice_rows(ref, e, 0, inter)
            unit["up_proj"] = _slice_rows(ref, e, inter, 2 * inter)


def check_index(path: Path, tensors: dict[str, TensorRef]) -> None:
    """Every tensor model.safetensors.index.json names is in the file it names."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, file in weight_map.items():
        ref = tensors.get(name)
        if ref is None:
            raise CheckpointError(
                f"{index} lists tensor {name} in {file}, but no shard holds it; "
                "the checkpoint is incomplete, re-download it"
            )
        if Path(ref.path).name != Path(file).name:
            raise CheckpointError(
                f"{index} lists tensor {name} in {file}, but it is in {Path(ref.path).name}; "
                "the index and the shards disagree, re-download it"
            )


def check_units(spec: ModelSpec, units: dict[WeightKey, dict[str, TensorRef]], path: Path) -> None:
    """Every unit the spec expects is present with the shapes config.json implies, in a dtype the
    model computes with, and no unit belongs to a layer or expert config.json does not have."""
    expected_keys = set(spec.weight_keys())
    for key in sorted(set(units) - expected_keys, key=str):
        raise CheckpointError(
            f"{path}: the checkpoint has weights for {_describe(key)}, which config.json does not "
            f"have ({_config_counts(spec)}); the config and the weights disagree"
        )
    for key in spec.weight_keys():
        expected = spec.unit_shapes(key)
        got = units.get(key, {})
        for local, shape in expected.items():
            if local not in got:
                raise CheckpointError(f"{path}: weight {key}.{local} is missing; the checkpoint is incomplete")
            if tuple(got[local].shape) != tuple(shape):
                raise CheckpointError(
                    f"{path}: {key}.{local} has shape {list(got[local].shape)} but config.json implies {list(shape)}; "
                    "the config and the weights disagree"
                )
        extra = set(got) - set(expected)
        if extra:
            raise CheckpointError(f"{path}: unexpected tensors in {key}: {sorted(extra)}; does config.json match?")
        for local, ref in got.items():
            if ref.dtype not in WEIGHT_DTYPES:
                name = next((n for n, t in DTYPES.items() if t == ref.dtype), str(ref.dtype))
                raise CheckpointError(
                    f"{path}: weight {key}.{local} is stored as {name}; klotski runs "
                    f"{WEIGHT_DTYPE_NAMES} weights (quantized checkpoints are not supported): "
                    "use the model's bf16 release or dequantize it"
                )


def _describe(key: WeightKey) -> str:
    if key.expert is not None:
        return f"expert {key.expert} of layer {key.layer}"
    return f"layer {key.layer}" if key.layer is not None else key.part


def _config_counts(spec: ModelSpec) -> str:
    dense = [i for i, moe in enumerate(spec.moe_layers) if not moe]
    return f"{spec.num_layers} layers, {spec.num_experts} experts per MoE layer" + (
        f", dense layers {dense}" if dense else ""
    )


def dominant_dtype(units: dict[WeightKey, dict[str, TensorRef]]) -> torch.dtype:
    """The floating dtype holding most bytes (the checkpoint's dtype)."""
    totals: dict[torch.dtype, int] = {}
    for unit in units.values():
        for ref in unit.values():
            if ref.dtype.is_floating_point:
                totals[ref.dtype] = totals.get(ref.dtype, 0) + ref.nbytes
    return max(totals, key=totals.get) if totals else torch.float32
