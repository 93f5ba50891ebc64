"""Reading and writing traces as Parquet, atomically, in row groups.

``read_trace`` turns a Parquet file (or a folder of them) into a validated :class:`Trace` of flat
numpy arrays. ``write_trace`` and :class:`TraceWriter` write to a temporary file beside the
target and rename it into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from traces.format import (
    META_KEY,
    OPTIONAL_COLUMNS,
    PRED_TYPE,
    REQUIRED_COLUMNS,
    TraceError,
    TraceMeta,
    arrow_schema,
    pred_column,
    pred_horizon,
)
from traces.trace import Trace
from traces.validate import validate_trace

#: Rows per Parquet row group: about 10-40 MB of trace per group.
ROW_GROUP_ROWS = 1 << 20


# --------------------------------------------------------------------------- files
def trace_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files making up a trace: the file itself, or a folder's *.parquet sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise TraceError(f"{p}: folder holds no *.parquet trace files")
        return files
    if not p.exists():
        raise TraceError(f"{p}: no such trace file")
    return [p]


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TraceError(f"{path}: not a readable Parquet file (truncated or corrupt?): {msg}") from None


def read_meta(path: str | os.PathLike) -> TraceMeta:
    """Only the metadata of a trace (cheap: reads the Parquet footer)."""
    first = trace_files(path)[0]
    return _meta_of(first, _open(first).schema_arrow)


def _meta_of(path: Path, schema: pa.Schema) -> TraceMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{path}: missing metadata key 'moesim' (not a moesim trace?)")
    return TraceMeta.from_json(raw, str(path))


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for name, typ in REQUIRED_COLUMNS.items():
        if name not in schema.names:
            raise TraceError(f"{path}: missing column '{name}' (expected {typ})")
    expected = dict(REQUIRED_COLUMNS) | dict(OPTIONAL_COLUMNS)
    for fld in schema:
        typ = expected.get(fld.name)
        if typ is None and pred_horizon(fld.name) is not None:
            typ = PRED_TYPE
        if typ is None:
            continue  # extra columns are allowed and ignored
        if not _compatible(fld.type, typ):
            raise TraceError(f"{path}: column '{fld.name}': expected {typ}, got {fld.type}")


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got == want:
        return True
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        if not (pa.types.is_list(got) or pa.types.is_large_list(got)):
            return False
        return _compatible(got.value_type, want.value_type)
    if pa.types.is_floating(want):
        return pa.types.is_floating(got)
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    return False


# --------------------------------------------------------------------------- reading
def read_trace(
    path: str | os.PathLike,
    *,
    columns: list[str] | None = None,
    load_text: bool = False,
    validate: bool = True,
) -> Trace:
    """Read a trace into flat arrays and validate it.

    Args:
        path: a ``.parquet`` file or a folder of them (read in name order, concatenated).
        columns: optional columns to load besides the required ones (default: all present
            except ``token``). ``pred_h{H}`` names select prediction horizons.
        load_text: also load the ``token`` text column (object array; slower).
        validate: run the row checks (leave on unless the file was just validated).

    Raises:
        TraceError: one line naming the file, column or key and what was expected.
    """
    files = trace_files(path)
    tables = []
    meta = None
    for f in files:
        pf = _open(f)
        schema = pf.schema_arrow
        m = _meta_of(f, schema)
        if meta is None:
            meta = m
        elif (m.num_layers, m.experts_per_layer, m.top_k) != (
            meta.num_layers,
            meta.experts_per_layer,
            meta.top_k,
        ):
            raise TraceError(f"{f}: metadata differs from {files[0].name} (layers/experts/top_k)")
        _check_schema(f, schema)
        wanted = list(REQUIRED_COLUMNS)
        present = set(schema.names)
        optional = [c for c in schema.names if c in OPTIONAL_COLUMNS or pred_horizon(c)]
        if columns is not None:
            optional = [c for c in optional if c in columns]
        if not load_text:
            optional = [c for c in optional if c != "token"]
        wanted += [c for c in optional if c in present]
        try:
            tables.append(pf.read(columns=wanted))
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceError(f"{f}: cannot read rows (truncated or corrupt?): {exc}") from None
    assert meta is not None
    if len(tables) > 1:
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except pa.ArrowInvalid as exc:
            raise TraceError(f"{path}: parts have different columns: {exc}") from None
    else:
        table = tables[0]
    trace = table_to_trace(table, meta, str(path))
    if validate:
        validate_trace(trace)
    return trace


def _int_column(table: pa.Table, name: str, dtype, where: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise TraceError(f"{where}: column '{name}': expected no nulls, found {col.null_count}")
    arr = col.to_numpy()
    if arr.dtype != dtype:
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise TraceError(f"{where}: column '{name}': values do not fit {np.dtype(dtype).name}")
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr)


def _list_column(
    table: pa.Table, name: str, dtype, where: str, allow_null: bool
) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name)
    if col.null_count and not allow_null:
        raise TraceError(f"{where}: column '{name}': expected no null lists, found {col.null_count}")
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        arr = pc.if_else(pc.is_null(arr), pa.scalar([], arr.type), arr)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    flat = arr.flatten()
    if flat.null_count:
        raise TraceError(f"{where}: column '{name}': expected no null elements inside lists")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    values = flat.to_numpy(zero_copy_only=False)
    if values.dtype != dtype:
        if np.issubdtype(np.dtype(dtype), np.integer) and values.size:
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                raise TraceError(
                    f"{where}: column '{name}': values do not fit {np.dtype(dtype).name}"
                )
        values = values.astype(dtype)
    return offsets, np.ascontiguousarray(values)


def table_to_trace(table: pa.Table, meta: TraceMeta, where: str = "<table>") -> Trace:
    """Convert an Arrow table in the trace schema to a (not yet validated) :class:`Trace`."""
    _check_schema(Path(where), table.schema)
    offsets, experts = _list_column(table, "experts", np.int16, where, allow_null=False)
    weights = None
    if "weights" in table.column_names:
        w_off, w = _list_column(table, "weights", np.float32, where, allow_null=False)
        if not np.array_equal(w_off, offsets):
            raise TraceError(f"{where}: column 'weights': expected one weight per routed expert")
        weights = w
    preds = {}
    for name in table.column_names:
        h = pred_horizon(name)
        if h is not None:
            preds[h] = _list_column(table, name, np.int16, where, allow_null=True)
    token_id = None
    if "token_id" in table.column_names:
        tcol = table.column("token_id")
        token_id = tcol.fill_null(-1).to_numpy().astype(np.int32)
    token = None
    if "token" in table.column_names:
        token = np.asarray(table.column("token").to_pylist(), dtype=object)
    return Trace(
        meta=meta,
        step=_int_column(table, "step", np.int64, where),
        seq=_int_column(table, "seq", np.int64, where),
        pos=_int_column(table, "pos", np.int32, where),
        phase=_int_column(table, "phase", np.int8, where),
        layer=_int_column(table, "layer", np.int16, where),
        offsets=offsets,
        experts=experts,
        weights=weights,
        token_id=token_id,
        token=token,
        preds=preds,
        path=where,
    )


def iter_batches(path: str | os.PathLike, rows: int = ROW_GROUP_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream a trace (file or folder) as Arrow record batches, for traces larger than memory."""
    for f in trace_files(path):
        pf = _open(f)
        _check_schema(f, pf.schema_arrow)
        yield from pf.iter_batches(batch_size=rows)


# --------------------------------------------------------------------------- writing
def _list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    if offsets[-1] > np.iinfo(np.int32).max:
        raise TraceError("a list column holds more than 2**31 values: write the trace in parts")
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values, type=typ.value_type)
    )


def trace_to_table(trace: Trace) -> pa.Table:
    """The Arrow table (with metadata) of an in-memory trace."""
    meta = trace.meta
    meta.pred_horizons = sorted(trace.preds)
    cols: dict[str, pa.Array] = {
        "step": pa.array(trace.step, pa.int64()),
        "seq": pa.array(trace.seq, pa.int64()),
        "pos": pa.array(trace.pos, pa.int32()),
        "phase": pa.array(trace.phase, pa.int8()),
        "layer": pa.array(trace.layer, pa.int16()),
        "experts": _list_array(trace.offsets, trace.experts, REQUIRED_COLUMNS["experts"]),
    }
    optional = []
    if trace.weights is not None:
        cols["weights"] = _list_array(trace.offsets, trace.weights, OPTIONAL_COLUMNS["weights"])
        optional.append("weights")
    if trace.token_id is not None:
        cols["token_id"] = pa.array(trace.token_id, pa.int32())
        optional.append("token_id")
    if trace.token is not None:
        cols["token"] = pa.array(list(trace.token), pa.string())
        optional.append("token")
    for h in sorted(trace.preds):
        offs, ids = trace.preds[h]
        cols[pred_column(h)] = _list_array(offs, ids, PRED_TYPE)
        optional.append(pred_column(h))
    schema = arrow_schema(meta, optional)
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def write_trace(trace: Trace, path: str | os.PathLike, *, validate: bool = True) -> Path:
    """Validate and write ``trace`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    if validate:
        saved = trace.path
        trace.path = str(path)
        try:
            validate_trace(trace)
        finally:
            trace.path = saved
    table = trace_to_table(trace)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    return path


class atomic_path:
    """Context manager yielding a temporary path beside ``path``; renamed onto it on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class TraceWriter:
    """Write a trace in batches (for importers and captures that stream rows).

    Rows are appended with :meth:`write` as Arrow tables or dicts of numpy arrays in the trace
    schema; :meth:`close` renames the finished file into place. Each batch is validated on its
    own plus the seam with the previous one is checked through the final validation pass when
    ``validate_on_close`` is set.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, optional: list[str] = ()):
        self.path = Path(path)
        self.meta = meta
        meta.pred_horizons = sorted(h for c in optional if (h := pred_horizon(c)) is not None)
        self.schema = arrow_schema(meta, list(optional))
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema.remove_metadata())
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self, validate: bool = True) -> Path:
        self._writer.close()
        if validate:
            read_trace(self._tmp, validate=True)  # raises on a bad trace; tmp is removed below
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._atomic.__exit__(RuntimeError, None, None)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self._atomic.__exit__(RuntimeError, None, None)
                raise
        else:
            self.abort()


def trace_from_arrays(
    meta: TraceMeta,
    *,
    step,
    seq,
    pos,
    phase,
    layer,
    offsets,
    experts,
    weights=None,
    token_id=None,
    token=None,
    preds=None,
    path: str = "<memory>",
) -> Trace:
    """Build a Trace from arrays (converted to the canonical dtypes; not validated)."""
    return Trace(
        meta=meta,
        step=np.ascontiguousarray(step, dtype=np.int64),
        seq=np.ascontiguousarray(seq, dtype=np.int64),
        pos=np.ascontiguousarray(pos, dtype=np.int32),
        phase=np.ascontiguousarray(phase, dtype=np.int8),
        layer=np.ascontiguousarray(layer, dtype=np.int16),
        offsets=np.ascontiguousarray(offsets, dtype=np.int64),
        experts=np.ascontiguousarray(experts, dtype=np.int16),
        weights=None if weights is None else np.ascontiguousarray(weights, dtype=np.float32),
        token_id=None if token_id is None else np.ascontiguousarray(token_id, dtype=np.int32),
        token=None if token is None else np.asarray(token, dtype=object),
        preds={
            int(h): (np.ascontiguousarray(o, dtype=np.int64), np.ascontiguousarray(v, np.int16))
            for h, (o, v) in (preds or {}).items()
        },
        path=path,
    )


def sort_trace(trace: Trace) -> Trace:
    """Return ``trace`` with rows reordered into (step, layer, seq, pos) order."""
    order = np.lexsort((trace.pos, trace.seq, trace.layer, trace.step))
    if np.array_equal(order, np.arange(order.shape[0])):
        return trace
    lengths = np.diff(trace.offsets)[order]
    new_offsets = np.zeros(order.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    idx = _gather_index(trace.offsets, order)
    preds = {}
    for h, (po, pv) in trace.preds.items():
        pl = np.diff(po)[order]
        no = np.zeros(order.shape[0] + 1, np.int64)
        np.cumsum(pl, out=no[1:])
        preds[h] = (no, pv[_gather_index(po, order)])
    return Trace(
        meta=trace.meta,
        step=trace.step[order],
        seq=trace.seq[order],
        pos=trace.pos[order],
        phase=trace.phase[order],
        layer=trace.layer[order],
        offsets=new_offsets,
        experts=trace.experts[idx],
        weights=None if trace.weights is None else trace.weights[idx],
        token_id=None if trace.token_id is None else trace.token_id[order],
        token=None if trace.token is None else trace.token[order],
        preds=preds,
        path=trace.path,
    )


def _gather_index(offsets: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Flat value indices of rows ``order`` of a CSR list, in that order (vectorised)."""
    starts = offsets[:-1][order]
    lengths = (offsets[1:] - offsets[:-1])[order]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    row_start = np.zeros(lengths.shape[0], np.int64)
    np.cumsum(lengths[:-1], out=row_start[1:])
    return np.repeat(starts - row_start, lengths) + np.arange(total)
