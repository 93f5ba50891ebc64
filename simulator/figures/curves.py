"""Line figures from the results table: hit rate, stall time and time per token against cache
size, and hit rate against link bandwidth; one line per series, one panel per setting that
varies (trace, mode, scope, bandwidth, ...).

Each figure has a *data* function returning the tidy frame that is drawn (columns ``panel``,
``series``, ``bound``, ``x``, ``y`` in plotted units, and ``slots`` for cache sizes) and a
*draw* function that consumes only that frame, so tests check the plotted numbers directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simulator.figures.style import is_bound, legend_label, new_figure, series_order, series_style
from simulator.figures.table import FACETS, Table, add_panels, add_series, check_unique
from traces.errors import ConfigError

#: Most panels one figure holds; more is an error suggesting --filter.
MAX_PANELS = 16


@dataclass(frozen=True)
class Metric:
    """A figure: which column against which, in which units."""

    name: str  # the --kind
    column: str  # the table's column plotted on y
    scale: float  # table unit -> plotted unit
    ylabel: str
    x: str  # "cache_fraction" or "bandwidth_gbps"
    timed_only: bool
    title: str


FIGURES = {
    "hit-rate": Metric(
        "hit-rate",
        "hit_rate",
        100.0,
        "hit rate (%)",
        "cache_fraction",
        False,
        "hit rate vs cache size",
    ),
    "stall": Metric(
        "stall",
        "stall_s",
        1.0,
        "stall time, whole run (s)",
        "cache_fraction",
        True,
        "stall time vs cache size",
    ),
    "time-per-token": Metric(
        "time-per-token",
        "decode_step_s",
        1e3,
        "decode time per output token (ms)",
        "cache_fraction",
        True,
        "time per output token vs cache size",
    ),
    "bandwidth": Metric(
        "bandwidth",
        "hit_rate",
        100.0,
        "hit rate (%)",
        "bandwidth_gbps",
        True,
        "hit rate vs link bandwidth",
    ),
}

X_LABELS = {
    "cache_fraction": "cache size (% of all routed experts)",
    "bandwidth_gbps": "link bandwidth (GB/s)",
}


def curve_data(table: Table, kind: str) -> pd.DataFrame:
    """The points of figure ``kind``: panel, series, bound, x, y (plotted units), slots.

    Rows are restricted to timed runs where the figure needs them; rows whose y is null are
    left out; each (panel, series, x) must come from one run (or identical runs).
    """
    m = FIGURES[kind]
    df, src = table.df, table.source
    if m.column not in df.columns:
        raise ConfigError(f"{src}: missing column '{m.column}' for the {kind} figure")
    if m.x not in df.columns:
        raise ConfigError(f"{src}: missing column '{m.x}' for the {kind} figure")
    if m.timed_only:
        df = df[df["mode"] == "timed"]
        if df.empty:
            raise ConfigError(f"{src}: no timed rows (mode='timed') for the {kind} figure")
    y = pd.to_numeric(df[m.column], errors="coerce")
    df = df[y.notna()]
    if df.empty:
        which = "timed row" if m.timed_only else "row"
        raise ConfigError(
            f"{src}: column '{m.column}' is null in every {which}: nothing to plot "
            f"for the {kind} figure"
        )
    xs = df[m.x].dropna().unique()
    if len(xs) < 2:
        what = "cache size" if m.x == "cache_fraction" else "bandwidth"
        unit = ("%", 100.0) if m.x == "cache_fraction" else (" GB/s", 1.0)
        shown = f" ({xs[0] * unit[1]:.3g}{unit[0]})" if len(xs) else ""
        raise ConfigError(f"{src}: one {what} only{shown}; the {kind} figure needs at least two")
    df = df[df[m.x].notna()]
    df = add_series(df)
    df, panels = add_panels(df, [k for k in FACETS if k != m.x])
    if len(panels) > MAX_PANELS:
        raise ConfigError(
            f"{src}: the {kind} figure would need {len(panels)} panels (at most "
            f"{MAX_PANELS}); narrow the table with --filter KEY=VALUE"
        )
    df = check_unique(df, ["panel", "series", m.x], m.column, src, f"{kind} figure")
    scale = 100.0 if m.x == "cache_fraction" else 1.0
    out = pd.DataFrame(
        {
            "panel": df["panel"].to_numpy(object),
            "series": df["series"].to_numpy(object),
            "bound": [is_bound(s) for s in df["series"]],
            "x": df[m.x].to_numpy(np.float64) * scale,
            "y": pd.to_numeric(df[m.column]).to_numpy(np.float64) * m.scale,
            "slots": df["cache_slots"].to_numpy(np.int64),
        }
    )
    out["_p"] = out["panel"].map({p: i for i, p in enumerate(panels)})
    out["_s"] = out["series"].map(series_order)
    out = out.sort_values(["_p", "_s", "x"], kind="stable").drop(columns=["_p", "_s"])
    return out.reset_index(drop=True)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def draw_curves(data: pd.DataFrame, kind: str, title: str = ""):
    """Draw ``curve_data``'s frame: one panel per ``panel``, one line per ``series``."""
    m = FIGURES[kind]
    panels = list(dict.fromkeys(data["panel"]))
    rows, cols = _grid(len(panels))
    # room for the legend: about 0.19 in per entry beside the panels, wider for long labels
    n_series = data["series"].nunique()
    longest = max((len(legend_label(x)) for x in data["series"].unique()), default=10)
    height = max(3.3 * rows + 0.5, 0.19 * n_series + 0.9)
    width = 4.4 * cols + max(1.8, 0.065 * longest + 0.6)
    fig, axes = new_figure(width, height, rows, cols, sharex=True, sharey=True)
    handles = {}
    for i, panel in enumerate(panels):
        ax = axes[i // cols, i % cols]
        part = data[data["panel"] == panel]
        for series, line in part.groupby("series", sort=False):
            st = series_style(series)
            (h,) = ax.plot(
                line["x"],
                line["y"],
                color=st.color,
                linestyle=st.linestyle,
                marker=st.marker,
                ms=4,
                lw=1.4,
                label=legend_label(series),
            )
            handles.setdefault(series, h)
        if panel:
            ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        if m.x == "bandwidth_gbps":
            _log_bandwidth_axis(ax, data["x"].to_numpy())
        elif i // cols == 0:
            _slots_axis(ax, part)
        if i // cols == rows - 1 or i + cols >= len(panels):
            ax.set_xlabel(X_LABELS[m.x])
        if i % cols == 0:
            ax.set_ylabel(m.ylabel)
    axes[0, 0].set_ylim(bottom=0)  # after every line: the shared axes autoscale first
    for j in range(len(panels), rows * cols):
        axes[j // cols, j % cols].set_visible(False)
    order = sorted(handles, key=series_order)
    fig.legend(
        [handles[s] for s in order],
        [legend_label(s) for s in order],
        loc="outside right upper",
        fontsize=8,
        title="policy + prefetcher",
        title_fontsize=8,
    )
    # left-aligned: the legend sits beside the panels, top right, where a centred title would be
    fig.suptitle(f"{title}: {m.title}" if title else m.title, x=0.01, ha="left")
    return fig


def _slots_axis(ax, part: pd.DataFrame) -> None:
    """A top axis in experts, where the panel's rows agree on the number of experts."""
    n = np.unique(np.round(part["slots"].to_numpy() / (part["x"].to_numpy() / 100)))
    if n.size != 1 or not n[0] > 0:
        return
    total = float(n[0])
    sec = ax.secondary_xaxis(
        "top", functions=(lambda p: p * total / 100, lambda s: s * 100 / total)
    )
    sec.set_xlabel(f"cache size (experts of {int(total)})", fontsize=8)
    sec.tick_params(labelsize=7)


def _log_bandwidth_axis(ax, xs: np.ndarray) -> None:
    vals = np.unique(xs[xs > 0])
    if vals.size and vals.max() / vals.min() >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(vals, [f"{v:g}" for v in vals])
    ax.minorticks_off()
