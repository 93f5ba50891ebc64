"""Importer for any table of expert activations (CSV, CSV.gz or Parquet) given a column mapping.

One input row is one (token, layer). The mapping names the columns:

- ``experts``: one list column (a Parquet list, or CSV text such as ``"[8, 26, 56]"``) or
  several scalar columns ``e0,e1,...`` in rank order (empty cells are dropped);
- ``weights`` (optional): likewise, aligned with the experts;
- ``layer`` (optional; default: one layer): the model's layer numbers; any distinct values
  (e.g. 2..9) become trace layers 0..L-1 in numeric order, ``meta.layer_ids`` records them;
- ``seq`` (optional; default: one sequence 0) and ``pos`` (optional; default: order of
  appearance of the sequence's rows at that layer);
- ``step`` (optional): the forward pass; without it ``steps`` forms them: ``"per-token"``
  (each token its own step, in (seq, pos) order) or ``"per-sequence"`` (each sequence one step);
- ``phase`` (optional: 0/1 or prefill/decode), or one ``phase_value`` for every row; by default
  per-token steps are decode, per-sequence steps prefill, and with a ``step`` column a row is
  prefill where its step holds more than one token of its sequence, else decode;
- ``token_id``, ``token`` (optional), ``pred`` (optional predicted experts, like ``experts``,
  stored as ``pred_h{pred_horizon}``).

Rows are sorted into replay order (step, layer, seq, pos); a repeated (step, layer, seq, pos)
is an error naming both input rows.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from traces.errors import ConfigError, TraceError
from traces.format import PHASE_DECODE, PHASE_PREFILL
from traces.importers.common import (
    ARROW_ERRORS,
    ImportResult,
    ModelOptions,
    Timer,
    add_model_arguments,
    build_meta,
    csr_take,
    expand_sources,
    occurrence_index,
    one_line,
    parse_list_strings,
    positive_int,
    shorten,
    write_imported,
)

STEP_CHOICES = ("per-token", "per-sequence")
PHASE_CHOICES = ("prefill", "decode")
PATTERNS = ("*.csv", "*.csv.gz", "*.parquet")


@dataclass
class Mapping:
    """Which input column holds what (``None``: not in the input)."""

    experts: list[str]
    weights: list[str] | None = None
    layer: str | None = None
    seq: str | None = None
    pos: str | None = None
    step: str | None = None
    phase: str | None = None
    token_id: str | None = None
    token: str | None = None
    pred: list[str] | None = None

    def columns(self) -> list[tuple[str, str]]:
        """(column, option) pairs of every mapped column."""
        out = [(c, "--experts") for c in self.experts]
        out += [(c, "--weights") for c in self.weights or []]
        out += [(c, "--pred") for c in self.pred or []]
        for opt in ("layer", "seq", "pos", "step", "phase", "token_id", "token"):
            if getattr(self, opt):
                out.append((getattr(self, opt), "--" + opt.replace("_", "-")))
        return out


def _split_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise ConfigError(f"expected comma-separated column names, got {text!r}")
    return names


# --------------------------------------------------------------------------- reading
class _Input:
    """The concatenated input table and where each row came from (for error messages)."""

    def __init__(self, files: list[Path], mapping: Mapping, delimiter: str):
        self.files = files
        tables = []
        self.is_csv = []
        wanted = list(dict.fromkeys(c for c, _ in mapping.columns()))
        lists = [c for c in (mapping.experts, mapping.weights, mapping.pred) if c and len(c) == 1]
        text_cols = {mapping.token} | {c[0] for c in lists}
        text_cols.discard(None)
        for f in files:
            csv = not f.name.endswith(".parquet")
            self.is_csv.append(csv)
            names = self._names(f, csv, delimiter)
            for col, opt in mapping.columns():
                if col not in names:
                    raise TraceError(
                        f"{f}: missing column '{col}' (named by {opt}; the file has: "
                        f"{', '.join(names[:20])}{'...' if len(names) > 20 else ''})"
                    )
            try:
                if csv:
                    t = pv.read_csv(
                        f,
                        parse_options=pv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                        convert_options=pv.ConvertOptions(
                            include_columns=wanted,
                            column_types={c: pa.string() for c in text_cols if c in names},
                            strings_can_be_null=False,
                            quoted_strings_can_be_null=False,
                        ),
                    )
                else:
                    t = pq.read_table(f, columns=wanted)
            except ARROW_ERRORS as exc:
                raise TraceError(f"{f}: cannot read: {one_line(exc)}") from None
            tables.append(t)
        rows = np.array([t.num_rows for t in tables], np.int64)
        self.starts = np.zeros(len(files) + 1, np.int64)
        np.cumsum(rows, out=self.starts[1:])
        if self.starts[-1] == 0:
            raise TraceError(f"{files[0]}: no rows")
        try:
            self.table = pa.concat_tables(tables, promote_options="permissive")
        except ARROW_ERRORS as exc:
            raise TraceError(
                f"{files[0]}: the input files have different column types: {one_line(exc)}"
            ) from None
        self.n = int(self.starts[-1])

    @staticmethod
    def _names(f: Path, csv: bool, delimiter: str) -> list[str]:
        try:
            if not csv:
                return pq.read_schema(f).names
            reader = pv.open_csv(
                f,
                read_options=pv.ReadOptions(block_size=1 << 16),
                parse_options=pv.ParseOptions(delimiter=delimiter),
                convert_options=pv.ConvertOptions(column_types={}, strings_can_be_null=False),
            )
            return reader.schema.names
        except ARROW_ERRORS as exc:
            kind = "CSV" if csv else "Parquet"
            raise TraceError(f"{f}: cannot read as {kind}: {one_line(exc)}") from None

    def locate(self, i: int) -> str:
        f = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = i - int(self.starts[f])
        return f"{self.files[f]} line {r + 2}" if self.is_csv[f] else f"{self.files[f]} row {r}"

    def column(self, name: str) -> pa.Array:
        return self.table.column(name).combine_chunks()

    def ints(self, name: str, what: str) -> np.ndarray:
        """An integer column as int64; TraceError naming the first bad row."""
        col = self.column(name)
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise TraceError(f"{self.locate(bad)}: column '{name}': expected {what}, got nothing")
        vals, ok = _as_int64(col)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise TraceError(
                f"{self.locate(bad)}: column '{name}': expected {what}, "
                f"got {shorten(col[bad].as_py())}"
            )
        return vals

    def lists(self, names: list[str], option: str, floats: bool = False):
        """Experts (or weights, predictions) as CSR ``(offsets, values)``."""
        if len(names) == 1:
            col = self.column(names[0])
            typ = col.type
            if pa.types.is_list(typ) or pa.types.is_large_list(typ):
                return self._list_column(col, names[0], floats)
            if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                value_type = pa.float32() if floats else pa.int64()
                if floats:
                    return self._float_lists(col, names[0])
                return parse_list_strings(col, names[0], self.locate, value_type)
        # scalar columns, one per rank; empty cells are dropped
        mats, valid = [], []
        for name in names:
            col = self.column(name)
            if floats:
                if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                    try:
                        col = col.cast(pa.float64())
                    except ARROW_ERRORS:
                        raise TraceError(
                            f"{self.locate(0)}: column '{name}' ({option}): expected numbers, "
                            f"got {col.type}"
                        ) from None
                valid.append(col.is_valid().to_numpy(zero_copy_only=False))
                mats.append(col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64))
            else:
                valid.append(col.is_valid().to_numpy(zero_copy_only=False))
                mats.append(self._int_values(col, name, option))
        m = np.stack(mats, axis=1)
        ok = np.stack(valid, axis=1)
        offsets = np.zeros(self.n + 1, np.int64)
        np.cumsum(ok.sum(axis=1), out=offsets[1:])
        return offsets, m[ok]

    def _int_values(self, col: pa.Array, name: str, option: str) -> np.ndarray:
        vals, ok = _as_int64(col)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise TraceError(
                f"{self.locate(bad)}: column '{name}' ({option}): expected integer expert ids, "
                f"got {shorten(col[bad].as_py())}"
            )
        return vals

    def _list_column(self, col: pa.Array, name: str, floats: bool):
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise TraceError(f"{self.locate(bad)}: column '{name}': expected a list, got nothing")
        offsets = col.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        flat = col.flatten()
        if flat.null_count:
            j = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            bad = int(np.searchsorted(offsets, j, side="right") - 1)
            raise TraceError(f"{self.locate(bad)}: column '{name}': expected no nulls inside lists")
        values = flat.to_numpy(zero_copy_only=False)
        if not floats and not np.issubdtype(values.dtype, np.integer):
            ok = np.isfinite(values) & (values == np.round(values))
            if not ok.all():
                j = int(np.flatnonzero(~ok)[0])
                bad = int(np.searchsorted(offsets, j, side="right") - 1)
                raise TraceError(
                    f"{self.locate(bad)}: column '{name}': expected integer expert ids, "
                    f"got {shorten(col[bad].as_py())}"
                )
            values = values.astype(np.int64)
        return offsets, values

    def _float_lists(self, col: pa.Array, name: str):
        s = pc.utf8_trim_whitespace(col)
        s = pc.replace_substring_regex(s, r"^\[|\]$", "")
        parts = pc.split_pattern_regex(pc.utf8_trim_whitespace(s), r"\s*,\s*|\s+")
        counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(parts)
        empty = pc.equal(flat, "").to_numpy(zero_copy_only=False)
        row_of = np.repeat(np.arange(self.n), counts)
        counts = counts - np.bincount(row_of[empty], minlength=self.n)
        flat = flat.filter(pa.array(~empty))
        offsets = np.zeros(self.n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        try:
            return offsets, flat.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except ARROW_ERRORS:
            ok = pc.match_substring_regex(
                flat, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
            ).to_numpy(zero_copy_only=False)
            j = int(np.flatnonzero(~ok)[0]) if (~ok).any() else 0
            bad = int(np.searchsorted(offsets, j, side="right") - 1)
            raise TraceError(
                f"{self.locate(bad)}: column '{name}': expected a list of numbers, "
                f"got {shorten(col[bad].as_py())}"
            ) from None


# --------------------------------------------------------------------------- the import
def import_table(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    mapping: Mapping,
    *,
    steps: str = "per-token",
    phase_value: str | None = None,
    pred_horizon: int = 1,
    pred_source: str = "",
    model: ModelOptions | None = None,
    delimiter: str = ",",
) -> ImportResult:
    """Import a table (CSV, CSV.gz or Parquet; several files are concatenated) into ``out``.

    Args:
        sources: the files and/or folders of them.
        out: the ``.parquet`` trace to write (atomically).
        mapping: which column holds what (see :class:`Mapping`).
        steps: without a step column: ``"per-token"`` or ``"per-sequence"``.
        phase_value: ``"prefill"`` or ``"decode"`` for every row (instead of a phase column).
        pred_horizon, pred_source: the horizon and origin of ``mapping.pred``.
        model: model-shape options (``--preset`` or the explicit fields are required).
        delimiter: the CSV field separator.
    """
    timer = Timer()
    model = model or ModelOptions()
    if steps not in STEP_CHOICES:
        raise ConfigError(f"--steps: expected one of {', '.join(STEP_CHOICES)}, got {steps!r}")
    if phase_value not in (None, *PHASE_CHOICES):
        raise ConfigError(f"--phase-value: expected prefill or decode, got {phase_value!r}")
    if mapping.phase and phase_value:
        raise ConfigError("--phase and --phase-value: give one, not both")
    if not mapping.experts:
        raise ConfigError("--experts: expected a list column or comma-separated columns")
    delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise ConfigError(f"--delimiter: expected one character, got {delimiter!r}")
    files = expand_sources([str(s) for s in sources], PATTERNS, "CSV or Parquet tables")
    src = _Input(files, mapping, delimiter)
    n = src.n

    # ---- columns
    ex_off, ex_val = src.lists(mapping.experts, "--experts")
    if mapping.layer:
        raw_layer = src.ints(mapping.layer, "an integer layer number")
        layer_ids, lidx = np.unique(raw_layer, return_inverse=True)
    else:
        layer_ids, lidx = np.zeros(1, np.int64), np.zeros(n, np.int64)
    seq = src.ints(mapping.seq, "an integer sequence id") if mapping.seq else np.zeros(n, np.int64)
    if mapping.pos:
        pos = src.ints(mapping.pos, "an integer position >= 0")
    else:
        pos = occurrence_index(_pair_key(seq, lidx))
    weights = None
    if mapping.weights:
        w_off, w_val = src.lists(mapping.weights, "--weights", floats=True)
        bad = np.flatnonzero(np.diff(w_off) != np.diff(ex_off))
        if bad.size:
            i = int(bad[0])
            raise TraceError(
                f"{src.locate(i)}: column '{','.join(mapping.weights)}' (--weights): expected "
                f"one weight per expert ({int(ex_off[i + 1] - ex_off[i])}), "
                f"got {int(w_off[i + 1] - w_off[i])}"
            )
        weights = w_val
    preds = None
    if mapping.pred:
        preds = src.lists(mapping.pred, "--pred")
    token_id = src.ints(mapping.token_id, "an integer token id") if mapping.token_id else None
    token = src.column(mapping.token).cast(pa.string()) if mapping.token else None

    # ---- steps
    if mapping.step:
        step = src.ints(mapping.step, "an integer step >= 0")
        meta_steps = "native"
    elif steps == "per-token":
        step = _dense_rank(seq, pos)
        meta_steps = "per-token"
    else:
        step = _dense_rank(seq)
        meta_steps = "per-sequence"
    for name, arr, opt in ((mapping.step, step, "--step"), (mapping.pos, pos, "--pos")):
        if name and arr.size and arr.min() < 0:
            bad = int(np.flatnonzero(arr < 0)[0])
            raise TraceError(
                f"{src.locate(bad)}: column '{name}' ({opt}): expected values >= 0, "
                f"got {int(arr[bad])}"
            )

    # ---- phase
    phase_rule = None
    if mapping.phase:
        phase = _phase_column(src, mapping.phase)
    elif phase_value:
        phase = np.full(n, PHASE_PREFILL if phase_value == "prefill" else PHASE_DECODE, np.int8)
    elif mapping.step:
        # prefill where the row's step holds more than one token of its sequence (at its layer)
        key = np.lexsort((lidx, seq, step))
        k = np.stack([step[key], seq[key], lidx[key]])
        same = np.all(k[:, 1:] == k[:, :-1], axis=0)
        group = np.concatenate([[0], np.cumsum(~same)])
        sizes = np.bincount(group)
        phase = np.empty(n, np.int8)
        phase[key] = np.where(sizes[group] > 1, PHASE_PREFILL, PHASE_DECODE)
        phase_rule = "prefill where a step holds more than one token of the sequence, else decode"
    else:
        phase = np.full(n, PHASE_DECODE if steps == "per-token" else PHASE_PREFILL, np.int8)

    # ---- replay order and duplicate check
    order = np.lexsort((pos, seq, lidx, step))
    s_step, s_lay, s_seq, s_pos = step[order], lidx[order], seq[order], pos[order]
    dup = (s_step[1:] == s_step[:-1]) & (s_lay[1:] == s_lay[:-1]) & (s_seq[1:] == s_seq[:-1])
    dup &= s_pos[1:] == s_pos[:-1]
    if dup.any():
        j = int(np.flatnonzero(dup)[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        raise TraceError(
            f"{src.locate(b)}: repeats the (step, layer, seq, pos) of {src.locate(a)}: "
            f"expected one row per token and layer (check the --seq/--pos/--layer/--step mapping)"
        )

    # ---- metadata
    extra = {
        "importer": "table",
        "files": [str(f) for f in files],
        "mapping": {k: v for k, v in vars(mapping).items() if v},
    }
    if phase_rule:
        extra["phase_rule"] = phase_rule
    if not mapping.pos:
        extra["pos_rule"] = "order of appearance of the sequence's rows at each layer"
    meta = build_meta(
        model,
        [int(x) for x in layer_ids],
        model_name=model.model,
        steps=meta_steps,
        pred_source=(pred_source or "table") if preds else "",
        extra=extra,
    )
    meta.source = f"moesim import table {' '.join(str(s) for s in sources)}"
    limit = meta.experts_per_layer[0]
    if ex_val.size and (ex_val.min() < 0 or ex_val.max() >= limit):
        j = int(np.flatnonzero((ex_val < 0) | (ex_val >= limit))[0])
        i = int(np.searchsorted(ex_off, j, side="right") - 1)
        raise TraceError(
            f"{src.locate(i)}: column '{','.join(mapping.experts)}' (--experts): expected expert "
            f"ids in 0..{limit - 1}, got {int(ex_val[j])}"
        )
    if meta.top_k is not None:
        lengths = np.diff(ex_off)
        if np.any(lengths != meta.top_k):
            i = int(np.flatnonzero(lengths != meta.top_k)[0])
            raise TraceError(
                f"{src.locate(i)}: column '{','.join(mapping.experts)}' (--experts): expected "
                f"top_k={meta.top_k} experts, got {int(lengths[i])} (pass --top-k none for "
                "dynamic routing)"
            )
    off, ex = csr_take(ex_off, ex_val, order)
    w = None if weights is None else csr_take(ex_off, weights, order)[1]
    pred_cols = None if preds is None else {pred_horizon: csr_take(*preds, order)}
    where = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
    rows, acts, seqs, nsteps = write_imported(
        out, meta, where=where, step=s_step, seq=s_seq, pos=s_pos, phase=phase[order],
        layer=s_lay, offsets=off, experts=ex, weights=w,
        token_id=None if token_id is None else token_id[order],
        token=None if token is None else token.take(pa.array(order)), preds=pred_cols,
    )  # fmt: skip
    return ImportResult(
        path=Path(out), kind="table", files=len(files), rows=rows, activations=acts,
        sequences=seqs, steps=nsteps, layers=len(layer_ids), seconds=timer.seconds, meta=meta,
    )  # fmt: skip


def _as_int64(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer values of a column of ints, integral floats or integer text, and which rows
    hold one (null rows count as good, with value 0; the caller handles nulls)."""
    n = len(col)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(col.type):
        return col.fill_null(0).to_numpy().astype(np.int64, copy=False), np.ones(n, bool)
    if pa.types.is_floating(col.type):
        arr = col.fill_null(0).to_numpy(zero_copy_only=False)
        ok = np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) < 2.0**62)
        return np.where(ok, arr, 0).astype(np.int64), ok | ~valid
    text = pc.utf8_trim_whitespace(col.cast(pa.string()).fill_null("0"))
    ok = pc.match_substring_regex(text, r"^[-+]?\d{1,18}$").to_numpy(zero_copy_only=False)
    clean = pc.if_else(pa.array(ok), text, "0")
    return clean.cast(pa.int64()).to_numpy(), ok | ~valid


def _pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int64 key per (a, b) pair (dense ranks combined)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    return ia.astype(np.int64) * (int(ib.max()) + 1 if ib.size else 1) + ib


def _dense_rank(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Dense rank of ``a`` (or of the pairs (a, b), lexicographic), from 0."""
    key = a if b is None else _pair_key(a, b)
    return np.unique(key, return_inverse=True)[1].astype(np.int64)


def _phase_column(src: _Input, name: str) -> np.ndarray:
    col = src.column(name)
    if pa.types.is_integer(col.type) and col.null_count == 0:
        vals = col.to_numpy().astype(np.int64)
        ok = (vals == 0) | (vals == 1)
    else:
        text = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string()).fill_null("")))
        pre = pc.is_in(text, pa.array(["0", "prefill", "p"])).to_numpy(zero_copy_only=False)
        dec = pc.is_in(text, pa.array(["1", "decode", "d"])).to_numpy(zero_copy_only=False)
        vals = np.where(dec, PHASE_DECODE, PHASE_PREFILL)
        ok = pre | dec
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise TraceError(
            f"{src.locate(bad)}: column '{name}' (--phase): expected 0/prefill or 1/decode, "
            f"got {shorten(col[bad].as_py())}"
        )
    return vals.astype(np.int8)


# --------------------------------------------------------------------------- CLI
def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "table",
        help="any CSV, CSV.gz or Parquet table, given a column mapping",
        description="Import a table with one row per (token, layer): say which column holds "
        "the experts and, where present, the layer, sequence, position, step, phase, weights "
        "and tokens. Layer numbers (e.g. 2..9) become trace layers 0..L-1. Several files are "
        "concatenated. The model shape comes from --preset or --experts-per-layer, --top-k "
        "and --expert-bytes.",
        epilog="example (FLAME-MoE): moesim import table flame_moe_290m_prefill_2048tok.csv.gz "
        "-o flame.parquet --preset flame-moe-290m --seq seq --pos pos --layer layer "
        "--experts e0,e1,e2,e3,e4,e5 --weights s0,s1,s2,s3,s4,s5 --token-id token_id "
        "--steps per-sequence",
    )
    p.add_argument(
        "sources", nargs="+", metavar="SRC", help="CSV, CSV.gz or Parquet files or folders"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace to write")
    g = p.add_argument_group("column mapping")
    g.add_argument("--experts", required=True, metavar="COLS",
                   help="routed experts: one list column, or e0,e1,... in rank order")  # fmt: skip
    g.add_argument("--weights", metavar="COLS", help="gate weights: one list column or s0,s1,...")
    g.add_argument("--layer", metavar="COL", help="MoE layer number (default: one layer)")
    g.add_argument("--seq", metavar="COL", help="sequence id (default: one sequence)")
    g.add_argument(
        "--pos", metavar="COL", help="position in the sequence (default: order of its rows)"
    )
    g.add_argument("--step", metavar="COL", help="forward pass (default: formed by --steps)")
    g.add_argument(
        "--steps", choices=STEP_CHOICES, default="per-token",
        help="without --step: per-token (each token its own step, default) or per-sequence "
        "(each sequence one step)",
    )  # fmt: skip
    g.add_argument("--phase", metavar="COL", help="phase column: 0/prefill or 1/decode")
    g.add_argument(
        "--phase-value", choices=PHASE_CHOICES,
        help="one phase for every row (default: decode for per-token steps, prefill for "
        "per-sequence; with --step: prefill where a step holds several tokens of a sequence)",
    )  # fmt: skip
    g.add_argument("--token-id", metavar="COL", help="token id column")
    g.add_argument("--token", metavar="COL", help="token text column")
    g.add_argument("--pred", metavar="COLS", help="predicted experts: one list column or columns")
    g.add_argument("--pred-horizon", type=positive_int, default=1, metavar="H",
                   help="layers ahead the predictions were made (default: 1)")  # fmt: skip
    g.add_argument("--pred-source", metavar="NAME", help="who made the predictions")
    g.add_argument("--delimiter", default=",", metavar="CHAR", help="CSV field separator")
    add_model_arguments(p, None)
    p.set_defaults(importer=run_args)
    return p


def run_args(args: argparse.Namespace) -> ImportResult:
    mapping = Mapping(
        experts=_split_names(args.experts) or [],
        weights=_split_names(args.weights),
        layer=args.layer,
        seq=args.seq,
        pos=args.pos,
        step=args.step,
        phase=args.phase,
        token_id=args.token_id,
        token=args.token,
        pred=_split_names(args.pred),
    )
    return import_table(
        args.sources, args.output, mapping, steps=args.steps, phase_value=args.phase_value,
        pred_horizon=args.pred_horizon, pred_source=args.pred_source or "",
        model=ModelOptions.from_args(args), delimiter=args.delimiter,
    )  # fmt: skip
