"""Synthetic routing traces: a table's transition counts sampled as a Markov chain over layers
(`klotski make-trace`, the prefetcher's tests and evaluations without a real model)."""

from __future__ import annotations

import numpy as np

from klotski.errors import KlotskiError
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingTrace


def sample_markov_trace(
    table: CorrelationTable, num_seqs: int, tokens_per_seq: int, seed: int, prompt_len: int = 0, flatten: float = 0.0
) -> RoutingTrace:
    """Synthesise routing as a Markov chain over layers from a table's transition counts.

    Layer 0 draws top_k distinct experts from the layer-0 frequencies; each later layer draws
    top_k distinct experts from the sum of the rows of the token's previous-layer experts.
    `flatten` in [0, 1] mixes every distribution toward uniform (0: the table as is; 1: uniform
    routing), since real workloads can route much flatter than a short warm-up suggests.
    """
    if not 0.0 <= flatten <= 1.0:
        raise KlotskiError(f"flatten must be within [0, 1], got {flatten}")
    if num_seqs < 1 or tokens_per_seq < 1:
        raise KlotskiError("a trace needs at least one sequence of at least one token")
    rng = np.random.default_rng(seed)
    n, k = num_seqs * tokens_per_seq, table.top_k
    ids = np.empty((n, table.num_layers, k), dtype=np.int16)  # [T, L, K]
    ids[:, 0] = _sample_distinct(rng, np.broadcast_to(table.frequency(0), (n, table.num_experts)), k, flatten)
    for layer in range(1, table.num_layers):
        rows = table.transition(layer)[ids[:, layer - 1].astype(np.int64)].sum(axis=1)  # [T, E]
        ids[:, layer] = _sample_distinct(rng, rows, k, flatten)
    seqs = np.repeat(np.arange(num_seqs, dtype=np.int32), tokens_per_seq)
    pos = np.tile(np.arange(tokens_per_seq, dtype=np.int32), num_seqs)
    return RoutingTrace(ids, seqs, pos, pos < prompt_len, table.num_experts)


def _sample_distinct(rng: np.random.Generator, weights: np.ndarray, k: int, flatten: float) -> np.ndarray:
    """Draw k distinct experts per row without replacement, proportional to weights [T, E]."""
    totals = weights.sum(axis=1, keepdims=True)
    probs = np.divide(weights, totals, out=np.full(weights.shape, 1.0 / weights.shape[1]), where=totals > 0)
    probs = (1.0 - flatten) * probs + flatten / weights.shape[1]
    # Gumbel-top-k draws exactly as sequential sampling without replacement does; the tiny floor
    # lets rows with fewer than k nonzero entries still yield k distinct experts.
    keys = np.log(probs + 1e-300) + rng.gumbel(size=probs.shape)
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]
