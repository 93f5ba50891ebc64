"""The ceiling for a count-mode LRU on this machine: a bare numba LRU over the same accesses.

One global pool, sequential access, no per-layer counts, no protection, no bookkeeping: what
moesim's LRU is measured against, on its count fast path (simulator/fast_count.py: list-only
state, per-expert tallies) and on the general kernel (every policy's request path:
partitions, atomic protection, pins, in-flight states, prefetch bookkeeping). Prints the
rates and ratios, same run, best of ``--repeat``; all three must count the same hits.

    python benchmarks/bare_lru.py [TRACE] [--slots 166] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
from numba import njit

from simulator import fast_count
from simulator.engine import prepare, run
from simulator.warmup import warm_up
from traces.io import read_trace


@njit(cache=True)
def bare_lru(obj, n_obj, cap):
    prev = np.full(n_obj + 1, -1, np.int32)
    nxt = np.full(n_obj + 1, -1, np.int32)
    s = n_obj
    prev[s] = s
    nxt[s] = s
    resident = np.zeros(n_obj, np.bool_)
    used = 0
    hits = 0
    for i in range(obj.shape[0]):
        o = obj[i]
        if resident[o]:
            hits += 1
            if nxt[s] != o:
                p = prev[o]
                n = nxt[o]
                nxt[p] = n
                prev[n] = p
                h = nxt[s]
                nxt[o] = h
                prev[o] = s
                prev[h] = o
                nxt[s] = o
        else:
            if used >= cap:
                v = prev[s]
                p = prev[v]
                nxt[p] = s
                prev[s] = p
                resident[v] = False
                used -= 1
            h = nxt[s]
            nxt[o] = h
            prev[o] = s
            prev[h] = o
            nxt[s] = o
            resident[o] = True
            used += 1
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", help="trace (default: the imported training set)")
    ap.add_argument("--slots", type=int, default=166)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest is kept")
    args = ap.parse_args()
    prep = prepare(read_trace(args.trace or _common.default_trace()))
    acc = prep.acc
    cfg = _common.count_config(args.slots, access="sequential")
    bare_lru(acc.obj[:100], acc.num_objects, args.slots)
    warm_up("count")
    run(prep, cfg, "lru")  # loads the sequential fast path's kernel
    best = {"bare": np.inf, "fast": np.inf, "general": np.inf}
    hits = {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        hits["bare"] = bare_lru(acc.obj, acc.num_objects, args.slots)
        best["bare"] = min(best["bare"], time.perf_counter() - t0)
        rec = run(prep, cfg, "lru")
        hits["fast"] = rec["hits"]
        best["fast"] = min(best["fast"], rec["kernel_s"])
        with fast_count.general_kernel():
            rec = run(prep, cfg, "lru")
        hits["general"] = rec["hits"]
        best["general"] = min(best["general"], rec["kernel_s"])
    assert len(set(hits.values())) == 1, hits
    n = acc.num_accesses
    print(
        f"{n:,} accesses, {args.slots} slots, hits {hits['bare']:,} (equal), best of {args.repeat}"
    )
    print(f"bare LRU                  {n / best['bare'] / 1e6:7.1f} M/s")
    for kind in ("fast", "general"):
        print(f"moesim LRU, {kind + ' kernel':14} {n / best[kind] / 1e6:7.1f} M/s "
              f"(sequential, kernel_s) = {best['bare'] / best[kind]:.2f} of bare")  # fmt: skip


if __name__ == "__main__":
    main()
