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
    META_CRC_KEY,
    META_KEY,
    OPTIONAL_COLUMNS,
    PRED_TYPE,
    REQUIRED_COLUMNS,
    TraceError,
    TraceMeta,
    arrow_schema,
    meta_crc,
    pred_column,
    pred_horizon,
)
from traces.trace import Trace
from traces.validate import validate_trace

#: Rows per Parquet row group: about 10-40 MB of trace per group.
ROW_GROUP_ROWS = 1 << 20

#: Parquet writer options: zstd, and a CRC per data page so that corrupt bytes are detected.
WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}

#: What pyarrow raises on a truncated or corrupt file (thrift, decoding, decompression, UTF-8).
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError,
                 MemoryError, OverflowError)  # fmt: skip


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed), shortened to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _open(path: Path) -> tuple[pq.ParquetFile, pa.Schema]:
    """Open a Parquet file and read its footer; TraceError when that fails."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        return pf, pf.schema_arrow
    except _ARROW_ERRORS as exc:
        raise TraceError(
            f"{path}: expected a Parquet file, cannot read it (truncated or corrupt?): "
            f"{_one_line(exc)}"
        ) from None


def read_meta(path: str | os.PathLike) -> TraceMeta:
    """Only the metadata of a trace (cheap: reads the Parquet footer)."""
    first = trace_files(path)[0]
    return _meta_of(first, _open(first)[1])


def _meta_of(path: Path, schema: pa.Schema) -> TraceMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{path}: missing metadata key 'moesim' (not a moesim trace?)")
    crc = (schema.metadata or {}).get(META_CRC_KEY)
    if crc is not None and crc != meta_crc(raw):
        raise TraceError(
            f"{path}: metadata key 'moesim': expected CRC-32 {crc.decode(errors='replace')!r} "
            f"(key 'moesim.crc32'), got {meta_crc(raw).decode()!r} (corrupt metadata?)"
        )
    return TraceMeta.from_json(raw, str(path))


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for name, typ in REQUIRED_COLUMNS.items():
        if name not in schema.names:
            raise TraceError(f"{path}: missing column '{name}' (expected {_tname(typ)})")
    names = schema.names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TraceError(f"{path}: column {dup!r}: expected one column of that name, found several")
    expected = dict(REQUIRED_COLUMNS) | dict(OPTIONAL_COLUMNS)
    for fld in schema:
        typ = expected.get(fld.name)
        if typ is None and pred_horizon(fld.name) is not None:
            typ = PRED_TYPE
        if typ is None:
            if fld.name.startswith("__index_level_"):
                continue  # a pandas index written by DataFrame.to_parquet: ignored
            raise TraceError(
                f"{path}: unknown column {fld.name!r} (expected only {', '.join(expected)} "
                f"and pred_h{{H}} columns)"
            )
        if not _compatible(fld.type, typ):
            raise TraceError(
                f"{path}: column '{fld.name}': expected {_tname(typ)}, got {_tname(fld.type)}"
            )


def _tname(typ: pa.DataType) -> str:
    """A type as messages name it: ``int16``, ``list<int16>`` (no item-field names)."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        kind = str(typ).split("<", 1)[0]
        return f"{kind}<{_tname(typ.value_type)}>"
    return str(typ)


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
    first_columns: list[str] = []
    for f in files:
        pf, schema = _open(f)
        m = _meta_of(f, schema)
        if meta is None:
            meta = m
        elif (m.num_layers, m.experts_per_layer, m.top_k) != (
            meta.num_layers,
            meta.experts_per_layer,
            meta.top_k,
        ):
            raise TraceError(
                f"{f}: metadata differs from {files[0].name}: expected the same num_layers, "
                f"experts_per_layer and top_k in every part"
            )
        _check_schema(f, schema)
        _check_preds(f, schema, m)
        optional = _optional_columns(schema)
        if f is files[0]:
            first_columns = optional
        elif set(optional) != set(first_columns):
            odd = sorted(set(optional) ^ set(first_columns))[0]
            raise TraceError(
                f"{f}: column '{odd}': expected the same optional columns as {files[0].name} "
                f"({', '.join(first_columns) or 'none'})"
            )
        optional = list(first_columns)  # every part in the first part's column order
        if columns is not None:
            optional = [c for c in optional if c in columns]
        if not load_text:
            optional = [c for c in optional if c != "token"]
        wanted = list(REQUIRED_COLUMNS) + optional
        try:
            tables.append(pf.read(columns=wanted))
        except _ARROW_ERRORS as exc:
            raise TraceError(
                f"{f}: cannot read rows (truncated or corrupt?): {_one_line(exc)}"
            ) from None
    assert meta is not None
    if len(tables) > 1:
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except _ARROW_ERRORS as exc:
            raise TraceError(
                f"{path}: parts cannot be joined (expected the same column types): {_one_line(exc)}"
            ) from None
    else:
        table = tables[0]
    trace = table_to_trace(table, meta, str(path))
    if validate:
        validate_trace(trace)
    return trace


def _optional_columns(schema: pa.Schema) -> list[str]:
    """The optional trace columns present in ``schema``, in schema order."""
    return [c for c in schema.names if c in OPTIONAL_COLUMNS or pred_horizon(c) is not None]


def _check_preds(path: Path, schema: pa.Schema, meta: TraceMeta) -> None:
    """The ``pred_h{H}`` columns must be those that ``meta.pred_horizons`` lists."""
    have = sorted(h for c in schema.names if (h := pred_horizon(c)) is not None)
    if have != sorted(meta.pred_horizons):
        odd = sorted(set(have) ^ set(meta.pred_horizons))
        name = pred_column(odd[0]) if odd else "pred_h*"
        raise TraceError(
            f"{path}: column '{name}': metadata key 'pred_horizons' lists "
            f"{sorted(meta.pred_horizons)}, expected the pred_h columns present {have}"
        )


def _fit(values: np.ndarray, dtype, name: str, where: str, start: int = 0) -> np.ndarray:
    """``values`` converted to the integer ``dtype``, or TraceError if any does not fit."""
    if values.dtype == dtype:
        return values
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        bad = int(np.flatnonzero((values < info.min) | (values > info.max))[0])
        raise TraceError(
            f"{where}: column '{name}': expected values that fit {np.dtype(dtype).name}, "
            f"got {values[bad]} at index {start + bad}"
        )
    return values.astype(dtype)


def _int_column(table: pa.Table, name: str, dtype, where: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise TraceError(f"{where}: column '{name}': expected no nulls, found {col.null_count}")
    arr = col.to_numpy()
    return np.ascontiguousarray(_fit(arr, dtype, name, where))


def _list_column(
    table: pa.Table, name: str, dtype, where: str, allow_null: bool
) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name)
    if col.null_count and not allow_null:
        raise TraceError(
            f"{where}: column '{name}': expected no null lists, found {col.null_count}"
        )
    # chunk by chunk: combining the chunks of a large trace could overflow int32 list offsets
    lengths, parts, start = [], [], 0
    for arr in col.chunks:
        if arr.null_count:
            arr = pc.if_else(pc.is_null(arr), pa.scalar([], arr.type), arr)
        flat = arr.flatten()
        if flat.null_count:
            raise TraceError(f"{where}: column '{name}': expected no null elements inside lists")
        lengths.append(np.diff(arr.offsets.to_numpy()).astype(np.int64))
        values = flat.to_numpy(zero_copy_only=False)
        if np.issubdtype(np.dtype(dtype), np.integer):
            values = _fit(values, dtype, name, where, start)
        start += values.shape[0]
        parts.append(values.astype(dtype, copy=False))
    offsets = np.zeros(sum(x.shape[0] for x in lengths) + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0, dtype)
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
        tcol = table.column("token_id").fill_null(-1)
        token_id = np.ascontiguousarray(_fit(tcol.to_numpy(), np.int32, "token_id", where))
    token = None
    if "token" in table.column_names:
        token = table.column("token").to_numpy(zero_copy_only=False).astype(object)
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


def iter_batches(
    path: str | os.PathLike, rows: int = ROW_GROUP_ROWS, *, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a trace (file or folder) as Arrow record batches, for traces larger than memory.

    Each file's metadata and schema are checked before its rows are read; the rows themselves
    are handed over as stored (validate them with :func:`read_trace` or per batch).

    Args:
        path: a ``.parquet`` file or a folder of them (streamed in name order).
        rows: the most rows per batch.
        columns: the columns to read (default: all).

    Raises:
        TraceError: a file is missing, not Parquet, corrupt, or not a moesim trace.
    """
    for f in trace_files(path):
        pf, schema = _open(f)
        _meta_of(f, schema)
        _check_schema(f, schema)
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise TraceError(f"{f}: missing column {missing[0]!r} (asked for by columns=)")
        it = pf.iter_batches(batch_size=rows, columns=columns)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except _ARROW_ERRORS as exc:
                raise TraceError(
                    f"{f}: cannot read rows (truncated or corrupt?): {_one_line(exc)}"
                ) from None
            yield batch


# --------------------------------------------------------------------------- writing
def _list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    if offsets[-1] > np.iinfo(np.int32).max:
        raise OverflowError("more than 2**31 list values in one file: write the trace in parts")
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values, type=typ.value_type)
    )


def trace_to_table(trace: Trace) -> pa.Table:
    """The Arrow table (with metadata) of an in-memory trace."""
    meta = trace.meta
    meta.pred_horizons = sorted(trace.preds)
    where = trace.path

    def column(name: str, make):
        try:
            return make()
        except TraceError:
            raise
        except _ARROW_ERRORS as exc:
            raise TraceError(
                f"{where}: column {name!r}: cannot convert to Arrow: {_one_line(exc)}"
            ) from None

    cols: dict[str, pa.Array] = {
        name: column(name, lambda n=name, t=typ: pa.array(getattr(trace, n), t))
        for name, typ in REQUIRED_COLUMNS.items()
        if name != "experts"
    }
    cols["experts"] = column(
        "experts", lambda: _list_array(trace.offsets, trace.experts, REQUIRED_COLUMNS["experts"])
    )
    optional = []
    if trace.weights is not None:
        cols["weights"] = column(
            "weights",
            lambda: _list_array(trace.offsets, trace.weights, OPTIONAL_COLUMNS["weights"]),
        )
        optional.append("weights")
    if trace.token_id is not None:
        cols["token_id"] = column("token_id", lambda: pa.array(trace.token_id, pa.int32()))
        optional.append("token_id")
    if trace.token is not None:
        cols["token"] = column("token", lambda: pa.array(list(trace.token), pa.string()))
        optional.append("token")
    for h in sorted(trace.preds):
        offs, ids = trace.preds[h]
        cols[pred_column(h)] = column(
            pred_column(h), lambda o=offs, v=ids: _list_array(np.asarray(o), v, PRED_TYPE)
        )
        optional.append(pred_column(h))
    schema = arrow_schema(meta, optional)
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def write_trace(trace: Trace, path: str | os.PathLike, *, validate: bool = True) -> Path:
    """Validate and write ``trace`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    saved = trace.path
    trace.path = str(path)  # errors name the file being written
    try:
        if validate:
            validate_trace(trace)
        table = trace_to_table(trace)
    finally:
        trace.path = saved
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, **WRITE_OPTIONS)
    return path


class atomic_path:
    """Context manager yielding a temporary path beside ``path``; renamed onto it on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            # mkstemp creates 0600 files: give the result the permissions of a normal file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class TraceWriter:
    """Write a trace in batches (for importers and captures that stream rows).

    Rows are appended with :meth:`write` as Arrow tables or record batches, dicts of arrays
    (numpy arrays, or Arrow list arrays for the list columns), or :class:`Trace` objects, in
    the trace schema and in order; :meth:`close` validates the whole file (seams between
    batches included) and renames it into place. On any error, or :meth:`abort`, the
    temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, optional: list[str] = ()):
        self.path = Path(path)
        self.meta = meta
        meta.validate(str(self.path))
        meta.pred_horizons = sorted(h for c in optional if (h := pred_horizon(c)) is not None)
        self.schema = arrow_schema(meta, list(optional))
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._tmp, self.schema, **WRITE_OPTIONS)
        except BaseException:
            self._atomic.__exit__(RuntimeError, None, None)
            raise
        self._done = False
        self.rows = 0

    def write(self, rows: pa.Table | pa.RecordBatch | dict | Trace) -> None:
        if self._done:
            raise TraceError(f"{self.path}: write() after close() or abort()")
        if isinstance(rows, Trace):
            rows = trace_to_table(rows)
        try:
            if isinstance(rows, dict):
                rows = pa.table(rows)
            if isinstance(rows, pa.RecordBatch):
                rows = pa.Table.from_batches([rows])
            missing = [c for c in self.schema.names if c not in rows.column_names]
            if missing:
                raise TraceError(
                    f"{self.path}: missing column '{missing[0]}' in written rows "
                    f"(expected {_tname(self.schema.field(missing[0]).type)})"
                )
            table = rows.select(self.schema.names).cast(self.schema.remove_metadata())
        except TraceError:
            raise
        except _ARROW_ERRORS as exc:
            raise TraceError(
                f"{self.path}: rows do not fit the trace schema "
                f"({', '.join(f'{f.name}: {_tname(f.type)}' for f in self.schema)}): "
                f"{_one_line(exc)}"
            ) from None
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self, validate: bool = True) -> Path:
        """Finish the file, validate it (unless ``validate`` is False) and rename it into place."""
        if self._done:
            return self.path
        self._done = True
        try:
            self._writer.close()
            if validate:
                try:
                    read_trace(self._tmp, validate=True)
                except TraceError as exc:  # name the target, not the temporary file
                    raise TraceError(str(exc).replace(str(self._tmp), str(self.path))) from None
        except BaseException:
            self._atomic.__exit__(RuntimeError, None, None)
            raise
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop what was written: remove the temporary file, leave ``path`` as it was."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.close()
        finally:
            self._atomic.__exit__(RuntimeError, None, None)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
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
    """Build a Trace from arrays (converted to the canonical dtypes; not validated).

    Integer arrays are range-checked while converted: a value that does not fit the column's
    dtype (e.g. layer 70000 in int16) raises TraceError instead of wrapping around.
    """

    def ints(values, dtype, name: str) -> np.ndarray:
        arr = np.asarray(values)
        if arr.size == 0:
            return np.zeros(0, dtype)
        if arr.ndim != 1:
            raise TraceError(
                f"{path}: column '{name}': expected a 1-D array, got shape {arr.shape}"
            )
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
            with np.errstate(invalid="ignore"):
                as_int = arr.astype(np.int64) if np.issubdtype(arr.dtype, np.number) else None
            if as_int is None or not np.array_equal(as_int, arr):
                raise TraceError(f"{path}: column '{name}': expected integers, got {arr.dtype}")
            arr = as_int
        return np.ascontiguousarray(_fit(arr, dtype, name, path))

    return Trace(
        meta=meta,
        step=ints(step, np.int64, "step"),
        seq=ints(seq, np.int64, "seq"),
        pos=ints(pos, np.int32, "pos"),
        phase=ints(phase, np.int8, "phase"),
        layer=ints(layer, np.int16, "layer"),
        offsets=ints(offsets, np.int64, "experts (offsets)"),
        experts=ints(experts, np.int16, "experts"),
        weights=None if weights is None else np.ascontiguousarray(weights, dtype=np.float32),
        token_id=None if token_id is None else ints(token_id, np.int32, "token_id"),
        token=None if token is None else np.asarray(token, dtype=object),
        preds={
            int(h): (
                ints(o, np.int64, f"{pred_column(h)} (offsets)"),
                ints(v, np.int16, pred_column(h)),
            )  # fmt: skip
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
