"""``moesim plot``: figures from a results table (moesim sweep), a trace and an event log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulator.figures import KINDS
from simulator.figures.style import parse_formats, save
from simulator.figures.table import Table, apply_filters, read_results, trace_names
from traces.errors import ConfigError, MoesimError

TABLE_KINDS = ("hit-rate", "stall", "time-per-token", "bandwidth", "layer-heatmap")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="figures from a results table (hit rate, stall, time per token, heatmaps, timeline)",
        description="Draw figures from RESULTS (moesim sweep's output folder or its "
        "results.parquet; also moesim replay --json records saved as .jsonl, or a .csv of "
        "them): hit rate, stall time and time per output token against cache size, hit rate "
        "against bandwidth, per-layer hit rate; expert popularity from the trace; a Gantt-style "
        "transfer/compute timeline from an event log (--events) or a small replay it runs "
        "itself (--trace). One line per policy (+ prefetcher), Belady and oracle prefetch "
        "dashed as bounds, the same colour per series in every figure; one panel per value of "
        "each setting that varies (trace, mode, scope, bandwidth, ...). docs/plots.md has "
        "the details.",
    )
    p.add_argument("results", nargs="?", help="results folder or file (.parquet, .jsonl, .csv)")
    p.add_argument(
        "-o",
        "--out",
        metavar="DIR",
        help="folder for the figures (default: RESULTS' folder + /figures, or ./figures)",
    )
    p.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help=f"figure(s), repeatable or comma-separated: {', '.join(KINDS)} or all "
        "(default: all the inputs allow)",
    )
    p.add_argument(
        "--format",
        default="png",
        metavar="FMT",
        help="file format(s), comma-separated: png, svg, pdf (default: png)",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep rows whose column KEY equals VALUE (several values: V1,V2); "
        "repeatable, e.g. --filter scope=global --filter policy=lru,belady",
    )
    p.add_argument("--title", help="figure title prefix (default: the model, where one)")
    g = p.add_argument_group("layer heatmap")
    g.add_argument(
        "--cache-fraction",
        type=float,
        metavar="F",
        help="cache size to show (nearest in the table; default: the median size); "
        "with --trace, the timeline replay's cache size",
    )
    g = p.add_argument_group("popularity and timeline")
    g.add_argument(
        "--trace",
        metavar="TRACE",
        help="trace for the popularity heatmap (default: the table's 'trace' column) "
        "and, without --events, for a small timed replay drawn as the timeline",
    )
    g.add_argument("--events", metavar="CSV", help="event log of moesim replay --events")
    g.add_argument(
        "--steps",
        type=int,
        default=2,
        metavar="N",
        help="steps of the timeline to draw, from the first (default: 2; 0 = all)",
    )
    g.add_argument(
        "--policy",
        default="lru",
        metavar="NAME",
        help="timeline replay: eviction policy (default: lru)",
    )
    g.add_argument(
        "--cache-slots", type=int, metavar="N", help="timeline replay: cache size in experts"
    )
    g.add_argument(
        "--prefetch",
        metavar="NAME",
        help="timeline replay: prefetcher (default: the config's, 'none')",
    )
    g.add_argument("--horizon", type=int, metavar="H", help="timeline replay: prefetch horizon")
    g.add_argument(
        "--bandwidth-gbps", type=float, metavar="X", help="timeline replay: link bandwidth in GB/s"
    )
    g.add_argument(
        "--engines",
        type=int,
        metavar="N",
        help="copy engines (timeline replay; for --events, lays transfers out on "
        "N lanes exactly as the simulator did)",
    )
    g.add_argument("--config", metavar="TOML", help="timeline replay: configuration file")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="timeline replay: override a config value",
    )
    p.set_defaults(func=run_cli)


def _kinds(args) -> tuple[list[str], bool]:
    """(kinds, explicit): 'all' or nothing given means every kind the inputs allow."""
    items = [k.strip() for text in (args.kind or ["all"]) for k in text.split(",") if k.strip()]
    if not items or "all" in items:
        return list(KINDS), False
    for k in items:
        if k not in KINDS:
            raise ConfigError(f"--kind: unknown figure {k!r} (expected {', '.join(KINDS)} or all)")
    return list(dict.fromkeys(items)), True


def _out_dir(args) -> Path:
    if args.out:
        out = Path(args.out)
    elif args.results:
        r = Path(args.results)
        out = (r if r.is_dir() else r.parent) / "figures"
    else:
        out = Path("figures")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o: '{out}' exists and is not a folder")
    return out


def _title(args, table: Table | None) -> str:
    if args.title is not None:
        return args.title
    if table is not None and "model" in table.df.columns:
        models = table.df["model"].dropna().unique()
        if len(models) == 1:
            return str(models[0]).rsplit("/", 1)[-1]
    return ""


def run_cli(args: argparse.Namespace) -> int:
    kinds, explicit = _kinds(args)
    formats = parse_formats(args.format)
    if args.steps < 0:
        raise ConfigError(f"--steps: expected >= 0, got {args.steps}")
    table = None
    if args.results:
        table = read_results(args.results)
        table.df = apply_filters(table.df, args.filter, table.source)
    elif not (args.trace or args.events):
        raise ConfigError("nothing to plot: give RESULTS, --trace or --events")
    out = _out_dir(args)
    if not explicit:  # 'all': only the kinds whose inputs were given
        timeline_input = bool(args.events or args.trace)
        kinds = [
            k
            for k in kinds
            if (k in TABLE_KINDS and table is not None)
            or (k == "popularity" and (table is not None or args.trace))
            or (k == "timeline" and timeline_input)
        ]
    written: list[Path] = []
    for kind in kinds:
        try:
            written += _make(kind, args, table, out, formats)
        except MoesimError as exc:
            if explicit:
                raise
            print(f"moesim plot: skipped {kind}: {exc}", file=sys.stderr)
    if not written:
        raise ConfigError("no figure could be made from these inputs (see the lines above)")
    for path in written:
        print(path)
    return 0


def _make(kind: str, args, table: Table | None, out: Path, formats: list[str]) -> list[Path]:
    name = KINDS[kind]
    if kind in TABLE_KINDS:
        if table is None:
            raise ConfigError(f"the {kind} figure needs a RESULTS table")
        title = _title(args, table)
        if kind == "layer-heatmap":
            from simulator.figures.heatmaps import draw_layer_heatmap, layer_heatmap_data

            fig = draw_layer_heatmap(layer_heatmap_data(table, args.cache_fraction), title)
        else:
            from simulator.figures.curves import curve_data, draw_curves

            fig = draw_curves(curve_data(table, kind), kind, title)
        return save(fig, out, name, formats)
    if kind == "popularity":
        return _popularity(args, table, out, formats)
    return _timeline(args, table, out, formats)


def _popularity(args, table: Table | None, out: Path, formats: list[str]) -> list[Path]:
    from simulator.figures.heatmaps import draw_popularity, popularity_data, resolve_trace
    from traces.io import read_trace

    if args.trace:
        paths = {args.trace: Path(args.trace)}
    elif table is not None and table.df["trace"].notna().any():
        found = [str(t) for t in dict.fromkeys(table.df["trace"].dropna())]
        paths = {t: resolve_trace(t, table.folder) for t in found}
    else:
        raise ConfigError(
            "the popularity figure needs a trace: --trace PATH or a results table "
            "with a 'trace' column"
        )
    names = trace_names(paths)
    written = []
    for text, path in paths.items():
        trace = read_trace(path)
        title = args.title if args.title is not None else trace.meta.model.rsplit("/", 1)[-1]
        if len(paths) > 1:
            title = f"{title} ({names[text]})"
        fig = draw_popularity(popularity_data(trace), title)
        suffix = "" if len(paths) == 1 else "_" + names[text].replace("/", "_")
        written += save(fig, out, f"popularity{suffix}", formats)
    return written


def _timeline(args, table: Table | None, out: Path, formats: list[str]) -> list[Path]:
    from simulator.figures.timeline import (
        draw_timeline,
        read_events,
        replay_events,
        timeline_data,
    )

    if args.events:
        ev, source = read_events(args.events), args.events
        engines, title = args.engines, args.title or ""
    elif args.trace:
        cfg = _replay_config(args)
        ev, rec = replay_events(args.trace, cfg, args.policy, args.steps)
        source, engines = args.trace, cfg.link.engines
        title = args.title if args.title is not None else Path(args.trace).stem
        title += f" (cache {rec['cache_slots']} experts, {engines} copy engine"
        title += "s)" if engines != 1 else ")"
    else:
        raise ConfigError("the timeline figure needs --events CSV or --trace TRACE")
    # with a results table too, filters on its columns do not apply to the log
    data = timeline_data(ev, args.steps, engines, source, args.filter, strict=table is None)
    return save(draw_timeline(data, title), out, KINDS["timeline"], formats)


def _replay_config(args):
    from simulator.config import apply_overrides, load_config

    cfg = load_config(args.config)
    apply_overrides(cfg, args.set)
    c = cfg.cache
    if args.cache_slots is not None and args.cache_fraction is not None:
        raise ConfigError("--cache-slots and --cache-fraction: give one cache size")
    if args.cache_slots is not None:
        c.slots, c.fraction, c.bytes = args.cache_slots, None, None
    elif args.cache_fraction is not None:
        c.slots, c.fraction, c.bytes = None, args.cache_fraction, None
    if args.prefetch is not None:
        cfg.replay.prefetch = args.prefetch
    if args.horizon is not None:
        cfg.replay.horizon = args.horizon
    if args.bandwidth_gbps is not None:
        if not args.bandwidth_gbps > 0:
            raise ConfigError(f"--bandwidth-gbps: expected > 0 GB/s, got {args.bandwidth_gbps}")
        cfg.link.bandwidth_gbps = args.bandwidth_gbps
    if args.engines is not None:
        cfg.link.engines = args.engines
    cfg.replay.mode = "timed"
    return cfg.validate()
