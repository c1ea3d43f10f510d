"""Workloads: the same deterministic prompts and lengths for every engine."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Ids 0..2 are BOS/EOS/UNK in Mixtral's vocabulary; prompts avoid them so no engine stops early.
FIRST_ID = 3


@dataclass(frozen=True)
class Workload:
    """num_prompts prompts of prompt_len tokens, max_tokens generated each (EOS ignored)."""

    name: str
    num_prompts: int
    prompt_len: int
    max_tokens: int
    why: str  # why this shape: what it stresses on this machine

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_token_ids(index: int, length: int, vocab: int) -> list[int]:
    """Prompt `index`: `length` ids drawn from a generator keyed by the index alone."""
    rng = np.random.default_rng([0x6B6C6F74, index])
    return [int(t) for t in rng.integers(FIRST_ID, vocab, size=length)]


def write_jsonl(work: Workload, vocab: int, path: Path) -> Path:
    """The workload as `klotski generate --input` lines of prompt_token_ids."""
    with open(path, "w") as f:
        for i in range(work.num_prompts):
            f.write(json.dumps({"id": str(i), "prompt_token_ids": prompt_token_ids(i, work.prompt_len, vocab)}) + "\n")
    return path
