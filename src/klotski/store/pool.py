"""Memory tiers as byte budgets: aligned buffers, reuse, and exact current/peak accounting."""

from __future__ import annotations

import mmap
import threading

import torch

from klotski.store.offload import round_up


class TierPool:
    """One tier's memory under a budget: every byte the store holds there is counted.

    Buffers are page-aligned (anonymous mmap), so O_DIRECT reads land in them directly, and are
    reused by size: copying into fresh pages runs slower than into reused ones (page faults).
    """

    def __init__(self, name: str, budget: int | None, device: torch.device | str = "cpu"):
        self.name = name
        self.budget = budget  # None: unlimited
        self.device = torch.device(device)  # CUDA buffers are uint8 tensors; CPU ones anonymous mmaps
        self.used = 0  # bytes allocated (buffers in use or free for reuse, plus charges)
        self.peak = 0
        self.fresh = 0  # buffers mapped anew (reads into fresh pages run slower than into reused ones)
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def _fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget

    def _grow(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def try_alloc(self, nbytes: int):
        """A buffer of at least nbytes, or None when the budget cannot hold it."""
        size = round_up(max(nbytes, 1))
        with self._lock:
            if self._free.get(size):
                return self._free[size].pop()
            if not self._room_for(size):
                return None
            self._grow(size)
            self.fresh += 1
        if self.device.type == "cuda":
            return torch.empty(size, dtype=torch.uint8, device=self.device)
        return mmap.mmap(-1, size)

    def _room_for(self, want: int) -> bool:
        """Whether `want` bytes fit, after unmapping cached free buffers as needed (lock held)."""
        for size, bufs in self._free.items():
            while bufs and not self._fits(want):
                buf = bufs.pop()
                if isinstance(buf, mmap.mmap):
                    buf.close()
                self.used -= size
        return self._fits(want)

    def give_back(self, buf) -> None:
        """Return a buffer for reuse (it stays counted until dropped)."""
        size = buf.numel() if isinstance(buf, torch.Tensor) else len(buf)
        with self._lock:
            self._free.setdefault(size, []).append(buf)

    def held(self) -> int:
        """Bytes in use, not counting free buffers kept for reuse (they are dropped when room is needed)."""
        with self._lock:
            return self.used - sum(size * len(bufs) for size, bufs in self._free.items())

    def charge(self, nbytes: int, what: str) -> bool:
        """Count bytes held outside buffers (resident weights, KV cache); False if over budget."""
        with self._lock:
            if not self._room_for(nbytes):
                return False
            self._grow(nbytes)
            return True

    def uncharge(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def stats(self) -> dict:
        return {"budget": self.budget, "used": self.used, "peak": self.peak, "fresh_buffers": self.fresh}
