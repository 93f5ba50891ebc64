#!/usr/bin/env python
"""Replay throughput: moesim's kernels against libCacheSim on the same access sequence.

One trace (default: the DeepSeek-V2-Lite Puffin training set, ~30 M accesses; a synthetic
DeepSeek-shaped trace of ~11 M where ../shared is absent), one cache size, measured side by
side in one process:

- moesim count mode, LRU / FIFO / LFU / Belady, atomic and sequential access: accesses per
  second of ``kernel_s`` (the jitted replay loop alone; compiled kernels are loaded first).
  LRU and FIFO run on the list fast path (simulator/fast_count.py); they are also measured
  on the general kernel (``fast_count.general_kernel()``), and both records must be equal.
- libCacheSim (Python binding, C core) LRU / FIFO / LFU / Belady on the oracleGeneral export
  of the same trace: accesses per second of the wall time of ``cache.process_trace(reader)``,
  which includes reading each 24-byte record from the memory-mapped file, the hash-table
  lookup and the policy's update and eviction; not cache creation or opening the reader.
- moesim timed mode (no prefetch, and the oracle prefetcher) against count mode, atomic
  (against the fast path and the general count kernel for LRU and FIFO; LRU, FIFO and LFU
  timed run on the timed fast path, simulator/fast_timed.py, and are also measured on the
  general timed kernel, and both records must be equal).

Sequential moesim must give exactly libCacheSim's miss count; the table says so per policy.
Ratios are against libCacheSim measured in the same run, never absolute targets.

    python benchmarks/bench_throughput.py [TRACE] [--slots 166] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import (
    best_of,
    count_config,
    default_trace,
    git_head,
    log,
    machine,
    peak_rss_mib,
    rate,
)

POLICIES = ["lru", "fifo", "lfu", "belady"]
LCS_CLASS = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "belady": "Belady"}
FAST = {"lru", "fifo"}  # served by the count fast path (simulator/fast_count.py)
FAST_TIMED = {"lru", "fifo", "lfu"}  # served by the timed fast path (simulator/fast_timed.py)


def _toy():
    from simulator.engine import prepare
    from traces.synth import SynthKnobs, synth_trace

    knobs = SynthKnobs(sequences=2, prefill_len=3, decode_len=3, batch_size=2)
    return prepare(synth_trace("deepseek-v2-lite", knobs))


def warm_up_oracle_prefetch() -> None:
    """Load (or compile) what the oracle prefetcher's list building jits, on a toy trace."""
    from simulator.engine import run

    run(_toy(), count_config(64, "atomic", mode="timed", prefetch="oracle"), "lru")


def warm_up_fast_count() -> None:
    """Load (or compile) the count fast path's kernels, both access modes, on a toy trace."""
    from simulator.engine import run

    toy = _toy()
    for access in ("atomic", "sequential"):
        run(toy, count_config(64, access), "lru")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", help="moesim trace (.parquet); default: see above")
    ap.add_argument("--slots", type=int, default=166, help="cache size in experts (166 = 10%%)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; best is kept")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    ap.add_argument("--lcs-hashpower", type=int, default=12,
                    help="libCacheSim hash table: log2 of buckets (binding's: 24)")  # fmt: skip
    ap.add_argument("--no-timed", action="store_true", help="skip the timed-mode comparison")
    ap.add_argument("--export", help="oracleGeneral file to write/reuse (default: a temp file)")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]

    import libcachesim as lcs
    import numpy as np

    from simulator import fast_count
    from simulator.engine import prepare, run
    from simulator.export import export
    from simulator.warmup import warm_up
    from traces.io import read_trace

    path = Path(args.trace) if args.trace else default_trace()
    t = time.perf_counter()
    trace = read_trace(path)
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    prep = prepare(trace)
    t_prep = time.perf_counter() - t
    n = prep.acc.num_accesses
    t = time.perf_counter()
    warm_up("count")
    warm_up_fast_count()
    if not args.no_timed:
        warm_up("timed")
        warm_up_oracle_prefetch()
    t_warm = time.perf_counter() - t
    print(f"# moesim throughput vs libCacheSim  ({machine()})")
    print(f"# moesim at {git_head()}; libCacheSim {getattr(lcs, '__version__', '?')}")
    print(f"trace {path}: {n:,} accesses, {prep.acc.num_groups:,} step-layers, "
          f"{prep.acc.num_objects} experts; cache {args.slots} slots (global)")  # fmt: skip
    print(f"read {t_read:.2f} s, prepare {t_prep:.2f} s, kernel load/compile {t_warm:.2f} s")
    if n < 10_000_000:
        log(f"note: {n:,} accesses (< 10 M): figures are noisier than on the full trace")

    # ---- moesim count mode (LRU and FIFO: the fast path, then the general kernel)
    moe: dict[tuple[str, str], tuple[float, dict]] = {}
    gen: dict[tuple[str, str], tuple[float, dict]] = {}
    for policy in policies:
        for access in ("atomic", "sequential"):
            cfg = count_config(args.slots, access)

            def one(cfg=cfg, policy=policy):
                w = time.perf_counter()
                rec = run(prep, cfg, policy)
                rec["wall_s"] = time.perf_counter() - w
                return rec["kernel_s"], rec

            moe[policy, access] = best_of(args.repeat, one)
            log(f"moesim {policy} {access}: {moe[policy, access][0]:.2f} s")
            if policy in FAST:
                with fast_count.general_kernel():
                    gen[policy, access] = best_of(args.repeat, one)
                log(f"moesim {policy} {access} general kernel: {gen[policy, access][0]:.2f} s")
                a, b = moe[policy, access][1], gen[policy, access][1]
                differ = [k for k in a if k not in ("kernel_s", "wall_s") and a[k] != b[k]]
                if differ:
                    raise SystemExit(f"{policy} {access}: fast path and general kernel differ "
                                     f"in {differ}")  # fmt: skip

    # ---- libCacheSim on the oracleGeneral export
    tmpdir = None
    if args.export:
        og = Path(args.export)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="moesim-bench-")
        og = Path(tmpdir.name) / "trace.oracleGeneral"
    if not og.exists():
        t = time.perf_counter()
        export(prep, og, "oracle-general")
        mib = og.stat().st_size / 2**20
        log(f"exported {og} ({mib:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    # touch the file once so no libCacheSim run pays for reading it from disk
    np.fromfile(og, np.uint8).sum()
    lib: dict[str, tuple[float, int]] = {}
    for policy in policies:

        def one(policy=policy):
            cache = getattr(lcs, LCS_CLASS[policy])(cache_size=args.slots,
                                                    hashpower=args.lcs_hashpower)  # fmt: skip
            reader = lcs.TraceReader(str(og), lcs.TraceType.ORACLE_GENERAL_TRACE)
            w = time.perf_counter()
            ratio, _ = cache.process_trace(reader)
            return time.perf_counter() - w, round(ratio * n)

        lib[policy] = best_of(args.repeat, one)
        log(f"libCacheSim {policy}: {lib[policy][0]:.2f} s")

    print()
    print("count mode, accesses/s in millions (moesim: kernel_s; libCacheSim: process_trace)")
    print(f"{'policy':8} {'atomic':>8} {'sequential':>10} {'libCacheSim':>11} "
          f"{'seq/lcs':>8} {'atom/lcs':>8}  misses seq == libCacheSim")  # fmt: skip
    for policy in policies:
        ka, (ks, rs) = moe[policy, "atomic"][0], moe[policy, "sequential"]
        kl, ml = lib[policy]
        same = "yes" if rs["misses"] == ml else f"NO: {rs['misses']:,} vs {ml:,}"
        print(f"{policy:8} {rate(n, ka)} {rate(n, ks):>10} {rate(n, kl):>11} "
              f"{kl / ks:8.2f} {kl / ka:8.2f}  {same} ({ml:,} misses)")  # fmt: skip
        if policy in FAST:
            ga, gs = gen[policy, "atomic"][0], gen[policy, "sequential"][0]
            print(f"{'  general':8} {rate(n, ga)} {rate(n, gs):>10} {'':>11} "
                  f"{kl / gs:8.2f} {kl / ga:8.2f}  (general kernel: same records as the "
                  f"fast path; fast path {ga / ka:.2f}x / {gs / ks:.2f}x faster)")  # fmt: skip
    print("atomic / sequential throughput: "
          + ", ".join(f"{p} {moe[p, 'sequential'][0] / moe[p, 'atomic'][0]:.2f}"
                      for p in policies))  # fmt: skip
    print()
    print("moesim run() wall time beyond the kernel (set-up, result), seconds:")
    print("  " + ", ".join(f"{p}/{a[:3]} {moe[p, a][1]['wall_s'] - moe[p, a][0]:.3f}"
                           for p in policies for a in ("atomic", "sequential")))  # fmt: skip

    # ---- timed mode vs count mode
    timed: dict[tuple[str, str], tuple[float, dict]] = {}
    timed_gen: dict[tuple[str, str], tuple[float, dict]] = {}
    if not args.no_timed:
        from simulator import fast_timed

        for policy in policies:
            for pf in ("none", "oracle"):
                cfg = count_config(args.slots, "atomic", mode="timed", prefetch=pf)

                def one(cfg=cfg, policy=policy):
                    w = time.perf_counter()
                    rec = run(prep, cfg, policy)
                    rec["wall_s"] = time.perf_counter() - w
                    return rec["kernel_s"], rec

                timed[policy, pf] = best_of(args.repeat, one)
                log(f"moesim timed {policy} prefetch={pf}: {timed[policy, pf][0]:.2f} s")
                if policy in FAST_TIMED:  # the timed fast path against the general timed kernel
                    fast_timed.ENABLED = False
                    try:
                        timed_gen[policy, pf] = best_of(args.repeat, one)
                    finally:
                        fast_timed.ENABLED = True
                    a, b = dict(timed[policy, pf][1]), dict(timed_gen[policy, pf][1])
                    for rec in (a, b):
                        rec.pop("kernel_s")
                        rec.pop("wall_s")
                    same = "same record" if a == b else "RECORDS DIFFER"
                    log(f"moesim timed {policy} prefetch={pf}, general kernel: "
                        f"{timed_gen[policy, pf][0]:.2f} s ({same})")  # fmt: skip
        print()
        print("timed mode vs count mode (atomic): accesses/s in millions of kernel_s, and")
        print("timed throughput as a fraction of count mode's; the oracle prefetcher's lists")
        print("are built in run() outside the kernel: its whole run() wall time is shown too")
        print("(LRU, FIFO: count = the fast path; LRU, FIFO, LFU: timed = the fast path;")
        print(" 'general' = the general count kernel, 'gen t+or' the general timed kernel)")
        print(f"{'policy':8} {'count':>8} {'general':>8} {'timed':>8} {'t+oracle':>8} "
              f"{'gen t+or':>8} {'timed/cnt':>9} {'orcl/cnt':>9} {'orcl/gen':>9} "
              f"{'oracle run() wall s':>20}")  # fmt: skip
        for policy in policies:
            kc = moe[policy, "atomic"][0]
            kg = gen[policy, "atomic"][0] if policy in FAST else kc
            kt, ko = timed[policy, "none"][0], timed[policy, "oracle"][0]
            kog = timed_gen[policy, "oracle"][0] if policy in FAST_TIMED else ko
            print(f"{policy:8} {rate(n, kc)} {rate(n, kg)} {rate(n, kt)} {rate(n, ko)} "
                  f"{rate(n, kog)} {kc / kt:9.2f} {kc / ko:9.2f} {kg / ko:9.2f} "
                  f"{timed[policy, 'oracle'][1]['wall_s']:20.2f}")  # fmt: skip
    print()
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
