"""benchmarks/plan_vs_measured.py's core at tiny shapes (docs/planner.md has its figures at Mixtral-8x7B's)."""

from __future__ import annotations

import json

import pytest

from benchmarks import plan_vs_measured


@pytest.mark.real_timing  # the fresh home's first plan measures a real (quick) profile
def test_plan_vs_measured_from_a_fresh_home(tmp_path, capsys):
    result = plan_vs_measured.main(
        [
            "--preset",
            "tiny",
            "--layers",
            "2",
            "--device-memory",
            "600KB",
            "--host-memory",
            "0",
            "--num-prompts",
            "8",
            "--prompt-len",
            "4",
            "--gen-len",
            "2",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "results"),
            "--in-process",
        ]
    )
    plan, builtin, own = result["rows"]
    assert result["profile_measure_s"] is not None and result["profile_line"].startswith("klotski: no profile")
    assert result["plan"]["profile"]["from"].startswith("measured now: ")
    assert result["profile"]["disk_gbps"] > 0 and "expert" in result["profile"]["ops"]
    for row in (plan, builtin, own):
        assert row["predicted_tokens_per_s"] > 0 and row["measured_tokens_per_s"] > 0
        assert row["error"] == pytest.approx(row["measured_tokens_per_s"] / row["predicted_tokens_per_s"] - 1)
    # The builtin row predicts the same bs and n as the measured plan, from the estimate.
    assert (builtin["batch_size"], builtin["num_batches"]) == (plan["batch_size"], plan["num_batches"])
    assert result["within_target"] == (abs(plan["error"]) <= plan_vs_measured.TARGET)
    assert result["machine"]["cpu"] and "cpu_flags" in result["machine"]["fingerprint"]
    written = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert written["rows"] == result["rows"]
    md = (tmp_path / "results" / "latest.md").read_text()
    assert (
        f"| {plan['predicted_tokens_per_s']:.3f} | {plan['measured_tokens_per_s']:.3f} | {plan['error']:+.1%} |" in md
    )
    assert md in capsys.readouterr().out
