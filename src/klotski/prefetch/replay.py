"""Routing replay (benchmarks only): replace the router's choices with a real model's routing.

Random-weight checkpoints route almost uniformly, so their I/O pattern is not a trained model's.
A RoutingReplay is a pipeline routing hook that swaps each token's experts for ones sampled from
a real correlation table (the authors' Mixtral tables) or looked up in a recorded trace. Samples
are keyed by (seed, sequence, position, layer) alone, through a counter-based hash, so the routing
and hence the tokens never depend on the schedule, batch shape or order of execution.

Legend: T = tokens, K = top_k, E = experts, L = MoE layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from klotski.errors import KlotskiError
from klotski.models.spec import ModelSpec
from klotski.prefetch.runtime import moe_index
from klotski.prefetch.table import BUNDLED_TABLES, CorrelationTable, load_table
from klotski.prefetch.trace import RoutingTrace

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed uint64 from a uint64 counter (vectorised)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_gumbel(seed: int, seqs: np.ndarray, positions: np.ndarray, layer: int, num: int) -> np.ndarray:
    """Gumbel noise [T, num], a pure function of (seed, seq, position, layer, column)."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
        key = _mix(key ^ seqs.astype(np.uint64)[:, None])
        key = _mix(key ^ (positions.astype(np.uint64)[:, None] << np.uint64(20)))
        key = _mix(key ^ np.uint64(layer * 0x100000001B3 + 1))
        key = _mix(key + np.arange(num, dtype=np.uint64)[None, :])  # [T, num]
    u = ((key >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # uniform in (0, 1)
    return -np.log(-np.log(u))


class RoutingReplay:
    """Pipeline routing hook: (layer, batch, gate) -> replayed expert ids [T, K]."""

    def __init__(self, spec: ModelSpec, source: str, seed: int = 0):
        self.index = moe_index(spec)
        self.top_k, self.seed, self.source = spec.top_k, seed, str(source)
        self.trace: dict[tuple[int, int], np.ndarray] | None = None
        self.transitions: list[np.ndarray] = []
        if str(source).endswith(".npz"):
            self._init_trace(RoutingTrace.load(source), spec)
        else:
            self._init_table(load_table(source, spec.top_k), spec)

    def _init_table(self, table: CorrelationTable, spec: ModelSpec) -> None:
        layers = len(self.index)
        if table.num_experts != spec.num_experts or table.num_layers < layers:
            raise KlotskiError(
                f"routing replay table {self.source} has {table.num_layers} layers x {table.num_experts} "
                f"experts; the model needs {layers} MoE layers x {spec.num_experts} experts"
            )
        # Row-normalised transition probabilities: [E] at layer 0, [E, E] (prev -> cur) after.
        self.transitions = [_normalise(table.frequency(0))]
        for i in range(1, layers):
            arr = table.counts[i]
            mat = arr.sum(axis=tuple(range(arr.ndim - 2))) if arr.ndim > 2 else arr
            self.transitions.append(_normalise(mat))

    def _init_trace(self, trace: RoutingTrace, spec: ModelSpec) -> None:
        if trace.num_layers < len(self.index) or trace.top_k != spec.top_k:
            raise KlotskiError(
                f"routing replay trace {self.source} has {trace.num_layers} layers x top-{trace.top_k}; "
                f"the model needs {len(self.index)} MoE layers x top-{spec.top_k}"
            )
        self.trace = {(int(s), int(p)): ids for s, p, ids in zip(trace.seq_ids, trace.positions, trace.expert_ids)}

    def describe(self) -> str:
        """One line for stats and stderr: what replaces the router."""
        kind = "trace" if self.trace is not None else "table"
        return f"{kind} {self.source} (seed {self.seed})"

    def __call__(self, layer: int, batch, gate) -> torch.Tensor:
        valid = batch.valid
        seqs = batch.seq_ids[:, None].expand_as(valid)[valid].numpy()  # [T]
        positions = batch.step.positions[valid].numpy()  # [T]
        ids = self.ids(self.index[layer], seqs, positions)
        return torch.from_numpy(ids).to(gate.ids.device, gate.ids.dtype)

    def ids(self, moe_layer: int, seqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Every token's experts at one MoE layer: [T, K] int64."""
        if self.trace is not None:
            return self._from_trace(moe_layer, seqs, positions)
        # Stateless: walk the chain from layer 0 so no call depends on an earlier one.
        probs = np.broadcast_to(self.transitions[0], (len(seqs), self.transitions[0].shape[0]))
        ids = self._draw(probs, seqs, positions, 0)
        for i in range(1, moe_layer + 1):
            probs = self.transitions[i][ids].mean(axis=1)  # [T, K, E] -> [T, E]
            ids = self._draw(probs, seqs, positions, i)
        return ids

    def _draw(self, probs: np.ndarray, seqs: np.ndarray, positions: np.ndarray, layer: int) -> np.ndarray:
        """K distinct experts per token by Gumbel-top-k (= sampling without replacement)."""
        keys = np.log(probs + 1e-300) + keyed_gumbel(self.seed, seqs, positions, layer, probs.shape[1])
        return np.argsort(-keys, axis=1, kind="stable")[:, : self.top_k].astype(np.int64)

    def _from_trace(self, moe_layer: int, seqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        try:
            rows = [self.trace[(int(s), int(p))][moe_layer] for s, p in zip(seqs, positions)]
        except KeyError as exc:
            raise KlotskiError(
                f"routing replay trace {self.source} has no token (sequence, position) = {exc.args[0]}; "
                "record it with the same prompts and lengths (`generate --record-routing`)"
            ) from None
        return np.asarray(rows, dtype=np.int64).reshape(len(seqs), self.top_k)


def _normalise(counts: np.ndarray) -> np.ndarray:
    """Rows summing to 1; an empty row becomes uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.full(counts.shape, 1.0 / counts.shape[-1]), where=totals > 0)


def replay_sources() -> str:
    """What --routing-replay accepts, for help and errors."""
    return f"{' | '.join(BUNDLED_TABLES)} | TABLE.json | TRACE.npz"


def make_replay(spec: ModelSpec, source: str | Path | None, seed: int = 0) -> RoutingReplay | None:
    """A RoutingReplay for `source`, or None when replay is off (the default)."""
    return None if source is None else RoutingReplay(spec, str(source), seed)
