"""One schedule, two backends: the real Pipeline and run_group played on a virtual clock.

SimRunner stands in for ModelRunner: its ops return tiny tensors (hidden size 1) and advance the
virtual clock by the cost model's time; its gate samples routing from a correlation table as a
Markov chain per token. SimStore stands in for the TieredStore: a fetch's arrival is computed
from per-link virtual queues and bandwidths, under the same device budget (a fetch waits for
room as the real store's does); done() means arrived by the virtual now, and waiting advances
the clock to the arrival. The Timeline reads the virtual clock, so the prediction comes with the
same summary and Chrome trace a real run has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from klotski.config import Policy
from klotski.models.spec import WeightKey
from klotski.planner.cost import OpCosts
from klotski.planner.shapes import ModelShape
from klotski.prefetch.runtime import make_predictor, moe_index
from klotski.prefetch.table import CorrelationTable
from klotski.runtime.generate import GroupBatch, Sequence, run_group
from klotski.runtime.model import GateOutput
from klotski.runtime.pipeline import Pipeline
from klotski.runtime.schedule import get_schedule
from klotski.sampling import Sampler, SamplingParams
from klotski.store.base import Handle
from klotski.store.offload import ROW_WINDOW, check_chunk
from klotski.store.tiers import DEVICE, DISK, HOST
from klotski.timeline import Timeline
from klotski.tokenizer import StopChecker

# B = sequences in a batch, S = new tokens per sequence, T = valid tokens, K = top_k


class VirtualClock:
    """Seconds of simulated time; a Timeline reads it like time.perf_counter."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def advance_to(self, t: float) -> None:
        self.t = max(self.t, t)


# -- routing ---------------------------------------------------------------------------------------
class MarkovRouting:
    """Each token's experts per MoE layer: layer 0 from frequencies, later layers from its previous ones."""

    def __init__(self, table: CorrelationTable | None, num_layers: int, num_experts: int, top_k: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.k = top_k
        if table is None:
            self.first, self.trans = np.ones(num_experts), [np.ones((num_experts, num_experts))] * num_layers
        else:
            self.first = table.frequency(0)
            self.trans = [table.transition(min(i, table.num_layers - 1)) for i in range(num_layers)]

    def sample(self, layer: int, prev: np.ndarray | None, tokens: int) -> np.ndarray:
        """ids [T, K] for `tokens` tokens at MoE layer `layer` given their previous experts [T, K]."""
        if prev is None or layer == 0:
            weights = np.broadcast_to(self.first, (tokens, len(self.first)))
        else:
            weights = self.trans[layer][prev].sum(axis=1)  # [T, E]
        # Gumbel-top-k: k distinct experts per token, as sampling without replacement (float32: fast).
        probs = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
        u = self.rng.random(probs.shape, dtype=np.float32)
        keys = np.log(probs + 1e-30, dtype=np.float32) - np.log(-np.log(u + 1e-30))
        return np.argsort(-keys, axis=1, kind="stable")[:, : self.k]


def fit_table(table: CorrelationTable | None, num_layers: int, num_experts: int) -> CorrelationTable | None:
    """A table shaped for the model: its first layers (a model cut to fewer layers), else None."""
    if table is None or table.num_experts != num_experts or table.num_layers < num_layers:
        return None
    return CorrelationTable(
        [c.copy() for c in table.counts[:num_layers]], table.top_k, table.path_length, table.model, table.calibrated_on
    )


# -- the simulated backend ----------------------------------------------------------------------
@dataclass(slots=True)
class SimKV:
    """A KV block that only knows its size."""

    nbytes: int


class SimRunner:
    """ModelRunner's interface; ops return hidden-size-1 tensors and advance the virtual clock."""

    def __init__(
        self,
        shape: ModelShape,
        costs: OpCosts,
        clock: VirtualClock,
        routing: MarkovRouting,
        timeline: Timeline,
        kv_tier: str = DEVICE,
        io_busy=lambda t: False,
    ):
        self.spec, self.dtype, self.device = shape.spec, torch.float32, torch.device("cpu")
        self.prefill_expert_dtype = None  # the simulated ops cost the same in any dtype
        self.io_busy = io_busy  # fn(virtual time) -> a read is running then (it slows compute on a CPU)
        self.costs, self.clock, self.routing, self.timeline = costs, clock, routing, timeline
        self.kv_tier = kv_tier
        self.moe = moe_index(shape.spec)
        self._prev: dict[tuple[int, int], np.ndarray] = {}
        self._layer, self._call = None, 0

    def _advance(self, seconds: float) -> None:
        """An op of `seconds` alone; slower when a read runs beside it (the profile's contention)."""
        busy = self.io_busy(self.clock.t)
        self.clock.advance(seconds * (self.costs.compute_slowdown_under_io if busy else 1.0))

    def new_kv(self, batch_size: int, capacity: int) -> SimKV:
        return SimKV(batch_size * capacity * self.costs.kv_token_layer)

    def kv_bytes_per_token(self) -> int:
        return self.costs.kv_token_layer

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        self._layer = None  # a new step: routing chains restart at the first MoE layer
        return torch.zeros(*rows.shape[:2], 1)  # [B, S, 1]

    def attention(self, w, x: torch.Tensor, kv: SimKV, step) -> torch.Tensor:
        b, s = x.shape[:2]
        t = self.costs.attention(b, s, step.max_total)
        if self.kv_tier == HOST:  # the paper's KV offload: this batch's cache loaded, new KV stored
            kv_io = (
                b * (step.max_total + s) * self.costs.kv_token_layer / (self.costs.profile.host_to_device_gbps * 1e9)
            )
            self.timeline.add("kv_load", "kv", self.clock.t, self.clock.t + kv_io, bytes=int(kv_io * 1e9))
            t = max(t, kv_io)
        self._advance(t)
        return x

    def dense_mlp(self, w, x: torch.Tensor) -> torch.Tensor:
        self._advance(self.costs.dense_mlp(x.shape[0] * x.shape[1]))
        return x

    def gate(self, w, x: torch.Tensor, valid: torch.Tensor) -> GateOutput:
        tokens, layer = int(valid.sum()), self.moe[w["layer"]]
        if layer != self._layer:
            self._layer, self._call = layer, 0
        prev = self._prev.get((layer - 1, self._call)) if layer > 0 else None
        ids = self.routing.sample(layer, prev, tokens)
        self._prev[(layer, self._call)] = ids
        self._call += 1
        self._advance(self.costs.gate(tokens))
        k = ids.shape[1]
        zeros = torch.zeros(tokens, 1)
        # int32 ids: torch.unique on int64 was much slower (docs/planner.md), and the pipeline only compares them.
        return GateOutput(zeros, torch.from_numpy(ids.astype(np.int32)), torch.full((tokens, k), 1.0 / k), zeros)

    def expert(self, w, h: torch.Tensor) -> torch.Tensor:
        self._advance(self.costs.expert(h.shape[0]))
        return torch.zeros(h.shape[0], 1)

    def head(self, w, x: torch.Tensor) -> torch.Tensor:
        self._advance(self.costs.head(x.shape[0]))
        return torch.zeros(x.shape[0], 2)  # [N, V=2]: greedy sampling picks token 0


class SimHandle(Handle):
    """A fetch on the virtual clock: done once the clock has passed its arrival."""

    __slots__ = ("_store", "issued")

    def __init__(self, key: WeightKey, store: SimStore):
        super().__init__(key)
        self._store, self.issued = store, False
        self.set({"layer": key.layer}, math.inf)  # arrival set once the fetch is issued

    def done(self) -> bool:
        return self.arrived <= self._store.clock.t

    def wait(self) -> dict:
        if not self.issued:
            self._store.claim(self)
        self._store.clock.advance_to(self.arrived)
        return self._weights


class SimStore:
    """The TieredStore's behaviour on a virtual clock: resident units, link queues, the device budget."""

    offload = None  # nothing is read from disk for real

    def __init__(
        self,
        shape: ModelShape,
        placement: dict[WeightKey, str],
        costs: OpCosts,
        clock: VirtualClock,
        timeline: Timeline,
        device_budget: int | None = None,
        kv_tier: str = DEVICE,
    ):
        self.shape, self.placement, self.costs, self.clock = shape, placement, costs, clock
        self.timeline = timeline
        self.budget, self.kv_tier = device_budget, kv_tier
        self.used = sum(shape.unit_bytes[k] for k, t in placement.items() if t == DEVICE)
        self.peak = self.used
        self.free_at = {"disk": 0.0, "link": 0.0}  # when each physical link is next idle
        self._handles: dict[WeightKey, SimHandle] = {}
        self._deferred: list[tuple[SimHandle, str]] = []  # waiting for device room, in issue order
        self.bytes_read = {DISK: 0, HOST: 0}
        self.over_budget = 0  # fetches forced past the budget (the real store would evict)

    def _resident(self, key: WeightKey) -> bool:
        tier = self.placement.get(key, DEVICE)
        return tier == DEVICE or (tier == HOST and self.costs.profile.host_to_device_gbps is None)

    def resident(self, key: WeightKey) -> bool:
        return self._resident(key)

    def fetch(self, key: WeightKey, lane: str = "prefetch") -> Handle:
        """Start a fetch (idempotent); it waits for device room in issue order, as the real store's."""
        if self._resident(key):
            return Handle.ready(key, {"layer": key.layer})
        if key not in self._handles:
            handle = SimHandle(key, self)
            self._handles[key] = handle
            self._deferred.append((handle, lane))
            self._issue()
        return self._handles[key]

    def _fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget

    def _issue(self, force: bool = False) -> None:
        """Start waiting fetches in FIFO order while the budget allows (force: the head one regardless)."""
        while self._deferred:
            handle, lane = self._deferred[0]
            nbytes = self.shape.padded(handle.key)
            if not self._fits(nbytes) and not force:
                return
            self.over_budget += not self._fits(nbytes)
            force = False
            self._deferred.pop(0)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self._transfer(handle, lane, nbytes)

    def _transfer(self, handle: SimHandle, lane: str, nbytes: int) -> None:
        """Queue the copy on the disk and/or host->device link; record it on the fetch's lane."""
        p, tier, start = self.costs.profile, self.placement[handle.key], self.clock.t
        key = handle.key
        end = start
        if tier == DISK:
            begin = max(self.free_at["disk"], start)
            end = begin + p.io_latency_s + nbytes / (self.costs.disk_gbps * 1e9)
            self.free_at["disk"] = end
            self.bytes_read[DISK] += nbytes
            self.timeline.add(
                lane if p.host_to_device_gbps is None else "disk",
                "read",
                begin,
                end,
                layer=key.layer,
                expert=key.expert,
                bytes=nbytes,
            )
        if p.host_to_device_gbps is not None:
            begin = max(self.free_at["link"], end)
            end = begin + p.io_latency_s + nbytes / (p.host_to_device_gbps * 1e9)
            self.free_at["link"] = end
            self.bytes_read[HOST] += nbytes if tier == HOST else 0
            self.timeline.add(lane, "copy", begin, end, layer=key.layer, expert=key.expert, bytes=nbytes)
        handle.arrived, handle.issued = end, True

    def io_busy(self, t: float) -> bool:
        """A disk read is running at virtual time t."""
        return self.free_at["disk"] > t

    def wait_any(self, handles: list[Handle]) -> Handle:
        """The earliest arrival among the handles; the clock moves to it (the pipeline's seam)."""
        if all(isinstance(h, SimHandle) and not h.issued for h in handles):
            self._issue(force=True)  # nothing can free room: the real store would evict a prefetch
        handle = min(handles, key=lambda h: h.arrived)
        if math.isinf(handle.arrived):
            self._issue(force=True)
        self.clock.advance_to(handle.arrived)
        return handle

    def claim(self, handle: SimHandle) -> None:
        """A wait on a fetch still waiting for room: issue it now (over budget if it must)."""
        while not handle.issued:
            self._issue(force=True)

    def release(self, key: WeightKey) -> None:
        handle = self._handles.pop(key, None)
        if handle is None:
            return
        if handle.issued:
            self.used -= self.shape.padded(key)
        else:
            self._deferred = [(h, l) for h, l in self._deferred if h is not handle]
        self._issue()

    def gather(self, key: WeightKey, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows: free when resident, else a read of the rows' checksum chunks, waited for.

        The simulated prompts are all token 0, so the ids say nothing: a batch's tokens are taken as
        spread over the vocabulary (an upper estimate for natural text, which repeats tokens), and
        from disk each row costs the checksum chunk it lies in (store/offload.py reads and checks
        whole chunks: 64 KiB for Mixtral's table, eight 8 KiB rows)."""
        if not self._resident(key):
            p, tier, table = self.costs.profile, self.placement[key], self.shape.unit_bytes[key]
            vocab = self.shape.spec.vocab_size
            rows = _distinct(ids.numel(), vocab)
            nbytes = moved = round(rows * table / vocab)  # the store counts the rows' bytes as read
            reads = 1
            if tier == DISK:
                chunk = max(check_chunk(key, table), table // vocab)
                touched = _distinct(rows, -(-table // chunk))
                moved, reads = min(table, round(touched * chunk)), math.ceil(touched / ROW_WINDOW)
            # The compute thread reads the rows itself, beside the lanes' queued reads (not behind them).
            begin, rate = self.clock.t, self.costs.disk_gbps if tier == DISK else p.host_to_device_gbps
            end = begin + reads * p.io_latency_s + moved / (rate * 1e9)
            self.bytes_read[tier] += nbytes
            self.timeline.add("ondemand", "read", begin, end, layer=key.layer, bytes=moved)
            self.clock.advance_to(end)
        return torch.zeros(*ids.shape, 1)

    def charge_kv(self, nbytes: int, settle: bool = False) -> None:
        """KV on the device counts against the budget, as in the real store; host KV does not (the
        plan's placement already fits its group, so nothing moves)."""
        if self.kv_tier != DEVICE:
            return
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def uncharge_kv(self, nbytes: int) -> None:
        if self.kv_tier == DEVICE:
            self.used -= nbytes

    def stats(self) -> dict:
        return {"bytes_read": dict(self.bytes_read), "peak_bytes": {DEVICE: self.peak}}

    def close(self) -> None:
        self._handles.clear()


# -- running a plan ----------------------------------------------------------------------------
@dataclass
class SimResult:
    """A predicted run: time, throughput, bubbles, and the timeline it came from."""

    wall_s: float  # all groups
    prefill_s: float
    generated_tokens: int
    tokens_per_s: float
    summary: dict  # Timeline.summary of the simulated group(s)
    peak_device: int
    timeline: Timeline
    over_budget_fetches: int

    def to_dict(self) -> dict:
        return {
            "predicted_wall_s": self.wall_s,
            "predicted_prefill_s": self.prefill_s,
            "predicted_tokens_per_s": self.tokens_per_s,
            "predicted_bubble_ratio": self.summary["bubble_ratio"],
            "predicted_bubble_s": self.summary["bubble_s"],
            "predicted_compute_busy_s": self.summary["compute_busy_s"],
            "predicted_io_busy_s_per_lane": self.summary["io_busy_s_per_lane"],
            "predicted_peak_device": self.peak_device,
        }


def _distinct(draws: float, size: int) -> float:
    """Expected distinct values among `draws` uniform draws from `size`."""
    return size * (1 - (1 - 1 / size) ** draws) if size > 0 else 0.0


def simulate(
    shape: ModelShape,
    costs: OpCosts,
    policy: Policy,
    placement: dict[WeightKey, str],
    prompt_len: int,
    gen_len: int,
    num_prompts: int,
    table: CorrelationTable | None = None,
    device_budget: int | None = None,
    kv_tier: str = DEVICE,
    seed: int = 0,
    adaptive_hot: bool = True,
) -> SimResult:
    """Play the real Pipeline and run_group on the virtual clock for this plan (adaptive_hot: K was not
    fixed by the user, so the pipeline also prefetches every expert the group almost surely uses)."""
    group = policy.batch_size * policy.num_batches
    full, rest = divmod(num_prompts, group)
    runs = [(g, count) for g, count in ((group, full), (rest, 1)) if g and count]
    wall, prefill, peak, over, first = 0.0, 0.0, 0, 0, None
    for size, count in runs:
        one = _simulate_group(
            shape,
            costs,
            policy,
            placement,
            prompt_len,
            gen_len,
            size,
            table,
            device_budget,
            kv_tier,
            seed,
            adaptive_hot,
        )
        first = first or one
        wall += count * one[0]
        prefill += count * one[1]
        peak, over = max(peak, one[2]), over + one[4]
    timeline = first[3]
    generated = num_prompts * gen_len
    return SimResult(
        wall,
        prefill,
        generated,
        generated / wall if wall > 0 else 0.0,
        timeline.summary(first[0]),
        peak,
        timeline,
        over,
    )


def _simulate_group(
    shape, costs, policy, placement, prompt_len, gen_len, size, table, device_budget, kv_tier, seed, adaptive_hot
):
    clock = VirtualClock()
    timeline = Timeline(clock=clock)
    spec = shape.spec
    moe_layers = len(moe_index(spec))
    table = fit_table(table, moe_layers, spec.num_experts)
    routing = MarkovRouting(table, moe_layers, spec.num_experts, spec.top_k, seed)
    store = SimStore(shape, placement, costs, clock, timeline, device_budget, kv_tier)
    runner = SimRunner(shape, costs, clock, routing, timeline, kv_tier, io_busy=store.io_busy)
    schedule = get_schedule(policy.schedule)
    pipeline = Pipeline(
        runner, store, schedule, timeline, policy.num_hot, make_predictor(spec, table), adaptive_hot=adaptive_hot
    )
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    seqs = [
        Sequence(i, [0] * prompt_len, params, torch.Generator(), StopChecker(params, frozenset(), None))
        for i in range(size)
    ]
    bs = policy.batch_size
    batches = [GroupBatch(i, seqs[j : j + bs]) for i, j in enumerate(range(0, size, bs))]
    run_group(pipeline, Sampler(), batches, prompt_len + gen_len + 1)
    prefill = max((e.end for e in timeline.events if e.phase == "prefill"), default=0.0)
    return clock.t, prefill, store.peak, timeline, store.over_budget
