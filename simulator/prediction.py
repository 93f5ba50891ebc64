"""How good are a trace's predicted experts? Precision, recall and F1 of a ``pred_h{H}`` column.

For every scored row, the predicted experts (the ``pred_h{H}`` list of the row's token and
layer) are compared with the experts the row actually routed to, as sets. Figures are
micro-averaged over rows::

    precision = sum |pred & actual| / sum |pred|
    recall    = sum |pred & actual| / sum |actual|
    f1        = 2 precision recall / (precision + recall)

A row without a prediction (an empty list) adds nothing to ``|pred|`` but its actual experts
still count in ``|actual|``: recall is over all scored rows. With top-k predictions and top-k
routing, precision equals recall. ``skip_first=N`` leaves out each sequence's first N tokens
(MoE-Beyond's protocol treats them as warm-up). Per-layer arrays hold the same figures for each
MoE layer (NaN where a layer has nothing to divide by).

Works for any predictor's column: MoE-Beyond's published predictions (imported as ``pred_h1``),
a gate lookahead captured on GPU, or ``moesim predict``'s learned predictor.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import traces._jit  # noqa: F401  (numba cache folder; must run before any kernel is defined)
from traces.errors import ConfigError, TraceError
from traces.format import pred_column
from traces.trace import Trace


@njit(cache=True, nogil=True)
def _score_kernel(layer, offsets, experts, poffsets, pids, keep, num_layers, max_experts):
    """Per layer: rows scored, |pred & actual|, |pred|, |actual|, rows with a prediction."""
    out = np.zeros((num_layers, 5), np.int64)
    mark = np.zeros(max_experts, np.bool_)
    for r in range(layer.shape[0]):
        if not keep[r]:
            continue
        lay = layer[r]
        for i in range(offsets[r], offsets[r + 1]):
            mark[experts[i]] = True
        hit = 0
        for i in range(poffsets[r], poffsets[r + 1]):
            e = pids[i]
            if mark[e]:
                hit += 1
                mark[e] = False  # a prediction listing an expert twice counts it once
        for i in range(offsets[r], offsets[r + 1]):
            mark[experts[i]] = False
        npred = poffsets[r + 1] - poffsets[r]
        out[lay, 0] += 1
        out[lay, 1] += hit
        out[lay, 2] += npred
        out[lay, 3] += offsets[r + 1] - offsets[r]
        if npred > 0:
            out[lay, 4] += 1
    return out


def token_rank(trace: Trace) -> np.ndarray:
    """Each row's token index within its sequence: 0 for the sequence's first token (by pos)."""
    n = trace.num_rows
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((trace.pos, trace.seq))
    s, p = trace.seq[order], trace.pos[order]
    new_tok = np.ones(n, np.bool_)
    new_tok[1:] = (s[1:] != s[:-1]) | (p[1:] != p[:-1])
    tok = np.cumsum(new_tok) - 1  # token number, tokens numbered in (seq, pos) order
    new_seq = np.ones(n, np.bool_)
    new_seq[1:] = s[1:] != s[:-1]
    first_tok = np.maximum.accumulate(np.where(new_seq, tok, 0))
    rank = np.empty(n, np.int64)
    rank[order] = tok - first_tok
    return rank


def _ratio(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _f1(p, r):
    p = np.asarray(p, np.float64)
    r = np.asarray(r, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = p + r
        return np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1), np.where(np.isnan(s), np.nan, 0))


def score_predictions(trace: Trace, horizon: int, skip_first: int = 0) -> dict:
    """Precision, recall and F1 of the trace's ``pred_h{horizon}`` against its actual experts.

    Returns a dict: ``horizon``, ``skip_first``, ``rows`` (rows scored), ``rows_predicted``
    (of those, rows with a non-empty prediction), ``hits`` (sum of |pred & actual|),
    ``predicted`` and ``actual`` (the sums of list lengths), ``precision``, ``recall``, ``f1``
    (micro-averaged; NaN when nothing to divide by) and ``per_layer``: a dict of arrays
    (``rows``, ``precision``, ``recall``, ``f1``), one entry per MoE layer.
    Raises TraceError when the trace has no ``pred_h{horizon}`` column.
    """
    horizon = int(horizon)
    if horizon not in trace.preds:
        have = sorted(trace.preds)
        raise TraceError(
            f"{trace.path}: no column '{pred_column(horizon)}' to score (prediction horizons "
            f"present: {have or 'none'}; `moesim predict` adds them)"
        )
    if skip_first < 0:
        raise ConfigError(f"skip_first: expected an integer >= 0, got {skip_first}")
    poff, pids = trace.preds[horizon]
    keep = token_rank(trace) >= skip_first if skip_first else np.ones(trace.num_rows, np.bool_)
    nl = int(trace.meta.num_layers)
    emax = int(max(trace.meta.experts_per_layer))
    c = _score_kernel(
        np.ascontiguousarray(trace.layer),
        np.ascontiguousarray(trace.offsets),
        np.ascontiguousarray(trace.experts),
        np.ascontiguousarray(poff, dtype=np.int64),
        np.ascontiguousarray(pids, dtype=np.int16),
        np.ascontiguousarray(keep),
        nl,
        emax,
    )
    tot = c.sum(axis=0)
    precision = float(_ratio(tot[1], tot[2]))
    recall = float(_ratio(tot[1], tot[3]))
    lp = _ratio(c[:, 1], c[:, 2])
    lr = _ratio(c[:, 1], c[:, 3])
    return {
        "horizon": horizon,
        "skip_first": int(skip_first),
        "rows": int(tot[0]),
        "rows_predicted": int(tot[4]),
        "hits": int(tot[1]),
        "predicted": int(tot[2]),
        "actual": int(tot[3]),
        "precision": precision,
        "recall": recall,
        "f1": float(_f1(precision, recall)),
        "per_layer": {
            "rows": c[:, 0].copy(),
            "precision": lp,
            "recall": lr,
            "f1": _f1(lp, lr),
        },
    }


def score_table(scores: list[dict], label: str = "predictions") -> str:
    """A small text table of ``score_predictions`` results, one line per result."""
    lines = [f"{'source':<24} {'h':>2} {'skip':>4} {'rows':>9} {'prec':>7} {'recall':>7} {'F1':>7}"]
    for s in scores:
        lines.append(
            f"{s.get('label', label):<24} {s['horizon']:>2} {s['skip_first']:>4} {s['rows']:>9,} "
            f"{100 * s['precision']:>6.1f}% {100 * s['recall']:>6.1f}% {100 * s['f1']:>6.1f}%"
        )
    return "\n".join(lines)


def scores_json(score: dict) -> dict:
    """``score`` with its per-layer arrays as lists (NaN as None), ready for json.dumps."""

    def clean(a):
        return [None if (isinstance(x, float) and np.isnan(x)) else x for x in a.tolist()]

    out = {k: v for k, v in score.items() if k != "per_layer"}
    for k in ("precision", "recall", "f1"):
        if isinstance(out.get(k), float) and np.isnan(out[k]):
            out[k] = None
    out["per_layer"] = {k: clean(v) for k, v in score["per_layer"].items()}
    return out
