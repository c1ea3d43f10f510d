"""`klotski create-model`: write a random-weight checkpoint of any family and shape, with a tokenizer."""

from __future__ import annotations

import sys

from klotski.checkpoint.create import create_model


def register(sub) -> None:
    p = sub.add_parser("create-model", help="write a random-weight checkpoint (tests, benchmarks, what-ifs)")
    p.add_argument(
        "--family", required=True, help="mixtral | qwen2_moe | qwen3_moe | deepseek_v2 | deepseek_v3 | olmoe"
    )
    p.add_argument("--preset", help="a shape: tiny (default) or a real model's, e.g. mixtral-8x7b")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.add_argument(
        "--tokenizer-model",
        help="a SentencePiece BPE tokenizer.model to ship (e.g. Mixtral's, "
        "from the mistral-common package) instead of the built-in byte-level BPE; llama.cpp's "
        "GGUF converter needs one",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args) -> int:
    out = create_model(
        args.out,
        args.family,
        args.preset,
        args.layers,
        args.dtype,
        args.seed,
        progress=sys.stderr.isatty(),
        tokenizer_model=args.tokenizer_model,
    )
    print(f"wrote {args.family} checkpoint ({args.preset or 'tiny'}, {args.dtype}, random weights) to {out}")
    return 0
