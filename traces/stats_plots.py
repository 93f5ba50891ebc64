"""Figures of ``moesim stats --plot DIR`` (matplotlib, Agg; no pyplot global state).

Each function draws one figure from a :class:`traces.stats.TraceStats` and writes a PNG;
:func:`write_plots` writes them all and returns their paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from traces.errors import ConfigError
from traces.stats import GROUP_KINDS, PHASES, TraceStats, step_bin_edges

DPI = 110


def _figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw):
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _title(stats: TraceStats) -> str:
    return str(stats.info.get("model") or "trace")


def _layer_ticks(ax, stats: TraceStats, axis: str = "x") -> None:
    """Label layers with the model's layer numbers (at most ~20 ticks)."""
    L = stats.num_layers
    step = max(1, int(np.ceil(L / 20)))
    ticks = np.arange(0, L, step)
    labels = [str(stats.layer_ids[t]) for t in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels)
    else:
        ax.set_yticks(ticks, labels)


def plot_popularity(stats: TraceStats, path: Path) -> Path:
    """Heatmap layers x experts of the load share x E (1 = uniform), log colour scale."""
    L = stats.num_layers
    E = stats.experts_per_layer
    load = stats.popularity["share"] * E[:, None]
    fig, ax = _figure(min(14, 4 + 0.06 * E.max()), min(12, 2.5 + 0.22 * L))
    ax = ax[0, 0]
    masked = np.ma.masked_invalid(np.where(load > 0, load, np.nan))
    vmax = float(np.nanmax(load)) if np.isfinite(load).any() and np.nanmax(load) > 0 else 1.0
    vmin = float(masked.min()) if masked.count() else 0.1
    norm = LogNorm(vmin=max(min(vmin, 1.0 / max(vmax, 1.0)), 1e-3), vmax=max(vmax, 1.0001))
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (model numbering)")
    _layer_ticks(ax, stats, "y")
    ax.set_title(f"{_title(stats)}: expert load (share x experts; 1 = uniform, blank = unused)")
    fig.colorbar(im, ax=ax, label="load relative to uniform")
    return _save(fig, path)


def plot_reuse(stats: TraceStats, path: Path) -> Path:
    """Histograms: per-layer LRU stack distance and the distance in steps, by group kind."""
    r = stats.reuse
    fig, axes = _figure(12, 4.2, 1, 2)
    ax0, ax1 = axes[0]
    max_e = int(stats.experts_per_layer.max())
    x = np.arange(max_e)
    kinds = [k for k in range(3) if r.stack_kind[k].sum() > 0]
    width = 0.8 / max(len(kinds), 1)
    for n, k in enumerate(kinds):
        h = r.stack_kind[k] / max(r.accesses_kind[k], 1)
        ax0.bar(x + (n - (len(kinds) - 1) / 2) * width, h, width, label=f"{GROUP_KINDS[k]} groups")
    ax0.set_xlabel("LRU stack distance within the layer (distinct other experts in between)")
    ax0.set_ylabel("share of accesses")
    ax0.set_title("per-layer reuse (cold accesses excluded)")
    if kinds:
        ax0.legend()
    edges = step_bin_edges()
    for k in kinds:
        h = r.step_kind[k]
        used = np.flatnonzero(h)
        if not used.size:
            continue
        top = int(used.max()) + 1
        lo = edges[:top].astype(float)
        hi = edges[1 : top + 1].astype(float)
        dens = h[:top] / max(r.accesses_kind[k], 1)
        ax1.stairs(dens / (hi - lo), np.r_[lo, hi[-1]], label=f"{GROUP_KINDS[k]} groups")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("steps since the same expert's last use")
    ax1.set_ylabel("share of accesses per step of distance")
    ax1.set_title("reuse distance in steps")
    if kinds:
        ax1.legend()
    fig.suptitle(f"{_title(stats)}: reuse distance")
    return _save(fig, path)


def plot_lru_curve(stats: TraceStats, path: Path) -> Path:
    """Hit ratio of LRU against cache size: one shared cache, and per-layer slots."""
    r = stats.reuse
    fig, axes = _figure(11, 4, 1, 2)
    ax0, ax1 = axes[0]
    total = max(int(r.accesses_kind.sum()), 1)
    O = r.num_objects
    hits = np.cumsum(r.global_hist)
    cap = np.arange(1, hits.shape[0] + 1)
    ax0.plot(np.r_[0, cap] / O * 100, np.r_[0, hits] / total)
    ax0.set_xlim(0, 100)
    ax0.set_ylim(0, 1)
    ax0.set_xlabel(f"shared cache size (% of {O} routed experts)")
    ax0.set_ylabel("hit ratio")
    ax0.set_title("one LRU shared by all layers")
    acc = max(int(r.accesses.sum()), 1)
    h = np.cumsum(r.stack_hist.sum(axis=0)) / acc
    slots = np.arange(1, h.shape[0] + 1)
    ax1.plot(np.r_[0, slots], np.r_[0, h])
    ax1.set_ylim(0, 1)
    ax1.set_xlabel("slots per layer")
    ax1.set_ylabel("hit ratio")
    ax1.set_title("one LRU per layer")
    fig.suptitle(f"{_title(stats)}: LRU hit ratio in replay order (cold misses included)")
    return _save(fig, path)


def plot_layers(stats: TraceStats, path: Path) -> Path:
    """Per-layer lines: entropy and hot share, consecutive-token overlap, layer-to-layer recall."""
    L = stats.num_layers
    x = np.arange(L)
    present = stats.phases_present()
    panels = 4 if len(present) == 2 else 3
    fig, axes = _figure(max(7, min(16, 4 + 0.15 * L)), 2.4 * panels, panels, 1, sharex=True)
    ax = axes[:, 0]
    pop = stats.popularity
    ax[0].plot(x, pop["entropy_norm"], "o-", ms=3, label="entropy / log2 E (all)")
    if len(present) == 2:
        for p in present:
            ax[0].plot(x, stats.popularity_phase[p]["entropy_norm"], ".--", label=PHASES[p])
    ax[0].plot(x, pop["top10_share"], "s-", ms=3, label="share of hottest 10%")
    ax[0].set_ylim(0, 1.02)
    ax[0].set_title("popularity")
    ax[0].legend(fontsize=8, ncol=2, loc="center right")
    ov = stats.overlap
    ax[1].plot(x, ov.mean, "o-", ms=3, label="overlap of consecutive tokens")
    ax[1].plot(x, ov.chance, ":", label="chance (uniform)")
    ax[1].plot(x, stats.overlap_chance_pop, "--", label="chance (layer popularity)")
    ax[1].set_title("consecutive-token overlap |E_t ∩ E_t+1| / k")
    ax[1].legend(fontsize=8)
    if L > 1:
        c = stats.coact
        xs = x[:-1]
        ax[2].plot(xs, c.recall(0), "o-", ms=3, label="co-occurrence predictor (in-sample)")
        ax[2].plot(xs, c.recall(1), ".--", label="co-occurrence predictor (2-fold)")
        ax[2].plot(xs, c.recall(2), ":", label="popularity predictor")
        ax[2].plot(xs, c.nmi, "^-", ms=3, label="normalised MI")
        ax[2].legend(fontsize=8, ncol=2)
    ax[2].set_ylim(0, 1.02)
    ax[2].set_title("layer l -> l+1: top-k recall of l+1's experts (at layer l)")
    if panels == 4:
        ax[3].plot(x, stats.js, "o-", ms=3)
        ax[3].set_title("Jensen-Shannon divergence prefill vs decode popularity (bits)")
        ax[3].set_ylim(bottom=0)
    ax[-1].set_xlabel("layer (model numbering)")
    _layer_ticks(ax[-1], stats)
    fig.suptitle(f"{_title(stats)}: per-layer statistics")
    return _save(fig, path)


def default_pair(stats: TraceStats) -> int:
    """The layer pair (l, l+1) with the highest normalised MI (0 where none is defined)."""
    nmi = stats.coact.nmi
    return int(np.nanargmax(nmi)) if np.isfinite(nmi).any() else 0


def plot_coactivation(stats: TraceStats, path: Path, pair: int | None = None) -> Path:
    """P(b at l+1 | a at l) as a matrix for one layer pair."""
    if stats.num_layers < 2:
        raise ConfigError("co-activation needs at least 2 layers")
    pair = default_pair(stats) if pair is None else pair
    ea = int(stats.experts_per_layer[pair])
    eb = int(stats.experts_per_layer[pair + 1])
    P = stats.coact.conditional(pair)[:ea, :eb]
    fig, ax = _figure(min(12, 3 + 0.09 * eb), min(11, 2.5 + 0.09 * ea))
    ax = ax[0, 0]
    vmax = max(float(np.nanmax(P)) if np.isfinite(P).any() else 1.0, 1e-9)
    im = ax.imshow(
        np.ma.masked_invalid(P),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
    )
    la, lb = stats.layer_ids[pair], stats.layer_ids[pair + 1]
    ax.set_xlabel(f"expert b at layer {lb}")
    ax.set_ylabel(f"expert a at layer {la}")
    nmi = stats.coact.nmi[pair]
    ax.set_title(f"{_title(stats)}: P(b | a), layers {la} -> {lb} (NMI {nmi:.3f})")
    fig.colorbar(im, ax=ax, label="P(b at next layer | a)")
    return _save(fig, path)


def write_plots(
    stats: TraceStats, out_dir: str | os.PathLike, pair: int | None = None
) -> list[Path]:
    """Write every figure into ``out_dir`` (created); return the paths written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--plot: '{out}' exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--plot: cannot create folder '{out}': {exc.strerror}") from None
    paths = [
        plot_popularity(stats, out / "popularity_heatmap.png"),
        plot_reuse(stats, out / "reuse_distance.png"),
        plot_lru_curve(stats, out / "lru_hit_ratio.png"),
        plot_layers(stats, out / "per_layer.png"),
    ]
    if stats.num_layers > 1:
        paths.append(plot_coactivation(stats, out / "coactivation.png", pair))
    return paths
