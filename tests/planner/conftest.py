"""Planner fixtures: a tiny model's shape, and an I/O-bound profile where bubbles are visible."""

from __future__ import annotations

import pytest
import torch

from klotski.planner.cost import OpCosts
from klotski.planner.profile import HardwareProfile
from klotski.planner.shapes import shape_from_preset


@pytest.fixture(scope="session")
def tiny_shape():
    """Tiny Mixtral shapes: 3 layers, 8 experts, top-2 (config.json only, no weights)."""
    return shape_from_preset("tiny", layers=3)


@pytest.fixture(scope="session")
def io_bound() -> HardwareProfile:
    """A CPU-like profile whose disk is slow next to compute (expert reads dominate)."""
    return HardwareProfile(
        "io-bound test",
        "test",
        "cpu",
        disk_gbps=0.01,
        host_to_device_gbps=None,
        peak_tflops=0.01,
        efficiency=1.0,
        memory_gbps=5.0,
        op_overhead_s=1e-4,
        io_latency_s=0.0,
    )


@pytest.fixture(scope="session")
def io_costs(tiny_shape, io_bound) -> OpCosts:
    return OpCosts(tiny_shape, io_bound, torch.float32)
