"""Shared fixtures: tiny random-weight checkpoints written by transformers (the reference) or by us."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (no example database, no clock): a failure
# in CI is reproducible here, and a green run never depends on luck. KLOTSKI_HYPOTHESIS=explore
# draws fresh examples when hunting for bugs.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("KLOTSKI_HYPOTHESIS", "ci"))

# KLOTSKI_TEST_THREADS=1 on a crowded machine: at 2 threads OpenMP barriers starve when the cores are busy.
torch.set_num_threads(int(os.environ.get("KLOTSKI_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _klotski_home(tmp_path_factory, monkeypatch):
    """Keep the default model's cache inside the test session, never in ~/.cache."""
    home = os.environ.get("KLOTSKI_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "klotski-home")
    monkeypatch.setenv("KLOTSKI_HOME", home)


@pytest.fixture(autouse=True)
def _deterministic_compute_dtype(request, monkeypatch):
    """dtype="auto" on CPU times two matmuls to choose; tests must not depend on timing, so they
    compute low-precision checkpoints in their own dtype (what that timing picks on this machine).
    tests/runtime/test_compute_dtype.py covers the choice itself."""
    from klotski.runtime import compute_dtype

    if request.node.get_closest_marker("real_timing") is None:
        monkeypatch.setattr(compute_dtype, "measure", lambda storage: {"native": 0.0, "upcast_fp32": 1.0})
        native = {"native": 0.0, "upcast_fp32": 1.0}
        monkeypatch.setattr(compute_dtype, "measure_expert", lambda *a: {"decode": native, "prefill": native})
    compute_dtype.cpu_compute_dtype.cache_clear()
    compute_dtype.prefill_expert_dtype.cache_clear()
    yield
    compute_dtype.cpu_compute_dtype.cache_clear()
    compute_dtype.prefill_expert_dtype.cache_clear()


@pytest.fixture(autouse=True)
def _deterministic_profile(request, monkeypatch):
    """A first plan or budgeted run measures this machine's profile (planner/api.py); the plans
    tests assert must not depend on timing, so the automatic profile is the built-in estimate's
    figures here (cached as any measurement is). Tests marked real_timing measure for real;
    tests/planner/test_auto_profile.py covers the measuring and the cache."""
    from klotski.planner import api
    from klotski.planner.profile import builtin_estimate

    if request.node.get_closest_marker("real_timing") is None:

        def stub(shape, dtype, device, disk_dir):
            profile = builtin_estimate(device, dtype)
            profile.name, profile.source = "test stub", "test stub (built-in figures)"
            return profile

        monkeypatch.setattr(api, "measure_quick", stub)


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A tiny random Mixtral checkpoint written by create-model (bf16, hub layout)."""
    from klotski.commands.create_model import create_model

    return create_model(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral", "tiny", dtype="float32")
