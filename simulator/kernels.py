"""The replay kernels: count mode (hits and misses only) and timed mode (discrete events).

Both walk the groups (step, layer) of the replay order and, inside a group, its accesses.
Protection stamps (``oi[:, OI_PIN]``) relative to group ``g`` with ``b = 4 * g``:
    b + 1  a member of the group not yet classified (``atomic`` protects it)
    b + 2  classified, waiting for its compute (timed mode always protects it)
    b + 3  computed (evictable only when nothing else is)
Anything below ``b + 1`` belongs to an earlier group and protects nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.dispatch import admit, observe_miss, remove, touch, victim
from policies.spec import STRUCT_NONE
from policies.state import (
    ABSENT,
    IN_FLIGHT,
    IP_CLOCK,
    IP_FUTURE,
    IP_STRUCT,
    OI_BYTES,
    OI_NEXT,
    OI_PART,
    OI_PIN,
    OI_SIZE,
    P_CAP,
    P_USED,
    PINNED,
    RESIDENT,
)
from traces._jit import HOT

BIG = np.iinfo(np.int64).max
INF = np.inf

# integer counters (cnt)
C_HITS = 0
C_MISSES = 1
C_INFLIGHT_HITS = 2
C_EVICTIONS = 3
C_FORCED = 4
C_PF_ISSUED = 5
C_PF_USED = 6
C_PF_WASTED = 7
C_PF_CANCELLED = 8
C_PF_DROPPED = 9
C_BYTES = 10
C_PF_LATE = 11
C_DEFERRED = 12
C_PF_WASTED_BYTES = 13
C_EVENTS = 14
C_PREFILL_TOKENS = 15
C_DECODE_TOKENS = 16
C_DECODE_STEPS = 17
C_PREFILL_STEPS = 18
C_PF_BYTES = 19
C_OVERFLOW = 20  # times a partition held more than its capacity (must stay 0)
N_COUNTERS = 21

# float accumulators (fl), seconds
F_TOTAL = 0
F_COMPUTE = 1
F_STALL = 2
F_LINK_BUSY = 3
F_PREFILL_TIME = 4
F_DECODE_TIME = 5
F_LATE_STALL = 6
F_DENSE = 7
N_FLOATS = 8

# hardware parameters (hw)
H_BW = 0  # bytes per second
H_LATENCY = 1  # seconds per transfer
H_ENGINES = 2  # transfers that may run at once
H_DENSE = 3  # seconds per layer per step (attention, router, dense parts)
H_DENSE_TOK = 4  # seconds per token per layer
H_EXPERT = 5  # seconds per expert launch
H_EXPERT_TOK = 6  # seconds per token routed to an expert
N_HW = 7

# event kinds
EV_DENSE = 0
EV_COMPUTE = 1
EV_DEMAND = 2
EV_PREFETCH = 3
EV_STALL = 4


# --------------------------------------------------------------------------- scratch
def count_scratch(n_obj: int):
    """Scratch arrays for :func:`replay_count` (the kernels allocate nothing themselves)."""
    return np.zeros(n_obj, np.int8), np.full(n_obj, BIG, np.int64), np.zeros(n_obj, np.float64)


def timed_scratch(n_obj: int, n_engines: int):
    """Scratch arrays for :func:`replay_timed`, in its argument order."""
    return (
        np.zeros(n_engines, np.float64),  # eng: when each copy engine is next free
        np.full(n_obj, INF, np.float64),  # arrive: arrival time of each transfer
        np.full(n_obj, BIG, np.int64),  # need_by: target group of an outstanding prefetch
        np.zeros(n_obj, np.int8),  # pf_flag: prefetched and not yet used
        np.zeros((n_obj + 1, 3), np.int64),  # pend: queued transfers (obj, class, order)
        np.zeros(n_obj + 1, np.float64),  # pend_t: their issue times
        np.zeros(n_obj, np.float64),  # m_ready: per member of a group, when it is ready
        np.zeros(n_obj, np.int8),  # m_state
        np.zeros(n_obj, np.int8),  # m_late: 1 if waiting on a late prefetch
        np.zeros(n_obj, np.int64),  # m_order: members in the order they compute
        np.zeros(n_obj, np.float64),  # xfer: transfer seconds of each expert
        np.zeros(n_obj, np.int64),  # d_obj: the group's demand misses, in access order
    )


# --------------------------------------------------------------------------- shared
@njit(inline="always", **HOT)
def _evict(status, oi, of, links, heap, nodes, parts, stash, ip, fp, v, cnt, pf_flag):
    remove(status, oi, of, links, heap, nodes, parts, ip, v)
    cnt[C_EVICTIONS] += 1
    if pf_flag[v] != 0:
        pf_flag[v] = 0
        cnt[C_PF_WASTED] += 1
        cnt[C_PF_WASTED_BYTES] += oi[v, OI_BYTES]


@njit(inline="always", **HOT)
def _make_room(
    status,
    oi,
    of,
    links,
    heap,
    nodes,
    parts,
    stash,
    ip,
    fp,
    o,
    b,
    atomic,
    timed,
    cnt,
    pf_flag,
    need_by,
    arrive,
    now,
):
    """Evict until ``o`` fits in its partition. Returns False when nothing may be evicted."""
    p = oi[o, OI_PART]
    need = oi[o, OI_SIZE]
    if need > parts[p, P_CAP]:
        return False
    while parts[p, P_USED] + need > parts[p, P_CAP]:
        if atomic:
            v = victim(
                status,
                oi,
                of,
                links,
                heap,
                nodes,
                parts,
                stash,
                ip,
                p,
                b + 1,
                b + 3,
                need_by,
                BIG - 1,
                arrive,
                now,
            )
            if v < 0:
                v = victim(
                    status,
                    oi,
                    of,
                    links,
                    heap,
                    nodes,
                    parts,
                    stash,
                    ip,
                    p,
                    b + 1,
                    b + 2,
                    need_by,
                    BIG - 1,
                    arrive,
                    now,
                )
                if v < 0 and not timed:
                    v = victim(
                        status,
                        oi,
                        of,
                        links,
                        heap,
                        nodes,
                        parts,
                        stash,
                        ip,
                        p,
                        1,
                        0,
                        need_by,
                        BIG - 1,
                        arrive,
                        now,
                    )
                if v >= 0:
                    cnt[C_FORCED] += 1
        else:
            v = victim(
                status,
                oi,
                of,
                links,
                heap,
                nodes,
                parts,
                stash,
                ip,
                p,
                b + 2,
                b + 2,
                need_by,
                BIG - 1,
                arrive,
                now,
            )
        if v < 0:
            return False
        _evict(status, oi, of, links, heap, nodes, parts, stash, ip, fp, v, cnt, pf_flag)
    return True


@njit(**HOT)
def preload(status, oi, of, links, heap, nodes, parts, stash, ip, fp, objs):
    """Make ``objs`` resident before the run (policy order = list order)."""
    for o in objs:
        p = oi[o, OI_PART]
        if status[o] == ABSENT and parts[p, P_USED] + oi[o, OI_SIZE] <= parts[p, P_CAP]:
            admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, RESIDENT)


# --------------------------------------------------------------------------- count mode
@njit(**HOT)
def replay_count(
    status,
    oi,
    of,
    links,
    heap,
    nodes,
    parts,
    stash,
    ip,
    fp,
    g_off,
    g_layer,
    obj,
    next_use,
    atomic,
    pf_off,
    pf_obj,
    reset,
    measure,
    obj_bytes,
    cnt,
    hits_layer,
    acc_layer,
    pf_flag,
    need_by,
    arrive,
):
    """Count-mode replay. ``pf_off``/``pf_obj``: experts inserted for free right before each
    group (free prefetch; empty lists for none). ``reset[g]`` True empties the cache first.
    ``measure[g]`` False replays group g without counting it (warm-up); empty = count all.
    ``pf_flag``, ``need_by``, ``arrive``: scratch from :func:`count_scratch`."""
    n_groups = g_layer.shape[0]
    n_obj = status.shape[0]
    nocache = ip[IP_STRUCT] == STRUCT_NONE
    future = ip[IP_FUTURE] != 0  # keep each expert's next-access index (Belady)
    prefetching = pf_obj.shape[0] > 0
    for g in range(n_groups):
        a0 = g_off[g]
        a1 = g_off[g + 1]
        b = 4 * g
        lay = g_layer[g]
        if reset.shape[0] > 0 and reset[g]:
            for o in range(n_obj):
                if status[o] == RESIDENT:
                    remove(status, oi, of, links, heap, nodes, parts, ip, o)
                    if pf_flag[o] != 0:  # a prefetched expert dropped unused was wasted
                        pf_flag[o] = 0
                        cnt[C_PF_WASTED] += 1
                        cnt[C_PF_WASTED_BYTES] += oi[o, OI_BYTES]
        if atomic:
            for a in range(a0, a1):
                oi[obj[a], OI_PIN] = b + 1
        if not nocache:
            for j in range(pf_off[g], pf_off[g + 1]):
                o = pf_obj[j]
                if status[o] == ABSENT:
                    if _make_room(
                        status,
                        oi,
                        of,
                        links,
                        heap,
                        nodes,
                        parts,
                        stash,
                        ip,
                        fp,
                        o,
                        b,
                        atomic,
                        False,
                        cnt,
                        pf_flag,
                        need_by,
                        arrive,
                        0.0,
                    ):
                        admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, RESIDENT)
                        pf_flag[o] = 1
                        cnt[C_PF_ISSUED] += 1
                        cnt[C_PF_BYTES] += obj_bytes[o]
                    else:
                        cnt[C_PF_DROPPED] += 1
                elif status[o] == RESIDENT:
                    touch(oi, of, links, heap, nodes, parts, ip, fp, o)
        w = 1 if measure.shape[0] == 0 or measure[g] else 0
        acc_layer[lay] += w * (a1 - a0)
        for a in range(a0, a1):
            o = obj[a]
            ip[IP_CLOCK] += 1
            if future:
                oi[o, OI_NEXT] = next_use[a]
            s = status[o]
            if s == RESIDENT:
                cnt[C_HITS] += w
                hits_layer[lay] += w
                touch(oi, of, links, heap, nodes, parts, ip, fp, o)
                if prefetching and pf_flag[o] != 0:
                    pf_flag[o] = 0
                    cnt[C_PF_USED] += 1
            elif s == PINNED:
                cnt[C_HITS] += w
                hits_layer[lay] += w
            else:
                cnt[C_MISSES] += w
                cnt[C_BYTES] += w * obj_bytes[o]
                if nocache:
                    observe_miss(oi, of, ip, fp, o)
                elif _make_room(
                    status,
                    oi,
                    of,
                    links,
                    heap,
                    nodes,
                    parts,
                    stash,
                    ip,
                    fp,
                    o,
                    b,
                    atomic,
                    False,
                    cnt,
                    pf_flag,
                    need_by,
                    arrive,
                    0.0,
                ):
                    admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, RESIDENT)
                else:
                    observe_miss(oi, of, ip, fp, o)
                if parts[oi[o, OI_PART], P_USED] > parts[oi[o, OI_PART], P_CAP]:
                    cnt[C_OVERFLOW] += 1  # only an admission can overfill a partition
            if atomic:
                oi[o, OI_PIN] = b + 3
    _unused_prefetches(status, oi, of, links, heap, nodes, parts, stash, ip, fp, pf_flag, cnt)


@njit(**HOT)
def _unused_prefetches(status, oi, of, links, heap, nodes, parts, stash, ip, fp, pf_flag, cnt):
    """Prefetched experts never used by the end of the run count as wasted."""
    for o in range(pf_flag.shape[0]):
        if pf_flag[o] != 0:
            pf_flag[o] = 0
            cnt[C_PF_WASTED] += 1
            cnt[C_PF_WASTED_BYTES] += oi[o, OI_BYTES]


# --------------------------------------------------------------------------- timed mode
@njit(inline="always", **HOT)
def _enqueue(pend, pend_t, npend, o, cls, order, t):
    """Queue a transfer of ``o`` (class 0 demand, 1 prefetch) issued at time ``t``."""
    pend[npend, 0] = o
    pend[npend, 1] = cls
    pend[npend, 2] = order
    pend_t[npend] = t
    return npend + 1


@njit(inline="always", **HOT)
def _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, kind, g, o, t0, t1):
    i = cnt[C_EVENTS]
    if i < ev_kind.shape[0]:
        ev_kind[i] = kind
        ev_grp[i] = g
        ev_obj[i] = o
        ev_t0[i] = t0
        ev_t1[i] = t1
        cnt[C_EVENTS] = i + 1


@njit(inline="always", **HOT)
def first_free(eng):
    """The copy engine free first (the lowest index among ties)."""
    e = 0
    for i in range(1, eng.shape[0]):
        if eng[i] < eng[e]:
            e = i
    return e


@njit(inline="always", **HOT)
def start_transfer(o, e, start, eng, arrive, xfer, obj_bytes, cnt, fl):
    """The transfer of ``o`` starts on copy engine ``e`` at ``start``."""
    dur = xfer[o]
    eng[e] = start + dur
    arrive[o] = start + dur
    fl[F_LINK_BUSY] += dur
    cnt[C_BYTES] += obj_bytes[o]


@njit(inline="always", **HOT)
def _advance(
    t,
    flush_demand,
    g,
    pend,
    pend_t,
    npend,
    eng,
    arrive,
    obj_bytes,
    xfer,
    cnt,
    fl,
    ev_kind,
    ev_grp,
    ev_obj,
    ev_t0,
    ev_t1,
):
    """Start queued transfers on free copy engines.

    ``pend`` rows: (object, class 0 demand / 1 prefetch, issue order); ``pend_t``: issue
    time. Without ``flush_demand``: start every transfer that can start by time ``t``. With
    it: start every queued demand transfer, whenever an engine frees (demand outranks
    prefetch).
    Returns the new queue length.
    """
    while npend > 0:
        e = first_free(eng)
        f = eng[e]
        bi = 0
        for i in range(1, npend):
            if pend[i, 1] < pend[bi, 1] or (pend[i, 1] == pend[bi, 1] and pend[i, 2] < pend[bi, 2]):
                bi = i
        if flush_demand:
            if pend[bi, 1] != 0:
                break
        elif f > t:
            break
        o = pend[bi, 0]
        start = max(f, pend_t[bi])
        start_transfer(o, e, start, eng, arrive, xfer, obj_bytes, cnt, fl)
        kind = EV_DEMAND if pend[bi, 1] == 0 else EV_PREFETCH
        _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, kind, g, o, start, arrive[o])
        npend -= 1
        pend[bi, 0] = pend[npend, 0]
        pend[bi, 1] = pend[npend, 1]
        pend[bi, 2] = pend[npend, 2]
        pend_t[bi] = pend_t[npend]
    return npend


@njit(**HOT)
def replay_timed(
    status,
    oi,
    of,
    links,
    heap,
    nodes,
    parts,
    stash,
    ip,
    fp,
    g_off,
    g_layer,
    g_step,
    g_pre,
    g_dec,
    obj,
    count,
    next_use,
    atomic,
    pf_off,
    pf_obj,
    pf_tgt,
    obj_bytes,
    hw,
    cnt,
    fl,
    hits_layer,
    acc_layer,
    stall_layer,
    ev_kind,
    ev_grp,
    ev_obj,
    ev_t0,
    ev_t1,
    eng,
    arrive,
    need_by,
    pf_flag,
    pend,
    pend_t,
    m_ready,
    m_state,
    m_late,
    m_order,
    xfer,
    d_obj,
):
    """Timed replay: a compute stream, a link of ``hw[H_ENGINES]`` copy engines, the cache.

    Per group: dense work, then the gate is known (``t_gate``); hits are ready at once, misses
    are fetched on demand (queued ahead of prefetches), experts compute one after another in
    the order they become ready; the compute stream stalls while the next expert is in flight.
    At ``t_gate`` the prefetch lists issued by this group (``pf_off``/``pf_obj`` with target
    groups ``pf_tgt``) are queued behind demand fetches.
    The last twelve arguments are scratch arrays from :func:`timed_scratch`.
    """
    n_groups = g_layer.shape[0]
    n_obj = status.shape[0]
    nocache = ip[IP_STRUCT] == STRUCT_NONE
    future = ip[IP_FUTURE] != 0  # keep each expert's next-access index (Belady)
    for o in range(n_obj):  # transfer seconds per expert
        xfer[o] = hw[H_LATENCY] + obj_bytes[o] / hw[H_BW]
    npend = 0
    seq = 0
    logging = ev_kind.shape[0] > 0
    n_dem = 0
    # m_state: 0 waiting, 1 deferred (no slot yet), 2 computed, 3 issued (read its arrival)
    for o in range(n_obj):
        if status[o] == RESIDENT or status[o] == PINNED:
            arrive[o] = 0.0
    cur = 0.0
    step_start = 0.0
    step_tokens = 0
    step_decode = True
    for g in range(n_groups):
        a0 = g_off[g]
        a1 = g_off[g + 1]
        m = a1 - a0
        b = 4 * g
        lay = g_layer[g]
        ntok = g_pre[g] + g_dec[g]
        if g == 0 or g_step[g] != g_step[g - 1]:
            if g > 0:
                _close_step(cur - step_start, step_tokens, step_decode, cnt, fl)
            step_start = cur
            step_tokens = ntok
            step_decode = g_pre[g] == 0
        # dense part of the layer, then the gate's decision is known
        dense = hw[H_DENSE] + hw[H_DENSE_TOK] * ntok
        if logging:
            _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_DENSE, g, -1, cur, cur + dense)
        fl[F_DENSE] += dense
        cur += dense
        now = cur
        npend = _advance(now, False, g, pend, pend_t, npend, eng, arrive, obj_bytes, xfer, cnt, fl,
                         ev_kind, ev_grp, ev_obj, ev_t0, ev_t1)  # fmt: skip
        if atomic:
            for a in range(a0, a1):
                oi[obj[a], OI_PIN] = b + 1
        acc_layer[lay] += m
        # classify every needed expert; issue demand fetches
        n_deferred = 0
        for a in range(a0, a1):
            k = a - a0
            o = obj[a]
            ip[IP_CLOCK] += 1
            if future:
                oi[o, OI_NEXT] = next_use[a]
            s = status[o]
            m_state[k] = 0
            m_late[k] = 0
            if s == PINNED or (s == RESIDENT) or (s == IN_FLIGHT and arrive[o] <= now):
                cnt[C_HITS] += 1
                hits_layer[lay] += 1
                m_ready[k] = now
                if s != PINNED:
                    touch(oi, of, links, heap, nodes, parts, ip, fp, o)
                if pf_flag[o] != 0:
                    pf_flag[o] = 0
                    cnt[C_PF_USED] += 1
            elif s == IN_FLIGHT and not nocache:
                cnt[C_INFLIGHT_HITS] += 1
                touch(oi, of, links, heap, nodes, parts, ip, fp, o)
                m_ready[k] = -1.0  # read arrive[o] after the demand flush
                if pf_flag[o] != 0:
                    pf_flag[o] = 0
                    cnt[C_PF_USED] += 1
                    cnt[C_PF_LATE] += 1
                    m_late[k] = 1
                if arrive[o] == INF:  # still queued: it is now a demand fetch
                    for i in range(npend):
                        if pend[i, 0] == o:
                            pend[i, 1] = 0
            else:
                cnt[C_MISSES] += 1
                m_ready[k] = -1.0
                if nocache:
                    observe_miss(oi, of, ip, fp, o)
                    status[o] = IN_FLIGHT
                    ok = True
                else:
                    ok = _make_room(
                        status,
                        oi,
                        of,
                        links,
                        heap,
                        nodes,
                        parts,
                        stash,
                        ip,
                        fp,
                        o,
                        b,
                        atomic,
                        True,
                        cnt,
                        pf_flag,
                        need_by,
                        arrive,
                        now,
                    )
                    if ok:
                        admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, IN_FLIGHT)
                if ok:
                    arrive[o] = INF
                    d_obj[n_dem] = o  # started at the flush, after the queued demand fetches
                    n_dem += 1
                    seq += 1
                else:
                    m_state[k] = 1
                    n_deferred += 1
                    cnt[C_DEFERRED] += 1
            if need_by[o] <= g:
                need_by[o] = BIG
            oi[o, OI_PIN] = b + 2
            if not nocache and parts[oi[o, OI_PART], P_USED] > parts[oi[o, OI_PART], P_CAP]:
                cnt[C_OVERFLOW] += 1
        # queued prefetches aimed at this group or earlier that it did not need: drop them
        i = 0
        while i < npend:
            o = pend[i, 0]
            if pend[i, 1] == 1 and need_by[o] <= g:
                npend -= 1
                pend[i, 0] = pend[npend, 0]
                pend[i, 1] = pend[npend, 1]
                pend[i, 2] = pend[npend, 2]
                pend_t[i] = pend_t[npend]
                remove(status, oi, of, links, heap, nodes, parts, ip, o)
                arrive[o] = INF
                need_by[o] = BIG
                pf_flag[o] = 0
                cnt[C_PF_CANCELLED] += 1
            else:
                i += 1
        npend = _advance(now, True, g, pend, pend_t, npend, eng, arrive, obj_bytes, xfer, cnt, fl,
                         ev_kind, ev_grp, ev_obj, ev_t0, ev_t1)  # fmt: skip
        # this group's misses, issued after every queued demand fetch: each starts on the copy
        # engine free first, in access order (what the queue would do, without scanning it)
        for x in range(n_dem):
            o = d_obj[x]
            e = first_free(eng)
            start = max(eng[e], now)
            start_transfer(o, e, start, eng, arrive, xfer, obj_bytes, cnt, fl)
            if logging:
                _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_DEMAND, g, o, start,
                     arrive[o])  # fmt: skip
        n_dem = 0
        for k in range(m):
            if m_ready[k] < 0.0 and m_state[k] == 0:
                m_ready[k] = arrive[obj[a0 + k]]
        # prefetches issued at this gate, queued behind the demand fetches
        if not nocache:
            for j in range(pf_off[g], pf_off[g + 1]):
                o = pf_obj[j]
                tgt = pf_tgt[j]
                if status[o] == ABSENT:
                    p = oi[o, OI_PART]
                    ok = oi[o, OI_SIZE] <= parts[p, P_CAP]
                    while ok and parts[p, P_USED] + oi[o, OI_SIZE] > parts[p, P_CAP]:
                        v = victim(
                            status,
                            oi,
                            of,
                            links,
                            heap,
                            nodes,
                            parts,
                            stash,
                            ip,
                            p,
                            b + 1,
                            b + 3,
                            need_by,
                            tgt,
                            arrive,
                            now,
                        )
                        if v < 0:
                            ok = False
                        else:
                            _evict(
                                status,
                                oi,
                                of,
                                links,
                                heap,
                                nodes,
                                parts,
                                stash,
                                ip,
                                fp,
                                v,
                                cnt,
                                pf_flag,
                            )
                    if ok:
                        admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, IN_FLIGHT)
                        arrive[o] = INF
                        need_by[o] = tgt
                        pf_flag[o] = 1
                        cnt[C_PF_ISSUED] += 1
                        cnt[C_PF_BYTES] += obj_bytes[o]
                        npend = _enqueue(pend, pend_t, npend, o, 1, seq, now)
                        seq += 1
                    else:
                        cnt[C_PF_DROPPED] += 1
                elif tgt < need_by[o]:
                    need_by[o] = tgt
        # compute the experts in the order they become ready
        done = 0
        if n_deferred == 0:
            # common case: every ready time is known; a stable insertion sort (nearly sorted)
            for k in range(m):
                j = k
                while j > 0 and m_ready[m_order[j - 1]] > m_ready[k]:
                    m_order[j] = m_order[j - 1]
                    j -= 1
                m_order[j] = k
            for idx in range(m):
                k = m_order[idx]
                o = obj[a0 + k]
                start = max(cur, m_ready[k])
                if start > cur:
                    fl[F_STALL] += start - cur
                    stall_layer[lay] += start - cur
                    if m_late[k] != 0:
                        fl[F_LATE_STALL] += start - cur
                    if logging:
                        _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_STALL, g, o, cur,
                             start)  # fmt: skip
                dur = hw[H_EXPERT] + hw[H_EXPERT_TOK] * count[a0 + k]
                if logging:
                    _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_COMPUTE, g, o, start,
                         start + dur)  # fmt: skip
                cur = start + dur
                fl[F_COMPUTE] += dur
                m_state[k] = 2
                oi[o, OI_PIN] = b + 3
                if nocache:
                    status[o] = ABSENT
                    arrive[o] = INF
            done = m
        while done < m:
            best = -1
            for k in range(m):
                if m_state[k] == 0 and (best < 0 or m_ready[k] < m_ready[best]):
                    best = k
            if best < 0:
                # every remaining expert waits for a slot that nothing can give up yet:
                # cancel queued prefetches, else wait for the earliest transfer to land
                freed = False
                i = 0
                while i < npend:
                    o = pend[i, 0]
                    if pend[i, 1] == 1:
                        npend -= 1
                        pend[i, 0] = pend[npend, 0]
                        pend[i, 1] = pend[npend, 1]
                        pend[i, 2] = pend[npend, 2]
                        pend_t[i] = pend_t[npend]
                        remove(status, oi, of, links, heap, nodes, parts, ip, o)
                        arrive[o] = INF
                        need_by[o] = BIG
                        pf_flag[o] = 0
                        cnt[C_PF_CANCELLED] += 1
                        freed = True
                    else:
                        i += 1
                if not freed:
                    t_land = INF
                    for o in range(n_obj):
                        if status[o] == IN_FLIGHT and arrive[o] > cur and arrive[o] < t_land:
                            t_land = arrive[o]
                    if t_land == INF:
                        break
                    fl[F_STALL] += t_land - cur
                    stall_layer[lay] += t_land - cur
                    _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_STALL, g, -1, cur, t_land)
                    cur = t_land
                npend, n_deferred = _issue_deferred(
                    status, oi, of, links, heap, nodes, parts, stash, ip, fp,
                    g, b, atomic, cur, obj, a0, m, m_state, m_ready, n_deferred, pend,
                    pend_t, npend, seq, eng, arrive, need_by, pf_flag, obj_bytes, hw, xfer, cnt, fl,
                    ev_kind, ev_grp, ev_obj, ev_t0, ev_t1,
                )  # fmt: skip
                seq += m
                continue
            o = obj[a0 + best]
            start = max(cur, m_ready[best])
            if start > cur:
                fl[F_STALL] += start - cur
                stall_layer[lay] += start - cur
                if m_late[best] != 0:
                    fl[F_LATE_STALL] += start - cur
                _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_STALL, g, o, cur, start)
            dur = hw[H_EXPERT] + hw[H_EXPERT_TOK] * count[a0 + best]
            _log(ev_kind, ev_grp, ev_obj, ev_t0, ev_t1, cnt, EV_COMPUTE, g, o, start, start + dur)
            cur = start + dur
            fl[F_COMPUTE] += dur
            m_state[best] = 2
            done += 1
            oi[o, OI_PIN] = b + 3
            if nocache:
                status[o] = ABSENT
                arrive[o] = INF
            if n_deferred > 0:
                # a computed expert may now give up its slot: fetch the deferred experts
                npend, n_deferred = _issue_deferred(
                    status, oi, of, links, heap, nodes, parts, stash, ip, fp,
                    g, b, atomic, cur, obj, a0, m, m_state, m_ready, n_deferred, pend,
                    pend_t, npend, seq, eng, arrive, need_by, pf_flag, obj_bytes, hw, xfer, cnt, fl,
                    ev_kind, ev_grp, ev_obj, ev_t0, ev_t1,
                )  # fmt: skip
                seq += m
    if n_groups > 0:
        _close_step(cur - step_start, step_tokens, step_decode, cnt, fl)
    _unused_prefetches(status, oi, of, links, heap, nodes, parts, stash, ip, fp, pf_flag, cnt)
    fl[F_TOTAL] = cur
    fl[F_COMPUTE] += fl[F_DENSE]


@njit(**HOT)
def _close_step(dur, tokens, decode, cnt, fl):
    if decode:
        fl[F_DECODE_TIME] += dur
        cnt[C_DECODE_TOKENS] += tokens
        cnt[C_DECODE_STEPS] += 1
    else:
        fl[F_PREFILL_TIME] += dur
        cnt[C_PREFILL_TOKENS] += tokens
        cnt[C_PREFILL_STEPS] += 1


@njit(**HOT)
def _issue_deferred(
    status,
    oi,
    of,
    links,
    heap,
    nodes,
    parts,
    stash,
    ip,
    fp,
    g,
    b,
    atomic,
    cur,
    obj,
    a0,
    m,
    m_state,
    m_ready,
    n_deferred,
    pend,
    pend_t,
    npend,
    seq,
    eng,
    arrive,
    need_by,
    pf_flag,
    obj_bytes,
    hw,
    xfer,
    cnt,
    fl,
    ev_kind,
    ev_grp,
    ev_obj,
    ev_t0,
    ev_t1,
):
    """Fetch deferred experts of the group (in access order) for which a slot can be freed."""
    npend = _advance(cur, False, g, pend, pend_t, npend, eng, arrive, obj_bytes, xfer, cnt, fl,
                     ev_kind, ev_grp, ev_obj, ev_t0, ev_t1)  # fmt: skip
    issued = False
    for k in range(m):
        if m_state[k] != 1:
            continue
        od = obj[a0 + k]
        if not _make_room(
            status,
            oi,
            of,
            links,
            heap,
            nodes,
            parts,
            stash,
            ip,
            fp,
            od,
            b,
            atomic,
            True,
            cnt,
            pf_flag,
            need_by,
            arrive,
            cur,
        ):
            break
        admit(status, oi, of, links, heap, nodes, parts, ip, fp, od, IN_FLIGHT)
        arrive[od] = INF
        npend = _enqueue(pend, pend_t, npend, od, 0, seq + k, cur)
        m_state[k] = 3  # issued, ready time read after the flush
        n_deferred -= 1
        issued = True
    if issued:
        npend = _advance(cur, True, g, pend, pend_t, npend, eng, arrive, obj_bytes, xfer, cnt, fl,
                         ev_kind, ev_grp, ev_obj, ev_t0, ev_t1)  # fmt: skip
        for k in range(m):
            if m_state[k] == 3:
                m_ready[k] = arrive[obj[a0 + k]]
                m_state[k] = 0
    return npend, n_deferred
