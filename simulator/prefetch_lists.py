"""Building blocks of prefetch request lists (the prefetchers themselves: simulator/prefetchers.py).

A list is CSR by *issuing* group: at the gate of group ``i`` the kernel queues
``pf_obj[pf_off[i]:pf_off[i+1]]`` with target groups ``pf_tgt[...]`` (the group that should use
them). Every prefetcher's list is built before the replay, from the trace and the configuration.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _issuer(g_step, g_layer, horizon, same_step):
    """Issuing group of each target group: ``horizon`` layers earlier (or -1 for none).

    same_step: the issuer must be in the target's step (predictions made within a forward
    pass); the step's first group stands in when the target layer is closer than ``horizon``
    to the start of the step. Otherwise the issuer is simply ``horizon`` groups earlier.
    """
    n = g_step.shape[0]
    out = np.full(n, -1, np.int64)
    first = 0
    for t in range(n):
        if t > 0 and g_step[t] != g_step[t - 1]:
            first = t
        if not same_step:
            out[t] = max(t - horizon, 0) if t > 0 else -1
            continue
        i = t - 1
        while i >= first and g_layer[i] > g_layer[t] - horizon:
            i -= 1
        if i >= first:
            out[t] = i
        elif t > first:
            out[t] = first
    return out


@njit(cache=True)
def _union_rows(row_group, offsets, ids, layer, layer_base, n_groups, n_obj):
    """Per group, the union of the listed ids of its rows (first-appearance order)."""
    cnt = np.zeros(n_groups + 1, np.int64)
    out = np.empty(ids.shape[0], np.int32)
    stamp = np.full(n_obj, -1, np.int64)
    k = 0
    for r in range(row_group.shape[0]):
        g = row_group[r]
        lb = layer_base[layer[r]]
        for j in range(offsets[r], offsets[r + 1]):
            o = lb + ids[j]
            if stamp[o] != g:
                stamp[o] = g
                out[k] = o
                k += 1
                cnt[g + 1] += 1
    for g in range(n_groups):
        cnt[g + 1] += cnt[g]
    return cnt, out[:k].copy()


@njit(cache=True)
def _by_issuer(issuer, t_off, t_obj, n_groups):
    """Regroup per-target lists (t_off, t_obj) by issuing group; returns (off, obj, tgt)."""
    cnt = np.zeros(n_groups + 1, np.int64)
    for t in range(n_groups):
        i = issuer[t]
        if i >= 0:
            cnt[i + 1] += t_off[t + 1] - t_off[t]
    for g in range(n_groups):
        cnt[g + 1] += cnt[g]
    fill = cnt[:-1].copy()
    obj = np.empty(cnt[n_groups], np.int32)
    tgt = np.empty(cnt[n_groups], np.int64)
    for t in range(n_groups):
        i = issuer[t]
        if i < 0:
            continue
        for j in range(t_off[t], t_off[t + 1]):
            obj[fill[i]] = t_obj[j]
            tgt[fill[i]] = t
            fill[i] += 1
    return cnt, obj, tgt


def empty_lists(n_groups: int):
    return np.zeros(n_groups + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
