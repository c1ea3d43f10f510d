"""benchmarks/planner_check.py on a tiny model (docs/planner.md has its table on the 8x7B-shaped checkpoint)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "planner_check.py"


def test_planner_check_runs_on_a_tiny_model(tmp_path, capsys):
    from klotski.commands.create_model import create_model

    model = create_model(tmp_path / "m", "mixtral", "tiny", layers=2, dtype="bfloat16")
    spec = importlib.util.spec_from_file_location("planner_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(
        [
            "--model",
            str(model),
            "--configs",
            "600KB:2",
            "--num-prompts",
            "4",
            "--prompt-len",
            "4",
            "--max-tokens",
            "2",
            "--sweep",
            "1,2",
            "--routing-replay",
            "",
            "--in-process",
            "--offload-dir",
            str(tmp_path / "off"),
        ]
    )
    (row,) = rows
    predicted, measured, sweep = row["predicted_tokens_per_s"], row["measured_tokens_per_s"], row["sweep"]
    assert predicted > 0 and measured > 0 and row["profile"]  # a plan was made, and the run measured
    # 4 prompts at bs 2: n is 1 or 2 (a larger n has no prompts to fill it), the planner's among them.
    assert set(sweep) == {1, 2} and row["planner_n"] in sweep and row["batch_size"] == 2
    assert row["best_n"] == max(sweep, key=sweep.get)
    assert row["error"] == pytest.approx((measured - predicted) / predicted)
    assert row["planner_vs_best"] == pytest.approx(measured / sweep[row["best_n"]])
    out = capsys.readouterr().out
    assert f"| 600KB | 2 | {row['planner_n']} | {predicted:.3f} | {measured:.3f} | {row['error']:+.1%} |" in out
