"""benchmarks/results/<benchmark>/: one latest result per benchmark, older ones in its archive/.

Writing a new result moves the files of the previous one into archive/<date>/ (the date its files
were last written); benchmarks/results/README.md is the index of what each folder holds and of the
archived runs the docs cite.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def folder(name: str | Path) -> Path:
    """A benchmark's results folder: a name under benchmarks/results/, or a path as given."""
    path = Path(name)
    return path if path.is_absolute() or len(path.parts) > 1 else RESULTS / path


def archive_previous(out: Path) -> Path | None:
    """Move the files of the result in `out` (everything but archive/) to out/archive/<date>/."""
    files = [p for p in out.iterdir() if p.name != "archive"] if out.is_dir() else []
    if not files:
        return None
    stamp = datetime.date.fromtimestamp(max(p.stat().st_mtime for p in files)).isoformat()
    dest = out / "archive" / stamp
    n = 2
    while dest.exists():
        dest, n = out / "archive" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for p in files:
        shutil.move(str(p), dest / p.name)
    return dest


def publish(name: str | Path, files: dict[str, str]) -> Path:
    """Write a new result (file name -> text) as the benchmark's latest, archiving the previous one."""
    out = folder(name)
    archive_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        (out / fname).write_text(text)
    return out
