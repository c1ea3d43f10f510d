"""Glue between the pipeline and the prefetcher: torch routing in, predictions out, traces recorded.

The pipeline numbers every layer; tables and traces count MoE layers only (DeepSeek's first
dense layers, Qwen's mlp_only layers have no routing), so layer numbers are mapped here.
"""

from __future__ import annotations

import numpy as np
import torch

from klotski.errors import KlotskiError
from klotski.models.spec import ModelSpec
from klotski.prefetch.predictor import CorrelationPredictor, FrequencyPredictor, Predictor
from klotski.prefetch.table import CorrelationTable
from klotski.prefetch.trace import RoutingRecorder
from klotski.runtime.pipeline import HotPredictor


def moe_index(spec: ModelSpec) -> dict[int, int]:
    """Model layer -> MoE-layer ordinal (the table's and the trace's layer numbers)."""
    return {layer: i for i, layer in enumerate(l for l in range(spec.num_layers) if spec.moe_layers[l])}


def _paths(ids: torch.Tensor | None) -> np.ndarray | None:
    """The previous MoE layer's choices [T, K] as the prefetcher's paths [T, 1, K]."""
    return None if ids is None else ids.cpu().numpy()[:, None, :].astype(np.int64)


class PipelinePredictor(HotPredictor):
    """Drives the pipeline's hot experts from a prefetch predictor (online updates, never saved)."""

    def __init__(self, spec: ModelSpec, predictor: Predictor):
        self.index = moe_index(spec)
        self.predictor = predictor
        self.top_k = spec.top_k

    def predict(self, layer: int, prev_ids: torch.Tensor | None, k: int) -> list[int]:
        return self.predictor.predict(self.index[layer], _paths(prev_ids), k)

    def observe(self, layer: int, prev_ids: torch.Tensor | None, ids: torch.Tensor) -> None:
        self.predictor.observe(self.index[layer], _paths(prev_ids), ids.cpu().numpy())

    def likely(self, layer: int, prev_ids: torch.Tensor | None, tokens: int, threshold: float) -> list[int]:
        """Experts the group uses with probability >= threshold: each token makes top_k picks from its
        own predicted distribution (its path's row), independently of the others. A pick with
        replacement, 1 - (1 - q)^top_k per token, errs low, so a guess is not read on a hunch."""
        paths = _paths(prev_ids)
        scores = np.asarray(
            self.predictor.token_scores(self.index[layer], paths, tokens if paths is None else len(paths)),
            dtype=np.float64,
        )  # [T, E]
        totals = scores.sum(axis=1, keepdims=True)
        if not totals.any():
            return []
        q = np.clip(scores / np.where(totals > 0, totals, 1.0), 0.0, 1.0 - 1e-12)  # [T, E]
        used = 1.0 - np.exp(self.top_k * np.log1p(-q).sum(axis=0))  # [E]
        order = np.argsort(-scores.sum(axis=0), kind="stable")
        return [int(e) for e in order if used[e] >= threshold]


def make_predictor(spec: ModelSpec, table: CorrelationTable | None) -> PipelinePredictor:
    """The correlation predictor over a calibrated table, else frequencies learnt online."""
    layers = len(moe_index(spec))
    if table is None:
        return PipelinePredictor(spec, FrequencyPredictor(CorrelationTable.empty(layers, spec.num_experts, spec.top_k)))
    if table.num_layers < layers or table.num_experts != spec.num_experts:
        raise KlotskiError(
            f"the prefetch table has {table.num_layers} layers x {table.num_experts} experts but the model "
            f"has {layers} MoE layers x {spec.num_experts} experts; calibrate one for this model"
        )
    private = table.copy()
    # A deeper table (a real model's, driving a checkpoint cut to its first layers) serves its first layers.
    private.counts = private.counts[:layers]
    return PipelinePredictor(spec, CorrelationPredictor(private))


class RoutingRecording:
    """A pipeline routing hook that records every token's experts into a RoutingRecorder."""

    def __init__(self, spec: ModelSpec):
        self.index = moe_index(spec)
        self.recorder = RoutingRecorder(len(self.index), spec.top_k, spec.num_experts)

    def __call__(self, layer: int, batch, gate) -> torch.Tensor:
        valid = batch.valid.cpu()
        seq_ids = batch.seq_ids[:, None].expand_as(valid)[valid]
        positions = batch.step.positions.cpu()[valid]
        self.recorder.record(self.index[layer], seq_ids, positions, batch.prefill, gate.ids)
        return gate.ids
