"""`make bench-peers`: llama.cpp and klotski side by side, same checkpoint, same memory cgroup cap.

Builds llama.cpp once and converts the checkpoint to GGUF once (both cached outside the repository),
then runs, each in its own capped process: llama-batched-bench in f16 and bf16 at every batch size,
and `klotski generate` at the same prompt/output lengths (32-token prompts as prompt_token_ids,
EOS ignored) at every batch size, the runs at one sequence count one after another. Writes
benchmarks/results/peers/latest.json (latest.json's run schema, plus the curve: each engine's best
per sequence count, the ratio, issue 17's target and the ceiling the cap allows) with klotski's
traces beside it, archiving the previous result, and prints both tables. The load average is
recorded with every run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks import cgroup, machine, results
from benchmarks import run as rig
from benchmarks.peers import convert
from benchmarks.peers.llama_cpp import batched_bench_cmd, parse_batched_bench
from benchmarks.workload import Workload, write_jsonl

DEFAULT_OUT = results.folder("peers") / "latest.json"

GiB = 1 << 30
_TIME_FMT = "peers-time: maxrss_kb=%M inblock=%I"


def _timed_cmd(cmd: list[str]) -> list[str]:
    """cmd under /usr/bin/time: its peak RSS and block reads (mmap faults included) per process."""
    return ["/usr/bin/time", "-f", _TIME_FMT, *cmd]


def _time_figures(stderr: str) -> tuple[int | None, int | None]:
    m = re.search(r"peers-time: maxrss_kb=(\d+) inblock=(\d+)", stderr)
    return (int(m[1]) * 1024, int(m[2]) * 512) if m else (None, None)


def must_read(config: dict, weights_bytes: float, cap: float, sequences: int, prompt_len: int, gen_len: int) -> float:
    """Bytes the cap forces a run to read: per forward step, the experts its tokens use (expected under
    uniform routing, which random weights approach: E (1 - (1 - k/E)^T) per layer for T tokens) times the
    share of all experts the cap cannot hold beside the dense weights. With every expert used this is the
    rig's weights - cap a step (benchmarks/run.py); with one sequence a step uses 2 of 8 per layer, and
    most of what it needs could be cached, which the rig's formula (meant for >= 16 tokens a step) missed."""
    e, k, layers = config["num_local_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    width = 2 if config.get("torch_dtype", "bfloat16") in ("bfloat16", "float16") else 4
    expert = 3 * config["hidden_size"] * config["intermediate_size"] * width
    experts = layers * e * expert
    dense = max(0.0, weights_bytes - experts)
    uncached = min(1.0, max(0.0, 1 - (cap - dense) / experts))  # 1 when the dense weights alone fill the cap
    dense_read = max(0.0, dense - cap)  # per step, when they do not fit
    total = 0.0
    for tokens in [sequences * prompt_len] + [sequences] * (gen_len - 1):  # prefill, then decode steps
        used = layers * e * (1 - (1 - k / e) ** tokens)
        total += used * expert * uncached + dense_read
    return total


def lower_bound(run: dict, args, config: dict, figures: dict) -> dict:
    """max(bytes the cap forces to be read / disk rate, FLOPs / best matmul rate) for this run's sequences
    (the rig's bound, with must_read's bytes); plus how close the run came to the disk for what it read."""
    work = Workload("peers", run["sequences"], args.prompt_len, args.gen_len, "")
    forced = must_read(config, args.weights_bytes, args.cap, run["sequences"], args.prompt_len, args.gen_len)
    io_s = forced / (figures["disk_gbps"] * 1e9)
    compute_s = rig.flops(config, work) / (rig.compute_rate(figures) * 1e9)
    bound = max(io_s, compute_s)
    return {
        "bound_s": bound,
        "bound_io_s": io_s,
        "bound_compute_s": compute_s,
        "bytes_must_read": forced,
        "efficiency": bound / run["wall_s"],
        "io_efficiency": (run["bytes_read"] or 0) / (figures["disk_gbps"] * 1e9) / run["wall_s"],
    }


def achieved_gbps(runs: list[dict]) -> float:
    """The fastest read rate a klotski run showed (its bytes read / its wall time, itself an underestimate).
    llama.cpp's rows do not count: their block reads include model load and warmup, outside their timing."""
    return max(
        (
            r["bytes_read"] / r["wall_s"] / 1e9
            for r in runs
            if r.get("engine") == "klotski" and r.get("bytes_read") and r.get("wall_s")
        ),
        default=0.0,
    )


def rebound(runs: list[dict], args, config: dict, figures: dict) -> None:
    """Every row's bound at the fastest disk rate seen: the measured samples (one stream, O_DIRECT; rates
    vary up to 3x between moments on this shared machine) or a klotski run's (two streams read faster),
    since a lower bound must not assume a disk slower than one an engine was seen to read."""
    figures["disk_gbps_achieved"] = achieved_gbps(runs)
    figures["disk_gbps"] = max(*figures["disk_gbps_samples"], figures["disk_gbps_achieved"])
    figures["disk_rate_source"] = (
        "achieved by a klotski run"
        if figures["disk_gbps"] == figures["disk_gbps_achieved"]
        else "measured (O_DIRECT, one stream)"
    )
    for run in runs:
        if "error" not in run:
            run |= lower_bound(run, args, config, figures)


TARGETS = {1: 1.0, **{s: 2.0 for s in (8, 16, 32, 64, 128, 256)}}  # issue 17: klotski / llama.cpp


def curve(runs: list[dict], args, config: dict) -> list[dict]:
    """Per sequence count both engines ran: each one's fastest run (any dtype, any bs x n), the ratio,
    issue 17's target, and the ceiling: llama.cpp's bytes read over the bytes the cap forces (must_read),
    the ratio an engine that read only the forced bytes would reach at llama.cpp's own read rate
    (both are disk-bound under the cap). A target above the ceiling cannot be met by reading less."""
    best: dict[tuple[str, int], dict] = {}
    for r in runs:
        if "error" in r or not r.get("tokens_per_s"):
            continue
        key = (r["engine"], r["sequences"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    rows = []
    for s in sorted({seq for engine, seq in best if engine == "llama.cpp"}):
        llama, ours = best[("llama.cpp", s)], best.get(("klotski", s))
        forced = must_read(config, args.weights_bytes, args.cap, s, args.prompt_len, args.gen_len)
        ratio = ours["tokens_per_s"] / llama["tokens_per_s"] if ours else None
        target = TARGETS.get(s)
        rows.append(
            {
                "sequences": s,
                "llama_cpp": {"dtype": llama["schedule"], "tokens_per_s": llama["tokens_per_s"]},
                "klotski": None
                if ours is None
                else {"bs_x_n": f"{ours['batch_size']}x{ours['num_batches']}", "tokens_per_s": ours["tokens_per_s"]},
                "ratio": ratio,
                "target": target,
                "met": None if ratio is None or target is None else ratio >= target,
                "llama_bytes_read": llama["bytes_read"],
                "klotski_bytes_read": ours["bytes_read"] if ours else None,
                "bytes_must_read": forced,
                "ceiling": llama["bytes_read"] / forced if llama.get("bytes_read") and forced else None,
            }
        )
    return rows


def curve_markdown(rows: list[dict]) -> str:
    lines = [
        "| sequences | llama.cpp tok/s (dtype) | klotski tok/s (bs x n) | ratio | target | GB read llama.cpp / "
        "klotski / forced by the cap | ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["klotski"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = "-" if r["target"] is None else f">= {r['target']:.0f}x ({'met' if r['met'] else 'not met'})"
        gb = " / ".join(
            "-" if v is None else f"{v / 1e9:.1f}"
            for v in (r["llama_bytes_read"], r["klotski_bytes_read"], r["bytes_must_read"])
        )
        ceiling = "-" if r["ceiling"] is None else f"{r['ceiling']:.2f}x"
        ours = "-" if k is None else f"{k['tokens_per_s']:.2f} ({k['bs_x_n']})"
        lines.append(
            f"| {r['sequences']} | {r['llama_cpp']['tokens_per_s']:.2f} ({r['llama_cpp']['dtype']}) | {ours} | "
            f"{ratio} | {target} | {gb} | {ceiling} |"
        )
    return "\n".join(lines)


def rescore(args) -> int:
    """--rescore: the bounds of a finished peers.json recomputed (rebound) from its own figures."""
    try:
        result = json.loads(args.out.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.out} to rescore ({e}); pass --out FILE of a finished run", file=sys.stderr)
        return 2
    settings, figures = result["config"], result["machine"]
    args.weights_bytes, args.cap = settings["weights_bytes"], settings["cap_bytes"]
    args.prompt_len, args.gen_len = settings["prompt_len"], settings["gen_len"]
    config = json.loads((Path(settings["checkpoint"]) / "config.json").read_text())
    figures.setdefault("disk_gbps_samples", [figures["disk_gbps"]])
    rebound(result["runs"], args, config, figures)
    result["curve"] = curve(result["runs"], args, config)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(curve_markdown(result["curve"]))
    print(f"rescored {args.out} at {figures['disk_gbps']:.2f} GB/s ({figures['disk_rate_source']})")
    return 0


def _run_row(
    engine: str,
    schedule: str,
    batch_size: int,
    num_batches: int,
    sequences: int,
    tokens_per_s: float,
    bubble: float | None,
    bytes_read: int | None,
    wall: float,
    **extra,
) -> dict:
    return {
        "engine": engine,
        "schedule": schedule,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "sequences": sequences,
        "tokens_per_s": tokens_per_s,
        "bubble_ratio": bubble,
        "bytes_read": bytes_read,
        "wall_s": wall,
        **extra,
    }


def run_llama(binary: Path, model: Path, dtype: str, bs: int, args) -> dict:
    """One llama-batched-bench process at batch size bs, capped; one run row."""
    load = os.getloadavg()
    cgroup.drop_page_cache([model])
    res = cgroup.run_capped(
        _timed_cmd(batched_bench_cmd(binary, model, args.prompt_len, args.gen_len, bs)),
        args.cap,
        f"llamacpp-{dtype}-{bs}",
        timeout=args.timeout,
    )
    rows = parse_batched_bench(res.stdout + res.stderr)
    if res.returncode != 0 or not rows:
        return {
            "engine": "llama.cpp",
            "schedule": dtype,
            "batch_size": bs,
            "error": f"rc={res.returncode} oom={res.oom_killed}: {res.stderr[-400:]}",
        }
    row = rows[0]
    rss, read = _time_figures(res.stderr)
    return _run_row(
        "llama.cpp",
        dtype,
        bs,
        1,
        bs,
        row.tokens_per_s,
        None,
        read,
        row.total_s,
        peak_rss_bytes=res.peak_bytes,
        process_maxrss_bytes=rss,
        prefill_s=row.prefill_s,
        decode_s=row.decode_s,
        decode_tokens_per_s=row.decode_tokens_per_s,
        load_avg=load,
        oom_killed=res.oom_killed,
        capped=res.capped,
    )


def run_klotski(
    checkpoint: Path,
    prompts: int,
    bs: int | None,
    n: int | None,
    schedule: str,
    args,
    config: dict,
    trace: Path | None = None,
) -> dict:
    """`klotski generate` for `prompts` prompts, capped; one run row. bs = n = None: the planner picks."""
    work = Workload("peers", prompts, args.prompt_len, args.gen_len, "the llama.cpp comparison's shape")
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = write_jsonl(work, config["vocab_size"], Path(tmp) / "prompts.jsonl")
        cmd = [
            args.klotski,
            "generate",
            "--model",
            str(checkpoint),
            "--input",
            str(prompt_file),
            "--json",
            "--ignore-eos",
            "--max-tokens",
            str(args.gen_len),
            "--device-memory",
            args.device_memory,
            "--dtype",
            args.klotski_dtype,
            "--schedule",
            schedule,
        ]
        if bs is not None:
            cmd += ["--batch-size", str(bs), "--num-batches", str(n)]
        if trace is not None:  # the timeline of each klotski run: where its time goes
            cmd += ["--trace", f"{trace}.trace.json", "--timeline", f"{trace}.png"]
        load = os.getloadavg()
        cgroup.drop_page_cache([checkpoint])
        res = cgroup.run_capped(_timed_cmd(cmd), args.cap, f"klotski-{prompts}", timeout=args.timeout)
    label = schedule if bs is not None else f"{schedule} (planner)"
    if res.returncode != 0:
        return {
            "engine": "klotski",
            "schedule": label,
            "batch_size": bs,
            "num_batches": n,
            "error": f"rc={res.returncode} oom={res.oom_killed}: {res.stderr[-400:]}",
        }
    stats = json.loads(res.stdout)["stats"]
    rss, _ = _time_figures(res.stderr)
    read = sum(stats["bytes_read"].values())
    policy = stats["policy"]
    return _run_row(
        "klotski",
        label,
        policy["batch_size"],
        policy["num_batches"],
        prompts,
        stats["tokens_per_s"],
        stats["bubble_ratio"],
        read,
        stats["wall_s"],
        peak_rss_bytes=res.peak_bytes,
        process_maxrss_bytes=rss,
        prefill_s=stats["prefill_s"],
        decode_s=stats["decode_s"],
        # Per decode step, like llama.cpp's S_TG: the first token comes out of the prefill.
        decode_tokens_per_s=prompts * (args.gen_len - 1) / stats["decode_s"],
        dtype=stats.get("dtype"),
        cache_hits=stats.get("cache_hits"),
        bytes_read_per_step=read / max(stats.get("forward_steps", args.gen_len), 1),
        load_avg=load,
        compute_busy_s=stats["compute_busy_s"],
        io_busy_s=stats["io_busy_s"],
        oom_killed=res.oom_killed,
        capped=res.capped,
    )


def _klotski_grid(spec: str) -> list[tuple[int, int | None, int | None]]:
    """ "8x4,plan128" -> [(32, 8, 4), (128, None, None)]: prompts, batch size, number of batches.

    "planN" runs N prompts with no --batch-size/--num-batches: the planner's policy.
    """
    grid = []
    for item in filter(None, spec.split(",")):
        if item.startswith("plan"):
            grid.append((int(item[4:]), None, None))
        else:
            bs, n = (int(v) for v in item.split("x"))
            grid.append((bs * n, bs, n))
    return grid


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a Mixtral-shaped checkpoint (default: a 2-layer "
        "mixtral-8x7b preset with Mixtral's tokenizer, created once in the bench cache)",
    )
    p.add_argument("--cap", type=lambda s: int(float(s) * GiB), default=3 * GiB, help="cgroup cap, GiB")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--llama-batch-sizes", default="1,8,32,64,128,256")
    p.add_argument("--llama-dtypes", default="f16,bf16", help="GGUF types to run; empty: klotski only")
    p.add_argument("--klotski", default=str(Path(sys.executable).parent / "klotski"))
    p.add_argument(
        "--klotski-grid",
        default="1x1,8x1,32x1,64x1,128x1,128x2,plan128",
        help="bs x n per klotski run (sequences = bs * n), or planN: N sequences, the planner's bs and n",
    )
    p.add_argument("--klotski-dtype", default="auto", help="compute dtype (auto: measured per machine)")
    p.add_argument("--schedule", default="klotski")
    p.add_argument(
        "--device-memory",
        default="2.4GiB",
        help="klotski's budget inside the cap: weights, KV cache and each step's transients (as the rig's "
        "--klotski-memory; its process and its libraries' pages need the rest)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--keep", type=Path, help="an earlier peers.json whose runs this one adds to (a second pass)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--rescore",
        action="store_true",
        help="recompute every bound of --out at the fastest disk rate its runs showed (no engine runs)",
    )
    return p


def _prepare(args) -> tuple[Path, dict[str, Path]]:
    """llama.cpp built, the checkpoint with its tokenizer, GGUF files converted and read back (all cached)."""
    cache = convert.cache_dir()
    llama = Path(
        subprocess.run(["benchmarks/peers/build_llama_cpp.sh"], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    spm = convert.mixtral_tokenizer_model(cache, str(Path(sys.executable).parent / "pip"))
    if args.checkpoint is None:
        args.checkpoint = convert.default_checkpoint(cache, spm, args.klotski)
    dtypes = [t for t in args.llama_dtypes.split(",") if t]
    view = convert.with_tokenizer(args.checkpoint, spm, cache) if dtypes else None
    models = {t: convert.convert(view, llama, t, cache) for t in dtypes}
    for path in models.values():
        convert.check(path)
    return llama.parent.parent / "build" / "bin" / "llama-batched-bench", models


def _jobs(args, binary: Path, models: dict[str, Path], config: dict, rep: int) -> list[tuple[int, str, Callable]]:
    """One repeat's runs as (sequences, label, run), those at one sequence count next to each other (llama.cpp's
    dtypes, then klotski's grid entries; reversed on odd repeats): the disk's rate drifts by up to 2x over
    minutes here, and a ratio is only as fair as the moments its two runs shared."""
    jobs: list[tuple[int, str, Callable]] = []
    for dtype, path in models.items():
        for bs in [int(b) for b in args.llama_batch_sizes.split(",")]:
            jobs.append((bs, f"llama.cpp {dtype}", partial(run_llama, binary, path, dtype, bs, args)))
    for prompts, bs, n in _klotski_grid(args.klotski_grid):
        name = f"{bs}x{n}" if bs else f"plan{prompts}"
        run = partial(
            run_klotski,
            args.checkpoint,
            prompts,
            bs,
            n,
            args.schedule,
            args,
            config,
            args.out.parent / f"peers-klotski-{name}",
        )
        jobs.append((prompts, f"klotski {name}", run))
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(job[0], []).append(job)
    return [job for s in sorted(groups) for job in (groups[s] if rep % 2 == 0 else groups[s][::-1])]


def _sweep(args, binary: Path, models: dict[str, Path], config: dict, save) -> list[dict]:
    """Every llama.cpp and klotski run, each saved as it finishes (a long sweep survives a kill)."""
    runs = json.loads(args.keep.read_text())["runs"] if args.keep else []
    for rep in range(args.repeats):
        for _, _, run in _jobs(args, binary, models, config, rep):
            runs.append(run() | {"repeat": rep})
            _echo(runs[-1])
            save(runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rescore:
        return rescore(args)
    if args.out == DEFAULT_OUT and args.out.exists():
        results.archive_previous(args.out.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    binary, models = _prepare(args)
    config = json.loads((args.checkpoint / "config.json").read_text())
    files = sorted(args.checkpoint.glob("*.safetensors"))
    args.weights_bytes = sum(f.stat().st_size for f in files)
    profile = rig.ensure_profile(args.checkpoint)  # outside the cap, once: what the planner plans with
    figures = (
        machine.describe()
        | machine.disk_bandwidth(files)
        | machine.matmul_rate(config["hidden_size"], config["intermediate_size"])
    )
    settings = {
        "checkpoint": str(args.checkpoint),
        "weights_bytes": args.weights_bytes,
        "cap_bytes": args.cap,
        "cgroup": cgroup.available() or "memory cgroup v1",
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "metric": "generated tokens / (prefill + decode) s",
        "llama_cpp": {
            "source": f"llama-cpp-python {convert.LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp",
            "tool": "llama-batched-bench",
            "threads": 2,
            "mmap": True,
            "gguf": {k: str(v) for k, v in models.items()},
        },
        "klotski": {
            "device_memory": args.device_memory,
            "schedule": args.schedule,
            "dtype": args.klotski_dtype,
            "profile": profile,
            "routing_replay": None,  # llama.cpp cannot replay routing: both route with the weights
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        },
    }

    def save(runs: list[dict], **extra) -> None:
        out = {"machine": figures, "config": settings, "runs": runs, **extra}
        args.out.write_text(json.dumps(out, indent=1) + "\n")

    runs = _sweep(args, binary, models, config, save)
    figures["disk_gbps_samples"] = [figures["disk_gbps"], machine.disk_bandwidth(files)["disk_gbps"]]
    rebound(runs, args, config, figures)
    settings["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = curve(runs, args, config)
    save(runs, curve=rows)
    print(markdown({"runs": runs}))
    print(curve_markdown(rows))
    print(f"wrote {args.out}")
    return 0


def markdown(results: dict) -> str:
    """Rows per engine/dtype and batch size: range of tok/s over repeats, decode-only, split, memory."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        if "error" not in r:
            groups.setdefault((r["engine"], r["schedule"], r["batch_size"], r["num_batches"]), []).append(r)
    lines = [
        "| engine | dtype / schedule | bs x n | tok/s (gen / total) | decode-only tok/s | prefill s | "
        "decode s | GB read | peak RSS GB | efficiency | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, schedule, bs, n), rs in groups.items():
        loads = ", ".join(f"{r['load_avg'][0]:.1f}" for r in rs)

        def span(key, fmt="{:.2f}", scale=1.0, rs=rs):
            values = [r[key] * scale for r in rs if r.get(key) is not None]
            if not values:
                return "-"
            lo, hi = min(values), max(values)
            return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"

        lines.append(
            f"| {engine} | {schedule} | {bs} x {n} | {span('tokens_per_s')} | {span('decode_tokens_per_s')} | "
            f"{span('prefill_s', '{:.0f}')} | {span('decode_s', '{:.0f}')} | {span('bytes_read', '{:.0f}', 1e-9)} | "
            f"{span('peak_rss_bytes', '{:.2f}', 1e-9)} | {span('efficiency')} | "
            f"{loads} |"
        )
    return "\n".join(lines)


def _echo(run: dict) -> None:
    if "error" in run:
        print(
            f"{run['engine']:<9} {run['schedule']:<8} bs={run['batch_size']:<4} ERROR {run['error'][:200]}", flush=True
        )
        return
    print(
        f"{run['engine']:<9} {run['schedule']:<8} bs={run['batch_size']:<4} n={run['num_batches']:<2} "
        f"{run['tokens_per_s']:7.2f} tok/s  decode {run['decode_tokens_per_s']:7.2f}  prefill {run['prefill_s']:6.1f}s "
        f"decode {run['decode_s']:6.1f}s  rss {(run['peak_rss_bytes'] or 0) / 1e9:5.2f} GB  "
        f"read {(run['bytes_read'] or 0) / 1e9:6.1f} GB  load {run['load_avg'][0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
