"""Statistics of expert activation in a trace: what the MoE-offloading literature measures.

Every statistic is defined in ``docs/stats.md``; this module computes them with numba kernels
over the trace's flat arrays (no Python loop per row or per access), so a 30 M-activation trace
takes seconds. The pieces:

- :func:`popularity_counts`, :func:`popularity_metrics`, :func:`js_divergence`: per-layer expert
  popularity, its normalised entropy, the share of the hottest experts, Gini, prefill/decode JSD.
- :func:`reuse_stats`: over the replay order of :func:`simulator.accesses.build_accesses`, the
  per-layer LRU stack distance, the distance in steps, and the stack distance over all layers
  (the LRU hit-ratio curve of one shared cache).
- :func:`overlap_stats`: overlap of consecutive tokens' expert sets, next to chance.
- :func:`coactivation_stats`: how well layer l's experts predict layer l+1's (conditional
  co-occurrence predictor's top-k recall, in-sample and 2-fold cross-fitted; mutual information).
- :func:`compute_stats` runs them all and returns a :class:`TraceStats` (table, dict for JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from simulator.accesses import Accesses, build_accesses
from traces.errors import TraceError
from traces.format import PHASE_NAMES
from traces.trace import Trace

#: Phases of trace rows (index 0 and 1 of the per-phase arrays).
PHASES = ("prefill", "decode")
#: Kinds of replay groups for the reuse statistics: by the phases of the tokens in the group.
GROUP_KINDS = ("prefill", "decode", "mixed")
#: Step-distance histogram: exact below 64, then 16 log-spaced bins per octave (< 6.25% wide).
STEP_EXACT = 64
STEP_SUB = 16
STEP_BINS = STEP_EXACT + STEP_SUB * 56  # up to 2**62 steps
#: Percentiles reported for distances.
PERCENTILES = (50, 90, 99)
#: Shared-cache sizes (fraction of all routed experts) for the LRU hit ratios in the summary.
CACHE_FRACTIONS = (0.10, 0.25, 0.50, 0.75, 0.90)
#: Share of hottest experts reported besides the top-k.
HOT_FRACTION = 0.10


# =========================================================================== kernels
@njit(cache=True)
def _popularity(layer, phase, offsets, experts, n_layers, max_e):
    """counts[phase, layer, expert] of routed activations; rows[phase, layer] tokens."""
    counts = np.zeros((2, n_layers, max_e), np.int64)
    rows = np.zeros((2, n_layers), np.int64)
    for i in range(layer.shape[0]):
        ph = 1 if phase[i] == 1 else 0
        lay = layer[i]
        rows[ph, lay] += 1
        for j in range(offsets[i], offsets[i + 1]):
            counts[ph, lay, experts[j]] += 1
    return counts, rows


@njit(cache=True)
def step_bin(d):
    """Histogram bin of a step distance ``d >= 0`` (see STEP_EXACT, STEP_SUB)."""
    if d < STEP_EXACT:
        return d
    e = 0
    v = d
    while v > 1:
        v >>= 1
        e += 1
    sub = (d >> (e - 4)) & (STEP_SUB - 1)
    return STEP_EXACT + (e - 6) * STEP_SUB + sub


def step_bin_edges() -> np.ndarray:
    """int64[STEP_BINS + 1]: lower edge of each step-distance bin (last = upper end)."""
    edges = np.empty(STEP_BINS + 1, np.int64)
    edges[:STEP_EXACT] = np.arange(STEP_EXACT)
    idx = np.arange(STEP_BINS - STEP_EXACT + 1)
    e = 6 + idx // STEP_SUB
    sub = idx % STEP_SUB
    edges[STEP_EXACT:] = (STEP_SUB + sub) << (e - 4)
    return edges


@njit(cache=True)
def _fw_add(tree, base, n, i, v):
    i += 1
    while i <= n:
        tree[base + i] += v
        i += i & (-i)


@njit(cache=True)
def _fw_prefix(tree, base, i):
    """Sum of entries 0..i (inclusive) of the Fenwick tree at ``base``."""
    i += 1
    s = 0
    while i > 0:
        s += tree[base + i]
        i -= i & (-i)
    return s


@njit(cache=True)
def _compact(tree, base, width, last, lo, hi, buf):
    """Renumber the live marks of objects lo..hi-1 to 0..m-1 in the order of their ``last``
    positions and rebuild the Fenwick tree at ``base`` (all ones there); return m."""
    m = 0
    for o in range(lo, hi):
        if last[o] >= 0:
            buf[m] = o
            m += 1
    keys = np.empty(m, np.int64)
    for i in range(m):
        keys[i] = last[buf[i]]
    order = np.argsort(keys)
    for r in range(m):
        last[buf[order[r]]] = r
    for i in range(1, width + 1):
        tree[base + i] = 0
    for i in range(m):
        _fw_add(tree, base, width, i, 1)
    return m


@njit(cache=True)
def _reuse(obj, obj_layer, layer_base, group_offsets, group_rank, group_kind, n_layers, max_e,
           n_bins, keep):  # fmt: skip
    """One pass over the replay order: stack distances (per layer, global) and step distances.

    Each object has one mark in a Fenwick tree at the time of its last access; the stack distance
    is the number of marks after the previous access's. Times live in a window of 4x the object
    count (per layer, and over all layers) and are renumbered when the window fills, so the trees
    stay small and in cache. A cold access (first of its object) gets -1 in the per-access arrays.
    """
    n_acc = obj.shape[0]
    n_groups = group_rank.shape[0]
    n_obj = layer_base[n_layers]
    # per-layer trees: segment of width 4 E_l (+1: Fenwick arrays are 1-based)
    width_l = np.empty(n_layers, np.int64)
    seg = np.zeros(n_layers + 1, np.int64)
    for lay in range(n_layers):
        width_l[lay] = 4 * (layer_base[lay + 1] - layer_base[lay]) + 4
        seg[lay + 1] = seg[lay] + width_l[lay] + 1
    tree_l = np.zeros(seg[n_layers], np.int32)
    width_g = 4 * n_obj + 4
    tree_g = np.zeros(width_g + 1, np.int32)
    clock_l = np.zeros(n_layers, np.int64)
    clock_g = 0
    seen_l = np.zeros(n_layers, np.int64)
    seen_g = 0
    last_g = np.full(n_obj, -1, np.int64)
    last_l = np.full(n_obj, -1, np.int64)
    last_r = np.zeros(n_obj, np.int64)
    buf = np.empty(n_obj, np.int64)

    acc_layer = np.zeros(n_layers, np.int64)
    sd_l_hist = np.zeros((n_layers, max_e), np.int64)
    step_hist = np.zeros((n_layers, n_bins), np.int64)
    cold = np.zeros(n_layers, np.int64)
    sd_l_kind = np.zeros((3, max_e), np.int64)
    step_kind = np.zeros((3, n_bins), np.int64)
    sd_g_kind = np.zeros((3, max(n_obj, 1)), np.int64)
    cold_kind = np.zeros(3, np.int64)
    acc_kind = np.zeros(3, np.int64)
    m = n_acc if keep else 0
    out_l = np.empty(m, np.int64)
    out_g = np.empty(m, np.int64)
    out_s = np.empty(m, np.int64)

    for g in range(n_groups):
        r = group_rank[g]
        kind = group_kind[g]
        for a in range(group_offsets[g], group_offsets[g + 1]):
            o = obj[a]
            lay = obj_layer[o]
            base = seg[lay]
            wl = width_l[lay]
            if clock_l[lay] == wl:
                clock_l[lay] = _compact(tree_l, base, wl, last_l, layer_base[lay],
                                        layer_base[lay + 1], buf)  # fmt: skip
            if clock_g == width_g:
                clock_g = _compact(tree_g, 0, width_g, last_g, 0, n_obj, buf)
            acc_layer[lay] += 1
            acc_kind[kind] += 1
            pg = last_g[o]
            if pg < 0:
                cold[lay] += 1
                cold_kind[kind] += 1
                seen_l[lay] += 1
                seen_g += 1
                dl = -1
                dg = -1
                ds = -1
            else:
                pl = last_l[o]
                dl = seen_l[lay] - _fw_prefix(tree_l, base, pl)
                dg = seen_g - _fw_prefix(tree_g, 0, pg)
                ds = r - last_r[o]
                _fw_add(tree_l, base, wl, pl, -1)
                _fw_add(tree_g, 0, width_g, pg, -1)
                b = step_bin(ds)
                sd_l_hist[lay, dl] += 1
                step_hist[lay, b] += 1
                sd_l_kind[kind, dl] += 1
                step_kind[kind, b] += 1
                sd_g_kind[kind, dg] += 1
            here = clock_l[lay]
            clock_l[lay] += 1
            _fw_add(tree_l, base, wl, here, 1)
            _fw_add(tree_g, 0, width_g, clock_g, 1)
            last_l[o] = here
            last_g[o] = clock_g
            clock_g += 1
            last_r[o] = r
            if keep:
                out_l[a] = dl
                out_g[a] = dg
                out_s[a] = ds
    return (sd_l_hist, step_hist, cold, acc_layer, sd_l_kind, step_kind, sd_g_kind, cold_kind,
            acc_kind, out_l, out_g, out_s)  # fmt: skip


@njit(cache=True)
def _overlap(key, n_keys, pos, phase, layer, offsets, experts, epl, n_layers, max_k):
    """Consecutive-token overlap: per (phase of the later token, layer) sums over pairs."""
    last = np.full(n_keys, -1, np.int64)
    stamp = np.full(int(epl.max()), -1, np.int64)
    pairs = np.zeros((2, n_layers), np.int64)
    ov = np.zeros((2, n_layers), np.float64)
    chance = np.zeros((2, n_layers), np.float64)
    inter_hist = np.zeros((2, max_k + 1), np.int64)
    for i in range(key.shape[0]):
        k = key[i]
        j = last[k]
        last[k] = i
        if j < 0 or pos[i] != pos[j] + 1:
            continue
        nb = offsets[i + 1] - offsets[i]
        if nb == 0:
            continue
        for q in range(offsets[j], offsets[j + 1]):
            stamp[experts[q]] = i
        inter = 0
        for q in range(offsets[i], offsets[i + 1]):
            if stamp[experts[q]] == i:
                inter += 1
        ph = 1 if phase[i] == 1 else 0
        lay = layer[i]
        pairs[ph, lay] += 1
        ov[ph, lay] += inter / nb
        chance[ph, lay] += (offsets[j + 1] - offsets[j]) / epl[lay]
        inter_hist[ph, inter] += 1
    return pairs, ov, chance, inter_hist


@njit(cache=True)
def _layer_pairs(tok, n_tok, layer):
    """Rows (a, b) of the same token in layers l and l+1 (a token's rows come in layer order)."""
    n = tok.shape[0]
    last_row = np.full(n_tok, -1, np.int64)
    pa = np.empty(n, np.int64)
    pb = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        t = tok[i]
        j = last_row[t]
        if j >= 0 and layer[j] + 1 == layer[i]:
            pa[m] = j
            pb[m] = i
            m += 1
        last_row[t] = i
    n_tokens = 0
    for t in range(n_tok):
        if last_row[t] >= 0:
            n_tokens += 1
    return pa[:m].copy(), pb[:m].copy(), n_tokens


@njit(cache=True)
def _coact_counts(pa, pb, layer, offsets, experts, fold, n_pairs_layers, max_e):
    """C[fold, l, a, b]: tokens with a at layer l and b at l+1; na/nb: per-expert token counts."""
    C = np.zeros((2, n_pairs_layers, max_e, max_e), np.int32)
    na = np.zeros((2, n_pairs_layers, max_e), np.int64)
    nb = np.zeros((2, n_pairs_layers, max_e), np.int64)
    for p in range(pa.shape[0]):
        j = pa[p]
        i = pb[p]
        lay = layer[j]
        f = fold[i]
        for q in range(offsets[j], offsets[j + 1]):
            a = experts[q]
            na[f, lay, a] += 1
            for r in range(offsets[i], offsets[i + 1]):
                C[f, lay, a, experts[r]] += 1
        for r in range(offsets[i], offsets[i + 1]):
            nb[f, lay, experts[r]] += 1
    return C, na, nb


@njit(cache=True)
def _coact_recall(pa, pb, layer, phase, offsets, experts, fold, C, na, pop_rank, cv_ok, epl,
                  max_e):  # fmt: skip
    """Top-|B| recall of three predictors of layer l+1's experts B from layer l's experts A.

    Scores: s(b) = sum over a in A (rank order) of C[a, b] * (1 / n_a) -- the sum of P(b | a) --
    with C and n from both folds (in-sample) or from the other fold (cross-fitted); ties go to
    the lower expert id. The popularity predictor ranks by how often b is used at l+1.
    """
    n_l1 = C.shape[1]
    rec = np.zeros((3, 2, n_l1), np.float64)  # [in-sample, cross-fitted, popularity]
    pairs = np.zeros((2, n_l1), np.int64)
    cv_pairs = np.zeros((2, n_l1), np.int64)
    score = np.zeros(max_e, np.float64)
    score_cv = np.zeros(max_e, np.float64)
    for p in range(pa.shape[0]):
        j = pa[p]
        i = pb[p]
        lay = layer[j]
        nbk = offsets[i + 1] - offsets[i]
        if nbk == 0:
            continue
        f = fold[i]
        o = 1 - f
        eb = epl[lay + 1]
        for b in range(eb):
            score[b] = 0.0
            score_cv[b] = 0.0
        for q in range(offsets[j], offsets[j + 1]):
            a = experts[q]
            n_all = na[0, lay, a] + na[1, lay, a]
            if n_all > 0:
                inv = 1.0 / n_all
                for b in range(eb):
                    score[b] += (C[0, lay, a, b] + C[1, lay, a, b]) * inv
            n_o = na[o, lay, a]
            if n_o > 0:
                inv = 1.0 / n_o
                for b in range(eb):
                    score_cv[b] += C[o, lay, a, b] * inv
        h_in = 0
        h_cv = 0
        h_pop = 0
        for r in range(offsets[i], offsets[i + 1]):
            b = experts[r]
            sb = score[b]
            sc = score_cv[b]
            rank = 0
            rank_cv = 0
            for x in range(eb):
                if score[x] > sb or (score[x] == sb and x < b):
                    rank += 1
                if score_cv[x] > sc or (score_cv[x] == sc and x < b):
                    rank_cv += 1
            if rank < nbk:
                h_in += 1
            if rank_cv < nbk:
                h_cv += 1
            if pop_rank[lay, b] < nbk:
                h_pop += 1
        ph = 1 if phase[i] == 1 else 0
        pairs[ph, lay] += 1
        rec[0, ph, lay] += h_in / nbk
        rec[2, ph, lay] += h_pop / nbk
        if cv_ok[lay]:
            cv_pairs[ph, lay] += 1
            rec[1, ph, lay] += h_cv / nbk
    return rec, pairs, cv_pairs


# =========================================================================== helpers
def _div(a, b):
    """Elementwise a / b with NaN where b == 0 (no warnings)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _dense_pair(a: np.ndarray, na: int, b: np.ndarray, nb: int, n: int) -> tuple[np.ndarray, int]:
    """An index for the pairs (a, b), a in [0, na), b in [0, nb): a*nb+b where that table stays
    small (<= 2 n + 4 M entries), else the dense rank of the distinct pairs."""
    if na * nb <= 2 * n + (1 << 22):
        return a.astype(np.int64) * nb + b, int(na * nb)
    _, inv = np.unique(a.astype(np.int64) * nb + b, return_inverse=True)
    return inv.astype(np.int64).ravel(), int(inv.max()) + 1 if inv.size else 0


@dataclass
class _Keys:
    seq_idx: np.ndarray  # dense sequence index of each row
    n_seq: int
    tok: np.ndarray  # index of the row's token (seq, pos)
    n_tok: int
    seq_layer: np.ndarray  # index of the row's (seq, layer)
    n_seq_layer: int


def _keys(trace: Trace) -> _Keys:
    n = trace.num_rows
    uniq, seq_idx = np.unique(trace.seq, return_inverse=True)
    seq_idx = seq_idx.astype(np.int64).ravel()
    n_seq = int(uniq.shape[0])
    pos = trace.pos.astype(np.int64)
    tok, n_tok = _dense_pair(seq_idx, n_seq, pos, int(pos.max()) + 1 if n else 1, n)
    L = int(trace.meta.num_layers)
    sl, n_sl = _dense_pair(seq_idx, n_seq, trace.layer.astype(np.int64), L, n)
    return _Keys(seq_idx, n_seq, tok, n_tok, sl, n_sl)


def _epl(trace: Trace) -> np.ndarray:
    return np.asarray(trace.meta.experts_per_layer, dtype=np.int64)


def hist_percentile(hist: np.ndarray, q: float, values: np.ndarray | None = None) -> float:
    """Nearest-rank percentile of a histogram: the smallest value v with at least q% of the
    samples <= v (``values[b]`` is bin b's value, default b). NaN for an empty histogram."""
    hist = np.asarray(hist)
    total = int(hist.sum())
    if total == 0:
        return math.nan
    need = max(1, math.ceil(q / 100.0 * total))
    b = int(np.searchsorted(np.cumsum(hist), need))
    return float(b if values is None else values[b])


def _hist_percentiles(hists: np.ndarray, q: float, values=None) -> np.ndarray:
    return np.array([hist_percentile(h, q, values) for h in hists], dtype=np.float64)


# =========================================================================== popularity
def popularity_counts(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64[2, L, Emax], rows int64[2, L]): routed activations per phase, layer and
    expert, and tokens (rows) per phase and layer. Phase 0 = prefill, 1 = decode."""
    epl = _epl(trace)
    return _popularity(trace.layer, trace.phase, trace.offsets, trace.experts,
                       int(epl.shape[0]), int(epl.max()))  # fmt: skip


def effective_k(counts: np.ndarray, rows: np.ndarray, top_k: int | None) -> np.ndarray:
    """float64[L]: experts per token: top_k, or the layer's mean row length where it is dynamic."""
    if top_k is not None:
        return np.full(rows.shape[-1], float(top_k))
    return _div(counts.sum(axis=-1), rows)


def popularity_metrics(counts: np.ndarray, epl: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer popularity metrics of ``counts`` int[L, Emax] (experts >= epl[l] are ignored).

    Returns arrays of length L: ``activations``, ``entropy_bits``, ``entropy_norm``
    (entropy / log2 E), ``top10_share`` (hottest ceil(10% E) experts), ``topk_share`` (hottest
    round(k) experts), ``gini``, ``max_load`` (hottest expert's share x E; 1 = uniform),
    ``unused`` (experts never used), plus ``share`` float64[L, Emax].
    """
    counts = np.asarray(counts, dtype=np.int64)
    L, max_e = counts.shape
    epl = np.asarray(epl, dtype=np.int64)
    valid = np.arange(max_e)[None, :] < epl[:, None]
    c = np.where(valid, counts, 0)
    total = c.sum(axis=1)
    share = _div(c, total[:, None])
    share = np.where(valid, share, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(share > 0, share * np.log2(np.where(share > 0, share, 1.0)), 0.0)
    entropy = np.where(total > 0, -plogp.sum(axis=1), np.nan)
    entropy = np.maximum(entropy, 0.0)
    log_e = np.log2(epl.astype(np.float64))
    entropy_norm = np.where(epl > 1, _div(entropy, log_e), np.where(total > 0, 1.0, np.nan))
    # hottest-first: invalid experts sort last (-1)
    desc = -np.sort(-np.where(valid, c, -1), axis=1)
    cum = np.cumsum(np.where(desc > 0, desc, 0), axis=1)
    n_hot = np.maximum(1, np.ceil(HOT_FRACTION * epl - 1e-9).astype(np.int64))
    kk = np.clip(np.rint(np.nan_to_num(k, nan=1.0)).astype(np.int64), 1, epl)
    rows = np.arange(L)
    top10 = _div(cum[rows, n_hot - 1], total)
    topk = _div(cum[rows, kk - 1], total)
    # Gini over the layer's E experts: ascending x_(1..E): 2 sum(i x_(i)) / (E sum x) - (E+1)/E
    asc = np.sort(np.where(valid, c, np.iinfo(np.int64).max), axis=1)
    asc = np.where(asc == np.iinfo(np.int64).max, 0, asc)
    # valid entries are the first E of each ascending row; weights i = 1..E
    i = np.arange(1, max_e + 1)[None, :]
    wsum = np.where(i <= epl[:, None], i * asc, 0).sum(axis=1)
    gini = _div(2.0 * wsum, epl * total) - (epl + 1.0) / epl
    gini = np.where(total > 0, gini, np.nan)
    max_load = _div(np.where(valid, c, 0).max(axis=1) * epl, total)
    unused = np.where(valid & (c == 0), 1, 0).sum(axis=1)
    return {
        "activations": total,
        "entropy_bits": entropy,
        "entropy_norm": entropy_norm,
        "top10_share": top10,
        "topk_share": topk,
        "gini": gini,
        "max_load": max_load,
        "unused": unused,
        "share": share,
    }


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (bits, 0..1) between the rows of two count matrices [L, E];
    NaN for a layer where either row is empty."""
    p = _div(p_counts, np.asarray(p_counts).sum(axis=-1, keepdims=True))
    q = _div(q_counts, np.asarray(q_counts).sum(axis=-1, keepdims=True))
    m = 0.5 * (p + q)

    def kl(x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 0, x * np.log2(np.where(x > 0, x, 1.0) / np.where(y > 0, y, 1.0)), 0.0)
        return t.sum(axis=-1)

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    bad = np.isnan(p).any(axis=-1) | np.isnan(q).any(axis=-1)
    return np.where(bad, np.nan, np.clip(js, 0.0, 1.0))


# =========================================================================== reuse
@dataclass
class ReuseStats:
    """Reuse of experts in the replay order (accesses of ``build_accesses``).

    Attributes:
        stack_hist int64[L, Emax]: per-layer LRU stack distance histogram (warm accesses).
        step_hist int64[L, STEP_BINS]: steps since the same expert's last use (binned).
        cold int64[L], accesses int64[L]: first-time accesses and all accesses per layer.
        stack_kind int64[3, Emax], step_kind int64[3, STEP_BINS], global_kind int64[3, O],
        cold_kind int64[3], accesses_kind int64[3]: the same over all layers, split by the group
            kind (prefill-only, decode-only, mixed); ``global_kind`` is the stack distance over
            all layers' experts (one shared LRU).
        per_access: (stack, global, step) int64[A] each, -1 for a cold access (only when asked).
    """

    stack_hist: np.ndarray
    step_hist: np.ndarray
    cold: np.ndarray
    accesses: np.ndarray
    stack_kind: np.ndarray
    step_kind: np.ndarray
    global_kind: np.ndarray
    cold_kind: np.ndarray
    accesses_kind: np.ndarray
    num_objects: int
    per_access: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def global_hist(self) -> np.ndarray:
        return self.global_kind.sum(axis=0)

    def lru_hit_ratio(self, capacity: int) -> float:
        """Hit ratio of one LRU cache of ``capacity`` experts shared by all layers (accesses in
        replay order, one at a time): the share of all accesses with global stack distance
        < capacity. Cold accesses always miss."""
        total = int(self.accesses_kind.sum())
        if total == 0:
            return math.nan
        return float(self.global_hist[: max(0, int(capacity))].sum()) / total

    def layer_lru_hit_ratio(self, slots: int) -> np.ndarray:
        """float64[L]: hit ratio of a per-layer LRU with ``slots`` experts per layer."""
        return _div(self.stack_hist[:, : max(0, int(slots))].sum(axis=1), self.accesses)


def reuse_stats(trace: Trace, acc: Accesses | None = None, *, keep: bool = False) -> ReuseStats:
    """Reuse distances over the replay order (see docs/stats.md, "Reuse")."""
    acc = build_accesses(trace) if acc is None else acc
    epl = _epl(trace)
    g_step = acc.group_step
    rank = np.zeros(g_step.shape[0], np.int64)
    if g_step.shape[0] > 1:
        np.cumsum(g_step[1:] != g_step[:-1], out=rank[1:])
    kind = np.where(acc.group_decode == 0, 0, np.where(acc.group_prefill == 0, 1, 2))
    res = _reuse(acc.obj, acc.obj_layer, acc.layer_base, acc.group_offsets, rank,
                 kind.astype(np.int64), int(epl.shape[0]), int(epl.max()), STEP_BINS,
                 keep)  # fmt: skip
    (sd_l, step_h, cold, acc_l, sd_l_k, step_k, sd_g_k, cold_k, acc_k, out_l, out_g, out_s) = res
    return ReuseStats(sd_l, step_h, cold, acc_l, sd_l_k, step_k, sd_g_k, cold_k, acc_k,
                      acc.num_objects, (out_l, out_g, out_s) if keep else None)  # fmt: skip


# =========================================================================== overlap
@dataclass
class OverlapStats:
    """Consecutive-token overlap, summed per (phase of the later token, layer).

    ``ratio_sum / pairs`` is the mean of |E_t ∩ E_t+1| / |E_t+1|; ``chance_sum / pairs`` the
    mean of |E_t| / E (uniform chance); ``inter_hist[phase, i]`` counts pairs sharing i experts.
    """

    pairs: np.ndarray
    ratio_sum: np.ndarray
    chance_sum: np.ndarray
    inter_hist: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """float64[L]: mean overlap over both phases."""
        return _div(self.ratio_sum.sum(axis=0), self.pairs.sum(axis=0))

    @property
    def chance(self) -> np.ndarray:
        return _div(self.chance_sum.sum(axis=0), self.pairs.sum(axis=0))


def overlap_stats(trace: Trace, keys: _Keys | None = None) -> OverlapStats:
    """Overlap of the expert sets of consecutive tokens (pos, pos+1) of a sequence, per layer."""
    keys = _keys(trace) if keys is None else keys
    epl = _epl(trace)
    lengths = np.diff(trace.offsets)
    max_k = int(lengths.max()) if lengths.size else 0
    pairs, ov, chance, ih = _overlap(keys.seq_layer, keys.n_seq_layer, trace.pos, trace.phase,
                                     trace.layer, trace.offsets, trace.experts, epl,
                                     int(epl.shape[0]), max_k)  # fmt: skip
    return OverlapStats(pairs, ov, chance, ih)


def popularity_chance_overlap(counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64[L]: expected overlap of two tokens drawn independently with the layer's own
    per-expert inclusion probabilities q_e = count_e / tokens: sum q_e^2 / mean k."""
    counts = np.asarray(counts, dtype=np.float64)
    q = _div(counts, np.asarray(rows)[:, None])
    mean_k = _div(counts.sum(axis=1), rows)
    return _div(np.nansum(q * q, axis=1), mean_k)


# =========================================================================== co-activation
@dataclass
class CoactStats:
    """Co-activation of consecutive layers l -> l+1 (arrays over the L-1 layer pairs).

    Attributes:
        counts int32[2, L-1, Emax, Emax]: per fold, tokens with expert a at l and b at l+1.
        na, nb int64[2, L-1, Emax]: per fold, tokens using a at l / b at l+1 (paired tokens).
        pairs int64[2, L-1]: token pairs per (phase, layer pair); cv_pairs: those cross-fitted.
        recall float64[3, 2, L-1]: summed recall of [in-sample, cross-fitted, popularity].
        mi_bits, h_next_bits float64[L-1]: mutual information of (a, b) and entropy of b.
        tokens: distinct (seq, pos) tokens in the trace.
    """

    counts: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    pairs: np.ndarray
    cv_pairs: np.ndarray
    recall_sum: np.ndarray
    mi_bits: np.ndarray
    h_next_bits: np.ndarray
    tokens: int = 0

    def recall(self, which: int, phase: int | None = None) -> np.ndarray:
        """Mean recall per layer pair: which = 0 in-sample, 1 cross-fitted, 2 popularity."""
        den = self.cv_pairs if which == 1 else self.pairs
        if phase is None:
            return _div(self.recall_sum[which].sum(axis=0), den.sum(axis=0))
        return _div(self.recall_sum[which, phase], den[phase])

    @property
    def nmi(self) -> np.ndarray:
        return _div(self.mi_bits, self.h_next_bits)

    def conditional(self, pair: int) -> np.ndarray:
        """float64[Emax, Emax]: P(b at l+1 | a at l) for layer pair ``pair`` (NaN rows unused)."""
        c = self.counts[:, pair].sum(axis=0).astype(np.float64)
        return _div(c, self.na[:, pair].sum(axis=0)[:, None])


def mutual_information(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MI bits, H(Y) bits) of joint count tables [..., A, B] (plug-in estimates)."""
    joint = np.asarray(joint, dtype=np.float64)
    tot = joint.sum(axis=(-2, -1), keepdims=True)
    p = _div(joint, tot)
    px = p.sum(axis=-1, keepdims=True)
    py = p.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, p / (px * py), 1.0)
        mi = np.where(p > 0, p * np.log2(ratio), 0.0).sum(axis=(-2, -1))
        hy = -np.where(py > 0, py * np.log2(np.where(py > 0, py, 1.0)), 0.0).sum(axis=(-2, -1))
    empty = tot[..., 0, 0] == 0
    return np.where(empty, np.nan, np.maximum(mi, 0.0)), np.where(empty, np.nan, hy)


def coactivation_stats(trace: Trace, keys: _Keys | None = None) -> CoactStats:
    """Cross-layer co-activation and the recall of layer-to-layer predictors (docs/stats.md)."""
    keys = _keys(trace) if keys is None else keys
    epl = _epl(trace)
    L = int(epl.shape[0])
    max_e = int(epl.max())
    n_l1 = max(L - 1, 0)
    pa, pb, n_tokens = _layer_pairs(keys.tok, keys.n_tok, trace.layer)
    # folds: sequences alternate between the two folds (cross-fitting needs >= 2 sequences)
    fold = (keys.seq_idx % 2).astype(np.int64)
    C, na, nb = _coact_counts(pa, pb, trace.layer, trace.offsets, trace.experts, fold, n_l1,
                              max_e)  # fmt: skip
    marg = nb.sum(axis=0)
    pop_rank = np.empty((n_l1, max_e), np.int64)
    order = np.argsort(-marg, axis=1, kind="stable")
    np.put_along_axis(pop_rank, order, np.arange(max_e)[None, :].repeat(n_l1, 0), axis=1)
    fold_pairs = na.sum(axis=2)  # [2, L-1], > 0 where the fold has paired tokens
    cv_ok = (fold_pairs[0] > 0) & (fold_pairs[1] > 0)
    rec, pairs, cv_pairs = _coact_recall(pa, pb, trace.layer, trace.phase, trace.offsets,
                                         trace.experts, fold, C, na, pop_rank, cv_ok, epl,
                                         max(max_e, 1))  # fmt: skip
    mi, hy = mutual_information(C.sum(axis=0, dtype=np.int64))
    return CoactStats(C, na, nb, pairs, cv_pairs, rec, mi, hy, n_tokens)


# =========================================================================== all together
@dataclass
class TraceStats:
    """Every statistic of one trace; :meth:`layer_table`, :meth:`summary`, :meth:`to_dict`."""

    info: dict
    experts_per_layer: np.ndarray
    layer_ids: list[int]
    top_k: int | None
    counts: np.ndarray  # int64[2, L, Emax]
    rows: np.ndarray  # int64[2, L]
    k: np.ndarray  # float64[L]
    popularity: dict[str, np.ndarray]
    popularity_phase: list[dict[str, np.ndarray]]
    js: np.ndarray  # float64[L]
    reuse: ReuseStats
    overlap: OverlapStats
    overlap_chance_pop: np.ndarray
    coact: CoactStats

    @property
    def num_layers(self) -> int:
        return int(self.experts_per_layer.shape[0])

    def phases_present(self) -> list[int]:
        return [p for p in (0, 1) if self.rows[p].sum() > 0]

    # ------------------------------------------------------------------ per layer
    def layer_table(self) -> pd.DataFrame:
        """One row per layer (columns described in docs/stats.md)."""
        pop = self.popularity
        r = self.reuse
        L = self.num_layers
        coact_next = np.full(L, np.nan)
        cv_next = np.full(L, np.nan)
        pop_next = np.full(L, np.nan)
        nmi_next = np.full(L, np.nan)
        if L > 1:
            coact_next[:-1] = self.coact.recall(0)
            cv_next[:-1] = self.coact.recall(1)
            pop_next[:-1] = self.coact.recall(2)
            nmi_next[:-1] = self.coact.nmi
        df = pd.DataFrame(
            {
                "layer": np.arange(L),
                "model_layer": self.layer_ids,
                "experts": self.experts_per_layer,
                "tokens": self.rows.sum(axis=0),
                "activations": pop["activations"],
                "entropy_norm": pop["entropy_norm"],
                "top10_share": pop["top10_share"],
                "topk_share": pop["topk_share"],
                "gini": pop["gini"],
                "max_load": pop["max_load"],
                "unused": pop["unused"],
                "stack_p50": _hist_percentiles(r.stack_hist, 50),
                "stack_p90": _hist_percentiles(r.stack_hist, 90),
                "step_p50": _hist_percentiles(r.step_hist, 50, step_bin_edges()),
                "step_p90": _hist_percentiles(r.step_hist, 90, step_bin_edges()),
                "cold_frac": _div(r.cold, r.accesses),
                "overlap": self.overlap.mean,
                "overlap_chance": self.overlap.chance,
                "overlap_chance_pop": self.overlap_chance_pop,
                "recall_next": coact_next,
                "recall_next_cv": cv_next,
                "recall_next_pop": pop_next,
                "nmi_next": nmi_next,
                "js_prefill_decode": self.js,
            }
        )
        return df

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        """Trace-wide figures: means over layers (weighted as stated in docs/stats.md)."""
        pop = self.popularity
        r = self.reuse
        total_e = int(self.experts_per_layer.sum())
        edges = step_bin_edges()
        stack_all = r.stack_kind.sum(axis=0)
        step_all = r.step_kind.sum(axis=0)
        hot = pop["max_load"]
        hot_layer = int(np.nanargmax(hot)) if np.isfinite(hot).any() else -1
        out = {
            "popularity": {
                "entropy_norm_mean": _nanmean(pop["entropy_norm"]),
                "entropy_norm_min": _nanmin(pop["entropy_norm"]),
                "top10_share_mean": _nanmean(pop["top10_share"]),
                "top10_share_max": _nanmax(pop["top10_share"]),
                "topk_share_mean": _nanmean(pop["topk_share"]),
                "gini_mean": _nanmean(pop["gini"]),
                "unused_experts": int(pop["unused"].sum()),
                "hottest": None
                if hot_layer < 0
                else {
                    "layer": hot_layer,
                    "model_layer": int(self.layer_ids[hot_layer]),
                    "expert": int(np.nanargmax(pop["share"][hot_layer])),
                    "max_load": float(hot[hot_layer]),
                },
            },
            "reuse": {
                "accesses": int(r.accesses.sum()),
                "cold_frac": _ratio(r.cold.sum(), r.accesses.sum()),
                "stack_p50": hist_percentile(stack_all, 50),
                "stack_p90": hist_percentile(stack_all, 90),
                "step_p50": hist_percentile(step_all, 50, edges),
                "step_p90": hist_percentile(step_all, 90, edges),
                "global_stack_p50": hist_percentile(r.global_hist, 50),
                "global_stack_p90": hist_percentile(r.global_hist, 90),
                "lru_shared_hit_ratio": {
                    f"{int(round(f * 100))}%": r.lru_hit_ratio(int(round(f * total_e)))
                    for f in CACHE_FRACTIONS
                },
                "lru_per_layer_hit_ratio": {
                    f"{s}": _ratio(r.stack_hist[:, :s].sum(), r.accesses.sum())
                    for s in self._slot_choices()
                },
            },
            "overlap": {
                "pairs": int(self.overlap.pairs.sum()),
                "mean": _ratio(self.overlap.ratio_sum.sum(), self.overlap.pairs.sum()),
                "chance_uniform": _ratio(self.overlap.chance_sum.sum(), self.overlap.pairs.sum()),
                "chance_popularity": _wmean(self.overlap_chance_pop, self.overlap.pairs.sum(0)),
            },
            "coactivation": {
                "token_pairs": int(self.coact.pairs.sum()),
                "recall": _ratio(self.coact.recall_sum[0].sum(), self.coact.pairs.sum()),
                "recall_cv": _ratio(self.coact.recall_sum[1].sum(), self.coact.cv_pairs.sum()),
                "recall_popularity": _ratio(self.coact.recall_sum[2].sum(), self.coact.pairs.sum()),
                "chance": _wmean(self.k[1:] / self.experts_per_layer[1:], self.coact.pairs.sum(0))
                if self.num_layers > 1
                else None,
                "nmi_mean": _nanmean(self.coact.nmi),
                "mi_bits_mean": _nanmean(self.coact.mi_bits),
            },
            "phases": self._phase_summary(),
        }
        return out

    def _slot_choices(self) -> list[int]:
        e = int(self.experts_per_layer.min())
        k = int(round(float(np.nanmean(self.k)))) if np.isfinite(self.k).any() else 1
        return sorted({s for s in (k, 2 * k, e // 4, e // 2) if 0 < s <= e})

    def _phase_summary(self) -> dict:
        out: dict = {}
        r = self.reuse
        edges = step_bin_edges()
        for p in (0, 1):
            if self.rows[p].sum() == 0:
                continue
            pp = self.popularity_phase[p]
            cp = self.coact
            out[PHASES[p]] = {
                "rows": int(self.rows[p].sum()),
                "activations": int(self.counts[p].sum()),
                "entropy_norm_mean": _nanmean(pp["entropy_norm"]),
                "top10_share_mean": _nanmean(pp["top10_share"]),
                "overlap": _ratio(self.overlap.ratio_sum[p].sum(), self.overlap.pairs[p].sum()),
                "overlap_pairs": int(self.overlap.pairs[p].sum()),
                "recall_next": _ratio(cp.recall_sum[0, p].sum(), cp.pairs[p].sum()),
                "recall_next_cv": _ratio(cp.recall_sum[1, p].sum(), cp.cv_pairs[p].sum()),
            }
        for kind in range(3):
            if r.accesses_kind[kind] == 0:
                continue
            name = "reuse_" + GROUP_KINDS[kind] + "_groups"
            out[name] = {
                "accesses": int(r.accesses_kind[kind]),
                "cold_frac": _ratio(r.cold_kind[kind], r.accesses_kind[kind]),
                "stack_p50": hist_percentile(r.stack_kind[kind], 50),
                "stack_p90": hist_percentile(r.stack_kind[kind], 90),
                "step_p50": hist_percentile(r.step_kind[kind], 50, edges),
                "step_p90": hist_percentile(r.step_kind[kind], 90, edges),
            }
        if len(self.phases_present()) == 2:
            out["js_prefill_decode_mean"] = _nanmean(self.js)
            out["js_prefill_decode_max"] = _nanmax(self.js)
        return out

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        """Everything as plain JSON-able Python (NaN -> None)."""
        table = self.layer_table()
        layers = [{k: _py(v) for k, v in rec.items()} for rec in table.to_dict(orient="records")]
        E = self.experts_per_layer
        r = self.reuse
        edges = step_bin_edges()
        used_bins = (
            int(np.flatnonzero(r.step_hist.sum(axis=0)).max()) + 1 if r.step_hist.any() else 0
        )
        d = {
            "trace": _py(self.info),
            "summary": _py(self.summary()),
            "layers": layers,
            "popularity_counts": [
                [int(x) for x in self.counts[:, lay, : E[lay]].sum(axis=0)]
                for lay in range(self.num_layers)
            ],
            "reuse_histograms": {
                "stack_distance": {
                    "bins": "distance 0..E-1 (distinct other experts of the layer in between)",
                    "per_layer": [
                        [int(x) for x in r.stack_hist[lay, : E[lay]]]
                        for lay in range(self.num_layers)
                    ],  # fmt: skip
                },
                "step_distance": {
                    "bin_lower_edges": [int(x) for x in edges[:used_bins]],
                    "per_layer": [
                        [int(x) for x in r.step_hist[lay, :used_bins]]
                        for lay in range(self.num_layers)
                    ],  # fmt: skip
                },
                "global_stack_distance": _trim(r.global_hist),
                "cold_per_layer": [int(x) for x in r.cold],
            },
            "overlap_intersection_hist": {
                PHASES[p]: _trim(self.overlap.inter_hist[p]) for p in self.phases_present()
            },
        }
        if len(self.phases_present()) == 2:
            d["popularity_counts_by_phase"] = {
                PHASES[p]: [
                    [int(x) for x in self.counts[p, lay, : E[lay]]]
                    for lay in range(self.num_layers)
                ]  # fmt: skip
                for p in (0, 1)
            }
        return d


def _trim(h: np.ndarray) -> list[int]:
    nz = np.flatnonzero(h)
    return [int(x) for x in h[: int(nz.max()) + 1]] if nz.size else []


def _py(v):
    if isinstance(v, dict):
        return {str(k): _py(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_py(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        f = float(v)
        return None if not math.isfinite(f) else f
    return v


def _nan_reduce(fn, x):
    x = np.asarray(x, dtype=np.float64)
    return float(fn(x[np.isfinite(x)])) if np.isfinite(x).any() else math.nan


def _nanmean(x):
    return _nan_reduce(np.mean, x)


def _nanmin(x):
    return _nan_reduce(np.min, x)


def _nanmax(x):
    return _nan_reduce(np.max, x)


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else math.nan


def _wmean(x, w) -> float:
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    ok = np.isfinite(x) & (w > 0)
    return float((x[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else math.nan


def compute_stats(trace: Trace) -> TraceStats:
    """All statistics of a validated trace (rows sorted by step, layer, seq, pos)."""
    if trace.num_rows == 0:
        raise TraceError(f"{trace.path}: the trace has no rows: nothing to describe")
    meta = trace.meta
    epl = _epl(trace)
    counts, rows = popularity_counts(trace)
    k = effective_k(counts.sum(axis=0), rows.sum(axis=0), meta.top_k)
    pop = popularity_metrics(counts.sum(axis=0), epl, k)
    pop_phase = [
        popularity_metrics(counts[p], epl, effective_k(counts[p], rows[p], meta.top_k))
        for p in (0, 1)
    ]
    js = js_divergence(counts[0], counts[1])
    keys = _keys(trace)
    reuse = reuse_stats(trace)
    overlap = overlap_stats(trace, keys)
    chance_pop = popularity_chance_overlap(counts.sum(axis=0), rows.sum(axis=0))
    coact = coactivation_stats(trace, keys)
    info = trace.summary()
    info["tokens"] = coact.tokens
    info["steps_kind"] = meta.steps
    info["phase_names"] = dict(PHASE_NAMES)
    return TraceStats(
        info=info,
        experts_per_layer=epl,
        layer_ids=list(meta.layer_ids),
        top_k=meta.top_k,
        counts=counts,
        rows=rows,
        k=k,
        popularity=pop,
        popularity_phase=pop_phase,
        js=js,
        reuse=reuse,
        overlap=overlap,
        overlap_chance_pop=chance_pop,
        coact=coact,
    )
