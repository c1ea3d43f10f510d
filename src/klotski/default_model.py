"""The built-in default model: a small Mixtral trained on Shakespeare, shipped inside the package.

It lives in klotski/data/default-model/ (a standard checkpoint directory with its model card,
README.md; scripts/train_default_model.py made it), so `klotski generate` and `make run` print
language on a fresh machine with no download. Random checkpoints of any shape come from
`klotski create-model`.
"""

from __future__ import annotations

from pathlib import Path

from klotski.errors import KlotskiError
from klotski.paths import home  # noqa: F401  (re-exported: callers used to find it here)

DEFAULT_NAME = "klotski-shakespeare-mixtral"


def default_model_dir() -> Path:
    """Where the package keeps the default checkpoint."""
    return Path(__file__).parent / "data" / "default-model"


NOTICE = (
    "note: using the built-in default model, a 5M-parameter Mixtral (8 experts, top-2) trained on "
    f"Shakespeare (model card: {default_model_dir()}/README.md). Pass --model DIR to run another checkpoint."
)


def ensure_default_model() -> Path:
    """The default checkpoint's directory (read-only: caches and offload blobs go under home())."""
    path = default_model_dir()
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        raise KlotskiError(
            f"the built-in default model is missing from this installation ({path}); "
            "reinstall klotski, or pass --model DIR"
        )
    return path


def notice() -> str:
    """The line `generate`, `run-batch` and `serve` print when no --model is given."""
    return NOTICE
