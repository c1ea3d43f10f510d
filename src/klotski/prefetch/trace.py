"""Routing traces: which experts every token chose at every layer, recorded or synthesised.

Legend: T = tokens, L = layers, K = top_k, E = experts, S = sequences.
A trace written on one machine replays anywhere: `klotski prefetch-eval` and `calibrate` read it.
Synthetic traces, sampled from a table, are made by prefetch/synthetic.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from klotski.errors import KlotskiError

TRACE_KEYS = ("expert_ids", "seq_ids", "positions", "is_prefill")
TRACE_FIX = "record one with `klotski generate --record-routing` or `klotski make-trace`"


@dataclass
class RoutingTrace:
    """Per-token routing: expert_ids [T, L, K] int16 plus each token's sequence and position."""

    expert_ids: np.ndarray  # [T, L, K] int16
    seq_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    is_prefill: np.ndarray  # [T] bool
    num_experts: int | None = None  # known to the recorder; None means "max id + 1"

    def __post_init__(self) -> None:
        self.expert_ids = _as_int(self.expert_ids, np.int16, "expert_ids")
        self.seq_ids = _as_int(self.seq_ids, np.int32, "seq_ids")
        self.positions = _as_int(self.positions, np.int32, "positions")
        self.is_prefill = np.asarray(self.is_prefill).astype(bool)
        self.validate()

    @property
    def num_tokens(self) -> int:
        """Rows in the trace."""
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        """MoE layers recorded per token."""
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        """Experts chosen per token per layer."""
        return int(self.expert_ids.shape[2])

    def validate(self) -> None:
        """Raise KlotskiError if the arrays disagree with each other."""
        if self.expert_ids.ndim != 3:
            raise KlotskiError(
                f"trace expert_ids must be [tokens, layers, top_k], got shape {self.expert_ids.shape}; {TRACE_FIX}"
            )
        n = self.num_tokens
        for name in ("seq_ids", "positions", "is_prefill"):
            if getattr(self, name).shape != (n,):
                raise KlotskiError(
                    f"trace {name} has shape {getattr(self, name).shape}, expected "
                    f"({n},) to match expert_ids; {TRACE_FIX}"
                )
        if n and self.expert_ids.min() < 0:
            raise KlotskiError(f"trace expert_ids holds negative ids; {TRACE_FIX}")
        if self.num_experts is not None and n and self.expert_ids.max() >= self.num_experts:
            raise KlotskiError(f"trace expert id {self.expert_ids.max()} is outside 0..{self.num_experts - 1}")
        keys = self.seq_ids.astype(np.int64) << 32 | self.positions.astype(np.int64) & 0xFFFFFFFF
        if np.unique(keys).size != n:
            raise KlotskiError(f"trace has repeated (seq_id, position) rows; {TRACE_FIX}")

    def subset(self, rows: np.ndarray) -> RoutingTrace:
        """The trace restricted to `rows` (indices or a mask)."""
        return RoutingTrace(
            self.expert_ids[rows], self.seq_ids[rows], self.positions[rows], self.is_prefill[rows], self.num_experts
        )

    def save(self, path: str | Path) -> None:
        """Write the trace as a compressed .npz."""
        arrays: dict[str, Any] = {k: getattr(self, k) for k in TRACE_KEYS}
        if self.num_experts is not None:
            arrays["num_experts"] = np.int32(self.num_experts)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by `save` or the runtime; a bad file raises KlotskiError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in TRACE_KEYS if k not in data.files]
                if missing:
                    raise KlotskiError(f"trace {path} lacks {', '.join(missing)}; {TRACE_FIX}")
                arrays = {k: data[k] for k in TRACE_KEYS}
                num_experts = int(data["num_experts"]) if "num_experts" in data.files else None
        except FileNotFoundError:
            raise KlotskiError(f"trace {path} not found; {TRACE_FIX}") from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, KlotskiError):
                raise
            raise KlotskiError(f"trace {path} is not a readable .npz ({exc}); {TRACE_FIX}") from None
        try:
            return cls(**arrays, num_experts=num_experts)
        except KlotskiError as exc:
            raise KlotskiError(f"{path}: {exc}") from None


class RoutingRecorder:
    """Collects routing from forward passes, layer by layer, into a RoutingTrace."""

    def __init__(self, num_layers: int, top_k: int, num_experts: int | None = None) -> None:
        self.num_layers = num_layers
        self.top_k = top_k
        self.num_experts = num_experts
        self._rows: dict[tuple[int, int], int] = {}  # (seq_id, position) -> row
        self._ids = np.full((64, num_layers, top_k), -1, dtype=np.int16)  # grows by doubling
        self._prefill = np.zeros(64, dtype=bool)

    def record(self, layer: int, seq_ids: Any, positions: Any, is_prefill: Any, expert_ids: Any) -> None:
        """Store one layer's choices for T tokens: seq_ids/positions/is_prefill [T], ids [T, K]."""
        seqs, pos = _numpy(seq_ids).ravel(), _numpy(positions).ravel()
        ids = _numpy(expert_ids).reshape(len(seqs), self.top_k)
        prefill = np.broadcast_to(_numpy(is_prefill).astype(bool), seqs.shape)
        rows = np.fromiter((self._row(int(s), int(p)) for s, p in zip(seqs, pos)), dtype=np.int64, count=len(seqs))
        self._ids[rows, layer] = ids
        self._prefill[rows] = prefill

    def to_trace(self, drop_incomplete: bool = False) -> RoutingTrace:
        """The recorded rows sorted by (seq_id, position); rows missing a layer are an error."""
        n = len(self._rows)
        keys = np.array(list(self._rows), dtype=np.int64).reshape(n, 2)
        rows = np.array(list(self._rows.values()), dtype=np.int64)
        complete = (self._ids[rows] >= 0).all(axis=(1, 2))
        if not complete.all() and not drop_incomplete:
            raise ValueError(f"{int((~complete).sum())} recorded tokens lack some layers")
        keys, rows = keys[complete], rows[complete]
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        keys, rows = keys[order], rows[order]
        return RoutingTrace(
            self._ids[rows].copy(), keys[:, 0], keys[:, 1], self._prefill[rows].copy(), self.num_experts
        )

    def _row(self, seq: int, pos: int) -> int:
        row = self._rows.get((seq, pos))
        if row is None:
            row = self._rows[(seq, pos)] = len(self._rows)
            if row == len(self._ids):
                self._grow()
        return row

    def _grow(self) -> None:
        extra = np.full_like(self._ids, -1)
        self._ids = np.concatenate([self._ids, extra])
        self._prefill = np.concatenate([self._prefill, np.zeros_like(self._prefill)])


def split(trace: RoutingTrace, held_out_fraction: float, seed: int) -> tuple[RoutingTrace, RoutingTrace]:
    """(train, held_out) split by whole sequences; a one-sequence trace keeps its tail held out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise KlotskiError(f"held-out fraction must be within (0, 1), got {held_out_fraction}")
    seqs = np.unique(trace.seq_ids)
    if len(seqs) == 1:
        # One long sequence: hold out its last positions so the split stays causal.
        cut = np.quantile(trace.positions, 1.0 - held_out_fraction)
        held = trace.positions > cut
    else:
        count = min(max(1, round(held_out_fraction * len(seqs))), len(seqs) - 1)
        chosen = np.random.default_rng(seed).permutation(seqs)[:count]
        held = np.isin(trace.seq_ids, chosen)
    return trace.subset(~held), trace.subset(held)


def _as_int(arr: Any, dtype: type, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise KlotskiError(f"trace {name} must hold integers, got {arr.dtype}; {TRACE_FIX}")
    return arr.astype(dtype, copy=False)


def _numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, lists, or (CPU or device) torch tensors without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
