"""``moesim predict``: write a learned predictor's top-k experts into a trace's pred_h columns.

Also scores predictions (precision, recall, F1 per horizon) against the trace's own experts,
with ``--score-only`` for the prediction columns a trace already has (e.g. MoE-Beyond's).
"""

from __future__ import annotations

import argparse
import json
import time

from traces.errors import ConfigError
from traces.format import pred_column


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="add a learned predictor's predictions to a trace (pred_h columns); score them",
        description="Apply a model from `moesim train` to TRACE and write its top-k predicted "
        "experts of every (token, layer) into the pred_h{H} columns of OUT (meta.pred_source = "
        "'moesim-learned'; every other column unchanged), then print their precision, recall "
        "and F1 against the trace's actual experts. `moesim replay OUT --prefetch trace "
        "--horizon H` then prefetches them. With --score-only, score the prediction columns "
        "TRACE already has instead (no model, nothing written).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("trace", help="trace (.parquet) or folder of parts")
    p.add_argument("--model", metavar="MODEL", help="model file written by `moesim train`")
    p.add_argument("-o", "--output", metavar="OUT", help="output trace (.parquet)")
    p.add_argument(
        "--horizons", type=int, nargs="+", metavar="H",
        help="horizons to predict / score (default: all of the model's / the trace's)",
    )  # fmt: skip
    p.add_argument(
        "--top-k", type=int, metavar="K",
        help="experts predicted per (token, layer) (default: the model's top_k)",
    )  # fmt: skip
    p.add_argument(
        "--horizon-mix", type=float, metavar="W",
        help="add W x the log-probabilities of each longer horizon the model has "
        "(default: the model's setting; 0: each horizon's own network only)",
    )  # fmt: skip
    p.add_argument(
        "--skip-first", type=int, default=0, metavar="N",
        help="also score leaving out each sequence's first N tokens",
    )  # fmt: skip
    p.add_argument(
        "--score-only", action="store_true",
        help="score TRACE's existing pred_h columns; no model, no output",
    )  # fmt: skip
    p.add_argument(
        "--per-layer", action="store_true", help="also print recall per MoE layer"
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object per score")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simulator.prediction import score_predictions, score_table, scores_json
    from traces.io import read_trace, write_trace

    if args.skip_first < 0:
        raise ConfigError(f"--skip-first: expected an integer >= 0, got {args.skip_first}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if args.score_only:
        if args.model or args.output or args.horizon_mix is not None:
            raise ConfigError(
                "--score-only scores the trace's own columns: drop --model, -o and --horizon-mix"
            )
        trace = read_trace(args.trace)
        horizons = args.horizons or sorted(trace.preds)
        if not horizons:
            raise ConfigError(
                f"{args.trace}: no pred_h columns to score (`moesim predict --model` adds them)"
            )
        label = trace.meta.pred_source or "trace"
    else:
        if not args.model or not args.output:
            raise ConfigError(
                "expected --model MODEL and -o OUT (or --score-only to score existing columns)"
            )
        from policies.learned import PRED_SOURCE, LearnedPredictor

        model = LearnedPredictor.load(args.model)
        horizons = args.horizons or model.horizons
        for h in horizons:
            model._net(h)  # a horizon the model lacks: one-line error before any work
        trace = read_trace(args.trace, load_text=True)  # keep every column, text included
        model.check_trace(trace, where=f"model {args.model}")
        t0 = time.perf_counter()
        trace.preds.update(model.predict_many(trace, horizons, args.top_k, args.horizon_mix))
        pred_s = time.perf_counter() - t0
        ours = sorted(int(h) for h in horizons)
        others = sorted(set(trace.preds) - set(ours))
        old = trace.meta.pred_source
        if others:
            trace.meta.pred_source = f"{PRED_SOURCE} (h{','.join(map(str, ours))}) + {old or '?'}"
        else:
            trace.meta.pred_source = PRED_SOURCE
        trace.meta.extra = dict(trace.meta.extra)
        trace.meta.extra["learned_predictor"] = {
            "model": str(args.model),
            "horizons": ours,
            "top_k": args.top_k or model.shape["top_k"],
            "horizon_mix": model.cfg.horizon_mix if args.horizon_mix is None else args.horizon_mix,
            "trained_on": model.info.get("trained_on"),
            "other_pred_columns": [pred_column(h) for h in others],
        }
        write_trace(trace, args.output)
        label = PRED_SOURCE
        if not args.json:
            print(
                f"wrote {', '.join(pred_column(h) for h in ours)} for {trace.num_rows:,} rows "
                f"to {args.output} (predicted in {pred_s:.1f} s)"
            )
    scores = []
    for h in horizons:
        for skip in sorted({0, args.skip_first}):
            s = score_predictions(trace, h, skip)
            s["label"] = label
            scores.append(s)
    if args.json:
        for s in scores:
            out = scores_json(s)
            if not args.per_layer:
                out.pop("per_layer")
            print(json.dumps(out))
        return 0
    print("scored against the trace's actual experts (micro-averaged over rows):")
    print(score_table(scores))
    if args.per_layer:
        for s in scores:
            rec = " ".join(f"{100 * x:.0f}" for x in s["per_layer"]["recall"])
            print(f"h={s['horizon']} skip={s['skip_first']} recall per layer (%): {rec}")
    return 0
