"""A sweep's output folder: finished runs kept durably, merged into one results table.

Layout of ``OUT/``:

- ``config.toml``: the resolved configuration (``moesim sweep OUT/config.toml`` reruns it).
- ``parts/part-*.parquet``: rows of finished runs, one file per finished task, each written
  atomically (a temporary file renamed into place), so an interrupted sweep loses at most the
  tasks that were running; a rerun skips every ``run_key`` found here.
- ``results.parquet``: every grid point's row, in grid order, merged from the parts at the end
  (atomically too).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from simulator.config import SimConfig, config_to_toml
from traces.errors import ConfigError
from traces.io import atomic_path

_F, _I = pa.float64(), pa.int64()
#: Column types fixed whatever the values (columns that may be all null in a part, and lists).
COLUMN_TYPES = {
    **{k: _F for k in ("hit_rate", "cache_fraction", "stall_s", "late_prefetch_stall_s",
                       "total_s", "compute_s", "link_busy", "prefill_s_per_token",
                       "decode_s_per_token", "decode_step_s", "kernel_s", "bandwidth_gbps",
                       "latency_s", "dense_s", "dense_per_token_s", "expert_s",
                       "expert_per_token_s", "gpu_hbm_gbps", "gpu_tflops", "expert_bytes")},
    "horizon": _I,
    "engines": _I,
    "hit_rate_per_layer": pa.list_(_F),
    "stall_s_per_layer": pa.list_(_F),
    "pinned": pa.list_(pa.string()),
}  # fmt: skip


class Store:
    """The output folder of one sweep."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"output.folder: {self.folder} exists and is not a folder")

    @property
    def results(self) -> Path:
        return self.folder / "results.parquet"

    def write_config(self, cfg: SimConfig) -> Path:
        path = self.folder / "config.toml"
        with atomic_path(path) as tmp:
            tmp.write_text(config_to_toml(cfg))
        return path

    def clear_parts(self) -> None:
        for f in self._part_files():
            f.unlink()

    def _part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        for stale in self.parts.glob(".part-*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        return sorted(self.parts.glob("part-*.parquet"))

    def done_keys(self) -> set[str]:
        """run_keys of the rows already stored."""
        keys: set[str] = set()
        for f in self._part_files():
            keys.update(pq.read_table(f, columns=["run_key"])["run_key"].to_pylist())
        return keys

    def write_part(self, rows: list[dict]) -> Path:
        """Store finished rows durably (one new part file, written atomically)."""
        table = to_table(rows)
        name = hashlib.sha1("".join(r["run_key"] for r in rows).encode()).hexdigest()[:16]
        path = self.parts / f"part-{name}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def merge(self, keys: list[str]) -> Path:
        """Write results.parquet: the stored row of each of ``keys``, in that order (rows of
        other grids kept in parts/ are left out)."""
        order = {k: i for i, k in enumerate(keys)}
        tables = [pq.read_table(f) for f in self._part_files()]
        if tables:
            table = pa.concat_tables(tables, promote_options="default")
        else:
            table = to_table([])
        picked: dict[int, int] = {}
        for row, k in enumerate(table["run_key"].to_pylist() if table.num_rows else []):
            i = order.get(k)
            if i is not None and i not in picked:
                picked[i] = row
        table = _fix_types(table.take([picked[i] for i in sorted(picked)]))
        with atomic_path(self.results) as tmp:
            pq.write_table(table, tmp)
        return self.results


def to_table(rows: list[dict]) -> pa.Table:
    """Rows as an Arrow table with the fixed column types."""
    if not rows:
        return pa.table({"run_key": pa.array([], pa.string())})
    return _fix_types(pa.Table.from_pylist(rows))


def _fix_types(table: pa.Table) -> pa.Table:
    for name, typ in COLUMN_TYPES.items():
        i = table.schema.get_field_index(name)
        if i >= 0 and table.schema.field(i).type != typ:
            table = table.set_column(i, name, table.column(i).cast(typ))
    return table
