"""Two sweeps of `klotski generate` on one checkpoint, without a memory cgroup (reads are O_DIRECT,
so the page cache does not help), real Mixtral routing replayed:

    python -m benchmarks.sweeps ladder CKPT [--device-memory 2.5GiB] [--prompts 1024] [--max-tokens 4]
                                            [--batch-size 128] [--num-batches 8]
    python -m benchmarks.sweeps prefetch-effect CKPT [--device-memory 2.5GiB] [--prompts 64] [--max-tokens 8]
                                                     [--batch-size 16] [--num-batches 4]
                                                     [--replay none --table TABLE.json --input PROMPTS.jsonl]

`ladder`: every --schedule on the same prompts and budget; sequential and overlap run one batch at
a time (n = 1), the others share each layer across n batches. `prefetch-effect`: the klotski
schedule with hot experts from the correlation table, from frequencies learnt online, and none
(K = 0); a trained model's own routing with `--replay none`, its table and its prompts (the
first --prompts lines of --input). Each writes one JSON line per run (the run's stats) to
benchmarks/results/<sweep>/latest.jsonl, archiving the previous one (benchmarks/results/README.md),
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.results import publish

BIN = Path(sys.executable).parent
LADDER = ("sequential", "overlap", "multibatch", "hot", "klotski")


def _generate(args, inputs: Path, schedule: str, num_batches: int, extra: list[str], label: str | None) -> dict:
    out = subprocess.run(
        [
            str(BIN / "klotski"),
            "generate",
            "--model",
            str(args.checkpoint),
            "--input",
            str(inputs),
            "--max-tokens",
            str(args.max_tokens),
            "--ignore-eos",
            "--device-memory",
            args.device_memory,
            "--schedule",
            schedule,
            "--batch-size",
            str(args.batch_size),
            "--num-batches",
            str(num_batches),
            *(["--routing-replay", args.replay] if args.replay != "none" else []),
            "--json",
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    stats = json.loads(out)["stats"]
    stats.pop("placement", None)
    return stats | ({"label": label} if label else {})


def _inputs(kind: str, count: int, path: Path, given: Path | None = None) -> None:
    """The prompts: the first `count` lines of `given`, else fixed token ids for the ladder and short
    text requests for the prefetch sweep."""
    if given is not None:
        path.write_text("".join(given.read_text().splitlines(keepends=True)[:count]))
        return
    with path.open("w") as f:
        for i in range(1, count + 1):
            record = (
                {"prompt_token_ids": [1, i % 300 + 5, 17, 42, 99, 7, 250, 33]}
                if kind == "ladder"
                else {"prompt": f"Request {i}: summarise the history of mixture-of-experts language models."}
            )
            f.write(json.dumps(record) + "\n")


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "prompts.jsonl"
        _inputs(args.sweep, args.prompts, inputs, args.input)
        if args.sweep == "ladder":
            return [
                _generate(args, inputs, s, 1 if s in ("sequential", "overlap") else args.num_batches, [], None)
                for s in LADDER
            ]
        hot = (("correlation", ["--prefetch-table", args.table]), ("frequency", []), ("none", ["--num-hot", "0"]))
        return [_generate(args, inputs, "klotski", args.num_batches, extra, label) for label, extra in hot]


def table(sweep: str, rows: list[dict]) -> str:
    if sweep == "ladder":
        lines = [
            f"{'schedule':<11} {'bs':>4} {'n':>3} {'tok/s':>7} {'wall s':>7} {'prefill s':>9} {'bubble':>7} "
            f"{'GB read':>8} {'peak dev GB':>11}"
        ]
        for r in rows:
            p = r["policy"]
            lines.append(
                f"{p['schedule']:<11} {p['batch_size']:>4} {p['num_batches']:>3} {r['tokens_per_s']:>7.2f} "
                f"{r['wall_s']:>7.1f} {r['prefill_s']:>9.1f} {r['bubble_ratio']:>7.3f} "
                f"{sum(r['bytes_read'].values()) / 1e9:>8.2f} {r['peak_bytes']['device'] / 1e9:>11.2f}"
            )
        return "\n".join(lines)
    lines = [f"{'hot experts from':<17} {'tok/s':>7} {'wall s':>7} {'bubble s':>9} {'bubble':>7} {'GB read':>8}"]
    for r in rows:
        lines.append(
            f"{r['label']:<17} {r['tokens_per_s']:>7.2f} {r['wall_s']:>7.1f} {r['bubble_s']:>9.2f} "
            f"{r['bubble_ratio']:>7.3f} {sum(r['bytes_read'].values()) / 1e9:>8.2f}"
        )
    return "\n".join(lines)


DEFAULTS = {
    "ladder": {"prompts": 1024, "max_tokens": 4, "batch_size": 128, "num_batches": 8},
    "prefetch-effect": {"prompts": 64, "max_tokens": 8, "batch_size": 16, "num_batches": 4},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks.sweeps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("sweep", choices=sorted(DEFAULTS))
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--device-memory", default="2.5GiB")
    p.add_argument("--prompts", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-batches", type=int)
    p.add_argument("--replay", default="mixtral-8x7b", help="--routing-replay SOURCE, or none (own routing)")
    p.add_argument("--table", default="mixtral-8x7b", help="prefetch-effect: the correlation table of the first run")
    p.add_argument("--input", type=Path, help="prompts (JSONL) instead of the built-in ones")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<sweep>)")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.sweep].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows = run(args)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:  # a folder given is the caller's to manage
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest.jsonl").write_text(text)
    else:
        publish(args.sweep.replace("-", "_"), {"latest.jsonl": text})
    print(table(args.sweep, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
