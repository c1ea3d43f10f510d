"""CorrelationTable: authors' import, own format round trip, counting from traces, bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from klotski.errors import KlotskiError
from klotski.prefetch.table import CorrelationTable, bundled_table, load_table
from klotski.prefetch.trace import RoutingTrace

TABLES = Path(__file__).resolve().parents[2] / "src/klotski/data/klotski-tables"


def tiny_trace() -> RoutingTrace:
    """Two tokens, three layers, top-2, four experts."""
    ids = np.array([[[0, 1], [2, 3], [0, 2]], [[0, 2], [2, 1], [3, 0]]])
    return RoutingTrace(ids, [0, 0], [0, 1], [False, False], num_experts=4)


def test_imports_real_8x7b_table(mixtral_table: CorrelationTable) -> None:
    t = mixtral_table
    assert (t.num_layers, t.num_experts, t.top_k, t.path_length) == (32, 8, 2, 1)
    assert t.counts[0].sum() == 32256
    assert t.counts[1][0, 1] == 833 and t.counts[1][5, 0] == 4501
    assert bundled_table("mixtral-8x22b").num_layers == 56


@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b"])
def test_bundled_tables_are_the_authors_files_unchanged(name: str) -> None:
    """The bundled copies hash as their README records, and every layer >= 1 counts top_k x top_k
    pairs for each token layer 0 counted (top_k selections each): nothing was lost on import."""
    file = f"{name.replace('-', '')}_expert_path.json"
    row = next(line for line in (TABLES / "README.md").read_text().splitlines() if line.startswith(f"| {file} "))
    assert hashlib.sha256((TABLES / file).read_bytes()).hexdigest() == row.rstrip(" |").split()[-1]
    t = bundled_table(name)
    assert {int(c.sum()) for c in t.counts[1:]} == {int(t.counts[0].sum()) * t.top_k}


def test_from_trace_counts_every_pair() -> None:
    t = CorrelationTable.from_trace(tiny_trace())
    assert t.counts[0].tolist() == [2, 1, 1, 0]
    # Token 0 goes {0,1} -> {2,3}; token 1 goes {0,2} -> {2,1}: 4 pairs each.
    assert t.counts[1][0].tolist() == [0, 1, 2, 1]
    assert t.counts[1].sum() == 8


def test_path_length_two_shapes_and_counts() -> None:
    t = CorrelationTable.from_trace(tiny_trace(), l=2)
    assert [c.shape for c in t.counts] == [(4,), (4, 4), (4, 4, 4)]
    assert t.counts[2].sum() == 16  # 2 tokens x 2^3 combinations
    assert t.counts[2][0, 2, 0] == 1 + 1  # token 0 via (0,2)->0 and token 1 via (0,2)->0


@pytest.mark.parametrize("l", [1, 2])
def test_save_load_round_trip(tmp_path: Path, l: int) -> None:
    t = CorrelationTable.from_trace(tiny_trace(), l=l, model="tiny", calibrated_on="unit test")
    t.save(tmp_path / "t.json")
    back = CorrelationTable.load(tmp_path / "t.json")
    assert (back.path_length, back.model, back.calibrated_on, back.top_k) == (l, "tiny", "unit test", 2)
    assert all(np.array_equal(a, b) for a, b in zip(t.counts, back.counts))
    assert load_table(tmp_path / "t.json").path_length == l


def test_load_table_detects_authors_format(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"0": {"0": 3, "1": 1}, "1": {"0": {"0": 1, "1": 2}}}))
    t = load_table(path)
    assert t.counts[1].tolist() == [[1, 2], [0, 0]]


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a Klotski correlation table"),
        ('{"format": "klotski-correlation-table", "version": 9}', "version"),
        ('{"format": "klotski-correlation-table", "version": 1, "top_k": 2}', "missing"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(KlotskiError, match=words):
        CorrelationTable.load(tmp_path / "bad.json")


def test_shape_mismatch_is_rejected(tmp_path: Path) -> None:
    data = CorrelationTable.from_trace(tiny_trace()).to_dict()
    data["counts"][1] = [[1, 2], [3, 4]]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(KlotskiError, match="shape"):
        CorrelationTable.load(tmp_path / "bad.json")


def test_missing_file_and_bad_authors_table(tmp_path: Path) -> None:
    with pytest.raises(KlotskiError, match="not found"):
        load_table(tmp_path / "nope.json")
    (tmp_path / "a.json").write_text(json.dumps({"0": {"0": 1}, "2": {}}))
    with pytest.raises(KlotskiError, match="without gaps"):
        load_table(tmp_path / "a.json")
