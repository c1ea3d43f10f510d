"""Calibration: build a correlation table from routing, recorded in a trace or by running a model."""
from __future__ import annotations

from pathlib import Path

from klotski.errors import KlotskiError
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingTrace


def calibrate_from_trace(trace_path: str | Path, path_length: int = 1,
                         num_experts: int | None = None, model: str = "") -> CorrelationTable:
    """Count a recorded trace's routing into a table."""
    trace = RoutingTrace.load(trace_path)
    return CorrelationTable.from_trace(trace, path_length, num_experts, model=model,
                                       calibrated_on=f"trace {Path(trace_path).name} "
                                                     f"({trace.num_tokens} tokens)")


def calibrate_from_model(model_dir: str | Path, input_path: str | Path,
                         path_length: int = 1) -> CorrelationTable:
    """Run the prompts of `input_path` through the model, recording routing into a table."""
    raise KlotskiError("calibrate --model is not available yet: the runtime cannot record "
                       "routing; use `klotski calibrate --from-trace FILE.npz`")
