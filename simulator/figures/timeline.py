"""Gantt-style timeline of a small timed run: copy-engine lanes (demand fetches, prefetches),
the compute stream (dense work, experts) and its stalls, from an event log.

The event log is ``moesim replay --events FILE``'s CSV (or a run's ``_events`` frame): one row
per event with ``kind`` (dense, compute, demand, prefetch, stall), ``group``, ``step``,
``layer``, ``expert``, ``start_s``, ``end_s``, and ``policy``/``bandwidth_gbps`` per run. The log
does not say which copy engine carried a transfer: :func:`link_lanes` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from simulator.figures.style import new_figure
from simulator.figures.table import apply_filters
from traces.errors import ConfigError

KINDS = ("dense", "compute", "demand", "prefetch", "stall")
TRANSFERS = ("demand", "prefetch")
KIND_COLOURS = {
    "dense": "#9e9e9e",
    "compute": "#2ca02c",
    "demand": "#d62728",
    "prefetch": "#1f77b4",
    "stall": "#ff7f0e",
}
KIND_NAMES = {
    "dense": "dense (attention, router)",
    "compute": "expert compute",
    "demand": "demand fetch",
    "prefetch": "prefetch",
    "stall": "stall",
}
REQUIRED = ("kind", "step", "start_s", "end_s")
MAX_RUNS = 6


def read_events(path: str | Path) -> pd.DataFrame:
    """An event-log CSV (moesim replay --events), checked: columns, kinds, times."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such event log")
    try:
        ev = pd.read_csv(p)
    except Exception as exc:
        raise ConfigError(f"{p}: cannot read the event log: {' '.join(str(exc).split())}") from None
    return check_events(ev, str(p))


def check_events(ev: pd.DataFrame, source: str) -> pd.DataFrame:
    for col in REQUIRED:
        if col not in ev.columns:
            raise ConfigError(
                f"{source}: missing column '{col}' (expected moesim replay --events "
                "output: kind, group, step, layer, expert, start_s, end_s)"
            )
    if ev.shape[0] == 0:
        raise ConfigError(f"{source}: the event log has no events")
    bad = ~ev["kind"].isin(KINDS)
    if bad.any():
        raise ConfigError(
            f"{source}: column 'kind': unknown event kind "
            f"{ev['kind'][bad].iloc[0]!r} (expected {', '.join(KINDS)})"
        )
    for col in ("start_s", "end_s", "step"):
        v = pd.to_numeric(ev[col], errors="coerce")
        if v.isna().any():
            raise ConfigError(f"{source}: column '{col}': expected numbers in every row")
    if (ev["end_s"] < ev["start_s"]).any():
        raise ConfigError(f"{source}: an event ends before it starts (end_s < start_s)")
    return ev.reset_index(drop=True)


def link_lanes(start: np.ndarray, end: np.ndarray, engines: int | None = None) -> np.ndarray:
    """Copy-engine lane (0-based) of each transfer, given in the log's order.

    With ``engines`` known this redoes the timed kernel's choice exactly: each transfer goes to
    the engine that frees first (ties: the lowest). Without it, a transfer takes the lane that
    frees first if that lane is free by its start, else a new lane: a valid packing (no two
    transfers of a lane overlap) with as many lanes as transfers ever overlap.
    """
    free: list[float] = [0.0] * engines if engines else []
    lane = np.zeros(start.shape[0], np.int64)
    eps = 1e-12
    for i in range(start.shape[0]):  # one small run's transfers (a few thousand at most)
        s, e = float(start[i]), float(end[i])
        j = min(range(len(free)), key=free.__getitem__) if free else -1
        if j >= 0 and free[j] > s + eps and engines:
            # a log that does not start at the run's start: keep lanes free of overlaps
            j = next((k for k, f in enumerate(free) if f <= s + eps), -1)
        if j < 0 or free[j] > s + eps:
            free.append(e)
            j = len(free) - 1
        free[j] = e
        lane[i] = j
    return lane


def _runs(ev: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = [k for k in ("policy", "bandwidth_gbps") if k in ev.columns]
    if not keys:
        return [("", ev)]
    out = []
    for vals, part in ev.groupby(keys, sort=False, dropna=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        text = []
        for k, v in zip(keys, vals, strict=True):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            text.append(f"{v:g} GB/s" if k == "bandwidth_gbps" else str(v))
        out.append((", ".join(text), part))
    return out


def timeline_data(
    ev: pd.DataFrame,
    steps: int = 2,
    engines: int | None = None,
    source: str = "event log",
    filters: list[str] | None = None,
    strict: bool = True,
) -> pd.DataFrame:
    """The bars of the timeline: run, lane, kind, start_ms, end_ms, step, layer, expert.

    ``steps``: keep the first ``steps`` steps of each run (0 = all). Lanes: 'link 1'.. (one
    per copy engine; see :func:`link_lanes`), 'compute' (dense and expert compute), 'stall'.
    Times are milliseconds from the run's start. ``filters``: ``--filter`` texts on the log's
    columns (``strict=False``: keys the log lacks are skipped).
    """
    ev = apply_filters(check_events(ev, source), filters, source, strict=strict)
    runs = _runs(ev)
    if len(runs) > MAX_RUNS:
        raise ConfigError(
            f"{source}: holds {len(runs)} runs (policy x bandwidth); draw at most "
            f"{MAX_RUNS}: choose with --filter policy=NAME or "
            "--filter bandwidth_gbps=X"
        )
    frames = []
    for title, part in runs:
        if steps > 0:
            keep = np.sort(part["step"].unique())[:steps]
            part = part[part["step"].isin(keep)]
        part = part.reset_index(drop=True)
        lane = np.array(["compute"] * part.shape[0], dtype=object)
        lane[(part["kind"] == "stall").to_numpy()] = "stall"
        tr = part["kind"].isin(TRANSFERS).to_numpy()
        if tr.any():
            idx = link_lanes(part["start_s"].to_numpy()[tr], part["end_s"].to_numpy()[tr], engines)
            lane[tr] = [f"link {i + 1}" for i in idx]
        frames.append(
            pd.DataFrame(
                {
                    "run": title,
                    "lane": lane,
                    "kind": part["kind"].to_numpy(object),
                    "start_ms": part["start_s"].to_numpy(np.float64) * 1e3,
                    "end_ms": part["end_s"].to_numpy(np.float64) * 1e3,
                    "step": part["step"].to_numpy(np.int64),
                    "layer": part["layer"].to_numpy(np.int64) if "layer" in part else -1,
                    "expert": part["expert"].to_numpy(np.int64) if "expert" in part else -1,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _lanes(part: pd.DataFrame) -> list[str]:
    links = sorted({x for x in part["lane"] if x.startswith("link")}, key=lambda s: int(s[5:]))
    return [*links, "compute", "stall"]


def draw_timeline(data: pd.DataFrame, title: str = ""):
    """One panel per run: a row of bars per lane, coloured by event kind; step boundaries."""
    runs = list(dict.fromkeys(data["run"]))
    lanes = {r: _lanes(data[data["run"] == r]) for r in runs}
    heights = [0.45 * len(lanes[r]) + 0.9 for r in runs]
    fig, axes = new_figure(
        12, sum(heights) + 0.9, len(runs), 1, sharex=True, gridspec_kw={"height_ratios": heights}
    )
    for ax, run in zip(axes[:, 0], runs, strict=True):
        part = data[data["run"] == run]
        names = lanes[run]
        for y, lane in enumerate(names):
            rows = part[part["lane"] == lane]
            for kind, bars in rows.groupby("kind", sort=False):
                ax.broken_barh(
                    list(zip(bars["start_ms"], bars["end_ms"] - bars["start_ms"], strict=True)),
                    (y - 0.38, 0.76),
                    facecolors=KIND_COLOURS[kind],
                    linewidth=0,
                )
        ax.set_yticks(np.arange(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.5)
        starts = part.groupby("step")["start_ms"].min()
        for step, t in starts.items():
            ax.axvline(t, color="#555555", lw=0.6, ls=":")
            ax.annotate(
                f"step {step}",
                (t, 0),
                xycoords=("data", "axes fraction"),
                xytext=(2, 2),
                textcoords="offset points",
                fontsize=7,
            )
        first, last = int(part["step"].min()), int(part["step"].max())
        span = f"step {first}" if first == last else f"steps {first}-{last}"
        ax.set_title(f"{run}: {span}" if run else span, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time from the start of the run (ms)")
    present = [k for k in KINDS if (data["kind"] == k).any()]
    fig.legend(
        [Patch(color=KIND_COLOURS[k]) for k in present],
        [KIND_NAMES[k] for k in present],
        loc="outside lower center",
        ncol=len(present),
        fontsize=8,
    )
    name = "transfer / compute timeline"
    fig.suptitle(f"{title}: {name}" if title else name)
    return fig


def replay_events(trace_path: str, cfg, policy: str, steps: int) -> tuple[pd.DataFrame, dict]:
    """Replay ``trace_path`` in timed mode under ``policy``; return the event log of its first
    ``steps`` steps (0 = all; the whole trace is replayed, the log kept just long enough), with
    ``policy`` holding the series label (policy + prefetcher), and the run's result record."""
    from simulator.engine import prepare, run
    from simulator.figures.style import series_label
    from simulator.warmup import warm_up
    from traces.io import read_trace

    prep = prepare(read_trace(trace_path))
    acc = prep.acc
    cfg.replay.mode = "timed"
    steps_all = np.unique(acc.group_step)
    last = steps_all[min(steps, steps_all.size) - 1] if steps > 0 else steps_all[-1]
    g_end = int(np.searchsorted(acc.group_step, last, side="right"))
    n_acc = int(acc.group_offsets[min(g_end + cfg.replay.horizon, acc.num_groups)])
    # per group: dense + per access at most a compute, a stall, a demand fetch, a prefetch
    cfg.replay.events = 4 * n_acc + 2 * g_end + 1000
    warm_up("timed")
    rec = run(prep, cfg, policy)
    ev = rec.pop("_events")
    if ev.shape[0] == cfg.replay.events and int(ev["step"].max()) < int(last):
        raise ConfigError(
            f"{trace_path}: the event log was cut short before step {last}; use fewer --steps"
        )
    ev = ev[ev["step"] <= last]
    label = series_label(rec["policy"], rec["prefetch"])
    return ev.assign(policy=label, bandwidth_gbps=cfg.link.bandwidth_gbps), rec
