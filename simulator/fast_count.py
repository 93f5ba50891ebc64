"""Count-mode fast path for the list policies (LRU, FIFO): the same result record, faster.

:func:`simulator.kernels.replay_count` serves every policy through the general request path
(the policy hook, per-object rows of the cache state, protection stamps and clocks kept for
every policy). LRU and FIFO need much less: an intrusive doubly linked list per partition in
two int32 arrays, a status byte and a protection stamp per expert. Three kernels here replay
count mode on just that and give every counter of the result record exactly as the general
kernel does (tests/test_fast_count.py compares the records field by field):

- :func:`_pool_sequential` and :func:`_pool_atomic`: the common configuration, one pool of
  unit-size experts (global scope, a slot budget), no free prefetch, resets or warm-up mask;
  pinned experts allowed. About 2.5x the general kernel on the DeepSeek-V2-Lite training set
  (benchmarks/README.md, "Throughput").
- :func:`replay_list`: everything else: per-layer partitions, byte budgets, free-prefetch
  lists, cache resets and warm-up (measure) masks, step-layers without accesses.

Hits and misses are tallied per expert and summed per layer at the end (an expert belongs to
one layer), so the loops keep no per-group counters.

:func:`simulator.engine.run` takes this path when :func:`applies` says so (LRU or FIFO, count
mode, no ``prepare`` hook) and the general kernel otherwise. ``ENABLED = False``, the
environment variable ``MOESIM_FAST_COUNT=0`` or ``with general_kernel():`` forces the general
kernel, to compare the two.

Atomic access: victims are chosen as the general kernel chooses them: the first expert from
the eviction end that is not a member of the current group (``stamp`` at most ``b``, where
``b`` grows by 2 per group); failing that (a forced eviction), the first member already used
(``b + 2``) rather than one still to come (``b + 1``); failing that the eviction end.
:func:`replay_list` stamps a member ``b + 2`` as it is used; :func:`_pool_atomic` stamps the
group's used members only when an eviction has to be forced.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from numba import njit

from policies import fifo, lru
from policies.spec import PolicySpec
from policies.state import ABSENT, OI_PART, OI_SIZE, P_CAP, P_USED, PINNED, RESIDENT, CacheState
from simulator import kernels as K
from traces._jit import HOT

#: Policies served here: policy id -> whether a hit moves the expert to the recent end.
#: A list policy belongs here only if its ``on_access`` hook does nothing (the order of its
#: list is all its state).
LIST_POLICIES = {lru.PID: True, fifo.PID: False}

#: False forces the general kernel (also: MOESIM_FAST_COUNT=0 in the environment).
ENABLED = os.environ.get("MOESIM_FAST_COUNT", "1") != "0"


@contextlib.contextmanager
def general_kernel():
    """Within this block count mode always runs the general kernel (for comparisons)."""
    global ENABLED
    old = ENABLED
    ENABLED = False
    try:
        yield
    finally:
        ENABLED = old


def applies(spec: PolicySpec, st: CacheState) -> bool:
    """Whether :func:`replay_count` may serve this run: an LRU/FIFO-like list policy without a
    ``prepare`` hook, on a cache holding no admitted experts yet (pinned ones are fine)."""
    return (
        ENABLED
        and spec.pid in LIST_POLICIES
        and spec.prepare is None
        and not bool(np.any(st.status == RESIDENT))
    )


def replay_count(st, spec, acc, atomic, pf_off, pf_obj, reset, measure, obj_bytes, cnt,
                 hits_layer, acc_layer):  # fmt: skip
    """Count-mode replay of a list policy: the arguments of
    :func:`simulator.kernels.replay_count` less the policy state, which comes from ``st``
    (the :class:`CacheState` the engine built; read, not changed) and ``spec``; ``acc`` is the
    prepared :class:`~simulator.accesses.Accesses`. Adds to ``cnt``, ``hits_layer`` and
    ``acc_layer`` as the general kernel does."""
    n_obj = st.num_objects
    n_part = st.parts.shape[0]
    prv = np.empty(n_obj + n_part, np.int32)
    nxt = np.empty(n_obj + n_part, np.int32)
    sent = np.arange(n_obj, n_obj + n_part, dtype=np.int32)
    prv[sent] = sent
    nxt[sent] = sent
    status = np.where(st.status == PINNED, PINNED, ABSENT).astype(np.int8)
    part = st.oi[:, OI_PART].astype(np.int32)
    size = np.ascontiguousarray(st.oi[:, OI_SIZE])
    used = st.parts[:, P_USED].copy()
    cap = st.parts[:, P_CAP].copy()
    unit = bool(np.all(size == 1)) and bool(np.all(cap >= 1))
    move = LIST_POLICIES[spec.pid]
    per_obj = np.zeros(4 * n_obj, np.int64)
    tally = np.zeros(9, np.int64)
    stamp = np.zeros(n_obj, np.int64)
    g_off = acc.group_offsets
    if int(g_off[0]) != 0:  # build_accesses always starts at 0; the kernels rely on it
        raise ValueError("fast_count: group offsets must start at access 0")
    extras = pf_obj.shape[0] > 0 or reset.shape[0] > 0 or measure.shape[0] > 0
    if unit and n_part == 1 and not extras:  # the common case: one pool, plain replay
        pool = _pool_atomic if atomic else _pool_sequential
        pool(g_off, acc.obj, move, status, stamp, prv, nxt, per_obj, used, cap, tally)
    else:
        replay_list(g_off, acc.obj, atomic, move, unit, pf_off, pf_obj, reset, measure,
                    obj_bytes, status, stamp, prv, nxt, part, size, used, cap,
                    np.zeros(n_obj, np.int8), per_obj, tally)  # fmt: skip
    _tally(per_obj, tally, obj_bytes, acc.obj_layer, cnt, hits_layer, acc_layer)


@njit(inline="always", **HOT)
def _push_front(prv, nxt, s, o):
    h = nxt[s]
    nxt[o] = h
    prv[o] = s
    prv[h] = o
    nxt[s] = o


@njit(inline="always", **HOT)
def _unlink(prv, nxt, o):
    p = prv[o]
    n = nxt[o]
    nxt[p] = n
    prv[n] = p


@njit(inline="always", **HOT)
def _victim(prv, stamp, s, atomic, b):
    """The expert to evict from the list headed by sentinel ``s`` (``s`` itself if the list is
    empty), and 1 if that eviction is forced (it takes a member of the current group)."""
    v = prv[s]
    if not atomic:
        return v, 0
    while v != s and stamp[v] > b:
        v = prv[v]
    if v != s:
        return v, 0
    v = prv[s]
    while v != s and stamp[v] == b + 1:
        v = prv[v]
    if v == s:
        v = prv[s]
    return v, 1 if v != s else 0


@njit(inline="always", **HOT)
def _make_room(prv, nxt, status, stamp, part, size, used, cap, pf_flag, obj_bytes, n_obj, o,
               atomic, b, tally):  # fmt: skip
    """Evict until ``o`` fits in its partition (any sizes); False when nothing may be evicted.
    Adds to ``tally`` (see :func:`replay_list`)."""
    p = part[o]
    s = n_obj + p
    need = size[o]
    if need > cap[p]:
        return False
    while used[p] + need > cap[p]:
        v, f = _victim(prv, stamp, s, atomic, b)
        if v == s:
            return False
        _unlink(prv, nxt, v)
        status[v] = ABSENT
        used[p] -= size[v]
        tally[0] += 1
        tally[1] += f
        if pf_flag[v] != 0:
            pf_flag[v] = 0
            tally[2] += 1
            tally[3] += obj_bytes[v]
    return True


@njit(**HOT)
def replay_list(g_off, obj, atomic, move_on_hit, unit, pf_off, pf_obj, reset,
                measure, obj_bytes, status, stamp, prv, nxt, part, size, used, cap, pf_flag,
                per_obj, tally):  # fmt: skip
    """The list-policy count kernel for any configuration.

    ``status``: ABSENT/RESIDENT/PINNED per expert; ``prv``/``nxt``: int32[O + P] links, row
    ``O + p`` heading partition p's circular list (most recent after it, eviction end before
    it); ``part``/``size`` per expert, ``used``/``cap`` per partition; ``unit``: every size is
    1 and every capacity at least 1. Scratch, zeroed: ``stamp`` (int64[O]), ``pf_flag``
    (int8[O]), ``per_obj`` (int64[4 O]: hits per expert, misses per expert, then the same for
    warm-up groups), ``tally`` (int64[9]: evictions, forced evictions, prefetches wasted and
    their bytes, issued and their bytes, dropped, capacity overflows, prefetches used).

    One loop over the accesses; the per-group work (protection stamps, resets, free
    prefetches, the measure flag) runs only where a group starts, and only when some is asked
    for.
    """
    n_groups = g_off.shape[0] - 1
    n_obj = status.shape[0]
    single = used.shape[0] == 1
    simple = unit and single  # one pool of unit sizes: at most one eviction per miss
    prefetching = pf_obj.shape[0] > 0
    has_reset = reset.shape[0] > 0
    has_measure = measure.shape[0] > 0
    evictions = 0
    forced = 0
    overflow = 0
    pf_used = 0
    b = 0  # 2 x the current group
    wb = 0  # where the current group's tallies start in per_obj: 0 measured, 2 O warm-up
    s = n_obj  # sentinel of the single pool
    used0 = used[0]  # the single pool's use and capacity, kept in registers
    cap0 = cap[0]
    ng = 0  # the next group to start
    n_acc = g_off[n_groups]
    bounds = atomic or prefetching or has_reset or has_measure  # any per-group work at all
    end = 0 if bounds else -1
    for a in range(n_acc):
        if a == end:
            while ng < n_groups and g_off[ng] == a:  # start every group that begins here
                if has_reset or prefetching:
                    if simple:
                        used[0] = used0
                    _start_group(ng, pf_off, pf_obj, reset, obj_bytes, status, stamp, prv, nxt,
                                 part, size, used, cap, pf_flag, tally, atomic, move_on_hit,
                                 g_off, obj)  # fmt: skip
                    if simple:
                        used0 = used[0]
                elif atomic:
                    for k in range(a, g_off[ng + 1]):
                        stamp[obj[k]] = 2 * ng + 1
                b = 2 * ng
                wb = 0 if not has_measure or measure[ng] else 2 * n_obj
                ng += 1
            end = g_off[ng] if ng < n_groups else -1
        o = obj[a]
        so = status[o]
        if so == RESIDENT:
            per_obj[wb + o] += 1
            if move_on_hit:
                if not single:
                    s = n_obj + part[o]
                if nxt[s] != o:
                    _unlink(prv, nxt, o)
                    _push_front(prv, nxt, s, o)
            if prefetching and pf_flag[o] != 0:
                pf_flag[o] = 0
                pf_used += 1
        elif so == PINNED:
            per_obj[wb + o] += 1
        else:
            per_obj[wb + n_obj + o] += 1
            if simple:
                ok = True
                if used0 >= cap0:
                    v, f = _victim(prv, stamp, s, atomic, b)
                    if v == s:
                        ok = False
                    else:
                        _unlink(prv, nxt, v)
                        status[v] = ABSENT
                        used0 -= 1
                        evictions += 1
                        forced += f
                        if prefetching and pf_flag[v] != 0:
                            pf_flag[v] = 0
                            tally[2] += 1
                            tally[3] += obj_bytes[v]
                if ok:
                    status[o] = RESIDENT
                    used0 += 1
                    _push_front(prv, nxt, s, o)
                if used0 > cap0:
                    overflow += 1
            else:
                p = part[o]
                if _make_room(prv, nxt, status, stamp, part, size, used, cap, pf_flag, obj_bytes,
                              n_obj, o, atomic, b, tally):  # fmt: skip
                    status[o] = RESIDENT
                    used[p] += size[o]
                    _push_front(prv, nxt, n_obj + p, o)
                if used[p] > cap[p]:
                    overflow += 1
        if atomic:
            stamp[o] = b + 2
    if simple:
        used[0] = used0
    if bounds:
        while ng < n_groups:  # groups with no accesses at the end still reset and prefetch
            _start_group(ng, pf_off, pf_obj, reset, obj_bytes, status, stamp, prv, nxt, part,
                         size, used, cap, pf_flag, tally, atomic, move_on_hit, g_off,
                         obj)  # fmt: skip
            ng += 1
    for o in range(n_obj):  # prefetched experts never used by the end count as wasted
        if pf_flag[o] != 0:
            tally[2] += 1
            tally[3] += obj_bytes[o]
    tally[0] += evictions
    tally[1] += forced
    tally[7] += overflow
    tally[8] += pf_used


@njit(**HOT)
def _start_group(g, pf_off, pf_obj, reset, obj_bytes, status, stamp, prv, nxt, part, size, used,
                 cap, pf_flag, tally, atomic, move_on_hit, g_off, obj):  # fmt: skip
    """What happens where group ``g`` starts, before its accesses: the reset, the protection
    stamps of its members, its free prefetches (in this order, as the general kernel)."""
    n_obj = status.shape[0]
    b = 2 * g
    if reset.shape[0] > 0 and reset[g]:
        for p in range(used.shape[0]):
            s = n_obj + p
            c = nxt[s]
            while c != s:
                status[c] = ABSENT
                used[p] -= size[c]
                if pf_flag[c] != 0:
                    pf_flag[c] = 0
                    tally[2] += 1
                    tally[3] += obj_bytes[c]
                c = nxt[c]
            prv[s] = s
            nxt[s] = s
    if atomic:
        for a in range(g_off[g], g_off[g + 1]):
            stamp[obj[a]] = b + 1
    for j in range(pf_off[g], pf_off[g + 1]):
        o = pf_obj[j]
        so = status[o]
        if so == ABSENT:
            if _make_room(prv, nxt, status, stamp, part, size, used, cap, pf_flag, obj_bytes,
                          n_obj, o, atomic, b, tally):  # fmt: skip
                p = part[o]
                status[o] = RESIDENT
                used[p] += size[o]
                _push_front(prv, nxt, n_obj + p, o)
                pf_flag[o] = 1
                tally[4] += 1
                tally[5] += obj_bytes[o]
            else:
                tally[6] += 1
        elif so == RESIDENT and move_on_hit:
            s = n_obj + part[o]
            if nxt[s] != o:
                _unlink(prv, nxt, o)
                _push_front(prv, nxt, s, o)


@njit(**HOT)
def _pool_sequential(g_off, obj, move_on_hit, status, stamp, prv, nxt, per_obj, used, cap, tally):
    """:func:`replay_list` for its commonest case, sequential: one pool of unit-size experts,
    no prefetch, reset or warm-up. (``g_off`` and ``stamp`` are not needed.)"""
    n_obj = status.shape[0]
    s = n_obj
    u = used[0]
    c = cap[0]
    evictions = 0
    overflow = 0
    for a in range(obj.shape[0]):
        o = obj[a]
        so = status[o]
        if so == RESIDENT:
            per_obj[o] += 1
            if move_on_hit and nxt[s] != o:
                _unlink(prv, nxt, o)
                _push_front(prv, nxt, s, o)
        elif so == PINNED:
            per_obj[o] += 1
        else:
            per_obj[n_obj + o] += 1
            ok = True
            if u >= c:
                v = prv[s]
                if v == s:
                    ok = False
                else:
                    _unlink(prv, nxt, v)
                    status[v] = ABSENT
                    u -= 1
                    evictions += 1
            if ok:
                status[o] = RESIDENT
                u += 1
                _push_front(prv, nxt, s, o)
            if u > c:
                overflow += 1
    used[0] = u
    tally[0] += evictions
    tally[7] += overflow


@njit(**HOT)
def _pool_atomic(g_off, obj, move_on_hit, status, stamp, prv, nxt, per_obj, used, cap, tally):
    """:func:`replay_list` for its commonest case, atomic: one pool of unit-size experts, no
    prefetch, reset or warm-up. Members of the current group get stamp ``b + 1`` where the
    group starts; the used ones are told apart (stamp ``b + 2``) only when an eviction has to
    be forced, by marking the group's accesses so far."""
    n_obj = status.shape[0]
    n_groups = g_off.shape[0] - 1
    s = n_obj
    u = used[0]
    c = cap[0]
    evictions = 0
    forced = 0
    overflow = 0
    ng = 0  # the next group to start
    end = 0  # where it starts
    a0 = 0  # where the current group started
    b = 0
    for a in range(g_off[n_groups]):
        if a == end:
            while g_off[ng] == a:  # skip groups without accesses
                ng += 1
            b = 2 * ng  # 2 x (current group + 1): stamps only need to grow
            a0 = a
            end = g_off[ng]
            for k in range(a, end):
                stamp[obj[k]] = b + 1
        o = obj[a]
        so = status[o]
        if so == RESIDENT:
            per_obj[o] += 1
            if move_on_hit and nxt[s] != o:
                _unlink(prv, nxt, o)
                _push_front(prv, nxt, s, o)
        elif so == PINNED:
            per_obj[o] += 1
        else:
            per_obj[n_obj + o] += 1
            ok = True
            if u >= c:
                v = prv[s]
                while v != s and stamp[v] > b:
                    v = prv[v]
                if v == s:  # every resident is a member: force, preferring used members
                    for k in range(a0, a):
                        stamp[obj[k]] = b + 2
                    v = prv[s]
                    while v != s and stamp[v] == b + 1:
                        v = prv[v]
                    if v == s:
                        v = prv[s]
                    if v != s:
                        forced += 1
                if v == s:
                    ok = False
                else:
                    _unlink(prv, nxt, v)
                    status[v] = ABSENT
                    u -= 1
                    evictions += 1
            if ok:
                status[o] = RESIDENT
                u += 1
                _push_front(prv, nxt, s, o)
            if u > c:
                overflow += 1
    used[0] = u
    tally[0] += evictions
    tally[1] += forced
    tally[7] += overflow


@njit(**HOT)
def _tally(per_obj, tally, obj_bytes, obj_layer, cnt, hits_layer, acc_layer):
    """Per-expert hits and misses (measured groups) and the tally into the result counters."""
    n_obj = obj_bytes.shape[0]
    hits = 0
    misses = 0
    nbytes = 0
    for o in range(n_obj):
        h = per_obj[o]
        m = per_obj[n_obj + o]
        hits += h
        misses += m
        nbytes += m * obj_bytes[o]
        hits_layer[obj_layer[o]] += h
        acc_layer[obj_layer[o]] += h + m
    cnt[K.C_HITS] += hits
    cnt[K.C_MISSES] += misses
    cnt[K.C_BYTES] += nbytes
    cnt[K.C_EVICTIONS] += tally[0]
    cnt[K.C_FORCED] += tally[1]
    cnt[K.C_PF_WASTED] += tally[2]
    cnt[K.C_PF_WASTED_BYTES] += tally[3]
    cnt[K.C_PF_ISSUED] += tally[4]
    cnt[K.C_PF_BYTES] += tally[5]
    cnt[K.C_PF_DROPPED] += tally[6]
    cnt[K.C_OVERFLOW] += tally[7]
    cnt[K.C_PF_USED] += tally[8]
