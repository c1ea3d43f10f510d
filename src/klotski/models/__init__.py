"""Model families as data: config.json -> ModelSpec (+ tensor-name table)."""

from __future__ import annotations

from klotski.errors import ConfigError, KlotskiError, UnsupportedModelError
from klotski.models import deepseek, mixtral, olmoe, qwen_moe, validate
from klotski.models.spec import ModelSpec, WeightKey

# Each family module exports ARCHITECTURES, spec_from_config(config) and FAMILY_PRESETS.
FAMILIES = (mixtral, qwen_moe, deepseek, olmoe)


def _registry() -> dict[str, object]:
    return {arch: module for module in FAMILIES for arch in module.ARCHITECTURES}


def supported_architectures() -> list[str]:
    """Architectures (config.json `architectures`) this engine runs."""
    return sorted(_registry())


def spec_from_config(config: dict) -> ModelSpec:
    """The ModelSpec for a parsed config.json, checked against what the modeling code needs
    (models/validate.py), or a clear error listing what is supported."""
    archs = validate.check_architectures(config, supported_architectures())
    # A null field means its default everywhere the families read one (they read with .get).
    config = {k: v for k, v in config.items() if v is not None}
    registry = _registry()
    for arch in archs:
        if arch in registry:
            validate.check_fields(config)
            try:
                spec = registry[arch].spec_from_config(config)
            except KlotskiError:
                raise
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
                raise ConfigError(
                    f"config.json has a field of the wrong type or value ({type(exc).__name__}: "
                    f"{exc}); restore the checkpoint's config.json"
                ) from None
            validate.check_spec(spec, config)
            return spec
    raise UnsupportedModelError(
        f"unsupported architecture {archs!r}; supported: " + ", ".join(supported_architectures())
    )


__all__ = ["ModelSpec", "WeightKey", "spec_from_config", "supported_architectures"]
