"""Results: latest.json, a markdown table with ranges over repeats, the verdicts, and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

LADDER = ("sequential", "overlap", "multibatch", "hot", "klotski")


def _key(r: dict) -> tuple:
    return (r["workload"], r["engine"], r["schedule"], bool(r.get("routing_replay")), r["batch_size"], r["num_batches"])


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per configuration: medians and ranges over its repeats."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_key(r)].append(r)
    rows = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("tokens_per_s")]
        row = {
            "workload": key[0],
            "engine": key[1],
            "schedule": key[2],
            "replay": key[3],
            "batch_size": key[4],
            "num_batches": key[5],
            "runs": len(rs),
            "failed": len(rs) - len(ok),
        }
        for field in (
            "tokens_per_s",
            "prefill_s",
            "decode_s",
            "bubble_ratio",
            "bytes_read",
            "bound_s",
            "efficiency",
            "io_efficiency",
            "peak_rss_bytes",
        ):
            vals = sorted(r[field] for r in ok if r.get(field) is not None)
            mid = (vals[(len(vals) - 1) // 2] + vals[len(vals) // 2]) / 2 if vals else None
            row[field] = (vals[0], mid, vals[-1]) if vals else None
        row["load_avg"] = [round(r["load_avg"][0], 1) for r in rs]
        row["tokens_sha"] = sorted({r.get("tokens_sha") for r in ok if r.get("tokens_sha")})
        rows.append(row)
    return rows


def _fmt(v, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "-"
    lo, mid, hi = (x / scale for x in v)
    if abs(hi - lo) < 10**-digits:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's done-when, per workload: ladder monotonic, >= 0.85 of bound, >= 3x Accelerate."""
    lines = []
    for work in sorted({r["workload"] for r in rows}):
        ws = [r for r in rows if r["workload"] == work and r["tokens_per_s"]]
        ladder = {
            r["schedule"]: r["tokens_per_s"][1]
            for r in ws
            if r["engine"] == "klotski"
            and r["replay"]
            and r["schedule"] in LADDER
            and (
                r["schedule"] in ("sequential", "overlap")
                or r["num_batches"] == max(x["num_batches"] for x in ws if x["schedule"] == "multibatch")
            )
        }
        seq = [ladder[s] for s in LADDER if s in ladder]
        mono = all(a <= b for a, b in zip(seq, seq[1:]))
        lines.append(
            f"- {work}: ladder (replay on, medians) {' -> '.join(f'{v:.2f}' for v in seq)} tok/s: "
            f"{'monotonic' if mono else 'NOT monotonic'}"
        )
        shas = {sha for r in ws if r["engine"] == "klotski" and r["replay"] for sha in r["tokens_sha"]}
        by_shape: dict[str, set] = defaultdict(set)
        for r in ws:
            if r["engine"] == "klotski" and r["replay"]:
                for sha in r["tokens_sha"]:
                    by_shape[sha].add(f"bs{r['batch_size']}xn{r['num_batches']}")
        same = "identical" if len(shas) == 1 else "NOT identical"
        lines.append(
            f"- {work}: generated tokens with replay on are {same} "
            f"across klotski runs (schedules, n, repeats): "
            + "; ".join(f"{sha} for {', '.join(sorted(v))}" for sha, v in sorted(by_shape.items()))
        )
        kl = [r for r in ws if r["engine"] == "klotski" and r["schedule"].startswith("klotski")]
        hf = [r for r in ws if r["engine"] == "hf-accelerate"]
        if kl:
            best = max(kl, key=lambda r: r["tokens_per_s"][1])
            eff = best["efficiency"][1]
            planner = [r for r in kl if r["schedule"].endswith("(planner)")]
            for r in planner:
                lines.append(
                    f"- {work}: klotski at the planner's policy (bs {r['batch_size']}, n {r['num_batches']}): "
                    f"{r['tokens_per_s'][1]:.2f} tok/s at {r['efficiency'][1]:.2f} of its lower bound"
                )
            lines.append(
                f"- {work}: klotski best {best['tokens_per_s'][1]:.2f} tok/s (bs {best['batch_size']}, n "
                f"{best['num_batches']}, replay {'on' if best['replay'] else 'off'}) at {eff:.2f} of its "
                f"lower bound: {'meets' if eff >= 0.85 else 'BELOW'} 0.85"
            )
        if kl and hf:
            hbest = max(hf, key=lambda r: r["tokens_per_s"][1])
            for replay in (True, False):
                ks = [r for r in kl if r["replay"] == replay]
                if ks:
                    k = max(r["tokens_per_s"][1] for r in ks)
                    ratio = k / hbest["tokens_per_s"][1]
                    lines.append(
                        f"- {work}: klotski (replay {'on' if replay else 'off'}) / Accelerate best (bs "
                        f"{hbest['batch_size']}, {hbest['tokens_per_s'][1]:.2f} tok/s) = {ratio:.2f}x: "
                        f"{'meets' if ratio >= 3 else 'BELOW'} 3x"
                    )
    return lines


def markdown(result: dict, rows: list[dict]) -> str:
    m, c = result["machine"], result["config"]
    head = [
        f"Command: `{c['command']}` ({c['mode']}; {c['repeats']} repeat(s); {c['elapsed_s'] / 60:.1f} min).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM; disk "
        f"{m.get('disk_gbps_measured', m['disk_gbps']):.2f} GB/s (O_DIRECT, cold, measured this session); "
        f"matmul at expert shapes fp32 "
        f"{', '.join(f'{v:.0f}' for v in m['matmul_gflops_float32'].values())} / bf16 "
        f"{', '.join(f'{v:.0f}' for v in m['matmul_gflops_bfloat16'].values())} GFLOP/s at "
        f"{', '.join(m['matmul_gflops_float32'])} rows; load average at start {m['load_avg'][0]:.1f}, "
        f"at end {c['load_avg_end'][0]:.1f}; {m['cgroup']}.",
        f"Checkpoint: Mixtral-8x7B shapes, {c['layers']} layers, {c['weights_bytes'] / 1e9:.2f} GB bf16, "
        f"random weights. "
        f"Cap {c['cap_bytes'] / 2**30:.1f} GiB per engine (RSS + page cache); klotski --device-memory "
        f"{c.get('klotski_budget_bytes', c['device_budget_bytes']) / 2**30:.2f} GiB (weights, KV cache and "
        f"a step's transients), --dtype {c.get('klotski_dtype', 'bfloat16')} (chose "
        f"{c.get('klotski_dtype_chosen', 'bfloat16')}); Accelerate max_memory "
        f"{c['device_budget_bytes'] / 2**30:.2f} GiB, bf16.",
        "Workloads: "
        + "; ".join(
            f"{w['name']} = {w['num_prompts']} prompts x {w['prompt_len']} tokens, "
            f"{w['max_tokens']} generated ({w['why']})"
            for w in c["workloads"]
        )
        + ".",
        *(
            [
                f"Disk rate for the bound: {m['disk_gbps']:.2f} GB/s {m['disk_rate_source']} (measured outside the "
                f"engines: {m['disk_gbps_measured']:.2f} GB/s)."
            ]
            if m.get("disk_rate_source")
            else []
        ),
        *(
            [
                f"Rates rescored after the run (`python -m benchmarks.run --rescore`): the bound uses the "
                f"fastest of the in-run and re-measured rates; in-run and re-measured figures: "
                f"{json.dumps(m['rescored_from'])}."
            ]
            if m.get("rescored_from")
            else []
        ),
        "",
        "Medians, (min-max) over repeats. tok/s = generated / (prefill + decode). bound = max(bytes the cap "
        "forces to be read / disk rate, FLOPs / best matmul rate) for the run's own forward steps; eff = bound / "
        "measured. io eff = (GB read / disk rate) / measured: how close to the disk the run came "
        "for the bytes it chose to read. peak = the cgroup's max usage. load = 1-min load average after each "
        "run (2 cores).",
        "",
        "| workload | engine | schedule | replay | bs | n | tok/s | prefill s | decode s | bubble | GB read "
        "| bound s | eff | io eff | peak GiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r["workload"],
            r["engine"] != "hf-accelerate",
            not r["replay"],
            LADDER.index(r["schedule"]) if r["schedule"] in LADDER else -1,
            r["batch_size"],
            r["num_batches"],
        ),
    ):
        fail = f" ({r['failed']} failed)" if r["failed"] else ""
        head.append(
            f"| {r['workload']} | {r['engine']} | {r['schedule']} | {'on' if r['replay'] else 'off'} | "
            f"{r['batch_size']} | {r['num_batches']} | {_fmt(r['tokens_per_s'])}{fail} | "
            f"{_fmt(r['prefill_s'], digits=1)} | "
            f"{_fmt(r['decode_s'], digits=1)} | {_fmt(r['bubble_ratio'])} | {_fmt(r['bytes_read'], 1e9, 1)} | "
            f"{_fmt(r['bound_s'], digits=1)} | {_fmt(r['efficiency'])} | {_fmt(r['io_efficiency'])} | "
            f"{_fmt(r['peak_rss_bytes'], 2**30)} | "
            f"{', '.join(map(str, r['load_avg']))} |"
        )
    return "\n".join(head + ["", "Verdicts:"] + verdicts(rows)) + "\n"


def write(result: dict, out: Path, traces: Path) -> None:
    """latest.json, latest.md and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    rows = aggregate(result["runs"])
    (out / "latest.md").write_text(markdown(result, rows))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from benchmarks import plots

    plots.throughput(rows, out / "throughput.png")
    plots.versus_n(rows, out / "throughput_vs_n.png")
    plots.block_timelines(traces, out / "timeline_block.png")
