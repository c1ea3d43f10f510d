"""Where klotski keeps what it makes: the default model, repacked offload dirs, machine profiles."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """KLOTSKI_HOME, else ~/.cache/klotski."""
    return Path(os.environ.get("KLOTSKI_HOME") or Path.home() / ".cache" / "klotski")
