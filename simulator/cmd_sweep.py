"""``moesim sweep``: run a configuration's whole grid, write one tidy results table."""

from __future__ import annotations

import argparse
from pathlib import Path

from simulator.config import apply_overrides, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run every trace x policy x prefetcher x horizon x cache size x bandwidth of a "
        "configuration; write results.parquet",
        description="Runs the grid a configuration describes (see sim.toml, the default) on "
        "all cores, or on a Dask cluster with --cluster, and writes OUT/results.parquet (one "
        "row per run: every parameter and every figure of `moesim replay --json`) and "
        "OUT/config.toml (the resolved configuration). Finished runs are kept in OUT/parts/, "
        "so rerunning an interrupted sweep does only what is missing. Count-mode LRU sizes "
        "come from one stack-distance pass. docs/sweep.md has the details.",
    )
    p.add_argument("config", nargs="?", help="configuration file (default: the built-in "
                   "defaults, equal to sim.toml)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (TOML syntax), e.g. "
                   "--set cache.fractions=[0.05,0.1] --set replay.policies=['lru']")  # fmt: skip
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (default: output.folder)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local worker processes (default: sweep.workers, 0 = all cores)",
    )
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run on the Dask cluster whose scheduler is at ADDRESS "
                   "(tcp://host:8786); needs pip install 'moesim[cluster]'")  # fmt: skip
    p.add_argument("--fresh", action="store_true",
                   help="discard finished runs kept in OUT/parts/ and run everything")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid's size and what is already done; run nothing")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from simulator.sweep import run_sweep

    cfg = load_config(args.config)
    apply_overrides(cfg, args.set)
    base = Path(args.config).resolve().parent if args.config else None
    if args.workers is not None and args.workers < 0:
        from traces.errors import ConfigError

        raise ConfigError(f"--workers: expected >= 0 (0 = all cores), got {args.workers}")
    if args.dry_run:
        return _dry_run(cfg, args, base)
    s = run_sweep(cfg, out=args.out, base_dir=base, workers=args.workers,
                  cluster=args.cluster, quiet=args.quiet, fresh=args.fresh)  # fmt: skip
    found = f"{s.skipped} found done, " if s.skipped else ""
    print(f"sweep: {s.total} runs ({found}{s.ran} run now, {s.one_pass} of them by the "
          f"one-pass LRU curve) in {s.seconds:.1f} s")  # fmt: skip
    print(f"results: {s.results}  config: {s.results.parent / 'config.toml'}")
    return 0


def _dry_run(cfg, args, base) -> int:
    import copy

    from simulator.sweep import (
        cache_sizes,
        check_sizes,
        curve_group,
        expand,
        fingerprint,
        resolve_traces,
        run_key,
    )
    from simulator.sweep_store import Store

    cfg = copy.deepcopy(cfg)
    if args.out:
        cfg.output.folder = args.out
    cfg.validate()
    traces = resolve_traces(cfg.traces.paths, base)
    points = expand(cfg, traces)
    for t in traces:
        check_sizes(t, cfg)
    fps = {t: fingerprint(t) for t in traces}
    done = Store(Path(cfg.output.folder)).done_keys()
    n_done = sum(run_key(p, cfg, fps[p.trace]) in done for p in points)
    n_curve = sum(curve_group(p, cfg) is not None for p in points)
    print(f"{len(traces)} trace(s): " + ", ".join(traces))
    print(f"{len(cfg.replay.policies)} policies, {len(cache_sizes(cfg))} cache sizes -> "
          f"{len(points)} runs ({n_curve} count-mode LRU, for the one-pass curve), {n_done} "
          f"already done "
          f"in {cfg.output.folder}")  # fmt: skip
    return 0
