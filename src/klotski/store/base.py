"""What the pipeline asks of a weight store: fetch a unit (get a handle), wait on it, release it."""
from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch

from klotski.models.spec import WeightKey

Weights = dict[str, torch.Tensor]


class Handle:
    """One fetch in flight; its consumer waits on exactly this handle (never a global sync)."""

    __slots__ = ("key", "_event", "_weights", "_error", "arrived", "_callbacks", "_lock")

    def __init__(self, key: WeightKey):
        self.key = key
        self._event = threading.Event()
        self._weights: Weights | None = None
        self._error: BaseException | None = None
        self.arrived = 0.0  # timeline time the data became usable
        self._callbacks: list = []
        self._lock = threading.Lock()

    @classmethod
    def ready(cls, key: WeightKey, weights: Weights, at: float = 0.0) -> "Handle":
        """A handle whose data is already resident."""
        handle = cls(key)
        handle.set(weights, at)
        return handle

    def set(self, weights: Weights, at: float) -> None:
        """Publish the fetched tensors (called by the lane that did the copy)."""
        self._weights, self.arrived = weights, at
        self._finish()

    def fail(self, error: BaseException) -> None:
        """Publish a failed fetch: the consumer re-raises it."""
        self._error = error
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def add_done_callback(self, fn) -> None:
        """Call fn(handle) once the fetch finishes (at once if it already has)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def done(self) -> bool:
        """True once the data (or an error) has arrived."""
        return self._event.is_set()

    def wait(self) -> Weights:
        """Block until the data is usable; raise the lane's error if the fetch failed."""
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._weights


def wait_any(handles: list[Handle]) -> Handle:
    """Block until one of the handles finishes; return it (a simulated store's handles finish at once)."""
    arrivals: queue.SimpleQueue = queue.SimpleQueue()
    for h in handles:
        h.add_done_callback(arrivals.put)
    return arrivals.get()


class WeightStore(Protocol):
    """The pipeline's view of the store."""

    def fetch(self, key: WeightKey, lane: str = "prefetch") -> Handle:
        """Start bringing a unit to the device tier (idempotent while it is in flight or resident)."""

    def release(self, key: WeightKey) -> None:
        """The pipeline is done with a unit for now; the store may drop or keep it."""

    def resident(self, key: WeightKey) -> bool:
        """True when the unit is on the device tier (no transfer needed)."""

    def gather(self, key: WeightKey, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of one of a unit's tensors on the device, [*ids.shape, ...], reading only
        those rows where the unit is not resident (embedding lookups)."""

    def close(self) -> None:
        """Stop lanes and free buffers."""


class ResidentStore:
    """Every unit in memory, read lazily from the checkpoint on first use: the all-resident run."""

    def __init__(self, checkpoint, device: torch.device | str = "cpu"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self._units: dict[WeightKey, Weights] = {}
        self.bytes_read = {"checkpoint": 0}
        self.timeline = None

    def charge_kv(self, nbytes: int) -> None:
        """KV cache is not budgeted when everything is resident."""

    def uncharge_kv(self, nbytes: int) -> None:
        pass

    def stats(self) -> dict:
        return {"bytes_read": dict(self.bytes_read), "peak_bytes": {}, "placement": "all resident"}

    def fetch(self, key: WeightKey, lane: str = "prefetch") -> Handle:
        if key not in self._units:
            unit = self.checkpoint.load_unit(key)
            self.bytes_read["checkpoint"] += sum(t.nbytes for t in unit.values())
            self._units[key] = {k: t.to(self.device) for k, t in unit.items()}
        return Handle.ready(key, self._units[key])

    def release(self, key: WeightKey) -> None:
        pass

    def gather(self, key: WeightKey, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.fetch(key).wait()[name][ids]

    def resident(self, key: WeightKey) -> bool:
        return key in self._units

    def close(self) -> None:
        self._units.clear()
