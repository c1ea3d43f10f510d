"""Building the store a configuration asks for: all resident without a budget, else tiered."""

from __future__ import annotations

import torch

from klotski.checkpoint.reader import Checkpoint
from klotski.config import EngineConfig
from klotski.models.spec import WeightKey
from klotski.store.base import ResidentStore, WeightStore
from klotski.store.offload import OffloadDir, default_offload_dir
from klotski.store.placement import greedy_placement, inflight_parts, working_set
from klotski.store.pool import TierPool
from klotski.store.tiered import TieredStore
from klotski.store.tiers import DEVICE, DISK, HOST
from klotski.timeline import Timeline


def host_budget(host_memory: int | None, device: torch.device) -> int | None:
    """The host tier's budget: the one given; else 0 without a GPU (the device tier is host RAM
    already: a separate host tier would count RAM twice), unlimited beside one."""
    if host_memory is not None:
        return host_memory
    return 0 if device.type == "cpu" else None


def open_store(
    checkpoint: Checkpoint, config: EngineConfig, device: torch.device, placement: dict[WeightKey, str] | None = None
) -> WeightStore:
    """All resident when no budget is given; else device / host / disk tiers under the budgets, with
    `placement` (the planner's) or a greedy one."""
    if not config.budgeted:
        return ResidentStore(checkpoint, device)
    spec = checkpoint.spec
    unit_bytes = {k: checkpoint.unit_nbytes(k) for k in spec.weight_keys()}
    host = host_budget(config.host_memory, device)
    k = spec.top_k if config.num_hot is None else config.num_hot
    if placement is None:
        dense, experts = inflight_parts(spec, unit_bytes, k)
        placement = greedy_placement(spec, unit_bytes, config.device_memory, host, experts, dense)
    reserve = working_set(spec, unit_bytes, k, placement)
    offload = None
    # On CUDA host-placed units are copied in per use, from their blobs held in pinned memory.
    if DISK in placement.values() or (device.type == "cuda" and HOST in placement.values()):
        offload = OffloadDir.prepare(checkpoint, config.offload_dir or default_offload_dir(checkpoint), progress=True)
    return TieredStore(
        checkpoint,
        offload,
        placement,
        TierPool(DEVICE, config.device_memory, device),
        TierPool(HOST, host),
        Timeline(enabled=False),
        device=device,
        reserve=0 if DISK not in placement.values() else reserve,
    )
