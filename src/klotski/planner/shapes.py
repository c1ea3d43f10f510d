"""What the planner needs to know about a model, from config.json alone (no weights are read).

Unit sizes come from the spec's expected shapes and the checkpoint's storage dtype, so a
what-if plan for a 140 GB model costs a JSON parse. FLOPs per op are derived from parameter
counts, which keeps the planner free of any per-family branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski.checkpoint.reader import DTYPES, load_config, spec_of
from klotski.config import DTYPES as NAMED_DTYPES
from klotski.errors import KlotskiError
from klotski.models.spec import ATTN, EXPERT, HEAD, MOE, ModelSpec, WeightKey
from klotski.store.offload import round_up

# T = tokens, C = context (keys attended), H = hidden


@dataclass(frozen=True)
class ModelShape:
    """A model as the planner sees it: spec, storage dtype and bytes of every weight unit."""

    name: str
    spec: ModelSpec
    weight_dtype: torch.dtype
    unit_bytes: dict[WeightKey, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.unit_bytes.values())

    def padded(self, key: WeightKey) -> int:
        """Bytes a fetched unit occupies (offload blobs are padded to the O_DIRECT block)."""
        return round_up(self.unit_bytes[key])

    def params(self, key: WeightKey, exclude_norms: bool = True) -> int:
        """Parameters of one unit (its matmul weights when exclude_norms)."""
        shapes = self.spec.unit_shapes(key)
        return sum(math.prod(s) for n, s in shapes.items() if not (exclude_norms and len(s) == 1))

    def expert_bytes(self) -> int:
        return max((b for k, b in self.unit_bytes.items() if k.part == EXPERT), default=0)

    def moe_layers(self) -> list[int]:
        return [l for l in range(self.spec.num_layers) if self.spec.moe_layers[l]]

    def shape_key(self) -> str:
        """Identifies the op shapes a measured profile holds (hidden, expert width, heads, vocab)."""
        s, a = self.spec, self.spec.attention
        return (
            f"{s.family}-h{s.hidden_size}-i{s.moe_intermediate_size}-e{s.num_experts}k{s.top_k}"
            f"-a{a.num_heads}x{a.qk_head_dim}kv{a.num_kv_heads}-v{s.vocab_size}"
        )

    # -- FLOPs per op (2 per multiply-add) --------------------------------------------------
    def attention_flops(self, tokens: int, context: int) -> float:
        """Projections over T tokens plus scores and values over C keys per token."""
        a = self.spec.attention
        proj = 2 * tokens * self.params(WeightKey(0, ATTN))
        scores = 2 * tokens * context * a.num_heads * (a.qk_head_dim + a.v_head_dim)
        return float(proj + scores)

    def expert_flops(self, tokens: int) -> float:
        return float(2 * tokens * self.params(WeightKey(self.moe_layers()[0], EXPERT, 0))) if self.moe_layers() else 0.0

    def gate_flops(self, tokens: int) -> float:
        layer = self.moe_layers()[0] if self.moe_layers() else 0
        return float(2 * tokens * self.params(WeightKey(layer, MOE)))

    def dense_flops(self, tokens: int) -> float:
        dense = [l for l in range(self.spec.num_layers) if not self.spec.moe_layers[l]]
        return float(2 * tokens * self.params(WeightKey(dense[0], MOE))) if dense else 0.0

    def head_flops(self, tokens: int) -> float:
        return float(2 * tokens * self.spec.hidden_size * self.spec.vocab_size)


def shape_from_config(config: dict, name: str = "model", path: Path | None = None) -> ModelShape:
    """A ModelShape from a config.json dict (torch_dtype gives the storage dtype, default bf16)."""
    spec = spec_of(config, path or Path(name))
    dtype = _storage_dtype(config)
    units = {k: sum(math.prod(s) for s in spec.unit_shapes(k).values()) * dtype.itemsize for k in spec.weight_keys()}
    if spec.tie_word_embeddings:  # lm_head shares the embedding: only the final norm is extra
        units[WeightKey(None, HEAD)] = spec.hidden_size * dtype.itemsize
    return ModelShape(name, spec, dtype, units)


def shape_from_dir(path: str | Path) -> ModelShape:
    """A ModelShape from a checkpoint directory's config.json (weights are never opened)."""
    path = Path(path)
    return shape_from_config(load_config(path), path.name, path)


def shape_from_preset(preset: str, layers: int | None = None) -> ModelShape:
    """A ModelShape from a create-model preset name such as mixtral-8x7b (family guessed from it)."""
    from klotski.models.presets import _all_presets, preset_config

    for family, (_, presets) in _all_presets().items():
        if preset in presets:
            return shape_from_config(preset_config(family, preset, layers) | {"torch_dtype": "bfloat16"}, preset)
    raise KlotskiError(f"unknown preset {preset!r}; e.g. mixtral-8x7b, mixtral-8x22b")


def _storage_dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    dtype = NAMED_DTYPES.get(str(name)) or DTYPES.get(str(name).upper())
    if dtype is None:
        raise KlotskiError(f"config.json torch_dtype {name!r} is not a weight dtype this engine reads")
    return dtype
