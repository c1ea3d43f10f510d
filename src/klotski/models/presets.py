"""Shapes for `klotski create-model`: tiny test shapes and real models' shapes, per family.

Each preset is the config.json (transformers' field names) of a model; `--layers` overrides
the layer count, so a real model's layer shapes fit on a small disk.
"""
from __future__ import annotations

import importlib

from klotski.errors import KlotskiError
from klotski.models.mixtral import FAMILY_PRESETS as _MIXTRAL

# create-model family name -> (base config.json fields, {preset name: fields}). Each family
# module exports FAMILY_PRESETS; the first preset of a family is its default (a tiny shape).
PRESET_MODULES = ("qwen_moe", "deepseek", "olmoe")


def _all_presets() -> dict[str, tuple[dict, dict[str, dict]]]:
    table = dict(_MIXTRAL)
    for name in PRESET_MODULES:
        try:
            module = importlib.import_module(f"klotski.models.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"klotski.models.{name}":
                continue
            raise
        table |= module.FAMILY_PRESETS
    return table


def families() -> list[str]:
    """Families create-model can write."""
    return sorted(_all_presets())


def preset_config(family: str, preset: str | None = None, layers: int | None = None, **overrides) -> dict:
    """config.json for a family's preset (default: its first, tiny one), with overrides."""
    table = _all_presets()
    if family not in table:
        raise KlotskiError(f"unknown family {family!r}; choose one of: {', '.join(families())}")
    base, presets = table[family]
    preset = preset or next(iter(presets))
    if preset not in presets:
        raise KlotskiError(f"unknown preset {preset!r} for {family}; choose one of: {', '.join(presets)}")
    config = dict(base) | dict(presets[preset])
    if layers is not None:
        if layers < 1:
            raise KlotskiError(f"--layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
    return config | overrides
