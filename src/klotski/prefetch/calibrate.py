"""Calibration: build a correlation table from recorded routing (running a model to record it is
`klotski calibrate --model`, commands/prefetch.py)."""

from __future__ import annotations

from pathlib import Path

from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingTrace


def calibrate_from_trace(
    trace_path: str | Path, path_length: int = 1, num_experts: int | None = None, model: str = ""
) -> CorrelationTable:
    """Count a recorded trace's routing into a table."""
    trace = RoutingTrace.load(trace_path)
    return CorrelationTable.from_trace(
        trace,
        path_length,
        num_experts,
        model=model,
        calibrated_on=f"trace {Path(trace_path).name} ({trace.num_tokens} tokens)",
    )
