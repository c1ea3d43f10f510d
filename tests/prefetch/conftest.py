"""Shared fixtures for the prefetcher tests: small real-table traces, built once."""

from __future__ import annotations

import pytest

from klotski.prefetch.synthetic import sample_markov_trace
from klotski.prefetch.table import CorrelationTable, bundled_table
from klotski.prefetch.trace import RoutingTrace


@pytest.fixture(scope="session")
def mixtral_table() -> CorrelationTable:
    """The authors' real Mixtral-8x7B table (bundled copy)."""
    return bundled_table("mixtral-8x7b")


@pytest.fixture(scope="session")
def markov_trace(mixtral_table: CorrelationTable) -> RoutingTrace:
    """A realistic synthetic trace: 400 sequences x 2 tokens sampled from the real table."""
    return sample_markov_trace(mixtral_table, num_seqs=400, tokens_per_seq=2, seed=7)
