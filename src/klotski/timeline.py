"""The timeline: every compute op, transfer and wait, per lane, as the paper's Fig. 15 draws it.

Lanes: "compute", "prefetch" (weight prefetch), "ondemand" (gate-triggered expert fetches),
"kv_load", "kv_store". A "wait" on the compute lane is a bubble: compute idle on a transfer.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Event:
    """One span on one lane; times in seconds since the timeline started."""

    lane: str
    kind: str
    start: float
    end: float
    layer: int | None = None
    batch: int | None = None
    expert: int | None = None
    bytes: int = 0
    flops: int = 0
    phase: str = ""  # "prefill" | "decode"


class Timeline:
    """Thread-safe recorder of events; summarises busy, bubble and bandwidth figures."""

    def __init__(self, enabled: bool = True, clock=time.perf_counter):
        self.enabled = enabled
        self.clock = clock
        self.t0 = clock()
        self.events: list[Event] = []
        self.phase = ""
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the timeline started."""
        return self.clock() - self.t0

    def add(self, lane: str, kind: str, start: float, end: float, **fields) -> None:
        """Record a finished span."""
        if self.enabled:
            with self._lock:
                self.events.append(Event(lane, kind, start, end, phase=self.phase, **fields))

    @contextmanager
    def span(self, lane: str, kind: str, **fields):
        """Record the span of the enclosed block."""
        start = self.now()
        try:
            yield
        finally:
            self.add(lane, kind, start, self.now(), **fields)

    def busy(self, lane: str, kinds: set[str] | None = None, exclude: set[str] = frozenset()) -> float:
        """Seconds a lane spent on (some kinds of) events; overlapping spans are merged."""
        spans = sorted(
            (e.start, e.end)
            for e in self.events
            if e.lane == lane and (kinds is None or e.kind in kinds) and e.kind not in exclude
        )
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                total += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        return total + ((cur_e - cur_s) if cur_e is not None else 0.0)

    def summary(self, wall_s: float) -> dict:
        """Busy time per lane, bubble time and ratio, bytes moved and achieved bandwidth."""
        lanes = sorted({e.lane for e in self.events})
        io_lanes = [l for l in lanes if l != "compute"]
        io_busy = {l: self.busy(l) for l in io_lanes}
        moved = {l: sum(e.bytes for e in self.events if e.lane == l) for l in io_lanes}
        bubble = self.busy("compute", {"wait"})
        return {
            "compute_busy_s": self.busy("compute", exclude={"wait"}),
            "io_busy_s": sum(io_busy.values()),
            "io_busy_s_per_lane": io_busy,
            "bubble_s": bubble,
            "bubble_ratio": bubble / wall_s if wall_s > 0 else 0.0,
            "bytes_moved_per_lane": moved,
            "achieved_bandwidth_gbps": {l: moved[l] / io_busy[l] / 1e9 for l in io_lanes if io_busy[l] > 0},
        }

    def chrome_trace(self) -> dict:
        """Chrome trace format (opens in Perfetto / chrome://tracing): one thread per lane."""
        lanes = sorted({e.lane for e in self.events}, key=lambda l: (l != "compute", l))
        tid = {lane: i for i, lane in enumerate(lanes)}
        out = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": tid[l], "args": {"name": l}} for l in lanes]
        for e in self.events:
            name = e.kind if e.expert is None else f"{e.kind} E{e.expert}"
            args = {k: v for k, v in asdict(e).items() if v not in (None, 0, "") and k not in ("lane", "start", "end")}
            out.append(
                {
                    "ph": "X",
                    "name": name,
                    "pid": 0,
                    "tid": tid[e.lane],
                    "ts": e.start * 1e6,
                    "dur": max(e.end - e.start, 0.0) * 1e6,
                    "args": args,
                }
            )
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str) -> None:
        """Write the Chrome trace JSON."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)
