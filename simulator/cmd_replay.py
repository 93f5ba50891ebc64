"""``moesim replay``: replay a trace under one or more policies and report what a runtime sees."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from policies.registry import POLICIES
from simulator.config import SimConfig, apply_overrides, load_config
from simulator.engine import prepare, run
from simulator.report import json_line, table
from simulator.sweep import model_meta
from simulator.warmup import warm_up
from traces.errors import ConfigError
from traces.io import atomic_path, read_trace


def register(sub: argparse._SubParsersAction) -> None:
    d = SimConfig()
    p = sub.add_parser(
        "replay",
        help="replay a trace through a GPU expert cache under one or more policies",
        description="Replay every (step, layer, expert) access of TRACE through a simulated GPU "
        "expert cache. Count mode counts hits and misses; timed mode also models the PCIe link "
        "(bandwidth, latency, copy engines), GPU compute and the stalls that misses cause. "
        "Settings come from --config (TOML, see sim.toml; defaults shown below), then --set, "
        "then the flags. docs/simulator.md defines every reported figure.",
    )
    p.add_argument("trace", help="trace file (.parquet) or folder of parts")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help="eviction policy, repeatable: "
        + ", ".join(POLICIES)
        + f"; parameters as NAME:key=value (default: {' '.join(d.replay.policies)})",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cache-slots", type=int, metavar="N", help="cache size in experts")
    size.add_argument(
        "--cache-fraction",
        type=float,
        metavar="F",
        help=f"cache size as a fraction of all routed experts (default: {d.cache.fraction})",
    )
    size.add_argument("--cache-bytes", type=int, metavar="B", help="cache size in bytes")
    p.add_argument(
        "--scope",
        choices=["global", "per-layer"],
        help=f"one pool for all layers, or per-layer partitions (default: {d.cache.scope})",
    )
    p.add_argument(
        "--mode",
        choices=["count", "timed"],
        help=f"count: hits and misses only; timed: link, compute, stalls "
        f"(default: {d.replay.mode})",
    )
    p.add_argument(
        "--access",
        choices=["atomic", "sequential"],
        help="atomic: a layer's experts are protected together (runtimes); "
        "sequential: each access alone (classic cache simulators) "
        f"(default: {d.replay.access})",
    )
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        nargs="+",
        metavar="X",
        help="link bandwidth(s) in GB/s; several values run each policy at each "
        f"(default: {d.link.bandwidth_gbps:g})",
    )
    p.add_argument(
        "--latency-s",
        type=float,
        metavar="S",
        help=f"fixed cost per transfer, seconds (default: {d.link.latency_s:g})",
    )
    p.add_argument(
        "--engines",
        type=int,
        metavar="N",
        help=f"copy engines: transfers at once (default: {d.link.engines})",
    )
    p.add_argument(
        "--prefetch",
        metavar="NAME[:key=value,...]",
        help="prefetcher: none, oracle (knows the trace's future), trace (its pred_h{H} "
        "columns), prev-token, cross-layer[:train=TRACE], moe-infinity[:capacity=N,warm=TRACE], "
        "learned:model=FILE, adaptive[:base=NAME,max=H] (docs/policies.md; "
        f"default: {d.replay.prefetch})",
    )
    p.add_argument(
        "--horizon",
        type=int,
        metavar="H",
        help=f"prefetch horizon in layers (default: {d.replay.horizon})",
    )
    p.add_argument(
        "--free-prefetch",
        action="store_true",
        help="count mode: the prefetcher's experts become resident at zero cost "
        "right before their layer (MoE-Beyond's setting; labelled 'free-...')",
    )
    p.add_argument(
        "--pin",
        action="append",
        metavar="LAYER:EXPERT",
        default=None,
        help="keep this expert resident for good (repeatable)",
    )
    p.add_argument(
        "--profile",
        metavar="TRACE",
        help="profiling trace for 'static' (default: the replayed trace)",
    )
    p.add_argument("--config", metavar="TOML", help="configuration file (e.g. sim.toml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set compute.dense_s=2e-4",
    )
    p.add_argument("--events", metavar="CSV", help="write the timeline (timed mode) to CSV")
    p.add_argument(
        "--events-limit",
        type=int,
        default=100_000,
        metavar="N",
        help="most events kept per run for --events (default: 100000)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run, one per line")
    p.set_defaults(func=run_cli)


def build_config(args: argparse.Namespace):
    cfg = load_config(args.config)
    apply_overrides(cfg, args.set)
    c = cfg.cache
    if args.cache_slots is not None:
        c.slots, c.fraction, c.bytes = args.cache_slots, None, None
    elif args.cache_fraction is not None:
        c.slots, c.fraction, c.bytes = None, args.cache_fraction, None
    elif args.cache_bytes is not None:
        c.slots, c.fraction, c.bytes = None, None, args.cache_bytes
    if args.scope:
        c.scope = args.scope
    if args.pin:
        c.pinned = list(args.pin)
    r = cfg.replay
    if args.policy:
        r.policies = list(args.policy)
    for key in ("mode", "access", "prefetch", "horizon"):
        if getattr(args, key) is not None:
            setattr(r, key, getattr(args, key))
    if args.free_prefetch and (r.mode != "count" or r.prefetch == "none"):
        raise ConfigError("--free-prefetch: needs --mode count and a --prefetch source")
    if args.events:
        if r.mode != "timed":
            raise ConfigError("--events: the timeline exists in timed mode only")
        r.events = args.events_limit
    if args.latency_s is not None:
        cfg.link.latency_s = args.latency_s
    if args.engines is not None:
        cfg.link.engines = args.engines
    if args.bandwidth_gbps:
        for bw in args.bandwidth_gbps:
            if not bw > 0:
                raise ConfigError(f"--bandwidth-gbps: expected > 0 GB/s, got {bw}")
    return cfg.validate()


def run_cli(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    trace = read_trace(args.trace)
    trace = dataclasses.replace(trace, meta=model_meta(trace.meta, cfg.model))  # [model]
    prep = prepare(trace)
    profile = prepare(read_trace(args.profile)) if args.profile else None
    warm_up(cfg.replay.mode)
    bandwidths = args.bandwidth_gbps or [cfg.link.bandwidth_gbps]
    records = []
    for policy in cfg.replay.policies:
        for bw in bandwidths:
            cfg.link.bandwidth_gbps = bw
            rec = run(prep, cfg, policy, profile=profile, free_prefetch=args.free_prefetch)
            rec["bandwidth_gbps"] = bw if cfg.replay.mode == "timed" else None
            records.append(rec)
            if args.json:
                print(json_line(rec), flush=True)
    if args.events:
        frames = []
        for rec in records:
            ev = rec.get("_events")
            if ev is not None:
                frames.append(ev.assign(policy=rec["policy"], bandwidth_gbps=rec["bandwidth_gbps"]))
        import pandas as pd

        with atomic_path(args.events) as tmp:
            pd.concat(frames).to_csv(tmp, index=False)
    if not args.json:
        meta = prep.meta
        print(f"{trace.path}: {meta.model}, {meta.num_layers} layers x "
              f"{meta.max_experts} experts, top-{meta.top_k}; {prep.acc.num_accesses} accesses "
              f"in {prep.acc.num_groups} step-layers; mode={cfg.replay.mode}, "
              f"access={cfg.replay.access}, scope={cfg.cache.scope}")  # fmt: skip
        print(table(records))
        if args.events:
            print(f"timeline written to {args.events}", file=sys.stderr)
    return 0
