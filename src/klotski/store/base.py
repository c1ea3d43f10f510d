"""What the pipeline and the engine ask of a weight store: fetch a unit (get a handle), wait on it,
release it; count the KV cache against the device budget; report what was read."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from klotski.models.spec import WeightKey
from klotski.timeline import Timeline

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
        self._callbacks: list[Callable[[Handle], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def ready(cls, key: WeightKey, weights: Weights, at: float = 0.0) -> Handle:
        """A handle whose data is already resident."""
        handle = cls(key)
        handle.set(weights, at)
        return handle

    def set(self, weights: Weights, at: float) -> None:
        """Publish the fetched tensors (called by the lane that did the copy)."""
        self._weights, self.arrived = weights, at
        self.finish()

    def fail(self, error: BaseException) -> None:
        """Publish a failed fetch: the consumer re-raises it."""
        self._error = error
        self.finish()

    def finish(self, at: float | None = None) -> None:
        """Mark the fetch finished (usable from timeline time `at`, if given) and run the callbacks.

        A store that keeps the data itself (its own wait() returns it) calls this alone."""
        if at is not None:
            self.arrived = at
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def reset(self) -> None:
        """The fetch runs again (its data was evicted, or it waited for room): not done until finish()."""
        self._event.clear()

    def add_done_callback(self, fn: Callable[[Handle], None]) -> None:
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
        assert self._weights is not None, "a handle finished without weights must override wait()"
        return self._weights


def wait_any(handles: list[Handle]) -> Handle:
    """Block until one of the handles finishes; return it (a simulated store's handles finish at once)."""
    arrivals: queue.SimpleQueue = queue.SimpleQueue()
    for h in handles:
        h.add_done_callback(arrivals.put)
    return arrivals.get()


class WeightStore(Protocol):
    """A weight store as the pipeline and the engine use it (ResidentStore, TieredStore, the
    planner's SimStore)."""

    timeline: Timeline  # where transfers are recorded (set per run by the engine)

    @property
    def placement(self) -> dict[WeightKey, str] | None:
        """Tier per unit; None when every unit is resident on the device."""

    @property
    def offload(self) -> Any:
        """The offload directory units are read from (an OffloadDir), or None."""

    def fetch(self, key: WeightKey, lane: str = "prefetch") -> Handle:
        """Start bringing a unit to the device tier (idempotent while it is in flight or resident)."""

    def release(self, key: WeightKey) -> None:
        """The pipeline is done with a unit for now; the store may drop or keep it."""

    def resident(self, key: WeightKey) -> bool:
        """True when the unit is on the device tier (no transfer needed)."""

    def gather(self, key: WeightKey, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of one of a unit's tensors on the device, [*ids.shape, ...], reading only
        those rows where the unit is not resident (embedding lookups)."""

    def wait_any(self, handles: list[Handle]) -> Handle:
        """Block until one of the handles is usable; return it (the pipeline's arrival-order seam)."""

    def charge_kv(self, nbytes: int, settle: bool = False) -> None:
        """Count a KV cache allocation against the device budget (raise KlotskiError if it cannot fit);
        settle: the charge is held for a run of steps, so the placement may adjust to it."""

    def uncharge_kv(self, nbytes: int) -> None:
        """The KV cache of `nbytes` is freed."""

    def stats(self) -> dict[str, Any]:
        """The store's own accounting for a run's stats: bytes read, peaks, placement."""

    def close(self) -> None:
        """Stop lanes and free buffers."""


class ResidentStore:
    """Every unit in memory, read lazily from the checkpoint on first use: the all-resident run."""

    placement = None  # every unit on the device
    offload = None

    def __init__(self, checkpoint: Any, device: torch.device | str = "cpu"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self._units: dict[WeightKey, Weights] = {}
        self.bytes_read = {"checkpoint": 0}
        self.timeline = Timeline(enabled=False)  # nothing is transferred

    def charge_kv(self, nbytes: int, settle: bool = False) -> None:
        """KV cache is not budgeted when everything is resident."""

    def uncharge_kv(self, nbytes: int) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"bytes_read": dict(self.bytes_read), "peak_bytes": {}, "placement": "all resident"}

    def wait_any(self, handles: list[Handle]) -> Handle:
        return wait_any(handles)

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
