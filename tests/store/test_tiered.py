"""The tiered store and the pipeline over it: schedule-independent results, hard budgets, clean failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from klotski import LLM, SamplingParams
from klotski.errors import KlotskiError
from klotski.runtime.schedule import SCHEDULES

PROMPTS = [{"prompt_token_ids": [0, 5, 9, 100 + i, 7 * i + 3][: 2 + i % 4]} for i in range(7)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from klotski.commands.create_model import create_model

    return create_model(tmp_path_factory.mktemp("store-model"), "mixtral", "tiny", layers=3, dtype="bfloat16")


@pytest.fixture(scope="module")
def resident_tokens(model) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in LLM(str(model)).generate(PROMPTS, GREEDY)]


def _run(model, tmp_path, **kw):
    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), **kw)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        return tokens, llm.last_stats
    finally:
        llm.store.close()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("budget", ["420KB", "900KB"])
def test_tokens_identical_across_schedules_and_budgets(model, resident_tokens, tmp_path, schedule, budget):
    tokens, stats = _run(model, tmp_path, schedule=schedule, device_memory=budget, batch_size=2, num_batches=2)
    assert tokens == resident_tokens
    assert stats["peak_bytes"]["device"] <= stats["budgets"]["device"]
    assert stats["bytes_read"]["disk"] > 0  # the model does not fit: experts came from disk


@pytest.mark.parametrize("bs,n", [(1, 7), (3, 1), (4, 2), (7, 1)])
def test_tokens_identical_across_batch_shapes(model, resident_tokens, tmp_path, bs, n):
    tokens, _ = _run(model, tmp_path, device_memory="600KB", batch_size=bs, num_batches=n)
    assert tokens == resident_tokens


@pytest.mark.parametrize("rows", [1, 3])
def test_experts_computed_in_row_chunks_give_the_same_tokens(model, resident_tokens, tmp_path, monkeypatch, rows):
    """A large group's prefill runs each expert over its tokens in chunks (runtime/pipeline.EXPERT_ROWS)."""
    from klotski.runtime import pipeline

    monkeypatch.setattr(pipeline, "EXPERT_ROWS", rows)
    tokens, _ = _run(model, tmp_path, device_memory="600KB", batch_size=7, num_batches=1)
    assert tokens == resident_tokens


def test_kv_cache_moves_resident_experts_to_disk(model, tmp_path):
    """A long generation's KV cache does not fit beside the resident experts and the in-flight
    reserve: the store moves experts to disk instead of failing, and the tokens do not change."""
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(str(model)).generate(PROMPTS, long)]
    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), device_memory="900KB", batch_size=4, num_batches=2)
    try:
        before = sum(t == "device" for k, t in llm.store.placement.items() if k.part == "expert")
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, long)] == want
        stats = llm.last_stats
        after = sum(t == "device" for k, t in llm.store.placement.items() if k.part == "expert")
    finally:
        llm.store.close()
    assert stats["demoted_to_disk"] > 0 and after == before - stats["demoted_to_disk"]
    assert stats["peak_bytes"]["device"] <= stats["budgets"]["device"]


def test_every_schedule_gets_the_same_placement(model, tmp_path):
    """Ladder rungs differ in scheduling only: one budget gives one placement whatever the schedule."""
    placements = []
    for schedule in SCHEDULES:
        llm = LLM(
            str(model),
            offload_dir=str(tmp_path / "offload"),
            device_memory="900KB",
            schedule=schedule,
            batch_size=2,
            num_batches=2,
        )
        placements.append(dict(llm.store.placement))
        llm.store.close()
    assert all(p == placements[0] for p in placements)
    assert "device" in {t for k, t in placements[0].items() if k.part == "expert"}


def test_everything_on_device_reads_nothing(model, resident_tokens, tmp_path):
    tokens, stats = _run(model, tmp_path, device_memory="64MB")
    assert tokens == resident_tokens
    assert stats["bytes_read"]["disk"] == 0
    # Under a budget the heap hands freed activations back (store/heap.py) unless the user tuned malloc.
    assert stats["heap_returns_freed"] is not any(k.startswith("MALLOC_") for k in os.environ)


def test_timeline_records_transfers_and_bubbles(model, tmp_path):
    _, stats = _run(model, tmp_path, device_memory="500KB", schedule="klotski")
    assert stats["io_busy_s"] > 0 and stats["compute_busy_s"] > 0
    assert 0.0 <= stats["bubble_ratio"] < 1.0
    assert set(stats["io_busy_s_per_lane"]) <= {"prefetch", "ondemand"}


def test_budget_too_small_is_a_clear_error(model, tmp_path):
    with pytest.raises(KlotskiError, match="device-memory|device budget"):
        _run(model, tmp_path, device_memory="100KB")


def _corrupt(model, tmp_path, how: str):
    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), device_memory="500KB")
    blob = next(p for p in sorted(llm.store.offload.path.glob("L1.expert*.bin")))
    if how == "truncate":
        os.truncate(blob, 100)
    elif how == "flip":
        data = bytearray(blob.read_bytes())
        data[10] ^= 0xFF
        blob.write_bytes(data)
    else:
        for p in llm.store.offload.path.glob("*.bin"):
            p.unlink()
    return llm


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in-parts"])
@pytest.mark.parametrize("how,match", [("truncate", "truncated"), ("flip", "checksum"), ("vanish", "vanished")])
def test_failed_reads_stop_the_run(model, tmp_path, monkeypatch, how, match, split):
    """Whether a blob is read whole or in parts (one per reader thread), a bad one stops the run."""
    from klotski.store import tiered

    if split:
        monkeypatch.setattr(tiered, "SPLIT_MIN", 1)
    llm = _corrupt(model, tmp_path, how)
    try:
        with pytest.raises(KlotskiError, match=match):
            llm.generate(PROMPTS, GREEDY)
    finally:
        llm.store.close()


def test_offload_dir_is_reused_until_the_checkpoint_changes(model, tmp_path):
    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import OffloadDir

    ckpt = Checkpoint.open(model)
    first = OffloadDir.prepare(ckpt, tmp_path / "off")
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    OffloadDir.prepare(ckpt, tmp_path / "off")
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp
    assert len(first.blobs) == len(ckpt.spec.weight_keys())


def test_unwritable_offload_dir_is_a_clear_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KlotskiError, match="not writable"):
        LLM(str(model), offload_dir=str(blocker / "sub"), device_memory="500KB")


def test_a_deeper_prefetch_table_drives_the_first_layers(model, resident_tokens, tmp_path):
    """The real 32-layer Mixtral table can drive a checkpoint cut to its first layers; tokens are unchanged."""
    tokens, _ = _run(model, tmp_path, device_memory="500KB", prefetch_table="mixtral-8x7b")
    assert tokens == resident_tokens


def _in_thread(fn):
    """Run fn() in a thread; returns (thread, results, errors) for the test to drive and inspect."""
    import threading

    got, errors = [], []

    def run():
        try:
            got.append(fn())
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, got, errors


def _manual_store(model, tmp_path, room_of):
    """A TieredStore with every unit on disk, room for exactly one `room_of` unit, and hand-driven lanes."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import OffloadDir
    from klotski.store.pool import TierPool
    from klotski.store.tiered import TieredStore
    from klotski.timeline import Timeline

    ckpt = Checkpoint.open(model)
    offload = OffloadDir.prepare(ckpt, tmp_path / "off")
    lanes = {"prefetch": ManualLane(), "ondemand": ManualLane()}
    store = TieredStore(
        ckpt,
        offload,
        {k: "disk" for k in ckpt.spec.weight_keys()},
        TierPool("device", offload.blobs[room_of].padded),
        TierPool("host", 0),
        Timeline(enabled=False),
        lanes=lanes,
        warm=False,  # the test drives every read itself
    )
    return store, lanes, ckpt


class ManualLane:
    """A transfer lane that runs its jobs only when the test says so."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn):
        self.jobs.append(fn)

    def run_one(self):
        self.jobs.pop(0)()

    def close(self):
        pass


def test_a_fetch_released_in_flight_frees_its_room_when_it_lands(model, tmp_path):
    """A wait that needs the room of a fetch released mid-flight waits for it to land, not fails."""
    from klotski.models.spec import EXPERT, WeightKey

    a, b = WeightKey(0, EXPERT, 0), WeightKey(0, EXPERT, 1)
    store, lanes, ckpt = _manual_store(model, tmp_path, a)  # exactly one expert in flight at a time
    store.fetch(a, "prefetch")  # in flight, holding all the room
    store.release(a)  # nobody wants it now; its buffer comes back when the read lands
    handle = store.fetch(b, "ondemand")  # waits for room
    t, got, errors = _in_thread(handle.wait)
    t.join(timeout=0.5)
    assert t.is_alive() and not errors  # waiting, not failed
    lanes["prefetch"].run_one()  # a lands: its room goes to b
    lanes["ondemand"].run_one()
    t.join(timeout=5)
    assert not errors and got and set(got[0]) == set(ckpt.load_unit(b))


def test_waiting_for_any_evicts_idle_prefetches_to_make_progress(model, tmp_path):
    """The klotski rung waits for whichever expert lands first; when only an unclaimed prefetch holds
    the room, that wait evicts it and starts the expert instead of sleeping forever."""
    from klotski.models.spec import EXPERT, WeightKey

    guess, needed = WeightKey(1, EXPERT, 0), WeightKey(0, EXPERT, 1)
    store, lanes, ckpt = _manual_store(model, tmp_path, guess)
    store.fetch(guess, "prefetch")
    lanes["prefetch"].run_one()  # the guess lands and nobody claims it
    handle = store.fetch(needed, "ondemand")  # no room: waits
    t, got, errors = _in_thread(lambda: store.wait_any([handle]))
    for _ in range(50):
        if lanes["ondemand"].jobs:
            break
        t.join(timeout=0.05)
    lanes["ondemand"].run_one()  # started by the wait, after evicting the guess
    t.join(timeout=5)
    assert not errors and got == [handle] and store.evictions == 1
    assert set(handle.wait()) == set(ckpt.load_unit(needed))


def test_reader_pool_runs_two_reads_at_once_and_on_demand_first():
    """Two reader threads serve both lanes: two jobs of one lane run concurrently, and a waiting
    on-demand job starts before waiting prefetches, whatever the submit order."""
    import threading

    from klotski.store.tiered import Lane, ReaderPool

    pool = ReaderPool(2)
    prefetch, ondemand = Lane("prefetch", pool, 1), Lane("ondemand", pool, 0)
    both_running, gate = threading.Barrier(3, timeout=5), threading.Event()
    order: list[str] = []

    def blocker():
        both_running.wait()  # with the test's thread: fails unless two jobs run at the same time
        gate.wait(5)

    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        return run

    prefetch.submit(guarded(blocker))
    prefetch.submit(guarded(blocker))
    both_running.wait()  # both threads are busy: what follows waits in the queue
    done = threading.Event()
    for name in ("p1", "p2"):
        prefetch.submit(lambda name=name: order.append(name))
    ondemand.submit(lambda: order.append("d1"))
    prefetch.submit(lambda: (order.append("p3"), done.set()))
    gate.set()
    assert done.wait(5)
    pool.close()
    assert not errors
    assert order[0] == "d1" and sorted(order[1:]) == ["p1", "p2", "p3"]


def test_dense_room_holds_experts_when_dense_units_are_resident(model):
    """When attention, gates and head all sit on the device nothing dense is ever fetched, so
    their in-flight room holds resident experts instead; when they do not fit, the room is kept
    for them. The embedding table is placed last (only its rows are ever read)."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.models.spec import EXPERT
    from klotski.store.placement import dense_resident, greedy_placement, inflight_parts, working_set
    from klotski.store.tiers import DEVICE

    ckpt = Checkpoint.open(model)
    spec = ckpt.spec
    unit_bytes = {k: ckpt.unit_nbytes(k) for k in spec.weight_keys()}
    dense, experts = inflight_parts(spec, unit_bytes, spec.top_k)
    expert = max(b for k, b in unit_bytes.items() if k.part == EXPERT)
    all_dense = sum(b for k, b in unit_bytes.items() if k.part not in (EXPERT, "embed"))
    budget = all_dense + experts + 2 * expert + dense // 2  # the dense room would cost an expert
    placement = greedy_placement(spec, unit_bytes, budget, 0, experts, dense)
    assert dense_resident(spec, placement)
    on_device = sum(t == DEVICE for k, t in placement.items() if k.part == EXPERT)
    old_style = greedy_placement(spec, unit_bytes, budget, 0, experts + dense)
    assert on_device == 2 and on_device > sum(t == DEVICE for k, t in old_style.items() if k.part == EXPERT)
    assert working_set(spec, unit_bytes, spec.top_k, placement) == experts
    assert list(placement)[-1].part == "embed"  # placed after every expert

    tight = greedy_placement(spec, unit_bytes, all_dense // 2 + experts + dense, 0, experts, dense)
    assert not dense_resident(spec, tight)
    assert working_set(spec, unit_bytes, spec.top_k, tight) == experts + dense
    assert sum(unit_bytes[k] for k, t in tight.items() if t == DEVICE) <= all_dense // 2


def test_in_flight_room_is_two_large_experts_or_enough_small_ones():
    """Mixtral-8x7B's 336 MiB experts: two buffers (one computing, one arriving); OLMoE-sized
    experts: enough for 256 MiB of reads, never more than max(K, top_k) + 2."""
    from klotski.planner.shapes import shape_from_preset
    from klotski.store.placement import inflight_experts

    shape = shape_from_preset("mixtral-8x7b", layers=1)
    mixtral = shape.spec
    expert = max(b for k, b in shape.unit_bytes.items() if k.part == "expert")
    assert expert == 3 * 4096 * 14336 * 2
    assert inflight_experts(mixtral, mixtral.top_k, expert) == 2
    assert inflight_experts(mixtral, 6, 352_321_536) == 2
    assert inflight_experts(mixtral, mixtral.top_k, 12 * 2**20) == mixtral.top_k + 2
    assert inflight_experts(mixtral, 6, 40 * 2**20) == 7  # ceil(256 / 40), under the cap of 8


@pytest.mark.parametrize("schedule", ["hot", "klotski", "overlap"])
def test_two_experts_in_flight_keep_tokens_and_budget(model, resident_tokens, tmp_path, monkeypatch, schedule):
    """With room for only two experts in flight (what large experts get), every schedule still
    produces the resident tokens inside the budget, and more experts stay resident."""
    from klotski.store import placement

    _, before = _run(model, tmp_path, schedule=schedule, device_memory="700KB", batch_size=2, num_batches=2)
    monkeypatch.setattr(placement, "MIN_INFLIGHT_BYTES", 1)
    tokens, stats = _run(model, tmp_path, schedule=schedule, device_memory="700KB", batch_size=2, num_batches=2)
    assert tokens == resident_tokens
    assert stats["peak_bytes"]["device"] <= stats["budgets"]["device"]
    resident = lambda s: s["placement"]["expert"].get("device", {}).get("units", 0)  # noqa: E731
    assert resident(stats) > resident(before)
    assert 0 < stats["bytes_read"]["disk"] < before["bytes_read"]["disk"]


def test_which_units_leave_the_device_does_not_depend_on_read_timing(model, resident_tokens, tmp_path, monkeypatch):
    """A group's KV charge moves resident units to disk by the budget alone: with every read slowed
    (warm-up reads still in flight when the first group is charged) the same units move as with
    fast reads, and the tokens do not change."""
    import time

    from klotski.store.offload import OffloadDir

    def run(tag):
        tokens, stats = _run(model, tmp_path / tag, device_memory="700KB", batch_size=2, num_batches=2)
        assert tokens == resident_tokens
        assert stats["peak_bytes"]["device"] <= stats["budgets"]["device"]
        return stats["demoted_to_disk"], stats["placement"]

    fast = run("fast")
    for name in ("read_into", "read_part"):
        slow = getattr(OffloadDir, name)
        monkeypatch.setattr(OffloadDir, name, lambda *a, _slow=slow: (time.sleep(0.02), _slow(*a))[1])
    assert run("slow") == fast
    assert fast[0] > 0  # the budget did move units: the case under test


def test_a_kv_charge_evicts_landed_prefetches_before_it_moves_a_resident_unit(model, tmp_path):
    """Prefetches that landed and nobody claimed yet hold room beyond the reserve (the cache off
    lets them): a KV charge that fits beside the resident units and the reserve evicts them, to be
    read again when wanted, and moves no resident unit to disk (whether a read had landed when the
    charge came would otherwise decide the placement for the rest of the run)."""
    import time

    from klotski.checkpoint.reader import Checkpoint
    from klotski.models.spec import EXPERT, WeightKey
    from klotski.store.offload import OffloadDir
    from klotski.store.pool import TierPool
    from klotski.store.tiered import TieredStore
    from klotski.timeline import Timeline

    ckpt = Checkpoint.open(model)
    offload = OffloadDir.prepare(ckpt, tmp_path / "off")
    kept = WeightKey(1, EXPERT, 0)
    placement = {k: "disk" for k in ckpt.spec.weight_keys()} | {kept: "device"}
    experts = [WeightKey(0, EXPERT, i) for i in range(3)]
    blob = offload.blobs[experts[0]].padded
    budget = ckpt.unit_nbytes(kept) + 3 * blob
    pools = TierPool("device", budget), TierPool("host", 0)
    store = TieredStore(ckpt, offload, placement, *pools, Timeline(False), warm=False)
    store.set_cache(False)
    try:
        handles = [store.fetch(k) for k in experts]
        for _ in range(500):
            if all(h.done() for h in handles):
                break
            time.sleep(0.01)
        assert all(h.done() for h in handles)
        store.charge_kv(blob)
        assert store.resident(kept) and store.stats()["demoted_to_disk"] == 0
        assert store.evictions == 1 and not handles[2].done()  # the one the model runs last went
        for key, handle in zip(experts, handles):
            got = handle.wait()
            want = ckpt.load_unit(key)
            assert all(torch.equal(got[k], want[k]) for k in want)
            store.release(key)
        assert store.stats()["peak_bytes"]["device"] <= budget
    finally:
        store.close()


@pytest.mark.parametrize("settle", [True, False])
def test_room_a_demotion_leaves_takes_the_disk_units_that_fit(model, tmp_path, settle):
    """A group's charge pushes the last-placed expert to disk, which frees more than the charge
    needed: a smaller disk unit that now fits beside it (placed earlier) moves onto the device, as a
    placement made for this workload would have put it. Only for a charge held for a run of steps
    (settle), never for one that comes and goes each step."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.models.spec import EXPERT, MOE, WeightKey
    from klotski.store.offload import OffloadDir
    from klotski.store.placement import placement_order
    from klotski.store.pool import TierPool
    from klotski.store.tiered import TieredStore
    from klotski.timeline import Timeline

    ckpt = Checkpoint.open(model)
    offload = OffloadDir.prepare(ckpt, tmp_path / "off")
    order = placement_order(ckpt.spec)
    last = [k for k in order if k.part == EXPERT][-1]
    router = WeightKey(0, MOE)
    placement = {k: "disk" for k in order} | {k: "device" for k in order if k.part not in (EXPERT, "embed")}
    placement |= {router: "disk", last: "device"}
    expert = ckpt.unit_nbytes(last)
    assert ckpt.unit_nbytes(router) < expert // 2
    fixed = sum(ckpt.unit_nbytes(k) for k, t in placement.items() if t == "device")
    pools = TierPool("device", fixed + expert // 2), TierPool("host", 0)
    store = TieredStore(ckpt, offload, placement, *pools, Timeline(False), warm=False)
    try:
        store.charge_kv(expert, settle=settle)
        assert store.demoted == [last]
        if settle:
            assert store.promoted == [router] and store.resident(router) and store.placement[router] == "device"
            got, want = store.fetch(router).wait(), ckpt.load_unit(router)
            assert all(torch.equal(got[k], want[k]) for k in want)
        else:
            assert store.promoted == [] and not store.resident(router)
        assert store.device_pool.used <= store.device_pool.budget
    finally:
        store.close()


@pytest.mark.parametrize("how", ["row by row", "one scan"])
def test_embedding_rows_are_read_where_the_table_sits(model, resident_tokens, tmp_path, monkeypatch, how):
    """A tight budget leaves the embedding table on disk (placed after the experts): each step reads
    only its tokens' rows (concurrent preads, or one scan when that is cheaper), the tokens do not
    change, and the rows are the checkpoint's."""
    import torch

    from klotski.checkpoint.reader import Checkpoint
    from klotski.models.spec import WeightKey
    from klotski.store import offload

    monkeypatch.setattr(offload, "ROW_READ_COST", 1 if how == "row by row" else 2**30)

    embed = WeightKey(None, "embed")
    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), device_memory="420KB", batch_size=2, num_batches=2)
    try:
        assert llm.store.placement[embed] == "disk"
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        ids = torch.tensor([[5, 0, 5], [511, 9, 100]])
        got = llm.store.gather(embed, "weight", ids)
    finally:
        llm.store.close()
    assert tokens == resident_tokens
    table = Checkpoint.open(model).load_unit(embed)["weight"]
    assert torch.equal(got, table[ids])
    with pytest.raises(KlotskiError, match="out of range"):
        llm.store.offload.read_rows(embed, "weight", [table.shape[0]])


def test_a_corrupt_embedding_table_is_caught_though_read_by_rows(model, tmp_path):
    from klotski.models.spec import WeightKey

    llm = LLM(str(model), offload_dir=str(tmp_path / "offload"), device_memory="420KB")
    blob = llm.store.offload.path / "embed.bin"
    data = bytearray(blob.read_bytes())
    data[llm.store.offload.blobs[WeightKey(None, "embed")].nbytes - 10] ^= 0xFF  # a row no prompt looks up
    blob.write_bytes(data)
    try:
        with pytest.raises(KlotskiError, match="checksum"):
            llm.generate(PROMPTS, GREEDY)
    finally:
        llm.store.close()


@pytest.mark.parametrize("schedule", ["sequential", "klotski"])
def test_blobs_read_in_parts_give_the_same_tokens(model, resident_tokens, tmp_path, monkeypatch, schedule):
    """Large blobs are read in one part per reader thread; the parts land in one buffer, are
    checked as a whole, and the tokens do not change."""
    from klotski.store import tiered

    monkeypatch.setattr(tiered, "SPLIT_MIN", 1)  # every blob of two pages or more is split
    parts = []
    read_part = tiered.TieredStore._read_part
    monkeypatch.setattr(
        tiered.TieredStore,
        "_read_part",
        lambda self, entry, lo, hi: (parts.append(hi - lo), read_part(self, entry, lo, hi)),
    )
    tokens, stats = _run(model, tmp_path, schedule=schedule, device_memory="500KB", batch_size=2, num_batches=2)
    assert tokens == resident_tokens
    assert parts and 0 < sum(parts) <= stats["bytes_read"]["disk"]  # blobs came in parts (and rows too)


def _store_with_room(model, tmp_path, room: int, warm: bool = False):
    """A TieredStore with every unit on disk, `room` device bytes and the real reader threads."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.store.offload import OffloadDir
    from klotski.store.pool import TierPool
    from klotski.store.tiered import TieredStore
    from klotski.timeline import Timeline

    ckpt = Checkpoint.open(model)
    offload = OffloadDir.prepare(ckpt, tmp_path / "off")
    placement = {k: "disk" for k in ckpt.spec.weight_keys()}
    pools = TierPool("device", room), TierPool("host", 0)
    return TieredStore(ckpt, offload, placement, *pools, Timeline(False), warm=warm), ckpt


def _use(store, key):
    weights = store.fetch(key, "ondemand").wait()
    store.release(key)
    return weights


def test_a_released_unit_is_served_from_its_cached_copy(model, tmp_path):
    """Room nobody reads into keeps what the pipeline released: asked again, it is ready at once,
    with the same tensors and no bytes read."""
    from klotski.models.spec import EXPERT, WeightKey

    a = WeightKey(0, EXPERT, 0)
    store, ckpt = _store_with_room(model, tmp_path, 4 * 2**20)
    try:
        first = {k: v.clone() for k, v in _use(store, a).items()}
        read = store.bytes_read["disk"]
        handle = store.fetch(a, "ondemand")
        assert handle.done()  # no read queued: the cached copy
        again = handle.wait()
        store.release(a)
        assert store.bytes_read["disk"] == read and store.stats()["cache_hits"] == 1
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert store.stats()["peak_bytes"]["device"] <= 4 * 2**20
    finally:
        store.close()


def test_cached_copies_give_way_to_fetches_and_the_most_reused_stays(model, tmp_path):
    """With room for two experts, a step pattern that uses expert 0 every time and 1 or 2 in turn:
    each new read drops the copy needed last (the rarely used one), so expert 0 is read once and
    hit ever after, and the budget holds throughout."""
    from klotski.checkpoint.reader import Checkpoint
    from klotski.models.spec import EXPERT, WeightKey
    from klotski.store.offload import OffloadDir

    e = [WeightKey(0, EXPERT, i) for i in range(3)]
    blob = OffloadDir.prepare(Checkpoint.open(model), tmp_path / "off").blobs[e[0]].padded
    store, _ = _store_with_room(model, tmp_path, 2 * blob)
    try:
        steps = 8
        for step in range(steps):
            _use(store, e[0])
            _use(store, e[1 + step % 2])
        stats = store.stats()
        assert stats["cache_hits"] == steps - 1  # every expert-0 use after the first
        assert stats["peak_bytes"]["device"] <= 2 * blob
        assert stats["bytes_read"]["disk"] == (steps + 1) * blob
    finally:
        store.close()


def test_the_unit_cache_changes_bytes_read_not_tokens(model, resident_tokens, tmp_path):
    """Generation with released units cached and without: the same tokens; never more bytes read."""
    runs = {}
    for cache in (False, True):
        llm = LLM(str(model), offload_dir=str(tmp_path / f"offload-{cache}"), device_memory="600KB", batch_size=1)
        llm.store.set_cache(cache)  # off: the warm-up's copies (if they landed already) go too
        try:
            tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
            runs[cache] = tokens, llm.last_stats
        finally:
            llm.store.close()
    assert runs[True][0] == runs[False][0] == resident_tokens
    assert runs[True][1]["bytes_read"]["disk"] <= runs[False][1]["bytes_read"]["disk"]
    assert runs[True][1]["cache_hits"] > 0 and runs[False][1]["cache_hits"] == 0


def test_warm_up_reads_land_as_copies_the_first_step_finds(model, tmp_path):
    """While resident units load, the first disk units in execution order are read into free room
    (never the embedding table, read by rows); they land as cached copies and serve the first fetch."""
    import time

    from klotski.models.spec import ATTN, EMBED, WeightKey

    store, _ = _store_with_room(model, tmp_path, 4 * 2**20, warm=True)
    try:
        first = WeightKey(0, ATTN)
        for _ in range(200):
            if first in store._cached:
                break
            time.sleep(0.01)
        assert first in store._cached and WeightKey(None, EMBED) not in store._cached
        read = store.bytes_read["disk"]
        _use(store, first)
        assert store.stats()["cache_hits"] == 1 and store.bytes_read["disk"] == read
        assert store.stats()["peak_bytes"]["device"] <= 4 * 2**20
    finally:
        store.close()
