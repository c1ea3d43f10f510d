"""Parity with the reference (transformers) for every family and variant: logits and greedy tokens."""

from __future__ import annotations

import pytest

from klotski import LLM, SamplingParams
from tests.reference import PROMPTS, VARIANTS, make_reference, reference_greedy, reference_logits


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    fused = request.param.endswith("-fused")
    model = make_reference(request.param, path, fused=fused)
    return request.param, path, model


def test_logits_match_reference(reference):
    name, path, model = reference
    expected = reference_logits(model, PROMPTS)
    llm = LLM(model=str(path), dtype="float32")
    got = llm.prompt_logits([{"prompt_token_ids": p} for p in PROMPTS])
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() < 1e-4, name


def test_greedy_tokens_match_reference(reference):
    name, path, model = reference
    expected = reference_greedy(model, PROMPTS, 16)
    llm = LLM(model=str(path), dtype="float32")
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    )
    assert [o.outputs[0].token_ids for o in outs] == expected, name
