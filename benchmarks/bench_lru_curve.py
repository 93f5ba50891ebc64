"""The count-mode LRU curve: one stack-distance pass against one replay per cache size.

For each access semantics, times ``simulator.lru_curve.lru_curve`` over N cache sizes (one
pass over the trace, then O(layers) work per size) against ``simulator.engine.run`` once per
size, in the same run, and checks that every record is equal (all counters, per-layer hit
rates, bytes; only ``kernel_s`` differs). Atomic sizes below the largest step-layer are
replayed by ``lru_curve`` itself; the table says how many sizes the one pass served.

    python benchmarks/bench_lru_curve.py [TRACE] [--sizes 50] [--access sequential atomic]
"""

from __future__ import annotations

import argparse
import copy
import time

import _common
import numpy as np

from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.lru_curve import lru_curve, stack_profile
from simulator.warmup import warm_up
from traces.io import read_trace


def _warm_stack_kernel() -> None:
    """Load the one-pass kernel on a toy trace, so timings exclude loading it."""
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    meta = TraceMeta(model="warm-up", num_layers=1, experts_per_layer=4, top_k=1,
                     expert_bytes=1)  # fmt: skip
    tr = trace_from_arrays(meta, step=[0, 1], seq=[0, 0], pos=[0, 1], phase=[1, 1],
                           layer=[0, 0], offsets=[0, 1, 2], experts=[0, 1])  # fmt: skip
    for access in ("sequential", "atomic"):
        stack_profile(prepare(tr), "global", access)


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "kernel_s" and not k.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", help="trace (default: the imported training set)")
    ap.add_argument("--sizes", type=int, default=50, help="cache sizes, evenly spaced")
    ap.add_argument("--access", nargs="+", default=["sequential", "atomic"],
                    choices=["sequential", "atomic"])  # fmt: skip
    args = ap.parse_args()
    path = args.trace or _common.default_trace()
    _common.log(f"{_common.machine()}; {_common.git_head()}")
    t = time.perf_counter()
    prep = prepare(read_trace(path))
    _common.log(f"read + prepare {path}: {time.perf_counter() - t:.1f} s")
    warm_up("count")
    _warm_stack_kernel()
    n_obj = prep.acc.num_objects
    top_k = prep.meta.top_k or 1
    sizes = sorted({int(x) for x in np.linspace(top_k, n_obj, args.sizes).round()})
    print(f"trace: {path}\n{prep.acc.num_accesses:,} accesses, {prep.acc.num_groups:,} "
          f"step-layers, {n_obj} experts; {len(sizes)} cache sizes {sizes[0]}..{sizes[-1]}; "
          f"count mode, LRU, global cache\n")  # fmt: skip
    print(
        "| access | sizes by one pass | one pass: kernel | one pass: total | replays: kernels "
        "| replays: total | speed-up (total) | records equal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for access in args.access:
        cfg = SimConfig()
        cfg.replay.mode = "count"
        cfg.replay.access = access
        t = time.perf_counter()
        prof = stack_profile(prep, "global", access)
        recs = lru_curve(prep, cfg, slots=sizes, profile=prof)
        one_total = time.perf_counter() - t
        served = sum(r["_one_pass"] for r in recs)
        rep_kernel = rep_total = 0.0
        equal = True
        for s, rec in zip(sizes, recs, strict=True):
            c = copy.deepcopy(cfg)
            c.cache.fraction, c.cache.slots = None, s
            t = time.perf_counter()
            ref = run(prep, c, "lru")
            rep_total += time.perf_counter() - t
            rep_kernel += ref["kernel_s"]
            equal &= _strip(rec) == _strip(ref)
        print(
            f"| {access} | {served} of {len(sizes)} | {prof.kernel_s:.2f} s | "
            f"{one_total:.2f} s | {rep_kernel:.2f} s | {rep_total:.2f} s | "
            f"**{rep_total / one_total:.1f}x** | {'yes' if equal else 'NO'} |",
            flush=True,
        )
    print(f"\npeak RSS {_common.peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
