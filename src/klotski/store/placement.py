"""Greedy placement (when bs and n are both given; else the planner places): fill the device budget,
then host, then disk.

Units that every token needs (head, attention, gates) go first, then experts layer by layer,
then the embedding table (of which a step reads only its tokens' rows). Room for the units in
flight is kept free on the device (the same for every schedule).
"""

from __future__ import annotations

from klotski.models.spec import ATTN, EMBED, EXPERT, HEAD, MOE, ModelSpec, WeightKey
from klotski.store.tiers import DEVICE, DISK, HOST


def placement_order(spec: ModelSpec) -> list[WeightKey]:
    """Units by how much keeping them resident saves: dense parts first, then experts by layer,
    the embedding table last (off the device only the rows a step looks up are read: a few KB a
    token, where any other unit off the device is read whole every step)."""
    keys = spec.weight_keys()
    dense = [k for k in keys if k.part in (HEAD, ATTN, MOE)]
    return dense + [k for k in keys if k.part == EXPERT] + [k for k in keys if k.part == EMBED]


MIN_INFLIGHT_BYTES = 256 * 2**20  # small experts: enough reads queued to keep the disk busy


def inflight_experts(spec: ModelSpec, num_hot: int, expert_bytes: int) -> int:
    """Expert buffers kept free for fetches: two, or as many as make 256 MiB, at most max(K, top_k) + 2.

    Two suffice for large experts: the pipeline holds one expert at a time (a token's top_k
    outputs are summed slot by slot), and in an I/O-bound step compute is short next to a read,
    so the buffer it frees starts the next read while the other is still arriving (two reads in
    flight, what the disk needs). Every extra buffer is an expert that could have stayed resident
    instead of being read again each step (Mixtral-8x7B: 336 MiB each). Small experts read in
    short requests, where more in flight hides latency, and cost little room.
    """
    cap = max(num_hot, spec.top_k) + 2
    if expert_bytes <= 0:
        return cap
    return min(cap, max(2, -(-MIN_INFLIGHT_BYTES // expert_bytes)))


def inflight_parts(spec: ModelSpec, unit_bytes: dict[WeightKey, int], num_hot: int) -> tuple[int, int]:
    """(dense, experts): device bytes kept free for units in flight.

    dense: a layer's gate part and attention and the next layer's attention (or the head, if
    larger), needed only when some dense unit is not resident. experts: `inflight_experts` of the largest expert.

    The same for every rung of the ladder, so rungs differ in scheduling, not in placement: a
    schedule that wants more in flight (overlap's whole next layer) gets what the budget leaves,
    and the store makes the rest wait its turn.
    """
    layer = max(range(spec.num_layers), key=lambda l: _layer_bytes(spec, unit_bytes, l))
    expert = max((b for k, b in unit_bytes.items() if k.part == EXPERT), default=0)
    # The head streams alone (after the last layer), the rest two at a time; either must fit.
    dense = max(
        2 * unit_bytes[WeightKey(layer, ATTN)] + unit_bytes[WeightKey(layer, MOE)],
        unit_bytes.get(WeightKey(None, HEAD), 0),
    )
    # Fewer hot experts than top_k (0: no hot prefetch) leave the room to the cold stream, so the
    # placement, and with it the bytes read, stays that of top_k: K changes scheduling only.
    return dense, inflight_experts(spec, num_hot, expert) * expert


def working_set(
    spec: ModelSpec, unit_bytes: dict[WeightKey, int], num_hot: int, placement: dict[WeightKey, str] | None = None
) -> int:
    """Device bytes kept free for units in flight under `placement` (None: assume dense units stream too)."""
    dense, experts = inflight_parts(spec, unit_bytes, num_hot)
    return experts + (0 if placement is not None and dense_resident(spec, placement) else dense)


def dense_resident(spec: ModelSpec, placement: dict[WeightKey, str]) -> bool:
    """Attention, gates and head all sit on the device: none of them is ever fetched (the
    embedding table never is: its rows are read where it sits)."""
    return all(placement.get(k, DEVICE) == DEVICE for k in spec.weight_keys() if k.part not in (EXPERT, EMBED))


def _layer_bytes(spec: ModelSpec, unit_bytes: dict[WeightKey, int], layer: int) -> int:
    return sum(b for k, b in unit_bytes.items() if k.layer == layer)


def greedy_placement(
    spec: ModelSpec,
    unit_bytes: dict[WeightKey, int],
    device_budget: int | None,
    host_budget: int | None,
    reserve: int,
    dense_reserve: int = 0,
) -> dict[WeightKey, str]:
    """Tier per unit: device while it fits (leaving `reserve` free), then host, then disk.

    `dense_reserve` is kept free as well only when some dense unit ends up off the device (then
    attention and gates stream too and need room in flight); when all of them are resident that
    room holds experts instead.
    """
    placement = _fill(spec, unit_bytes, device_budget, host_budget, reserve)
    if dense_reserve and not dense_resident(spec, placement):
        placement = _fill(spec, unit_bytes, device_budget, host_budget, reserve + dense_reserve)
    return placement


def _fill(spec, unit_bytes, device_budget, host_budget, reserve) -> dict[WeightKey, str]:
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
