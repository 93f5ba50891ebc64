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

Everything here depends only on the trace, so it runs once before the replay (and is memoised
for every run on the same prepared trace) in two passes. :func:`match` finds every group's
matched matrices; they depend on the collection's capacity and warm start only, not on the
horizon or ``top_n``, so a sweep over horizons matches once. :func:`issue_lists` turns the
matches into prefetch requests (each matched matrix's top experts at the next ``horizon``
layers, by priority).

The matching runs in numba: incremental dot products (one vector update over the collection per
access) and one suffix pass per sequence and step give every layer's match in O(collection x
layers) per step. The counts and dot products are integers, kept in int16/int32 where they fit
(:func:`counts_fit_int`; else float32, exact below 2**24); the per-layer cosines and their sums
over layers are float32, eight to a vector instruction. Between two changes of the collection
the entries are fixed, so that work is done in blocks of entries, each block through a whole
segment of the trace while its part of the collection stays in cache, the blocks spread over
the cores; the result is the same, number for number, as one pass in trace order
(tests/test_prefetchers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from simulator.history_predictors import dense_seq
from traces._jit import HOT, parallel_ok
from traces.trace import Trace

EPS = 1e-8
SEG_RUNS = 4096  # runs per segment of the matching pass (see _match)
PAR_MIN = 1 << 18  # work (accesses x entries) from which a segment's blocks run in parallel


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


def build(trace: Trace, acc, horizon: int, top_n: int, capacity: int = 1000,
          warm: np.ndarray | None = None, **speed):  # fmt: skip
    """Prefetch issue lists (by issuing group: ``off``, ``obj``, ``tgt``) and the matches:
    :func:`match` (``speed``: its ``chunk``, ``par_min``, ``seg_runs`` and ``int_counts``),
    then :func:`issue_lists`."""
    m = match(trace, acc, capacity, warm, **speed)
    return issue_lists(trace, acc, m, horizon, top_n), m


def match(
    trace: Trace,
    acc,
    capacity: int = 1000,
    warm: np.ndarray | None = None,
    chunk: int = 0,
    par_min: int = PAR_MIN,
    seg_runs: int = SEG_RUNS,
    int_counts: bool | None = None,
) -> Matches:
    """Every group's matched matrices (and every matrix that entered the collection).

    ``warm``: float32[n, L, E] matrices that fill the collection first (the last ``capacity``).
    ``chunk`` (entries per block of the matching pass; 0: sized so a block of the collection
    fits in a core's L2 cache), ``par_min`` (the work, accesses x entries, from which a
    segment's blocks run on several cores) and ``seg_runs`` (runs per segment) change the
    speed only, never the result. ``int_counts`` (None: :func:`counts_fit_int` decides) keeps
    the collection's counts in int16 and the dot products in int32 instead of float32; the two
    agree wherever the float32 dot products are exact (below 2**24).
    """
    seqd, n_seq = dense_seq(trace)
    n_layers = trace.meta.num_layers
    e_max = int(max(trace.meta.experts_per_layer))
    if warm is None or warm.shape[0] == 0:
        warm = np.zeros((0, n_layers, e_max), np.float32)
    warm = np.ascontiguousarray(warm[-capacity:], np.float32)
    if int_counts is None:
        int_counts = counts_fit_int(trace, seqd, n_seq, warm)
    # the collection's counts and the dot products: int16 and int32 where they fit (exact,
    # half the memory traffic of float32), else float32
    e_proto = np.zeros(0, np.int16 if int_counts else np.float32)
    d_proto = np.zeros(0, np.int32 if int_counts else np.float32)
    if chunk <= 0:  # ecol of a block (layers x experts x entries) in about 1 MiB
        chunk = max(16, (1 << 20) // (e_proto.itemsize * n_layers * e_max) // 16 * 16)
    if not parallel_ok():  # see traces._jit.parallel_ok: the blocks run in this thread
        par_min = 1 << 62
    m_off, m_ids, snap_eam, n_snap = _match(
        acc.row_group, acc.group_step, acc.group_layer.astype(np.int64), seqd, trace.offsets,
        trace.experts, n_seq, n_layers, e_max, int(capacity), warm, int(chunk), int(par_min),
        int(numba.get_num_threads()), max(1, int(seg_runs)), e_proto, d_proto)  # fmt: skip
    snap = snap_eam[:n_snap].reshape(n_snap, n_layers * e_max)
    # by object id: layer_base[l] + e (layers may have fewer experts than e_max)
    cols = np.concatenate([l * e_max + np.arange(n) for l, n in
                           enumerate(trace.meta.experts_per_layer)])  # fmt: skip
    return Matches(np.ascontiguousarray(snap[:, cols]), m_off, m_ids)


def issue_lists(trace: Trace, acc, matches: Matches, horizon: int, top_n: int):
    """MoE-Infinity's prefetch requests by issuing group (``off`` int64[G+1], ``obj`` int32,
    ``tgt`` int64: the target group), from ``matches``.

    At a group of layer ``l``, each matched matrix ``M`` (one per sequence of the group, in
    the order of :class:`Matches`) names its ``top_n`` experts with the highest counts (> 0;
    ties: the lower id) at each layer ``l' = l+1 .. l+horizon`` of the same step, with priority
    ``(M[l', e] + 1e-8) * (1 - (l' - l) / (L + 1))``; an expert named by several matrices adds
    their priorities. The requests go out in descending priority (ties: first named first).
    (Written in one thread: two threads writing halves were no faster here, the first touch
    of the fresh output pages dominating.)"""
    if int(horizon) < 1 or int(top_n) < 1:
        raise ValueError(f"moe-infinity issue lists: horizon and top_n must be >= 1, got "
                         f"{horizon} and {top_n}")  # fmt: skip
    n_layers = trace.meta.num_layers
    base = acc.layer_base
    top_o, top_v, n_top = _snap_tops(matches.snap, base, n_layers, int(top_n))
    n_groups = acc.group_step.shape[0]
    room = max(1, int((matches.off[-1] - matches.off[0]) * int(horizon) * int(top_n)))
    out_obj = np.empty(room, np.int32)  # at most horizon x top_n per matched matrix
    out_tgt = np.empty(room, np.int64)
    off = np.zeros(n_groups + 1, np.int64)
    n = _write_lists(acc.group_step, acc.group_layer.astype(np.int64), matches.off,
                     matches.ids, top_o, top_v, n_top, int(horizon), n_layers,
                     int(base[n_layers]), out_obj, out_tgt, off)  # fmt: skip
    return off, out_obj[:n], out_tgt[:n]


@njit(cache=True)
def _snap_tops(snap, base, n_layers, top_n):
    """Every snapshot's ``top_n`` experts per layer (as object ids, highest count first, ties
    in expert order, counts > 0 only), their counts and their number."""
    n_snap = snap.shape[0]
    top_o = np.zeros((n_snap, n_layers, top_n), np.int64)
    top_v = np.zeros((n_snap, n_layers, top_n), np.float32)
    n_top = np.zeros((n_snap, n_layers), np.int64)
    top_e = np.empty(top_n, np.int64)
    for s in range(n_snap):
        for lay in range(n_layers):
            row = snap[s, base[lay] : base[lay + 1]]
            m = _top_counts(row, row.shape[0], top_n, top_e)
            n_top[s, lay] = m
            for t in range(m):
                top_o[s, lay, t] = base[lay] + top_e[t]
                top_v[s, lay, t] = row[top_e[t]]
    return top_o, top_v, n_top


@njit(cache=True)
def _write_lists(g_step, g_layer, m_off, m_ids, top_o, top_v, n_top, horizon, n_layers, n_obj,
                 out_obj, out_tgt, off):  # fmt: skip
    """The loop of :func:`issue_lists`: every group's requests into ``out_obj``/``out_tgt``,
    its offsets into ``off``; returns the number of requests."""
    L = n_layers
    n_groups = g_step.shape[0]
    cand_p = np.zeros(n_obj, np.float64)
    cand_stamp = np.full(n_obj, -1, np.int64)
    cand_list = np.empty(n_obj, np.int64)
    cand_tgt = np.empty(n_obj, np.int64)
    layer_group = np.full(L, -1, np.int64)
    n_out = 0
    step_hi = 0
    for gg in range(n_groups):
        if gg >= step_hi:  # a new step: which group holds each layer
            step_hi = gg
            while step_hi < n_groups and g_step[step_hi] == g_step[gg]:
                step_hi += 1
            for lay in range(L):
                layer_group[lay] = -1
            for g2 in range(gg, step_hi):
                layer_group[g_layer[g2]] = g2
        lay = g_layer[gg]
        last = min(lay + horizon, L - 1)
        n_c = 0
        for x in range(m_off[gg], m_off[gg + 1]):
            sn = m_ids[x]
            for tl in range(lay + 1, last + 1):
                tg = layer_group[tl]
                if tg < 0:
                    continue
                decay = 1.0 - (tl - lay) / (L + 1.0)
                for t in range(n_top[sn, tl]):
                    o = top_o[sn, tl, t]
                    pr = (top_v[sn, tl, t] + EPS) * decay
                    if cand_stamp[o] != gg:
                        cand_stamp[o] = gg
                        cand_p[o] = pr
                        cand_list[n_c] = o
                        cand_tgt[n_c] = tg
                        n_c += 1
                    else:
                        cand_p[o] += pr
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
        for x in range(n_c):
            out_obj[n_out] = cand_list[x]
            out_tgt[n_out] = cand_tgt[x]
            n_out += 1
        off[gg + 1] = n_out
    return n_out


def counts_fit_int(trace: Trace, seqd: np.ndarray, n_seq: int, warm: np.ndarray) -> bool:
    """Whether the matching pass may keep the collection's counts in int16 and the dot
    products in int32: every count (at most the accesses of one sequence at one layer, or a
    warm matrix's value, which must be a whole number >= 0) below 2**15, and every dot product
    (at most the largest row sum times the largest count) below 2**31."""
    most_sum = float(_most_row_sum(seqd, trace.layer, trace.offsets, n_seq, trace.meta.num_layers))
    most = most_sum
    if warm.size:
        if not np.array_equal(warm, np.floor(warm)) or float(warm.min()) < 0.0:
            return False  # not counts: float32 keeps them as given
        most = max(most, float(warm.max()))
        most_sum = max(most_sum, float(warm.sum(axis=2).max()))
    return most < 2**15 and most_sum * most < 2**31


@njit(cache=True)
def _most_row_sum(seqd, layer, offsets, n_seq, n_layers):
    """The most accesses of one sequence at one layer (a row sum of its activation matrix)."""
    row_sum = np.zeros(n_seq * n_layers, np.int64)
    most = 0
    for r in range(seqd.shape[0]):
        x = seqd[r] * n_layers + layer[r]
        row_sum[x] += offsets[r + 1] - offsets[r]
        most = max(most, row_sum[x])
    return most


@njit(cache=True)
def _plan(row_group, g_step, seqd, n_seq, n_groups):
    """The trace's runs (maximal rows of one sequence inside a group), per sequence its first
    and last group, and the most sequences active at once.

    Returns ``grow_off`` (rows by group), ``run_lo`` (first row of each run, then the row
    count), ``grun_off`` (runs by group), ``end_group``, ``n_slots`` and ``fin_step_end``
    (True at the last group of each step in which a sequence has its last group).
    """
    n_rows = seqd.shape[0]
    grow_off = np.zeros(n_groups + 1, np.int64)
    for r in range(n_rows):
        grow_off[row_group[r] + 1] += 1
    for g in range(n_groups):
        grow_off[g + 1] += grow_off[g]
    run_lo = np.empty(n_rows + 1, np.int64)
    grun_off = np.zeros(n_groups + 1, np.int64)
    start_group = np.full(n_seq, n_groups, np.int64)
    end_group = np.zeros(n_seq, np.int64)
    n_runs = 0
    for g in range(n_groups):
        for r in range(grow_off[g], grow_off[g + 1]):
            q = seqd[r]
            if r == grow_off[g] or seqd[r - 1] != q:
                run_lo[n_runs] = r
                n_runs += 1
            start_group[q] = min(start_group[q], g)
            end_group[q] = max(end_group[q], g)
        grun_off[g + 1] = n_runs
    run_lo[n_runs] = n_rows
    delta = np.zeros(n_groups + 1, np.int64)
    for q in range(n_seq):
        if start_group[q] < n_groups:
            delta[start_group[q]] += 1
            delta[end_group[q] + 1] -= 1
    n_slots = 1
    active = 0
    for g in range(n_groups + 1):
        active += delta[g]
        n_slots = max(n_slots, active)
    fin_step_end = np.zeros(n_groups, np.bool_)
    for q in range(n_seq):
        if start_group[q] < n_groups:
            fin_step_end[end_group[q]] = True
    g = 0
    while g < n_groups:  # move each step's flag to its last group
        h = g
        any_end = False
        while h < n_groups and g_step[h] == g_step[g]:
            any_end = any_end or fin_step_end[h]
            fin_step_end[h] = False
            h += 1
        fin_step_end[h - 1] = any_end
        g = h
    return grow_off, run_lo[: n_runs + 1], grun_off, end_group, n_slots, fin_step_end


@njit(cache=True)
def _match(row_group, g_step, g_layer, seqd, offsets, experts, n_seq, n_layers, e_max,
           capacity, warm, chunk, par_min, n_threads, seg_runs, e_proto, d_proto):  # fmt: skip
    """The matching pass. The trace is cut into segments of at most ``seg_runs`` runs that end
    at the latest where the collection changes (after a step in which sequences finish). Per
    segment: (1) the sequences' matrices move and each record (a sequence's first run in a
    step) notes its per-layer weights; (2) the dot products with the collection and the
    records' best matches are computed in blocks of ``chunk`` entries, each block over the
    whole segment (its part of the collection stays in cache; blocks run on several cores when
    the segment is large); (3) the blocks' bests are merged into each group's matches.
    Every number is computed as by one pass in trace order: same operations, same order."""
    n_groups = g_step.shape[0]
    L = n_layers
    C = capacity
    grow_off, run_lo, grun_off, end_group, n_slots, fin_step_end = _plan(
        row_group, g_step, seqd, n_seq, n_groups
    )
    # the collection, transposed for the per-access update: ecol[l, e, k]
    ecol = np.zeros((L, e_max, C), e_proto.dtype)
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
    dots = np.zeros((n_slots, L, C), d_proto.dtype)
    best = np.full((n_slots, L), -1, np.int64)
    seq_of_slot = np.full(n_slots, -1, np.int64)
    step_mark = np.full(n_slots, -1, np.int64)
    # segment buffers (grown if one group has more runs than SEG_RUNS)
    seg_cap = seg_runs
    seg_slot = np.empty(seg_cap, np.int64)
    seg_rec = np.empty(seg_cap, np.int64)
    seg_zero = np.empty(seg_cap, np.bool_)
    # the most blocks a segment uses (see (2) below): ceil(C / chunk), rounded up to a multiple
    # of the threads, and never more than blocks of 16 entries
    most = (C + chunk - 1) // chunk
    if n_threads > 1 and most % n_threads:
        most += n_threads - most % n_threads
    max_chunks = max(1, min((C + 15) // 16, most))
    w_seg = np.empty((seg_cap, L), np.float32)
    bv = np.empty((max_chunks, seg_cap, L), np.float32)
    bk = np.empty((max_chunks, seg_cap, L), np.int64)
    b_suffix = np.empty((max_chunks, C + 16), np.float32)  # per block scratch (see _block)
    b_ucnt = np.zeros((max_chunks, e_max), np.float32)
    b_ulist = np.empty((max_chunks, e_max), np.int64)
    # output
    m_off = np.zeros(n_groups + 1, np.int64)
    m_ids = np.empty(n_groups + 16, np.int64)
    n_m = 0
    finished = np.empty(n_slots, np.int64)
    seen = np.full(n_seq, -1, np.int64)
    fin_mark = np.full(n_seq, -1, np.int64)
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

    n_fin = 0
    ga = 0
    while ga < n_groups:
        # the segment: groups ga .. gb-1, ending after a step in which sequences finish
        gb = ga
        while gb < n_groups and (gb == ga or grun_off[gb + 1] - grun_off[ga] <= seg_cap):
            gb += 1
            if fin_step_end[gb - 1]:
                break
        x0 = grun_off[ga]
        x1 = grun_off[gb]
        if x1 - x0 > seg_cap:
            seg_cap = x1 - x0
            seg_slot = np.empty(seg_cap, np.int64)
            seg_rec = np.empty(seg_cap, np.int64)
            seg_zero = np.empty(seg_cap, np.bool_)
            w_seg = np.empty((seg_cap, L), np.float32)
            bv = np.empty((max_chunks, seg_cap, L), np.float32)
            bk = np.empty((max_chunks, seg_cap, L), np.int64)
        # (1) the sequences' matrices; records and their weights
        n_rec = 0
        n_acc = 0
        for x in range(x0, x1):
            q = seqd[run_lo[x]]
            gx = row_group[run_lo[x]]
            s = g_step[gx]
            lay = g_layer[gx]
            i = slot_of[q]
            seg_zero[x - x0] = False
            if i < 0:
                n_free -= 1
                i = free[n_free]
                slot_of[q] = i
                seq_of_slot[i] = q
                a_mat[i] = 0.0
                a_sq[i] = 0.0
                step_mark[i] = -1
                seg_zero[x - x0] = True
            seg_slot[x - x0] = i
            seg_rec[x - x0] = -1
            if step_mark[i] != s:
                # first appearance in this step: every layer's match (rows after the
                # current layer do not change this step)
                step_mark[i] = s
                seg_rec[x - x0] = n_rec
                for j in range(L):
                    w_seg[n_rec, j] = 1.0 / np.sqrt(a_sq[i, j]) if a_sq[i, j] > 0.0 else 0.0
                n_rec += 1
            for j in range(offsets[run_lo[x]], offsets[run_lo[x + 1]]):
                e = experts[j]
                a = a_mat[i, lay, e]
                a_mat[i, lay, e] = a + 1.0
                a_sq[i, lay] += 2.0 * a + 1.0
            n_acc += offsets[run_lo[x + 1]] - offsets[run_lo[x]]
        # (2) dot products and best matches, by blocks of entries
        if n_entries > 0:
            n_chunks = (n_entries + chunk - 1) // chunk
            if n_threads > 1 and n_chunks > 1 and n_chunks % n_threads:  # balance the cores
                # (a collection within one block stays one block: split in two, each block
                # would pay every run's overhead for half the entries, measured slower)
                n_chunks += n_threads - n_chunks % n_threads
            bsize = (n_entries + n_chunks - 1) // n_chunks
            bsize = (bsize + 15) // 16 * 16
            n_chunks = (n_entries + bsize - 1) // bsize
            if n_chunks > 1 and (n_acc + n_rec * L) * n_entries >= par_min:
                _blocks_parallel(n_chunks, bsize, n_entries, x0, x1, run_lo, row_group,
                                 g_layer, offsets, experts, seg_slot, seg_rec, seg_zero,
                                 w_seg, dots, ecol, inv_e, bv, bk, L, e_max, b_suffix, b_ucnt,
                                 b_ulist)  # fmt: skip
            else:
                for c in range(n_chunks):
                    _block(c, bsize, n_entries, x0, x1, run_lo, row_group, g_layer, offsets,
                           experts, seg_slot, seg_rec, seg_zero, w_seg, dots, ecol, inv_e,
                           bv, bk, L, e_max, b_suffix, b_ucnt, b_ulist)  # fmt: skip
        else:
            n_chunks = 0
        # (3) per group: merge the records' best matches
        for gg in range(ga, gb):
            lay = g_layer[gg]
            for x in range(grun_off[gg], grun_off[gg + 1]):
                i = seg_slot[x - x0]
                rec = seg_rec[x - x0]
                if rec >= 0:
                    for j in range(L):
                        vb = 0.0
                        kb = -1
                        for c in range(n_chunks):
                            if bk[c, rec, j] >= 0 and bv[c, rec, j] > vb:
                                vb = bv[c, rec, j]
                                kb = bk[c, rec, j]
                        best[i, j] = kb
                q = seqd[run_lo[x]]
                if end_group[q] == gg and fin_mark[q] < 0:
                    fin_mark[q] = gg
                    finished[n_fin] = i
                    n_fin += 1
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
            m_off[gg + 1] = n_m
        ga = gb
        if not fin_step_end[gb - 1]:
            continue
        # end of a step: its finished sequences join the collection
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
        n_fin = 0
    m_off[n_groups] = n_m
    return m_off, m_ids[:n_m].copy(), snap_eam, n_snap


@njit(cache=True, parallel=True, _nrt=False)
def _blocks_parallel(n_chunks, size, n_entries, x0, x1, run_lo, row_group, g_layer, offsets,
                     experts, seg_slot, seg_rec, seg_zero, w_seg, dots, ecol, inv_e, bv, bk,
                     n_layers, e_max, b_suffix, b_ucnt, b_ulist):  # fmt: skip
    """:func:`_block` for every block, the blocks spread over the cores (they write disjoint
    entries of ``dots`` and disjoint rows of ``bv``/``bk``)."""
    for c in prange(n_chunks):
        _block(c, size, n_entries, x0, x1, run_lo, row_group, g_layer, offsets, experts,
               seg_slot, seg_rec, seg_zero, w_seg, dots, ecol, inv_e, bv, bk, n_layers,
               e_max, b_suffix, b_ucnt, b_ulist)  # fmt: skip


@njit(**HOT)
def _block(c, size, n_entries, x0, x1, run_lo, row_group, g_layer, offsets, experts, seg_slot,
           seg_rec, seg_zero, w_seg, dots, ecol, inv_e, bv, bk, n_layers, e_max, b_suffix,
           b_ucnt, b_ulist):  # fmt: skip
    """Entries ``c * size`` .. of the collection through the runs ``x0 .. x1`` of a segment:
    a record's best match per layer among these entries (``bv``/``bk`` row ``c``: the
    highest summed cosine over the later layers, > 0, and its first entry; else -1), then the
    run's accesses move the dot products. ``b_*``: scratch rows per block (the suffix sums;
    a run's experts with counts, ``b_ucnt`` zero on entry and exit). No allocation, no
    reference counting (the views here are free)."""
    k0 = c * size
    k1 = min(n_entries, k0 + size)
    n = k1 - k0
    L = n_layers
    suffix = b_suffix[c]
    suffix_bits = suffix.view(np.int32)
    u_cnt = b_ucnt[c]
    u_list = b_ulist[c]
    for x in range(x0, x1):
        i = seg_slot[x - x0]
        if seg_zero[x - x0]:
            dots[i, :, k0:k1] = 0
        rec = seg_rec[x - x0]
        if rec >= 0:
            for k in range(n):
                suffix[k] = 0.0
            bv[c, rec, L - 1] = 0.0
            bk[c, rec, L - 1] = -1
            vb = np.int32(0)
            kb = -1
            for j in range(L - 1, 0, -1):
                w = w_seg[rec, j]
                if w > 0.0:  # else the scores, their maximum and its first entry stay
                    dr = dots[i, j, k0:k1]
                    ir = inv_e[j, k0:k1]
                    for k in range(n):
                        suffix[k] += np.float32(dr[k]) * ir[k] * w
                    # the scores are >= 0, so their bits order as int32: an integer maximum
                    # (vectorised; a float one is not), then the first entry holding it
                    vb = _max_bits(suffix_bits, n)
                    kb = k0 + _first_equal(suffix_bits, n, vb) if vb > 0 else -1
                bv[c, rec, j - 1] = suffix[kb - k0] if kb >= 0 else np.float32(0.0)
                bk[c, rec, j - 1] = kb
        lay = g_layer[row_group[run_lo[x]]]
        if lay == 0:
            continue  # row 0 of the dot products is never matched (only later layers are)
        n_u = 0
        for j in range(offsets[run_lo[x]], offsets[run_lo[x + 1]]):
            e = experts[j]
            if u_cnt[e] == 0.0:
                u_list[n_u] = e
                n_u += 1
            u_cnt[e] += 1.0
        _add_rows(dots, ecol, i, lay, u_list, u_cnt, n_u, k0, k1)
        for t in range(n_u):
            u_cnt[u_list[t]] = 0.0


@njit(inline="always", **HOT)
def _add_rows(dots, ecol, i, lay, u_list, u_cnt, n_u, k0, k1):
    """dots[i, lay, k0:k1] += sum over the listed experts of count x ecol[lay, e, k0:k1], fused
    (the common one-token case: one read of each expert's row, one write of the dot row).

    The loops run over views from index 0, so numba sees non-negative indices and LLVM
    vectorises them (with ``range(k0, k1)`` the negative-index check stays in the loop)."""
    n = k1 - k0
    d = dots[i, lay, k0:k1]
    if n_u == 6:  # top-6 models (DeepSeek, Qwen): unrolled, the hot case
        e0, e1, e2, e3, e4, e5 = u_list[0], u_list[1], u_list[2], u_list[3], u_list[4], u_list[5]
        c0, c1, c2, c3, c4, c5 = u_cnt[e0], u_cnt[e1], u_cnt[e2], u_cnt[e3], u_cnt[e4], u_cnt[e5]
        r0, r1, r2 = ecol[lay, e0, k0:k1], ecol[lay, e1, k0:k1], ecol[lay, e2, k0:k1]
        r3, r4, r5 = ecol[lay, e3, k0:k1], ecol[lay, e4, k0:k1], ecol[lay, e5, k0:k1]
        if c0 == 1.0 and c1 == 1.0 and c2 == 1.0 and c3 == 1.0 and c4 == 1.0 and c5 == 1.0:
            # one token (the decode case): 1 x r is r, so the same sums without the products
            for k in range(n):
                d[k] += r0[k] + r1[k] + r2[k] + r3[k] + r4[k] + r5[k]
            return
        for k in range(n):
            d[k] += (c0 * r0[k] + c1 * r1[k] + c2 * r2[k] + c3 * r3[k] + c4 * r4[k]
                     + c5 * r5[k])  # fmt: skip
        return
    for x in range(n_u):
        e = u_list[x]
        c = u_cnt[e]
        r = ecol[lay, e, k0:k1]
        for k in range(n):
            d[k] += c * r[k]


@njit(**HOT)
def _store(ecol, inv_e, mat, k, e_max, n_layers):
    """Entry ``k`` of the collection := ``mat``: its columns and row norms."""
    for lay in range(n_layers):
        sq = 0.0
        for e in range(e_max):
            v = mat[lay, e]
            ecol[lay, e, k] = v
            sq += v * v
        inv_e[lay, k] = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0


@njit(inline="always", **HOT)
def _first_equal(x, n, v):
    """The first ``k < n`` with ``x[k] == v`` (-1 if none), eight values per test (the eight
    comparisons of a test compile into one vector compare)."""
    k = 0
    while k + 8 <= n:
        hit = False
        for t in range(8):
            hit |= x[k + t] == v
        if hit:
            break
        k += 8
    while k < n:
        if x[k] == v:
            return k
        k += 1
    return -1


@njit(inline="always", **HOT)
def _max_bits(x, n):
    """max(0, x[:n]) of int32 values: the bits of non-negative float32 scores, which order as
    the floats do. An integer maximum compiles into vector maxima; a float maximum (numba's
    ``max`` or a select, with or without fastmath) stays scalar."""
    m = np.int32(0)
    for k in range(n):
        v = x[k]
        m = v if v > m else m
    return m


@njit(**HOT)
def _top_counts(row, n_e, top_n, top_e):
    """The ``top_n`` experts among ``row[:n_e]`` with the highest counts (> 0), highest first,
    ties in expert order; their number."""
    m = 0
    for e in range(n_e):
        v = row[e]
        if v <= 0.0:
            continue
        if m < top_n:
            y = m
            m += 1
        elif v > row[top_e[m - 1]]:
            y = m - 1
        else:
            continue
        while y > 0 and row[top_e[y - 1]] < v:
            top_e[y] = top_e[y - 1]
            y -= 1
        top_e[y] = e
    return m
