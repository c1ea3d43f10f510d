"""The tiered weight store: resident units on the device and host tiers, the rest fetched from
the offload directory on lanes (classes of transfer, served by shared reader threads), each fetch
with its own handle.

Every byte is counted against its tier's budget before it is read, in-flight fetches included.
When the device budget is full, a prefetch waits its turn (issued as soon as the pipeline
releases a unit); a fetch the pipeline is blocked on may evict units that were prefetched but
not yet used, the one the model needs last first (they are fetched again when asked for).

Room nobody is reading into is not left empty: a unit the pipeline releases keeps its buffer as a
cached copy until that room is wanted, so a group finds the units it reuses already in memory.
Prefetches run ahead of the pipeline by at most the in-flight room (`reserve`), so the room beyond
it holds copies; reads the pipeline will wait for this layer (the on-demand lane) are not held
back. A copy gives way to a read when it is expected to be claimed later than the reads already
out (each unit's usual gap between claims, less the claims since its last), and to a read the
pipeline is blocked on always, the one expected last first. So a group that reads every expert
each step drops the copy it just used (the cyclic-access optimum keeps the rest), and a small one
keeps the experts it reuses most often, whatever the placement's order. Nothing here knows the schedule.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import torch

from klotski.checkpoint.reader import Checkpoint
from klotski.config import format_bytes
from klotski.errors import KlotskiError
from klotski.models.spec import EMBED, WeightKey
from klotski.store.base import Handle, Weights
from klotski.store.offload import OffloadDir
from klotski.store.placement import placement_order
from klotski.store.pool import TierPool
from klotski.store.tiers import DEVICE, DISK, HOST
from klotski.timeline import Timeline

SPLIT_MIN = 64 * 2**20  # a blob of at least twice this is read in parts, one per reader thread
READERS = 2  # transfer threads shared by the lanes (the planner's profile reads the disk with as many)


def reads_in_parts(nbytes: int, readers: int, cuda: bool) -> bool:
    """Whether a blob of `nbytes` is read in one part per reader thread (planner/profile.py reads
    its scratch blobs by the same rule)."""
    return not cuda and readers >= 2 and nbytes >= 2 * SPLIT_MIN


def part_cuts(nbytes: int, readers: int, grid: int) -> list[int]:
    """Where a blob read in parts is cut: one part per reader thread, on its checksum grid (each part
    checks its own chunks on its own thread); [0, ..., nbytes]."""
    return sorted({nbytes * i // readers // grid * grid for i in range(readers)} | {nbytes})


class State(Enum):
    """Where a non-resident unit's fetch stands: DEFERRED -> INFLIGHT -> READY -> CLAIMED; RELEASED
    once the pipeline dropped it (an eviction sends a READY one back to DEFERRED)."""

    DEFERRED = "deferred"  # waiting for room in the device budget
    INFLIGHT = "inflight"  # a reader thread is copying it
    READY = "ready"  # arrived, not yet waited for (evictable)
    CLAIMED = "claimed"  # the pipeline holds it
    CACHED = "cached"  # released, its buffer kept until the room is wanted (a later fetch is a hit)
    RELEASED = "released"


@dataclass
class Parts:
    """A blob read in parts, one per reader thread: how many are still out, bytes got, first error."""

    left: int
    got: int = 0
    error: BaseException | None = None


@dataclass(eq=False)
class Entry:
    """One non-resident unit's fetch: its state, buffer and handle."""

    key: WeightKey
    handle: Handle
    lane: str
    state: State = State.DEFERRED
    buffer: Any = None  # a TierPool buffer (mmap on CPU, uint8 tensor on CUDA) while it holds one
    weights: Weights | None = None
    error: BaseException | None = None
    parts: Parts | None = None
    warm: bool = False  # read at load time into free room, to become a cached copy when it lands


class ReaderPool:
    """Transfer threads shared by the lanes: each takes the most urgent waiting job (lower priority
    first, FIFO within one), so two reads are in flight whenever two are queued, on any lane.

    One O_DIRECT pread stream can leave a disk below what two concurrent ones reach (`klotski
    profile` measures the store's rate with two; docs/offloading.md has this project's figures),
    and in a large group nearly every expert is a prefetch: per-lane threads would read them one at
    a time.
    """

    def __init__(self, threads: int = 2):
        self._cond = threading.Condition()
        self._jobs: list[tuple[int, int, Callable[[], None]]] = []  # heap of (priority, sequence, fn)
        self._seq = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"klotski-reader{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], None], priority: int = 0) -> None:
        with self._cond:
            heapq.heappush(self._jobs, (priority, self._seq, fn))
            self._seq += 1
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                _, _, fn = heapq.heappop(self._jobs)
            fn()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)


class Lane:
    """A named class of transfers (the CPU stand-in for a CUDA stream): its jobs run FIFO on the
    shared reader threads, ahead of every lower-priority lane's waiting jobs."""

    def __init__(self, name: str, pool: ReaderPool, priority: int):
        self.name, self._pool, self._priority = name, pool, priority

    def submit(self, fn: Callable[[], None]) -> None:
        self._pool.submit(fn, self._priority)

    def close(self) -> None:
        pass  # the pool's threads are closed by the store


class StoreHandle(Handle):
    """A handle whose wait() goes through the store, so an evicted unit is fetched again."""

    __slots__ = ("_store",)

    def __init__(self, key: WeightKey, store: TieredStore):
        super().__init__(key)
        self._store = store

    def wait(self) -> Weights:
        return self._store.claim(self.key, self)


@dataclass
class TieredStore:
    """Weights across device / host / disk under budgets; see the module docstring."""

    checkpoint: Checkpoint
    offload: OffloadDir | None
    placement: dict[WeightKey, str]
    device_pool: TierPool
    host_pool: TierPool
    timeline: Timeline
    lanes: dict[str, Lane] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reserve: int = 0  # device bytes kept free for units in flight (the placement's working set)
    readers: int = READERS  # transfer threads shared by the lanes (reads in flight at once)
    cache: bool = True  # keep released units in room no fetch wants (see the module docstring)
    warm: bool = True  # with the cache: read the first disk units into free room while resident ones load

    def __post_init__(self):
        self._cond = threading.Condition()
        self._entries: dict[WeightKey, Entry] = {}
        self._deferred: deque[Entry] = deque()
        self._resident: dict[WeightKey, Weights] = {}
        self.evictions = 0  # prefetched units dropped unused to make room (each is read again)
        self.demoted: list[WeightKey] = []  # resident units moved to disk to make room for a KV cache
        self.promoted: list[WeightKey] = []  # disk units moved onto the device into room a demotion left
        self._charged = 0  # device bytes charged by charge_kv (KV caches, a group's transients)
        self._orphans = 0  # fetches released while in flight: their buffers return when they land
        self._cached: dict[WeightKey, Entry] = {}  # released units still holding their buffers
        # Reuse is measured in claims (the pipeline taking a fetched unit): a clock, each unit's last
        # claim and the gap between its claims (a step's worth for a unit used every step).
        self._clock = 0
        self._last: dict[WeightKey, int] = {}
        self._gap: dict[WeightKey, float] = {}
        self._cursor: WeightKey | None = None  # the unit claimed last
        self.cache_hits = 0
        self.cache_bytes = 0  # bytes not read thanks to cached copies
        self.bytes_read = {DISK: 0}
        # Lanes not given (tests give their own) share one pool of reader threads.
        missing = [
            (priority, name)
            for priority, name in enumerate(("ondemand", "prefetch"))  # on-demand first
            if name not in self.lanes
        ]
        self._readers: ReaderPool | None = None
        if missing:
            self._readers = readers = ReaderPool(self.readers)
            for priority, name in missing:
                self.lanes[name] = Lane(name, readers, priority)
        self._order = {key: i for i, key in enumerate(self.checkpoint.spec.weight_keys())}  # execution order
        self._placed = {key: i for i, key in enumerate(placement_order(self.checkpoint.spec))}  # what to keep first
        self._cuda = self.device.type == "cuda"
        self._host_blobs: dict[WeightKey, torch.Tensor] = {}  # CUDA: host-placed units, pinned
        if self._cuda:
            # Each reader thread reads disk into its own pinned staging buffer, then copies on its own
            # stream (made on the thread's first copy: two reads of one lane may run at once).
            self._biggest = max((b.padded for b in self.offload.blobs.values()), default=0) if self.offload else 0
            self._staging: dict[int, tuple[torch.cuda.Stream, torch.Tensor]] = {}
            self.bytes_read[HOST] = 0
        self._load_resident()

    # -- resident units ---------------------------------------------------------------------
    def _load_resident(self) -> None:
        """Load device- and host-placed units once, counting them against their tier."""
        placed = [(key, tier) for key, tier in self.placement.items() if tier != DISK]
        for key, tier in placed:  # every resident byte is counted before any warm-up read takes room
            pool = self.device_pool if tier == DEVICE else self.host_pool
            nbytes = self.checkpoint.unit_nbytes(key)
            if not pool.charge(nbytes, str(key)):
                raise KlotskiError(
                    f"{key} ({format_bytes(nbytes)}) does not fit the {tier} budget "
                    f"({format_bytes(pool.budget or 0)}); raise --{tier}-memory or place less there"
                )
        self._warm_up()
        for key, tier in placed:
            if self._cuda and tier == HOST:
                blob = torch.empty(self._offload().blobs[key].padded, dtype=torch.uint8, pin_memory=True)
                self._offload().read_raw(key, blob)
                self._host_blobs[key] = blob
            else:
                self._resident[key] = {k: t.to(self.device) for k, t in self.checkpoint.load_unit(key).items()}

    def _warm_up(self) -> None:
        """Start reading the first units the model runs from disk into room nothing holds yet, while the
        resident units load: they land as cached copies, so the first step finds them in memory."""
        if not (self.cache and self.warm) or self.offload is None:
            return
        blobs = self.offload.blobs
        # The embedding table is never fetched whole (its rows are read per step).
        on_disk = [k for k, t in self.placement.items() if t == DISK and k in blobs and k.part != EMBED]
        first = sorted(on_disk, key=self._order.__getitem__)
        with self._cond:
            for key in first:
                buf = self.device_pool.try_alloc(blobs[key].padded)
                if buf is None:
                    return
                entry = Entry(key, StoreHandle(key, self), "prefetch", warm=True)
                self._entries[key] = entry
                self._start(entry, buf)

    def _offload(self) -> OffloadDir:
        """The offload dir; only units placed off the device tiers (which need one) reach its callers."""
        assert self.offload is not None
        return self.offload

    def resident(self, key: WeightKey) -> bool:
        return key in self._resident

    # -- fetching ---------------------------------------------------------------------------
    def fetch(self, key: WeightKey, lane: str = "prefetch") -> Handle:
        """Start fetching a unit (idempotent): a ready handle if resident, else its fetch's handle."""
        if key in self._resident:
            return Handle.ready(key, self._resident[key])
        if self.offload is None or key not in self.offload.blobs:
            raise KlotskiError(f"{key} is placed off the device but has no offload blob; give --offload-dir")
        with self._cond:
            entry = self._entries.get(key)
            if entry is None and key in self._cached:
                entry = self._cached.pop(key)
                entry.handle, entry.lane, entry.state = StoreHandle(key, self), lane, State.READY
                self._entries[key] = entry
                self.cache_hits += 1
                self.cache_bytes += self._offload().blobs[key].padded
                entry.handle.finish(self.timeline.now())
            elif entry is not None and entry.warm:
                entry.warm, entry.lane = False, lane  # wanted before its warm-up read landed: a plain fetch
            elif entry is None:
                entry = Entry(key, StoreHandle(key, self), lane)
                self._entries[key] = entry
                self._deferred.append(entry)
                self._issue_deferred()
            return entry.handle

    def _issue_deferred(self) -> None:
        """Issue waiting fetches while the device budget allows (lock held): on-demand ones first
        (the compute lane needs them now), then prefetches, each class in FIFO order."""
        while self._deferred:
            entry = next((e for e in self._deferred if e.lane == "ondemand"), self._deferred[0])
            need = self._offload().blobs[entry.key].padded
            if self.cache and entry.lane != "ondemand" and self._read_ahead() + need > max(self.reserve, need):
                return  # prefetches stay within the in-flight room; the room beyond it holds copies
            while (buf := self.device_pool.try_alloc(need)) is None:
                if not self._drop_cached(urgent=False):
                    return
            self._deferred.remove(entry)
            self._start(entry, buf)

    def _start(self, entry: Entry, buf) -> None:
        entry.state, entry.buffer = State.INFLIGHT, buf
        entry.handle.reset()
        blob = self._offload().blobs[entry.key]
        if not reads_in_parts(blob.padded, self.readers, self._cuda):
            self.lanes[entry.lane].submit(lambda: self._read(entry))
            return
        # A large blob is read in one part per reader thread: with two buffers in flight one is
        # being computed on while the other arrives, and one stream alone leaves the disk idle.
        cuts = part_cuts(blob.padded, self.readers, blob.chunk)
        entry.parts = Parts(len(cuts) - 1)
        for lo, hi in zip(cuts, cuts[1:]):
            self.lanes[entry.lane].submit(partial(self._read_part, entry, lo, hi))

    def _read(self, entry: Entry) -> None:
        """Reader thread: one sequential read of the unit's blob into its buffer."""
        blob = self._offload().blobs[entry.key]
        start = self.timeline.now()
        try:
            weights, error = (
                (self._copy_in(entry, blob) if self._cuda else self._offload().read_into(entry.key, entry.buffer)),
                None,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
            weights, error = None, exc
        end = self.timeline.now()
        source = HOST if entry.key in self._host_blobs else DISK
        self.timeline.add(
            entry.lane,
            "read" if source == DISK else "copy",
            start,
            end,
            layer=entry.key.layer,
            expert=entry.key.expert,
            bytes=blob.padded,
        )
        self._land(entry, weights, error, end, blob.padded, source)

    def _read_part(self, entry: Entry, lo: int, hi: int) -> None:
        """Reader thread: one part of a blob; the last part to land checks the whole and publishes it."""
        start = self.timeline.now()
        try:
            got, error = self._offload().read_part(entry.key, entry.buffer, lo, hi), None
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
            got, error = 0, exc
        end = self.timeline.now()
        self.timeline.add(entry.lane, "read", start, end, layer=entry.key.layer, expert=entry.key.expert, bytes=hi - lo)
        parts = entry.parts
        assert parts is not None
        with self._cond:
            parts.left -= 1
            parts.got += got
            parts.error = parts.error or error
            if parts.left:
                return
        weights, error = None, parts.error
        if error is None:
            try:
                self._offload().check_read(entry.key, entry.buffer, parts.got)
                weights = self._offload().views(self._offload().blobs[entry.key], entry.buffer)
            except BaseException as exc:  # noqa: BLE001
                error = exc
        self._land(entry, weights, error, end, self._offload().blobs[entry.key].padded, DISK)

    def _land(
        self, entry: Entry, weights: Weights | None, error: BaseException | None, end: float, nbytes: int, source: str
    ) -> None:
        """A fetch's bytes are in: hand them to the consumer, or free the buffer if it was released."""
        with self._cond:
            self.bytes_read[source] += nbytes
            if entry.warm:  # nobody asked for it yet: a cached copy (or nothing, if the read failed)
                entry.warm = False
                del self._entries[entry.key]
                if error is None and self.cache:  # (the cache may have been switched off since)
                    entry.weights, entry.state = weights, State.CACHED
                    self._cached[entry.key] = entry
                else:
                    entry.state = State.RELEASED
                    self.device_pool.give_back(entry.buffer)
                self._issue_deferred()
                self._cond.notify_all()
                return
            arrived = entry.state != State.RELEASED
            if arrived:
                entry.weights, entry.error, entry.state = weights, error, State.READY
            else:  # nobody wants it any more
                self._orphans -= 1
                self.device_pool.give_back(entry.buffer)
                self._issue_deferred()
            self._cond.notify_all()
        if arrived:
            entry.handle.finish(end)

    def _copy_in(self, entry: Entry, blob) -> Weights:
        """CUDA: disk -> pinned staging (or the pinned host copy) -> device buffer on the lane's stream."""
        me = threading.get_ident()
        if me not in self._staging:  # only this thread writes its own entry
            self._staging[me] = (
                torch.cuda.Stream(self.device),
                torch.empty(self._biggest, dtype=torch.uint8, pin_memory=True),
            )
        stream, staging = self._staging[me]
        if entry.key in self._host_blobs:
            staging = self._host_blobs[entry.key]
        else:
            self._offload().read_raw(entry.key, staging)
        with torch.cuda.stream(stream):
            entry.buffer[: blob.padded].copy_(staging[: blob.padded], non_blocking=True)
        stream.synchronize()  # the lane waits for its own copy; the consumer waits on the handle
        return self._offload().views(blob, entry.buffer)

    def gather(self, key: WeightKey, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of one tensor of a unit, on the device ([*ids.shape, ...]): indexed where the
        unit is resident, else only those rows read (the embedding table is never fetched whole)."""
        if key in self._resident:
            return self._resident[key][name][ids]
        unique, inverse = torch.unique(ids.flatten().cpu(), return_inverse=True)
        start = self.timeline.now()
        if key in self._host_blobs:  # CUDA: the pinned host copy
            rows = self._offload().views(self._offload().blobs[key], self._host_blobs[key])[name][unique]
        else:
            rows = self._offload().read_rows(key, name, unique.tolist())
            with self._cond:
                self.bytes_read[DISK] += rows.nbytes
        self.timeline.add("ondemand", "read", start, self.timeline.now(), layer=key.layer, bytes=rows.nbytes)
        return rows[inverse].view(*ids.shape, *rows.shape[1:]).to(self.device)

    def claim(self, key: WeightKey, handle: StoreHandle) -> Weights:
        """The consumer's wait: block until the unit is usable, evicting idle prefetches if needed."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.handle is not handle:  # released, then asked again: fetch anew
                self._cond.release()
                try:
                    return self.fetch(key, "ondemand").wait()
                finally:
                    self._cond.acquire()
            while entry.state not in (State.READY, State.CLAIMED):
                if entry.state == State.DEFERRED and not self._make_room(entry):
                    raise KlotskiError(self._too_small(entry))
                self._cond.wait()
            if entry.error is not None:
                raise entry.error
            if entry.state != State.CLAIMED:
                self._note_use(key)
                entry.state = State.CLAIMED
                self._issue_deferred()  # it left the look-ahead: the next read may start
            assert entry.weights is not None  # a fetch that landed without error has its tensors
            return entry.weights

    def wait_any(self, handles: list[Handle]) -> Handle:
        """The first of these fetches to become usable (the pipeline's arrival-order seam).

        Like claim(), it makes progress when none of them is in flight: the first one waiting for
        room gets it, evicting idle prefetches if it must (a plain wait on the handles would sleep
        forever when only unclaimed prefetches hold the room)."""
        with self._cond:
            while True:
                for h in handles:
                    entry = self._entries.get(h.key)
                    if h.done() or (
                        entry is not None and entry.handle is h and entry.state in (State.READY, State.CLAIMED)
                    ):
                        return h
                    if entry is None or entry.handle is not h:
                        return h  # released or replaced: its wait() fetches it anew
                entries = [self._entries[h.key] for h in handles]
                if not any(e.state == State.INFLIGHT for e in entries):
                    waiting = next(e for e in entries if e.state == State.DEFERRED)
                    if not self._make_room(waiting):
                        raise KlotskiError(self._too_small(waiting))
                self._cond.wait(timeout=0.1)

    def _make_room(self, wanted: Entry) -> bool:
        """Issue `wanted` now, evicting ready-but-unclaimed units (the one needed last first) if it must."""
        if wanted in self._deferred:
            self._deferred.remove(wanted)
        need = self._offload().blobs[wanted.key].padded
        while (buf := self.device_pool.try_alloc(need)) is None:
            if self._drop_cached(urgent=True):
                continue
            idle = [e for e in self._entries.values() if e.state == State.READY and e is not wanted]
            if not idle:
                inflight = self._orphans > 0 or any(e.state == State.INFLIGHT for e in self._entries.values())
                self._deferred.appendleft(wanted)
                return inflight  # an arriving fetch frees or may become evictable; else nothing can free memory
            victim = max(idle, key=lambda e: self._distance(wanted.key, e.key))
            self._evict(victim)
        self._start(wanted, buf)
        return True

    def _distance(self, now: WeightKey, later: WeightKey) -> int:
        """How far after `now` the model next runs `later` (wrapping to the next step): the
        unit needed last is the cheapest to drop."""
        order = self._order
        return (order[later] - order[now]) % len(order)

    def _note_use(self, key: WeightKey) -> None:
        """Count a claim: the unit's gap since its last one (averaged) and its last claim."""
        self._clock += 1
        self._cursor = key
        if key in self._last:
            gap = self._clock - self._last[key]
            self._gap[key] = gap if key not in self._gap else 0.5 * (self._gap[key] + gap)
        self._last[key] = self._clock

    def _next_use(self, key: WeightKey, unknown: float) -> float:
        """Claims until a cached unit is expected to be claimed again: its usual gap less the claims
        since its last one; once overdue, its gap again (reuse that is not periodic, like a small
        group's experts, has no memory); a unit claimed once: `unknown`. Arrival-order compute makes
        execution order a poor guide within a layer; gaps are not."""
        if key not in self._last:  # a warm-up read never claimed: its place in the first step, then stale
            if self._clock > len(self._order):
                return unknown
            return float(self._distance(self._cursor, key) if self._cursor is not None else self._order[key])
        gap = self._gap.get(key)
        if gap is None:
            return unknown
        left = self._last[key] + gap - self._clock
        return left if left > 0 else gap

    def _drop_cached(self, urgent: bool) -> bool:
        """Free one cached copy's buffer (lock held): the one expected to be needed last; unless
        urgent (the pipeline waits for the read), only one expected after the fetches already out."""
        if not self._cached:
            return False
        unknown = max(max(self._gap.values(), default=0.0), float(len(self._order)))  # a step's worth at least
        victim, after = max(((e, self._next_use(e.key, unknown)) for e in self._cached.values()), key=lambda v: v[1])
        if not urgent and after <= len(self._entries):
            return False
        self._drop_copy(victim.key)
        return True

    def _drop_copy(self, key: WeightKey) -> None:
        """Free a cached copy's buffer (lock held)."""
        copy = self._cached.pop(key)
        self.device_pool.give_back(copy.buffer)
        copy.state, copy.buffer, copy.weights = State.RELEASED, None, None

    def set_cache(self, on: bool) -> None:
        """Switch the cached copies on or off (ablations); off drops the copies held now, warm-up ones too."""
        with self._cond:
            self.cache = on
            while self._cached:
                self._drop_cached(urgent=True)
            self._issue_deferred()
            self._cond.notify_all()

    def _read_ahead(self) -> int:
        """Bytes of fetches in flight or landed and not yet claimed (lock held)."""
        offload = self._offload()
        return sum(
            offload.blobs[e.key].padded
            for e in self._entries.values()
            if e.state in (State.INFLIGHT, State.READY) and not e.warm
        )

    def _evict(self, entry: Entry) -> None:
        """Drop an unclaimed unit's buffer; it goes back to waiting and is fetched again on demand."""
        self.evictions += 1
        self.device_pool.give_back(entry.buffer)
        entry.state, entry.buffer, entry.weights = State.DEFERRED, None, None
        entry.handle.reset()
        self._deferred.append(entry)

    def _too_small(self, entry: Entry) -> str:
        pool = self.device_pool
        return (
            f"the device budget ({format_bytes(pool.budget or 0)}) cannot hold {entry.key} "
            f"({format_bytes(self._offload().blobs[entry.key].padded)}) next to what the pipeline holds "
            f"({format_bytes(pool.used)} in use, KV cache included); raise --device-memory"
        )

    def release(self, key: WeightKey) -> None:
        """The pipeline is done with a unit: its buffer returns to the pool, waiting fetches start."""
        if key in self._resident:
            return
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.warm:  # a warm-up read nobody asked for lands as a copy
                return
            del self._entries[key]
            if entry.state == State.INFLIGHT:
                self._orphans += 1  # the lane frees it on arrival
            elif entry.state == State.DEFERRED:
                self._deferred.remove(entry)
            elif self.cache and entry.error is None:
                entry.state = State.CACHED
                self._cached[key] = entry
                self._issue_deferred()  # a waiting fetch may want the room more
                self._cond.notify_all()
                return
            else:
                self.device_pool.give_back(entry.buffer)
            entry.state = State.RELEASED
            self._issue_deferred()
            self._cond.notify_all()

    def charge_kv(self, nbytes: int, settle: bool = False) -> None:
        """Count a KV cache allocation against the device budget, keeping the in-flight reserve free.

        The KV cache comes before resident weights: when it does not fit beside them and the
        reserve, resident units are moved to disk (last in placement order first; they are fetched
        per use from then on), so a placement made before the workload was known never blocks a run.
        Which units move depends only on the budget, the resident bytes, the charges and the reserve,
        never on what happens to be in flight, landed or cached at that moment (reads land on their
        own schedule): those give way first — cached copies are dropped, landed fetches nobody has
        claimed yet are evicted (read again when wanted), reads in flight waited for.

        settle: a charge held for a whole run of steps (a generate group's), after which disk units
        that now fit move onto the device (`_promote`); never for charges that come and go each step
        (the server's transients), which would move the same units back and forth.
        """
        pool = self.device_pool
        with self._cond:
            if pool.budget is not None:
                while self._fixed_bytes() + nbytes + self.reserve > pool.budget and self._demote_one():
                    pass
                while not self._give_way(nbytes) and self._demote_one():
                    pass
            if not pool.charge(nbytes, "kv"):
                raise KlotskiError(
                    f"the KV cache and the prefill's transients ({format_bytes(nbytes)}) do not fit the device "
                    f"budget ({format_bytes(pool.budget or 0)}, {format_bytes(pool.used)} in use); lower "
                    "--batch-size or --num-batches, shorten the prompts or max_tokens, or raise --device-memory"
                )
            self._charged += nbytes
            if settle and pool.budget is not None and self.demoted:
                self._promote()

    def _give_way(self, need: int) -> bool:
        """Free device room for `need` more bytes from what reads hold beyond the fixed bytes (lock
        held): cached copies are dropped, landed fetches nobody claimed yet are evicted (read again
        when wanted, the placement stays), reads in flight (a warm-up, or with the cache off) are
        waited for. False when only resident units and charges are left and it still does not fit."""
        pool = self.device_pool
        assert pool.budget is not None
        while pool.held() + need > pool.budget:
            idle = [e for e in self._entries.values() if e.state == State.READY]
            if self._cached:
                self._drop_cached(urgent=True)
            elif idle:
                self._evict(max(idle, key=self._from_cursor))
            elif any(e.state == State.INFLIGHT for e in self._entries.values()):
                self._cond.wait()
            else:
                return False
        return True

    def _from_cursor(self, entry: Entry) -> int:
        """How far after the unit claimed last the model runs `entry`'s: the one needed last goes first."""
        return self._distance(self._cursor, entry.key) if self._cursor is not None else self._order[entry.key]

    def _fixed_bytes(self) -> int:
        """Device bytes held by resident units and charges (lock held): what no read gives back."""
        on_device = sum(self.checkpoint.unit_nbytes(k) for k in self._resident if self.placement.get(k) == DEVICE)
        return on_device + self._charged

    def _promote(self) -> None:
        """Disk units that fit, in placement order, beside the resident units, the charges and the
        reserve move onto the device (lock held). A demotion frees a whole unit where the charge may
        have needed less: the load-time placement, made for a nominal workload, kept an expert the
        run's KV cache pushed out, while the embedding table (placed last, smaller) would have fit and
        saves its row reads every step. By the budget alone, as demotions are."""
        pool = self.device_pool
        assert pool.budget is not None
        for key in sorted(self.placement, key=self._placed.__getitem__):
            if self.placement[key] != DISK or key in self._entries:
                continue
            need = self.checkpoint.unit_nbytes(key)
            if self._fixed_bytes() + self.reserve + need > pool.budget:
                continue
            if key in self._cached:  # its cached copy goes: the resident tensors replace it
                self._drop_copy(key)
            if not self._give_way(need) or not pool.charge(need, str(key)):
                continue
            self._resident[key] = {k: t.to(self.device) for k, t in self.checkpoint.load_unit(key).items()}
            self.placement[key] = DEVICE
            self.promoted.append(key)

    def _demote_one(self) -> bool:
        """Move the resident device unit placed last (one with an offload blob) to disk; False if none."""
        if self.offload is None:
            return False
        movable = [k for k in self._resident if self.placement.get(k) == DEVICE and k in self.offload.blobs]
        if not movable:
            return False
        key = max(movable, key=lambda k: self._placed[k])
        del self._resident[key]
        self.placement[key] = DISK
        self.device_pool.uncharge(self.checkpoint.unit_nbytes(key))
        self.demoted.append(key)
        return True

    def uncharge_kv(self, nbytes: int) -> None:
        with self._cond:
            self._charged -= nbytes
        self.device_pool.uncharge(nbytes)

    def stats(self) -> dict:
        """Bytes read and peak bytes per tier (the store's own accounting)."""
        from klotski.store.placement import summarize

        unit_bytes = {k: self.checkpoint.unit_nbytes(k) for k in self.placement}
        return {
            "bytes_read": dict(self.bytes_read),
            "evictions": self.evictions,
            "cache_hits": self.cache_hits,
            "bytes_from_cache": self.cache_bytes,
            "demoted_to_disk": len(self.demoted),
            "promoted_to_device": len(self.promoted),
            "fresh_buffers": self.device_pool.fresh,
            "peak_bytes": {DEVICE: self.device_pool.peak, HOST: self.host_pool.peak},
            "budgets": {DEVICE: self.device_pool.budget, HOST: self.host_pool.budget},
            "placement": summarize(self.placement, unit_bytes),
        }

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()
        if self._readers is not None:
            self._readers.close()
        self._resident.clear()
        self._cached.clear()
        if self.offload is not None:
            self.offload.close()  # release the offload dir's lock
