"""The Hugging Face peer: transformers + Accelerate disk offload, run in its own (capped) process.

`python -m benchmarks.hf_engine prepare SRC DST` re-saves a checkpoint in transformers' merged-expert
layout once (the default per-expert layout is merged in RAM at load time, which a cap below the
checkpoint's size kills). `python -m benchmarks.hf_engine run --model DST ...` loads it with
`device_map="auto"`, `max_memory` and `offload_folder` as Accelerate's big-model docs recommend,
generates, and prints one JSON line of stats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def prepare(src: str, dst: str) -> None:
    """Re-save `src` in the merged-expert layout at `dst` (once; needs the checkpoint's size in RAM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(dst)
    tmp = out.with_name(out.name + ".partial")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    model.save_pretrained(tmp, save_original_format=False)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)


def _prompt_ids(num_prompts: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The same deterministic token ids klotski's side gets (benchmarks/workload.py)."""
    from benchmarks.workload import prompt_token_ids

    return [prompt_token_ids(i, prompt_len, vocab) for i in range(num_prompts)]


def run(args) -> dict:
    """Load with disk offload under max_memory, generate greedily in batches, report timings."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={"cpu": int(args.max_memory) if args.max_memory.isdigit() else args.max_memory},
        offload_folder=args.offload_folder,
        experts_implementation="eager",
    )
    load_s = time.perf_counter() - t0
    prompts = _prompt_ids(args.num_prompts, args.prompt_len, model.config.vocab_size)
    prefill = decode = 0.0
    generated = 0
    for g in range(0, len(prompts), args.batch_size):
        ids = torch.tensor(prompts[g : g + args.batch_size])  # [B, S] (equal lengths: no padding)
        p, d, n = _generate(model, ids, args.max_tokens)
        prefill, decode, generated = prefill + p, decode + d, generated + n
    wall = prefill + decode
    return {
        "engine": "hf-accelerate",
        "generated_tokens": generated,
        "prefill_s": prefill,
        "decode_s": decode,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "load_s": load_s,
        "device_map": sorted(set(map(str, getattr(model, "hf_device_map", {}).values()))),
    }


def _generate(model, ids, max_tokens: int) -> tuple[float, float, int]:
    """Greedy generation with a KV cache: (prefill s, decode s, generated tokens)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        t1 = time.perf_counter()
        past, mask = out.past_key_values, torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        for _ in range(max_tokens - 1):
            out = model(input_ids=tok, past_key_values=past, attention_mask=mask, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask[:, :1]], dim=1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ids.shape[0] * max_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.hf_engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("src")
    prep.add_argument("dst")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--offload-folder", required=True)
    r.add_argument("--max-memory", required=True, help="Accelerate's max_memory for the CPU, e.g. 1GiB")
    r.add_argument("--num-prompts", type=int, required=True)
    r.add_argument("--prompt-len", type=int, required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    r.add_argument("--batch-size", type=int, required=True)
    r.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.src, args.dst)
        return 0
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
