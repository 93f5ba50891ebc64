"""``moesim curve``: the count-mode LRU hit-rate curve of a trace, every size from one pass."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from simulator.config import apply_overrides, load_config
from traces.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curve",
        help="count-mode LRU hits and misses at many cache sizes from one pass over a trace",
        description="Computes each access's LRU stack distance in one pass (Mattson's "
        "algorithm) and from it the count-mode LRU result at every requested cache size: the "
        "same records `moesim replay --mode count --policy lru` gives size by size. Exact for "
        "sequential access at every size and for atomic access where the cache holds the "
        "largest step-layer (smaller atomic sizes are replayed). docs/sweep.md.",
    )
    p.add_argument("trace", help="trace file (.parquet) or folder of parts")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fractions", type=float, nargs="+", metavar="F",
                      help="sizes as fractions of all routed experts "
                      "(default: the config's cache.fractions, etc.)")  # fmt: skip
    size.add_argument("--slots", type=int, nargs="+", metavar="N", help="sizes in experts")
    size.add_argument("--slots-range", type=int, nargs=3, metavar=("START", "STOP", "STEP"),
                      help="sizes START, START+STEP, ... below STOP (experts)")  # fmt: skip
    size.add_argument("--all", action="store_true",
                      help="every size from the smallest allowed to all experts")  # fmt: skip
    p.add_argument("--access", choices=["atomic", "sequential"],
                   help="access semantics (default: replay.access)")  # fmt: skip
    p.add_argument("--scope", choices=["global", "per-layer"],
                   help="one pool, or per-layer partitions (default: cache.scope)")  # fmt: skip
    p.add_argument("--config", metavar="TOML", help="configuration file (e.g. sim.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value")  # fmt: skip
    p.add_argument("-o", "--out", metavar="FILE",
                   help="write every record to FILE (.parquet or .csv)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per size, one per line")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    import dataclasses

    from simulator.engine import prepare
    from simulator.lru_curve import lru_curve
    from simulator.report import json_line, table
    from simulator.sweep import cache_sizes, model_meta
    from traces.io import read_trace

    cfg = load_config(args.config)
    apply_overrides(cfg, args.set)
    if args.access:
        cfg.replay.access = args.access
    if args.scope:
        cfg.cache.scope = args.scope
    cfg.replay.mode, cfg.replay.prefetch, cfg.replay.policies = "count", "none", ["lru"]
    cfg.validate()
    if args.out and Path(args.out).suffix not in (".parquet", ".csv"):
        raise ConfigError(f"--out {args.out}: expected a .parquet or .csv file name")
    trace = read_trace(args.trace)
    trace = dataclasses.replace(trace, meta=model_meta(trace.meta, cfg.model))
    prep = prepare(trace)
    if args.fractions:
        kw = {"fractions": args.fractions}
    elif args.slots:
        kw = {"slots": args.slots}
    elif args.slots_range:
        a, b, s = args.slots_range
        if s < 1 or b <= a:
            raise ConfigError(
                f"--slots-range: expected START < STOP and STEP >= 1, got {a} {b} {s}"
            )
        kw = {"slots": list(range(a, b, s))}
    elif args.all:
        top_k = prep.meta.top_k or 1
        lo = top_k * (prep.meta.num_layers if cfg.cache.scope == "per-layer" else 1)
        kw = {"slots": list(range(lo, prep.acc.num_objects + 1))}
    else:
        sizes = cache_sizes(cfg)
        kind = sizes[0][0]
        if kind == "bytes":
            raise ConfigError("the one-pass LRU curve does not apply: a byte budget")
        kw = {"slots" if kind == "slots" else "fractions": [v for _, v in sizes]}
    cfg = copy.deepcopy(cfg)
    records = lru_curve(prep, cfg, **kw)
    n_pass = sum(r["_one_pass"] for r in records)
    if args.out:
        _write(records, Path(args.out))
    if args.json:
        for r in records:
            print(json_line(r))
    else:
        meta = prep.meta
        print(f"{trace.path}: {meta.model}, {prep.acc.num_accesses} accesses; count mode, LRU, "
              f"access={cfg.replay.access}, scope={cfg.cache.scope}")  # fmt: skip
        print(table(records))
    note = f"{n_pass} of {len(records)} sizes from one pass"
    if n_pass < len(records):
        note += " (the others replayed: atomic access, cache smaller than a step-layer)"
    print(note + (f"; records written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _write(records: list[dict], path: Path) -> None:
    from simulator.report import public
    from traces.io import atomic_path

    rows = [public(r) for r in records]
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            from simulator.sweep_store import to_table

            pq.write_table(to_table(rows), tmp)
        else:
            import pandas as pd

            pd.DataFrame(rows).to_csv(tmp, index=False)
