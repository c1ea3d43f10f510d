"""The expert-aware multi-batch pipeline: one forward step of a batch group through the model.

Per layer, as in the paper: attention batch by batch; the gate batch by batch, starting an
on-demand fetch for each newly selected expert at once; then experts expert by expert over all
tokens of the group (hot first, cold in the order their fetches complete, each released after
its last token). Which fetches start when is decided by the Schedule's switches, so every rung
of the ablation ladder is this one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from klotski.layers.attention import KVBlock, StepInfo
from klotski.models.spec import ATTN, EMBED, EXPERT, HEAD, MOE, WeightKey
from klotski.runtime.model import GateOutput, ModelRunner
from klotski.runtime.schedule import Schedule
from klotski.runtime.transients import EXPERT_ROWS
from klotski.store.base import Handle, WeightStore
from klotski.timeline import Timeline

# B = sequences in a batch, S = new tokens per sequence (padded), T = the group's valid tokens,
# K = top_k, D = hidden, V = vocab

LIKELY = 0.9  # adaptive hot set: prefetch an expert the group uses with at least this probability


@dataclass
class BatchStep:
    """One batch's input for one forward step."""

    index: int  # batch number within the group (for the timeline)
    token_ids: torch.Tensor  # [B, S]
    valid: torch.Tensor  # [B, S] bool: real tokens (not padding)
    step: StepInfo
    kv: list[KVBlock]  # one block per layer
    last: torch.Tensor | None  # [B] index along S of each row's last real token; None: every valid token
    seq_ids: torch.Tensor | None = None  # [B] request index of each row (routing traces; stays on CPU)
    prefill: bool = False

    def to(self, device: torch.device) -> BatchStep:
        """The same step with its index tensors on the compute device (a no-op on CPU)."""
        if self.token_ids.device == device:
            return self
        step = StepInfo(self.step.positions.to(device), self.step.total.to(device), self.step.max_total, {})
        last = None if self.last is None else self.last.to(device)
        return BatchStep(
            self.index,
            self.token_ids.to(device),
            self.valid.to(device),
            step,
            self.kv,
            last,
            self.seq_ids,
            self.prefill,
        )


class HotPredictor:
    """The K hot experts a layer is expected to use: the seam the prefetcher plugs into
    (prefetch/runtime.py's PipelinePredictor, over a correlation table or learnt frequencies)."""

    def predict(self, layer: int, prev_ids: torch.Tensor | None, k: int) -> list[int]:
        raise NotImplementedError

    def observe(self, layer: int, prev_ids: torch.Tensor | None, ids: torch.Tensor) -> None:
        pass

    def likely(self, layer: int, prev_ids: torch.Tensor | None, tokens: int, threshold: float) -> list[int]:
        """Experts that `tokens` tokens will use with probability >= threshold, hottest first ([] if unknown)."""
        return []


# A routing hook sees a batch's gate output and returns the ids to use ([T, K]): replay, recording.
RoutingHook = Callable[[int, BatchStep, GateOutput], torch.Tensor]


@dataclass
class Pipeline:
    """Runs forward steps of a batch group through a weight store under one schedule."""

    runner: ModelRunner
    store: WeightStore
    schedule: Schedule
    timeline: Timeline
    num_hot: int  # K: hot experts prefetched per layer
    predictor: HotPredictor
    routing_hooks: list[RoutingHook] = field(default_factory=list)
    # K not fixed by the user: prefetch exactly the experts the group will almost surely use (a
    # large group's nearly all; a single token's often none), so reads neither wait for the gate
    # to name them nor spend bandwidth on guesses (a wrong guess costs a whole expert's read).
    adaptive_hot: bool = False

    def __post_init__(self):
        spec = self.runner.spec
        self.spec = spec
        self._moe_layers = [l for l in range(spec.num_layers) if spec.moe_layers[l]]
        self._ahead: dict[int, list[int]] = {}  # MoE layer -> hot experts already being prefetched
        self._final = False  # the current step is the group's last
        self._rows = 0  # sequences in the group (the next decode step's tokens)
        self._prefill = False  # the current step is a prefill
        self._ahead_dense: list[WeightKey] = []  # the next step's first attention, in flight

    # -- fetching -------------------------------------------------------------------------
    def _get(self, key: WeightKey, lane: str = "prefetch", **where) -> dict[str, torch.Tensor]:
        """Fetch (if not already in flight) and wait; time spent waiting is a bubble."""
        return self._wait(self.store.fetch(key, lane), **where)

    def _wait(self, handle: Handle, **where) -> dict[str, torch.Tensor]:
        if handle.done():
            return handle.wait()
        with self.timeline.span("compute", "wait", **where):
            return handle.wait()

    def _layer_keys(self, layer: int) -> list[WeightKey]:
        keys = [WeightKey(layer, ATTN), WeightKey(layer, MOE)]
        if self.spec.moe_layers[layer]:
            keys += [WeightKey(layer, EXPERT, e) for e in range(self.spec.num_experts)]
        return keys

    def _prefetch_layer(self, layer: int) -> None:
        """overlap / multibatch: the whole layer (attention, gate, every expert) ahead of use."""
        if layer < self.spec.num_layers:
            for key in self._layer_keys(layer):
                self.store.fetch(key, "prefetch")

    def _prefetch_gate_and_hot(self, layer: int, prev_ids: torch.Tensor | None, tokens: int = 0) -> list[int]:
        """hot / klotski: the gate and the K predicted hot experts (adaptive: the experts the group's
        `tokens` tokens almost surely use), while attention runs."""
        self.store.fetch(WeightKey(layer, MOE), "prefetch")
        if not self.spec.moe_layers[layer]:
            return []
        if (
            self.adaptive_hot
        ):  # what the group will almost surely use: all of a large group's, often none of one token's
            hot = self.predictor.likely(layer, prev_ids, tokens, LIKELY) if tokens else []
        else:
            hot = self.predictor.predict(layer, prev_ids, self.num_hot)
        # Reads go in expert order, which is the offload dir's file order (sequential on the disk), and
        # `hot` consumes by id (other orders get evicted); klotski computes in arrival order, so it loses
        # nothing.
        hot = sorted(hot)
        for e in hot:
            self.store.fetch(WeightKey(layer, EXPERT, e), "prefetch")
        return hot

    def _prefetch_ahead(self, layer: int, ids: torch.Tensor) -> None:
        """hot / klotski: once a layer's routing is known, start the next MoE layer's gate and hot experts.

        They queue behind this layer's cold experts, so the transfer lanes stay busy through this
        layer's expert compute. After the last MoE layer the next step's first one is started
        (its prediction needs no routing); drain() releases it if no step follows.
        """
        later = [l for l in self._moe_layers if l > layer]
        if later:
            self._ahead[later[0]] = self._prefetch_gate_and_hot(later[0], ids, len(ids))
        elif self._moe_layers and not self._final:
            # First what is needed first: this step's head and the next step's first attention
            # (queued behind the next layer's experts, they would push them out of room).
            for key in (WeightKey(None, HEAD), WeightKey(0, ATTN)):
                self.store.fetch(key, "prefetch")
            self._ahead_dense = [WeightKey(0, ATTN)]
            # The next step decodes one token per sequence, whatever this step was.
            self._ahead[self._moe_layers[0]] = self._prefetch_gate_and_hot(self._moe_layers[0], None, self._rows)

    def drain(self) -> None:
        """Release prefetches made for a step that will not come (the group finished)."""
        for layer, hot in self._ahead.items():
            self.store.release(WeightKey(layer, MOE))
            for e in hot:
                self.store.release(WeightKey(layer, EXPERT, e))
        for key in self._ahead_dense:
            self.store.release(key)
        self._ahead.clear()
        self._ahead_dense = []

    # -- the step ---------------------------------------------------------------------------
    def forward(self, batches: list[BatchStep], final: bool = False) -> list[torch.Tensor]:
        """One step for every batch of the group: logits [B, V] of each row's last token (or [T, V] of all).

        final: no step follows (every sequence reaches max_tokens), so nothing is prefetched for one.
        """
        self._final, self._ahead_dense = final, []
        self._rows = sum(b.token_ids.shape[0] for b in batches)  # sequences in the group
        self._prefill = any(b.prefill for b in batches)
        batches = [b.to(self.runner.device) for b in batches]
        xs, embed = [], WeightKey(None, EMBED)
        for b in batches:
            # Off the device only the batch's rows are read (a few KB a token): a short wait.
            with self.timeline.span("compute", "embed" if self.store.resident(embed) else "wait", batch=b.index):
                rows = self.store.gather(embed, "weight", b.token_ids)
            with self.timeline.span("compute", "embed", batch=b.index):
                xs.append(self.runner.embed(rows))
        if self.schedule.prefetch and not self.schedule.hot_only:
            self._prefetch_layer(0)
        elif self.schedule.prefetch:
            self.store.fetch(WeightKey(0, ATTN), "prefetch")
        prev_ids = None
        for layer in range(self.spec.num_layers):
            xs, prev_ids = self._layer(layer, batches, xs, prev_ids)
        head = self._get(WeightKey(None, HEAD))
        logits = []
        for b, x in zip(batches, xs):
            with self.timeline.span("compute", "head", batch=b.index):
                rows = x[b.valid] if b.last is None else x[torch.arange(x.shape[0]), b.last]  # [B or T, D]
                logits.append(self.runner.head(head, rows))
        self.store.release(WeightKey(None, HEAD))
        return logits

    def _layer(self, layer, batches, xs, prev_ids):
        """Attention per batch, then the MLP block (dense, or gate per batch + experts per expert)."""
        sched = self.schedule
        attn = self._get(WeightKey(layer, ATTN), layer=layer)
        if sched.prefetch and not sched.hot_only:
            self._prefetch_layer(layer + 1)
        elif sched.prefetch and layer in self._ahead:
            del self._ahead[layer]  # its gate and hot experts were started during the previous layer
        elif sched.prefetch:
            self._prefetch_gate_and_hot(layer, prev_ids, sum(int(b.valid.sum()) for b in batches))
        for i, b in enumerate(batches):
            with self.timeline.span("compute", "attention", layer=layer, batch=b.index):
                xs[i] = self.runner.attention(attn, xs[i], b.kv[layer], b.step)
        self.store.release(WeightKey(layer, ATTN))
        mlp = self._get(WeightKey(layer, MOE), layer=layer)
        if not self.spec.moe_layers[layer]:
            if sched.hot_only and layer + 1 < self.spec.num_layers:
                self.store.fetch(WeightKey(layer + 1, ATTN), "prefetch")
            for i, b in enumerate(batches):
                with self.timeline.span("compute", "dense_mlp", layer=layer, batch=b.index):
                    xs[i] = self.runner.dense_mlp(mlp, xs[i])
            self.store.release(WeightKey(layer, MOE))
            return xs, prev_ids
        gates = self._gates(layer, batches, xs, mlp)
        self.store.release(WeightKey(layer, MOE))
        if sched.hot_only and layer + 1 < self.spec.num_layers:
            self.store.fetch(WeightKey(layer + 1, ATTN), "prefetch")
        ids = torch.cat([g.ids for g in gates])  # [T, K]
        self.predictor.observe(layer, prev_ids, ids)
        used = torch.unique(ids).tolist()
        if sched.hot_only and not sched.reorder:
            # hot: this layer's cold experts start now, in the order they will be consumed, so
            # they queue ahead of the next layer's prefetches (klotski started them at each gate).
            for e in used:
                self.store.fetch(WeightKey(layer, EXPERT, e), "ondemand")
        if sched.hot_only:
            self._prefetch_ahead(layer, ids)
        outs = self._experts(layer, gates, ids, used)
        for i, b in enumerate(batches):
            xs[i] = xs[i].clone()
            xs[i][b.valid] = outs[i]
        return xs, ids

    def _gates(self, layer, batches, xs, mlp) -> list[GateOutput]:
        """Gate per batch; under reorder (klotski) each newly selected expert's fetch starts at once."""
        gates = []
        for b, x in zip(batches, xs):
            with self.timeline.span("compute", "gate", layer=layer, batch=b.index):
                g = self.runner.gate(mlp, x, b.valid)
            for hook in self.routing_hooks:
                g.ids = hook(layer, b, g)
            gates.append(g)
            if self.schedule.reorder:  # klotski: each new expert's fetch starts as its batch's gate picks it
                for e in torch.unique(g.ids).tolist():
                    self.store.fetch(WeightKey(layer, EXPERT, e), "ondemand")
        return gates

    def _experts(self, layer: int, gates: list[GateOutput], ids: torch.Tensor, used: list[int]) -> list[torch.Tensor]:
        """Every used expert over all its tokens of the group; returns each batch's MLP output."""
        h = torch.cat([g.h for g in gates])  # [T, D]
        sizes = [g.h.shape[0] for g in gates]
        for g in gates:
            g.h = None  # type: ignore[assignment]  # the concatenation holds them now (frees them sooner)
        weights = torch.cat([g.weights for g in gates])  # [T, K]
        k = ids.shape[1]
        # A token's sum over its k experts must not depend on the order they ran in. With k <= 2 one
        # accumulator gives that (0 + a + b == 0 + b + a exactly: two operands commute); with more, each
        # (token, slot) keeps its own row, summed over slots in a fixed order at the end.
        acc = torch.zeros(h.shape[0], *(() if k <= 2 else (k,)), h.shape[1], dtype=h.dtype, device=h.device)
        # Experts the gate did not pick are dropped now, not after the layer: a prefetch of one that
        # has not started yet never reads (overlap and multibatch prefetch whole layers).
        self._release_unused(layer, used)
        # A prefill's experts may compute in another dtype (measured faster there); back to h's after.
        other = self.runner.prefill_expert_dtype if self._prefill else None
        for e, w in self._expert_order(layer, used):
            tok, slot = torch.where(ids == e)
            with self.timeline.span("compute", "expert", layer=layer, expert=e):
                # In chunks of rows: a large group's prefill gives an expert thousands of tokens, and its
                # [tokens, intermediate] activations would otherwise be the process's largest transient.
                for c in range(0, tok.numel(), EXPERT_ROWS):
                    t, s = tok[c : c + EXPERT_ROWS], slot[c : c + EXPERT_ROWS]
                    if other is None:
                        y = self.runner.expert(w, h[t])
                    else:
                        y = self.runner.expert(w, h[t].to(other)).to(h.dtype)
                    y *= weights[t, s, None].to(y.dtype)
                    if k <= 2:
                        acc[t] += y  # a token picks an expert once: t has no repeats
                    else:
                        acc[t, s] = y
                    del y
            self.store.release(WeightKey(layer, EXPERT, e))
        del h
        out = acc if k <= 2 else acc.sum(dim=1)
        del acc
        out += torch.cat([g.base for g in gates])  # residual + the experts' sum (addition commutes exactly)
        return list(out.split(sizes))

    def _release_unused(self, layer: int, used: list[int]) -> None:
        """Prefetched experts nobody selected are released too (their fetch was a wasted guess)."""
        for e in set(range(self.spec.num_experts)) - set(used):
            self.store.release(WeightKey(layer, EXPERT, e))

    def _expert_order(self, layer: int, used: list[int]):
        """Yield (expert, weights): by id with a wait each, or (reorder) fetched ones by arrival, resident
        ones whenever nothing has arrived."""
        keys = {e: WeightKey(layer, EXPERT, e) for e in used}
        if not self.schedule.reorder:
            # In expert order: under `hot` the cold fetches start after all gates, in the order
            # they will be consumed (a transfer queue in another order would have to evict).
            lane = "ondemand" if self.schedule.hot_only else "prefetch"
            in_order = [self.store.fetch(keys[e], lane) for e in used]
            for e, handle in zip(used, in_order):
                yield e, self._wait(handle, layer=layer, expert=e)
            return
        handles = {e: self.store.fetch(keys[e], "ondemand") for e in used}
        # Fetched experts first, in arrival order: each frees its buffer for the next read as soon
        # as it is done. Resident ones fill the time the next arrival would be waited for (at a
        # step's start they would otherwise hold up buffers that arrived and leave the disk idle).
        resident = [e for e in used if self.store.resident(keys[e])]
        pending = {handles[e]: e for e in used if e not in resident}
        while pending or resident:
            arrived = [h for h in pending if h.done()]
            if arrived:
                handle = min(arrived, key=lambda h: (h.arrived, pending[h]))
            elif resident:
                e = resident.pop(0)
                yield e, handles[e].wait()
                continue
            else:
                with self.timeline.span("compute", "wait", layer=layer):
                    # Each store waits its own way (the simulator's moves a virtual clock).
                    handle = self.store.wait_any(list(pending))
            yield pending.pop(handle), handle.wait()
