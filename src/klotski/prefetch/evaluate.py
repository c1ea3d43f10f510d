"""Replay a routing trace in batch groups and score how well each predictor picks hot experts.

Legend: G = groups, T = tokens in a group, L = layers, K = top_k, E = experts, P = prefetched set.
Metrics, per layer and overall:
- precision: |P & used| / |P|; recall: |P & used| / |used|   (mean over groups)
- hot_accuracy: P is a true top-|P| by token count, ties allowed either way   (mean over groups)
- coverage: token-to-expert assignments served by P / all assignments         (pooled)
- oracle_coverage: the same for the group's true top-|P|                      (pooled)
- token_accuracy: each token's own prediction from its own path (|P| experts) against its
  experts at the layer, over all assignments                                  (pooled)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from klotski.errors import KlotskiError
from klotski.prefetch.predictor import Predictor, Scoring, default_predictors
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingTrace

METRICS = ("precision", "recall", "hot_accuracy", "token_accuracy", "coverage", "oracle_coverage")


def make_groups(trace: RoutingTrace, group_size: int) -> tuple[list[np.ndarray], str]:
    """Row indices of each batch group in replay order, and how they were formed.

    Several sequences: blocks of `group_size` sequences; each block's prompt tokens form one
    group (one prefill pass) and each decode position one group (one decode step).
    One sequence: consecutive runs of `group_size` tokens.
    """
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    seqs = np.unique(trace.seq_ids)
    if len(seqs) == 1:
        order = np.argsort(trace.positions, kind="stable")
        return np.split(order, np.arange(group_size, len(order), group_size)), "consecutive"
    block = np.searchsorted(seqs, trace.seq_ids) // group_size
    step = np.where(trace.is_prefill, -1, trace.positions).astype(np.int64)
    order = np.lexsort((trace.seq_ids, step, block))
    key = block[order] * (int(step.max()) + 2) + step[order]
    cuts = np.flatnonzero(np.diff(key)) + 1
    return np.split(order, cuts), "decode-steps"


def evaluate(
    trace: RoutingTrace,
    table: CorrelationTable,
    group_size: int,
    k: int | None = None,
    seed: int = 0,
    scoring: Scoring = "raw",
    predictors: dict[str, Predictor] | None = None,
) -> dict[str, Any]:
    """Replay `trace` in groups, predicting each layer's top-k before seeing it; learn after."""
    _check_compatible(trace, table)
    k = min(k or trace.top_k, table.num_experts)
    predictors = predictors or default_predictors(table, seed, scoring)
    groups, grouping = make_groups(trace, group_size)
    ids = trace.expert_ids.astype(np.int64)  # [N, L, K] N = all tokens of the trace
    chosen = {n: np.zeros((len(groups), trace.num_layers, k), np.int64) for n in predictors}
    per_token = {n: np.zeros(ids.shape[:2] + (k,), np.int64) for n in predictors}  # [N, L, k]
    for g, rows in enumerate(groups):
        for name, predictor in predictors.items():
            chosen[name][g], per_token[name][rows] = _replay_group(ids[rows], table, predictor, k)
    scorer = _Scorer(ids, groups, table.num_experts, k)
    report = {n: scorer.report(chosen[n], per_token[n]) for n in predictors}
    config = _config(trace, table, group_size, k, seed, scoring, groups, grouping)
    return {"predictors": report, "config": config}


def _replay_group(
    group: np.ndarray, table: CorrelationTable, predictor: Predictor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predict every layer of one group [T, L, K] before seeing it, then observe it all.

    Returns the group's prefetch set per layer [L, k] and each token's own prediction [T, L, k].
    """
    tokens, num_layers, _ = group.shape
    chosen = np.zeros((num_layers, k), np.int64)
    per_token = np.zeros((tokens, num_layers, k), np.int64)
    paths = [_path(group, table, layer) for layer in range(num_layers)]
    for layer, prev in enumerate(paths):
        chosen[layer] = predictor.predict(layer, prev, k)
        per_token[:, layer] = predictor.predict_tokens(layer, prev, k, num_tokens=tokens)
    for layer, prev in enumerate(paths):
        predictor.observe(layer, prev, group[:, layer, :])
    return chosen, per_token


def _path(group: np.ndarray, table: CorrelationTable, layer: int) -> np.ndarray | None:
    """The tokens' experts at the layers that key this layer's table: [T, m, K] or None."""
    m = table.path_len_at(layer)
    return group[:, layer - m : layer, :] if m else None


class _Scorer:
    """Turns prefetch sets and per-token predictions into the six metrics, all at once."""

    def __init__(self, ids: np.ndarray, groups: list[np.ndarray], num_experts: int, k: int) -> None:
        num_tokens, num_layers, top_k = ids.shape
        self.ids, self.k = ids, k
        group_of = np.zeros(num_tokens, np.int64)
        for g, rows in enumerate(groups):
            group_of[rows] = g
        # used[g, l, e]: how many of group g's tokens chose expert e at layer l.
        cell = (
            group_of[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]
        ) * num_experts + ids  # [N, L, K]
        self.used = np.bincount(cell.ravel(), minlength=len(groups) * num_layers * num_experts).reshape(
            len(groups), num_layers, num_experts
        )
        self.assign = float(num_tokens * top_k)  # token-to-expert assignments per layer

    def report(self, chosen: np.ndarray, per_token: np.ndarray) -> dict[str, Any]:
        """Overall figures and `per_layer`: chosen [G, L, k], per_token [N, L, k]."""
        sums = self._sums(chosen, per_token)  # each [L]
        groups = len(chosen)
        per_layer = [
            dict(layer=i, **self._figures({n: v[i] for n, v in sums.items()}, groups, 1))
            for i in range(chosen.shape[1])
        ]
        overall = self._figures({n: v.sum() for n, v in sums.items()}, groups, chosen.shape[1])
        return {**overall, "per_layer": per_layer}

    def _sums(self, chosen: np.ndarray, per_token: np.ndarray) -> dict[str, np.ndarray]:
        used = self.used
        got = np.take_along_axis(used, chosen, axis=2)  # [G, L, k] tokens served by each pick
        hits = (got > 0).sum(axis=2)
        rest = used.copy()
        np.put_along_axis(rest, chosen, -1, axis=2)  # -1 marks the picks; counts are >= 0
        # A true top-k: no expert left out serves more tokens than the coldest pick.
        hot = got.min(axis=2) >= rest.max(axis=2)
        token_hits = (per_token[:, :, :, None] == self.ids[:, :, None, :]).sum(axis=(0, 2, 3))
        return {
            "precision": (hits / self.k).sum(axis=0),
            "recall": (hits / np.maximum((used > 0).sum(axis=2), 1)).sum(axis=0),
            "hot": hot.sum(axis=0).astype(float),
            "covered": got.sum(axis=(0, 2)).astype(float),
            "oracle": np.sort(used, axis=2)[:, :, -self.k :].sum(axis=(0, 2)).astype(float),
            "token_hits": token_hits.astype(float),
        }

    def _figures(self, s: dict[str, float], groups: int, layers: int) -> dict[str, float]:
        pairs, assign = max(groups * layers, 1), max(self.assign * layers, 1.0)
        return {
            "precision": float(s["precision"] / pairs),
            "recall": float(s["recall"] / pairs),
            "hot_accuracy": float(s["hot"] / pairs),
            "token_accuracy": float(s["token_hits"] / assign),
            "coverage": float(s["covered"] / assign),
            "oracle_coverage": float(s["oracle"] / assign),
        }


def _check_compatible(trace: RoutingTrace, table: CorrelationTable) -> None:
    if trace.num_layers != table.num_layers:
        raise KlotskiError(
            f"trace has {trace.num_layers} layers but the table {table.num_layers}; "
            "use a table calibrated on the same model"
        )
    if trace.num_tokens and int(trace.expert_ids.max()) >= table.num_experts:
        raise KlotskiError(
            f"trace uses expert {int(trace.expert_ids.max())} but the table has "
            f"{table.num_experts} experts; use a table of the same model"
        )
    if trace.num_tokens == 0:
        raise KlotskiError("trace is empty; record some tokens first")


def _config(
    trace: RoutingTrace,
    table: CorrelationTable,
    group_size: int,
    k: int,
    seed: int,
    scoring: str,
    groups: list[np.ndarray],
    grouping: str,
) -> dict[str, Any]:
    return {
        "group_size": group_size,
        "k": k,
        "grouping": grouping,
        "num_groups": len(groups),
        "mean_group_tokens": trace.num_tokens / max(len(groups), 1),
        "num_tokens": trace.num_tokens,
        "num_sequences": int(np.unique(trace.seq_ids).size),
        "num_layers": trace.num_layers,
        "num_experts": table.num_experts,
        "top_k": trace.top_k,
        "path_length": table.path_length,
        "scoring": scoring,
        "seed": seed,
        "table_model": table.model,
        "table_calibrated_on": table.calibrated_on,
    }
