"""Subcommands `calibrate`, `prefetch-eval`, `make-trace` and `split-trace`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from klotski.commands.generate import read_jsonl
from klotski.errors import KlotskiError
from klotski.prefetch import calibrate
from klotski.prefetch.evaluate import METRICS, evaluate
from klotski.prefetch.synthetic import sample_markov_trace
from klotski.prefetch.table import TABLE_FILENAME, CorrelationTable, load_table
from klotski.prefetch.trace import RoutingTrace, split

TABLE_HELP = "a table from `klotski calibrate`, an authors' JSON, or mixtral-8x7b / mixtral-8x22b"


def register(subparsers: Any) -> None:
    """Add the prefetcher's subcommands to the `klotski` parser."""
    _register_calibrate(subparsers)
    _register_eval(subparsers)
    _register_make_trace(subparsers)
    _register_split_trace(subparsers)


def _register_calibrate(subparsers: Any) -> None:
    p = subparsers.add_parser("calibrate", help="build an expert correlation table from routing")
    p.add_argument("--from-trace", type=Path, help="a routing trace (.npz) to count")
    p.add_argument("--model", type=Path, help="model directory to run the prompts through")
    p.add_argument("--input", type=Path, help="prompts (.jsonl) for --model")
    p.add_argument(
        "--out",
        type=Path,
        help=f"where to write the table (with --model: MODEL/{TABLE_FILENAME}, picked up automatically)",
    )
    p.add_argument("--path-length", type=int, default=1, help="previous layers that key each row (the paper uses 1)")
    p.add_argument("--num-experts", type=int, help="experts per layer if the trace lacks it")
    p.add_argument("--model-name", default="", help="model name recorded in the table")
    p.set_defaults(handler=run_calibrate)


def _register_eval(subparsers: Any) -> None:
    p = subparsers.add_parser("prefetch-eval", help="replay a trace and score expert predictors")
    p.add_argument("--table", required=True, help=TABLE_HELP)
    p.add_argument("--trace", required=True, type=Path, help="routing trace (.npz) to replay")
    p.add_argument("--group-size", type=int, default=1, help="tokens per batch group (sequences per decode step)")
    p.add_argument("--k", type=int, help="experts prefetched per layer (default: top_k)")
    p.add_argument(
        "--scoring", choices=("raw", "rows"), default="raw", help="sum raw count rows or per-row distributions"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(handler=run_prefetch_eval)


def _register_make_trace(subparsers: Any) -> None:
    p = subparsers.add_parser("make-trace", help="sample a synthetic routing trace from a table")
    p.add_argument("--table", required=True, help=TABLE_HELP)
    p.add_argument("--num-seqs", type=int, required=True, help="sequences to sample")
    p.add_argument("--tokens", type=int, required=True, help="tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=0, help="leading tokens marked as prefill")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--flatten", type=float, default=0.0, help="mix routing toward uniform: 0 = the table, 1 = uniform")
    p.add_argument("--top-k", type=int, default=2, help="top_k for an authors' table")
    p.add_argument("--out", required=True, type=Path, help="trace file to write (.npz)")
    p.set_defaults(handler=run_make_trace)


def _register_split_trace(subparsers: Any) -> None:
    p = subparsers.add_parser("split-trace", help="split a trace by sequence into train / held-out")
    p.add_argument("--trace", required=True, type=Path, help="routing trace (.npz)")
    p.add_argument("--held-out", type=float, default=0.5, help="fraction of sequences held out")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the held-out sequences")
    p.add_argument("--train-out", required=True, type=Path, help="train split (.npz)")
    p.add_argument("--held-out-out", required=True, type=Path, help="held-out split (.npz)")
    p.set_defaults(handler=run_split_trace)


def run_calibrate(args: argparse.Namespace) -> int:
    """`klotski calibrate`: count routing into a table and save it."""
    if (args.from_trace is None) == (args.model is None):
        raise KlotskiError("calibrate needs exactly one of --from-trace FILE.npz or --model DIR")
    if args.model is not None:
        if args.input is None:
            raise KlotskiError("calibrate --model needs --input FILE.jsonl with the prompts")
        table = calibrate_from_model(args.model, args.input, args.path_length)
        out = args.out or args.model / TABLE_FILENAME
    else:
        if args.out is None:
            raise KlotskiError("calibrate --from-trace needs --out TABLE.json")
        table = calibrate.calibrate_from_trace(args.from_trace, args.path_length, args.num_experts, args.model_name)
        out = args.out
    table.save(out)
    print(
        f"wrote {out}: {table.num_layers} layers x {table.num_experts} experts, "
        f"path length {table.path_length}, {table.calibrated_on}"
    )
    return 0


def run_prefetch_eval(args: argparse.Namespace) -> int:
    """`klotski prefetch-eval`: replay a trace and print each predictor's figures."""
    if args.group_size < 1 or (args.k is not None and args.k < 1):
        raise KlotskiError("--group-size and --k must be at least 1")
    table = load_table(args.table)
    trace = RoutingTrace.load(args.trace)
    report = evaluate(trace, table, args.group_size, args.k, args.seed, args.scoring)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    return 0


def run_make_trace(args: argparse.Namespace) -> int:
    """`klotski make-trace`: sample a Markov routing trace and save it."""
    table = load_table(args.table, args.top_k)
    trace = sample_markov_trace(table, args.num_seqs, args.tokens, args.seed, args.prompt_len, args.flatten)
    trace.save(args.out)
    print(
        f"wrote {args.out}: {trace.num_tokens} tokens x {trace.num_layers} layers x "
        f"top-{trace.top_k} (flatten {args.flatten}, seed {args.seed})"
    )
    return 0


def run_split_trace(args: argparse.Namespace) -> int:
    """`klotski split-trace`: write a train and a held-out trace, split by sequence."""
    train, held = split(RoutingTrace.load(args.trace), args.held_out, args.seed)
    train.save(args.train_out)
    held.save(args.held_out_out)
    print(f"wrote {args.train_out} ({train.num_tokens} tokens) and {args.held_out_out} ({held.num_tokens} tokens)")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """The overall figures as an aligned text table, one row per predictor."""
    c = report["config"]
    lines = [
        f"group size {c['group_size']} ({c['grouping']}, {c['num_groups']} groups, "
        f"{c['mean_group_tokens']:.1f} tokens each), K = {c['k']}, "
        f"{c['num_layers']} layers x {c['num_experts']} experts, top-{c['top_k']}",
        f"{'predictor':<12}" + "".join(f"{m:>16}" for m in METRICS),
    ]
    for name, figures in report["predictors"].items():
        lines.append(f"{name:<12}" + "".join(f"{figures[m]:>16.4f}" for m in METRICS))
    return "\n".join(lines)


def calibrate_from_model(model_dir: str | Path, input_path: str | Path, path_length: int = 1) -> CorrelationTable:
    """Run the prompts of `input_path` through the model (prefill only), recording routing into a table."""
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    records, errors = read_jsonl(str(input_path))
    if errors:
        raise KlotskiError(errors[0])
    llm = LLM(model=str(model_dir))
    recording = llm.record_routing()
    prompts = [llm.chat_prompt(r["messages"]) if "messages" in r else r for _, r in records]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    trace = recording.recorder.to_trace(drop_incomplete=True)
    return CorrelationTable.from_trace(
        trace,
        path_length,
        llm.spec.num_experts,
        model=llm.spec.architecture,
        calibrated_on=f"{Path(input_path).name} ({trace.num_tokens} tokens)",
    )
