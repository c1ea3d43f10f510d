"""Machine figures measured in the benchmark's own session: disk and compute rates, load, memory."""
from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path

CHUNK = 64 << 20  # bytes per O_DIRECT read, like one slice of an expert blob


def disk_bandwidth(files: list[Path], max_bytes: int = 3 << 30) -> dict:
    """Sequential O_DIRECT read rate (GB/s) over `files`, bypassing the page cache."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    done, start, direct = 0, time.perf_counter(), True
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
    seconds = time.perf_counter() - start
    return {"disk_gbps": done / seconds / 1e9, "disk_bytes": done, "disk_o_direct": direct}


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
            best = min(_timed(lambda: F.linear(x, w)) for _ in range(3))
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

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "load_avg": os.getloadavg()}
