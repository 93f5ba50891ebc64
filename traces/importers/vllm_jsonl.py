"""Importer for vLLM MoE-logger JSONL route logs (Qwen1.5-MoE, OLMoE captures).

A log is JSON lines, optionally gzipped: a header ``{"type": "meta", "model_id": ..., "top_k":
..., "num_experts": ..., "layers_logged": [...]}``, then one record per (token, layer)::

    {"type": "route", "req_id": "r1", "token_idx": 5, "layer": 0,
     "topk_ids": [43, 5, 7, 58], "topk_weights": [0.097, 0.052, 0.039, 0.037]}

Several logs (one per layer, the same workload re-run) or one log holding several layers combine
into one multi-layer trace: the i-th route record of every layer is taken to be the same token,
and the logs must agree on their ``token_idx`` sequences (else TraceError).

The logger records no request identity (``req_id`` is a constant), so the importer decides:

- **forward calls**: ``token_idx`` not increasing (restarting at 0) starts a new call = step;
- **warm-up**: leading calls (at least ``warmup_min_rows`` rows) in which every row selects the
  same experts, in every layer, are vLLM's dummy profiling runs and are dropped. A log without
  call boundaries (a global token counter) instead drops its leading run of rows that select
  the same experts as its first row, when that run is ``warmup_min_rows`` long or longer;
- **phase**: a call with more rows than ``max_decode_batch`` is prefill, else decode;
- **sequences**: decode row ``i`` of a call (slot ``i``) is sequence ``i``, its position the
  number of earlier decode rows in that slot; each prefill call, whose prompt boundaries are
  unknown, is one pseudo-sequence ``S + k`` (``S`` = the widest decode call, ``k`` = the
  prefill call's rank) with positions ``0..n-1``;
- **no call boundaries** (``steps="per-token"``, the automatic choice then): each row is its
  own decode step of one sequence 0 at position = row number.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from traces.errors import ConfigError, TraceError
from traces.format import PHASE_DECODE, PHASE_PREFILL
from traces.importers.common import (
    ARROW_ERRORS,
    ImportResult,
    ModelOptions,
    Timer,
    add_model_arguments,
    build_meta,
    csr_concat,
    csr_take,
    expand_sources,
    occurrence_index,
    one_line,
    positive_int,
    write_imported,
)

STEP_CHOICES = ("auto", "native", "per-token")
PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz")
DEFAULT_MAX_DECODE_BATCH = 32
DEFAULT_WARMUP_MIN_ROWS = 32

_ROUTE_SCHEMA = pa.schema(
    [
        ("type", pa.string()),
        ("req_id", pa.string()),
        ("token_idx", pa.int64()),
        ("layer", pa.int64()),
        ("topk_ids", pa.list_(pa.int64())),
        ("topk_weights", pa.list_(pa.float64())),
    ]
)

WARMUP_RULE = (
    "leading forward calls of >= {n} rows in which every row selects the same experts (in "
    "every layer) are vLLM warm-up/profiling runs and were dropped; without call boundaries, "
    "the leading run (>= {n} rows) of rows selecting the same experts as the first row"
)
PHASE_RULE = "a forward call with more than {b} rows is prefill, else decode"
SEQ_RULE = (
    "decode slot i (row i of a decode call) = sequence i, pos = its count of earlier decode "
    "rows; each prefill call = one pseudo-sequence S+k (S = widest decode call, k = prefill "
    "call rank), pos = row in call (prompt boundaries are not logged)"
)
PER_TOKEN_RULE = "each route row is its own decode step of sequence 0, pos = row number"


@dataclass
class _Stream:
    """The route rows of one layer, in log order."""

    path: Path
    layer: int
    lines: np.ndarray  # 1-based line number of each row
    token_idx: np.ndarray
    ids: tuple[np.ndarray, np.ndarray]
    weights: tuple[np.ndarray, np.ndarray] | None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path)


def _read_header(path: Path) -> dict:
    try:
        with _open_text(path) as fh:
            first = fh.readline()
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: cannot read: {one_line(exc)}") from None
    if not first.strip():
        raise TraceError(f"{path}: empty file (expected JSON lines of vLLM route records)")
    try:
        head = json.loads(first)
    except ValueError as exc:
        raise TraceError(f"{path} line 1: expected a JSON object ({one_line(exc)})") from None
    if not isinstance(head, dict):
        raise TraceError(f"{path} line 1: expected a JSON object, got {type(head).__name__}")
    return head if head.get("type") == "meta" else {}


def _read_log(path: Path) -> tuple[dict, list[_Stream]]:
    header = _read_header(path)
    try:
        table = pj.read_json(
            path,
            read_options=pj.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pj.ParseOptions(
                explicit_schema=_ROUTE_SCHEMA, unexpected_field_behavior="ignore"
            ),
        )
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: cannot parse as vLLM JSON lines: {one_line(exc)}") from None
    kind = table.column("type")
    is_route = pc.fill_null(pc.equal(kind, "route"), True).to_numpy(zero_copy_only=False)
    if header:
        is_route[0] = False
    lines = np.flatnonzero(is_route) + 1
    table = table.filter(pa.array(is_route))
    if table.num_rows == 0:
        raise TraceError(f'{path}: no route records (expected lines with "type": "route")')
    for col in ("token_idx", "layer", "topk_ids"):
        nulls = table.column(col).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            line = int(lines[np.flatnonzero(nulls)[0]])
            raise TraceError(f"{path} line {line}: route record lacks '{col}'")
    layer = table.column("layer").to_numpy()
    token_idx = table.column("token_idx").to_numpy()
    ids = _csr(table.column("topk_ids"), path, "topk_ids", lines)
    weights = None
    wcol = table.column("topk_weights")
    if wcol.null_count == 0:
        weights = _csr(wcol, path, "topk_weights", lines)
        bad = np.flatnonzero(np.diff(weights[0]) != np.diff(ids[0]))
        if bad.size:
            line = int(lines[bad[0]])
            raise TraceError(
                f"{path} line {line}: column 'topk_weights': expected one weight per id in "
                f"'topk_ids' ({int(np.diff(ids[0])[bad[0]])}), "
                f"got {int(np.diff(weights[0])[bad[0]])}"
            )
    streams = []
    for lay in np.unique(layer):
        rows = np.flatnonzero(layer == lay)
        all_rows = rows.shape[0] == layer.shape[0]
        streams.append(
            _Stream(
                path=path,
                layer=int(lay),
                lines=lines[rows],
                token_idx=token_idx[rows],
                ids=ids if all_rows else csr_take(*ids, rows),
                weights=None
                if weights is None
                else (weights if all_rows else csr_take(*weights, rows)),
            )
        )
    return header, streams


def _csr(col: pa.ChunkedArray, path: Path, name: str, lines: np.ndarray):
    """A list column as CSR ``(offsets, values)``; TraceError on a null inside a list."""
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    values = arr.flatten()
    if values.null_count:
        j = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        i = int(np.searchsorted(offsets, j, side="right") - 1)
        raise TraceError(
            f"{path} line {int(lines[i])}: column '{name}': expected numbers, got null"
        )
    return offsets, values.to_numpy(zero_copy_only=False)


def _same_as_previous(off: np.ndarray, val: np.ndarray) -> np.ndarray:
    """``out[i]``: row ``i + 1`` selects exactly the experts of row ``i`` (same order)."""
    n = off.shape[0] - 1
    if n < 2:
        return np.zeros(0, bool)
    lengths = np.diff(off)
    width = int(lengths.max())
    pad = np.full((n, max(width, 1)), -1, np.int64)
    row = np.repeat(np.arange(n), lengths)
    col = np.arange(val.shape[0]) - np.repeat(off[:-1], lengths)
    pad[row, col] = val
    return np.all(pad[1:] == pad[:-1], axis=1)


# --------------------------------------------------------------------------- the import
def import_vllm(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    steps: str = "auto",
    max_decode_batch: int = DEFAULT_MAX_DECODE_BATCH,
    keep_warmup: bool = False,
    warmup_min_rows: int = DEFAULT_WARMUP_MIN_ROWS,
    model: ModelOptions | None = None,
) -> ImportResult:
    """Import vLLM MoE-logger JSONL logs into the trace ``out``.

    Args:
        sources: ``.jsonl[.gz]`` logs (one per layer of the same workload, or one holding
            several layers) and/or folders of them.
        out: the ``.parquet`` trace to write (atomically).
        steps: ``"native"`` (one step per forward call), ``"per-token"`` (one per row) or
            ``"auto"`` (native where the log has call boundaries, else per-token).
        max_decode_batch: a call with more rows than this is prefill.
        keep_warmup: keep the warm-up rows that are dropped by default.
        warmup_min_rows: the fewest rows a warm-up call (or run) has.
        model: model-shape options (default: the preset matching the header's model name).
    """
    timer = Timer()
    if steps not in STEP_CHOICES:
        raise ConfigError(f"--steps: expected one of {', '.join(STEP_CHOICES)}, got {steps!r}")
    if max_decode_batch < 1 or warmup_min_rows < 1:
        raise ConfigError("--max-decode-batch and --warmup-min-rows: expected positive integers")
    model = model or ModelOptions()
    files = expand_sources([str(s) for s in sources], PATTERNS, "vLLM JSONL logs")
    headers: list[dict] = []
    streams: dict[int, _Stream] = {}
    for f in files:
        header, found = _read_log(f)
        headers.append(header)
        for s in found:
            if s.layer in streams:
                raise TraceError(
                    f"{f}: layer {s.layer} is also in {streams[s.layer].path} "
                    "(expected each layer in one log only)"
                )
            streams[s.layer] = s
    layers = sorted(streams)
    ordered = [streams[lay] for lay in layers]
    ref = ordered[0]
    n = ref.token_idx.shape[0]
    for s in ordered[1:]:
        if s.token_idx.shape[0] != n:
            raise TraceError(
                f"{s.path}: layer {s.layer} does not align with layer {ref.layer} of {ref.path}: "
                f"{s.token_idx.shape[0]} route rows vs {n} (expected the same workload re-run)"
            )
        diff = np.flatnonzero(s.token_idx != ref.token_idx)
        if diff.size:
            i = int(diff[0])
            raise TraceError(
                f"{s.path} line {int(s.lines[i])}: column 'token_idx': layer {s.layer} does not "
                f"align with layer {ref.layer} of {ref.path}: expected {int(ref.token_idx[i])} "
                f"(its line {int(ref.lines[i])}), got {int(s.token_idx[i])}"
            )

    # ---- forward calls and warm-up
    token_idx = ref.token_idx
    starts_call = np.ones(n, bool)
    starts_call[1:] = token_idx[1:] <= token_idx[:-1]
    call_start = np.flatnonzero(starts_call)
    sizes = np.diff(np.append(call_start, n))
    same_prev = np.ones(max(n - 1, 0), bool)
    for s in ordered:
        same_prev &= _same_as_previous(*s.ids)
    drop = 0
    if not keep_warmup:
        if call_start.shape[0] >= 2:
            within = same_prev.copy()
            for c, start in enumerate(call_start):
                if sizes[c] < warmup_min_rows or not within[start : start + sizes[c] - 1].all():
                    break
                drop = int(start + sizes[c])
        else:
            run = np.flatnonzero(~same_prev)
            length = int(run[0]) + 1 if run.size else n
            if length >= warmup_min_rows:
                drop = length
        if drop >= n:
            raise TraceError(
                f"{ref.path}: all {n} route rows look like warm-up (identical routing); "
                "pass --keep-warmup to import them"
            )
    keep = np.arange(drop, n)
    r = keep.shape[0]
    starts_call = starts_call[drop:].copy()
    starts_call[0] = True
    call_id = np.cumsum(starts_call) - 1
    n_calls = int(call_id[-1]) + 1
    mode = steps if steps != "auto" else ("native" if n_calls >= 2 else "per-token")

    # ---- step, phase, seq, pos per kept row
    if mode == "native":
        call_start = np.flatnonzero(starts_call)
        sizes = np.diff(np.append(call_start, r))
        row_in_call = np.arange(r) - call_start[call_id]
        prefill_call = sizes > max_decode_batch
        slots = int(sizes[~prefill_call].max()) if (~prefill_call).any() else 0
        prefill_rank = np.cumsum(prefill_call) - 1
        prefill = prefill_call[call_id]
        seq = np.where(prefill, slots + prefill_rank[call_id], row_in_call)
        pos = row_in_call.copy()
        dec = ~prefill
        pos[dec] = occurrence_index(row_in_call[dec])
        step = call_id
        phase = np.where(prefill, PHASE_PREFILL, PHASE_DECODE).astype(np.int8)
        meta_steps = "native"
    else:
        step = np.arange(r)
        seq = np.zeros(r, np.int64)
        pos = np.arange(r)
        phase = np.full(r, PHASE_DECODE, np.int8)
        meta_steps = "per-token"
        prefill_call = np.zeros(0, bool)

    # ---- model metadata
    header = next((h for h in headers if h), {})
    model_name = model.model or header.get("model_id") or header.get("model")
    file_top_k = header.get("top_k") if isinstance(header.get("top_k"), int) else None
    file_experts = header.get("num_experts")
    file_experts = file_experts if isinstance(file_experts, int) else None
    extra = {
        "importer": "vllm",
        "files": [str(f) for f in files],
        "header": header,
        "calls": n_calls,
        "warmup_rows_dropped": drop,
        "warmup_rule": "kept (--keep-warmup)"
        if keep_warmup
        else WARMUP_RULE.format(n=warmup_min_rows),
    }
    if len(ordered) > 1:
        extra["alignment"] = (
            "one log per layer of the same workload re-run: route row i of every layer is taken "
            "to be the same token (token_idx sequences checked equal)"
        )
    if mode == "native":
        extra["max_decode_batch"] = max_decode_batch
        extra["phase_rule"] = PHASE_RULE.format(b=max_decode_batch)
        extra["seq_rule"] = SEQ_RULE
        extra["prefill_calls"] = int(prefill_call.sum())
    else:
        extra["steps_note"] = PER_TOKEN_RULE + (
            " (the log has no forward-call boundaries)" if n_calls < 2 else ""
        )
    meta = build_meta(
        model,
        layers,
        model_name=model_name,
        file_experts=file_experts,
        file_top_k=file_top_k,
        steps=meta_steps,
        extra=extra,
    )
    meta.source = f"moesim import vllm {' '.join(str(s) for s in sources)} --steps {mode}" + (
        " --keep-warmup" if keep_warmup else ""
    )

    # ---- per-layer checks that name the log and line
    for s in ordered:
        off, val = s.ids
        lengths = np.diff(off)[drop:]
        if meta.top_k is not None and np.any(lengths != meta.top_k):
            i = int(np.flatnonzero(lengths != meta.top_k)[0]) + drop
            raise TraceError(
                f"{s.path} line {int(s.lines[i])}: column 'topk_ids': expected top_k="
                f"{meta.top_k} ids, got {int(np.diff(off)[i])}"
            )
        kept = val[off[drop] :]
        limit = meta.experts_per_layer[0]
        if kept.size and (kept.min() < 0 or kept.max() >= limit):
            j = int(np.flatnonzero((kept < 0) | (kept >= limit))[0]) + int(off[drop])
            i = int(np.searchsorted(off, j, side="right") - 1)
            raise TraceError(
                f"{s.path} line {int(s.lines[i])}: column 'topk_ids': expected expert ids in "
                f"0..{limit - 1} (pass --experts-per-layer), got {int(val[j])}"
            )
        if s.weights is not None and not np.all(np.isfinite(s.weights[1])):
            j = int(np.flatnonzero(~np.isfinite(s.weights[1]))[0])
            i = int(np.searchsorted(s.weights[0], j, side="right") - 1)
            raise TraceError(
                f"{s.path} line {int(s.lines[i])}: column 'topk_weights': expected finite weights"
            )

    # ---- replay order (step, layer, seq, pos); rows within a call are already (seq, pos)
    L = len(ordered)
    r_all = np.tile(np.arange(r), L)
    l_all = np.repeat(np.arange(L), r)
    order = np.lexsort((r_all, l_all, np.tile(step, L)))
    ids_off, ids_val = csr_concat([_drop_rows(s.ids, drop) for s in ordered])
    off, ex = csr_take(ids_off, ids_val, order)
    weights = None
    if all(s.weights is not None for s in ordered):
        w_off, w_val = csr_concat([_drop_rows(s.weights, drop) for s in ordered])
        weights = csr_take(w_off, w_val, order)[1]
    else:
        meta.extra["weights_note"] = "some logs lack topk_weights: no weights column"
    ri = r_all[order]
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} logs)"
    rows, acts, seqs, nsteps = write_imported(
        out, meta, where=where, step=step[ri], seq=seq[ri], pos=pos[ri], phase=phase[ri],
        layer=l_all[order], offsets=off, experts=ex, weights=weights,
    )  # fmt: skip
    notes = []
    if drop:
        notes.append(f"Dropped {drop:,} warm-up rows per layer.")
    return ImportResult(
        path=Path(out), kind="vLLM JSONL", files=len(files), rows=rows, activations=acts,
        sequences=seqs, steps=nsteps, layers=L, seconds=timer.seconds, meta=meta, notes=notes,
    )  # fmt: skip


def _drop_rows(csr: tuple[np.ndarray, np.ndarray], drop: int):
    off, val = csr
    return off[drop:] - off[drop], val[off[drop] :]


# --------------------------------------------------------------------------- CLI
def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "vllm",
        help="vLLM MoE-logger JSONL route logs (one per layer, or one for all layers)",
        description="Import vLLM MoE-logger logs: JSON lines with a meta header and one "
        '{"type": "route", "token_idx", "layer", "topk_ids", "topk_weights"} record per '
        "token and layer. Logs of different layers (the same workload re-run) are aligned row "
        "by row into one trace. The logger records no request identity: see docs/importers.md "
        "for how steps, phases, sequences and positions are assigned.",
        epilog="example: moesim import vllm shared/traces/real/qwen1.5-moe-a2.7b-vllm/ "
        "-o qwen.parquet",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help=".jsonl(.gz) logs or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace to write")
    p.add_argument(
        "--steps", choices=STEP_CHOICES, default="auto",
        help="native: one step per forward call (token_idx restarting at 0 starts a call); "
        "per-token: one decode step per row; auto (default): native where the log has call "
        "boundaries, else per-token",
    )  # fmt: skip
    p.add_argument(
        "--max-decode-batch", type=positive_int, default=DEFAULT_MAX_DECODE_BATCH, metavar="N",
        help="a forward call with more rows than N is prefill, else decode "
        f"(default: {DEFAULT_MAX_DECODE_BATCH})",
    )  # fmt: skip
    p.add_argument("--keep-warmup", action="store_true",
                   help="keep vLLM's warm-up rows (dropped by default: leading calls in which "
                   "every row selects the same experts)")  # fmt: skip
    p.add_argument(
        "--warmup-min-rows", type=positive_int, default=DEFAULT_WARMUP_MIN_ROWS, metavar="N",
        help=f"the fewest rows a warm-up call has (default: {DEFAULT_WARMUP_MIN_ROWS})",
    )  # fmt: skip
    add_model_arguments(p, None)
    p.set_defaults(importer=run_args)
    return p


def run_args(args: argparse.Namespace) -> ImportResult:
    return import_vllm(
        args.sources, args.output, steps=args.steps, max_decode_batch=args.max_decode_batch,
        keep_warmup=args.keep_warmup, warmup_min_rows=args.warmup_min_rows,
        model=ModelOptions.from_args(args),
    )  # fmt: skip
