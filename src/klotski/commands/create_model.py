"""`klotski create-model`: write a random-weight checkpoint of any family and shape, with a tokenizer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from klotski.config import DTYPES
from klotski.errors import KlotskiError


def register(sub) -> None:
    p = sub.add_parser("create-model", help="write a random-weight checkpoint (tests, benchmarks, what-ifs)")
    p.add_argument("--family", required=True, help="mixtral | qwen2_moe | qwen3_moe | deepseek_v2 | deepseek_v3 | olmoe")
    p.add_argument("--preset", help="a shape: tiny (default) or a real model's, e.g. mixtral-8x7b")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.add_argument("--tokenizer-model", help="a SentencePiece BPE tokenizer.model to ship (e.g. Mixtral's, "
                   "from the mistral-common package) instead of the built-in byte-level BPE; llama.cpp's "
                   "GGUF converter needs one")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def create_model(out: str | Path, family: str, preset: str | None = None, layers: int | None = None,
                 dtype: str = "bfloat16", seed: int = 0, progress: bool = False,
                 tokenizer_model: str | Path | None = None, **overrides) -> Path:
    """Write config.json, generation_config.json, safetensors weights and a tokenizer to `out`."""
    from klotski.checkpoint.writer import write_checkpoint
    from klotski.models.presets import preset_config
    from klotski.spm_tokenizer import write_spm_tokenizer
    from klotski.tokenizer import DEFAULT_CHAT_TEMPLATE, write_tokenizer

    if dtype not in DTYPES:
        raise KlotskiError(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    config = preset_config(family, preset, layers, **overrides)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KlotskiError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is not None:  # a real SentencePiece model, copied with a matching tokenizer.json
        special = write_spm_tokenizer(out, tokenizer_model, config["vocab_size"], DEFAULT_CHAT_TEMPLATE)
    else:
        special = write_tokenizer(out, config["vocab_size"])  # the tokenizer decides bos/eos ids
    config |= {k: special[k] for k in ("bos_token_id", "eos_token_id")}
    bar = _progress_bar(config, DTYPES[dtype]) if progress else None
    write_checkpoint(out, config, DTYPES[dtype], seed, bar)
    if bar is not None:
        print(file=sys.stderr)
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _progress_bar(config: dict, dtype):
    from klotski.checkpoint.writer import plan_tensors, _numel
    from klotski.models import spec_from_config

    total = sum(_numel(s) for _, s in plan_tensors(spec_from_config(config))) * dtype.itemsize
    done = [0]

    def tick(nbytes: int) -> None:
        done[0] += nbytes
        print(f"\rwriting {done[0] / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)

    return tick


def run(args) -> int:
    out = create_model(args.out, args.family, args.preset, args.layers, args.dtype, args.seed,
                       progress=sys.stderr.isatty(), tokenizer_model=args.tokenizer_model)
    print(f"wrote {args.family} checkpoint ({args.preset or 'tiny'}, {args.dtype}, random weights) to {out}")
    return 0
