"""Timed-mode fast path for LRU, FIFO and in-cache LFU: the same result record, faster.

:func:`simulator.kernels.replay_timed` serves every policy through the general request path:
the policy hook and structure dispatch on every use, per-object rows of the cache state, a
protection stamp kept in that row, the event log's checks. On one pool of unit-size experts
(global scope with a slot budget, the common configuration) this loop keeps only what these
three policies need: for LRU and FIFO an intrusive doubly linked list in two int32 arrays, for
LFU count buckets (one first-in-first-out list per use count, in count order, as
:mod:`policies.structures` keeps them), and a status byte per expert. It runs the same
discrete-event model, step for step and addition for addition, so every counter and every float
of the result record is identical (tests/test_fast_timed.py compares the records field by
field, prefetching included).

The link's queue is simpler here too. The general kernel keeps one unordered queue and picks
the next transfer by (demand first, then issue order) with a scan. Here a group's misses start
at its flush in access order; the queued prefetches sit in a first-in-first-out array (they are
issued in order). Those a group turns into demand fetches start first at its flush, oldest
first, and those aimed at a group that has passed are dropped while the array is compacted.
That is the order the general queue yields.

It gives up, and :func:`simulator.engine.run` replays with the general kernel instead, where a
demand miss finds no expert it may evict (the general kernel then defers the fetch until a
slot frees, which this loop does not model); :func:`replay` returns False then and has changed
only its scratch arrays and the counters it was given, which the engine zeroes again.

:func:`applies` decides; ``MOESIM_FAST_TIMED=0`` or ``ENABLED = False`` forces the general
kernel (to compare the two), as ``MOESIM_FAST_COUNT`` does for count mode.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from policies import lfu
from policies import moe_infinity as mi_policy
from policies.spec import PolicySpec
from policies.state import ABSENT, IN_FLIGHT, OI_SIZE, P_CAP, P_USED, PINNED, RESIDENT, CacheState
from simulator import fast_mi
from simulator import kernels as K
from simulator.fast_count import LIST_POLICIES, _push_front, _unlink
from simulator.fast_mi import evictable as _evictable
from traces._jit import HOT

#: Policies kept in count buckets here (in-cache LFU, first in first out among equal counts),
#: exactly as :mod:`policies.structures` keeps them.
BUCKET_POLICIES = {lfu.PID}

#: MoE-Infinity's activation-aware eviction, kept per layer by :mod:`simulator.fast_mi`.
RANKED_POLICIES = {mi_policy.PID}

#: False forces the general kernel (also: MOESIM_FAST_TIMED=0 in the environment).
ENABLED = os.environ.get("MOESIM_FAST_TIMED", "1") != "0"

BIG = K.BIG
INF = K.INF
H_BW, H_LATENCY, H_DENSE, H_DENSE_TOK = K.H_BW, K.H_LATENCY, K.H_DENSE, K.H_DENSE_TOK
H_EXPERT, H_EXPERT_TOK = K.H_EXPERT, K.H_EXPERT_TOK


def applies(spec: PolicySpec, st: CacheState, n_events: int) -> bool:
    """Whether :func:`replay` may serve this timed run: LRU, FIFO or in-cache LFU without a
    ``prepare`` hook, one partition of unit-size experts with room for one, nothing admitted
    yet (pinned experts are fine), no event log."""
    ranked = spec.pid in RANKED_POLICIES
    return (
        ENABLED
        and n_events == 0
        and (spec.pid in LIST_POLICIES or spec.pid in BUCKET_POLICIES or ranked)
        and spec.prepare is None
        and (spec.attach is None or (ranked and fast_mi.exact_for(st)))
        and st.parts.shape[0] == 1
        and bool(np.all(st.oi[:, OI_SIZE] == 1))
        and int(st.parts[0, P_CAP]) >= 1
        and not bool(np.any(st.status == RESIDENT))
    )


def replay(st, spec, acc, atomic, pf_off, pf_obj, pf_tgt, obj_bytes, hw, cnt, fl, hits_layer,
           acc_layer, stall_layer, scratch) -> bool:  # fmt: skip
    """Timed replay of LRU, FIFO or LFU: the arguments of :func:`simulator.kernels.replay_timed`
    less the policy state (read from ``st``, not changed) and the event log. Adds to the
    counters as the general kernel does and returns True, or returns False (see the module)."""
    n_obj = st.num_objects
    status = np.where(st.status == PINNED, PINNED, ABSENT).astype(np.int8)
    prv = np.full(n_obj + 1, n_obj, np.int32)
    nxt = np.full(n_obj + 1, n_obj, np.int32)
    kind = 1 if spec.pid in BUCKET_POLICIES else 2 if spec.pid in RANKED_POLICIES else 0
    mi = fast_mi.new_state(st, acc.num_groups) if kind == 2 else fast_mi.dummy_state()
    ol = np.full((n_obj, 3), -1, np.int64)  # buckets: per expert prev, next, node
    nd = np.full((n_obj + 2, 5), -1, np.int64)  # per node count, head, tail, next, prev
    sent = n_obj + 1  # the sentinel node (count -1); its head field holds the free list
    nd[:sent, 3] = np.arange(1, sent + 1)
    nd[sent, 1] = 0
    nd[sent, 3] = sent
    nd[sent, 4] = sent
    pin = np.full(n_obj, -1, np.int64)
    hits_obj = np.zeros(n_obj, np.int64)
    eng, arrive, need_by, pf_flag, _, _, m_ready, _, m_late, m_order, xfer, d_obj = scratch
    q_obj = np.empty(n_obj + 1, np.int64)  # queued prefetches, oldest first
    q_t = np.empty(n_obj + 1, np.float64)
    r_obj = np.empty(n_obj + 1, np.int64)  # queued prefetches a group turned into demand
    r_t = np.empty(n_obj + 1, np.float64)
    qstate = np.zeros(n_obj, np.int8)  # 1 queued prefetch, 2 turned into demand
    ok = _replay(acc.group_offsets, acc.group_layer, acc.group_step, acc.group_prefill,
                 acc.group_decode, acc.obj, acc.count, atomic, LIST_POLICIES.get(spec.pid, False),
                 kind, ol, nd, sent, mi, pf_off,
                 pf_obj, pf_tgt, obj_bytes, hw, cnt, fl, acc_layer, stall_layer, status, prv,
                 nxt, pin, int(st.parts[0, P_USED]), int(st.parts[0, P_CAP]), hits_obj, eng,
                 arrive, need_by, pf_flag, q_obj, q_t, r_obj, r_t, qstate,
                 m_ready, m_late, m_order, xfer, d_obj, np.zeros(3, np.int64))  # fmt: skip
    if ok:
        np.add.at(hits_layer, acc.obj_layer, hits_obj)
    return ok


@njit(inline="always", **HOT)
def _victim(kind, status, prv, ol, nd, sent, mi, pin, need_by, arrive, s, pin_lo, pin_hi,
            need_limit, g, now, cur):  # fmt: skip
    """The first evictable expert in eviction order, or -1: from the list's eviction end, or
    from the lowest count's oldest expert up (as :func:`policies.dispatch.victim`), or
    MoE-Infinity's lowest priority at group ``g`` of layer ``cur`` (:mod:`simulator.fast_mi`)."""
    if kind == 2:
        return fast_mi.victim(mi, status, pin, need_by, arrive, pin_lo, pin_hi, need_limit, g,
                              now, cur)  # fmt: skip
    if kind == 0:
        c = prv[s]
        while c != s:
            if _evictable(status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now):
                return c
            c = prv[c]
        return -1
    n = nd[sent, 3]
    while n != sent:
        c = nd[n, 1]
        while c >= 0:
            if _evictable(status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now):
                return c
            c = ol[c, 1]
        n = nd[n, 3]
    return -1


@njit(inline="always", **HOT)
def _node_new(nd, sent, count, after):
    """A node from the free list for ``count``, linked right after node ``after``."""
    n = nd[sent, 1]
    nd[sent, 1] = nd[n, 3]
    nd[n, 0] = count
    nd[n, 1] = -1
    nd[n, 2] = -1
    nx = nd[after, 3]
    nd[n, 4] = after
    nd[n, 3] = nx
    nd[nx, 4] = n
    nd[after, 3] = n
    return n


@njit(inline="always", **HOT)
def _b_append(ol, nd, n, o):
    """``o`` joins node ``n``'s bucket as its newest."""
    t = nd[n, 2]
    ol[o, 0] = t
    ol[o, 1] = -1
    if t >= 0:
        ol[t, 1] = o
    else:
        nd[n, 1] = o
    nd[n, 2] = o
    ol[o, 2] = n


@njit(inline="always", **HOT)
def _b_unlink(ol, nd, sent, o):
    """``o`` leaves its bucket; an emptied node goes back to the free list."""
    n = ol[o, 2]
    pr = ol[o, 0]
    nx = ol[o, 1]
    if pr >= 0:
        ol[pr, 1] = nx
    else:
        nd[n, 1] = nx
    if nx >= 0:
        ol[nx, 0] = pr
    else:
        nd[n, 2] = pr
    if nd[n, 1] < 0:
        p = nd[n, 4]
        q = nd[n, 3]
        nd[p, 3] = q
        nd[q, 4] = p
        nd[n, 3] = nd[sent, 1]
        nd[sent, 1] = n


@njit(inline="always", **HOT)
def _touch(kind, move_on_hit, s, prv, nxt, ol, nd, sent, mi, o):
    """A use of the cached ``o``: to the list's recent end (LRU), or one count up, newest
    there (LFU), or the most recent in its layer's ranking (MoE-Infinity)."""
    if kind == 2:
        fast_mi.touch(mi, o)
        return
    if kind == 0:
        if move_on_hit and nxt[s] != o:
            _unlink(prv, nxt, o)
            _push_front(prv, nxt, s, o)
        return
    n = ol[o, 2]
    m = nd[n, 3]
    if nd[m, 0] != nd[n, 0] + 1:
        m = _node_new(nd, sent, nd[n, 0] + 1, n)
    _b_unlink(ol, nd, sent, o)
    _b_append(ol, nd, m, o)


@njit(inline="always", **HOT)
def _admit(kind, s, prv, nxt, ol, nd, sent, mi, o):
    """``o`` enters: the list's recent end, or count 1, newest there, or its layer's ranking."""
    if kind == 2:
        fast_mi.admit(mi, o)
        return
    if kind == 0:
        _push_front(prv, nxt, s, o)
        return
    n = nd[sent, 3]
    if nd[n, 0] != 1:
        n = _node_new(nd, sent, 1, sent)
    _b_append(ol, nd, n, o)


@njit(inline="always", **HOT)
def _evict(kind, prv, nxt, ol, nd, sent, mi, status, pf_flag, obj_bytes, tally, v):
    """Evict ``v``; ``tally``: evictions, prefetches wasted, their bytes."""
    _remove(kind, prv, nxt, ol, nd, sent, mi, v)
    status[v] = ABSENT
    tally[0] += 1
    if pf_flag[v] != 0:
        pf_flag[v] = 0
        tally[1] += 1
        tally[2] += obj_bytes[v]


@njit(inline="always", **HOT)
def _remove(kind, prv, nxt, ol, nd, sent, mi, o):
    """``o`` leaves the cache (an eviction or a cancelled prefetch)."""
    if kind == 2:
        fast_mi.remove(mi, o)
    elif kind == 0:
        _unlink(prv, nxt, o)
    else:
        _b_unlink(ol, nd, sent, o)


@njit(**HOT)
def _replay(g_off, g_layer, g_step, g_pre, g_dec, obj, count, atomic, move_on_hit, kind, ol, nd,
            sent, mi, pf_off, pf_obj, pf_tgt, obj_bytes, hw, cnt, fl, acc_layer, stall_layer,
            status, prv, nxt, pin, used,
            cap, hits_obj, eng, arrive, need_by, pf_flag, q_obj, q_t, r_obj, r_t,
            qstate, m_ready, m_late, m_order,
            xfer, d_obj, tally):  # fmt: skip
    """The loop of :func:`simulator.kernels.replay_timed` for a list policy on one pool of
    unit-size experts (``used``/``cap``: the pool's use, pinned experts included, and
    capacity; ``prv``/``nxt``: the list, sentinel at index O, most recent after it). Hits are
    tallied per expert in ``hits_obj``. Returns False where a demand miss finds no victim."""
    n_groups = g_layer.shape[0]
    n_obj = status.shape[0]
    s = n_obj
    for o in range(n_obj):
        xfer[o] = hw[H_LATENCY] + obj_bytes[o] / hw[H_BW]
        if status[o] == PINNED:
            arrive[o] = 0.0
    qh = 0  # the queue: q_*[qh:qt]
    qt = 0
    n_rec = 0  # r_*[:n_rec]
    cur = 0.0
    step_start = 0.0
    step_tokens = 0
    step_decode = True
    f_dense = 0.0
    f_compute = 0.0
    f_stall = 0.0
    f_late = 0.0
    hits = 0
    misses = 0
    inflight_hits = 0
    forced = 0
    pf_used = 0
    pf_late = 0
    pf_cancelled = 0
    pf_issued = 0
    pf_bytes = 0
    pf_dropped = 0
    e_expert = hw[H_EXPERT]
    e_tok = hw[H_EXPERT_TOK]
    n_dem = 0
    for g in range(n_groups):
        a0 = g_off[g]
        a1 = g_off[g + 1]
        m = a1 - a0
        b = 4 * g
        lay = g_layer[g]
        ntok = g_pre[g] + g_dec[g]
        if g == 0 or g_step[g] != g_step[g - 1]:
            if g > 0:
                K._close_step(cur - step_start, step_tokens, step_decode, cnt, fl)
            step_start = cur
            step_tokens = ntok
            step_decode = g_pre[g] == 0
        dense = hw[H_DENSE] + hw[H_DENSE_TOK] * ntok
        f_dense += dense
        cur += dense
        now = cur
        # queued prefetches that an engine could start by now (oldest first)
        while qh < qt:
            e = K.first_free(eng)
            f = eng[e]
            if f > now:
                break
            o = q_obj[qh]
            start = max(f, q_t[qh])
            K.start_transfer(o, e, start, eng, arrive, xfer, obj_bytes, cnt, fl)
            qstate[o] = 0
            qh += 1
        if atomic:
            for a in range(a0, a1):
                pin[obj[a]] = b + 1
        acc_layer[lay] += m
        # classify every needed expert; issue demand fetches
        for a in range(a0, a1):
            k = a - a0
            o = obj[a]
            so = status[o]
            m_late[k] = 0
            if so == PINNED or so == RESIDENT or (so == IN_FLIGHT and arrive[o] <= now):
                hits_obj[o] += 1
                m_ready[k] = now
                if so != PINNED:
                    _touch(kind, move_on_hit, s, prv, nxt, ol, nd, sent, mi, o)
                if pf_flag[o] != 0:
                    pf_flag[o] = 0
                    pf_used += 1
            elif so == IN_FLIGHT:
                inflight_hits += 1
                _touch(kind, move_on_hit, s, prv, nxt, ol, nd, sent, mi, o)
                m_ready[k] = -1.0
                if pf_flag[o] != 0:
                    pf_flag[o] = 0
                    pf_used += 1
                    pf_late += 1
                    m_late[k] = 1
                if qstate[o] == 1:  # still queued: it is now a demand fetch
                    qstate[o] = 2
            else:
                misses += 1
                m_ready[k] = -1.0
                if used >= cap:
                    if atomic:
                        v = _victim(kind, status, prv, ol, nd, sent, mi, pin, need_by, arrive,
                                    s, b + 1, b + 3, BIG - 1, g, now, lay)  # fmt: skip
                        if v < 0:
                            v = _victim(kind, status, prv, ol, nd, sent, mi, pin, need_by,
                                        arrive, s, b + 1, b + 2, BIG - 1, g, now, lay)  # fmt: skip
                            if v >= 0:
                                forced += 1
                    else:
                        v = _victim(kind, status, prv, ol, nd, sent, mi, pin, need_by, arrive,
                                    s, b + 2, b + 2, BIG - 1, g, now, lay)  # fmt: skip
                    if v < 0:
                        return False  # the general kernel defers this fetch
                    _evict(kind, prv, nxt, ol, nd, sent, mi, status, pf_flag, obj_bytes, tally,
                           v)  # fmt: skip
                    used -= 1
                status[o] = IN_FLIGHT
                used += 1
                _admit(kind, s, prv, nxt, ol, nd, sent, mi, o)
                arrive[o] = INF
                d_obj[n_dem] = o  # started at the flush, after the queued demand fetches
                n_dem += 1
            if need_by[o] <= g:
                need_by[o] = BIG
            pin[o] = b + 2
        # queued prefetches aimed at this group or earlier that it did not need: drop them;
        # those it needs (now demand fetches) move to r_* (the queue stays oldest first)
        w = 0
        for i in range(qh, qt):
            o = q_obj[i]
            if qstate[o] == 2:
                r_obj[n_rec] = o
                r_t[n_rec] = q_t[i]
                n_rec += 1
                qstate[o] = 0
            elif need_by[o] <= g:
                qstate[o] = 0
                _remove(kind, prv, nxt, ol, nd, sent, mi, o)
                status[o] = ABSENT
                used -= 1
                arrive[o] = INF
                need_by[o] = BIG
                pf_flag[o] = 0
                pf_cancelled += 1
            else:
                q_obj[w] = o
                q_t[w] = q_t[i]
                w += 1
        qh = 0
        qt = w
        # demand fetches start, oldest first: the queued prefetches this group needs, then its
        # misses in access order (all issued later), each on the copy engine free first
        for x in range(n_rec):
            e = K.first_free(eng)
            K.start_transfer(
                r_obj[x], e, max(eng[e], r_t[x]), eng, arrive, xfer, obj_bytes, cnt, fl
            )
        n_rec = 0
        for x in range(n_dem):
            e = K.first_free(eng)
            start = max(eng[e], now)
            K.start_transfer(d_obj[x], e, start, eng, arrive, xfer, obj_bytes, cnt, fl)
        n_dem = 0
        for k in range(m):
            if m_ready[k] < 0.0:
                m_ready[k] = arrive[obj[a0 + k]]
        # prefetches issued at this gate, queued behind the demand fetches
        for j in range(pf_off[g], pf_off[g + 1]):
            o = pf_obj[j]
            tgt = pf_tgt[j]
            if status[o] == ABSENT:
                ok = True
                if used >= cap:
                    v = _victim(kind, status, prv, ol, nd, sent, mi, pin, need_by, arrive, s,
                                b + 1, b + 3, tgt, g, now, lay)  # fmt: skip
                    if v < 0:
                        ok = False
                    else:
                        _evict(kind, prv, nxt, ol, nd, sent, mi, status, pf_flag, obj_bytes,
                               tally, v)  # fmt: skip
                        used -= 1
                if ok:
                    status[o] = IN_FLIGHT
                    used += 1
                    _admit(kind, s, prv, nxt, ol, nd, sent, mi, o)
                    arrive[o] = INF
                    need_by[o] = tgt
                    pf_flag[o] = 1
                    pf_issued += 1
                    pf_bytes += obj_bytes[o]
                    q_obj[qt] = o
                    q_t[qt] = now
                    qstate[o] = 1
                    qt += 1
                else:
                    pf_dropped += 1
            elif tgt < need_by[o]:
                need_by[o] = tgt
        # compute the experts in the order they become ready (a stable insertion sort)
        for k in range(m):
            j = k
            while j > 0 and m_ready[m_order[j - 1]] > m_ready[k]:
                m_order[j] = m_order[j - 1]
                j -= 1
            m_order[j] = k
        for idx in range(m):
            k = m_order[idx]
            start = max(cur, m_ready[k])
            if start > cur:
                f_stall += start - cur
                stall_layer[lay] += start - cur
                if m_late[k] != 0:
                    f_late += start - cur
            dur = e_expert + e_tok * count[a0 + k]
            cur = start + dur
            f_compute += dur
            pin[obj[a0 + k]] = b + 3
    if n_groups > 0:
        K._close_step(cur - step_start, step_tokens, step_decode, cnt, fl)
    for o in range(n_obj):  # prefetched experts never used by the end count as wasted
        if pf_flag[o] != 0:
            pf_flag[o] = 0
            tally[1] += 1
            tally[2] += obj_bytes[o]
    for o in range(n_obj):
        hits += hits_obj[o]
    cnt[K.C_HITS] += hits
    cnt[K.C_MISSES] += misses
    cnt[K.C_INFLIGHT_HITS] += inflight_hits
    cnt[K.C_EVICTIONS] += tally[0]
    cnt[K.C_FORCED] += forced
    cnt[K.C_PF_USED] += pf_used
    cnt[K.C_PF_LATE] += pf_late
    cnt[K.C_PF_WASTED] += tally[1]
    cnt[K.C_PF_WASTED_BYTES] += tally[2]
    cnt[K.C_PF_CANCELLED] += pf_cancelled
    cnt[K.C_PF_ISSUED] += pf_issued
    cnt[K.C_PF_BYTES] += pf_bytes
    cnt[K.C_PF_DROPPED] += pf_dropped
    fl[K.F_STALL] += f_stall
    fl[K.F_LATE_STALL] += f_late
    fl[K.F_DENSE] += f_dense
    fl[K.F_TOTAL] = cur
    fl[K.F_COMPUTE] += f_compute
    fl[K.F_COMPUTE] += fl[K.F_DENSE]
    return True
