"""Replay and metrics: hand-built traces with known answers, grouping, real-table comparison."""

from __future__ import annotations

import numpy as np
import pytest

from klotski.prefetch.evaluate import evaluate, make_groups
from klotski.prefetch.predictor import Predictor
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingTrace, split


class Fixed(Predictor):
    """Always the same scores per layer, for metrics with known answers."""

    name = "fixed"

    def __init__(self, scores: list[list[float]]) -> None:
        super().__init__(len(scores[0]))
        self.scores = np.array(scores)

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        return np.broadcast_to(self.scores[layer], (num_tokens, self.num_experts))


def two_token_trace() -> RoutingTrace:
    """Two sequences, top-1: layer 0 both use expert 0; layer 1 they use 1 and 2."""
    ids = np.array([[[0], [1]], [[0], [2]]])
    return RoutingTrace(ids, [0, 1], [0, 0], [False, False], num_experts=4)


def test_metrics_with_known_answers() -> None:
    table = CorrelationTable.empty(2, 4, top_k=1)
    fixed = Fixed([[0, 0, 0, 1], [0, 1, 0, 0]])  # predicts expert 3, then expert 1
    report = evaluate(two_token_trace(), table, group_size=2, predictors={"fixed": fixed})
    r = report["predictors"]["fixed"]
    layer0, layer1 = r["per_layer"]
    assert layer0 == dict(
        layer=0, precision=0.0, recall=0.0, hot_accuracy=0.0, token_accuracy=0.0, coverage=0.0, oracle_coverage=1.0
    )
    # Layer 1: {1} of used {1, 2}, a tie so still a true top-1; token a right, token b wrong.
    assert layer1 == dict(
        layer=1, precision=1.0, recall=0.5, hot_accuracy=1.0, token_accuracy=0.5, coverage=0.5, oracle_coverage=0.5
    )
    assert (r["precision"], r["recall"], r["hot_accuracy"]) == (0.5, 0.25, 0.5)
    assert (r["token_accuracy"], r["coverage"], r["oracle_coverage"]) == (0.25, 0.25, 0.75)
    assert report["config"]["num_groups"] == 1 and report["config"]["k"] == 1


def test_prefetching_more_than_top_k() -> None:
    table = CorrelationTable.empty(2, 4, top_k=1)
    fixed = Fixed([[3, 2, 1, 0], [0, 3, 2, 1]])
    r = evaluate(two_token_trace(), table, 2, k=2, predictors={"fixed": fixed})
    per = r["predictors"]["fixed"]["per_layer"]
    assert per[1]["coverage"] == 1.0 and per[1]["precision"] == 1.0 and per[0]["precision"] == 0.5


def test_groups_are_decode_steps_across_sequences() -> None:
    ids = np.zeros((7, 1, 1))
    seqs, pos = [0, 0, 0, 1, 1, 1, 2], [0, 1, 2, 0, 1, 2, 0]
    prefill = [True, False, False, True, False, False, True]
    trace = RoutingTrace(ids.astype(int), seqs, pos, prefill)
    groups, how = make_groups(trace, 2)
    assert how == "decode-steps"
    assert [sorted(g.tolist()) for g in groups] == [[0, 3], [1, 4], [2, 5], [6]]
    one = RoutingTrace(np.zeros((5, 1, 1), int), [3] * 5, range(5), [False] * 5)
    groups, how = make_groups(one, 2)
    assert how == "consecutive" and [len(g) for g in groups] == [2, 2, 1]


def test_online_updates_run_during_replay(mixtral_table: CorrelationTable, markov_trace: RoutingTrace) -> None:
    # An empty table learns only from the replay, so it must end up well above random.
    empty = CorrelationTable.empty(32, 8, top_k=2)
    r = evaluate(markov_trace.subset(np.arange(200)), empty, 8)["predictors"]
    assert r["correlation"]["coverage"] > r["random"]["coverage"] + 0.15


@pytest.mark.parametrize("group_size", [1, 8])
def test_correlation_beats_frequency_on_held_out_markov_trace(markov_trace: RoutingTrace, group_size: int) -> None:
    train, held = split(markov_trace, 0.5, seed=0)
    table = CorrelationTable.from_trace(train)
    r = evaluate(held, table, group_size)["predictors"]
    assert r["correlation"]["token_accuracy"] > r["frequency"]["token_accuracy"]
    assert r["correlation"]["coverage"] >= r["frequency"]["coverage"]
    assert r["frequency"]["coverage"] > r["random"]["coverage"]
    assert set(r) == {"correlation", "frequency", "previous", "random"}
    assert len(r["correlation"]["per_layer"]) == 32
