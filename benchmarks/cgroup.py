"""Fair memory: each engine runs in its own process inside a cgroup-v1 memory cgroup with one cap.

The cap covers the page cache too, so an engine cannot keep the checkpoint cached beyond it and
its disk reads are real reads. Where no cgroup can be made the harness says so in the results.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


@dataclass
class Result:
    """One capped child's outcome."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int | None  # the cgroup's memory.max_usage_in_bytes (RSS + page cache)
    oom_killed: bool
    capped: bool


def available() -> str | None:
    """None when a memory cgroup can be made here, else why not."""
    probe = ROOT / f"klotski-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return None
    except OSError as exc:
        return f"cannot create a memory cgroup under {ROOT}: {exc.strerror}"


def run_capped(cmd: list[str], cap: int, name: str, env: dict | None = None, timeout: float | None = None) -> Result:
    """Run `cmd` inside a fresh cgroup capped at `cap` bytes (or uncapped if none can be made)."""
    group = ROOT / f"klotski-bench-{name}-{os.getpid()}"
    capped = available() is None
    if capped:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap))
        (group / "memory.max_usage_in_bytes").write_text("0")

    def enter() -> None:  # in the child, before exec: join the cgroup
        if capped:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=enter, timeout=timeout)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -9, exc.stdout or "", f"timed out after {timeout} s"
            out = out.decode() if isinstance(out, bytes) else out
        seconds = time.perf_counter() - t0
        peak, oom = None, False
        if capped:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom = _oom_kills(group) > 0 or rc == -9
        return Result(rc, out, err, seconds, peak, oom, capped)
    finally:
        if capped:
            _remove(group)


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _remove(group: Path) -> None:
    # Charged page cache moves to the parent on rmdir; force_empty first makes it quick.
    try:
        (group / "memory.force_empty").write_text("0")
    except OSError:
        pass
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def drop_page_cache(paths: list[Path]) -> str:
    """Evict these files from the page cache (posix_fadvise DONTNEED); also drop_caches where allowed."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "fadvise+drop_caches"
    except OSError:
        return "fadvise"
