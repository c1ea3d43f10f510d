"""LLM: prompt forms, sampling and stop rules end to end, batching invariance, and input errors."""

from __future__ import annotations

import json

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.errors import CheckpointError, KlotskiError
from tests.broken import BREAKAGES, copy_checkpoint

PROMPTS = ["Hello world", "The river ran low that summer, and the old mill stood quiet", "A", "Numbers matter: 1, 2, 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_mixtral) -> LLM:
    return LLM(model=str(tiny_mixtral), dtype="float32")


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# -- prompts and order -------------------------------------------------------------------------
def test_string_and_token_id_prompts_agree(llm):
    text = llm.generate("Hello world", GREEDY)[0]
    ids = llm.tokenizer.encode("Hello world")
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY)[0]
    assert text.prompt == "Hello world" and text.prompt_token_ids == ids == by_ids.prompt_token_ids
    assert text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert text.outputs[0].text == by_ids.outputs[0].text


def test_outputs_come_back_in_prompt_order(llm, tiny_mixtral):
    alone = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    for engine in (llm, LLM(model=str(tiny_mixtral), dtype="float32", batch_size=2)):
        batched = engine.generate(PROMPTS, GREEDY)
        assert [o.prompt for o in batched] == PROMPTS
        assert tokens(batched) == tokens(alone)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prompts_logprobs_are_the_same_alone_and_in_any_batch(tiny_mixtral, dtype):
    # Not only the tokens: the numbers themselves. Batch shapes change every matmul's row count and
    # every attention call's padded size (layers/linear.py, layers/attention.py say why that matters).
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)

    def run(**policy):
        outs = LLM(model=str(tiny_mixtral), dtype=dtype, **policy).generate(PROMPTS, params)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    engine = LLM(model=str(tiny_mixtral), dtype=dtype, batch_size=1, num_batches=1)
    alone = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for p in PROMPTS for o in engine.generate(p, params)]
    for policy in (
        {"batch_size": 4, "num_batches": 1},
        {"batch_size": 2, "num_batches": 2},
        {"batch_size": 1, "num_batches": 4},
    ):
        assert run(**policy) == alone, policy


# -- sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_is_independent_of_batch(llm, tiny_mixtral):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    others = [SamplingParams(temperature=0.8, max_tokens=6), SamplingParams(temperature=0, max_tokens=3)]
    alone = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], seeded, others[1]])
    bs1 = LLM(model=str(tiny_mixtral), dtype="float32", batch_size=1).generate(
        [PROMPTS[2], PROMPTS[0]], [others[1], seeded]
    )
    assert mixed[1].outputs[0].token_ids == alone == bs1[1].outputs[0].token_ids
    reseeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1235, max_tokens=10, ignore_eos=True)
    assert llm.generate(PROMPTS[0], reseeded)[0].outputs[0].token_ids != alone


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_mixtral):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [tokens(LLM(model=str(tiny_mixtral), dtype="float32", seed=7).generate(PROMPTS, params)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_logprobs_are_top_n_of_the_raw_logits(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    steps = out.outputs[0].logprobs
    assert len(steps) == 4
    for token, entry in zip(out.outputs[0].token_ids, steps):
        assert len(entry) == 3 and token in entry  # greedy: the sampled token is the top-1
        assert entry[token] == max(entry.values()) <= 0
    first = torch.log_softmax(llm.prompt_logits([PROMPTS[0]])[0][-1], dim=-1)
    values, ids = first.topk(3)
    for i, v in zip(ids.tolist(), values.tolist()):
        assert steps[0][i] == pytest.approx(v, abs=1e-4)


# -- stop rules ----------------------------------------------------------------------------------
def test_stop_string_cuts_the_text(llm):
    full = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0]
    # A stop string of plain characters from the middle of the greedy text.
    start = next(i for i in range(1, len(full.text) - 2) if full.text[i : i + 3].isalnum())
    stop = full.text[start : start + 3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].text == full.text[: full.text.find(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert len(out.outputs[0].token_ids) < len(full.token_ids)


def test_stop_token_ids(llm):
    full = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    i = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[full[i]]))[0]
    assert out.outputs[0].token_ids == full[: i + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == full[i]


def test_eos_from_generation_config_and_ignore_eos(llm, tiny_mixtral, tmp_path):
    full = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    i = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, full[i]]}))
    engine = LLM(model=str(path), dtype="float32")
    stopped = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert stopped.token_ids == full[: i + 1] and stopped.finish_reason == "stop"
    assert stopped.text == llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=i))[0].outputs[0].text
    ignored = engine.generate(PROMPTS[0], GREEDY)[0].outputs[0]
    assert ignored.token_ids == full and ignored.finish_reason == "length"


# -- chat ------------------------------------------------------------------------------------------
def test_chat_uses_the_checkpoint_template(llm):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llm.chat([conversation], GREEDY)[0]
    assert out.prompt == "<s>Be brief.\n\n[INST] Hi [/INST]"
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id  # written once, by the template
    same = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY)[0]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids
    assert llm.chat(conversation, GREEDY)[0].outputs[0].token_ids == same.outputs[0].token_ids


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}])
def test_empty_prompt(llm, prompt):
    with pytest.raises(KlotskiError, match="prompt is empty"):
        llm.generate(prompt)


def test_max_tokens_below_one():
    with pytest.raises(KlotskiError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)


def test_prompt_longer_than_context(tiny_mixtral):
    short = LLM(model=str(tiny_mixtral), dtype="float32", max_model_len=16)
    with pytest.raises(KlotskiError, match="context is 16"):
        short.generate({"prompt_token_ids": list(range(2, 22))})


def test_token_id_outside_vocabulary(llm):
    with pytest.raises(KlotskiError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [3, 100000]})


def test_unknown_chat_role(llm):
    with pytest.raises(KlotskiError, match="Unknown role robot"):
        llm.chat([{"role": "robot", "content": "beep"}])


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(model=str(tmp_path / "nowhere"))


def test_corrupt_tokenizer(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    damage, words = BREAKAGES["corrupt-tokenizer"]
    damage(path)
    with pytest.raises(KlotskiError, match=words):
        LLM(model=str(path))


def test_bad_device_memory(tiny_mixtral):
    with pytest.raises(KlotskiError, match="cannot read device memory size"):
        LLM(model=str(tiny_mixtral), device_memory="lots")
