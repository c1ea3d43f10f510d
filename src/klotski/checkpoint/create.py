"""Random-weight checkpoints of any family and shape, with a tokenizer (`klotski create-model`,
the built-in default model, tests and benchmarks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from klotski.config import DTYPES
from klotski.errors import KlotskiError


def create_model(
    out: str | Path,
    family: str,
    preset: str | None = None,
    layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = False,
    tokenizer_model: str | Path | None = None,
    **overrides,
) -> Path:
    """Write config.json, generation_config.json, safetensors weights and a tokenizer to `out`."""
    from klotski.checkpoint.writer import write_checkpoint
    from klotski.models.presets import preset_config
    from klotski.spm_tokenizer import write_spm_tokenizer
    from klotski.tokenizer import DEFAULT_CHAT_TEMPLATE, write_tokenizer

    if dtype not in DTYPES:
        raise KlotskiError(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    config = preset_config(family, preset, layers, **overrides)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KlotskiError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is not None:  # a real SentencePiece model, copied with a matching tokenizer.json
        special = write_spm_tokenizer(out, tokenizer_model, config["vocab_size"], DEFAULT_CHAT_TEMPLATE)
    else:
        special = write_tokenizer(out, config["vocab_size"])  # the tokenizer decides bos/eos ids
    config |= {k: special[k] for k in ("bos_token_id", "eos_token_id")}
    with _progress_bar(config, DTYPES[dtype], progress) as bar:
        write_checkpoint(out, config, DTYPES[dtype], seed, bar.update)
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _progress_bar(config: dict, dtype, enabled: bool) -> tqdm:
    """Bytes written of the whole checkpoint (disabled: a bar that prints nothing)."""
    from klotski.checkpoint.writer import _numel, plan_tensors
    from klotski.models import spec_from_config

    total = sum(_numel(s) for _, s in plan_tensors(spec_from_config(config))) * dtype.itemsize
    return tqdm(total=total, unit="B", unit_scale=True, desc="writing", file=sys.stderr, disable=not enabled)
