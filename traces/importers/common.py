"""Helpers shared by the importers: model metadata, list parsing, ordering, writing, summaries.

Everything here works on whole columns (pyarrow.compute and numpy); nothing loops over rows in
Python. Errors are :class:`traces.errors.TraceError` (bad input data) or
:class:`traces.errors.ConfigError` (bad or missing options), one line each, naming the file and
the column.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from traces.errors import ConfigError, TraceError
from traces.format import TraceMeta
from traces.io import TraceWriter, trace_from_arrays, trace_to_table
from traces.presets import PRESETS, ModelPreset, get_preset
from traces.validate import validate_trace

#: What pyarrow raises on unreadable input (wrapped into TraceError with the file name).
ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError,
                EOFError, gzip.BadGzipFile, UnicodeDecodeError)  # fmt: skip


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, shortened to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# --------------------------------------------------------------------------- model metadata
@dataclass
class ModelOptions:
    """Model shape given on the command line; ``None`` means "from the preset or the file"."""

    preset: str | None = None
    model: str | None = None
    experts_per_layer: int | None = None
    top_k: int | None | str = "unset"  # "unset": not given; None: dynamic routing
    expert_bytes: int | None = None
    shared_experts: int | None = None
    shared_expert_bytes: int | None = None
    dtype: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(
            preset=args.preset,
            model=args.model,
            experts_per_layer=args.experts_per_layer,
            top_k=getattr(args, "top_k", "unset"),
            expert_bytes=args.expert_bytes,
            shared_experts=args.shared_experts,
            shared_expert_bytes=args.shared_expert_bytes,
            dtype=args.dtype,
        )


def _top_k_arg(text: str) -> int | None:
    if text.lower() in ("none", "dynamic"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


positive_int = _positive
non_negative_int = _non_negative


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    """The model-shape options every importer takes."""
    where = f" (default: {default_preset})" if default_preset else ""
    g = parser.add_argument_group(
        "model shape",
        "Layer and expert counts and expert sizes come from a preset; each option below "
        "overrides one field. Presets: " + ", ".join(PRESETS) + ".",
    )
    g.add_argument("--preset", metavar="NAME", help=f"model preset{where}")
    g.add_argument("--model", metavar="NAME", help="model name stored in the trace metadata")
    g.add_argument("--experts-per-layer", type=_positive, metavar="N",
                   help="routed experts in each MoE layer")  # fmt: skip
    g.add_argument("--top-k", type=_top_k_arg, default=argparse.SUPPRESS, metavar="K",
                   help="experts routed per token, or 'none' for dynamic routing")  # fmt: skip
    g.add_argument("--expert-bytes", type=_positive, metavar="B",
                   help="bytes of one routed expert's weights")  # fmt: skip
    g.add_argument("--shared-experts", type=_non_negative, metavar="N",
                   help="always-active shared experts per layer (not in the trace)")  # fmt: skip
    g.add_argument("--shared-expert-bytes", type=_non_negative, metavar="B",
                   help="bytes of one shared expert")  # fmt: skip
    g.add_argument("--dtype", metavar="DTYPE", help="weight dtype the byte sizes assume")


def match_preset(model_name: str | None) -> ModelPreset | None:
    """The preset whose Hugging Face id (or name) the model name starts with, if any.

    ``Qwen/Qwen1.5-MoE-A2.7B-Chat`` matches ``qwen1.5-moe-a2.7b`` (Hugging Face id
    ``Qwen/Qwen1.5-MoE-A2.7B``); the organisation part is ignored. The longest match wins.
    """
    if not model_name:
        return None
    name = model_name.strip().lower().rsplit("/", 1)[-1]
    best, best_len = None, 0
    for p in PRESETS.values():
        for cand in (p.hf_id.lower().rsplit("/", 1)[-1], p.name.lower()):
            if name.startswith(cand) and len(cand) > best_len:
                best, best_len = p, len(cand)
    return best


def build_meta(
    opts: ModelOptions,
    layer_ids: list[int],
    *,
    default_preset: str | None = None,
    model_name: str | None = None,
    file_experts: int | None = None,
    file_top_k: int | None = None,
    source: str = "",
    steps: str = "native",
    pred_source: str = "",
    extra: dict | None = None,
) -> TraceMeta:
    """TraceMeta for ``len(layer_ids)`` layers: options > values the file states > preset.

    The preset is ``--preset``, else one matching ``model_name`` (the file's own model name),
    else ``default_preset``. Raises ConfigError when a field has no source.
    """
    preset = None
    if opts.preset:
        preset = get_preset(opts.preset)
    elif (found := match_preset(model_name)) is not None:
        preset = found
    elif default_preset and not model_name:
        preset = get_preset(default_preset)
    n = len(layer_ids)
    if preset is not None and n > preset.num_layers:
        raise ConfigError(
            f"the input holds {n} MoE layers but preset '{preset.name}' has "
            f"{preset.num_layers}: pass the right --preset"
        )

    missing: list[tuple[str, str]] = []

    def pick(option, from_file, from_preset, what: str, flag: str):
        for value in (option, from_file, from_preset):
            if value is not None:
                return value
        missing.append((what, flag))
        return 1

    experts = pick(opts.experts_per_layer, file_experts, preset and preset.experts,
                   "experts per layer", "--experts-per-layer N")  # fmt: skip
    if opts.top_k != "unset":
        top_k = opts.top_k
    else:
        top_k = pick(None, file_top_k, preset and preset.top_k, "top-k", "--top-k K")
    expert_bytes = pick(opts.expert_bytes, None, preset and preset.expert_bytes,
                        "expert size", "--expert-bytes B")  # fmt: skip
    if missing:
        hint = f"model '{model_name}' matches no preset; " if model_name else ""
        raise ConfigError(
            f"{hint}no {', '.join(w for w, _ in missing)} known: pass --preset NAME or "
            f"{' '.join(f for _, f in missing)}"
        )
    shared = opts.shared_experts
    if shared is None:
        shared = preset.shared_experts if preset else 0
    shared_bytes = opts.shared_expert_bytes
    if shared_bytes is None:
        shared_bytes = preset.shared_expert_bytes if (preset and shared) else 0
    if shared and not shared_bytes:
        raise ConfigError("--shared-experts given without --shared-expert-bytes")
    dtype = opts.dtype or (preset.dtype if preset else "bfloat16")
    model = opts.model or model_name or (preset.hf_id if preset else "unknown")
    meta_extra = dict(extra or {})
    if preset is not None:
        meta_extra.setdefault("preset", preset.name)
    meta = TraceMeta(
        model=model,
        num_layers=n,
        experts_per_layer=[int(experts)] * n,
        top_k=None if top_k is None else int(top_k),
        expert_bytes=[int(expert_bytes)] * n,
        shared_experts=[int(shared)] * n,
        shared_expert_bytes=int(shared_bytes),
        dtype=dtype,
        source=source,
        layer_ids=[int(x) for x in layer_ids],
        steps=steps,
        pred_source=pred_source,
        extra=meta_extra,
    )
    try:
        meta.validate("import")
    except TraceError as exc:
        raise ConfigError(str(exc)) from None
    return meta


# --------------------------------------------------------------------------- inputs
def expand_sources(sources: list[str], patterns: tuple[str, ...], what: str) -> list[Path]:
    """Files named on the command line; folders contribute their files matching ``patterns``."""
    if not sources:
        raise ConfigError(f"no input given: expected {what}")
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
            if not found:
                raise TraceError(f"{p}: folder holds no {what} ({', '.join(patterns)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TraceError(f"{p}: no such file or folder")
    return files


# --------------------------------------------------------------------------- list columns
_INT_RE = r"^\s*-?\d+\s*$"


def parse_list_strings(
    arr: pa.Array, column: str, locate, value_type: pa.DataType | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse strings such as ``"[8, 26, 56]"`` into CSR ``(offsets int64[n+1], values)``.

    Brackets are optional; items are separated by commas and/or whitespace; ``"[]"`` is an empty
    list. ``locate(i)`` names row ``i`` in error messages (e.g. ``"prompt_3.csv.gz line 7"``).
    Vectorised: slice off brackets, split, cast. ``value_type`` defaults to int16.
    """
    value_type = value_type or pa.int16()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    if arr.null_count:
        bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise TraceError(
            f"{locate(bad)}: column '{column}': expected a list like [1, 2], got nothing"
        )
    s = pc.utf8_trim_whitespace(arr)
    has_open = pc.starts_with(s, "[")
    has_close = pc.ends_with(s, "]")
    if not pc.all(pc.equal(has_open, has_close)).as_py():
        bad = int(np.flatnonzero(~pc.equal(has_open, has_close).to_numpy(zero_copy_only=False))[0])
        raise TraceError(
            f"{locate(bad)}: column '{column}': expected a list like [1, 2], "
            f"got {shorten(arr[bad].as_py())}"
        )
    if pc.any(has_open).as_py():
        bracketed = has_open.to_numpy(zero_copy_only=False)
        if bracketed.all():
            s = pc.utf8_slice_codeunits(s, 1, -1)
        else:
            s = pc.if_else(has_open, pc.utf8_slice_codeunits(s, 1, -1), s)
    try:
        return _split_cast(arr, s, column, locate, value_type, regex=False)
    except TraceError:
        # Items separated by whitespace alone ("[1 2 3]"): split on the regex instead.
        if not pc.any(pc.match_substring_regex(s, r"\d\s+\d")).as_py():
            raise
        return _split_cast(arr, s, column, locate, value_type, regex=True)


def _split_cast(arr, s, column, locate, value_type, regex: bool):
    if regex:
        parts = pc.split_pattern_regex(pc.utf8_trim_whitespace(s), r"\s*,\s*|\s+")
    else:
        parts = pc.split_pattern(s, ",")
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    empty = pc.equal(flat, "").to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(arr) + 1, np.int64)
    if empty.any():
        # An empty item is fine only as the whole of an empty list "[]".
        row_of = np.repeat(np.arange(len(arr)), counts)
        empty_rows = row_of[empty]
        if np.any(counts[empty_rows] != 1):
            bad = int(empty_rows[counts[empty_rows] != 1][0])
            raise TraceError(
                f"{locate(bad)}: column '{column}': expected a list like [1, 2], "
                f"got {shorten(arr[bad].as_py())}"
            )
        counts = counts.copy()
        counts[empty_rows] = 0
        flat = flat.filter(pa.array(~empty))
    np.cumsum(counts, out=offsets[1:])
    try:
        values = flat.cast(value_type)
    except ARROW_ERRORS:
        ok = pc.match_substring_regex(flat, _INT_RE).to_numpy(zero_copy_only=False)
        expected = "a list of integer expert ids"
        if ok.all():  # integers, but out of range for the type
            info = np.iinfo(value_type.to_pandas_dtype())
            expected = f"expert ids in {info.min}..{info.max}"
            try:
                as64 = flat.cast(pa.int64()).to_numpy()
                ok = (as64 >= info.min) & (as64 <= info.max)
            except ARROW_ERRORS:  # beyond int64 even
                ok = pc.utf8_length(flat).to_numpy(zero_copy_only=False) <= 6
        bad_items = np.flatnonzero(~ok)
        bad_item = int(bad_items[0]) if bad_items.size else 0
        bad = int(np.searchsorted(offsets, bad_item, side="right") - 1)
        raise TraceError(
            f"{locate(bad)}: column '{column}': expected {expected}, "
            f"got {shorten(arr[bad].as_py())}"
        ) from None
    return offsets, values.to_numpy(zero_copy_only=False)


def fixed_width(offsets: np.ndarray) -> int | None:
    """The common row length of a CSR list, or None when rows differ."""
    lengths = np.diff(offsets)
    if lengths.size == 0:
        return 0
    k = int(lengths[0])
    return k if np.all(lengths == k) else None


def csr_concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CSR lists (offsets, values) end to end into one."""
    if len(parts) == 1:
        return parts[0]
    offs = [parts[0][0]]
    base = int(parts[0][0][-1])
    for o, _ in parts[1:]:
        offs.append(o[1:] + base)
        base += int(o[-1])
    return np.concatenate(offs), np.concatenate([v for _, v in parts])


def csr_take(offsets: np.ndarray, values: np.ndarray, order: np.ndarray):
    """Rows ``order`` of a CSR list, in that order: ``(new_offsets, new_values)``."""
    n = order.shape[0]
    k = fixed_width(offsets)
    if k is not None:
        new_offsets = np.arange(n + 1, dtype=np.int64) * k
        if k == 0:
            return new_offsets, values[:0]
        base = int(offsets[0])
        rows = values[base : base + (offsets.shape[0] - 1) * k].reshape(-1, k)
        return new_offsets, rows[order].ravel()
    lengths = np.diff(offsets)[order]
    new_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    if total == 0:
        return new_offsets, values[:0]
    starts = offsets[:-1][order]
    idx = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(total)
    return new_offsets, values[idx]


def occurrence_index(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key (0, 1, 2, ...)."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    if np.all(keys[1:] >= keys[:-1]):  # already grouped in key order: no sort needed
        starts = np.ones(n, bool)
        starts[1:] = keys[1:] != keys[:-1]
        return np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    new_group = np.ones(n, bool)
    new_group[1:] = sk[1:] != sk[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - group_start
    return out


def dense_layers(raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Model layer numbers -> dense 0..L-1 (in numeric order) and the numbers themselves."""
    ids, inverse = np.unique(raw, return_inverse=True)
    return inverse.astype(np.int16), [int(x) for x in ids]


# --------------------------------------------------------------------------- output
@dataclass
class ImportResult:
    """What an import produced (the CLI prints :meth:`summary`)."""

    path: Path
    kind: str
    files: int
    rows: int
    activations: int
    sequences: int
    steps: int
    layers: int
    seconds: float
    meta: TraceMeta
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.meta
        top = "dynamic top-k" if m.top_k is None else f"top-{m.top_k}"
        text = (
            f"Imported {_n(self.rows, 'row')} ({_n(self.activations, 'expert activation')}) of "
            f"{_n(self.sequences, 'sequence')} in {_n(self.steps, 'step')} ({m.steps}) from "
            f"{_n(self.files, self.kind + ' file')} into {self.path} in {self.seconds:.1f} s; "
            f"model {m.model}: {_n(m.num_layers, 'MoE layer')} (model "
            f"layer{'s' if m.num_layers != 1 else ''} {_ranges(m.layer_ids)}) x "
            f"{m.experts_per_layer[0]} experts, {top}."
        )
        if self.notes:
            text += " " + " ".join(self.notes)
        return text


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _ranges(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[0] + len(ids))) and len(ids) > 2:
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids))


def write_imported(
    out: str | os.PathLike,
    meta: TraceMeta,
    *,
    where: str,
    step,
    seq,
    pos,
    phase,
    layer,
    offsets,
    experts,
    weights=None,
    token_id=None,
    token: pa.Array | None = None,
    preds=None,
) -> tuple[int, int, int, int]:
    """Validate the imported rows (errors name ``where``, the input) and write them atomically.

    Returns ``(rows, activations, sequences, steps)``.
    """
    trace = trace_from_arrays(
        meta, step=step, seq=seq, pos=pos, phase=phase, layer=layer, offsets=offsets,
        experts=experts, weights=weights, token_id=token_id, preds=preds, path=where,
    )  # fmt: skip
    validate_trace(trace)
    table = trace_to_table(trace)
    optional = [c for c in table.column_names if c in ("weights", "token_id")]
    optional += [c for c in table.column_names if c.startswith("pred_h")]
    if token is not None:
        table = table.append_column("token", token.cast(pa.string()))
        optional.append("token")
    writer = TraceWriter(out, meta, optional)
    try:
        writer.write(table)
        writer.close(validate=False)  # validated above, from the very same arrays
    except BaseException:
        writer.abort()
        raise
    steps = int(np.count_nonzero(np.diff(trace.step))) + 1 if trace.num_rows else 0
    return trace.num_rows, trace.num_activations, trace.num_sequences, steps


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def number_in_name(path: Path) -> int | None:
    """The first integer in a file name (``prompt_17_data.csv.gz`` -> 17), or None."""
    m = re.search(r"\d+", path.name)
    return int(m.group()) if m else None
