"""`klotski perplexity`: score a text file with a checkpoint through the engine (quality checks).

The text is tokenized once and cut into windows of the model's context; windows go through the
pipeline in batch groups (`LLM.prompt_logits`), under the same budget and placement flags as
`generate`, so a quantized or offloaded run is scored by the code that serves it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from klotski.errors import KlotskiError

# Logits of one call stay below this (fp32 [tokens, vocab]); larger files take several calls.
_LOGITS_BYTES = 256 << 20


def register(sub) -> None:
    from klotski.commands.generate import add_config_flags, add_engine_flags

    p = sub.add_parser("perplexity", help="perplexity of a text file under a checkpoint (windowed)")
    p.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    p.add_argument("--input", required=True, help="a UTF-8 text file to score")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context - 1)")
    p.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts (default: window - 1, so every "
        "token after the first is scored once; smaller strides give scored tokens more context)",
    )
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the file")
    add_config_flags(p, "dtype")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_engine_flags(p)
    p.set_defaults(handler=run)


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target) per window: each target t >= 1 is scored exactly once, in the
    first window that holds it with at least one token of context before it."""
    if window < 2:
        raise KlotskiError(f"--window must be at least 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise KlotskiError(f"--stride must be between 1 and window - 1 = {window - 1}, got {stride}")
    out, scored_to, start = [], 1, 0
    while scored_to < num_tokens:
        end = min(start + window, num_tokens)
        out.append((start, end, max(scored_to, start + 1)))
        scored_to = end
        start += stride
    return out


def score(llm, ids: list[int], window: int, stride: int) -> dict:
    """Total negative log-likelihood (nats) and count of the scored targets of `ids`."""
    import torch

    spans = windows(len(ids), window, stride)
    per_call = max(1, _LOGITS_BYTES // (window * llm.spec.vocab_size * 4))
    nll, count, fed = 0.0, 0, 0
    start = time.perf_counter()
    for c in range(0, len(spans), per_call):
        chunk = spans[c : c + per_call]
        logits = llm.prompt_logits([{"prompt_token_ids": ids[s:e]} for s, e, _ in chunk])
        for (s, e, first), rows in zip(chunk, logits):
            targets = torch.tensor(ids[first:e])
            # row j predicts token s + j + 1, so target t comes from row t - s - 1
            pred = rows[first - s - 1 : e - s - 1].float()
            nll += float(torch.nn.functional.cross_entropy(pred, targets, reduction="sum"))
            count += len(targets)
            fed += e - s
    wall = time.perf_counter() - start
    return {"nll": nll, "scored_tokens": count, "tokens_fed": fed, "windows": len(spans), "wall_s": wall}


def run(args) -> int:
    from klotski.commands.generate import engine_kwargs
    from klotski.engine import LLM

    path = Path(args.input)
    if not path.is_file():
        raise KlotskiError(f"--input {args.input} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KlotskiError(f"--input {args.input} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    llm = LLM(model=args.model, dtype=args.dtype, **engine_kwargs(args))
    if llm.tokenizer is None:
        raise KlotskiError(f"{llm.config.model} has no tokenizer.json; perplexity needs the model's tokenizer")
    ids = llm.tokenizer.encode(text)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise KlotskiError(f"--max-tokens must be at least 2, got {args.max_tokens}")
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise KlotskiError(f"--input {args.input} has {len(ids)} token(s); perplexity needs at least 2")
    window = args.window or llm.max_model_len - 1  # a prompt must leave room for one more position
    if window >= llm.max_model_len:
        raise KlotskiError(
            f"--window {window} does not fit the model's context {llm.max_model_len}; "
            f"use at most {llm.max_model_len - 1}"
        )
    stride = args.stride or window - 1
    result = score(llm, ids, window, stride)
    mean = result["nll"] / result["scored_tokens"]
    result |= {
        "model": llm.config.model,
        "input": str(path),
        "window": window,
        "stride": stride,
        "loss": mean,
        "perplexity": math.exp(mean),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "tokens_per_s": result["tokens_fed"] / result["wall_s"] if result["wall_s"] > 0 else 0.0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"perplexity {result['perplexity']:.3f} (loss {mean:.4f} nats/token) over {result['scored_tokens']} "
            f"tokens of {path.name}: {result['windows']} windows of {window}, stride {stride}, "
            f"{result['dtype']}; {result['tokens_fed']} tokens in {result['wall_s']:.2f} s = "
            f"{result['tokens_per_s']:.1f} tok/s"
        )
    sys.stdout.flush()
    return 0
