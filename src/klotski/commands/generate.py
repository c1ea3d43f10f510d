"""`klotski generate`: prompts in (flags or a JSONL file), completions and throughput out."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from klotski.config import EngineConfig
from klotski.errors import KlotskiError, ParameterError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for many prompts")
    p.add_argument("--model", help="checkpoint directory (default: the built-in Shakespeare-trained Mixtral)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--input", help='JSONL: {"prompt": ...} | {"messages": [...]} | {"prompt_token_ids": [...]}, optional "id"'
    )
    p.add_argument("--output", help="write one JSON line per input: id, text, token_ids, finish_reason")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, help="top-N logprobs per generated token")
    add_config_flags(p, "dtype", "replay")
    p.add_argument("--json", action="store_true", help='print {"outputs": [...], "stats": {...}}')
    p.add_argument("--record-routing", help="write every token's experts to FILE.npz (a routing trace)")
    add_engine_flags(p)
    p.set_defaults(handler=run)


def add_config_flags(p, *groups: str) -> None:
    """One flag per EngineConfig field of these groups: --field-name, the field's default and help."""
    for f, flag in EngineConfig.flags(*groups):
        name = "--" + f.name.replace("_", "-")
        if flag.action:
            p.add_argument(name, action=flag.action, default=f.default, help=flag.help)
        else:
            p.add_argument(name, default=f.default, type=flag.type, metavar=flag.metavar, help=flag.help)


def add_policy_flags(p) -> None:
    """Schedule, bs, n and K: what the planner chooses unless these fix it (generate, plan)."""
    add_config_flags(p, "policy")


def add_engine_flags(p) -> None:
    """Budget, placement, schedule and prefetch flags shared by the commands that run the engine, and
    the timeline outputs."""
    add_config_flags(p, "budget", "hardware", "engine", "policy")
    p.add_argument("--trace", help="write the timeline as Chrome trace JSON (opens in Perfetto)")
    p.add_argument("--timeline", help="draw the timeline's lanes to a PNG (needs matplotlib)")


def engine_kwargs(args) -> dict:
    """LLM(...) keyword arguments from the flags add_engine_flags added."""
    return {f.name: getattr(args, f.name) for f, _ in EngineConfig.flags("budget", "hardware", "engine", "policy")}


def read_jsonl(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, record) for each good line, and an error message for each bad one.

    Lines are read and decoded one at a time, so a stray byte or a bad line costs that line only."""
    file = Path(path)
    if not file.is_file():
        raise KlotskiError(f"--input {path} does not exist or is not a file")
    records, errors = [], []
    with open(file, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                record = json.loads(line)
                # json reads "\ud800" escapes into strings that are not text (they cannot be tokenized).
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); this line was skipped")
                continue
            except UnicodeEncodeError:
                errors.append(f"{path}:{n}: a string holds an unpaired surrogate escape; this line was skipped")
                continue
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{n}: not valid JSON ({exc.msg}); this line was skipped")
                continue
            except RecursionError:
                errors.append(f"{path}:{n}: nested too deeply to read; this line was skipped")
                continue
            if not isinstance(record, dict) or not ({"prompt", "messages", "prompt_token_ids"} & set(record)):
                errors.append(
                    f'{path}:{n}: expected an object with "prompt", "messages" or "prompt_token_ids"; skipped'
                )
                continue
            records.append((n, record))
    return records, errors


def run(args) -> int:
    from klotski.default_model import notice
    from klotski.engine import LLM
    from klotski.sampling import SamplingParams

    with flag_names():
        params = SamplingParams(
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
    items, errors = [], []
    for i, text in enumerate(args.prompt):
        items.append((f"prompt-{i}", {"prompt": text}))
    if args.input:
        records, errors = read_jsonl(args.input)
        items += [(str(r.get("id", f"line-{n}")), r) for n, r in records]
    if not items and not errors:
        raise KlotskiError("no prompts: give --prompt TEXT (repeatable) or --input FILE.jsonl")
    if args.model is None:
        print(notice(), file=sys.stderr)
    for flag in ("output", "trace", "timeline", "record_routing"):
        _check_writable(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.timeline:
        from klotski.runtime.plot import require_matplotlib

        require_matplotlib()
    llm = LLM(model=args.model, dtype=args.dtype, routing_replay=args.routing_replay, **engine_kwargs(args))
    with flag_names():
        params.validate(llm.spec.vocab_size)  # logprobs, stop ids against this model's vocabulary
    if llm.replay is not None:
        print(
            f"klotski: routing replay ON ({llm.replay.describe()}): the router's choices are replaced; "
            "text is not the model's",
            file=sys.stderr,
        )
    recording = llm.record_routing() if args.record_routing else None
    prompts, ids = _prompts(llm, items, errors)
    outputs = _generate_durably(llm, prompts, ids, params, args.output)
    if recording is not None:
        recording.recorder.to_trace().save(args.record_routing)
    _write_outputs(args, ids, outputs, llm.last_stats)
    _write_timeline(args, llm)
    for message in errors:
        print(f"klotski: error: {message}", file=sys.stderr)
    return 2 if errors else 0


@contextlib.contextmanager
def flag_names():
    """SamplingParams errors in the CLI's words: `--max-tokens: ...` rather than `max_tokens=...`."""
    try:
        yield
    except ParameterError as exc:
        if exc.field is None:
            raise
        flag = "--" + exc.field.replace("_", "-")
        text = str(exc).removeprefix("SamplingParams: ").removeprefix(f"{exc.field}=")
        raise ParameterError(f"{flag}: {text}", exc.field) from None


def _prompts(llm, items, errors) -> tuple[list, list[str]]:
    """Turn records into engine prompts; a bad record becomes an error, the rest still run."""
    prompts, ids = [], []
    for rid, record in items:
        try:
            text, tokens = llm.prompts.record(record, f"input {rid}")
        except KlotskiError as exc:
            errors.append(str(exc) + "; this input was skipped")
            continue
        prompts.append({"prompt": text, "prompt_token_ids": tokens})
        ids.append(rid)
    return prompts, ids


def _check_writable(path: str | None, flag: str = "--output") -> None:
    """Fail before generating, not after, when an output file cannot be written; an existing
    file is left as it is (nothing is created or truncated here)."""
    if path is None:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        problem = "is a directory"
    elif target.exists():
        problem = None if os.access(target, os.W_OK) else "is not writable"
    elif not parent.is_dir():
        problem = f"is in a directory that does not exist ({parent})"
    else:
        problem = None if os.access(parent, os.W_OK | os.X_OK) else f"is in a directory that is not writable ({parent})"
    if problem:
        raise KlotskiError(f"{flag} {path} cannot be written: it {problem}; choose another path")


def output_row(rid: str, out) -> dict:
    """One result line: id, text, token_ids, finish_reason, and the logprobs when asked for
    (per generated token, {token id: logprob} of the top-N and the sampled token)."""
    c = out.outputs[0]
    row = {"id": rid, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        row["logprobs"] = [{str(k): v for k, v in step.items()} for step in c.logprobs]
        row["cumulative_logprob"] = c.cumulative_logprob
    return row


def _generate_durably(llm, prompts: list[dict], ids: list[str], params, output: str | None) -> list:
    """Generate group by group; with --output each group's rows are written, flushed and fsynced as it
    finishes (in input order), so a crash keeps every finished group. OUT is replaced only once the
    first group is done: a run that fails before that leaves an earlier OUT as it was. Resuming is
    run-batch's job."""
    if not prompts:
        if output:
            open(output, "w").close()
        return []
    requests = [(p["prompt"], p["prompt_token_ids"], params) for p in prompts]
    outputs: list = []
    with contextlib.ExitStack() as stack:
        f = None
        for group in llm.run_groups(requests):
            if output:
                if f is None:
                    f = stack.enter_context(open(output, "w"))
                f.write("".join(json.dumps(output_row(rid, o)) + "\n" for rid, o in zip(ids[len(outputs) :], group)))
                f.flush()
                os.fsync(f.fileno())
            outputs += group
    return outputs


def _write_outputs(args, ids, outputs, stats) -> None:
    rows = [output_row(rid, o) for rid, o in zip(ids, outputs)]
    if args.json:
        print(json.dumps({"outputs": rows, "stats": stats}, indent=2, default=str))
        return
    for rid, o in zip(ids, outputs):
        print(f"--- {rid}: {o.prompt!r}\n{o.outputs[0].text}  [{o.outputs[0].finish_reason}]")
        c = o.outputs[0]
        if c.logprobs is not None:  # the sampled token's logprob per step; --json has the top-N
            print("logprobs: " + " ".join(f"{step[t]:.4f}" for t, step in zip(c.token_ids, c.logprobs)))
    if outputs:
        print(format_stats(stats))


def format_stats(stats: dict) -> str:
    """A short human summary of a run."""
    pol = stats.get("policy", {})
    return (
        f"{stats['generated_tokens']} tokens in {stats['wall_s']:.2f} s = {stats['tokens_per_s']:.2f} tok/s "
        f"(prefill {stats['prefill_s']:.2f} s, decode {stats['decode_s']:.2f} s; bubble ratio "
        f"{stats['bubble_ratio']:.3f}; schedule {pol.get('schedule')}, bs {pol.get('batch_size')}, "
        f"n {pol.get('num_batches')}, {stats['dtype']} on {stats['device']})"
    )


def _write_timeline(args, llm) -> None:
    if args.trace and llm.last_timeline is not None:
        llm.last_timeline.write_chrome_trace(args.trace)
    if args.timeline and llm.last_timeline is not None:
        from klotski.runtime.plot import plot_timeline

        plot_timeline(llm.last_timeline, args.timeline)
