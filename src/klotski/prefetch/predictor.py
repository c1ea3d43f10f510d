"""Predictors of the experts a batch group will use at a layer, behind one interface.

Legend: T = tokens in the group, E = experts, K = top_k, l = path length, m = layers of path used.
`prev_experts` is an int array [T, l, K]: each token's experts at the previous l layers, oldest
first (fewer layers near the start of the model), or None at layer 0 or when unknown.
Every prediction orders experts hottest first and breaks ties by the lower expert id.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from klotski.prefetch.table import CorrelationTable

Scoring = Literal["raw", "rows"]


def top_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores along the last axis, ties to the lower id."""
    # A stable sort of negated scores keeps equal scores in id order.
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


class Predictor:
    """Base: subclasses give per-token scores; group scores sum them unless overridden."""

    name = "predictor"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        """Each token's tendency toward each expert at `layer`: [T, E]."""
        raise NotImplementedError

    def predict_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int = 1) -> np.ndarray:
        """The group's summed tendency toward each expert at `layer`: [E]."""
        return self.token_scores(layer, prev_experts, _tokens(prev_experts, num_tokens)).sum(0)

    def predict(self, layer: int, prev_experts: np.ndarray | None, k: int) -> list[int]:
        """The group's top-k experts at `layer`, hottest first."""
        return top_experts(self.predict_scores(layer, prev_experts), k).tolist()

    def predict_tokens(self, layer: int, prev_experts: np.ndarray | None, k: int, num_tokens: int = 1) -> np.ndarray:
        """Each token's own top-k experts at `layer`: [T, k]."""
        return top_experts(self.token_scores(layer, prev_experts, _tokens(prev_experts, num_tokens)), k)

    def observe(self, layer: int, prev_experts: np.ndarray | None, cur_experts: np.ndarray) -> None:
        """Learn from the routing the group actually chose at `layer` (cur [T, K])."""


class CorrelationPredictor(Predictor):
    """The paper's predictor: sum each token's table row looked up by its expert path.

    `scoring="raw"` sums raw count rows, so paths through popular experts weigh more;
    `"rows"` normalises each row to a distribution first. Raw is the default: it won on the
    train split of Mixtral-8x7B traces (docs/prefetcher.md). Rows never seen fall back to the
    layer's overall frequency. Online updates go to a private copy, never back to disk.
    """

    name = "correlation"

    def __init__(self, table: CorrelationTable, scoring: Scoring = "raw") -> None:
        super().__init__(table.num_experts)
        if scoring not in ("raw", "rows"):
            raise ValueError(f"scoring must be 'raw' or 'rows', got {scoring!r}")
        self.table = table.copy()
        self.scoring = scoring
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        """Each token's summed row over every combination of its path: [T, E]."""
        paths, matrix = self._lookup(layer, prev_experts)
        if paths is None:
            return np.broadcast_to(matrix[0], (num_tokens, self.num_experts))
        tokens = len(prev_experts)
        scores = matrix[paths].reshape(tokens, -1, self.num_experts).sum(axis=1)
        unseen = ~scores.any(axis=1)
        if unseen.any():  # a path never seen: fall back to the layer's overall frequency
            scores[unseen] = self._fallback(layer)
        return scores

    def predict_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int = 1) -> np.ndarray:
        """Sum over tokens, done as path counts x rows so big groups cost O(E^(m+1))."""
        paths, matrix = self._lookup(layer, prev_experts)
        if paths is None:
            return matrix[0] * num_tokens
        scores = np.bincount(paths, minlength=matrix.shape[0]) @ matrix
        return scores if scores.any() else self._fallback(layer)

    def observe(self, layer: int, prev_experts: np.ndarray | None, cur_experts: np.ndarray) -> None:
        """Add the group's routing to the private table copy."""
        m = self.table.path_len_at(layer)
        if m and (prev_experts is None or np.asarray(prev_experts).shape[1] < m):
            return  # without the full path there is no cell to count into
        self.table.add(layer, prev_experts, cur_experts)
        if self._cache:
            self._cache = {key: v for key, v in self._cache.items() if key[0] != layer}

    def _lookup(self, layer: int, prev_experts: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """Flat path cells of every token combination [T * K^m] and the row matrix [E^m, E]."""
        m = self.table.path_len_at(layer)
        if prev_experts is not None and m:
            prev_experts = np.asarray(prev_experts)
            m = min(m, prev_experts.shape[1])
        if prev_experts is None or m == 0:
            return None, self._matrix(layer, 0)
        prev = prev_experts[:, -m:, :]  # [T, m, K]
        if m == 1:  # the paper's case, kept free of the general loop
            return prev.ravel(), self._matrix(layer, 1)
        flat = np.zeros((len(prev), 1), dtype=np.int64)
        for j in range(m):
            flat = (flat[:, :, None] * self.num_experts + prev[:, j, None, :]).reshape(len(prev), -1)
        return flat.ravel(), self._matrix(layer, m)

    def _matrix(self, layer: int, m: int) -> np.ndarray:
        """Rows keyed by the last m path layers (older ones summed out), scored: [E^m, E]."""
        arr = self.table.counts[layer]
        if self.scoring == "raw" and m == arr.ndim - 1:
            return arr.reshape(-1, self.num_experts)  # a view: online updates show at once
        key = (layer, m)
        if key not in self._cache:
            self._cache[key] = self._score_rows(layer, m)
        return self._cache[key]

    def _score_rows(self, layer: int, m: int) -> np.ndarray:
        arr = self.table.counts[layer]
        rows = arr.reshape(-1, *arr.shape[arr.ndim - m - 1 :]).sum(axis=0).reshape(-1, arr.shape[-1])
        if self.scoring == "rows":
            totals = rows.sum(axis=1, keepdims=True)
            rows = rows / np.where(totals > 0, totals, 1.0)
        return rows

    def _fallback(self, layer: int) -> np.ndarray:
        freq = self.table.frequency(layer)
        return freq / max(freq.sum(), 1e-12) if self.scoring == "rows" else freq


class FrequencyPredictor(Predictor):
    """Baseline: the experts selected most at this layer overall, updated online."""

    name = "frequency"

    def __init__(self, table: CorrelationTable) -> None:
        super().__init__(table.num_experts)
        self.counts = np.stack([table.frequency(i) for i in range(table.num_layers)])  # [L, E]

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        """Every token gets the layer's frequency: [T, E]."""
        return np.broadcast_to(self.counts[layer], (num_tokens, self.num_experts))

    def predict_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int = 1) -> np.ndarray:
        """The layer's frequency, independent of the group."""
        return self.counts[layer].copy()

    def observe(self, layer: int, prev_experts: np.ndarray | None, cur_experts: np.ndarray) -> None:
        """Count the group's choices."""
        cur = np.asarray(cur_experts, dtype=np.int64).ravel()
        self.counts[layer] += np.bincount(cur, minlength=self.num_experts)


class PreviousLayerPredictor(Predictor):
    """Baseline: the experts the group used most at the previous layer (frequency at layer 0)."""

    name = "previous"

    def __init__(self, table: CorrelationTable) -> None:
        super().__init__(table.num_experts)
        self.frequency = np.stack([table.frequency(i) for i in range(table.num_layers)])

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        """One-hot of each token's previous-layer experts: [T, E]."""
        if prev_experts is None or layer == 0 or np.asarray(prev_experts).shape[1] == 0:
            return np.broadcast_to(self.frequency[layer], (num_tokens, self.num_experts))
        last = np.asarray(prev_experts, dtype=np.int64)[:, -1, :]  # [T, K]
        onehot = np.zeros((len(last), self.num_experts))
        np.put_along_axis(onehot, last, 1.0, axis=1)
        return onehot


class RandomPredictor(Predictor):
    """Baseline: a uniformly random order of experts, reproducible from the seed."""

    name = "random"

    def __init__(self, num_experts: int, seed: int = 0) -> None:
        super().__init__(num_experts)
        self.rng = np.random.default_rng(seed)

    def token_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int) -> np.ndarray:
        """Independent random scores per token: [T, E]."""
        return self.rng.random((num_tokens, self.num_experts))

    def predict_scores(self, layer: int, prev_experts: np.ndarray | None, num_tokens: int = 1) -> np.ndarray:
        """One random score per expert: [E]."""
        return self.rng.random(self.num_experts)


def default_predictors(table: CorrelationTable, seed: int = 0, scoring: Scoring = "raw") -> dict[str, Predictor]:
    """The correlation predictor and the three baselines, each with its own state."""
    return {
        "correlation": CorrelationPredictor(table, scoring),
        "frequency": FrequencyPredictor(table),
        "previous": PreviousLayerPredictor(table),
        "random": RandomPredictor(table.num_experts, seed),
    }


def _tokens(prev_experts: np.ndarray | None, num_tokens: int) -> int:
    return num_tokens if prev_experts is None else len(prev_experts)
