"""RoutingTrace save/load/validation, RoutingRecorder assembly, Markov sampling, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from klotski.errors import KlotskiError
from klotski.prefetch.synthetic import sample_markov_trace
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingRecorder, RoutingTrace, split


def test_save_load_round_trip(tmp_path: Path, markov_trace: RoutingTrace) -> None:
    markov_trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert back.expert_ids.dtype == np.int16 and back.seq_ids.dtype == np.int32
    assert np.array_equal(back.expert_ids, markov_trace.expert_ids)
    assert back.num_experts == 8


def test_validation_errors(tmp_path: Path) -> None:
    ids = np.zeros((2, 3, 2), dtype=np.int16)
    with pytest.raises(KlotskiError, match="seq_ids"):
        RoutingTrace(ids, [0], [0, 1], [False, False])
    with pytest.raises(KlotskiError, match="repeated"):
        RoutingTrace(ids, [0, 0], [1, 1], [False, False])
    with pytest.raises(KlotskiError, match="tokens, layers, top_k"):
        RoutingTrace(ids[:, 0], [0, 0], [0, 1], [False, False])
    np.savez(tmp_path / "partial.npz", expert_ids=ids)
    with pytest.raises(KlotskiError, match="lacks seq_ids"):
        RoutingTrace.load(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(KlotskiError, match="not a readable"):
        RoutingTrace.load(tmp_path / "junk.npz")
    with pytest.raises(KlotskiError, match="not found"):
        RoutingTrace.load(tmp_path / "missing.npz")


def test_recorder_assembles_rows_by_sequence_and_position() -> None:
    rec = RoutingRecorder(num_layers=2, top_k=2, num_experts=4)
    # Step 1: prefill of seq 5 (positions 0, 1), layer 1 arrives first and in another order.
    rec.record(1, [5, 5], [1, 0], True, np.array([[3, 2], [1, 0]]))
    rec.record(0, [5, 5], [0, 1], [True, True], np.array([[0, 1], [2, 3]]))
    # Step 2: decode of seq 5 and prefill of seq 2 together.
    rec.record(0, [2, 5], [0, 2], [True, False], np.array([[1, 2], [3, 0]]))
    rec.record(1, [2, 5], [0, 2], [True, False], np.array([[2, 3], [0, 1]]))
    trace = rec.to_trace()
    assert trace.seq_ids.tolist() == [2, 5, 5, 5]
    assert trace.positions.tolist() == [0, 0, 1, 2]
    assert trace.is_prefill.tolist() == [True, True, True, False]
    assert trace.expert_ids[1].tolist() == [[0, 1], [1, 0]]
    assert trace.expert_ids[2].tolist() == [[2, 3], [3, 2]]


def test_recorder_refuses_incomplete_rows() -> None:
    rec = RoutingRecorder(num_layers=2, top_k=1)
    for i in range(100):  # more than the initial buffer, to exercise growth
        rec.record(0, [i], [0], False, [[1]])
    rec.record(1, [0], [0], False, [[0]])
    with pytest.raises(ValueError, match="lack some layers"):
        rec.to_trace()
    assert rec.to_trace(drop_incomplete=True).num_tokens == 1


def test_markov_trace_is_distinct_deterministic_and_realistic(
    mixtral_table: CorrelationTable, markov_trace: RoutingTrace
) -> None:
    ids = markov_trace.expert_ids
    assert ids.shape == (800, 32, 2)
    assert (ids[:, :, 0] != ids[:, :, 1]).all()
    again = sample_markov_trace(mixtral_table, 400, 2, seed=7)
    assert np.array_equal(again.expert_ids, ids)
    # Expert 5 is layer 0's favourite in the real table, expert 7 its least used.
    freq = np.bincount(ids[:, 0].ravel(), minlength=8)
    assert freq.argmax() == 5 and freq[5] > 2 * freq[7]


def test_flatten_moves_routing_toward_uniform(mixtral_table: CorrelationTable) -> None:
    flat = sample_markov_trace(mixtral_table, 200, 4, seed=1, flatten=1.0, prompt_len=1)
    freq = np.bincount(flat.expert_ids.ravel(), minlength=8) / flat.expert_ids.size
    assert np.abs(freq - 1 / 8).max() < 0.01
    assert flat.is_prefill.sum() == 200
    with pytest.raises(KlotskiError):
        sample_markov_trace(mixtral_table, 2, 2, seed=1, flatten=1.5)


def test_split_by_sequence(markov_trace: RoutingTrace) -> None:
    train, held = split(markov_trace, 0.25, seed=3)
    assert held.num_tokens == 200 and train.num_tokens == 600
    assert not set(train.seq_ids.tolist()) & set(held.seq_ids.tolist())
    one = markov_trace.subset(markov_trace.seq_ids == 0)
    head, tail = split(one, 0.5, seed=0)
    assert head.positions.tolist() == [0] and tail.positions.tolist() == [1]
