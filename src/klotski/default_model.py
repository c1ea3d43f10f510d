"""The embedded default model: a small random-weight Mixtral, created deterministically on first use.

Lives under $KLOTSKI_HOME (else ~/.cache/klotski). Its text is meaningless: it exists so that
`klotski generate` and `make run` work on a fresh machine with no download.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from klotski.paths import home

DEFAULT_NAME = "default-mixtral-random-v1"
# Small enough to create in about a second, large enough to exercise every part of the engine.
DEFAULT_SHAPE = {"preset": "tiny", "layers": 4, "hidden_size": 256, "intermediate_size": 512,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024}
NOTICE = ("note: using the built-in default model: a small Mixtral-architecture checkpoint with RANDOM "
          "weights, so its text is meaningless. Pass --model DIR to run a real checkpoint.")


def ensure_default_model() -> Path:
    """The default checkpoint's directory, creating it (atomically) on first use."""
    from klotski.checkpoint.create import create_model

    path = home() / "models" / DEFAULT_NAME
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".creating-"))
    shape = dict(DEFAULT_SHAPE)
    create_model(tmp, "mixtral", shape.pop("preset"), shape.pop("layers"), "bfloat16", seed=0, **shape)
    try:
        os.rename(tmp, path)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
