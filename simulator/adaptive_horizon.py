"""ExpertFlow-style adaptive prefetch horizon: how many layers ahead to prefetch, chosen per layer.

ExpertFlow (arXiv 2510.26730) picks the prediction horizon at run time from the transfer
bandwidth, the expert size, the per-layer compute time and the predictor's recent accuracy, so
that a prefetch arrives just before it is needed without crowding the link. moesim's rule, at
the gate of every step-layer ``(s, l)``:

1. **Time.** Fetching the layer's experts takes ``t_fetch = m * (latency + bytes / bandwidth)``
   (``m`` = experts this group needs, a stand-in for what the next layers need; ``bytes`` the
   mean expert size); a layer computes in ``t_layer = dense_s + tokens * dense_per_token_s +
   m * expert_s + routed_tokens * expert_per_token_s`` (the cost model of the timed kernel).
   The horizon that hides the transfer is ``h = ceil(t_fetch / t_layer)``, at least 1, at most
   ``max``.
2. **Accuracy.** Each horizon's recent precision ``p_h`` is an exponential moving average
   (weight ``alpha`` per row) of |predicted ∩ actual| / |predicted| over the rows whose layer
   has already run; while ``h > 1`` and ``p_h < min_precision``, ``h`` shrinks by one, since
   far guesses that miss only waste the link.
3. **Issue.** The layers ``l+1 .. l+h`` of the same forward pass not yet covered in this step are
   covered now: each target layer ``t`` gets the base predictor's guesses made ``t - l`` layers
   ahead (union over the group's tokens, in rank order). So every layer is requested once per
   step, at the earliest layer whose window reaches it.

The base predictor supplies per-row predictions at each horizon 1..max (a trace's ``pred_h``
columns, the learned predictor, or a statistical stand-in); everything here depends on the trace
and the configuration only, so the lists are built once before the replay.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def build(acc, trace, preds: dict, t_x: float, cost: np.ndarray, h_max: int,
          min_precision: float, alpha: float):  # fmt: skip
    """Issue lists ``(off, obj, tgt)`` and the horizon chosen at each group (int64[G]).

    ``preds``: horizon -> (offsets, ids) per row; horizons missing from it are never chosen.
    ``t_x``: seconds to move one (mean-sized) expert, latency included; ``cost``: float64[4]
    the timed kernel's dense_s, dense_per_token_s, expert_s, expert_per_token_s.
    """
    n_rows = trace.num_rows
    have = np.zeros(h_max + 1, np.bool_)
    p_off = np.zeros((h_max + 1, n_rows + 1), np.int64)
    ids = [np.zeros(0, np.int16)] * (h_max + 1)
    for h, (off, pid) in preds.items():
        if 1 <= h <= h_max:
            have[h] = True
            p_off[h] = off
            ids[h] = np.asarray(pid, np.int16)
    p_ids_off = np.zeros(h_max + 2, np.int64)
    for h in range(1, h_max + 1):
        p_ids_off[h + 1] = p_ids_off[h] + ids[h].shape[0]
    p_ids = np.concatenate(ids[1:])
    grow_off = np.searchsorted(acc.row_group, np.arange(acc.num_groups + 1)).astype(np.int64)
    return _adaptive(acc.group_step, acc.group_layer.astype(np.int64), acc.group_offsets,
                     acc.count, acc.group_prefill, acc.group_decode, grow_off, trace.offsets,
                     trace.experts, trace.layer.astype(np.int64), acc.layer_base, have, p_off,
                     p_ids_off, p_ids, int(h_max), float(min_precision), float(alpha),
                     float(t_x), np.asarray(cost, np.float64))  # fmt: skip


@njit(cache=True)
def _adaptive(g_step, g_layer, g_off, count, g_pre, g_dec, grow_off, r_off, r_exp, r_layer,
              layer_base, have, p_off, p_ids_off, p_ids, h_max, min_precision, alpha, t_x,
              cost):  # fmt: skip
    n_groups = g_step.shape[0]
    n_obj = layer_base[layer_base.shape[0] - 1]
    n_layers = layer_base.shape[0] - 1
    prec = np.ones(h_max + 1, np.float64)  # optimistic start: no evidence against any horizon
    chosen = np.zeros(n_groups, np.int64)
    actual = np.full(n_obj, -1, np.int64)
    stamp = np.full(n_obj, -1, np.int64)
    layer_group = np.full(n_layers, -1, np.int64)
    cap = max(16, g_off[n_groups])
    out_obj = np.empty(cap, np.int32)
    out_tgt = np.empty(cap, np.int64)
    out_off = np.zeros(n_groups + 1, np.int64)
    n_out = 0
    g = 0
    while g < n_groups:
        s = g_step[g]
        g_end = g
        while g_end < n_groups and g_step[g_end] == s:
            g_end += 1
        for lay in range(n_layers):
            layer_group[lay] = -1
        for gg in range(g, g_end):
            layer_group[g_layer[gg]] = gg
        covered = -1
        for gg in range(g, g_end):
            lay = g_layer[gg]
            # the gate: this group's experts are known; score the guesses made for its rows
            for r in range(grow_off[gg], grow_off[gg + 1]):
                base = layer_base[r_layer[r]]
                for j in range(r_off[r], r_off[r + 1]):
                    actual[base + r_exp[j]] = r
                for h in range(1, h_max + 1):
                    if not have[h]:
                        continue
                    lo = p_ids_off[h] + p_off[h, r]
                    hi = p_ids_off[h] + p_off[h, r + 1]
                    if hi <= lo:
                        continue
                    hit = 0
                    for j in range(lo, hi):
                        if actual[base + p_ids[j]] == r:
                            hit += 1
                    prec[h] = (1.0 - alpha) * prec[h] + alpha * hit / (hi - lo)
            # the horizon: transfers of a layer's worth of experts against a layer's compute
            m = g_off[gg + 1] - g_off[gg]
            routed = 0
            for a in range(g_off[gg], g_off[gg + 1]):
                routed += count[a]
            tokens = g_pre[gg] + g_dec[gg]
            t_layer = cost[0] + tokens * cost[1] + m * cost[2] + routed * cost[3]
            if t_layer > 0.0:
                h = int(np.ceil(m * t_x / t_layer))
            else:
                h = h_max
            h = max(1, min(h, h_max))
            while h > 1 and (not have[h] or prec[h] < min_precision):
                h -= 1
            chosen[gg] = h
            # issue: the uncovered target layers of the window, each with its own distance
            out_off[gg] = n_out
            first = max(covered + 1, lay + 1)
            last = min(lay + h, n_layers - 1)
            for tl in range(first, last + 1):
                d = tl - lay
                tg = layer_group[tl]
                if tg < 0 or not have[d]:
                    continue
                for r in range(grow_off[tg], grow_off[tg + 1]):
                    base = layer_base[r_layer[r]]
                    lo = p_ids_off[d] + p_off[d, r]
                    hi = p_ids_off[d] + p_off[d, r + 1]
                    for j in range(lo, hi):
                        o = base + p_ids[j]
                        if stamp[o] == tg:
                            continue
                        stamp[o] = tg
                        if n_out >= out_obj.shape[0]:
                            g_obj = np.empty(out_obj.shape[0] * 2, np.int32)
                            g_tgt = np.empty(out_obj.shape[0] * 2, np.int64)
                            g_obj[:n_out] = out_obj[:n_out]
                            g_tgt[:n_out] = out_tgt[:n_out]
                            out_obj = g_obj
                            out_tgt = g_tgt
                        out_obj[n_out] = o
                        out_tgt[n_out] = tg
                        n_out += 1
            if last > covered:
                covered = last
            out_off[gg + 1] = n_out
        g = g_end
    return out_off, out_obj[:n_out].copy(), out_tgt[:n_out].copy(), chosen
