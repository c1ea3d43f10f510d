"""Routing replay: schedule-independent tokens, the table's frequencies, traces replayed exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from klotski import LLM, SamplingParams
from klotski.errors import KlotskiError
from klotski.models.spec import ModelSpec
from klotski.prefetch.replay import RoutingReplay, keyed_gumbel
from klotski.prefetch.table import load_table
from klotski.runtime.schedule import SCHEDULES

PROMPTS = [{"prompt_token_ids": [0, 5, 9, 100 + i, 7 * i + 3][: 2 + i % 4]} for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from klotski.commands.create_model import create_model

    return create_model(tmp_path_factory.mktemp("replay-model"), "mixtral", "tiny", layers=3, dtype="bfloat16")


def _run(model, tmp_path, **kw):
    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), routing_replay="mixtral-8x7b", **kw)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        return tokens, llm.last_stats
    finally:
        llm.store.close()


@pytest.fixture(scope="module")
def replay_tokens(model) -> list[list[int]]:
    llm = LLM(str(model), routing_replay="mixtral-8x7b")
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_replay_is_off_by_default(model):
    llm = LLM(str(model))
    llm.generate(PROMPTS[:1], GREEDY)
    assert llm.replay is None and llm.last_stats["routing_replay"] is None


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_replay_tokens_identical_across_schedules(model, replay_tokens, tmp_path, schedule):
    tokens, stats = _run(model, tmp_path, schedule=schedule, device_memory="500KB", batch_size=2, num_batches=2)
    assert tokens == replay_tokens
    assert stats["routing_replay"].startswith("table mixtral-8x7b")


def test_replay_changes_the_routing(model, replay_tokens):
    plain = [o.outputs[0].token_ids for o in LLM(str(model)).generate(PROMPTS, GREEDY)]
    assert plain != replay_tokens


def test_replayed_frequencies_match_the_table(model):
    from klotski.checkpoint.reader import Checkpoint

    spec: ModelSpec = Checkpoint.open(str(model)).spec
    replay, table = RoutingReplay(spec, "mixtral-8x7b", seed=3), load_table("mixtral-8x7b")
    seqs, positions = np.repeat(np.arange(400), 50), np.tile(np.arange(50), 400)  # 20000 tokens
    for layer in range(3):
        ids = replay.ids(layer, seqs, positions)
        assert (np.sort(ids, axis=1)[:, 0] != np.sort(ids, axis=1)[:, 1]).all()  # K distinct experts
        got = np.bincount(ids.ravel(), minlength=8) / ids.size
        want = table.frequency(layer) / table.frequency(layer).sum()
        assert np.abs(got - want).max() < 0.02, (layer, got, want)


def test_replay_depends_only_on_the_token_key():
    a = keyed_gumbel(7, np.array([3, 4, 5]), np.array([10, 11, 12]), 2, 8)
    b = keyed_gumbel(7, np.array([5, 3]), np.array([12, 10]), 2, 8)
    assert np.array_equal(a[[2, 0]], b)
    assert not np.array_equal(a, keyed_gumbel(8, np.array([3, 4, 5]), np.array([10, 11, 12]), 2, 8))


def test_replay_from_a_recorded_trace_reproduces_it(model, tmp_path):
    llm = LLM(str(model), routing_replay="mixtral-8x7b")
    recording = llm.record_routing()
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    trace = tmp_path / "t.npz"
    recording.recorder.to_trace().save(trace)
    again = LLM(str(model), routing_replay=str(trace))
    assert [o.outputs[0].token_ids for o in again.generate(PROMPTS, GREEDY)] == tokens
    assert again.last_stats["routing_replay"].startswith("trace")


def test_replay_trace_missing_a_token_is_a_clear_error(model, tmp_path):
    llm = LLM(str(model))
    recording = llm.record_routing()
    llm.generate(PROMPTS[:2], GREEDY)
    recording.recorder.to_trace().save(tmp_path / "short.npz")
    with pytest.raises(KlotskiError, match="has no token"):
        LLM(str(model), routing_replay=str(tmp_path / "short.npz")).generate(PROMPTS, GREEDY)
