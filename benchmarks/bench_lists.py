"""Speed of what runs before a prefetching replay: MoE-Infinity's matching pass, the cross-layer
predictions, the token count of a trace, and (with ``--learned``) the learned predictor's
inference, each against plain timed LRU's whole ``run()`` measured in the same run.

    python benchmarks/bench_lists.py [TRACE] [--capacities 1 100 1000] [--repeat 2]
                                     [--learned MODEL.npz]

Rows:
- ``moe_infinity.match`` at each capacity (no warm collection): on all cores, and on one
  (``serial``: the blocks run in the calling thread). Capacity 1 is the part of the pass that
  does not grow with the collection. Then ``issue_lists`` from those matches (horizon 1, top 6):
  ``build`` is the two.
- ``history_predictors.cross_layer`` at horizon 1 (top 6, no warm counts), and the source rows
  it starts from: the token table, and the sort that stays for other ids.
- ``Trace.num_tokens``: the presence-table count, and the sort it replaced.
- ``LearnedPredictor.predict(trace, 1)`` (with the model's horizon mix) where ``--learned``, and
  all the model's horizons in one pass (``predict_many``) against one ``predict`` per horizon.
"""

from __future__ import annotations

import argparse
import time

from _common import best_of, default_trace

from simulator import history_predictors, moe_infinity
from simulator.config import SimConfig
from simulator.engine import prepare, run
from traces.io import read_trace
from traces.trace import tokens_by_sort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", nargs="?", help="trace (default: the DeepSeek training set)")
    ap.add_argument("--capacities", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--repeat", type=int, default=2, help="keep the fastest of N runs of each")
    ap.add_argument("--learned", help="model file from `moesim train` (adds a predict row)")
    args = ap.parse_args()
    path = args.trace or default_trace()
    trace = read_trace(path, load_text=bool(args.learned))
    prep = prepare(trace)
    print(f"trace {path}: {prep.acc.num_accesses:,} accesses")

    def best(fn) -> float:
        fn()  # compile or load the kernels first

        def timed():
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t,)

        return best_of(args.repeat, timed)[0]

    cfg = SimConfig()
    cfg.cache.fraction = 0.1
    cfg.replay.mode = "timed"
    cfg.validate()

    def lru() -> None:
        prep.cache.clear()
        run(prep, cfg, "lru")

    base = best(lru)
    print(f"{'what':44s} {'s':>8s} {'x LRU':>7s}")
    print(f"{'plain timed LRU run() (10%, the baseline)':44s} {base:8.2f} {1.0:7.2f}")
    for cap in args.capacities:
        for label, par_min in (("", moe_infinity.PAR_MIN), (" serial", 1 << 62)):
            s = best(lambda c=cap, p=par_min: moe_infinity.match(trace, prep.acc, c,
                                                                 par_min=p))  # fmt: skip
            print(f"{f'moe_infinity.match capacity {cap}{label}':44s} {s:8.2f} {s / base:7.2f}")
        m = moe_infinity.match(trace, prep.acc, cap)
        s = best(lambda m=m: moe_infinity.issue_lists(trace, prep.acc, m, 1, 6))
        print(f"{'  its issue_lists h 1, top 6':44s} {s:8.2f} {s / base:7.2f}")
    s = best(lambda: history_predictors.cross_layer(trace, prep.acc, 1, 6))
    print(f"{'history_predictors.cross_layer h 1, top 6':44s} {s:8.2f} {s / base:7.2f}")
    s = best(lambda: history_predictors.source_rows(trace, 1))
    print(f"{'source_rows h 1 (token table)':44s} {s:8.3f} {s / base:7.3f}")
    s = best(lambda: history_predictors.source_rows_by_sort(trace, 1))
    print(f"{'source_rows h 1 by sort':44s} {s:8.3f} {s / base:7.3f}")
    s = best(lambda: trace.num_tokens)
    print(f"{'Trace.num_tokens (presence table)':44s} {s:8.3f} {s / base:7.3f}")
    s = best(lambda: tokens_by_sort(trace.seq, trace.pos))
    print(f"{'Trace.num_tokens by sort (before)':44s} {s:8.3f} {s / base:7.3f}")
    if args.learned:
        from policies.learned import LearnedPredictor

        model = LearnedPredictor.load(args.learned)
        s = best(lambda: model.predict(trace, 1))
        print(f"{'LearnedPredictor.predict(h=1, with its mix)':44s} {s:8.2f} {s / base:7.2f}")
        hs = model.horizons
        s = best(lambda: model.predict_many(trace, hs))
        print(f"{f'predict_many(h {hs}) in one pass':44s} {s:8.2f} {s / base:7.2f}")
        s = best(lambda: [model.predict(trace, h) for h in hs])
        print(f"{f'predict at h {hs}, one call each':44s} {s:8.2f} {s / base:7.2f}")


if __name__ == "__main__":
    main()
