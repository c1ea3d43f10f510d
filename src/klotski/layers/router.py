"""Routers: router logits -> (top-k expert ids, their weights) per token."""

from __future__ import annotations

import torch

from klotski.models.spec import RouterSpec

# T = tokens, E = experts, K = top_k, G = groups


def route(
    spec: RouterSpec, logits: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids [T, K] and weights [T, K] (fp32) from router logits [T, E].

    Order as the references: score, (bias,) group mask, top-k, gather, renormalise, then scale.
    """
    logits = logits.float()
    scores = torch.sigmoid(logits) if spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias.float()  # V3: the bias steers selection only
    if spec.num_groups > 1:
        keep = _group_mask(spec, choice)
        if spec.scoring == "softmax":
            # V2 zeroes the scores outside the kept groups: a pick from there (top_k larger than the
            # kept experts) weighs 0. V3 only hides them from selection, with -inf.
            scores, choice = scores.masked_fill(~keep, 0.0), choice.masked_fill(~keep, 0.0)
        else:
            choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, spec.top_k, dim=-1, sorted=True).indices
    weights = scores.gather(-1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return ids, weights * spec.routed_scaling_factor


def _group_mask(spec: RouterSpec, choice: torch.Tensor) -> torch.Tensor:
    """Boolean [T, E]: experts inside the best `topk_groups` groups (DeepSeek's group-limited routing)."""
    t, e = choice.shape
    grouped = choice.view(t, spec.num_groups, e // spec.num_groups)  # [T, G, E/G]
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of each group's best two
    else:
        group_scores = grouped.max(dim=-1).values  # V2: each group's best expert
    best = group_scores.topk(spec.topk_groups, dim=-1, sorted=False).indices  # [T, topk_groups]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return keep[:, :, None].expand_as(grouped).reshape(t, e)
