"""run-batch beside generate on the same prompts: throughput ratio, and peak RSS against the line count.

    .venv/bin/python -m benchmarks.batch                       # tiny default model, 1k and 10k lines
    .venv/bin/python -m benchmarks.batch --part rig --rig-lines 128,512   # Mixtral-8x7B shapes under the rig's cap

Each command runs in its own process (under the rig's memory cgroup for `--part rig`), measured by a
small parent that reads the child's peak RSS with wait4. generate's figure is its own engine tok/s
(`--json` stats: generated tokens / (prefill + decode), model load excluded); run-batch's is its summary
line's tok/s: generated tokens / the whole job after the model loaded, which also pays for reading,
tokenizing, sorting, writing and fsyncing every line. Both get the same prompt token ids, the same
max_tokens with EOS ignored, greedy. Not a timed test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.workload import prompt_token_ids
from klotski.runtime.compute_dtype import cpu_name

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"


def measured(cmd: list[str], env: dict, cap: int | None = None, name: str = "batch") -> dict:
    """Run cmd in a child (in a capped cgroup when cap is set); its output, wall time and peak RSS."""
    wrapper = [sys.executable, "-m", "benchmarks.batch", "--measure", "--", *cmd]
    if cap is not None:
        from benchmarks import cgroup

        res = cgroup.run_capped(wrapper, cap, name, env=env)
        rc, out, err, peak = res.returncode, res.stdout, res.stderr, res.peak_bytes
    else:
        proc = subprocess.run(wrapper, check=False, capture_output=True, text=True, env=env)
        rc, out, err, peak = proc.returncode, proc.stdout, proc.stderr, None
    report = json.loads(err.strip().splitlines()[-1])
    return {
        "returncode": report["returncode"],
        "wall_s": report["wall_s"],
        "peak_rss_bytes": report["maxrss_kib"] * 1024,
        "cgroup_peak_bytes": peak,
        "stdout": out,
        "stderr": "\n".join(err.strip().splitlines()[:-1]),
        "wrapper_rc": rc,
    }


def _measure_child(cmd: list[str]) -> int:
    """--measure: run cmd, then print {"returncode", "wall_s", "maxrss_kib"} of that child alone on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"returncode": code, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}), file=sys.stderr)
    return 0


def write_inputs(
    directory: Path, lines: int, prompt_len: tuple[int, int], max_tokens: int, vocab: int
) -> tuple[Path, Path]:
    """The same prompts as a generate --input file and as an OpenAI batch file. Lengths vary over
    prompt_len so sorting by length has something to do (a rig workload uses one length: pass (L, L))."""
    lo, hi = prompt_len
    gen, batch = directory / f"generate-{lines}.jsonl", directory / f"batch-{lines}.jsonl"
    with open(gen, "w") as g, open(batch, "w") as b:
        for i in range(lines):
            ids = prompt_token_ids(i, lo + i * 7919 % (hi - lo + 1), vocab)
            g.write(json.dumps({"id": str(i), "prompt_token_ids": ids}) + "\n")
            b.write(
                json.dumps(
                    {
                        "custom_id": str(i),
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
                    }
                )
                + "\n"
            )
    return gen, batch


_SUMMARY = re.compile(r"(\d+) tokens generated in ([0-9.]+) s = ([0-9.]+) tok/s")


def run_pair(
    model: str | None,
    lines: int,
    directory: Path,
    args,
    extra: list[str],
    env: dict,
    cap: int | None,
    vocab: int,
    prompt_len: tuple[int, int],
    drop: list[Path] | None = None,
) -> list[dict]:
    gen_in, batch_in = write_inputs(directory, lines, prompt_len, args.max_tokens, vocab)
    model_flag = ["--model", model] if model else []
    rows = []
    gen_cmd = [
        str(BIN / "klotski"),
        "generate",
        *model_flag,
        "--input",
        str(gen_in),
        "--max-tokens",
        str(args.max_tokens),
        "--ignore-eos",
        "--json",
        *extra,
    ]
    res = measured(gen_cmd, env, cap, "batch-generate")
    row = {"command": "generate", "lines": lines, **_slim(res)}
    if res["returncode"] == 0:
        stats = json.loads(res["stdout"])["stats"]
        row |= {
            "generated_tokens": stats["generated_tokens"],
            "tokens_per_s": stats["tokens_per_s"],
            "engine_s": stats["wall_s"],
            "policy": stats["policy"],
        }
    rows.append(row)
    out = directory / f"out-{lines}.jsonl"
    for stale in (out, Path(str(out) + ".meta.json")):
        stale.unlink(missing_ok=True)
    batch_cmd = [
        str(BIN / "klotski"),
        "run-batch",
        *model_flag,
        "-i",
        str(batch_in),
        "-o",
        str(out),
        "--progress-interval",
        str(args.progress_interval),
        *extra,
    ]
    if drop:  # both commands start from a cold page cache, as the rig's runs do
        from benchmarks import cgroup

        cgroup.drop_page_cache(drop)
    res = measured(batch_cmd, env, cap, "batch-run-batch")
    row = {"command": "run-batch", "lines": lines, **_slim(res)}
    m = _SUMMARY.search(res["stdout"])
    if res["returncode"] == 0 and m:
        row |= {
            "generated_tokens": int(m.group(1)),
            "engine_s": float(m.group(2)),
            "tokens_per_s": float(m.group(3)),
            "summary": res["stdout"].strip().splitlines()[-1],
            "progress_sample": next((x for x in res["stderr"].splitlines() if x.startswith("run-batch: ")), None),
            "grouping": json.loads(Path(str(out) + ".meta.json").read_text())["grouping"],
            "output_lines": out.read_bytes().count(b"\n"),
        }
    rows.append(row)
    for r in rows:
        print(
            f"batch-bench: {r['command']:<9} {lines:>6} lines: {r.get('tokens_per_s', float('nan')):8.1f} tok/s, "
            f"peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB, wall {r['wall_s']:.1f} s, rc {r['returncode']}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _slim(res: dict) -> dict:
    return {k: res[k] for k in ("returncode", "wall_s", "peak_rss_bytes", "cgroup_peak_bytes")} | (
        {"stderr_tail": res["stderr"][-600:]} if res["returncode"] else {}
    )


def machine() -> dict:
    flags = next((x for x in _cpuinfo() if x.startswith("flags")), "")
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "simd": simd,
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def ratios(rows: list[dict]) -> dict:
    """Medians over repeats: run-batch / generate tok/s per line count, run-batch peak RSS largest / smallest."""
    out: dict = {}
    lines = sorted({r["lines"] for r in rows})
    med = {}
    for command in ("generate", "run-batch"):
        for n in lines:
            got = [r for r in rows if r["command"] == command and r["lines"] == n and r.get("tokens_per_s")]
            if got:
                med[command, n] = {
                    "tokens_per_s": _median([r["tokens_per_s"] for r in got]),
                    "tokens_per_s_range": [min(r["tokens_per_s"] for r in got), max(r["tokens_per_s"] for r in got)],
                    "peak_rss_mib": _median([r["peak_rss_bytes"] / 2**20 for r in got]),
                    "repeats": len(got),
                }
    out["medians"] = {f"{c} {n}": v for (c, n), v in med.items()}
    for n in lines:
        if ("generate", n) in med and ("run-batch", n) in med:
            out[f"tok/s run-batch / generate at {n} lines"] = (
                med["run-batch", n]["tokens_per_s"] / med["generate", n]["tokens_per_s"]
            )
    if len(lines) >= 2 and ("run-batch", lines[0]) in med and ("run-batch", lines[-1]) in med:
        out[f"run-batch peak RSS {lines[-1]} / {lines[0]} lines"] = (
            med["run-batch", lines[-1]]["peak_rss_mib"] / med["run-batch", lines[0]]["peak_rss_mib"]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return _measure_child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(prog="benchmarks.batch", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["tiny", "rig", "both"], default="tiny")
    p.add_argument("--lines", default="1000,10000", help="line counts on the tiny default model")
    p.add_argument("--rig-lines", default="128,512", help="line counts on the Mixtral-8x7B-shaped rig checkpoint")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--tiny-dtypes",
        default="auto,float32",
        help="compute dtypes for the tiny model (auto is bf16 on this CPU; each runs every line count)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every child (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every pair (medians reported)")
    p.add_argument("--progress-interval", type=float, default=10.0)
    p.add_argument("--out", default=str(RESULTS / "batch-latest.json"))
    args = p.parse_args(argv)
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result: dict = {"machine": machine(), "command": "python -m benchmarks.batch " + " ".join(argv), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="klotski-batch-bench-") as tmp:
        if args.part in ("tiny", "both"):
            from klotski.default_model import ensure_default_model

            vocab = json.loads((ensure_default_model() / "config.json").read_text())["vocab_size"]
            for dtype in args.tiny_dtypes.split(","):
                rows = []
                for _repeat in range(args.repeats):
                    for lines in [int(x) for x in args.lines.split(",")]:
                        rows += run_pair(None, lines, Path(tmp), args, ["--dtype", dtype], env, None, vocab, (4, 24))
                result["parts"][f"tiny-{dtype}"] = {
                    "model": "the built-in default model",
                    "dtype": dtype,
                    "max_tokens": args.max_tokens,
                    "rows": rows,
                    "ratios": ratios(rows),
                }
        if args.part in ("rig", "both"):
            from benchmarks import run as rig
            from klotski.config import parse_bytes

            ckpt, _ = rig.ensure_checkpoints(rig.bench_cache(), 2, None)
            cap, budget = parse_bytes("3GiB"), "2.25GiB"
            extra = ["--dtype", rig.DTYPE, "--device-memory", budget, "--routing-replay", rig.REPLAY]
            vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
            from benchmarks import cgroup

            rows = []
            for _repeat in range(args.repeats):
                for lines in [int(x) for x in args.rig_lines.split(",")]:
                    cgroup.drop_page_cache([ckpt])
                    rows += run_pair(str(ckpt), lines, Path(tmp), args, extra, env, cap, vocab, (8, 8), drop=[ckpt])
            result["parts"]["rig"] = {
                "model": str(ckpt),
                "cap_bytes": cap,
                "device_memory": budget,
                "flags": extra,
                "max_tokens": args.max_tokens,
                "rows": rows,
                "ratios": ratios(rows),
            }
    result["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for part, data in result["parts"].items():
        for name, value in data["ratios"].items():
            if name != "medians":
                print(f"batch-bench: {part}: {name} = {value:.3f}", file=sys.stderr)
    print(f"batch-bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
