"""Greedy placement (until the planner decides): fill the device budget, then host, then disk.

Units that every token needs (embeddings, head, attention, gates) go first, then experts layer
by layer. Room for the units in flight is kept free on the device (the same for every schedule).
"""
from __future__ import annotations

from klotski.models.spec import ATTN, EMBED, EXPERT, HEAD, MOE, ModelSpec, WeightKey

DEVICE, HOST, DISK = "device", "host", "disk"


def placement_order(spec: ModelSpec) -> list[WeightKey]:
    """Units by how much keeping them resident saves: dense parts first, then experts by layer."""
    keys = spec.weight_keys()
    dense = [k for k in keys if k.part in (EMBED, HEAD, ATTN, MOE)]
    return dense + [k for k in keys if k.part == EXPERT]


def working_set(spec: ModelSpec, unit_bytes: dict[WeightKey, int], num_hot: int) -> int:
    """Device bytes kept free for units in flight: a layer's gate part and attention, the next
    layer's attention, and max(K, top_k) + 2 experts (the hot ones and two cold ones streaming).

    The same for every rung of the ladder, so rungs differ in scheduling, not in placement: a
    schedule that wants more in flight (overlap's whole next layer) gets what the budget leaves,
    and the store makes the rest wait its turn.
    """
    layer = max(range(spec.num_layers), key=lambda l: _layer_bytes(spec, unit_bytes, l))
    expert = max((b for k, b in unit_bytes.items() if k.part == EXPERT), default=0)
    dense = unit_bytes[WeightKey(layer, ATTN)] + unit_bytes[WeightKey(layer, MOE)]
    # Fewer hot experts than top_k (0: no hot prefetch) leave the room to the cold stream, so the
    # placement, and with it the bytes read, stays that of top_k: K changes scheduling only.
    return dense + unit_bytes[WeightKey(layer, ATTN)] + (max(num_hot, spec.top_k) + 2) * expert


def _layer_bytes(spec: ModelSpec, unit_bytes: dict[WeightKey, int], layer: int) -> int:
    return sum(b for k, b in unit_bytes.items() if k.layer == layer)


def greedy_placement(spec: ModelSpec, unit_bytes: dict[WeightKey, int], device_budget: int | None,
                     host_budget: int | None, reserve: int) -> dict[WeightKey, str]:
    """Tier per unit: device while it fits (leaving `reserve` free), then host, then disk."""
    free = {DEVICE: None if device_budget is None else device_budget - reserve, HOST: host_budget}
    placement = {}
    for key in placement_order(spec):
        nbytes = unit_bytes[key]
        for tier in (DEVICE, HOST):
            if free[tier] is None or free[tier] >= nbytes:
                placement[key] = tier
                if free[tier] is not None:
                    free[tier] -= nbytes
                break
        else:
            placement[key] = DISK
    return placement


def summarize(placement: dict[WeightKey, str], unit_bytes: dict[WeightKey, int]) -> dict:
    """Bytes and unit counts per tier and per kind of tensor."""
    out: dict = {}
    for key, tier in placement.items():
        kind = out.setdefault(key.part, {})
        slot = kind.setdefault(tier, {"units": 0, "bytes": 0})
        slot["units"] += 1
        slot["bytes"] += unit_bytes[key]
    return out
