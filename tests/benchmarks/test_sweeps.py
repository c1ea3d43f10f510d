"""benchmarks/sweeps.py and benchmarks/results.py: the ladder sweep on a tiny model, and the
results folder's latest + archive."""

from __future__ import annotations

import json
import os

from benchmarks import results, sweeps


def test_ladder_runs_every_schedule_and_prints_them(tmp_path, tiny_mixtral, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are subprocesses; one thread each on a shared machine
    out = tmp_path / "ladder"
    assert (
        sweeps.main(
            [
                "ladder",
                str(tiny_mixtral),
                "--replay",
                "none",
                "--prompts",
                "3",
                "--max-tokens",
                "2",
                "--batch-size",
                "2",
                "--num-batches",
                "2",
                "--device-memory",
                "1GiB",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "latest.jsonl").read_text().splitlines()]
    assert [r["policy"]["schedule"] for r in rows] == list(sweeps.LADDER)
    assert [r["policy"]["num_batches"] for r in rows] == [1, 1, 2, 2, 2]
    assert all(r["generated_tokens"] == 6 and r["policy"]["batch_size"] == 2 for r in rows)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["schedule", "bs", "n"]
    assert [line.split()[0] for line in printed[1:]] == list(sweeps.LADDER)


def test_publish_moves_the_previous_result_to_the_archive(tmp_path):
    folder = tmp_path / "bench"
    results.publish(folder, {"latest.json": "1", "latest.md": "one"})
    for f in folder.iterdir():
        os.utime(f, (0, 86400 * 365 + 43200))  # written at noon on 1971-01-01
    results.publish(folder, {"latest.json": "2"})
    assert (folder / "latest.json").read_text() == "2" and not (folder / "latest.md").exists()
    (old,) = (folder / "archive").iterdir()
    assert old.name == "1971-01-01"
    assert (old / "latest.json").read_text() == "1" and (old / "latest.md").read_text() == "one"
    results.publish(folder, {"latest.json": "3"})
    assert sorted(p.name for p in (folder / "archive").iterdir())[0] == "1971-01-01"
    assert len(list((folder / "archive").iterdir())) == 2
