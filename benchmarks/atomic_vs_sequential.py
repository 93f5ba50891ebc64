#!/usr/bin/env python
"""Atomic vs sequential access: how far the miss counts differ (not a timing benchmark).

Atomic access protects all of a step-layer's experts together, as runtimes do; sequential
replays each access alone, as libCacheSim does (moesim's sequential counts equal libCacheSim's
exactly: tests/test_libcachesim.py). Prints both miss counts per policy and cache size and the
difference as a share of the sequential misses.

    python benchmarks/atomic_vs_sequential.py [TRACE ...] [--slots 166,416,832]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import CACHE_DIR, WEBGLM, count_config, default_trace, log, machine


def webglm_trace() -> Path | None:
    if not WEBGLM.is_dir():
        return None
    out = CACHE_DIR / "webglm-test.parquet"
    if not out.exists():
        from traces.importers import import_moe_beyond

        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        import_moe_beyond([WEBGLM], out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="*", help="traces (default: WebGLM test set, Puffin set)")
    ap.add_argument("--slots", default="166,416,832", help="cache sizes in experts")
    ap.add_argument("--policies", default="lru,belady", help="comma-separated")
    args = ap.parse_args(argv)

    from simulator.engine import prepare, run
    from simulator.warmup import warm_up
    from traces.io import read_trace

    paths = [Path(p) for p in args.traces] or [p for p in (webglm_trace(), default_trace()) if p]
    warm_up("count")
    print(f"# atomic vs sequential misses ({machine()})")
    for path in paths:
        prep = prepare(read_trace(path))
        print(f"\n{path}: {prep.acc.num_accesses:,} accesses")
        print(f"{'policy':8} {'slots':>6} {'atomic':>12} {'sequential':>12} "
              f"{'atom-seq':>9} {'% of seq':>9}")  # fmt: skip
        for policy in args.policies.split(","):
            for slots in (int(s) for s in args.slots.split(",")):
                t = time.perf_counter()
                a = run(prep, count_config(slots, "atomic"), policy)["misses"]
                s = run(prep, count_config(slots, "sequential"), policy)["misses"]
                log(f"{path.name} {policy} {slots}: {time.perf_counter() - t:.1f} s")
                print(f"{policy:8} {slots:6} {a:12,} {s:12,} {a - s:9,} "
                      f"{100 * (a - s) / s:8.3f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
