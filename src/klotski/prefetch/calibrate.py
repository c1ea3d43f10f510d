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
    """Run the prompts of `input_path` through the model (prefill only), recording routing into a table."""
    from klotski.commands.generate import read_jsonl
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    records, errors = read_jsonl(str(input_path))
    if errors:
        raise KlotskiError(errors[0])
    llm = LLM(model=str(model_dir))
    recording = llm.record_routing()
    prompts = [llm.chat_prompt(r["messages"]) if "messages" in r else r for _, r in records]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    trace = recording.recorder.to_trace(drop_incomplete=True)
    return CorrelationTable.from_trace(trace, path_length, llm.spec.num_experts, model=llm.spec.architecture,
                                       calibrated_on=f"{Path(input_path).name} ({trace.num_tokens} tokens)")
