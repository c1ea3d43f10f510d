"""Plots: throughput per engine and rung, throughput vs n (Fig. 14), one MoE block per schedule (Fig. 15)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from klotski.runtime.plot import COLORS  # noqa: E402

LADDER = ("sequential", "overlap", "multibatch", "hot", "klotski")


def throughput(rows: list[dict], path: Path) -> None:
    """Bars of median tok/s (whiskers: min-max) per engine/rung, one panel per workload."""
    works = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(works), figsize=(7 * len(works), 4), squeeze=False)
    for ax, work in zip(axes[0], works):
        rs = [r for r in rows if r["workload"] == work and r["tokens_per_s"] and _is_bar(r, rows)]
        rs.sort(
            key=lambda r: (
                r["engine"] != "hf-accelerate",
                not r["replay"],
                LADDER.index(r["schedule"]) if r["schedule"] in LADDER else -1,
                r["batch_size"],
            )
        )
        labels = [_label(r) for r in rs]
        mids = [r["tokens_per_s"][1] for r in rs]
        errs = [
            [m - r["tokens_per_s"][0] for m, r in zip(mids, rs)],
            [r["tokens_per_s"][2] - m for m, r in zip(mids, rs)],
        ]
        colors = ["#c44e52" if r["engine"] != "klotski" else ("#55a868" if r["replay"] else "#8ccf9a") for r in rs]
        ax.bar(range(len(rs)), mids, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(rs)), labels, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"{work}: same cap for every engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_bar(r: dict, rows: list[dict]) -> bool:
    """The ladder at the plan's n, every Accelerate batch size (the n sweep has its own plot)."""
    if r["engine"] != "klotski" or r["schedule"] in ("sequential", "overlap"):
        return True
    ladder_n = max((x["num_batches"] for x in rows if x["schedule"] == "multibatch"), default=r["num_batches"])
    return r["num_batches"] == ladder_n


def _label(r: dict) -> str:
    if r["engine"] != "klotski":
        return f"Accelerate bs {r['batch_size']}"
    return f"{r['schedule']}{'' if r['replay'] else ' (uniform)'} bs{r['batch_size']} n{r['num_batches']}"


def versus_n(rows: list[dict], path: Path) -> None:
    """klotski's tok/s against n at fixed bs, replay on, one line per workload."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for work in sorted({r["workload"] for r in rows}):
        rs = sorted(
            (
                r
                for r in rows
                if r["workload"] == work
                and r["engine"] == "klotski"
                and r["replay"]
                and r["schedule"] == "klotski"
                and r["tokens_per_s"]
            ),
            key=lambda r: r["num_batches"],
        )
        if rs:
            ax.errorbar(
                [r["num_batches"] for r in rs],
                [r["tokens_per_s"][1] for r in rs],
                yerr=[
                    [r["tokens_per_s"][1] - r["tokens_per_s"][0] for r in rs],
                    [r["tokens_per_s"][2] - r["tokens_per_s"][1] for r in rs],
                ],
                marker="o",
                capsize=3,
                label=f"{work} (bs {rs[0]['batch_size']})",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (batches sharing each loaded layer)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("klotski: throughput vs n")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_trace(path: Path) -> list[dict]:
    """Events of a Chrome trace written by --trace: lane, kind, start, end, layer, expert."""
    data = json.loads(path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    lanes = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    return [
        {
            "lane": lanes[e["tid"]],
            "kind": e["name"].split()[0],
            "start": e["ts"] / 1e6,
            "end": (e["ts"] + e["dur"]) / 1e6,
            **e.get("args", {}),
        }
        for e in events
        if e.get("ph") == "X"
    ]


def block_window(events: list[dict]) -> tuple[float, float, int]:
    """(start, end, layer) of the last MoE layer's block in the last full decode step.

    A step starts at batch 0's first embed span; with the table resident the row gather and the
    embedding are two spans of that name, so a start counts only once an attention ran since the last."""
    attention = sorted(e["start"] for e in events if e["kind"] == "attention")
    starts: list[float] = []
    for s in sorted(e["start"] for e in events if e["kind"] == "embed" and e.get("batch", 0) == 0):
        if not starts or any(starts[-1] < a < s for a in attention):
            starts.append(s)
    step = starts[-2] if len(starts) > 1 else starts[0]
    stop = starts[-1] if len(starts) > 1 else float("inf")
    inside = [e for e in events if step <= e["start"] < stop and e["lane"] == "compute" and "layer" in e]
    layer = max(e["layer"] for e in inside)
    block = [e for e in inside if e["layer"] == layer]
    return min(e["start"] for e in block), max(e["end"] for e in block), layer


def block_timelines(traces: Path, path: Path) -> None:
    """One row group per schedule: its lanes over one MoE block, time relative to the block's start."""
    found = [(s, traces / f"{s}.json") for s in LADDER if (traces / f"{s}.json").is_file()]
    if not found:
        return
    fig, axes = plt.subplots(len(found), 1, figsize=(12, 1.6 * len(found) + 0.8), squeeze=False)
    for ax, (schedule, file) in zip(axes[:, 0], found):
        events = load_trace(file)
        start, end, layer = block_window(events)
        shown = [e for e in events if e["end"] >= start and e["start"] <= end]
        lanes = sorted({e["lane"] for e in shown}, key=lambda l: (l != "compute", l))
        for row, lane in enumerate(lanes):
            spans = [
                (
                    max(e["start"], start) - start,
                    min(e["end"], end) - max(e["start"], start),
                    COLORS.get(e["kind"], "#999"),
                )
                for e in shown
                if e["lane"] == lane
            ]
            ax.broken_barh([(s, w) for s, w, _ in spans], (row - 0.4, 0.8), facecolors=[c for *_, c in spans])
        ax.set_yticks(range(len(lanes)), lanes, fontsize=7)
        ax.set_title(f"{schedule}: layer {layer}, one decode step ({end - start:.2f} s)", fontsize=9)
    axes[-1, 0].set_xlabel("seconds from the block's first op (red: compute waiting on a read; blue: reads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
