"""The server's step loop: requests that join and leave a running group get exactly what they get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.entrypoints.scheduler import QueueFull, Scheduler


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The engine thread and the test share 2 cores: a second OpenMP thread mostly waits (see server_utils)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    return LLM(str(tiny_mixtral))


def _requests():
    """Prompts of different lengths; greedy, seeded sampling, stop strings, logprobs, min_tokens."""
    out = []
    for i in range(14):
        prompt = "The library opened at nine " * (1 + i % 4) + str(i)
        if i % 3 == 0:
            p = SamplingParams(temperature=0.0, max_tokens=3 + i % 7, ignore_eos=i % 2 == 0)
        elif i % 3 == 1:
            p = SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=4 + i % 5, logprobs=2)
        else:
            p = SamplingParams(temperature=0.7, top_k=20, seed=7, max_tokens=9, stop=["e", "xyz"], min_tokens=1)
        out.append((prompt, p))
    return out


def _wait(handles, timeout=120):
    for h in handles:
        assert h.done.wait(timeout), "a sequence did not finish"


def test_joining_and_leaving_sequences_match_their_alone_runs(tiny_mixtral, reference):
    llm = LLM(str(tiny_mixtral), batch_size=2, num_batches=2)  # capacity 4: requests must join and leave
    sched = Scheduler(llm, max_queue=64, max_wait_ms=0)
    sched.start()
    requests = _requests()
    updates: dict[int, list] = {}
    lock = threading.Lock()

    def record(h, u):
        with lock:
            updates.setdefault(id(h), []).append(u)

    handles = []
    for i, (prompt, p) in enumerate(requests):
        handles += sched.submit([(llm.tokenizer.encode(prompt), p, None)], record)
        if i % 4 == 3:
            time.sleep(0.05)  # later arrivals join a group already decoding
    _wait(handles)
    assert sched.shutdown(5)
    stats = sched.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["finished"] == len(requests)
    for (prompt, p), h in zip(requests, handles):
        alone = reference.generate([prompt], p)[0].outputs[0]
        assert h.token_ids == alone.token_ids, prompt
        assert h.text == alone.text
        assert h.seq.finish_reason == alone.finish_reason and h.seq.stop_reason == alone.stop_reason
        streamed = updates[id(h)]
        assert "".join(u.text for u in streamed) == alone.text  # stop-string hold-back keeps deltas final
        assert [t for u in streamed for t in u.token_ids] == alone.token_ids
        assert streamed[-1].finished and not any(u.finished for u in streamed[:-1])
        if p.logprobs is not None:
            got = [e for u in streamed for e in u.logprobs]
            assert got == alone.logprobs  # bit for bit, whatever shared the batch


def test_each_step_charges_its_transients_and_gives_them_back(tiny_mixtral):
    """The server counts a step's transients against the budget as generate does (beside the KV
    cache, runtime/transients.py's figure: the prefill's, then a decode step's), and every byte
    charged is given back once the request is done."""
    from klotski.runtime.transients import step_transient_bytes

    llm = LLM(str(tiny_mixtral), batch_size=1, num_batches=1)
    charges, returned = [], []
    charge, uncharge = llm.store.charge_kv, llm.store.uncharge_kv
    llm.store.charge_kv = lambda n: (charges.append(n), charge(n))[1]
    llm.store.uncharge_kv = lambda n: (returned.append(n), uncharge(n))[1]
    sched = Scheduler(llm, max_wait_ms=0)
    sched.start()
    ids = llm.tokenizer.encode("The library opened at nine")
    handles = sched.submit(
        [(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), None)], lambda h, u: None
    )
    _wait(handles)
    assert sched.shutdown(5)
    spec, dtype, p, cap = llm.runner.spec, llm.runner.dtype, len(ids), len(ids) + 3
    kv = llm.runner.kv_bytes_per_token() * cap * spec.num_layers
    decode = step_transient_bytes(spec, dtype, 1, 1, 1, cap)
    prefill = max(step_transient_bytes(spec, dtype, p, 1, p, cap, llm.runner.prefill_expert_dtype), decode)
    assert charges == [kv, prefill, decode, decode]  # the KV cache, then one charge per step
    assert sorted(returned) == sorted(charges)


def test_echo_scores_every_prompt_position(tiny_mixtral, reference):
    llm = LLM(str(tiny_mixtral), batch_size=4, num_batches=1)
    sched = Scheduler(llm, max_wait_ms=20)
    sched.start()
    prompts = ["Good plans are simple", "Numbers matter: 1, 2, 3, 10, 42"]
    ids = [llm.tokenizer.encode(t) for t in prompts]
    handles = sched.submit([(i, SamplingParams(temperature=0, max_tokens=2), 3) for i in ids])
    _wait(handles)
    sched.shutdown(5)
    for h, prompt, tokens in zip(handles, prompts, ids):
        logits = reference.prompt_logits([prompt])[0]
        expect = torch.log_softmax(logits.float(), dim=-1)
        entries = h.prompt_logprob_entries
        assert entries[0] is None and len(entries) == len(tokens)
        for j in range(1, len(tokens)):
            assert abs(entries[j][tokens[j]] - float(expect[j - 1, tokens[j]])) < 1e-4
            top = expect[j - 1].topk(3).indices.tolist()
            assert set(top) <= set(entries[j])
        assert (
            h.token_ids
            == reference.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids
        )


def test_cancel_frees_the_slot_and_a_full_queue_refuses(tiny_mixtral):
    llm = LLM(str(tiny_mixtral), batch_size=1, num_batches=1)  # one running sequence at a time
    sched = Scheduler(llm, max_queue=2, max_wait_ms=0)
    sched.start()
    try:
        ids = llm.tokenizer.encode("We measured the time")
        long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
        first = sched.submit([(ids, long, None)])
        deadline = time.monotonic() + 30
        while not first[0].seq.stopper.token_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = sched.submit([(ids, long, None)] * 2)  # the queue's two places
        with pytest.raises(QueueFull) as full:
            sched.submit([(ids, SamplingParams(max_tokens=1), None)])
        assert full.value.retry_after >= 1
        stats = sched.stats()
        assert stats["running"] == 1 and stats["waiting"] == 2
        sched.cancel(first)
        _wait(first, timeout=30)
        while not waiting[0].seq.stopper.token_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting[0].seq.stopper.token_ids, "the freed slot was not given to the waiting request"
        sched.cancel(waiting)
        _wait(waiting, timeout=30)
        while sched.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = sched.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["cancelled"] == 3
        assert not waiting[1].token_ids  # cancelled while queued: it never ran
        assert all(len(h.token_ids) < 3000 for h in first + waiting)
    finally:
        assert sched.shutdown(5)


def test_under_a_budget_the_planned_group_streams_weights_and_keeps_answers(tiny_mixtral, reference, tmp_path):
    llm = LLM(str(tiny_mixtral), device_memory="1MiB", offload_dir=str(tmp_path / "offload"))
    sched = Scheduler(llm, max_wait_ms=0, max_num_seqs=8)  # the planner picks bs x n for 8 sequences
    sched.start()
    try:
        prompts = [f"The library opened at nine {i}" for i in range(12)]
        params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=2 + i % 4) for i in range(12)]
        handles = []
        for i, (text, p) in enumerate(zip(prompts, params)):
            handles += sched.submit([(llm.tokenizer.encode(text), p, None)])
            if i % 4 == 3:
                time.sleep(0.02)
        _wait(handles)
        stats = sched.stats()
        assert stats["policy"]["batch_size"] * stats["policy"]["num_batches"] <= 8
        assert stats["store"]["bytes_read"].get("disk", 0) > 0
        assert stats["store"]["peak_bytes"]["device"] <= 1 << 20
        for h, text, p in zip(handles, prompts, params):
            assert h.token_ids == reference.generate([text], p)[0].outputs[0].token_ids
    finally:
        assert sched.shutdown(5)
