"""`klotski run-batch`: an OpenAI batch file through the engine, written durably, resumable after any crash.

Exit codes: 0 every line of OUT succeeded; 3 the job finished but some lines are error records;
2 the job could not run (unreadable input, unwritable output, output == input, a mismatched resume);
128 + the signal's number after SIGINT / SIGTERM (rerun the same command to resume). docs/batch.md.
"""

from __future__ import annotations

import sys

from klotski.commands.generate import add_config_flags, add_engine_flags, engine_kwargs


def register(sub) -> None:
    p = sub.add_parser(
        "run-batch",
        help="run an OpenAI batch file (JSONL), durably and resumably",
        description="Run an OpenAI Batch API input file (lines of {custom_id, method, url, body} for "
        "/v1/completions or /v1/chat/completions) and write OpenAI batch result lines. "
        "Rerun the same command after a crash or Ctrl-C to resume. See docs/batch.md.",
    )
    p.add_argument("-i", "--input", required=True, help="the batch input file (JSONL)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="the results file (JSONL; OUT.meta.json beside it records the job, for resuming)",
    )
    p.add_argument("--model", help="checkpoint directory (default: the built-in default model)")
    add_config_flags(p, "dtype")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="engine seed: a request without its own seed samples with one derived from this and its "
        "custom_id (default 0)",
    )
    add_config_flags(p, "context")
    p.add_argument(
        "--window",
        type=int,
        default=1024,
        help="input lines read, sorted by prompt length and grouped at a time (default 1024; fixed for "
        "the life of an output file)",
    )
    p.add_argument("--overwrite", action="store_true", help="start OUT afresh instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )
    p.add_argument(
        "--routing-replay",
        metavar="SOURCE",
        help="benchmarks only: replace the router's choices with sampled routing (see generate)",
    )
    add_engine_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from klotski.default_model import NOTICE
    from klotski.entrypoints.batch import BatchJob, BatchOptions, Interrupted

    if args.model is None:
        print(NOTICE, file=sys.stderr)
    options = BatchOptions(
        input=args.input,
        output=args.output,
        model=args.model,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        routing_replay=args.routing_replay,
        window=args.window,
        progress=not args.no_progress,
        progress_interval=args.progress_interval,
        overwrite=args.overwrite,
        engine=engine_kwargs(args),
    )
    job = BatchJob(options)
    try:
        summary = job.run()
    except Interrupted as stop:
        print(job.summary_line())
        return 128 + stop.signum
    print(job.summary_line())
    llm = getattr(job, "llm", None)
    if llm is not None and llm.last_timeline is not None:
        # The timeline of the last window's groups (each window's run replaces the previous one's).
        from klotski.commands.generate import _write_timeline

        _write_timeline(args, llm)
    return summary.exit_code
