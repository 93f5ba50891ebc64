"""The ceiling for a count-mode LRU on this machine: a bare numba LRU over the same accesses.

One global pool, sequential access, no per-layer counts, no protection, no bookkeeping: what
moesim's general request path (partitions, atomic protection, pins, in-flight states,
prefetch bookkeeping) is measured against. Prints both rates and their ratio, same run.

    python benchmarks/bare_lru.py [TRACE] [--slots 166]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
from numba import njit

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
    args = ap.parse_args()
    prep = prepare(read_trace(args.trace or _common.default_trace()))
    acc = prep.acc
    bare_lru(acc.obj[:100], acc.num_objects, args.slots)
    warm_up("count")
    t0 = time.perf_counter()
    hits = bare_lru(acc.obj, acc.num_objects, args.slots)
    bare = time.perf_counter() - t0
    rec = run(prep, _common.count_config(args.slots, access="sequential"), "lru")
    assert rec["hits"] == hits, (rec["hits"], hits)
    n = acc.num_accesses
    print(f"{n:,} accesses, {args.slots} slots, hits {hits:,} (equal)")
    print(f"bare LRU   {n / bare / 1e6:7.1f} M/s")
    print(f"moesim LRU {n / rec['kernel_s'] / 1e6:7.1f} M/s (sequential, kernel_s)")
    print(f"moesim / bare = {bare / rec['kernel_s']:.2f}")


if __name__ == "__main__":
    main()
