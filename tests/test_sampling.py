"""Sampler and SamplingParams: validation, greedy, filters, logprobs, per-request generators."""

import math

import pytest
import torch

from klotski.errors import KlotskiError
from klotski.sampling import Sampler, SamplingParams, derive_seed, make_generator


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 2},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1.5},
        {"max_tokens": 0},
        {"min_tokens": 20},
        {"logprobs": -1},
        {"stop": ""},
        {"stop": ["ok", ""]},
    ],
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(KlotskiError):
        SamplingParams(**kwargs)


def test_params_defaults_and_stop_normalized():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == () and p.stop_token_ids == [] and p.logprobs is None
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=-1).top_k == -1


def _rows(logits_row, n):
    return torch.tensor([logits_row] * n, dtype=torch.float32)


def test_greedy_is_argmax_and_ties_take_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 5.0, 5.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    result = Sampler().sample(logits, params, [None, None])
    assert result.token_ids.tolist() == [1, 0]


def test_seeded_rows_do_not_depend_on_batch_companions():
    torch.manual_seed(0)
    vocab, steps = 50, 8
    logits_seq = [torch.randn(vocab) for _ in range(steps)]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=1234)

    def run(companions):
        gens = [make_generator(params.seed, 0)]
        gens += [make_generator(None, 99 + i) for i in range(companions)]
        all_params = [params] + [SamplingParams(temperature=1.3)] * companions
        picked = []
        for step_logits in logits_seq:
            batch = torch.stack([step_logits] + [torch.randn(vocab) for _ in range(companions)])
            picked.append(int(Sampler().sample(batch, all_params, gens).token_ids[0]))
        return picked

    alone = run(0)
    assert run(3) == alone and run(7) == alone
    assert len(set(alone)) > 1  # really sampled, not collapsed to greedy


def test_top_k_one_and_tiny_top_p_equal_greedy():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    greedy = logits.argmax(dim=-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)):
        gens = [make_generator(i, 0) for i in range(4)]
        assert Sampler().sample(logits, [params] * 4, gens).token_ids.tolist() == greedy


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = make_generator(7, 0)
    sampler = Sampler()
    seen_k = {int(sampler.sample(logits, [SamplingParams(top_k=2)], [gen]).token_ids[0]) for _ in range(200)}
    seen_p = {int(sampler.sample(logits, [SamplingParams(top_p=0.7)], [gen]).token_ids[0]) for _ in range(200)}
    seen_min_p = {int(sampler.sample(logits, [SamplingParams(min_p=0.5)], [gen]).token_ids[0]) for _ in range(200)}
    assert seen_k == {0, 1} and seen_p == {0, 1} and seen_min_p == {0, 1}


def test_sampling_follows_softmax_with_temperature():
    probs = torch.tensor([0.6, 0.3, 0.1])
    temperature = 0.5
    logits = _rows(torch.log(probs).tolist(), 1)
    gen = make_generator(3, 0)
    draws = [
        int(Sampler().sample(logits, [SamplingParams(temperature=temperature)], [gen]).token_ids[0])
        for _ in range(3000)
    ]
    expected = torch.softmax(torch.log(probs) / temperature, dim=-1)
    for token in range(3):
        assert abs(draws.count(token) / len(draws) - float(expected[token])) < 0.03


def test_logprobs_come_from_raw_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(),
        SamplingParams(temperature=0.5, logprobs=0),
    ]
    gens = [None, make_generator(1, 0), make_generator(2, 0)]
    result = Sampler().sample(logits, params, gens)
    reference = torch.log_softmax(logits, dim=-1)
    token = int(result.token_ids[0])
    assert result.logprobs[0] == pytest.approx(float(reference[0, token]))
    top = result.top_logprobs[0]
    assert [t for t, _ in top] == reference[0].topk(3).indices.tolist()
    assert all(math.isclose(v, float(reference[0, t]), rel_tol=1e-6) for t, v in top)
    assert result.logprobs[1] is None and result.logprob_dict(1) is None
    chosen = int(result.token_ids[2])
    assert result.logprob_dict(2) == {chosen: pytest.approx(float(reference[2, chosen]))}


def test_suppressed_ids_are_never_picked():
    logits = torch.tensor([[0.0, 10.0, 1.0], [0.0, 10.0, 1.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)]
    result = Sampler().sample(logits, params, [None, None], suppress_ids=[[1], []])
    assert result.token_ids.tolist() == [2, 1]


def test_sampled_row_without_generator_is_rejected():
    with pytest.raises(ValueError, match="generator"):
        Sampler().sample(torch.zeros(1, 4), [SamplingParams()], [None])


def test_make_generator_uses_seed_else_fallback():
    a = torch.rand(3, generator=make_generator(5, fallback_seed=1))
    b = torch.rand(3, generator=make_generator(None, fallback_seed=5))
    assert torch.equal(a, b)
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    assert 0 <= derive_seed(123, 4) < 2**63
