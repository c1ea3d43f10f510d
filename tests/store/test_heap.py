"""store/heap.py: freed activations go back to the OS under a budget (measured in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

from klotski.store import heap

# Allocate and free activation-sized tensors the way a layer does, then report what stays resident.
CHURN = r"""
import ctypes, json, sys, torch
from klotski.store.heap import return_freed_memory
applied = return_freed_memory() if sys.argv[1] == "fixed" else None

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # freeing a mapped 16 MiB chunk raises glibc's default threshold to 16 MiB
before = libc.mallinfo2().hblkhd
act = torch.ones(8 << 20, dtype=torch.uint8)  # an activation-sized tensor: its own mapping?
mapped = libc.mallinfo2().hblkhd - before
del act
base = anon()
keep = []
for _ in range(3):
    held = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(24)]  # 192 MiB of 8 MiB tensors
    keep.append(torch.ones(64 << 10, dtype=torch.uint8))  # a small tensor that outlives them (e.g. a KV row)
    del held
print(json.dumps({"applied": applied, "mapped": mapped, "retained": anon() - base}))
"""


def _churn(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # malloc's own defaults
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; mallopt is glibc's")
def test_fixed_thresholds_return_freed_tensors_to_the_os():
    default, fixed = _churn("default"), _churn("fixed")
    assert fixed["applied"] is True
    assert fixed["mapped"] >= 8 << 20 and fixed["retained"] < 16 << 20
    assert default["mapped"] == 0  # malloc's default: the tensor came from the heap (so the test can fail)


def test_a_threshold_set_in_the_environment_stands(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.return_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert heap.return_freed_memory() is False  # decided once per process
