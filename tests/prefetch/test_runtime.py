"""The prefetcher as the pipeline sees it: hot experts, and the experts a whole group will use."""

from __future__ import annotations

import torch

from klotski.models.mixtral import spec_from_config
from klotski.models.presets import preset_config
from klotski.prefetch.runtime import make_predictor


def _spec(layers: int = 4):
    return spec_from_config(preset_config("mixtral", "tiny", layers=layers))


def test_a_large_group_is_expected_to_use_every_expert(mixtral_table):
    spec = _spec()
    predictor = make_predictor(spec, mixtral_table)
    gen = torch.Generator().manual_seed(0)
    prev = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(1024)])  # [T, K]
    assert sorted(predictor.likely(1, prev, len(prev), 0.9)) == list(range(8))
    # first layer: no path, frequencies alone decide
    assert sorted(predictor.likely(0, None, 1024, 0.9)) == list(range(8))


def test_one_token_is_expected_to_use_at_most_top_k(mixtral_table):
    spec = _spec()
    predictor = make_predictor(spec, mixtral_table)
    prev = torch.tensor([[3, 5]])
    likely = predictor.likely(1, prev, 1, 0.9)
    assert len(likely) <= spec.top_k
    # hottest first: the order agrees with the predictor's own ranking
    ranked = predictor.predict(1, prev, 8)
    assert likely == [e for e in ranked if e in likely]


def test_no_routing_seen_yet_means_no_guess():
    spec = _spec()
    predictor = make_predictor(spec, None)
    assert predictor.likely(0, None, 64, 0.9) == []
