"""Speed of the prefetchers in timed mode against plain LRU in timed mode, same run.

For each prefetcher: the whole ``run()`` wall time (building its request lists included: the
MoE-Infinity matching pass, the stand-ins' predictions, the adaptive horizon) and the kernel's
own time, as ratios to timed LRU without prefetching. The issue's target: MoE-Infinity and the
learned predictor within 3x of plain timed LRU. ``--eviction`` adds MoE-Infinity's
activation-aware eviction (``--policy moe-infinity``), without prefetching and with its own
prefetcher, on the timed fast path (simulator/fast_mi.py) and on the general kernel; the two
records must be equal.

``--sweep N`` adds what a sweep costs: N configurations of one trace (cache fractions from 5%
to 50% at PCIe 4.0 and 5.0 bandwidths) run one after another in one process, for plain LRU and
for each prefetcher, the lists built once (as `moesim sweep` does: they depend on the trace and
the prefetcher, not on the cache or the link) and reused.

    python benchmarks/bench_prefetchers.py [TRACE] [--fraction 0.1] [--repeat N] [--learned M.npz]
        [--eviction] [--sweep N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import REPO, best_of, default_trace

from simulator.config import SimConfig
from simulator.engine import prepare, run
from traces.io import read_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", nargs="?", help="trace (default: the DeepSeek training set)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of N runs of each")
    ap.add_argument("--learned", help="model file from `moesim train` (adds learned rows)")
    ap.add_argument("--eviction", action="store_true",
                    help="add MoE-Infinity's eviction, fast path and general kernel")  # fmt: skip
    ap.add_argument("--sweep", type=int, default=0,
                    help="also time N cache/bandwidth configurations per prefetcher")  # fmt: skip
    ap.add_argument("--prefetchers", nargs="+", default=[
        "oracle", "prev-token", "cross-layer", "moe-infinity", "moe-infinity:capacity=100",
        "adaptive"])  # fmt: skip
    args = ap.parse_args()
    path = args.trace or default_trace()

    t0 = time.perf_counter()
    trace = read_trace(path, load_text=bool(args.learned))  # the learned model reads text
    prep = prepare(trace)
    print(f"trace {path}: {prep.acc.num_accesses:,} accesses, read + prepare "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    pfs = list(args.prefetchers)
    if args.learned:
        pfs += [f"learned:model={args.learned}", f"adaptive:base=learned,model={args.learned}"]

    def once(pf: str, policy: str = "lru") -> tuple[float, float, dict]:
        return best_of(args.repeat, lambda: one(pf, policy))

    def one(pf: str, policy: str = "lru") -> tuple[float, float, dict]:
        cfg = SimConfig()
        cfg.cache.fraction = args.fraction
        cfg.replay.mode = "timed"
        cfg.replay.prefetch = pf
        cfg.validate()
        prep.cache.clear()  # each prefetcher builds its lists from scratch
        t = time.perf_counter()
        rec = run(prep, cfg, policy)
        return time.perf_counter() - t, rec["kernel_s"], rec

    # compile or load every prefetcher's kernels first, on the bundled sample
    sample = prepare(read_trace(REPO / "traces" / "sample" / "sample.parquet", load_text=False))
    for pf in ["none", *pfs]:
        cfg = SimConfig()
        cfg.replay.mode = "timed"
        cfg.replay.prefetch = pf
        if pf.startswith(("learned", "adaptive:base=learned")):
            continue  # needs the model's shape; loaded in the timed run
        run(sample, cfg.validate(), "lru")
    once("none")
    base_wall, base_kernel, base = once("none")
    print(f"{'prefetcher':34s} {'run() s':>8s} {'x LRU':>6s} {'kernel s':>8s} {'x LRU':>6s} "
          f"{'hit rate':>8s} {'stall s':>8s}")  # fmt: skip
    print(f"{'none (plain LRU)':34s} {base_wall:8.2f} {1.0:6.2f} {base_kernel:8.2f} {1.0:6.2f} "
          f"{base['hit_rate']:8.4f} {base['stall_s']:8.1f}")  # fmt: skip
    for pf in pfs:
        wall, kern, rec = once(pf)
        print(
            f"{pf[:34]:34s} {wall:8.2f} {wall / base_wall:6.2f} {kern:8.2f} "
            f"{kern / base_kernel:6.2f} {rec['hit_rate']:8.4f} {rec['stall_s']:8.1f}"
        )
    if args.sweep > 0:
        sweep(prep, ["none", *pfs], args.sweep)
    if args.eviction:
        from simulator import fast_timed

        fast_timed.ENABLED = False  # load (or compile) the general kernel outside the timing
        try:
            warm = SimConfig()
            warm.replay.mode = "timed"
            run(sample, warm.validate(), "moe-infinity")
        finally:
            fast_timed.ENABLED = True
        for pf in ("none", "moe-infinity"):
            fast = once(pf, "moe-infinity")
            fast_timed.ENABLED = False
            try:
                gen = once(pf, "moe-infinity")
            finally:
                fast_timed.ENABLED = True
            a, b = ({k: v for k, v in r[2].items() if k != "kernel_s"} for r in (fast, gen))
            if a != b:
                raise SystemExit(f"eviction moe-infinity, prefetch {pf}: fast path and general "
                                 "kernel differ")  # fmt: skip
            for label, (wall, kern, rec) in (("fast", fast), ("general", gen)):
                print(
                    f"{'evict moe-inf, pf ' + pf[:4] + ', ' + label:34s} {wall:8.2f} "
                    f"{wall / base_wall:6.2f} {kern:8.2f} {kern / base_kernel:6.2f} "
                    f"{rec['hit_rate']:8.4f} {rec['stall_s']:8.1f}"
                )
            print(f"  (same record; the fast path's kernel is {gen[1] / fast[1]:.2f}x faster)")
    if args.learned:
        # the learned predictor's guesses precomputed once (what `moesim predict` writes as the
        # trace's pred_h1 column), then replayed with --prefetch trace
        import dataclasses

        from policies.learned import LearnedPredictor

        t = time.perf_counter()
        preds = LearnedPredictor.load(args.learned).predict(prep.trace, 1)
        print(f"(learned predictions precomputed in {time.perf_counter() - t:.1f} s)")
        prep.trace = dataclasses.replace(prep.trace, preds={1: preds})
        wall, kern, rec = once("trace")
        print(
            f"{'trace (learned, precomputed)':34s} {wall:8.2f} {wall / base_wall:6.2f} "
            f"{kern:8.2f} {kern / base_kernel:6.2f} {rec['hit_rate']:8.4f} {rec['stall_s']:8.1f}"
        )


def sweep_configs(n: int) -> list[tuple[float, float]]:
    """``n`` (cache fraction, bandwidth GB/s) pairs: fractions spread from 5% to 50%, each at
    PCIe 4.0 (25 GB/s) and 5.0 (50 GB/s)."""
    fracs = np.linspace(0.05, 0.5, (n + 1) // 2)
    return [(float(f), bw) for f in fracs for bw in (25.0, 50.0)][:n]


def sweep(prep, pfs: list[str], n: int) -> None:
    """Wall time of ``n`` timed runs per prefetcher in a row, lists built once (the memo
    cleared before each prefetcher's first run), against plain LRU's ``n`` runs."""
    points = sweep_configs(n)
    print(f"\nsweep of {len(points)} configurations (fractions "
          f"{points[0][0]:.2f}-{points[-1][0]:.2f}, 25 and 50 GB/s), one process, lists built "
          "once per prefetcher:")  # fmt: skip
    print(f"{'prefetcher':34s} {'total s':>8s} {'x LRU':>6s} {'per run s':>9s} "
          f"{'first run s':>11s}")  # fmt: skip
    base = None
    for pf in pfs:
        prep.cache.clear()
        walls = []
        for frac, bw in points:
            cfg = SimConfig()
            cfg.cache.fraction = frac
            cfg.link.bandwidth_gbps = bw
            cfg.replay.mode = "timed"
            cfg.replay.prefetch = pf
            cfg.validate()
            t = time.perf_counter()
            run(prep, cfg, "lru")
            walls.append(time.perf_counter() - t)
        total = sum(walls)
        base = total if base is None else base
        label = "none (plain LRU)" if pf == "none" else pf
        print(f"{label[:34]:34s} {total:8.2f} {total / base:6.2f} {total / len(walls):9.2f} "
              f"{walls[0]:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
