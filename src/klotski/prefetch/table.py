"""Expert correlation table: how often a path of earlier experts leads to each expert next.

Legend: E = experts, L = layers, l = path length, K = top_k, T = tokens.
Layer 0 holds overall frequency [E]. Layer i >= 1 holds counts indexed by the token's experts at
the previous m = min(l, i) layers (oldest first) and then the current expert: shape [E] * (m + 1).
Each token contributes every combination of its top-k choices, K ** (m + 1) counts, which for
l = 1 is the authors' "top-k x top-k pairs".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from klotski.errors import KlotskiError

if TYPE_CHECKING:
    from klotski.prefetch.trace import RoutingTrace

FORMAT_NAME = "klotski-correlation-table"
FORMAT_VERSION = 1
# Name of a table kept in a model's offload directory, picked up without a flag.
TABLE_FILENAME = "prefetch_table.json"
# Dense tables grow as E ** (l + 1) per layer; past this many cells a longer path is not worth it.
MAX_CELLS = 1 << 26
# The authors' tables shipped inside the package (Apache-2.0, see data/klotski-tables/README.md).
BUNDLED_TABLES = {
    "mixtral-8x7b": "mixtral8x7b_expert_path.json",
    "mixtral-8x22b": "mixtral8x22b_expert_path.json",
}


@dataclass
class CorrelationTable:
    """Per-layer counts from a path of previous experts to the current layer's experts."""

    counts: list[np.ndarray]  # counts[i]: float64, shape [E] * (min(l, i) + 1)
    top_k: int
    path_length: int = 1
    model: str = ""
    calibrated_on: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path_length < 1:
            raise KlotskiError(f"path length must be >= 1, got {self.path_length}")
        if self.top_k < 1:
            raise KlotskiError(f"top_k must be >= 1, got {self.top_k}")
        check_cells(self.num_experts, self.path_length, self.num_layers)
        for layer, arr in enumerate(self.counts):
            want = (self.num_experts,) * (self.path_len_at(layer) + 1)
            if arr.shape != want:
                raise KlotskiError(f"table layer {layer} has shape {arr.shape}, expected {want}")

    @property
    def num_layers(self) -> int:
        """Number of MoE layers the table covers."""
        return len(self.counts)

    @property
    def num_experts(self) -> int:
        """Routed experts per layer."""
        return int(self.counts[0].shape[0])

    def path_len_at(self, layer: int) -> int:
        """How many previous layers key the counts of `layer` (0 at layer 0)."""
        return min(self.path_length, layer)

    def frequency(self, layer: int) -> np.ndarray:
        """How often each expert was selected at `layer`, summed over paths: [E]."""
        arr = self.counts[layer]
        return arr.reshape(-1, self.num_experts).sum(axis=0)

    def transition(self, layer: int) -> np.ndarray:
        """Counts from the previous layer's expert alone to this layer's: [E, E]."""
        arr = self.counts[layer]
        # Longer paths marginalise to one step: sum out every older layer.
        return arr.sum(axis=tuple(range(arr.ndim - 2))) if arr.ndim > 2 else arr

    def copy(self) -> CorrelationTable:
        """A private copy whose counts can be updated online without touching this one."""
        return CorrelationTable(
            [c.copy() for c in self.counts],
            self.top_k,
            self.path_length,
            self.model,
            self.calibrated_on,
            dict(self.extra),
        )

    def add(self, layer: int, prev_experts: np.ndarray | None, cur_experts: np.ndarray) -> None:
        """Count tokens' routing at `layer`: prev [T, m', K] (oldest first), cur [T, K]."""
        cur = np.asarray(cur_experts, dtype=np.int64)
        m = self.path_len_at(layer)
        if m == 0:
            self.counts[0] += np.bincount(cur.ravel(), minlength=self.num_experts)
            return
        if prev_experts is None or np.asarray(prev_experts).shape[1] < m:
            raise ValueError(f"layer {layer} needs the experts of the previous {m} layers")
        prev = np.asarray(prev_experts, dtype=np.int64)[:, -m:, :]
        flat = _path_flat_index(np.concatenate([prev, cur[:, None, :]], axis=1), self.num_experts)
        self.counts[layer] += np.bincount(flat, minlength=self.num_experts ** (m + 1)).reshape(self.counts[layer].shape)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        num_layers: int,
        num_experts: int,
        top_k: int,
        path_length: int = 1,
        model: str = "",
        calibrated_on: str = "",
    ) -> CorrelationTable:
        """A table of zeros with the right shapes."""
        check_cells(num_experts, path_length, num_layers)
        counts = [np.zeros((num_experts,) * (min(path_length, i) + 1)) for i in range(num_layers)]
        return cls(counts, top_k, path_length, model, calibrated_on)

    @classmethod
    def from_trace(
        cls, trace: RoutingTrace, l: int = 1, num_experts: int | None = None, model: str = "", calibrated_on: str = ""
    ) -> CorrelationTable:
        """Count every token's routing in a trace into a table with path length `l`."""
        ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
        if num_experts is None:
            num_experts = trace.num_experts or int(ids.max()) + 1
        if ids.size and ids.max() >= num_experts:
            raise KlotskiError(f"trace has expert id {ids.max()} but num_experts is {num_experts}")
        table = cls.empty(ids.shape[1], num_experts, ids.shape[2], l, model, calibrated_on)
        for layer in range(table.num_layers):
            m = table.path_len_at(layer)
            table.add(layer, ids[:, layer - m : layer, :] if m else None, ids[:, layer, :])
        return table

    @classmethod
    def from_authors_json(cls, path: str | Path, top_k: int = 2) -> CorrelationTable:
        """Import the Klotski authors' `{layer: {prev: {cur: count}}}` JSON (path length 1)."""
        path = Path(path)
        data = _read_json(path)
        return cls.from_authors_dict(
            data,
            top_k,
            model=path.stem.replace("_expert_path", ""),
            calibrated_on=f"authors' warm-up run, imported from {path.name}",
        )

    @classmethod
    def from_authors_dict(cls, data: Any, top_k: int = 2, model: str = "", calibrated_on: str = "") -> CorrelationTable:
        """Build from the authors' format already parsed from JSON."""
        if not isinstance(data, dict) or "0" not in data:
            raise KlotskiError(
                "not an authors' table: expected a JSON object keyed by layer "
                "'0', '1', ...; pass a table written by `klotski calibrate`"
            )
        num_layers = len(data)
        if sorted(data, key=_int_key) != [str(i) for i in range(num_layers)]:
            raise KlotskiError(f"authors' table layers must be '0'..'{num_layers - 1}' without gaps")
        freq = _dense_vector(data["0"], None, "layer 0")
        counts = [freq]
        for layer in range(1, num_layers):
            rows = data[str(layer)]
            if not isinstance(rows, dict):
                raise KlotskiError(f"authors' table layer {layer} is not an object of rows")
            mat = np.zeros((len(freq), len(freq)))
            for prev, row in rows.items():
                p = _expert_index(prev, len(freq), f"layer {layer}")
                mat[p] = _dense_vector(row, len(freq), f"layer {layer} row {prev}")
            counts.append(mat)
        return cls(counts, top_k, 1, model, calibrated_on)

    # ---- own JSON format ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The table as plain JSON-ready data in Klotski's own format."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": self.model,
            "calibrated_on": self.calibrated_on,
            "path_length": self.path_length,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "extra": self.extra,
            "counts": [_jsonable(c) for c in self.counts],
        }

    def save(self, path: str | Path) -> None:
        """Write the table as JSON (Klotski's format, which records l, model and calibration)."""
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CorrelationTable:
        """Read a table written by `save`; a bad file raises KlotskiError naming the fix."""
        data = _read_json(Path(path))
        try:
            return cls.from_dict(data)
        except KlotskiError as exc:
            raise KlotskiError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> CorrelationTable:
        """Parse and check Klotski's own format."""
        fix = "re-create it with `klotski calibrate`"
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise KlotskiError(
                f'not a Klotski correlation table (no "format": "{FORMAT_NAME}"); {fix}, or import the authors\' format'
            )
        if data.get("version") != FORMAT_VERSION:
            raise KlotskiError(f"table format version {data.get('version')!r} is not {FORMAT_VERSION}; {fix}")
        missing = [k for k in ("path_length", "num_layers", "num_experts", "top_k", "counts") if k not in data]
        if missing:
            raise KlotskiError(f"table is missing {', '.join(missing)}; {fix}")
        counts = [_counts_array(c, i) for i, c in enumerate(data["counts"])]
        table = cls(
            counts,
            int(data["top_k"]),
            int(data["path_length"]),
            str(data.get("model", "")),
            str(data.get("calibrated_on", "")),
            dict(data.get("extra", {})),
        )
        if (table.num_layers, table.num_experts) != (data["num_layers"], data["num_experts"]):
            raise KlotskiError(
                f"table header says {data['num_layers']} layers x "
                f"{data['num_experts']} experts but the counts hold "
                f"{table.num_layers} x {table.num_experts}; {fix}"
            )
        return table


def load_table(spec: str | Path, top_k: int = 2) -> CorrelationTable:
    """Open a table given a path (Klotski's or the authors' format) or a bundled name."""
    name = str(spec)
    if name in BUNDLED_TABLES and not Path(name).exists():
        return bundled_table(name, top_k)
    path = Path(spec)
    if not path.is_file():
        raise KlotskiError(
            f"table {path} not found; pass a file written by `klotski calibrate`, "
            f"an authors' JSON, or one of {', '.join(BUNDLED_TABLES)}"
        )
    data = _read_json(path)
    if isinstance(data, dict) and "format" in data:
        return CorrelationTable.load(path)
    try:
        return CorrelationTable.from_authors_json(path, top_k)
    except KlotskiError as exc:
        raise KlotskiError(f"{path}: {exc}") from None


def bundled_table(name: str, top_k: int = 2) -> CorrelationTable:
    """One of the authors' real Mixtral tables shipped with the package."""
    if name not in BUNDLED_TABLES:
        raise KlotskiError(f"no bundled table {name!r}; choose one of {', '.join(BUNDLED_TABLES)}")
    res = resources.files("klotski") / "data" / "klotski-tables" / BUNDLED_TABLES[name]
    data = json.loads(res.read_text())
    return CorrelationTable.from_authors_dict(
        data, top_k, model=name, calibrated_on=f"authors' warm-up run ({BUNDLED_TABLES[name]})"
    )


def find_model_table(model_dir: str | Path, override: str | Path | None = None) -> CorrelationTable | None:
    """The table to use for a model: `override` if given, else one saved beside its experts."""
    if override is not None:
        return load_table(override)
    path = Path(model_dir) / TABLE_FILENAME
    return CorrelationTable.load(path) if path.is_file() else None


def check_cells(num_experts: int, path_length: int, num_layers: int) -> None:
    """Refuse a dense table too large to hold (E ** (l + 1) cells per layer)."""
    cells = num_experts ** (path_length + 1) * max(num_layers, 1)
    if cells > MAX_CELLS:
        raise KlotskiError(
            f"a path length of {path_length} with {num_experts} experts needs "
            f"{cells:,} counters; use a shorter --path-length"
        )


def _path_flat_index(paths: np.ndarray, num_experts: int) -> np.ndarray:
    """Flat cell index of every combination of one choice per layer: [T, m, K] -> [T * K**m]."""
    tokens, m, _ = paths.shape
    flat = np.zeros((tokens, 1), dtype=np.int64)  # [T, C=1]
    for j in range(m):
        # Each further layer multiplies the combinations by K: [T, C] -> [T, C * K].
        flat = (flat[:, :, None] * num_experts + paths[:, j, None, :]).reshape(tokens, -1)
    return flat.ravel()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KlotskiError(f"table {path} not found; create one with `klotski calibrate`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KlotskiError(f"table {path} is not valid JSON ({exc}); re-create it with `klotski calibrate`") from None


def _int_key(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise KlotskiError(f"authors' table has a non-integer layer key {key!r}") from None


def _expert_index(key: str, num_experts: int, where: str) -> int:
    try:
        index = int(key)
    except ValueError:
        raise KlotskiError(f"authors' table {where}: expert key {key!r} is not an integer") from None
    if not 0 <= index < num_experts:
        raise KlotskiError(f"authors' table {where}: expert {index} outside 0..{num_experts - 1}")
    return index


def _dense_vector(obj: Any, num_experts: int | None, where: str) -> np.ndarray:
    """`{expert: count}` -> [E] counts; E taken from layer 0 when not yet known."""
    if not isinstance(obj, dict) or not obj:
        raise KlotskiError(f"authors' table {where} is not an object of expert counts")
    size = num_experts if num_experts is not None else max(int(k) for k in obj) + 1
    vec = np.zeros(size)
    for key, count in obj.items():
        if not isinstance(count, (int, float)) or count < 0:
            raise KlotskiError(f"authors' table {where}: count {count!r} is not a number >= 0")
        vec[_expert_index(key, size, where)] = count
    return vec


def _counts_array(obj: Any, layer: int) -> np.ndarray:
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise KlotskiError(f"table layer {layer} counts are not a regular numeric array") from None
    if arr.ndim == 0 or (arr < 0).any() or not np.isfinite(arr).all():
        raise KlotskiError(f"table layer {layer} counts must be finite numbers >= 0")
    return arr


def _jsonable(arr: np.ndarray) -> Any:
    # Integral counts stay integers so files diff cleanly and stay small.
    if np.all(arr == np.round(arr)):
        return arr.astype(np.int64).tolist()
    return arr.tolist()
