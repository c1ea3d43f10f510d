"""Predicted vs measured from a fresh machine state (issue 17's done-when: within 25%).

From an empty KLOTSKI_HOME, as a newcomer runs it:
  1. `klotski plan --json` for the workload: no profile is cached, so it measures one (the quick
     automatic profile) and says so on stderr;
  2. `klotski plan --hardware builtin --json` at the same bs and n: the uncalibrated estimate, for comparison;
  3. `klotski generate --json` with the budgets alone (the engine plans by itself; the profile
     step 1 cached is reused), then, if its bs / n differ from the plan's, again at the plan's;
and writes predicted vs measured tok/s, the error, the profile's time and the machine to
benchmarks/results/plan_vs_measured/latest.json (+ .md), archiving the previous result.

    python -m benchmarks.plan_vs_measured        # Mixtral-8x7B shapes, 1 layer (a few minutes)

The checkpoint (random weights, `klotski create-model`) and its offload dir are cached under
$KLOTSKI_BENCH_CACHE (default ~/.cache/klotski-bench) so a second run skips writing them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine, results
from benchmarks.workload import Workload, write_jsonl

TARGET = 0.25  # |measured / predicted - 1| the issue asks for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="mixtral")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--device-memory", default="1536MiB")
    p.add_argument("--host-memory", default="1GiB")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument(
        "--cache", default=os.environ.get("KLOTSKI_BENCH_CACHE") or str(Path.home() / ".cache/klotski-bench")
    )
    p.add_argument("--out", default="plan_vs_measured", help="results folder (a name under benchmarks/results/)")
    p.add_argument("--in-process", action="store_true", help="call the CLI in this process (tests; tiny models)")
    return p.parse_args(argv)


def klotski(args: argparse.Namespace, home: Path, argv: list[str]) -> tuple[dict, str, float]:
    """One klotski command under KLOTSKI_HOME=home: (its JSON stdout, its stderr, wall seconds)."""
    start = time.perf_counter()
    if args.in_process:
        from klotski.cli import main

        out, err, old = io.StringIO(), io.StringIO(), os.environ.get("KLOTSKI_HOME")
        os.environ["KLOTSKI_HOME"] = str(home)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        finally:
            if old is None:
                os.environ.pop("KLOTSKI_HOME", None)
            else:
                os.environ["KLOTSKI_HOME"] = old
        stdout, stderr = out.getvalue(), err.getvalue()
    else:
        env = os.environ | {"KLOTSKI_HOME": str(home)}
        proc = subprocess.run([sys.executable, "-m", "klotski", *argv], capture_output=True, text=True, env=env)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    if rc:
        sys.stderr.write(stderr)
        raise SystemExit(f"klotski {' '.join(argv)} failed with exit code {rc}")
    return json.loads(stdout), stderr, time.perf_counter() - start


def checkpoint(args: argparse.Namespace) -> Path:
    """The random-weight checkpoint, made once under the bench cache."""
    path = Path(args.cache) / f"{args.preset}-{args.layers}l"
    if not (path / "config.json").is_file():
        from klotski.checkpoint.create import create_model

        create_model(path, args.family, args.preset, layers=args.layers)
    return path


def run(args: argparse.Namespace) -> dict:
    model = checkpoint(args)
    offload = Path(args.cache) / "offload" / model.name  # the repack is reused; the profile is not
    budgets = ["--device-memory", args.device_memory, "--host-memory", args.host_memory]
    work = [
        "--prompt-len",
        str(args.prompt_len),
        "--gen-len",
        str(args.gen_len),
        "--num-prompts",
        str(args.num_prompts),
    ]
    with tempfile.TemporaryDirectory(prefix="klotski-fresh-home-") as tmp:
        home = Path(tmp) / "home"  # fresh: no profile cached, as on a newcomer's machine
        plan_argv = ["plan", "--model", str(model), *budgets, "--offload-dir", str(offload), *work, "--json"]
        plan, plan_err, plan_wall = klotski(args, home, plan_argv)
        bs, n = plan["batch_size"], plan["num_batches"]
        builtin, _, _ = klotski(
            args, home, [*plan_argv, "--hardware", "builtin", "--batch-size", str(bs), "--num-batches", str(n)]
        )
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        prompts = write_jsonl(
            Workload("plan-vs-measured", args.num_prompts, args.prompt_len, args.gen_len, "issue 17"),
            vocab,
            Path(tmp) / "prompts.jsonl",
        )
        gen_argv = ["generate", "--model", str(model), *budgets, "--offload-dir", str(offload), "--input", str(prompts)]
        gen_argv += ["--max-tokens", str(args.gen_len), "--ignore-eos", "--json"]
        engine, engine_err, _ = klotski(args, home, gen_argv)
        own = engine["stats"]
        same = (own["policy"]["batch_size"], own["policy"]["num_batches"]) == (bs, n)
        fixed = own
        if not same:  # the engine plans its placement for a nominal workload: measure the plan's policy too
            fixed = klotski(args, home, [*gen_argv, "--batch-size", str(bs), "--num-batches", str(n)])[0]["stats"]
        profiles = sorted((home / "profiles").glob("*.json"))
        profile = json.loads(profiles[0].read_text()) if profiles else {}
    measured_s = re.search(r"measured one in ([0-9.]+) s", plan_err)
    rows = [
        _row("plan (measured profile)", plan, fixed),
        _row("plan --hardware builtin", builtin, fixed),
        _row("generate's own plan", own, own),
    ]
    return {
        "command": "python -m benchmarks.plan_vs_measured " + " ".join(sys.argv[1:]),
        "model": f"{args.preset}, {args.layers} layer(s), random weights ({model})",
        "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len},
        "budgets": {"device_memory": args.device_memory, "host_memory": args.host_memory},
        "plan": {"batch_size": bs, "num_batches": n, "num_hot": plan["num_hot"], "profile": plan["profile"]},
        "generate_policy": own["policy"] | {"same_as_plan": same},
        "profile_measure_s": float(measured_s.group(1)) if measured_s else None,
        "plan_wall_s": plan_wall,
        "profile_line": next((l for l in plan_err.splitlines() if "no profile for this machine" in l), None),
        "profile": {
            k: profile.get(k)
            for k in ("disk_gbps", "disk_gbps_beside_compute", "compute_slowdown_under_io", "host_to_device_gbps")
        }
        | {"ops": next(iter(profile.get("ops", {}).values()), {})},
        "engine_stderr_profile": [l for l in engine_err.splitlines() if "profile" in l],
        "rows": rows,
        "within_target": abs(rows[0]["error"]) <= TARGET,
        "machine": machine.describe() | {"fingerprint": profile.get("machine")},
    }


def _row(name: str, predicted: dict, stats: dict) -> dict:
    """Prediction (a plan's JSON or a run's stats) beside a run's measurement."""
    pred, meas = predicted["predicted_tokens_per_s"], stats["tokens_per_s"]
    planner = predicted.get("planner", predicted)
    return {
        "name": name,
        "predicted_tokens_per_s": pred,
        "measured_tokens_per_s": meas,
        "error": meas / pred - 1,
        "predicted_wall_s": planner.get("predicted_wall_s"),
        "predicted_prefill_s": planner.get("predicted_prefill_s"),
        "measured_wall_s": stats["wall_s"],
        "measured_prefill_s": stats["prefill_s"],
        "measured_decode_s": stats["decode_s"],
        "batch_size": stats["policy"]["batch_size"],
        "num_batches": stats["policy"]["num_batches"],
    }


def format_md(result: dict) -> str:
    m, fp = result["machine"], result["machine"].get("fingerprint") or {}
    lines = [
        "# Plan vs measured from a fresh KLOTSKI_HOME",
        "",
        f"`{result['command']}`",
        "",
        f"Model: {result['model']}; {result['workload']['num_prompts']} prompts x "
        f"{result['workload']['prompt_len']} tokens, {result['workload']['gen_len']} generated; budgets "
        f"device {result['budgets']['device_memory']}, host {result['budgets']['host_memory']}.",
        f"Machine: {m['cpu']} ({', '.join(fp.get('cpu_flags', [])) or 'no listed flags'}), {m['cores']} cores, "
        f"load {', '.join(f'{v:.1f}' for v in m['load_avg'])}, torch {m['torch']}.",
        f"Profile: measured in {result['profile_measure_s']} s by the first plan ({result['profile_line']}).",
        f"Plan: bs {result['plan']['batch_size']}, n {result['plan']['num_batches']}; generate's own policy: "
        f"bs {result['generate_policy']['batch_size']}, n {result['generate_policy']['num_batches']}"
        f"{' (the same)' if result['generate_policy']['same_as_plan'] else ' (differs)'}.",
        "",
        "| prediction | bs | n | predicted tok/s | measured tok/s | error | predicted wall / prefill s "
        "| measured wall / prefill / decode s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['num_batches']} | {r['predicted_tokens_per_s']:.3f} "
            f"| {r['measured_tokens_per_s']:.3f} | {r['error']:+.1%} | {r['predicted_wall_s']:.2f} / "
            f"{r['predicted_prefill_s']:.2f} | {r['measured_wall_s']:.2f} / {r['measured_prefill_s']:.2f} / "
            f"{r['measured_decode_s']:.2f} |"
        )
    verdict = "within" if result["within_target"] else "NOT within"
    lines += ["", f"The measured-profile plan is {verdict} {TARGET:.0%} of the measurement."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    md = format_md(result)
    out = results.publish(args.out, {"latest.json": json.dumps(result, indent=2) + "\n", "latest.md": md})
    print(md)
    print(f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
