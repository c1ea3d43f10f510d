"""The prefetcher's subcommands through `klotski.cli.main`: success is 0, user errors are 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klotski.cli import main


def test_make_trace_calibrate_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, table = str(tmp_path / "t.npz"), str(tmp_path / "table.json")
    assert (
        main(
            [
                "make-trace",
                "--table",
                "mixtral-8x7b",
                "--num-seqs",
                "16",
                "--tokens",
                "3",
                "--seed",
                "1",
                "--flatten",
                "0.2",
                "--out",
                trace,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "split-trace",
                "--trace",
                trace,
                "--train-out",
                str(tmp_path / "a.npz"),
                "--held-out-out",
                str(tmp_path / "b.npz"),
            ]
        )
        == 0
    )
    assert main(["calibrate", "--from-trace", str(tmp_path / "a.npz"), "--out", table, "--path-length", "2"]) == 0
    capsys.readouterr()
    assert (
        main(["prefetch-eval", "--table", table, "--trace", str(tmp_path / "b.npz"), "--group-size", "4", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["path_length"] == 2
    assert set(report["predictors"]["correlation"]) >= {"coverage", "oracle_coverage", "per_layer"}
    assert main(["prefetch-eval", "--table", "mixtral-8x7b", "--trace", trace]) == 0
    assert "correlation" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--out", "x.json"],
        ["calibrate", "--model", "m", "--input", "p.jsonl"],
        ["calibrate", "--from-trace", "missing.npz", "--out", "x.json"],
        ["prefetch-eval", "--table", "missing.json", "--trace", "t.npz"],
        ["make-trace", "--table", "mixtral-8x7b", "--num-seqs", "0", "--tokens", "1", "--out", "x.npz"],
    ],
)
def test_user_errors_exit_2(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2


def test_eval_rejects_a_table_of_another_model(tmp_path: Path) -> None:
    trace = str(tmp_path / "t.npz")
    assert main(["make-trace", "--table", "mixtral-8x22b", "--num-seqs", "2", "--tokens", "1", "--out", trace]) == 0
    assert main(["prefetch-eval", "--table", "mixtral-8x7b", "--trace", trace]) == 2
