"""Importer for the MoE-Beyond CSV layout (DeepSeek-V2-Lite-Chat captures, arXiv 2508.17137).

A capture is a folder of per-prompt files ``prompt_N_*.csv[.gz]``; one file is one sequence,
``N`` its sequence id. Columns:

- ``Layer ID``: the model's layer number (1..26 for DeepSeek-V2-Lite: layer 0 is dense);
- ``Token``: the token's text, or (in the ``*_predicted`` files) the token's index;
- ``Activated Expert IDs``: the routed experts, a list such as ``"[8, 26, 56, 57, 60, 43]"``;
- ``Predicted Expert IDs`` (optional): MoE-Beyond's learned predictor's experts for that row;
- ``Batch Number`` (ignored; always 0).

Rows are grouped by layer; the i-th row of a layer is token i. Every file must hold every
layer, with the same number of rows at each.

The captures ran each prompt as one forward pass, but stand in for token-by-token decoding:
``steps="per-token"`` (default; each token is its own decode step, as MoE-Beyond's own
simulator replays them) or ``steps="per-sequence"`` (each prompt one prefill step).

Speed: files are parsed with ``pyarrow.csv`` in chunks by a pool of worker processes; the expert
lists are parsed column-wise (``pyarrow.compute``) and the replay order is built by index
arithmetic, so the 1,999-prompt training set (5 M rows) imports in seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

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
    number_in_name,
    occurrence_index,
    one_line,
    parse_list_strings,
    positive_int,
    shorten,
    write_imported,
)
from traces.presets import get_preset

DEFAULT_PRESET = "deepseek-v2-lite"
DEFAULT_MODEL = "deepseek-ai/DeepSeek-V2-Lite-Chat"
COL_LAYER = "Layer ID"
COL_TOKEN = "Token"
COL_ACTIVATED = "Activated Expert IDs"
COL_PREDICTED = "Predicted Expert IDs"
STEP_CHOICES = ("per-token", "per-sequence")
TOKEN_CHOICES = ("auto", "text", "index", "none")
PATTERNS = ("*.csv", "*.csv.gz")

#: Below this many files the import runs in-process (a pool costs more than it saves).
POOL_MIN_FILES = 64

PRED_NOTE = (
    "MoE-Beyond predictions are horizon-free: the learned predictor gives every (token, layer) "
    "its experts from the prompt before the model runs. They are stored as pred_h1, the "
    "shortest horizon, so that every prefetcher may use them."
)


# --------------------------------------------------------------------------- per-file parsing
def _locator(paths: list[str], starts: np.ndarray):
    """``locate(i)``: row ``i`` of a chunk as ``FILE line L`` (line 1 is the header)."""

    def locate(i: int) -> str:
        f = int(np.searchsorted(starts, i, side="right") - 1)
        return f"{paths[f]} line {i - int(starts[f]) + 2}"

    return locate


def _read_one(path: str) -> pa.Table:
    types = {c: pa.string() for c in (COL_LAYER, COL_TOKEN, COL_ACTIVATED, COL_PREDICTED)}
    try:
        table = pv.read_csv(
            path,
            read_options=pv.ReadOptions(use_threads=False, block_size=1 << 22),
            parse_options=pv.ParseOptions(newlines_in_values=True),
            convert_options=pv.ConvertOptions(
                column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: cannot read as CSV: {one_line(exc)}") from None
    for col in (COL_LAYER, COL_ACTIVATED):
        if col not in table.column_names:
            raise TraceError(
                f"{path}: missing column '{col}' (expected the MoE-Beyond layout: "
                f"{COL_LAYER}, {COL_TOKEN}, {COL_ACTIVATED}[, {COL_PREDICTED}]; found: "
                f"{', '.join(table.column_names) or 'no columns'})"
            )
    if table.num_rows == 0:
        raise TraceError(f"{path}: no rows (expected one row per token and layer)")
    return table


def _read_chunk(paths: list[str], token_mode: str, with_pred: bool) -> dict:
    """Parse a chunk of files into flat arrays (runs in a worker process)."""
    tables = [_read_one(p) for p in paths]
    for p, t in zip(paths, tables, strict=True):
        if (COL_PREDICTED in t.column_names) != with_pred:
            raise TraceError(
                f"{p}: column '{COL_PREDICTED}': expected it in every file or in none "
                f"(the first file {'has' if with_pred else 'lacks'} it)"
            )
    rows = np.array([t.num_rows for t in tables], np.int64)
    starts = np.zeros(len(paths) + 1, np.int64)
    np.cumsum(rows, out=starts[1:])
    locate = _locator(paths, starts)

    wanted = (COL_LAYER, COL_TOKEN, COL_ACTIVATED, COL_PREDICTED)
    whole = pa.concat_tables(
        [t.select([c for c in wanted if c in t.column_names]) for t in tables],
        promote_options="default",
    )

    def column(name: str) -> pa.Array:
        return whole.column(name).combine_chunks()

    layer_text = column(COL_LAYER)
    try:
        layer = layer_text.cast(pa.int64()).to_numpy()
    except ARROW_ERRORS:
        ok = pc.match_substring_regex(layer_text, r"^\s*-?\d+\s*$").to_numpy(zero_copy_only=False)
        bad = int(np.flatnonzero(~ok)[0])
        raise TraceError(
            f"{locate(bad)}: column '{COL_LAYER}': expected an integer layer number, "
            f"got {shorten(layer_text[bad].as_py())}"
        ) from None
    file_of = np.repeat(np.arange(len(paths), dtype=np.int64), rows)
    lo = int(layer.min())
    pos = occurrence_index(file_of * (int(layer.max()) - lo + 1) + (layer - lo))

    act_off, act_val = parse_list_strings(column(COL_ACTIVATED), COL_ACTIVATED, locate)
    pred_off = pred_val = None
    if with_pred:
        pred_off, pred_val = parse_list_strings(column(COL_PREDICTED), COL_PREDICTED, locate)

    # Files whose activated experts are listed in ascending id order (rank order lost).
    ascending = _per_file_all(_rows_ascending(act_off, act_val), starts)

    token = None
    text_files = np.zeros(len(paths), bool)
    has_token = all(COL_TOKEN in t.column_names for t in tables)
    if token_mode != "none" and has_token:
        tok = column(COL_TOKEN)
        if token_mode == "text":
            text_files[:] = True
        else:
            is_num = pc.match_substring_regex(tok, r"^\d{1,9}$")
            as_int = pc.if_else(is_num, tok, "-1").cast(pa.int64()).to_numpy()
            is_index = _per_file_all(as_int == pos, starts)
            if token_mode == "index" and not is_index.all():
                f = int(np.flatnonzero(~is_index)[0])
                lo, hi = starts[f], starts[f + 1]
                row = int(lo + np.flatnonzero(as_int[lo:hi] != pos[lo:hi])[0])
                raise TraceError(
                    f"{locate(row)}: column '{COL_TOKEN}': expected the token index "
                    f"{pos[row]} (--token index), got {shorten(tok[row].as_py())}"
                )
            text_files = ~is_index
        if text_files.any():
            if text_files.all():
                token = tok
            else:
                token = pc.if_else(
                    pa.array(np.repeat(text_files, rows)), tok, pa.nulls(len(tok), pa.string())
                )
    elif token_mode in ("text", "index") and not has_token:
        missing = next(
            p for p, t in zip(paths, tables, strict=True) if COL_TOKEN not in t.column_names
        )
        raise TraceError(
            f"{missing}: missing column '{COL_TOKEN}' (asked for by --token {token_mode})"
        )
    return {
        "rows": rows,
        "layer": layer.astype(np.int32)
        if -(2**31) <= layer.min() and layer.max() < 2**31
        else layer,
        "pos": pos.astype(np.int32),
        "act": (act_off, act_val),
        "pred": None if pred_off is None else (pred_off, pred_val),
        "token": token,
        "text_files": text_files,
        "ascending": ascending,
    }


def _per_file_all(flags: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per file (rows ``starts[f]:starts[f+1]``, all non-empty): whether every flag is set."""
    return np.logical_and.reduceat(flags, starts[:-1]) if flags.size else np.zeros(0, bool)


def _rows_ascending(off: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Per CSR row: whether its values strictly increase."""
    n = off.shape[0] - 1
    k = int(off[1] - off[0]) if n else 0
    if n and k > 0 and int(off[-1] - off[0]) == n * k and np.all(np.diff(off) == k):
        rows = val[int(off[0]) : int(off[-1])].reshape(n, k)
        return np.all(rows[:, 1:] > rows[:, :-1], axis=1)
    good = np.diff(val.astype(np.int32)) > 0  # pair (j, j + 1)
    cross = off[1:-1]
    good[cross[(cross > 0) & (cross < val.shape[0])] - 1] = True  # pairs spanning two rows
    bad_before = np.zeros(good.shape[0] + 1, np.int64)
    np.cumsum(~good, out=bad_before[1:])
    lo = np.minimum(off[:-1], good.shape[0])
    hi = np.clip(off[1:] - 1, lo, good.shape[0])
    return bad_before[hi] == bad_before[lo]


def _header(path: Path) -> list[str]:
    """The column names of a CSV(.gz) file (its first line)."""
    import csv
    import gzip

    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            return next(csv.reader([fh.readline()]), [])
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: cannot read as CSV: {one_line(exc)}") from None


# --------------------------------------------------------------------------- the import
def import_moe_beyond(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    steps: str = "per-token",
    model: ModelOptions | None = None,
    token: str = "auto",
    limit: int | None = None,
    jobs: int | None = None,
) -> ImportResult:
    """Import MoE-Beyond CSV files (or folders of them) into the trace ``out``.

    Args:
        sources: files ``prompt_N_*.csv[.gz]`` and/or folders holding them.
        out: the ``.parquet`` trace to write (atomically).
        steps: ``"per-token"`` (each token a decode step) or ``"per-sequence"`` (each prompt
            one prefill step).
        model: model-shape options (default: the deepseek-v2-lite preset).
        token: the ``Token`` column: ``"auto"`` (text, unless it holds the token index 0..n-1),
            ``"text"``, ``"index"`` (checked, not stored) or ``"none"``.
        limit: import only the first ``limit`` files in sequence-number order.
        jobs: worker processes (default: up to 2).
    """
    timer = Timer()
    if steps not in STEP_CHOICES:
        raise ConfigError(f"--steps: expected one of {', '.join(STEP_CHOICES)}, got {steps!r}")
    if token not in TOKEN_CHOICES:
        raise ConfigError(f"--token: expected one of {', '.join(TOKEN_CHOICES)}, got {token!r}")
    model = model or ModelOptions()
    files = expand_sources([str(s) for s in sources], PATTERNS, "MoE-Beyond CSV files")
    numbered = []
    for f in files:
        n = number_in_name(f)
        if n is None:
            raise TraceError(
                f"{f}: expected a number in the file name (prompt_N_...): it is the sequence id"
            )
        numbered.append((n, f))
    numbered.sort(key=lambda x: x[0])
    for (a, fa), (b, fb) in zip(numbered, numbered[1:], strict=False):
        if a == b:
            raise TraceError(
                f"{fb}: sequence number {b} already taken by {fa} (one file per sequence)"
            )
    if limit is not None:
        numbered = numbered[:limit]
    numbers = np.array([n for n, _ in numbered], np.int64)
    paths = [str(f) for _, f in numbered]
    with_pred = COL_PREDICTED in _header(numbered[0][1])

    # ---- parse (chunks of files, in a process pool where it pays)
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(paths)))
    if jobs == 1 or len(paths) < POOL_MIN_FILES:
        parts = [_read_chunk(paths, token, with_pred)]
    else:
        n_chunks = min(len(paths), jobs * 8)
        bounds = np.linspace(0, len(paths), n_chunks + 1).astype(int)
        chunks = [paths[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            parts = list(
                pool.map(_read_chunk, chunks, [token] * len(chunks), [with_pred] * len(chunks))
            )

    rows_per_file = np.concatenate([p["rows"] for p in parts])
    raw_layer = np.concatenate([p["layer"] for p in parts])
    pos = np.concatenate([p["pos"] for p in parts])
    act_off, act_val = csr_concat([p["act"] for p in parts])
    preds = None
    if with_pred:
        preds = csr_concat([p["pred"] for p in parts])
    text_files = np.concatenate([p["text_files"] for p in parts])
    ascending = np.concatenate([p["ascending"] for p in parts])

    # ---- layers: dense 0..L-1; every file must hold every layer, same rows at each
    layer_ids, lidx = _dense(raw_layer)
    L = int(layer_ids.shape[0])
    F = len(paths)
    file_of = np.repeat(np.arange(F, dtype=np.int64), rows_per_file)
    counts = np.bincount(file_of * L + lidx, minlength=F * L).reshape(F, L)
    ok = (counts.min(axis=1) > 0) & (counts.min(axis=1) == counts.max(axis=1))
    if not ok.all():
        f = int(np.flatnonzero(~ok)[0])
        c = counts[f]
        if c.min() == 0:
            missing = [int(x) for x in layer_ids[c == 0]]
            raise TraceError(
                f"{paths[f]}: column '{COL_LAYER}': wrong layer count: holds {int((c > 0).sum())} "
                f"of the {L} layers found in the input (missing Layer IDs "
                f"{', '.join(map(str, missing[:5]))}{'...' if len(missing) > 5 else ''})"
            )
        lo, hi = int(np.argmin(c)), int(np.argmax(c))
        raise TraceError(
            f"{paths[f]}: column '{COL_LAYER}': layer {int(layer_ids[hi])} has {int(c[hi])} rows "
            f"but layer {int(layer_ids[lo])} has {int(c[lo])}: expected one row per token at "
            "every layer"
        )
    tokens = counts[:, 0].astype(np.int64)

    meta = build_meta(
        model,
        [int(x) for x in layer_ids],
        default_preset=DEFAULT_PRESET,
        model_name=model.model,
        source="",
        steps=steps,
        pred_source="moe-beyond" if with_pred else "",
    )
    preset_name = meta.extra.get("preset")
    if preset_name and L != get_preset(preset_name).num_layers:
        raise TraceError(
            f"{paths[0]}: column '{COL_LAYER}': wrong layer count: the input has {L} layers "
            f"(Layer IDs {int(layer_ids[0])}..{int(layer_ids[-1])}), expected "
            f"{get_preset(preset_name).num_layers} for preset {preset_name}"
        )
    if not model.preset and not model.model:
        meta.model = DEFAULT_MODEL
    meta.source = (
        f"moesim import moe-beyond {' '.join(str(s) for s in sources)} --steps {steps}"
        + (f" --limit {limit}" if limit is not None else "")
    )
    extra = meta.extra
    extra["importer"] = "moe-beyond"
    extra["files"] = F
    extra["sequence_ids"] = "the number in each file name (prompt_N_...)"
    if steps == "per-token":
        extra["steps_note"] = (
            "captured as one forward pass per prompt; replayed token by token (each token its "
            "own decode step), as MoE-Beyond's simulator does"
        )
    else:
        extra["steps_note"] = (
            "captured as one forward pass per prompt: each prompt is one prefill step"
        )
    if ascending.all():
        extra["expert_order"] = "ascending expert id: the files do not keep the router's rank order"
    elif ascending.any():
        extra["expert_order"] = (
            f"ascending expert id in {int(ascending.sum())} of {F} files (rank order lost there)"
        )
    else:
        extra["expert_order"] = (
            "as logged by the gate hook; DeepSeek-V2's gate calls torch.topk(sorted=False), so "
            "this need not be strict rank order"
        )
    if with_pred:
        extra["pred_note"] = PRED_NOTE
    if text_files.any() and not text_files.all():
        extra["token_note"] = "token text in some files only (the others hold the token index)"

    # ---- replay order by index arithmetic: (step, layer, seq, pos)
    tok_base = np.zeros(F, np.int64)
    np.cumsum(tokens[:-1], out=tok_base[1:])
    fb = tok_base[file_of]
    if steps == "per-token":
        dest = (fb + pos) * L + lidx
    else:
        dest = fb * L + lidx * tokens[file_of] + pos
    n = dest.shape[0]
    order = np.empty(n, np.int64)
    order[dest] = np.arange(n)
    f_out = file_of[order]
    pos_out = pos[order]
    if steps == "per-token":
        step = tok_base[f_out] + pos_out
        phase = np.full(n, PHASE_DECODE, np.int8)
    else:
        step = f_out
        phase = np.full(n, PHASE_PREFILL, np.int8)
    off, ex = csr_take(act_off, act_val, order)
    pred_cols = None
    if preds is not None:
        pred_cols = {1: csr_take(preds[0], preds[1], order)}
    token_arr = None
    if text_files.any():
        token_arr = pa.chunked_array([p["token"] if p["token"] is not None
                                      else pa.nulls(int(p["rows"].sum()), pa.string())
                                      for p in parts], pa.string()).combine_chunks()  # fmt: skip
        token_arr = token_arr.take(pa.array(order))
    where = paths[0] if F == 1 else f"{Path(paths[0]).parent} ({F} files)"
    rows, acts, seqs, nsteps = write_imported(
        out, meta, where=where, step=step, seq=numbers[f_out], pos=pos_out, phase=phase,
        layer=lidx[order], offsets=off, experts=ex, token=token_arr, preds=pred_cols,
    )  # fmt: skip
    return ImportResult(
        path=Path(out), kind="MoE-Beyond CSV", files=F, rows=rows, activations=acts,
        sequences=seqs, steps=nsteps, layers=L, seconds=timer.seconds, meta=meta,
    )  # fmt: skip


def _dense(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (sorted) and each element's index among them; bincount when ids are small."""
    lo, hi = int(raw.min()), int(raw.max())
    if hi - lo > 1 << 16:
        ids, inverse = np.unique(raw, return_inverse=True)
        return ids, inverse.astype(np.int64)
    present = np.bincount(raw - lo, minlength=hi - lo + 1) > 0
    lookup = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, lookup[raw - lo]


# --------------------------------------------------------------------------- CLI
def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "moe-beyond",
        help="MoE-Beyond per-prompt CSV captures (DeepSeek-V2-Lite)",
        description="Import MoE-Beyond captures: a folder of per-prompt files prompt_N_*.csv[.gz] "
        "with columns 'Layer ID', 'Token', 'Activated Expert IDs' and optionally 'Predicted "
        "Expert IDs' (stored as pred_h1). One file is one sequence, with sequence id N; Layer "
        "IDs (1..26) become trace layers 0..25.",
        epilog="example: moesim import moe-beyond shared/traces/real/deepseek-v2-lite-moe-beyond/"
        "puffin-train -o puffin.parquet",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="CSV(.gz) files or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace to write")
    p.add_argument(
        "--steps", choices=STEP_CHOICES, default="per-token",
        help="per-token: each token its own decode step, as MoE-Beyond replays them (default); "
        "per-sequence: each prompt one prefill step",
    )  # fmt: skip
    p.add_argument(
        "--token", choices=TOKEN_CHOICES, default="auto",
        help="the Token column: auto (text, unless it is the token index 0..n-1), text, index "
        "(checked, not stored) or none",
    )  # fmt: skip
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="import only the first N files (by sequence number)")  # fmt: skip
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="worker processes parsing files (default: up to 2)")  # fmt: skip
    add_model_arguments(p, DEFAULT_PRESET)
    p.set_defaults(importer=run_args)
    return p


def run_args(args: argparse.Namespace) -> ImportResult:
    return import_moe_beyond(
        args.sources, args.output, steps=args.steps, model=ModelOptions.from_args(args),
        token=args.token, limit=args.limit, jobs=args.jobs,
    )  # fmt: skip
