"""``moesim train``: fit the learned expert predictor on a training trace and save it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from traces.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    d = _defaults()
    p = sub.add_parser(
        "train",
        help="train the learned expert predictor on a trace and save the model",
        description="Fit the learned expert predictor (docs/predictors.md) on TRACE: for every "
        "horizon H, a small numpy MLP that predicts each token's experts at layer l+H from its "
        "experts at layers l..l-S+1, the previous tokens' experts at layer l+H and the token "
        "itself (text or id, where the trace has it). Saves one portable .npz model (weights + "
        "JSON header naming the model shape and horizons); `moesim predict` applies it. Train "
        "on training prompts only, never on the prompts you evaluate on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("trace", help="training trace (.parquet) or folder of parts")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file (.npz)")
    p.add_argument(
        "--horizons", type=int, nargs="+", default=d.horizons, metavar="H",
        help="prediction horizons in layers (one network each)",
    )  # fmt: skip
    p.add_argument(
        "--src-layers", type=int, default=d.src_layers, metavar="S",
        help="the token's experts at layers l, l-1, ..., l-S+1 as features",
    )  # fmt: skip
    p.add_argument(
        "--prev-tokens", type=int, default=d.prev_tokens, metavar="P",
        help="the previous P tokens' experts at the target layer as features "
        "(used where those tokens ran in an earlier step)",
    )  # fmt: skip
    p.add_argument(
        "--no-token", action="store_true",
        help="do not use the token text / id (a model that works on any trace of the shape)",
    )  # fmt: skip
    p.add_argument(
        "--token-context", type=int, default=d.token_context, metavar="C",
        help="also the ids of the previous C tokens (needs the token feature)",
    )  # fmt: skip
    p.add_argument(
        "--subwords", type=int, default=d.subwords, metavar="N",
        help="hash buckets for the character 3-grams of the token text (0: off; text only)",
    )  # fmt: skip
    p.add_argument(
        "--position", action="store_true",
        help="also a log2 bucket of the token's index in its sequence",
    )  # fmt: skip
    p.add_argument(
        "--min-token-count", type=int, default=d.min_token_count, metavar="N",
        help="tokens seen fewer times in training share the 'unknown' embedding",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=d.hidden, metavar="N", help="hidden units")
    p.add_argument(
        "--hidden2", type=int, default=d.hidden2, metavar="N",
        help="units of a second hidden layer (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--epochs", type=float, default=d.epochs, metavar="E",
        help="passes over the training rows (fractions allowed)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=d.batch, metavar="B", help="mini-batch rows")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (peak)")
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, metavar="WD",
        help="decoupled weight decay of the embedding rows",
    )  # fmt: skip
    p.add_argument(
        "--max-rows", type=int, default=d.max_rows, metavar="N",
        help="train on a random N rows per horizon (0: all rows)",
    )  # fmt: skip
    p.add_argument(
        "--dropout", type=float, default=d.dropout, metavar="P",
        help="dropout on the hidden layer while training",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", type=int, default=d.ensemble, metavar="N",
        help="networks per horizon (different seeds; their log-probabilities are averaged)",
    )  # fmt: skip
    p.add_argument(
        "--horizon-mix", type=float, default=d.horizon_mix, metavar="W",
        help="default for predict: add W x the log-probabilities of each longer horizon",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument(
        "--valid", metavar="TRACE",
        help="after training, score the model's top-k on this (held-out) trace",
    )  # fmt: skip
    p.add_argument(
        "--skip-first", type=int, default=0, metavar="N",
        help="with --valid: also score leaving out each sequence's first N tokens",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def _defaults():
    from policies.learned import LearnedConfig

    return LearnedConfig()


def run(args: argparse.Namespace) -> int:
    from policies.learned import LearnedConfig, LearnedPredictor
    from traces.io import read_trace

    cfg = LearnedConfig(
        horizons=list(args.horizons),
        src_layers=args.src_layers,
        prev_tokens=args.prev_tokens,
        use_token=not args.no_token,
        token_context=args.token_context,
        subwords=args.subwords,
        position=args.position,
        min_token_count=args.min_token_count,
        hidden=args.hidden,
        hidden2=args.hidden2,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        ensemble=args.ensemble,
        horizon_mix=args.horizon_mix,
        max_rows=args.max_rows,
        seed=args.seed,
    )
    cfg.check()
    if args.skip_first < 0:
        raise ConfigError(f"--skip-first: expected an integer >= 0, got {args.skip_first}")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    trace = read_trace(args.trace, load_text=cfg.use_token)
    valid = read_trace(args.valid, load_text=cfg.use_token) if args.valid else None
    log(f"read {trace.num_rows:,} rows from {args.trace} in {time.perf_counter() - t0:.1f} s")
    model = LearnedPredictor.train(trace, cfg, log=log)
    if valid is not None:
        model.check_trace(valid, where=f"model trained on {args.trace}")
    path = model.save(args.output)
    summary = {
        "model": str(path),
        "horizons": model.horizons,
        "token_feature": model.token_kind,
        **model.info,
    }
    if valid is not None:
        from simulator.prediction import score_predictions, score_table

        scores = []
        valid.preds.update(model.predict_many(valid, model.horizons))
        for h in model.horizons:
            for skip in sorted({0, args.skip_first}):
                s = score_predictions(valid, h, skip)
                s["label"] = "valid"
                scores.append(s)
        summary["valid"] = [
            {k: s[k] for k in ("horizon", "skip_first", "rows", "precision", "recall", "f1")}
            for s in scores
        ]
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"trained horizons {model.horizons} on {model.info['rows']:,} rows of "
        f"{model.info['trace_rows']:,} ({model.info['tokens']:,} tokens, vocabulary "
        f"{model.info['vocab']:,}) in "
        f"{model.info['train_s']:.1f} s; wrote {path}"
    )
    if valid is not None:
        print(f"top-k predictions on {args.valid}:")
        print(score_table(scores))
    return 0
