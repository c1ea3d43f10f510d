"""benchmarks/planner_check.py on a tiny model (the real table comes from the lead's run on the 8x7B checkpoint)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "planner_check.py"


def test_planner_check_runs_on_a_tiny_model(tmp_path, capsys):
    from klotski.commands.create_model import create_model

    model = create_model(tmp_path / "m", "mixtral", "tiny", layers=2, dtype="bfloat16")
    spec = importlib.util.spec_from_file_location("planner_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--model", str(model), "--configs", "600KB:2", "--num-prompts", "4", "--prompt-len", "4",
                        "--max-tokens", "2", "--sweep", "1,2", "--routing-replay", "", "--in-process",
                        "--offload-dir", str(tmp_path / "off")])
    (row,) = rows
    assert row["predicted_tokens_per_s"] > 0 and row["measured_tokens_per_s"] > 0
    assert set(row["sweep"]) >= {1, 2} and row["planner_vs_best"] > 0
    assert "| device memory |" in capsys.readouterr().out
