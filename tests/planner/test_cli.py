"""`klotski plan` and `klotski profile` from the command line."""

from __future__ import annotations

import json

import pytest

from klotski.cli import main

PLAN_KEYS = {"batch_size", "num_batches", "placement", "memory", "predicted_tokens_per_s", "predicted_bubble_ratio"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """config.json only: the planner never reads weights."""
    from klotski.models.presets import preset_config

    path = tmp_path_factory.mktemp("config-only")
    (path / "config.json").write_text(json.dumps(preset_config("mixtral", "tiny", 3) | {"torch_dtype": "bfloat16"}))
    return path


def test_plan_json_keys(model_dir, capsys):
    rc = main(
        [
            "plan",
            "--model",
            str(model_dir),
            "--device-memory",
            "1MB",
            "--prompt-len",
            "16",
            "--gen-len",
            "4",
            "--num-prompts",
            "8",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert PLAN_KEYS <= set(out)
    assert out["memory"]["device_peak"] <= 1_000_000
    assert out["predicted_tokens_per_s"] > 0 and 0 <= out["predicted_bubble_ratio"] < 1


def test_plan_text_and_trace(model_dir, capsys, tmp_path):
    trace = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                str(model_dir),
                "--device-memory",
                "1MB",
                "--prompt-len",
                "16",
                "--gen-len",
                "4",
                "--hardware",
                "env1",
                "--trace",
                str(trace),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for word in ("policy:", "memory:", "predicted:", "binding:", "estimate from public figures"):
        assert word in text
    assert json.loads(trace.read_text())["traceEvents"]


def test_plan_infeasible_exits_2(model_dir, capsys):
    rc = main(["plan", "--model", str(model_dir), "--device-memory", "10KB", "--prompt-len", "16", "--gen-len", "4"])
    assert rc == 2
    assert "device memory of at least" in capsys.readouterr().err


def test_plan_huge_model_from_preset_is_instant(capsys):
    assert (
        main(
            [
                "plan",
                "--preset",
                "mixtral-8x22b",
                "--hardware",
                "env2",
                "--device-memory",
                "80GiB",
                "--host-memory",
                "800GiB",
                "--prompt-len",
                "64",
                "--gen-len",
                "2",
                "--batch-size",
                "4",
                "--num-batches",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["memory"]["weights"]["host"] > 0


def test_profile_measures_then_reuses_the_cache(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KLOTSKI_HOME", str(tmp_path / "home"))  # not the session's (stub) profiles
    args = [
        "profile",
        "--model",
        str(model_dir),
        "--reps",
        "1",
        "--disk-size",
        "8MiB",
        "--disk-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "p.json"),
    ]
    assert main(args) == 0
    first = capsys.readouterr()
    profile = json.loads(first.out)
    assert profile["source"] == "measured" and profile["disk_gbps"] > 0
    assert profile["compute_slowdown_under_io"] >= 1.0 and profile["disk_gbps_beside_compute"] > 0
    fits = next(iter(profile["ops"].values()))
    assert {"expert", "gate", "attention", "head"} <= set(fits)
    assert main(args) == 0
    assert "cached profile" in capsys.readouterr().err
    # plan picks the cached measurement up by itself
    assert (
        main(
            [
                "plan",
                "--model",
                str(model_dir),
                "--device-memory",
                "1MB",
                "--prompt-len",
                "16",
                "--gen-len",
                "4",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["profile"]["from"].startswith("cached:")
