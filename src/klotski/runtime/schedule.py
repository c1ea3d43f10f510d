"""The ablation ladder as switches of one pipeline (the paper's Table 3, bottom to top)."""

from __future__ import annotations

from dataclasses import dataclass

from klotski.errors import KlotskiError


@dataclass(frozen=True)
class Schedule:
    """Which of the paper's techniques the pipeline uses."""

    name: str
    prefetch: bool  # overlap: fetch ahead of use (else: load a unit, then compute it)
    multibatch: bool  # n batches share each loaded layer (else n = 1)
    hot_only: bool  # prefetch gate + K hot experts only; cold experts fetched once the gate picks them
    reorder: bool  # hot experts first, cold in arrival order, each released after its last token


SCHEDULES = {
    "sequential": Schedule("sequential", prefetch=False, multibatch=False, hot_only=False, reorder=False),
    "overlap": Schedule("overlap", prefetch=True, multibatch=False, hot_only=False, reorder=False),
    "multibatch": Schedule("multibatch", prefetch=True, multibatch=True, hot_only=False, reorder=False),
    "hot": Schedule("hot", prefetch=True, multibatch=True, hot_only=True, reorder=False),
    "klotski": Schedule("klotski", prefetch=True, multibatch=True, hot_only=True, reorder=True),
}


def get_schedule(name: str) -> Schedule:
    """A schedule by name, or a clear error listing the ladder."""
    if name not in SCHEDULES:
        raise KlotskiError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
