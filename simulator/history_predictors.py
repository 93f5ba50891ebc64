"""Statistical stand-ins for gate lookahead: predictions made from the trace's own past.

Speculative prefetchers (mixtral-offloading, Pre-gated MoE, HOBBIT) apply layer l+h's gate to
layer l's hidden state; that needs the model, so the guess is recorded at capture time (the
trace's ``pred_h{H}`` columns). For traces without such columns two stand-ins that need only
expert ids:

- ``prev-token``: a token's experts at layer l are guessed to be those its sequence's previous
  token used at layer l (the latest row of the same sequence and layer in an earlier step).
- ``cross-layer``: a token's experts at layer l+h are guessed from its own experts at layer l
  through transition counts ``T[l, e, e']`` (how often a token routed to ``e`` at layer l was
  routed to ``e'`` at layer l+h). The counts are learned online from the replayed trace's past
  (never its future), optionally warmed from a training trace.

Both return predictions in the trace's ``preds`` form (``offsets int64[R+1], ids int16``, per row,
predicting that row's experts ``h`` layers earlier) so the prefetch machinery treats them like
recorded columns.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from traces._jit import HOT
from traces.errors import ConfigError
from traces.trace import Trace, token_base


def default_top_n(trace: Trace) -> int:
    """Experts a stand-in names per row: the model's top-k, else the trace's mean row length."""
    if trace.meta.top_k:
        return int(trace.meta.top_k)
    lens = np.diff(trace.offsets)
    return max(1, round(float(lens.mean()))) if lens.size else 1


def dense_seq(trace: Trace) -> tuple[np.ndarray, int]:
    """Sequence ids renumbered 0..n-1 in id order (int64[R]) and n.

    Ids that are small non-negative integers (the usual case) are ranked through a presence
    table in O(rows), 12x faster than sorting them with ``np.unique`` on 5 M rows."""
    seq = trace.seq
    if seq.size and seq.min() >= 0 and seq.max() < 4 * seq.size + 1024:
        present = np.zeros(int(seq.max()) + 1, np.bool_)
        present[seq] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return rank[seq], int(rank[-1] + 1)
    uniq, inv = np.unique(seq, return_inverse=True)
    return inv.astype(np.int64), int(uniq.shape[0])


# ---------------------------------------------------------------------------------------------
# previous token


def prev_token(trace: Trace, acc) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the experts of the same sequence's latest row at the same layer in an earlier
    step (empty for a sequence's first step)."""
    seqd, n_seq = dense_seq(trace)
    return _prev_token(acc.row_group, seqd, trace.layer.astype(np.int64), trace.offsets,
                       trace.experts, n_seq, trace.meta.num_layers)  # fmt: skip


@njit(cache=True)
def _prev_token(row_group, seqd, layer, offsets, experts, n_seq, n_layers):
    n = row_group.shape[0]
    last = np.full((n_seq, n_layers), -1, np.int64)
    out_off = np.zeros(n + 1, np.int64)
    out = np.empty(experts.shape[0], np.int16)
    k = 0
    r0 = 0
    while r0 < n:
        r1 = r0
        while r1 < n and row_group[r1] == row_group[r0]:
            r1 += 1
        for r in range(r0, r1):  # predictions use earlier steps only
            src = last[seqd[r], layer[r]]
            if src >= 0:
                for j in range(offsets[src], offsets[src + 1]):
                    if k >= out.shape[0]:
                        grown = np.empty(out.shape[0] * 2 + 16, np.int16)
                        grown[:k] = out[:k]
                        out = grown
                    out[k] = experts[j]
                    k += 1
            out_off[r + 1] = k
        for r in range(r0, r1):  # then this step's rows become the latest (last position wins)
            last[seqd[r], layer[r]] = r
        r0 = r1
    return out_off, out[:k].copy()


# ---------------------------------------------------------------------------------------------
# cross-layer transitions


def source_rows(trace: Trace, horizon: int) -> np.ndarray:
    """int64[R]: for each row, the same token's row ``horizon`` layers earlier in the same step
    (-1: none). One pass through a table of tokens by (sequence, position) where the ids allow
    it (steps in order, ids not negative, no wide gaps), else by a sort (the same result)."""
    n = trace.num_rows
    if n == 0 or horizon <= 0:
        return np.full(n, -1, np.int64)
    src = _source_by_table(trace.seq, trace.pos, trace.step, trace.layer.astype(np.int64),
                           trace.meta.num_layers, horizon)  # fmt: skip
    return src if src is not None else source_rows_by_sort(trace, horizon)


def source_rows_by_sort(trace: Trace, horizon: int) -> np.ndarray:
    """:func:`source_rows` by a sort of the rows by (step, sequence, position, layer): any ids,
    any row order."""
    order = np.lexsort((trace.layer, trace.pos, trace.seq, trace.step))
    src = np.full(trace.num_rows, -1, np.int64)
    _source_in_order(order, trace.step, trace.seq, trace.pos, trace.layer.astype(np.int64),
                     horizon, src)  # fmt: skip
    return src


@njit(cache=True)
def _source_in_order(order, step, seq, pos, layer, horizon, src):
    """In sorted ``order`` each token's rows are one run, by layer: a row's source is the last
    row of its run at ``horizon`` layers less (a token may lack rows at some layers; of two
    rows of one token and layer the later one counts)."""
    n = order.shape[0]
    a = 0
    while a < n:
        f = order[a]
        b = a + 1
        while b < n:
            x = order[b]
            if step[x] != step[f] or seq[x] != seq[f] or pos[x] != pos[f]:
                break
            b += 1
        for j in range(a + 1, b):
            r = order[j]
            want = layer[r] - horizon
            k = j - 1
            while k >= a and layer[order[k]] > want:
                k -= 1
            if k >= a and layer[order[k]] == want:
                src[r] = order[k]
        a = b


@njit(cache=True)
def _source_by_table(seq, pos, step, layer, n_layers, horizon):
    """:func:`source_rows` through a table ``row[token, layer]`` (token: ``base[seq] + pos``),
    filled one step at a time, or None where the steps are not in order, an id is negative or
    the table would hold over four entries per row (gaps in the positions; the caller then
    sorts)."""
    n = seq.shape[0]
    for r in range(1, n):
        if step[r] < step[r - 1]:
            return None
    base, total = token_base(seq, pos, n_layers, n * 4 + 1024)
    if total < 0:
        return None
    table = np.full(total * n_layers, -1, np.int64)
    src = np.full(n, -1, np.int64)
    a = 0
    while a < n:
        b = a
        while b < n and step[b] == step[a]:
            b += 1
        for r in range(a, b):  # the step's rows (a later duplicate wins, as in the sort)
            table[(base[seq[r]] + pos[r]) * n_layers + layer[r]] = r
        for r in range(a, b):
            lay = layer[r] - horizon
            if lay >= 0:
                c = table[(base[seq[r]] + pos[r]) * n_layers + lay]
                if c >= 0 and step[c] == step[r]:
                    src[r] = c
        a = b
    return src


def transition_counts(trace: Trace, horizon: int) -> np.ndarray:
    """int64[L, E, E]: tokens routed to e at layer l and to e' at layer l + horizon."""
    e_max = int(max(trace.meta.experts_per_layer))
    t = np.zeros((trace.meta.num_layers, e_max, e_max), np.int64)
    src = source_rows(trace, horizon)
    _count_pairs(src, trace.layer.astype(np.int64), trace.offsets, trace.experts, horizon, t)
    return t


@njit(cache=True)
def _count_pairs(src, layer, offsets, experts, horizon, t):
    for r in range(src.shape[0]):
        s = src[r]
        if s < 0:
            continue
        lay = layer[r] - horizon
        for i in range(offsets[s], offsets[s + 1]):
            for j in range(offsets[r], offsets[r + 1]):
                t[lay, experts[i], experts[j]] += 1


def cross_layer(
    trace: Trace, acc, horizon: int, top_n: int, warm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the ``top_n`` experts with the highest transition counts from the same token's
    experts ``horizon`` layers earlier (ties: the lowest id). Counts seen by a prediction are
    those of groups up to and including the one where it is made (the source row's), plus
    ``warm`` (from :func:`transition_counts` of a training trace: whole counts >= 0)."""
    e_max = int(max(trace.meta.experts_per_layer))
    shape = (trace.meta.num_layers, e_max, e_max)
    if warm is None:
        t = np.zeros(shape, np.int64)
    else:
        if warm.shape != shape:
            raise ConfigError(
                f"cross-layer train trace: expected a model of {shape[0]} layers and {e_max} "
                f"experts, got {warm.shape[0]} layers and {warm.shape[1]}"
            )
        if warm.size and (warm.min() < 0 or not np.array_equal(warm, np.floor(warm))):
            raise ConfigError("cross-layer warm counts: expected whole numbers >= 0")
        t = warm.astype(np.int64, copy=True)
    src = source_rows(trace, horizon)
    # the inverse map: the row each row predicts (its token's row `horizon` layers later)
    tgt = np.full(trace.num_rows, -1, np.int64)
    has = src >= 0
    tgt[src[has]] = np.nonzero(has)[0]
    epl = np.asarray(trace.meta.experts_per_layer, np.int64)
    # a score (a sum of one row's counts over its experts) and its expert id in one int64 key
    shift = max(1, (e_max - 1).bit_length())
    most = int(t.max(initial=0)) + trace.num_rows  # a count grows by at most 1 per row
    if most * int(max(1, np.diff(trace.offsets).max(initial=1))) >= 2 ** (62 - shift):
        raise ConfigError("cross-layer: transition counts too large for the int64 scores")
    return _cross_layer(acc.row_group, src, tgt, trace.layer.astype(np.int64), trace.offsets,
                        trace.experts, horizon, top_n, epl, t, shift)  # fmt: skip


@njit(cache=True)
def _cross_layer(row_group, src, tgt, layer, offsets, experts, horizon, top_n, epl, t, shift):
    """The predictions of :func:`cross_layer`. A row's score of expert ``e`` is kept as
    ``score << shift | (e_max - 1 - e)``: the keys are distinct, order by score then by the
    lower id, and the best ``top_n`` are ``top_n`` maxima over plain integers."""
    n = row_group.shape[0]
    e_max = t.shape[1]
    low = np.int64(1) << shift  # the keys of score 0 are below (only scores > 0 are named)
    pred_len = np.zeros(n, np.int64)
    pred = np.zeros((n, top_n), np.int16)
    key = np.zeros(e_max, np.int64)
    r0 = 0
    while r0 < n:
        r1 = r0
        while r1 < n and row_group[r1] == row_group[r0]:
            r1 += 1
        # this group's gate: its rows' experts are known; learn the pairs they complete
        for r in range(r0, r1):
            s = src[r]
            if s >= 0:
                lay = layer[r] - horizon
                for i in range(offsets[s], offsets[s + 1]):
                    for j in range(offsets[r], offsets[r + 1]):
                        t[lay, experts[i], experts[j]] += 1
        # then predict the rows `horizon` layers later of this group's tokens
        for r in range(r0, r1):
            d = tgt[r]
            if d < 0:
                continue
            _scores(t[layer[r]], experts[offsets[r] : offsets[r + 1]], epl[layer[d]], shift,
                    e_max, key)  # fmt: skip
            m = 0
            for _ in range(top_n):
                b = np.int64(0)
                for e in range(epl[layer[d]]):
                    v = key[e]
                    b = v if v > b else b
                if b < low:
                    break
                e = e_max - 1 - (b & (low - 1))
                pred[d, m] = e
                key[e] = -1
                m += 1
            pred_len[d] = m
        r0 = r1
    off = np.zeros(n + 1, np.int64)
    for r in range(n):
        off[r + 1] = off[r] + pred_len[r]
    ids = np.empty(off[n], np.int16)
    for r in range(n):
        for j in range(pred_len[r]):
            ids[off[r] + j] = pred[r, j]
    return off, ids


@njit(inline="always", **HOT)
def _scores(tl, ex, n_e, shift, e_max, key):
    """``key[e]`` for ``e < n_e``: the sum of ``tl``'s rows of the experts ``ex``, shifted, with
    the id below. Six experts (DeepSeek, Qwen) are added in one pass over six row views, which
    LLVM vectorises; other counts row by row."""
    if ex.shape[0] == 6:
        r0, r1, r2 = tl[ex[0]], tl[ex[1]], tl[ex[2]]
        r3, r4, r5 = tl[ex[3]], tl[ex[4]], tl[ex[5]]
        for e in range(n_e):
            key[e] = ((r0[e] + r1[e] + r2[e] + r3[e] + r4[e] + r5[e]) << shift) | (e_max - 1 - e)
        return
    for e in range(n_e):
        key[e] = 0
    for i in range(ex.shape[0]):
        r = tl[ex[i]]
        for e in range(n_e):
            key[e] += r[e]
    for e in range(n_e):
        key[e] = (key[e] << shift) | (e_max - 1 - e)
