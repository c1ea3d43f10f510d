"""Progress a person can read during a long run: requests done / total, tok/s, failures, ETA.

On a terminal it is a tqdm bar; anywhere else (CI, nohup, a pipe) one plain line every
`interval` seconds, because a log full of carriage returns is unreadable. `LLM.generate(use_tqdm=True)`
and `klotski run-batch` share it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts requests, generated tokens and failures, and shows them."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "requests",
        stream: TextIO | None = None,
        interval: float = 30.0,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) if tty is None else tty
        self.total, self.initial, self.done, self.tokens, self.failed = total, initial, initial, 0, 0
        self.enabled, self.desc, self.interval = enabled, desc, interval
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="req", file=self.stream, dynamic_ncols=True, smoothing=0.1
            )

    def tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at this run's rate so far (requests already done before it do not count)."""
        elapsed, done_here = time.monotonic() - self.start, self.done - self.initial
        if done_here <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / done_here

    def advance(self, requests: int, tokens: int = 0, failed: int = 0) -> None:
        """requests more are finished (failed of them failed), with tokens generated."""
        self.done += requests
        self.tokens += tokens
        self.failed += failed
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens_per_s():.1f} tok/s, {self.failed} failed", refresh=False)
            self.bar.update(requests)
        elif time.monotonic() - self.last_line >= self.interval:
            self.print_line()

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_s()
        return (
            f"{self.desc}: {self.done}/{self.total} ({pct:.1f}%), {self.failed} failed, "
            f"{self.tokens_per_s():.1f} tok/s, elapsed {_clock(time.monotonic() - self.start)}, "
            f"ETA {'?' if eta is None else _clock(eta)}"
        )

    def print_line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
