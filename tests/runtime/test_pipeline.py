"""The pipeline's prefetch decisions: what it starts for the next step, and when it starts nothing."""

from __future__ import annotations

import pytest
import torch

from klotski import LLM
from klotski.models.spec import EXPERT, MOE, WeightKey
from klotski.prefetch.runtime import make_predictor
from klotski.runtime.generate import GroupBatch, prefill_step
from klotski.runtime.pipeline import Pipeline
from klotski.runtime.schedule import get_schedule
from klotski.timeline import Timeline


class Recorder:
    """Wraps a store and records every fetch (key, lane)."""

    def __init__(self, store):
        self.store, self.fetches = store, []

    def fetch(self, key, lane="prefetch"):
        self.fetches.append((key, lane))
        return self.store.fetch(key, lane)

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from klotski.commands.create_model import create_model

    return LLM(str(create_model(tmp_path_factory.mktemp("pipe-model"), "mixtral", "tiny", layers=2, dtype="bfloat16")))


def _step(llm, seqs: int = 16):
    batch = GroupBatch(0, [llm._sequence(i, [5 + i, 9, 17], llm_params()) for i in range(seqs)])
    batch.kv = [llm.runner.new_kv(seqs, 8) for _ in range(llm.spec.num_layers)]
    return prefill_step(batch, 0)


def llm_params():
    from klotski.sampling import SamplingParams

    return SamplingParams(max_tokens=2)


def test_the_next_steps_first_layer_is_prefetched_unless_the_step_is_final(llm):
    gate0 = {}
    for final in (False, True):
        store = Recorder(llm.store)
        pipe = Pipeline(
            llm.runner,
            store,
            get_schedule("klotski"),
            Timeline(enabled=False),
            2,
            make_predictor(llm.spec, None),
            adaptive_hot=True,
        )
        with torch.no_grad():
            pipe.forward([_step(llm)], final=final)
        gate0[final] = store.fetches.count((WeightKey(0, MOE), "prefetch"))
        assert bool(pipe._ahead) != final  # what waits for the next step (drain() releases it)
        pipe.drain()
    assert gate0[False] == gate0[True] + 1  # the next step's first gate, started during this one


def test_adaptive_hot_prefetches_every_expert_a_large_group_uses(llm):
    """16 sequences x 3 tokens pick every expert of the tiny model; adaptive K prefetches them all."""
    for adaptive, want in ((False, 2), (True, llm.spec.num_experts)):
        store = Recorder(llm.store)
        pipe = Pipeline(
            llm.runner,
            store,
            get_schedule("klotski"),
            Timeline(enabled=False),
            2,
            make_predictor(llm.spec, None),
            adaptive_hot=adaptive,
        )
        with torch.no_grad():
            pipe.forward([_step(llm)], final=False)  # step 1 learns the routing
            store.fetches.clear()
            pipe.forward([_step(llm)], final=True)
        pipe.drain()
        prefetched = {k.expert for k, lane in store.fetches if k.layer == 1 and k.part == EXPERT and lane == "prefetch"}
        assert len(prefetched) == want
