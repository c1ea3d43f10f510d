"""Machine figures measured in the benchmark's own session: disk and compute rates, load, memory."""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path

CHUNK = 64 << 20  # bytes per O_DIRECT read, like one slice of an expert blob


def disk_bandwidth(files: list[Path], max_bytes: int = 3 << 30, streams: int = 1) -> dict:
    """O_DIRECT read rate (GB/s) over `files` (page cache bypassed), with `streams` concurrent readers."""
    from concurrent.futures import ThreadPoolExecutor

    shares = [files[i::streams] for i in range(streams)]
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda fs: _read_direct(fs, max_bytes // streams), shares))
    seconds = time.perf_counter() - start
    done = sum(n for n, _ in results)
    return {
        "disk_gbps": done / seconds / 1e9,
        "disk_bytes": done,
        "disk_o_direct": all(d for _, d in results),
        "disk_streams": streams,
    }


def _read_direct(files: list[Path], max_bytes: int) -> tuple[int, bool]:
    """Read up to max_bytes sequentially from files in CHUNK slices; (bytes, whether O_DIRECT held)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    done, direct = 0, True
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd, direct = os.open(path, os.O_RDONLY), False
        try:
            offset = 0
            while done < max_bytes:
                n = os.preadv(fd, [buf], offset)
                if n <= 0:
                    break
                done, offset = done + n, offset + n
        finally:
            os.close(fd)
        if done >= max_bytes:
            break
    return done, direct


def best_disk_bandwidth(file_sets: dict[str, list[Path]]) -> dict:
    """The fastest of 1 and 2 concurrent O_DIRECT readers over each file set (a lower bound must use the best)."""
    trials = {
        f"{name}-{streams}": disk_bandwidth(files, streams=streams)
        for name, files in file_sets.items()
        if files
        for streams in (1, 2)
    }
    best = max(trials.values(), key=lambda t: t["disk_gbps"])
    return best | {"disk_trials_gbps": {k: round(v["disk_gbps"], 3) for k, v in trials.items()}}


def matmul_rate(hidden: int, intermediate: int, rows: tuple[int, ...] = (64, 256), threads: int = 2) -> dict:
    """GFLOP/s of F.linear at an expert's shapes (x [rows, D], w [I, D]) in fp32 and bf16, best of 3."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(intermediate, hidden).to(dtype)
        rates = {}
        for r in rows:
            x = torch.randn(r, hidden).to(dtype)
            F.linear(x, w)  # warm-up
            best = min(_timed(lambda x=x, w=w: F.linear(x, w)) for _ in range(3))
            rates[str(r)] = 2 * r * hidden * intermediate / best / 1e9
        out[f"matmul_gflops_{str(dtype).removeprefix('torch.')}"] = rates
    return out | {"matmul_threads": threads}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def describe() -> dict:
    """Static figures: CPU, cores, RAM, kernel, Python and library versions."""
    import torch

    from klotski.runtime.compute_dtype import cpu_flags, cpu_name

    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }
