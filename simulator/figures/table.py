"""The results table behind the figures: reading it, ``--filter``, panels and series.

The table is ``moesim sweep``'s ``results.parquet`` (one row per run: every key of
``simulator.engine.run``'s result record, plus the grid columns), or records of
``moesim replay --json`` saved as JSON lines (or CSV). Grid columns such records lack are filled
with nulls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.figures.style import series_label, short_text
from traces.errors import ConfigError

RESULTS_FILE = "results.parquet"
#: Columns every figure needs.
REQUIRED = ("policy", "cache_slots", "cache_fraction")
#: Grid columns a table may lack (``moesim replay --json`` records), with their fill value.
OPTIONAL = {
    "trace": None,
    "prefetch": "none",
    "horizon": 0,
    "mode": None,
    "access": None,
    "scope": None,
    "bandwidth_gbps": np.nan,
    "latency_s": np.nan,
    "engines": np.nan,
    "run_key": None,
}
#: Settings that split a figure into panels where they take several values (title order).
FACETS = (
    "trace",
    "mode",
    "access",
    "scope",
    "bandwidth_gbps",
    "latency_s",
    "engines",
    "cache_fraction",
)
#: Link settings: meaningless for count-mode rows (blanked there before panels are made).
LINK = ("bandwidth_gbps", "latency_s", "engines")
#: What a run measured (not a setting): never a reason to tell two rows' settings apart.
OUTCOMES = frozenset(
    "model cache_bytes accesses hits misses inflight_hits hit_rate evictions forced_evictions "
    "deferred_fetches capacity_overflows bytes_moved prefetch_issued prefetch_used "
    "prefetch_wasted prefetch_bytes prefetch_wasted_bytes prefetch_late prefetch_cancelled "
    "prefetch_dropped stall_s late_prefetch_stall_s total_s compute_s link_busy "
    "prefill_s_per_token decode_s_per_token decode_step_s hit_rate_per_layer stall_s_per_layer "
    "kernel_s run_key".split()
)
LIST_COLUMNS = ("hit_rate_per_layer", "stall_s_per_layer")


@dataclass
class Table:
    """A results table and where it came from (``source`` names it in error messages)."""

    df: pd.DataFrame
    source: str
    folder: Path | None = None  # where relative trace paths may also be looked up


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_results(path: str | Path) -> Table:
    """Read a results table (folder with results.parquet, .parquet, .jsonl/.json or .csv)."""
    p = Path(path)
    if p.is_dir():
        if not (p / RESULTS_FILE).exists():
            raise ConfigError(
                f"{p}: no {RESULTS_FILE} in this folder (expected moesim sweep's "
                "output folder or a results file)"
            )
        p = p / RESULTS_FILE
    elif not p.exists():
        raise ConfigError(f"{p}: no such results table")
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".csv", ".jsonl", ".json", ".ndjson"):
        raise ConfigError(
            f"{p}: expected a results table (.parquet), or moesim replay --json "
            "records (.jsonl) or a .csv of them"
        )
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(p)
        elif suffix == ".csv":
            df = pd.read_csv(p)
        else:
            df = pd.read_json(p, lines=True, dtype=False)
    except Exception as exc:  # pyarrow / parser errors: one line naming the file
        raise ConfigError(f"{p}: cannot read the results table: {_one_line(exc)}") from None
    return Table(normalise(df, str(p)), str(p), p.parent)


def normalise(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the columns every figure needs, fill missing grid columns, parse list columns."""
    if df.shape[0] == 0:
        raise ConfigError(f"{source}: the results table has no rows")
    for col in REQUIRED:
        if col not in df.columns:
            raise ConfigError(
                f"{source}: missing column '{col}' (expected moesim sweep's results "
                "table or moesim replay --json records)"
            )
    df = df.copy()
    for col, fill in OPTIONAL.items():
        if col not in df.columns:
            df[col] = fill
    df["prefetch"] = df["prefetch"].where(df["prefetch"].notna(), "none").astype(object)
    df["horizon"] = pd.to_numeric(df["horizon"], errors="coerce").fillna(0).astype(np.int64)
    for col in ("cache_slots", "cache_fraction", *LINK):
        df[col] = _numeric(df[col], col, source)
    if df["cache_fraction"].isna().any() or (df["cache_fraction"] <= 0).any():
        raise ConfigError(
            f"{source}: column 'cache_fraction': expected a fraction > 0 in every row"
        )
    for col in LIST_COLUMNS:
        if col in df.columns:
            df[col] = [_as_list(v, col, source) for v in df[col]]
    for col in df.columns:  # pandas' string dtype -> plain objects (None stays None)
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df.reset_index(drop=True)


def _numeric(col: pd.Series, name: str, source: str) -> pd.Series:
    out = pd.to_numeric(col, errors="coerce")
    bad = out.isna() & col.notna()
    if bad.any():
        raise ConfigError(f"{source}: column '{name}': expected numbers, got {col[bad].iloc[0]!r}")
    return out.astype(np.float64)


def _as_list(v, col: str, source: str):
    """One cell of a list column as float64[] (null -> NaN), or None for a null cell."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ConfigError(
                f"{source}: column '{col}': expected a list of numbers, got {v[:40]!r}"
            ) from None
        if v is None:
            return None
    try:
        return np.array([np.nan if x is None else x for x in v], np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: column '{col}': expected a list of numbers") from None


# --------------------------------------------------------------------------- filters
def parse_filter(text: str) -> tuple[str, list[str]]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise ConfigError(f"--filter {text!r}: expected KEY=VALUE[,VALUE...]")
    return key.strip(), [v.strip() for v in value.split(",") if v.strip()]


def _matches(df: pd.DataFrame, key: str, value: str) -> np.ndarray:
    col = df[key]
    if value.lower() in ("null", "nan"):
        return col.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"--filter {key}={value}: column '{key}' holds numbers") from None
        x = col.to_numpy(np.float64)
        hit = np.isclose(x, v, rtol=1e-9, atol=0.0)
        if key == "cache_fraction":  # 0.1 matches the fraction its rounded slot count gives
            n = df["cache_slots"].to_numpy(np.float64) / x
            hit |= np.abs(x - v) <= 0.5 / n + 1e-12
        return hit
    s = col.astype(object)
    text = s.map(lambda t: "" if t is None else str(t))
    hit = (text == value) | (text.map(lambda t: t.partition(":")[0]) == value)
    if key in ("policy", "prefetch"):
        hit |= text.map(short_text) == value
    if key == "trace":
        hit |= text.map(lambda t: Path(t).name == value or Path(t).stem == value)
    return hit.to_numpy()


def apply_filters(
    df: pd.DataFrame, filters: list[str] | None, source: str, *, strict: bool = True
) -> pd.DataFrame:
    """Rows matching every ``KEY=VALUE[,VALUE...]`` (values of one key: any of them).

    Numbers compare by value (a ``cache_fraction`` matches within half a slot, so 0.1 selects
    the size that rounding 0.1 gave); text by equality, or by the name before ':' (``policy=lfu-
    aged`` matches every parameter setting), ``trace`` also by file name or stem. ``strict``:
    a key that is not a column is an error (else the filter is skipped).
    """
    for text in filters or []:
        key, values = parse_filter(text)
        if key not in df.columns:
            if not strict:
                continue
            raise ConfigError(
                f"--filter {text}: {source} has no column '{key}' "
                f"(columns: {', '.join(map(str, df.columns))})"
            )
        keep = np.zeros(df.shape[0], bool)
        for v in values:
            keep |= _matches(df, key, v)
        if not keep.any():
            present = ", ".join(sorted({_fmt(x) for x in df[key]})[:12])
            raise ConfigError(
                f"--filter {text}: no row of {source} matches (values of '{key}': {present})"
            )
        df = df[keep].reset_index(drop=True)
    return df


def _is_null(x) -> bool:
    return x is None or (isinstance(x, float | np.floating) and np.isnan(x))


def _fmt(x) -> str:
    if _is_null(x):
        return "null"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


# --------------------------------------------------------------------------- panels and series
def trace_names(paths) -> dict[str, str]:
    """A short, unique display name per trace path (the shortest distinct path suffix)."""
    paths = sorted({str(p) for p in paths if p is not None})
    parts = {p: Path(p).with_suffix("").parts for p in paths}
    names = {}
    for p in paths:
        for n in range(1, len(parts[p]) + 1):
            tail = parts[p][-n:]
            if all(q == p or parts[q][-n:] != tail for q in paths):
                names[p] = "/".join(tail)
                break
        else:
            names[p] = p
    return names


def _facet_text(key: str, value, names: dict[str, str], n_obj: float | None) -> str | None:
    if _is_null(value):
        return None
    if key == "trace":
        return names.get(str(value), str(value))
    if key == "mode":
        return f"{value} mode"
    if key == "access":
        return f"{value} access"
    if key == "scope":
        return f"{value} cache"
    if key == "bandwidth_gbps":
        return f"{value:g} GB/s"
    if key == "latency_s":
        return f"latency {value * 1e6:g} µs"
    if key == "engines":
        return f"{int(value)} engine{'s' if value != 1 else ''}"
    if key == "cache_fraction":
        slots = f" ({round(value * n_obj)} experts)" if n_obj else ""
        return f"cache {value * 100:.3g}%{slots}"
    return f"{key}={_fmt(value)}"


def _sort_key(v):
    if _is_null(v):
        return (0, 0, "")
    if isinstance(v, int | float | np.integer | np.floating):
        return (1, float(v), "")
    return (2, 0, str(v))


def add_panels(df: pd.DataFrame, keys) -> tuple[pd.DataFrame, list[str]]:
    """Add a ``panel`` column (title of the row's panel) from the ``keys`` that vary.

    Returns the frame and the panel titles in order (one untitled panel where nothing varies).
    Link settings of count-mode rows are blanked first: they do not apply there.
    """
    df = df.copy()
    if "mode" in df.columns:
        count = (df["mode"] == "count").to_numpy()
        for col in LINK:
            if col in df.columns:
                df.loc[count, col] = np.nan
    timed = df[df["mode"] != "count"] if "mode" in df.columns else df
    varying = [
        k
        for k in keys
        if k in df.columns and (timed if k in LINK else df)[k].nunique(dropna=False) > 1
    ]
    names = trace_names(df["trace"]) if "trace" in df.columns else {}
    n_obj = (df["cache_slots"] / df["cache_fraction"]).round()
    cols = [[None if _is_null(v) else v for v in df[k]] for k in varying]
    tuples = list(zip(*cols, strict=True)) if varying else [()] * df.shape[0]
    order = sorted(set(tuples), key=lambda t: tuple(_sort_key(v) for v in t))
    titles = {}
    for t in order:
        i = tuples.index(t)
        parts = [_facet_text(k, v, names, n_obj.iloc[i]) for k, v in zip(varying, t, strict=True)]
        titles[t] = ", ".join(p for p in parts if p)
    df["panel"] = [titles[t] for t in tuples]
    return df, [titles[t] for t in order]


def add_series(df: pd.DataFrame) -> pd.DataFrame:
    """Add a ``series`` column: policy [+ prefetcher [h=H where several horizons]]."""
    df = df.copy()
    base = [series_label(p, f) for p, f in zip(df["policy"], df["prefetch"], strict=True)]
    df["_base"] = base
    multi = df[df["prefetch"] != "none"].groupby("_base")["horizon"].nunique()
    multi = set(multi[multi > 1].index)
    df["series"] = [
        series_label(p, f, h if b in multi else None)
        for p, f, h, b in zip(df["policy"], df["prefetch"], df["horizon"], base, strict=True)
    ]
    return df.drop(columns="_base")


def check_unique(
    df: pd.DataFrame, keys: list[str], y: str, source: str, where: str
) -> pd.DataFrame:
    """One row per ``keys``: identical duplicates are dropped; differing ones are an error
    naming the setting columns that tell them apart (so that ``--filter`` can pick one)."""
    dup = df.duplicated(keys, keep=False)
    if not dup.any():
        return df
    for _, grp in df[dup].groupby(keys, sort=False, dropna=False):
        vals = grp[y].to_numpy()
        if isinstance(vals[0], np.ndarray):
            same = all(np.array_equal(v, vals[0], equal_nan=True) for v in vals)
        else:
            same = bool(
                np.all(np.isclose(vals.astype(float), float(vals[0]), rtol=1e-12, equal_nan=True))
            )
        if same:
            continue
        settings = [
            c
            for c in grp.columns
            if c not in OUTCOMES
            and c not in keys
            and c not in ("panel", "series")
            and grp[c].astype(str).nunique() > 1
        ]
        first = grp.iloc[0]
        what = ", ".join(f"{k}={_fmt(first[k])}" for k in keys if k != "panel")
        panel = f" in panel '{first['panel']}'" if first.get("panel") else ""
        if settings:
            hint = f"they differ in {', '.join(settings)}; choose with --filter {settings[0]}=VALUE"
        else:
            hint = "their settings are equal"
        raise ConfigError(
            f"{source}: {grp.shape[0]} rows with different '{y}' for {what}"
            f"{panel} ({where}); {hint}"
        )
    return df.drop_duplicates(keys).reset_index(drop=True)
