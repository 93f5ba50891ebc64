"""Heatmaps: per-layer hit rate of each series at one cache size (from the results table), and
expert popularity per layer (from a trace).

As for the line figures, ``*_data`` functions return the tidy frame that ``draw_*`` consumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from simulator.figures.style import is_bound, legend_label, new_figure, series_order, series_style
from simulator.figures.table import FACETS, Table, add_panels, add_series, check_unique
from traces.errors import ConfigError
from traces.trace import Trace

MAX_PANELS = 8


def pick_fraction(fractions, target: float | None) -> float:
    """The cache fraction present in ``fractions`` nearest ``target`` (default: the median size,
    the lower one of the two middle sizes for an even count)."""
    vals = np.unique(np.asarray(fractions, np.float64))
    if target is None:
        return float(vals[(vals.size - 1) // 2])
    return float(vals[np.argmin(np.abs(vals - target))])


def layer_heatmap_data(table: Table, cache_fraction: float | None = None) -> pd.DataFrame:
    """Per-layer hit rate (%) by panel, series and layer, at one cache size per panel.

    The size is the one nearest ``cache_fraction`` (default: the median size of the table);
    a requested size more than half a slot away from every size of a panel is an error.
    Columns: panel, series, bound, layer, y (%, NaN for a layer without accesses),
    cache_fraction, slots.
    """
    df, src = table.df, table.source
    col = "hit_rate_per_layer"
    if col not in df.columns:
        raise ConfigError(f"{src}: missing column '{col}' for the layer-heatmap figure")
    df = df[[v is not None for v in df[col]]]
    if df.empty:
        raise ConfigError(
            f"{src}: column '{col}' is null in every row: nothing to plot for the "
            "layer-heatmap figure"
        )
    target = cache_fraction
    if target is None:
        target = pick_fraction(df["cache_fraction"], None)
    df = add_series(df)
    df, panels = add_panels(df, [k for k in FACETS if k != "cache_fraction"])
    if len(panels) > MAX_PANELS:
        raise ConfigError(
            f"{src}: the layer-heatmap figure would need {len(panels)} panels (at "
            f"most {MAX_PANELS}); narrow the table with --filter KEY=VALUE"
        )
    parts = []
    for panel in panels:
        part = df[df["panel"] == panel]
        f = pick_fraction(part["cache_fraction"], target)
        n_obj = float(np.median(part["cache_slots"] / part["cache_fraction"]))
        if cache_fraction is not None and abs(f - cache_fraction) > 0.5 / n_obj + 1e-12:
            sizes = ", ".join(f"{v:g}" for v in np.unique(part["cache_fraction"]))
            where = f" in panel '{panel}'" if panel else ""
            raise ConfigError(
                f"--cache-fraction {cache_fraction:g}: no such cache size in {src}"
                f"{where} (cache_fraction values: {sizes})"
            )
        part = part[part["cache_fraction"] == f]
        part = check_unique(part, ["panel", "series"], col, src, "layer-heatmap figure")
        slots = int(part["cache_slots"].iloc[0])
        size = f"cache {f * 100:.3g}% ({slots} experts)"
        title = f"{panel}, {size}" if panel else size
        for _, row in part.iterrows():
            hr = row[col]
            parts.append(
                pd.DataFrame(
                    {
                        "panel": title,
                        "series": row["series"],
                        "bound": is_bound(row["series"]),
                        "layer": np.arange(hr.shape[0]),
                        "y": hr * 100.0,
                        "cache_fraction": f,
                        "slots": slots,
                    }
                )
            )
    out = pd.concat(parts, ignore_index=True)
    order = {p: i for i, p in enumerate(dict.fromkeys(out["panel"]))}
    out["_p"] = out["panel"].map(order)
    out["_s"] = out["series"].map(series_order)
    out = out.sort_values(["_p", "_s", "layer"], kind="stable").drop(columns=["_p", "_s"])
    return out.reset_index(drop=True)


def draw_layer_heatmap(data: pd.DataFrame, title: str = ""):
    """Series (rows) x layers (columns) per panel; one shared colour scale from 0."""
    panels = list(dict.fromkeys(data["panel"]))
    mats = []
    for panel in panels:
        part = data[data["panel"] == panel]
        series = sorted(dict.fromkeys(part["series"]), key=series_order)
        mat = part.pivot(index="series", columns="layer", values="y").reindex(series)
        mats.append(mat)
    n_layers = max(m.shape[1] for m in mats)
    heights = [max(1.2, 0.28 * m.shape[0] + 0.9) for m in mats]
    fig, axes = new_figure(
        min(16, 3.0 + 0.32 * n_layers),
        sum(heights) + 0.6,
        len(mats),
        1,
        gridspec_kw={"height_ratios": heights},
    )
    finite = data["y"].to_numpy()
    vmax = float(np.nanmax(finite)) if np.isfinite(finite).any() else 100.0
    vmax = min(100.0, max(1.0, np.ceil(vmax / 5) * 5))
    im = None
    for ax, panel, mat in zip(axes[:, 0], panels, mats, strict=True):
        im = ax.imshow(
            np.ma.masked_invalid(mat.to_numpy(np.float64)),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
        )
        ax.set_yticks(np.arange(mat.shape[0]), [legend_label(s) for s in mat.index], fontsize=8)
        for tick, series in zip(ax.get_yticklabels(), mat.index, strict=True):
            tick.set_color(series_style(series).color)
        step = max(1, int(np.ceil(mat.shape[1] / 32)))
        ax.set_xticks(np.arange(0, mat.shape[1], step))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(panel, fontsize=9)
    axes[-1, 0].set_xlabel("MoE layer (index in the trace)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="hit rate (%)", shrink=0.9)
    name = "per-layer hit rate (blank: layer without accesses)"
    fig.suptitle(f"{title}: {name}" if title else name)
    return fig


# --------------------------------------------------------------------------- popularity
def resolve_trace(path: str, folder: Path | None) -> Path:
    """A trace path from the table: as written, else relative to the table's folder."""
    p = Path(path)
    if p.exists():
        return p
    if folder is not None and not p.is_absolute() and (folder / p).exists():
        return folder / p
    raise ConfigError(
        f"trace '{path}' (the results table's 'trace' column) not found; pass it with --trace PATH"
    )


def popularity_data(trace: Trace) -> pd.DataFrame:
    """Routed activations per (layer, expert): count, share of the layer's activations, and
    load = share x experts in the layer (1 = uniform). Experts a layer does not have are left
    out; layers are the trace's indices 0..L-1 with ``layer_id`` the model's numbering."""
    from traces.stats import popularity_counts

    counts, _ = popularity_counts(trace)
    c = counts.sum(axis=0)  # [L, Emax] over both phases
    epl = np.asarray(trace.meta.experts_per_layer, np.int64)
    lay, ex = np.nonzero(np.arange(c.shape[1])[None, :] < epl[:, None])
    n = c[lay, ex].astype(np.float64)
    tot = c.sum(axis=1).astype(np.float64)
    share = np.divide(n, tot[lay], out=np.zeros_like(n), where=tot[lay] > 0)
    ids = np.asarray(trace.meta.layer_ids, np.int64)
    return pd.DataFrame(
        {
            "layer": lay,
            "layer_id": ids[lay],
            "expert": ex,
            "count": c[lay, ex],
            "share": share,
            "load": share * epl[lay],
        }
    )


def draw_popularity(data: pd.DataFrame, title: str = ""):
    """Layers (rows) x experts (columns) of load relative to uniform, log colour scale."""
    mat = data.pivot(index="layer", columns="expert", values="load")
    L, E = mat.shape
    load = mat.to_numpy(np.float64)
    fig, axes = new_figure(min(14, 4 + 0.07 * E), min(12, 2.5 + 0.22 * L))
    ax = axes[0, 0]
    masked = np.ma.masked_invalid(np.where(load > 0, load, np.nan))
    vmax = max(float(masked.max()) if masked.count() else 1.0, 1.0001)
    vmin = float(masked.min()) if masked.count() else 0.1
    norm = LogNorm(vmin=max(min(vmin, 1.0 / vmax), 1e-3), vmax=vmax)
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
    ids = data.drop_duplicates("layer").set_index("layer")["layer_id"].reindex(mat.index)
    step = max(1, int(np.ceil(L / 20)))
    ticks = np.arange(0, L, step)
    ax.set_yticks(ticks, [str(ids.iloc[t]) for t in ticks])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (model numbering)")
    ticks = [2.0**k for k in range(-10, 11) if norm.vmin <= 2.0**k <= norm.vmax]
    fig.colorbar(
        im,
        ax=ax,
        ticks=ticks,
        format="%g",
        label="load: share of the layer's activations x experts (1 = uniform)",
    )
    name = "expert popularity per layer (blank: never routed)"
    ax.set_title(f"{title}: {name}" if title else name, fontsize=10)
    return fig
