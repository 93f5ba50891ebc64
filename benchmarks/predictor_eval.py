#!/usr/bin/env python
"""Expert prediction on DeepSeek-V2-Lite: the learned predictor against MoE-Beyond and baselines.

Trains moesim's learned predictor (policies/learned.py) on the Puffin training prompts ONLY,
predicts the WebGLM test prompts at horizons 1, 2 and 4 and scores the top-6 predictions
(precision, recall, F1; micro-averaged over rows; over all rows and leaving out each prompt's
first 10 tokens, as MoE-Beyond's protocol does), next to:

- MoE-Beyond's published predictions for the same 100 test prompts (webglm-test-predicted;
  horizon-free: its predictor sees the whole prompt, no expert activations), scored the same way;
- simple baselines fitted on the same training rows: per-layer popularity; the previous
  token's experts at the same layer; cross-layer co-occurrence from the token's experts h
  layers earlier (expert b scored by the sum of P(b at l | a at l-h) over the token's experts
  a at l-h); the token's identity (per-token expert frequencies per layer); a ridge regression
  on the token's experts at layers l-h .. l-h-3 and the previous 2 tokens' experts at layer l.
  Where a baseline has nothing to go on (first token, unseen token, l < h) it falls back to
  per-layer popularity.

The learned model's own run also reports the per-layer recall at h=1 next to MoE-Beyond's
(--per-layer).

    python benchmarks/predictor_eval.py [DATA] [--horizons 1 2 4] [--epochs E]
        [--model MODEL.npz | --save-model MODEL.npz] [--train-limit N] [--json]

DATA defaults to ../shared/traces/real/deepseek-v2-lite-moe-beyond. Imports are cached in
$TMPDIR/moesim-bench. Every prediction here is top-6, as is the routing, so precision, recall
and F1 coincide; the table shows one number per cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from _common import CACHE_DIR, MOE_BEYOND, git_head, log, machine, peak_rss_mib
from numba import njit

from policies.learned import LearnedConfig, LearnedPredictor, token_table, vocab_ids
from simulator.prediction import score_predictions
from traces.io import read_trace

K = 6
SKIP = 10


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def imported(folder: Path, limit: int | None = None) -> Path:
    """The folder imported once (per-token steps, token text kept), cached by path and limit."""
    from traces.importers import import_moe_beyond

    if not folder.is_dir():
        sys.exit(f"predictor_eval: no such folder {folder}")
    key = f"{folder.resolve()}|{limit}".encode()
    out = CACHE_DIR / f"{folder.name}-{zlib.crc32(key):08x}.parquet"
    if not out.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        log(f"importing {folder} -> {out} (once) ...")
        import_moe_beyond([folder], out, limit=limit)
    return out


# ---------------------------------------------------------------------------------------------
# baselines (numpy / numba, no loop per row)
# ---------------------------------------------------------------------------------------------


def _topk_csr(scores: np.ndarray, k: int = K):
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.arange(scores.shape[0] + 1, dtype=np.int64) * k, top.ravel().astype(np.int16)


def _counts(trace, nl: int, E: int) -> np.ndarray:
    lens = np.diff(trace.offsets)
    idx = np.repeat(trace.layer.astype(np.int64), lens) * E + trace.experts
    return np.bincount(idx, minlength=nl * E).reshape(nl, E).astype(np.float64)


def _multihot(trace, rows: np.ndarray, E: int) -> np.ndarray:
    """float32[len(rows), E]: 1 for each expert of each row (rows < 0: all zero)."""
    out = np.zeros((rows.shape[0], E), np.float32)
    ok = rows >= 0
    r = rows[ok]
    lens = np.diff(trace.offsets)[r]
    starts = trace.offsets[r]
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(
        lens.sum()
    )
    out[np.repeat(np.nonzero(ok)[0], lens), trace.experts[idx]] = 1.0
    return out


def _row_at(table, tok: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Row of (token, layer) or -1 (token or layer out of range)."""
    nl = table.rowidx.shape[1]
    ok = (tok >= 0) & (layer >= 0) & (layer < nl)
    out = np.full(tok.shape[0], -1, np.int64)
    out[ok] = table.rowidx[tok[ok], layer[ok]]
    return out


def _prev_tok(table, tok: np.ndarray, j: int = 1) -> np.ndarray:
    pt = tok - j
    ok = (pt >= 0) & (table.tok_seq[np.maximum(pt, 0)] == table.tok_seq[tok])
    return np.where(ok, pt, -1)


@njit(cache=True)
def _cooc_kernel(rowidx, offsets, experts, h, E):
    """C[L, a, b] = tokens with expert a at layer L-h and expert b at layer L."""
    ntok, nl = rowidx.shape
    C = np.zeros((nl, E, E), np.float64)
    for t in range(ntok):
        for L in range(h, nl):
            r0 = rowidx[t, L - h]
            r1 = rowidx[t, L]
            if r0 < 0 or r1 < 0:
                continue
            for i in range(offsets[r0], offsets[r0 + 1]):
                for j in range(offsets[r1], offsets[r1 + 1]):
                    C[L, experts[i], experts[j]] += 1.0
    return C


@njit(cache=True)
def _normal_eq_kernel(feats, nf, rows, layer, offsets, experts, nl, D, E):
    """Per target layer: X^T X and X^T Y of one-hot features (the last feature: a bias)."""
    XtX = np.zeros((nl, D, D))
    XtY = np.zeros((nl, D, E))
    for b in range(rows.shape[0]):
        L = layer[rows[b]]
        r = rows[b]
        for i in range(nf[b]):
            fi = feats[b, i]
            for j in range(nf[b]):
                XtX[L, fi, feats[b, j]] += 1.0
            for q in range(offsets[r], offsets[r + 1]):
                XtY[L, fi, experts[q]] += 1.0
    return XtX, XtY


class Baselines:
    """The simple predictors, fitted on the training trace, applied to the test trace."""

    def __init__(self, train, nl: int, E: int):
        self.train, self.nl, self.E = train, nl, E
        self.pop = _counts(train, nl, E)
        self.ttab = token_table(train)

    def popularity(self, test):
        return _topk_csr(self.pop[test.layer])

    def prev_token(self, test):
        tab = token_table(test)
        pr = _row_at(tab, _prev_tok(tab, tab.tok[np.arange(test.num_rows)]), test.layer)
        s = _multihot(test, pr, self.E) + 1e-6 * self._pop_norm(test.layer)
        return _topk_csr(s)

    def _pop_norm(self, layer):
        p = self.pop[layer]
        return p / p.sum(axis=1, keepdims=True)

    def cooccurrence(self, test, h: int):
        C = _cooc_kernel(self.ttab.rowidx, self.train.offsets, self.train.experts, h, self.E)
        C /= np.maximum(C.sum(axis=2, keepdims=True), 1)  # P(expert b at l | expert a at l-h)
        tab = token_table(test)
        src = _row_at(tab, tab.tok, test.layer.astype(np.int64) - h)
        M = _multihot(test, src, self.E)
        s = 1e-6 * self._pop_norm(test.layer)
        for L in range(self.nl):
            sel = test.layer == L
            s[sel] += M[sel] @ C[L]
        return _topk_csr(s)

    def token_identity(self, test):
        keys = token_keys_text(self.train, self.ttab)
        vocab = np.unique(keys)
        v_train = vocab_ids(keys, vocab)[self.ttab.tok]
        lens = np.diff(self.train.offsets)
        idx = (
            np.repeat(v_train.astype(np.int64) * self.nl + self.train.layer, lens) * self.E
            + self.train.experts
        )
        n = (vocab.shape[0] + 1) * self.nl * self.E
        cnt = np.bincount(idx, minlength=n).reshape(-1, self.nl, self.E).astype(np.float32)
        tab = token_table(test)
        v_test = vocab_ids(token_keys_text(test, tab), vocab)[tab.tok]
        seen = v_test > 0  # an unseen token: popularity
        s = 1e-6 * self._pop_norm(test.layer)
        s[seen] += cnt[v_test[seen], test.layer[seen]]
        return _topk_csr(s)

    def ridge(self, test, h: int, lam: float = 1.0):
        cfg = LearnedConfig(horizons=[h], src_layers=4, prev_tokens=2, use_token=False,
                            token_context=0)  # fmt: skip
        shape = {"num_layers": self.nl, "experts_per_layer": [self.E] * self.nl, "top_k": K,
                 "model": ""}  # fmt: skip
        feat = LearnedPredictor(shape, cfg, None, np.zeros(0, np.int64), {})
        lay = feat._layout()
        # one-hot features without the layer index: (k or previous token j) x expert, + bias
        D = (cfg.src_layers + cfg.prev_tokens) * self.E + 1

        def design(trace, rows):
            F = feat._max_feats(trace)
            feats = np.empty((rows.shape[0], F), np.int32)
            vals = np.empty((rows.shape[0], F), np.float32)
            nf = np.empty(rows.shape[0], np.int32)
            feat._feats(feat._prepare(trace), trace, rows, h, feats, vals, nf)
            L = trace.layer[rows].astype(np.int64)[:, None]
            f = feats.astype(np.int64)
            src = (f >= lay["src"]) & (f < lay["src"] + self.nl * cfg.src_layers * self.E)
            prv = f >= lay["prev"]
            f = np.where(src, f - lay["src"] - L * cfg.src_layers * self.E, f)
            f = np.where(prv, cfg.src_layers * self.E + f - lay["prev"]
                         - L * cfg.prev_tokens * self.E, f)  # fmt: skip
            f = np.where(src | prv, f, D - 1)  # the layer feature becomes the bias
            valid = np.arange(feats.shape[1])[None, :] < nf[:, None]
            f = np.where(valid, f, 0).astype(np.int32)
            return np.ascontiguousarray(f), nf

        tr = self.train
        XtX = np.zeros((self.nl, D, D))
        XtY = np.zeros((self.nl, D, self.E))
        for start in range(0, tr.num_rows, 1 << 18):
            rows = np.arange(start, min(tr.num_rows, start + (1 << 18)), dtype=np.int64)
            f, nf = design(tr, rows)
            a, b = _normal_eq_kernel(f, nf, rows, tr.layer, tr.offsets, tr.experts, self.nl,
                                     D, self.E)  # fmt: skip
            XtX += a
            XtY += b
        W = np.linalg.solve(XtX + lam * np.eye(D)[None], XtY)
        rows = np.arange(test.num_rows, dtype=np.int64)
        f, nf = design(test, rows)
        X = np.zeros((test.num_rows, D), np.float32)
        valid = np.arange(f.shape[1])[None, :] < nf[:, None]
        np.add.at(X, (np.repeat(rows, nf), f[valid]), 1.0)
        s = np.zeros((test.num_rows, self.E), np.float32)
        for L in range(self.nl):
            sel = test.layer == L
            s[sel] = X[sel] @ W[L].astype(np.float32)
        return _topk_csr(s)


def token_keys_text(trace, table):
    return np.asarray(trace.token[table.first_row]).astype(str)


# ---------------------------------------------------------------------------------------------


def score(test, preds, h: int) -> dict:
    test.preds = {h: preds}
    a, b = score_predictions(test, h), score_predictions(test, h, SKIP)
    return {"precision": a["precision"], "recall": a["recall"], "f1": a["f1"],
            "recall_skip": b["recall"], "rows": a["rows"], "rows_skip": b["rows"]}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", default=str(MOE_BEYOND), help="the MoE-Beyond folder")
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--epochs", type=float, help="training epochs (default: LearnedConfig's)")
    ap.add_argument("--model", help="use this trained model instead of training one")
    ap.add_argument("--save-model", help="save the trained model here")
    ap.add_argument("--train-limit", type=int, help="train on the first N Puffin prompts only")
    ap.add_argument("--no-baselines", action="store_true", help="skip the simple baselines")
    ap.add_argument("--per-layer", action="store_true", help="also recall per layer (h=1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    data = Path(args.data)
    t0 = time.perf_counter()
    train = read_trace(imported(data / "puffin-train", args.train_limit), load_text=True)
    test = read_trace(imported(data / "webglm-test"), load_text=True)
    mb = read_trace(imported(data / "webglm-test-predicted"))
    log(f"read the traces in {time.perf_counter() - t0:.1f} s: train {train.num_rows:,} rows, "
        f"test {test.num_rows:,} rows")  # fmt: skip
    nl, E = train.meta.num_layers, max(train.meta.experts_per_layer)
    res: dict[str, dict[int, dict]] = {}
    info: dict = {"machine": machine(), "git": git_head()}

    # the learned predictor
    if args.model:
        model = LearnedPredictor.load(args.model)
        info["train_s"] = model.info.get("train_s")
    else:
        cfg = LearnedConfig(horizons=list(args.horizons))
        if args.epochs:
            cfg.epochs = args.epochs
        t = time.perf_counter()
        model = LearnedPredictor.train(train, cfg, log=log)
        info["train_s"] = round(time.perf_counter() - t, 1)
        log(f"trained in {info['train_s']} s")
        if args.save_model:
            model.save(args.save_model)
    info["config"] = model.header()["config"]
    t = time.perf_counter()
    preds = model.predict_many(test, args.horizons, K)
    info["predict_s"] = round(time.perf_counter() - t, 2)
    res["moesim learned"] = {h: score(test, preds[h], h) for h in args.horizons}
    h0 = args.horizons[0]
    test.preds = {h0: preds[h0]}
    per_layer = {"moesim learned": score_predictions(test, h0)["per_layer"]["recall"]}
    # each horizon's own network alone (no mixing in the longer horizons'), for comparison
    own = model.predict_many(test, args.horizons, K, 0.0)
    res["moesim learned, own horizon only"] = {h: score(test, own[h], h) for h in args.horizons}

    # MoE-Beyond's own predictions: horizon-free, the same score at every horizon
    mbs = score(mb, mb.preds[1], 1)
    res["MoE-Beyond (published)"] = {h: mbs for h in args.horizons}
    per_layer["MoE-Beyond (published)"] = score_predictions(mb, 1)["per_layer"]["recall"]

    if not args.no_baselines:
        b = Baselines(train, nl, E)
        t = time.perf_counter()
        pop, prev, tokid = b.popularity(test), b.prev_token(test), b.token_identity(test)
        res["per-layer popularity"] = {h: score(test, pop, h) for h in args.horizons}
        res["previous token, same layer"] = {h: score(test, prev, h) for h in args.horizons}
        res["token identity"] = {h: score(test, tokid, h) for h in args.horizons}
        res["co-occurrence, layer l-h"] = {
            h: score(test, b.cooccurrence(test, h), h) for h in args.horizons
        }
        res["ridge, layers l-h..l-h-3 + 2 prev"] = {
            h: score(test, b.ridge(test, h), h) for h in args.horizons
        }
        info["baselines_s"] = round(time.perf_counter() - t, 1)
    info["peak_rss_mib"] = round(peak_rss_mib())

    if args.json:
        info["per_layer_recall"] = {k: v.tolist() for k, v in per_layer.items()}
        print(json.dumps({"results": res, **info}, default=float))
        return 0
    hs = args.horizons
    head = "| predictor | " + " | ".join(f"h={h}" for h in hs) + " | " + " | ".join(
        f"h={h}, skip {SKIP}" for h in hs
    ) + " |"  # fmt: skip
    print(f"Top-{K} recall (= precision = F1) on the {test.num_sequences} WebGLM test prompts "
          f"({test.num_rows:,} rows; {res['moesim learned'][hs[0]]['rows_skip']:,} rows without "
          f"each prompt's first {SKIP} tokens); trained on {train.num_sequences:,} Puffin "
          "prompts.\n")  # fmt: skip
    print(head)
    print("|" + " --- |" * (1 + 2 * len(hs)))
    for name, per_h in res.items():
        cells = [f"{100 * per_h[h]['recall']:.1f}%" for h in hs]
        cells += [f"{100 * per_h[h]['recall_skip']:.1f}%" for h in hs]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.per_layer:
        print(f"\nRecall per MoE layer at h={h0} (layers 1..{nl} of the model):\n")
        print("| predictor | " + " | ".join(str(i + 1) for i in range(nl)) + " |")
        print("|" + " --- |" * (1 + nl))
        for name, rec in per_layer.items():
            print(f"| {name} | " + " | ".join(f"{100 * x:.0f}" for x in rec) + " |")
    print()
    print(f"training: {info['train_s']} s on {machine()}; prediction of the test set at "
          f"{len(hs)} horizons: {info['predict_s']} s; peak memory {info['peak_rss_mib']} MiB; "
          f"{git_head()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
