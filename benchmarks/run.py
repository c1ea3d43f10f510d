"""The benchmark harness: `python -m benchmarks.run [--quick]` (`make bench`, `make bench-quick`).

Every engine runs in its own process inside a memory cgroup with the same cap, below the
checkpoint's size, after the checkpoint's pages are dropped from the page cache. Results go to
benchmarks/results/bench/ (bench-quick/ for --quick): latest.json, latest.md (the table) and plots;
the previous result moves to that folder's archive/ (benchmarks/results/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import cgroup, machine, report, results
from benchmarks.workload import Workload, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LADDER = ("sequential", "overlap", "multibatch", "hot", "klotski")
REPLAY = "mixtral-8x7b"
# klotski picks its compute dtype on the machine (runtime/compute_dtype.py): on a CPU with bf16
# units bf16, on one without, fp32 over tile-upcast weights where that measures faster.
DTYPE = "auto"
# One expert read (~0.25 s here) costs as much as ~40 tokens through that expert (352 MFLOP each at
# ~60 GFLOP/s); top-2 of 8 sends each expert a quarter of the tokens, so ~160 tokens per forward step
# balance I/O and compute. Decode steps of 128-256 sequences sit there; prefill is compute-heavy.
BALANCED = Workload("balanced", 64, 8, 6, "decode steps of 64 sequences: expert reads ~ expert compute here")
BALANCED_QUICK = Workload("balanced", 64, 8, 4, "decode steps of 64 sequences: expert reads ~ expert compute here")
PAPER = Workload("paper-scaled", 32, 64, 4, "the paper's input 512 / output 32 (16:1) scaled 8x down: prefill-heavy")


@dataclass
class Plan:
    """Which runs a harness invocation makes."""

    workloads: list[Workload]
    batch_size: int  # bs for every ladder rung
    num_batches: int  # n for the multi-batch rungs
    n_sweep: list[int]  # klotski's n at bs (Fig. 14)
    hf_batch_sizes: list[int]
    repeats: int  # of the first workload; the others run once (time: ~30 min here)


QUICK = Plan([BALANCED_QUICK], 16, 4, [], [64], 1)
FULL = Plan([BALANCED, PAPER], 16, 4, [1, 2, 4], [16, 64], 2)


@dataclass
class Context:
    """Everything one invocation shares: paths, cap, measured machine figures."""

    checkpoint: Path
    hf_checkpoint: Path
    cache: Path
    cap: int
    device_budget: int  # Accelerate's max_memory
    klotski_budget: int  # klotski's --device-memory: its budget counts the KV cache and transients too
    machine: dict = field(default_factory=dict)
    weights_bytes: int = 0
    spec: dict = field(default_factory=dict)


def bench_cache() -> Path:
    """$KLOTSKI_BENCH_CACHE, else ~/.cache/klotski-bench (shared with benchmarks/peers)."""
    return Path(os.environ.get("KLOTSKI_BENCH_CACHE") or Path.home() / ".cache" / "klotski-bench")


def ensure_checkpoints(cache: Path, layers: int, checkpoint: str | None) -> tuple[Path, Path]:
    """The random-weight Mixtral-8x7B-shaped checkpoint and its merged-layout copy for HF, made once."""
    ckpt = Path(checkpoint) if checkpoint else cache / f"mixtral-8x7b-{layers}l"
    if not (ckpt / "config.json").is_file():
        print(f"bench: creating {ckpt} (Mixtral-8x7B shapes, {layers} layers, bf16; once)", file=sys.stderr)
        subprocess.run(
            [
                str(BIN / "klotski"),
                "create-model",
                "--family",
                "mixtral",
                "--preset",
                "mixtral-8x7b",
                "--layers",
                str(layers),
                "--dtype",
                "bfloat16",
                "--out",
                str(ckpt),
            ],
            check=True,
        )
    _ensure_offload_dir(ckpt)
    merged = cache / f"{ckpt.name}-hf-merged"
    if not (merged / "config.json").is_file():
        print(f"bench: re-saving {ckpt} in transformers' merged-expert layout at {merged} (once)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.hf_engine", "prepare", str(ckpt), str(merged)], check=True, cwd=ROOT
        )
    return ckpt, merged


def _ensure_offload_dir(ckpt: Path) -> None:
    """klotski's repacked expert blobs, made here (uncapped, once) so no timed run pays for it."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import OffloadDir, default_offload_dir

    checkpoint = Checkpoint.open(str(ckpt))
    OffloadDir.prepare(checkpoint, default_offload_dir(checkpoint), progress=True)


def ensure_profile(ckpt: Path) -> str:
    """`klotski profile` once for these shapes (cached after), as a user would before planning: the
    planner's policy then uses this machine's measured ops and disk, not the built-in estimate."""
    proc = subprocess.run(
        [str(BIN / "klotski"), "profile", "--model", str(ckpt)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        print(
            f"bench: klotski profile failed; the planner uses its built-in estimate:\n{proc.stderr[-400:]}",
            file=sys.stderr,
        )
        return "built-in estimate (profile failed)"
    profile = json.loads(proc.stdout)
    return (
        f"measured: disk {profile['disk_gbps']:.2f} GB/s alone, "
        f"{profile.get('disk_gbps_beside_compute') or 0:.2f} beside compute"
    )


def measure_machine(ctx: Context) -> dict:
    """Disk (O_DIRECT, page cache dropped; best of 1-2 readers over the checkpoint and klotski's blobs) and
    matmul rates measured now, with the load average."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import default_offload_dir

    sets = {
        "checkpoint": sorted(ctx.checkpoint.glob("*.safetensors")),
        "offload": sorted(default_offload_dir(Checkpoint.open(str(ctx.checkpoint))).glob("*.expert*.bin")),
    }
    cgroup.drop_page_cache([f for fs in sets.values() for f in fs])
    info = machine.describe() | machine.best_disk_bandwidth(sets)
    return info | machine.matmul_rate(ctx.spec["hidden_size"], ctx.spec["intermediate_size"])


def flops(spec: dict, work: Workload) -> float:
    """Matmul FLOPs the workload needs: projections, router, top-k experts per token; head per sample."""
    h, i, e, k = spec["hidden_size"], spec["intermediate_size"], spec["num_local_experts"], spec["num_experts_per_tok"]
    kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
    per_token_layer = 2 * (2 * h * h + 2 * h * kv) + 2 * h * e + k * 3 * 2 * h * i
    tokens = work.num_prompts * (work.prompt_len + work.max_tokens - 1)
    head = work.num_prompts * work.max_tokens * 2 * h * spec["vocab_size"]
    return tokens * per_token_layer * spec["num_hidden_layers"] + head


def compute_rate(m: dict) -> float:
    """The machine's best measured matmul rate at expert shapes (GFLOP/s), any dtype."""
    return max(max(m["matmul_gflops_float32"].values()), max(m["matmul_gflops_bfloat16"].values()))


def lower_bound(ctx: Context, work: Workload, steps: int) -> dict:
    """max(bytes the cap forces to be read / disk rate, FLOPs / best matmul rate), for `steps` forward steps.

    Each forward step needs every weight (with >= 16 tokens a step, every expert is chosen); at
    most `cap` bytes can stay in memory between steps, so each step reads at least the rest.
    """
    must_read = steps * max(0, ctx.weights_bytes - ctx.cap)
    io_s = must_read / (ctx.machine["disk_gbps"] * 1e9)
    rate = compute_rate(ctx.machine) * 1e9
    compute_s = flops(ctx.spec, work) / rate
    return {
        "bound_s": max(io_s, compute_s),
        "bound_io_s": io_s,
        "bound_compute_s": compute_s,
        "bytes_must_read": must_read,
    }


def _record(ctx: Context, work: Workload, res: cgroup.Result, row: dict, steps: int) -> dict:
    wall = row.get("prefill_s", 0.0) + row.get("decode_s", 0.0)
    generated = row.get("generated_tokens", 0)
    row |= {
        "workload": work.name,
        "peak_rss_bytes": res.peak_bytes,
        "oom_killed": res.oom_killed,
        "capped": res.capped,
        "process_s": res.seconds,
        "load_avg": os.getloadavg(),
    }
    if res.returncode != 0 or not generated:
        return row | {"error": (res.stderr or res.stdout)[-800:], "tokens_per_s": None, "efficiency": None}
    return _score(ctx, row | {"tokens_per_s": generated / wall, "wall_s": wall, "forward_steps": steps}, work)


def _score(ctx: Context, row: dict, work: Workload) -> dict:
    """A finished run's lower bound, efficiency and io efficiency at the machine's current rates."""
    row |= lower_bound(ctx, work, row["forward_steps"])
    row["efficiency"] = row["bound_s"] / row["wall_s"]
    if row.get("bytes_read"):  # how close the run came to the disk rate for the bytes it chose to read
        row["io_efficiency"] = row["bytes_read"] / (ctx.machine["disk_gbps"] * 1e9) / row["wall_s"]
    return row


def run_klotski(
    ctx: Context,
    work: Workload,
    schedule: str,
    bs: int | None,
    n: int | None,
    replay: bool,
    repeat: int,
    trace: Path | None = None,
) -> dict:
    """One `klotski generate` run in its own capped process; bs = n = None: the planner picks them."""
    inputs = write_jsonl(work, ctx.spec["vocab_size"], ctx.cache / f"{work.name}-{work.num_prompts}.jsonl")
    cmd = [
        str(BIN / "klotski"),
        "generate",
        "--model",
        str(ctx.checkpoint),
        "--input",
        str(inputs),
        "--max-tokens",
        str(work.max_tokens),
        "--ignore-eos",
        "--json",
        "--dtype",
        DTYPE,
        "--device-memory",
        str(ctx.klotski_budget),
        "--schedule",
        schedule,
    ]
    cmd += ["--batch-size", str(bs), "--num-batches", str(n)] if bs is not None else []
    cmd += ["--routing-replay", REPLAY] if replay else []
    cmd += ["--trace", str(trace)] if trace else []
    cgroup.drop_page_cache([ctx.checkpoint])
    res = cgroup.run_capped(cmd, ctx.cap, f"klotski-{schedule}", env=_env())
    row = {
        "engine": "klotski",
        "schedule": schedule if bs is not None else f"{schedule} (planner)",
        "batch_size": bs,
        "num_batches": n,
        "routing_replay": REPLAY if replay else None,
        "repeat": repeat,
    }
    steps = 0
    if res.returncode == 0:
        out = json.loads(res.stdout)
        stats = out["stats"]
        steps = stats["forward_steps"]
        row |= {
            k: stats[k]
            for k in (
                "generated_tokens",
                "prefill_s",
                "decode_s",
                "bubble_ratio",
                "bubble_s",
                "compute_busy_s",
                "io_busy_s",
                "achieved_bandwidth_gbps",
                "forward_steps",
                "dtype",
                "cache_hits",
                "bytes_from_cache",
            )
            if k in stats
        }
        row |= {
            "batch_size": stats["policy"]["batch_size"],
            "num_batches": stats["policy"]["num_batches"],
            "planner": {k: v for k, v in stats.items() if k.startswith("plan")} or None,
        }
        row |= {
            "bytes_read": sum(stats["bytes_read"].values()),
            "peak_budget_bytes": stats["peak_bytes"]["device"],
            "tokens_sha": _tokens_sha(out["outputs"]),
        }
    return _record(ctx, work, res, row, steps)


def run_hf(ctx: Context, work: Workload, bs: int, repeat: int) -> dict:
    """One transformers + Accelerate disk-offload run in its own capped process."""
    offload = ctx.cache / f"hf-offload-{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.hf_engine",
        "run",
        "--model",
        str(ctx.hf_checkpoint),
        "--offload-folder",
        str(offload),
        "--max-memory",
        str(ctx.device_budget),
        "--num-prompts",
        str(work.num_prompts),
        "--prompt-len",
        str(work.prompt_len),
        "--max-tokens",
        str(work.max_tokens),
        "--batch-size",
        str(bs),
    ]
    cgroup.drop_page_cache([ctx.hf_checkpoint])
    res = cgroup.run_capped(cmd, ctx.cap, f"hf-{bs}", env=_env())
    row = {
        "engine": "hf-accelerate",
        "schedule": "accelerate-disk-offload",
        "batch_size": bs,
        "num_batches": 1,
        "routing_replay": None,
        "repeat": repeat,
        "bubble_ratio": None,
    }
    steps = -(-work.num_prompts // bs) * work.max_tokens
    if res.returncode == 0:
        row |= json.loads(res.stdout.strip().splitlines()[-1])
        row["engine"] = "hf-accelerate"
        # Accelerate reads offloaded weights through safetensors mmaps: at least the bound's bytes per step.
        row["bytes_read"] = None
        row["forward_steps"] = steps
    return _record(ctx, work, res, row, steps)


def _tokens_sha(outputs: list[dict]) -> str:
    return hashlib.sha256(json.dumps([o["token_ids"] for o in outputs]).encode()).hexdigest()[:12]


def _chosen_dtype(runs: list[dict]) -> str | None:
    """The compute dtype klotski's runs reported (auto resolves per machine)."""
    return next((r["dtype"] for r in runs if r.get("engine") == "klotski" and r.get("dtype")), None)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _log(row: dict) -> None:
    tps = row.get("tokens_per_s")
    print(
        f"bench: {row['workload']:<13} {row['engine']:<13} {row['schedule']:<24} bs {row['batch_size']:>3} "
        f"n {row['num_batches']:>2} replay {str(bool(row.get('routing_replay'))):<5} "
        f"tok/s {'FAILED' if tps is None else f'{tps:6.2f}'}  eff {row.get('efficiency') or 0:.2f}  "
        f"peak {((row.get('peak_rss_bytes') or 0) / 2**30):.2f} GiB  load {row['load_avg'][0]:.1f}",
        file=sys.stderr,
        flush=True,
    )


def execute(ctx: Context, plan: Plan, traces: Path) -> list[dict]:
    """Every run of the plan, repeats interleaved so a load spike hits all configurations alike."""
    runs = []

    def add(row: dict) -> None:
        runs.append(row)
        _log(row)

    for repeat in range(plan.repeats):
        for work in plan.workloads if repeat == 0 else plan.workloads[:1]:
            first = repeat == 0 and work is plan.workloads[0]
            bs = plan.batch_size if work is plan.workloads[0] else max(1, work.num_prompts // plan.num_batches)
            for schedule in LADDER:
                n = plan.num_batches if schedule in ("multibatch", "hot", "klotski") else 1
                add(
                    run_klotski(
                        ctx, work, schedule, bs, n, True, repeat, traces / f"{schedule}.json" if first else None
                    )
                )
            add(run_klotski(ctx, work, "klotski", None, None, True, repeat))  # the planner's bs and n
            add(run_klotski(ctx, work, "klotski", bs, plan.num_batches, False, repeat))
            for n in plan.n_sweep if work is plan.workloads[0] else []:
                if n != plan.num_batches:
                    add(run_klotski(ctx, work, "klotski", bs, n, True, repeat))
            for hf_bs in plan.hf_batch_sizes if work is plan.workloads[0] else [work.num_prompts]:
                add(run_hf(ctx, work, hf_bs, repeat))
    return runs


def rebound_on_achieved(ctx: Context, runs: list[dict], works: dict[str, Workload]) -> None:
    """A lower bound must not assume a disk slower than an engine was seen to read: when a run read
    faster (bytes read / its wall time, itself an underestimate of the disk's rate) than the rate
    measured outside the engines, the bound uses the run's rate, and every row is rescored."""
    achieved = max(
        (r["bytes_read"] / r["wall_s"] / 1e9 for r in runs if r.get("bytes_read") and r.get("wall_s")), default=0.0
    )
    if achieved <= ctx.machine["disk_gbps"]:
        return
    ctx.machine = ctx.machine | {
        "disk_gbps_measured": ctx.machine["disk_gbps"],
        "disk_gbps": achieved,
        "disk_rate_source": "achieved by a klotski run (bytes read / wall time): faster "
        "than the measured rate, so the bound uses it",
    }
    for row in runs:
        if row.get("tokens_per_s"):
            _score(ctx, row, works[row["workload"]])


def rescore(ctx: Context, out: Path, traces: Path) -> int:
    """Recompute bounds of a finished run with the fastest rates seen (a lower bound must use the best)."""
    result = json.loads((out / "latest.json").read_text())
    old, new = result["machine"], ctx.machine
    best = dict(old)
    if new["disk_gbps"] > old["disk_gbps"]:
        best |= {k: v for k, v in new.items() if k.startswith("disk_")}
    for key in ("matmul_gflops_float32", "matmul_gflops_bfloat16"):
        best[key] = {r: max(old[key][r], new[key][r]) for r in old[key]}
    best["rescored_from"] = {k: old[k] for k in old if k.startswith(("disk_", "matmul_"))} | {
        "remeasured": {k: new[k] for k in new if k.startswith(("disk_", "matmul_", "load_"))}
    }
    ctx.machine = result["machine"] = best
    works = {w["name"]: Workload(**w) for w in result["config"]["workloads"]}
    for row in result["runs"]:
        if row.get("tokens_per_s"):
            _score(ctx, row, works[row["workload"]])
    rebound_on_achieved(ctx, result["runs"], works)
    result["machine"] = ctx.machine
    report.write(result, out, traces)
    print(f"bench: rescored {out / 'latest.json'}: disk {ctx.machine['disk_gbps']:.2f} GB/s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the reduced run (< 10 min on a 2-core machine)")
    p.add_argument("--layers", type=int, default=2, help="layers of the Mixtral-8x7B-shaped checkpoint")
    p.add_argument("--checkpoint", help="use this checkpoint instead of the cached one")
    p.add_argument("--cap", default="3GiB", help="memory cgroup cap for every engine (below the checkpoint's size)")
    p.add_argument(
        "--device-budget",
        default="2.25GiB",
        help="Accelerate's max_memory inside the cap (the rest: its runtime, activations, transient copies)",
    )
    p.add_argument(
        "--klotski-memory",
        default="2.4GiB",
        help="klotski's --device-memory inside the cap: weights, KV cache and each step's transients are "
        "counted in it; the rest is its process (~0.25 GB) and the page cache of its libraries",
    )
    p.add_argument("--out", help="results folder (default: benchmarks/results/bench, or bench-quick with --quick)")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="re-measure the machine now and recompute every bound of <out>/latest.json with the faster "
        "of the old and new rates (no engine runs)",
    )
    args = p.parse_args(argv)
    from klotski.config import parse_bytes

    plan = QUICK if args.quick else FULL
    cache = bench_cache()
    cache.mkdir(parents=True, exist_ok=True)
    ckpt, merged = ensure_checkpoints(cache, args.layers, args.checkpoint)
    ctx = Context(
        ckpt, merged, cache, parse_bytes(args.cap), parse_bytes(args.device_budget), parse_bytes(args.klotski_memory)
    )
    ctx.spec = json.loads((ckpt / "config.json").read_text())
    ctx.weights_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    no_cgroup = cgroup.available()
    if no_cgroup:
        print(f"bench: WARNING: {no_cgroup}; engines run UNCAPPED and peak figures are missing", file=sys.stderr)
    ctx.machine = measure_machine(ctx) | {
        "cgroup": no_cgroup or "memory cgroup v1, one per run",
        "klotski_profile": ensure_profile(ckpt),
    }
    print(
        f"bench: disk {ctx.machine['disk_gbps']:.2f} GB/s (O_DIRECT), matmul fp32 "
        f"{ctx.machine['matmul_gflops_float32']} bf16 {ctx.machine['matmul_gflops_bfloat16']} GFLOP/s, "
        f"load {ctx.machine['load_avg']}",
        file=sys.stderr,
    )
    out = Path(args.out) if args.out else results.folder("bench-quick" if args.quick else "bench")
    traces = cache / "traces"
    if args.rescore:
        return rescore(ctx, out, traces)
    if not args.out:  # a folder given is the caller's to manage
        results.archive_previous(out)
    traces.mkdir(exist_ok=True)
    t0 = time.time()
    runs = execute(ctx, plan, traces)
    rebound_on_achieved(ctx, runs, {w.name: w for w in plan.workloads})
    config = {
        "mode": "quick" if args.quick else "full",
        "checkpoint": str(ckpt),
        "layers": ctx.spec["num_hidden_layers"],
        "weights_bytes": ctx.weights_bytes,
        "cap_bytes": ctx.cap,
        "device_budget_bytes": ctx.device_budget,
        "klotski_budget_bytes": ctx.klotski_budget,
        "klotski_dtype": DTYPE,
        "klotski_dtype_chosen": _chosen_dtype(runs),
        "workloads": [w.to_dict() for w in plan.workloads],
        "ladder_bs": plan.batch_size,
        "ladder_n": plan.num_batches,
        "n_sweep": plan.n_sweep,
        "hf_batch_sizes": plan.hf_batch_sizes,
        "repeats": plan.repeats,
        "routing_replay": REPLAY,
        "elapsed_s": time.time() - t0,
        "command": "make bench-quick" if args.quick else "make bench",
        "load_avg_end": os.getloadavg(),
    }
    result = {"machine": ctx.machine, "config": config, "runs": runs}
    report.write(result, out, traces)
    print(f"bench: wrote {out / 'latest.json'}, {out / 'latest.md'} and plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
