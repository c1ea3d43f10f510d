"""Shapes for `klotski create-model`: tiny test shapes and real models' shapes, per family.

Each preset is the config.json (transformers' field names) of a model; `--layers` overrides
the layer count, so a real model's layer shapes fit on a small disk.
"""

from __future__ import annotations

from klotski.errors import KlotskiError
from klotski.models import FAMILIES


def _all_presets() -> dict[str, tuple[dict, dict[str, dict]]]:
    """create-model family name -> (base config.json fields, {preset name: fields}); a family's
    first preset is its default (a tiny shape)."""
    table: dict = {}
    for module in FAMILIES:
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
