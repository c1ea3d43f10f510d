"""Predictors: the paper's correlation sum, ordering and ties, online updates, baselines."""

from __future__ import annotations

import numpy as np

from klotski.prefetch.predictor import (
    CorrelationPredictor,
    FrequencyPredictor,
    PreviousLayerPredictor,
    RandomPredictor,
)
from klotski.prefetch.table import CorrelationTable


def hand_table() -> CorrelationTable:
    """Three experts, top-1: layer 0 favours expert 1; layer 1 rows differ by scale."""
    layer1 = np.array([[0, 5, 1], [0, 0, 9], [1, 1, 1]], dtype=float)
    return CorrelationTable([np.array([1.0, 4.0, 2.0]), layer1], top_k=1)


def prev(*experts: int) -> np.ndarray:
    """Tokens with one previous layer and top-1: [T, 1, 1]."""
    return np.array(experts).reshape(-1, 1, 1)


def test_correlation_sums_rows_over_tokens() -> None:
    raw = CorrelationPredictor(hand_table(), scoring="raw")
    # 2 x [0,5,1] + [0,0,9] = [0,10,11]
    assert raw.predict_scores(1, prev(0, 0, 1)).tolist() == [0, 10, 11]
    assert raw.predict(1, prev(0, 0, 1), 2) == [2, 1]
    # Normalised rows: 2 x [0,5/6,1/6] + [0,0,1] = [0, 1.67, 1.33]
    rows = CorrelationPredictor(hand_table(), scoring="rows")
    assert rows.predict(1, prev(0, 0, 1), 2) == [1, 2]
    assert rows.predict_tokens(1, prev(0, 1), 1).tolist() == [[1], [2]]


def test_layer_zero_and_unknown_paths_use_frequency() -> None:
    p = CorrelationPredictor(hand_table())
    assert p.predict(0, None, 3) == [1, 2, 0]
    assert p.predict_tokens(0, None, 1, num_tokens=2).tolist() == [[1], [1]]


def test_ties_go_to_the_lower_expert_id() -> None:
    p = CorrelationPredictor(hand_table())
    assert p.predict(1, prev(2), 3) == [0, 1, 2]


def test_online_updates_change_predictions_but_not_the_table() -> None:
    table = hand_table()
    p = CorrelationPredictor(table)
    for _ in range(3):
        p.observe(1, prev(1), np.array([[1]]))
    assert p.predict_scores(1, prev(1)).tolist() == [0, 3, 9]
    p.observe(1, prev(1, 1, 1, 1), np.array([[1], [1], [1], [1]]))
    assert p.predict(1, prev(1), 1) == [2] and p.predict_scores(1, prev(1))[1] == 7
    assert table.counts[1][1].tolist() == [0, 0, 9]  # the caller's table never changes


def test_path_length_two_uses_both_layers() -> None:
    counts = [np.ones(2), np.ones((2, 2)), np.zeros((2, 2, 2))]
    counts[2][0, 1] = [0, 7]  # path (0 -> 1) leads to expert 1
    counts[2][1, 1] = [7, 0]  # path (1 -> 1) leads to expert 0
    p = CorrelationPredictor(CorrelationTable(counts, top_k=1, path_length=2))
    assert p.predict(2, np.array([[[0], [1]]]), 1) == [1]
    assert p.predict(2, np.array([[[1], [1]]]), 1) == [0]
    assert p.predict(2, np.array([[[1]]]), 2) == [0, 1]  # one layer known: older summed out


def test_baselines() -> None:
    table = hand_table()
    freq = FrequencyPredictor(table)
    assert freq.predict(1, prev(0), 2) == [2, 1]  # column sums [1, 6, 11]
    freq.observe(1, None, np.array([[0]] * 20))
    assert freq.predict(1, None, 1) == [0]
    previous = PreviousLayerPredictor(table)
    assert previous.predict(1, prev(2, 2, 0), 2) == [2, 0]
    assert previous.predict(0, None, 1) == [1]
    a, b = RandomPredictor(3, seed=4), RandomPredictor(3, seed=4)
    assert [a.predict(1, None, 3) for _ in range(5)] == [b.predict(1, None, 3) for _ in range(5)]
    assert sorted(a.predict(1, None, 3)) == [0, 1, 2]
