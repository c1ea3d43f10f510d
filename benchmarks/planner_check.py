"""Measured vs predicted: does the planner's prediction hold, and is its n good? (issue 4's done-when)

For each configuration (device budget, bs) on one checkpoint it runs
  1. `klotski generate --json` with only --batch-size: the planner picks n and reports predicted_tokens_per_s;
  2. the same with --num-batches for each n of a sweep;
and prints measured vs predicted tok/s and the planner's n against the best swept n.

    .venv/bin/python benchmarks/planner_check.py --model /work/bench-ckpt/mixtral-8x7b-2l --profile-first

Run `klotski profile --model DIR` first (or pass --profile-first) so predictions use this machine's
measured op times rather than the built-in estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIGS = ("2.5GiB:4", "3.5GiB:8", "4.5GiB:16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/bench-ckpt/mixtral-8x7b-2l")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="DEVICE_MEMORY:BS pairs")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--sweep", default="1,2,4,8", help="n values to sweep (capped at num_prompts / bs)")
    p.add_argument(
        "--routing-replay",
        default="mixtral-8x7b",
        help="real routing for the random-weight checkpoint ('' for the checkpoint's own router)",
    )
    p.add_argument("--offload-dir", help="offload directory (default: the engine's)")
    p.add_argument("--profile-first", action="store_true", help="run `klotski profile --model` before")
    p.add_argument("--in-process", action="store_true", help="call the CLI in this process (tests; tiny models)")
    p.add_argument("--out", help="also write the rows as JSON lines")
    return p.parse_args(argv)


def klotski(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run one klotski command and parse its JSON output."""
    if args.in_process:
        from klotski.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
        out = buf.getvalue()
    else:
        proc = subprocess.run([sys.executable, "-m", "klotski", *argv], capture_output=True, text=True)
        rc, out = proc.returncode, proc.stdout
        if rc:
            sys.stderr.write(proc.stderr)
    if rc:
        raise SystemExit(f"klotski {' '.join(argv)} failed with exit code {rc}")
    return json.loads(out)


def generate(args, input_path: str, budget: str, bs: int, n: int | None) -> dict:
    argv = [
        "generate",
        "--model",
        args.model,
        "--input",
        input_path,
        "--max-tokens",
        str(args.max_tokens),
        "--ignore-eos",
        "--device-memory",
        budget,
        "--batch-size",
        str(bs),
        "--json",
    ]
    argv += ["--num-batches", str(n)] if n else []
    argv += ["--routing-replay", args.routing_replay] if args.routing_replay else []
    argv += ["--offload-dir", args.offload_dir] if args.offload_dir else []
    return klotski(args, argv)["stats"]


def check(args, input_path: str, budget: str, bs: int) -> dict:
    """One configuration: the planner's run, then the sweep."""
    planned = generate(args, input_path, budget, bs, None)
    cap = max(1, -(-args.num_prompts // bs))
    sweep = {
        n: generate(args, input_path, budget, bs, n)["tokens_per_s"]
        for n in sorted({int(v) for v in args.sweep.split(",")} | {planned["policy"]["num_batches"]})
        if n <= cap
    }
    best_n = max(sweep, key=sweep.get)
    predicted, measured = planned.get("predicted_tokens_per_s"), planned["tokens_per_s"]
    return {
        "device_memory": budget,
        "batch_size": bs,
        "planner_n": planned["policy"]["num_batches"],
        "predicted_tokens_per_s": predicted,
        "measured_tokens_per_s": measured,
        "error": (measured - predicted) / predicted if predicted else None,
        "predicted_bubble_ratio": (planned.get("planner") or {}).get("predicted_bubble_ratio"),
        "measured_bubble_ratio": planned["bubble_ratio"],
        "profile": (planned.get("planner") or {}).get("profile"),
        "sweep": sweep,
        "best_n": best_n,
        "planner_vs_best": measured / sweep[best_n] if sweep[best_n] else None,
    }


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| device memory | bs | planner n | predicted tok/s | measured tok/s | error | bubble pred / meas "
        "| best n (tok/s) | planner n / best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device_memory']} | {r['batch_size']} | {r['planner_n']} | {r['predicted_tokens_per_s']:.3f} "
            f"| {r['measured_tokens_per_s']:.3f} | {r['error']:+.1%} | {r['predicted_bubble_ratio']:.2f} / "
            f"{r['measured_bubble_ratio']:.2f} | {r['best_n']} ({r['sweep'][r['best_n']]:.3f}) "
            f"| {r['planner_vs_best']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.profile_first:
        klotski(args, ["profile", "--model", args.model])
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in range(args.num_prompts):
            ids = [1 + (7 * i + 13 * j) % 500 for j in range(args.prompt_len)]
            f.write(json.dumps({"prompt_token_ids": ids}) + "\n")
    try:
        rows = []
        for config in args.configs:
            budget, bs = config.split(":")
            rows.append(check(args, f.name, budget, int(bs)))
            print(f"done {config}", file=sys.stderr)
    finally:
        Path(f.name).unlink()
    print(format_rows(rows))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
