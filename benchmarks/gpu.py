"""The prepared GPU run (benchmarks/gpu.sh): Mixtral-8x7B's 32 layers, a 24 GiB device budget, every rung.

For one lent H200 (128 GiB RAM, 64 GiB disk, no network, <= 10 min a call). The 93 GB bf16
checkpoint is written to /dev/shm (tmpfs: host memory, no disk), then the ablation ladder and the
engine's own policy (the planner's, where it has landed) run in this process, and the table is
printed beside the paper's Mixtral-8x7B figures (RTX 3090: 5.72 tok/s baseline -> 22.41 Klotski).
`--dry-run` does the same on a CPU with the tiny preset in seconds (tests/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

LADDER = ("sequential", "overlap", "multibatch", "hot", "klotski")
# The paper's Table 3 endpoints for Mixtral-8x7B on an RTX 3090 (24 GiB); its middle rungs are not quoted.
PAPER = {"sequential": 5.72, "klotski": 22.41}


def store_supports_cuda() -> tuple[bool, str]:
    """Whether the tiered store moves weights into CUDA memory; the reason when it does not."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device: the run uses the CPU path (the device tier is host RAM)"
    from klotski.store import tiered

    source = Path(tiered.__file__).read_text()
    if "cuda" not in source.lower():
        return False, (
            "CUDA SUPPORT MISSING in klotski.store.tiered: fetches land in host buffers and are never "
            "copied to the GPU (no pinned memory, no CUDA streams). The figures below are the CPU path "
            "on this machine's cores, NOT a GPU run; they are not comparable with the paper's."
        )
    return True, "CUDA path"


def make_model(root: Path, preset: str, layers: int | None) -> Path:
    """A random-weight Mixtral checkpoint of `preset` shapes under `root` (tmpfs on the GPU machine), once."""
    from klotski.commands.create_model import create_model

    out = root / f"mixtral-{preset}-{layers or 'all'}l"
    if not (out / "config.json").is_file():
        t0 = time.perf_counter()
        create_model(out, "mixtral", preset, layers=layers, dtype="bfloat16")
        print(f"gpu: created {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def run_rung(
    model: Path,
    schedule: str,
    prompts: list[dict],
    max_tokens: int,
    budget: str,
    offload: Path,
    bs: int | None,
    n: int | None,
    device: str,
) -> dict:
    """One rung in this process: tok/s, bubble ratio, bytes read, policy."""
    from klotski import LLM, SamplingParams

    llm = LLM(
        str(model),
        dtype="bfloat16",
        device=device,
        device_memory=budget,
        offload_dir=str(offload),
        schedule=schedule,
        batch_size=bs,
        num_batches=n if schedule in ("multibatch", "hot", "klotski") else None,
        routing_replay="mixtral-8x7b",
    )
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    finally:
        llm.store.close()
    s = llm.last_stats
    wall = s["prefill_s"] + s["decode_s"]
    return {
        "schedule": schedule,
        "batch_size": s["policy"]["batch_size"],
        "num_batches": s["policy"]["num_batches"],
        "tokens_per_s": s["generated_tokens"] / wall,
        "bubble_ratio": s["bubble_ratio"],
        "bytes_read": sum(s["bytes_read"].values()),
        "wall_s": wall,
    }


def table(rows: list[dict], note: str) -> str:
    """The ladder beside the paper's figures."""
    lines = [note, "", f"{'rung':<18} {'bs':>4} {'n':>3} {'tok/s':>8} {'bubble':>7} {'GB read':>8}  paper (RTX 3090)"]
    for r in rows:
        paper = PAPER.get(r["schedule"]) if r["label"] == r["schedule"] else None
        lines.append(
            f"{r['label']:<18} {r['batch_size']:>4} {r['num_batches']:>3} {r['tokens_per_s']:>8.2f} "
            f"{r['bubble_ratio']:>7.3f} {r['bytes_read'] / 1e9:>8.1f}  {'' if paper is None else f'{paper:.2f}'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.gpu", description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU (seconds): checks the script")
    p.add_argument("--layers", type=int, default=None, help="layers (default: all 32; dry run: 2)")
    p.add_argument("--device-memory", default="24GiB", help="device budget (the paper's RTX 3090)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8, help="generated per prompt (paper: 32; 8 fits 10 min)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--rungs", default=",".join(LADDER) + ",policy")
    p.add_argument("--root", default="/dev/shm/klotski-gpu", help="where the checkpoint lives (tmpfs: RAM, no disk)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    from benchmarks.workload import prompt_token_ids

    if args.dry_run:
        args.layers, budget, preset = args.layers or 2, "1200KB", "tiny"
        args.num_prompts, args.prompt_len, args.max_tokens, args.batch_size, args.num_batches = 8, 16, 3, 2, 2
        root = Path(tempfile.mkdtemp(prefix="klotski-gpu-dry-"))
    else:
        budget, preset, root = args.device_memory, "mixtral-8x7b", Path(args.root)
    cuda, note = store_supports_cuda()
    device = "cuda" if cuda else "cpu"
    print(f"gpu: {note}", file=sys.stderr)
    model = make_model(root, preset, args.layers)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = [{"prompt_token_ids": prompt_token_ids(i, args.prompt_len, vocab)} for i in range(args.num_prompts)]
    rows = []
    for rung in args.rungs.split(","):
        policy = rung == "policy"  # no bs / n: the engine's policy (the planner's once it lands)
        row = run_rung(
            model,
            "klotski" if policy else rung,
            prompts,
            args.max_tokens,
            budget,
            root / "offload",
            None if policy else args.batch_size,
            None if policy else args.num_batches,
            device,
        )
        rows.append(row | {"label": "klotski (policy)" if policy else rung})
        print(f"gpu: {rows[-1]['label']}: {row['tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
    header = (
        f"Mixtral-8x7B shapes, {args.layers or 32} layers, routing replayed from the real table, "
        f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} generated, device budget "
        f"{budget}, {device}. {note}"
    )
    print(table(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"note": note, "device": device, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
