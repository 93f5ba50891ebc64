"""MoE-Infinity's activation-aware prefetching: expert activation matrices and their matching.

What MoE-Infinity (Xue et al., arXiv 2401.14361) does, as ``../shared/docs/policies.md`` and
docs/policies.md describe it:

- Each sequence keeps an **expert activation matrix** (EAM): ``A[l, e]`` = tokens of the sequence
  routed to expert ``e`` at layer ``l`` so far (prefill and decode alike).
- A **collection** (EAMC) holds up to ``capacity`` matrices of finished sequences (1,000 in its
  code); when full, the entry matched least often is replaced (ties: the oldest). It can be
  warmed with a training trace's sequences.
- At every MoE layer ``l`` the current sequence's matrix is **matched** against the collection
  over the layers not yet executed (``l+1 .. L-1``): per layer the cosine similarity of the two
  rows, averaged over those layers; the entry with the highest mean is the prediction ``M``.
  (Normalising a row to sum 1 does not change a cosine; an all-zero row counts as 0.)
- **Prefetch priority** of expert ``e`` of a later layer ``l'``:
  ``P = (M[l', e] + 1e-8) * (1 - (l' - l) / (L + 1))``: activation count times a linear decay with
  the distance in layers. Requests are issued in descending ``P``, behind demand fetches; the
  simulator's link drops queued prefetches aimed at a layer that has started, and duplicates.

Choices of ours, documented in docs/policies.md: requests go to the next ``horizon`` layers of
the same forward pass, at most ``top_n`` experts per sequence and target layer (those with the
highest counts in ``M``, only counts > 0), so that a prefetch does not reserve half the cache
for layers far ahead (the simulator reserves a slot when a transfer is issued). Finished
sequences join the collection at the end of the step in which they finish.

Everything here depends only on the trace, so it runs once before the replay, in one numba pass:
incremental dot products (one vector update over the collection per access) and one suffix pass
per sequence and step give every layer's match in O(collection x layers) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from simulator.history_predictors import dense_seq
from traces.trace import Trace

EPS = 1e-8


@dataclass
class Matches:
    """What the matching pass produced besides the prefetch lists.

    ``snap`` (float32[S, O]): every matrix that ever entered the collection (warm ones first),
    by object id (``layer_base[l] + e``); entries are never changed once stored.
    ``off``/``ids`` (CSR by group): the snapshot matched for each of the group's sequences
    (empty where there was nothing to match).
    """

    snap: np.ndarray
    off: np.ndarray
    ids: np.ndarray


def eam_of_sequences(trace: Trace) -> np.ndarray:
    """float32[n_seq, L, E]: the finished activation matrix of every sequence of ``trace``
    (sequences in order of first appearance)."""
    seqd, n_seq = dense_seq(trace)
    first = np.full(n_seq, trace.num_rows, np.int64)
    np.minimum.at(first, seqd, np.arange(trace.num_rows, dtype=np.int64))
    rank = np.empty(n_seq, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_seq)
    e_max = int(max(trace.meta.experts_per_layer))
    out = np.zeros((n_seq, trace.meta.num_layers, e_max), np.float32)
    _fill_eams(rank[seqd], trace.layer.astype(np.int64), trace.offsets, trace.experts, out)
    return out


@njit(cache=True)
def _fill_eams(seq, layer, offsets, experts, out):
    for r in range(seq.shape[0]):
        for j in range(offsets[r], offsets[r + 1]):
            out[seq[r], layer[r], experts[j]] += 1.0


def build(
    trace: Trace,
    acc,
    horizon: int,
    top_n: int,
    capacity: int = 1000,
    warm: np.ndarray | None = None,
):
    """Prefetch issue lists (by issuing group: ``off``, ``obj``, ``tgt``) and the matches.

    ``warm``: float32[n, L, E] matrices that fill the collection first (the last ``capacity``).
    """
    seqd, n_seq = dense_seq(trace)
    n_groups = acc.num_groups
    grow_off = np.searchsorted(acc.row_group, np.arange(n_groups + 1)).astype(np.int64)
    end_group = np.zeros(n_seq, np.int64)
    np.maximum.at(end_group, seqd, acc.row_group)
    start_group = np.full(n_seq, n_groups, np.int64)
    np.minimum.at(start_group, seqd, acc.row_group)
    # most sequences active at once: sweep of +1 at start, -1 after end
    delta = np.zeros(n_groups + 1, np.int64)
    np.add.at(delta, start_group, 1)
    np.add.at(delta, end_group + 1, -1)
    n_slots = max(1, int(np.cumsum(delta).max()))
    n_layers = trace.meta.num_layers
    e_max = int(max(trace.meta.experts_per_layer))
    if warm is None or warm.shape[0] == 0:
        warm = np.zeros((0, n_layers, e_max), np.float32)
    warm = np.ascontiguousarray(warm[-capacity:], np.float32)
    res = _match(grow_off, acc.group_step, acc.group_layer.astype(np.int64), seqd,
                 trace.offsets, trace.experts, end_group, n_seq, n_slots, n_layers, e_max,
                 acc.layer_base, int(capacity), int(horizon), int(top_n), warm)  # fmt: skip
    off, obj, tgt, m_off, m_ids, snap_eam, n_snap = res
    snap = snap_eam[:n_snap].reshape(n_snap, n_layers * e_max)
    # by object id: layer_base[l] + e (layers may have fewer experts than e_max)
    cols = np.concatenate([l * e_max + np.arange(n) for l, n in
                           enumerate(trace.meta.experts_per_layer)])  # fmt: skip
    return (off, obj, tgt), Matches(np.ascontiguousarray(snap[:, cols]), m_off, m_ids)


@njit(cache=True)
def _match(grow_off, g_step, g_layer, seqd, offsets, experts, end_group, n_seq, n_slots,
           n_layers, e_max, layer_base, capacity, horizon, top_n, warm):  # fmt: skip
    n_groups = g_step.shape[0]
    L = n_layers
    C = capacity
    # the collection, transposed for the per-access update: ecol[l, e, k]
    ecol = np.zeros((L, e_max, C), np.float32)
    inv_e = np.zeros((L, C), np.float32)  # 1 / |row l of entry k| (0 for an empty row)
    matched = np.zeros(C, np.int64)
    born = np.zeros(C, np.int64)
    entry_snap = np.full(C, -1, np.int64)
    n_entries = 0
    # every matrix that enters the collection, kept (for activation-aware eviction)
    max_snap = warm.shape[0] + n_seq
    snap_eam = np.zeros((max_snap, L, e_max), np.float32)
    n_snap = 0
    # active sequences
    slot_of = np.full(n_seq, -1, np.int64)
    free = np.arange(n_slots - 1, -1, -1)
    n_free = n_slots
    a_mat = np.zeros((n_slots, L, e_max), np.float32)
    a_sq = np.zeros((n_slots, L), np.float64)
    dots = np.zeros((n_slots, L, C), np.float32)
    best = np.full((n_slots, L), -1, np.int64)
    seq_of_slot = np.full(n_slots, -1, np.int64)
    step_mark = np.full(n_slots, -1, np.int64)
    suffix = np.zeros(C, np.float64)
    # output
    cap_out = max(16, n_groups * horizon * top_n)
    out_obj = np.empty(cap_out, np.int32)
    out_tgt = np.empty(cap_out, np.int64)
    out_off = np.zeros(n_groups + 1, np.int64)
    m_off = np.zeros(n_groups + 1, np.int64)
    m_ids = np.empty(n_groups + 16, np.int64)
    n_out = 0
    n_m = 0
    # per group scratch
    cand_p = np.zeros(layer_base[L], np.float64)
    cand_stamp = np.full(layer_base[L], -1, np.int64)
    cand_list = np.empty(layer_base[L], np.int64)
    cand_tgt = np.empty(layer_base[L], np.int64)
    layer_group = np.full(L, -1, np.int64)
    finished = np.empty(n_slots, np.int64)
    top_e = np.empty(top_n, np.int64)
    seen = np.full(n_seq, -1, np.int64)
    fin_mark = np.full(n_seq, -1, np.int64)
    u_cnt = np.zeros(e_max, np.float32)  # a sequence's experts in the group, with counts
    u_list = np.empty(e_max, np.int64)
    clock = 0

    # warm start
    for w in range(warm.shape[0]):
        k = n_entries
        n_entries += 1
        _store(ecol, inv_e, warm[w], k, e_max, L)
        matched[k] = 0
        born[k] = clock
        clock += 1
        snap_eam[n_snap] = warm[w]
        entry_snap[k] = n_snap
        n_snap += 1

    g = 0
    while g < n_groups:
        s = g_step[g]
        g_end = g
        while g_end < n_groups and g_step[g_end] == s:
            g_end += 1
        for lay in range(L):
            layer_group[lay] = -1
        for gg in range(g, g_end):
            layer_group[g_layer[gg]] = gg
        n_fin = 0
        for gg in range(g, g_end):
            lay = g_layer[gg]
            # (a) the gate: this group's tokens update their sequences' matrices. Rows of one
            # sequence are contiguous in a group: their experts (with counts) are gathered, then
            # the dot products with every entry move in one fused pass.
            r = grow_off[gg]
            while r < grow_off[gg + 1]:
                q = seqd[r]
                r_end = r
                while r_end < grow_off[gg + 1] and seqd[r_end] == q:
                    r_end += 1
                i = slot_of[q]
                if i < 0:
                    n_free -= 1
                    i = free[n_free]
                    slot_of[q] = i
                    seq_of_slot[i] = q
                    a_mat[i] = 0.0
                    a_sq[i] = 0.0
                    dots[i] = 0.0
                    step_mark[i] = -1
                if step_mark[i] != s:
                    # first appearance in this step: every layer's match, by a suffix pass
                    # over the layers (rows after the current layer do not change this step)
                    step_mark[i] = s
                    _suffix_best(a_sq, dots, inv_e, i, n_entries, L, suffix, best)
                n_u = 0
                for rr in range(r, r_end):
                    for j in range(offsets[rr], offsets[rr + 1]):
                        e = experts[j]
                        a = a_mat[i, lay, e]
                        a_mat[i, lay, e] = a + 1.0
                        a_sq[i, lay] += 2.0 * a + 1.0
                        if u_cnt[e] == 0.0:
                            u_list[n_u] = e
                            n_u += 1
                        u_cnt[e] += 1.0
                _add_rows(dots, ecol, i, lay, u_list, u_cnt, n_u, n_entries)
                for x in range(n_u):
                    u_cnt[u_list[x]] = 0.0
                if end_group[q] == gg and fin_mark[q] < 0:
                    fin_mark[q] = gg
                    finished[n_fin] = i
                    n_fin += 1
                r = r_end
            # (b) each sequence of the group: its match and its prefetch candidates
            n_c = 0
            m_off[gg] = n_m
            for r in range(grow_off[gg], grow_off[gg + 1]):
                q = seqd[r]
                if seen[q] == gg:
                    continue
                seen[q] = gg
                i = slot_of[q]
                k = best[i, lay]
                if k < 0:
                    continue
                matched[k] += 1
                if n_m >= m_ids.shape[0]:
                    grown = np.empty(m_ids.shape[0] * 2, np.int64)
                    grown[:n_m] = m_ids[:n_m]
                    m_ids = grown
                m_ids[n_m] = entry_snap[k]
                n_m += 1
                last = min(lay + horizon, L - 1)
                for tl in range(lay + 1, last + 1):
                    tg = layer_group[tl]
                    if tg < 0:
                        continue
                    decay = 1.0 - (tl - lay) / (L + 1.0)
                    n_top = _top_counts(ecol, tl, k, layer_base[tl + 1] - layer_base[tl],
                                        top_n, top_e)  # fmt: skip
                    for t in range(n_top):
                        e = top_e[t]
                        o = layer_base[tl] + e
                        p = (ecol[tl, e, k] + EPS) * decay
                        if cand_stamp[o] != gg:
                            cand_stamp[o] = gg
                            cand_p[o] = p
                            cand_list[n_c] = o
                            cand_tgt[n_c] = tg
                            n_c += 1
                        else:
                            cand_p[o] += p
            # descending priority (stable: first named first on ties)
            for x in range(1, n_c):
                o = cand_list[x]
                tg = cand_tgt[x]
                y = x
                while y > 0 and cand_p[cand_list[y - 1]] < cand_p[o]:
                    cand_list[y] = cand_list[y - 1]
                    cand_tgt[y] = cand_tgt[y - 1]
                    y -= 1
                cand_list[y] = o
                cand_tgt[y] = tg
            if n_out + n_c > out_obj.shape[0]:
                size = max(out_obj.shape[0] * 2, n_out + n_c)
                g_obj = np.empty(size, np.int32)
                g_tgt = np.empty(size, np.int64)
                g_obj[:n_out] = out_obj[:n_out]
                g_tgt[:n_out] = out_tgt[:n_out]
                out_obj = g_obj
                out_tgt = g_tgt
            out_off[gg] = n_out
            for x in range(n_c):
                out_obj[n_out] = cand_list[x]
                out_tgt[n_out] = cand_tgt[x]
                n_out += 1
            out_off[gg + 1] = n_out
            m_off[gg + 1] = n_m
        # end of the step: finished sequences join the collection
        for f in range(n_fin):
            i = finished[f]
            if n_entries < C:
                k = n_entries
                n_entries += 1
            else:
                k = 0
                for c in range(1, C):
                    if matched[c] < matched[k] or (matched[c] == matched[k] and born[c] < born[k]):
                        k = c
            _store(ecol, inv_e, a_mat[i], k, e_max, L)
            matched[k] = 0
            born[k] = clock
            clock += 1
            snap_eam[n_snap] = a_mat[i]
            entry_snap[k] = n_snap
            n_snap += 1
            slot_of[seq_of_slot[i]] = -1
            seq_of_slot[i] = -1
            free[n_free] = i
            n_free += 1
            # the other active sequences' dot products with the new entry
            for i2 in range(n_slots):
                if seq_of_slot[i2] < 0:
                    continue
                for lay in range(L):
                    acc_d = 0.0
                    for e in range(e_max):
                        acc_d += a_mat[i2, lay, e] * ecol[lay, e, k]
                    dots[i2, lay, k] = acc_d
        g = g_end
    out_off[n_groups] = n_out
    m_off[n_groups] = n_m
    return (out_off, out_obj[:n_out].copy(), out_tgt[:n_out].copy(), m_off, m_ids[:n_m].copy(),
            snap_eam, n_snap)  # fmt: skip


@njit(cache=True)
def _add_rows(dots, ecol, i, lay, u_list, u_cnt, n_u, n_entries):
    """dots[i, lay, :] += sum over the listed experts of count x ecol[lay, e, :], fused (the
    common one-token case: one read of each expert's row, one write of the dot row)."""
    if n_u == 6:  # top-6 models (DeepSeek, Qwen): unrolled, the hot case
        e0, e1, e2, e3, e4, e5 = u_list[0], u_list[1], u_list[2], u_list[3], u_list[4], u_list[5]
        c0, c1, c2, c3, c4, c5 = u_cnt[e0], u_cnt[e1], u_cnt[e2], u_cnt[e3], u_cnt[e4], u_cnt[e5]
        for k in range(n_entries):
            dots[i, lay, k] += (c0 * ecol[lay, e0, k] + c1 * ecol[lay, e1, k]
                                + c2 * ecol[lay, e2, k] + c3 * ecol[lay, e3, k]
                                + c4 * ecol[lay, e4, k] + c5 * ecol[lay, e5, k])  # fmt: skip
        return
    for x in range(n_u):
        e = u_list[x]
        c = u_cnt[e]
        for k in range(n_entries):
            dots[i, lay, k] += c * ecol[lay, e, k]


@njit(cache=True)
def _store(ecol, inv_e, mat, k, e_max, n_layers):
    for lay in range(n_layers):
        sq = 0.0
        for e in range(e_max):
            v = mat[lay, e]
            ecol[lay, e, k] = v
            sq += v * v
        inv_e[lay, k] = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0


@njit(cache=True)
def _suffix_best(a_sq, dots, inv_e, i, n_entries, n_layers, suffix, best):
    """best[i, l] = the entry with the highest summed cosine over layers l+1.. (-1 if none > 0).

    The mean over those layers has the same argmax as the sum; ties go to the lower entry.
    """
    for k in range(n_entries):
        suffix[k] = 0.0
    best[i, n_layers - 1] = -1
    for j in range(n_layers - 1, 0, -1):
        if a_sq[i, j] > 0.0:
            w = 1.0 / np.sqrt(a_sq[i, j])
            for k in range(n_entries):
                suffix[k] += dots[i, j, k] * inv_e[j, k] * w
        bv = _max_of(suffix, n_entries)  # vectorised; then the first entry holding it
        bk = -1
        if bv > 0.0:
            for k in range(n_entries):
                if suffix[k] == bv:
                    bk = k
                    break
        best[i, j - 1] = bk


@njit(cache=True, fastmath=True)
def _max_of(x, n):
    """max(x[:n]) (0 when n == 0). fastmath lets numba vectorise the reduction; a maximum is
    exact in any order (the values are finite)."""
    m = 0.0
    for k in range(n):
        m = max(m, x[k])
    return m


@njit(cache=True)
def _top_counts(ecol, lay, k, n_e, top_n, top_e):
    """The ``top_n`` experts of layer ``lay`` with the highest counts (> 0) in entry ``k``."""
    m = 0
    for e in range(n_e):
        v = ecol[lay, e, k]
        if v <= 0.0:
            continue
        if m < top_n:
            y = m
            m += 1
        elif v > ecol[lay, top_e[m - 1], k]:
            y = m - 1
        else:
            continue
        while y > 0 and ecol[lay, top_e[y - 1], k] < v:
            top_e[y] = top_e[y - 1]
            y -= 1
        top_e[y] = e
    return m
