"""The request path's policy calls, written once for all policies.

Kernels call :func:`admit`, :func:`touch`, :func:`observe_miss`, :func:`remove` and
:func:`victim`; these do the structure work (list or heap) and branch on the policy id to the
policy's ``on_access`` hook: a chain of integer comparisons that numba compiles into the kernel.
Registering a policy adds one import and one branch in :func:`on_access`.
"""

from __future__ import annotations

from numba import njit

from policies import belady, fifo, lfu, lfu_aged, lfu_perfect, lru, moe_infinity, no_cache, static
from policies.spec import STRUCT_BUCKETS, STRUCT_HEAP, STRUCT_LIST
from policies.state import (
    H_OBJ,
    IN_FLIGHT,
    IP_COUNTS_MISSES,
    IP_EVENTS,
    IP_INSERTS,
    IP_MOVE_ON_HIT,
    IP_POLICY,
    IP_STRUCT,
    L_NEXT,
    L_PREV,
    N_HEAD,
    N_NEXT,
    OI_PART,
    OI_PIN,
    OI_SIZE,
    P_HBASE,
    P_HLEN,
    P_USED,
    RESIDENT,
)
from policies.structures import (
    bucket_hit,
    bucket_insert,
    bucket_remove,
    heap_push,
    heap_remove,
    heap_update,
    list_move_front,
    list_push_front,
    list_unlink,
    row_less,
)
from traces._jit import HOT


@njit(inline="always", **HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    """The policy's hook: update ``o``'s key after an admission (is_insert) or a hit."""
    pid = ip[IP_POLICY]
    if pid == lru.PID:
        lru.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == fifo.PID:
        fifo.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == lfu.PID:
        lfu.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == lfu_perfect.PID:
        lfu_perfect.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == lfu_aged.PID:
        lfu_aged.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == belady.PID:
        belady.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == static.PID:
        static.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == no_cache.PID:
        no_cache.on_access(oi, of, ip, fp, o, is_insert)
    elif pid == moe_infinity.PID:
        moe_infinity.on_access(oi, of, ip, fp, o, is_insert)


@njit(inline="always", **HOT)
def admit(status, oi, of, links, heap, nodes, parts, ip, fp, o, new_status):
    """Put ``o`` (not cached) into its partition with ``new_status`` (RESIDENT or IN_FLIGHT)."""
    status[o] = new_status
    parts[oi[o, OI_PART], P_USED] += oi[o, OI_SIZE]
    ip[IP_INSERTS] += 1
    ip[IP_EVENTS] += 1
    on_access(oi, of, ip, fp, o, True)
    s = ip[IP_STRUCT]
    if s == STRUCT_LIST:
        list_push_front(links, parts, oi, o)
    elif s == STRUCT_HEAP:
        heap_push(heap, parts, oi, of, o)
    elif s == STRUCT_BUCKETS:
        bucket_insert(nodes, links, parts, oi, ip, o)


@njit(inline="always", **HOT)
def touch(oi, of, links, heap, nodes, parts, ip, fp, o):
    """A use of the cached object ``o``."""
    ip[IP_EVENTS] += 1
    on_access(oi, of, ip, fp, o, False)
    s = ip[IP_STRUCT]
    if s == STRUCT_LIST:
        if ip[IP_MOVE_ON_HIT] != 0:
            list_move_front(links, parts, oi, o)
    elif s == STRUCT_HEAP:
        heap_update(heap, parts, oi, of, o)
    elif s == STRUCT_BUCKETS:
        bucket_hit(nodes, links, oi, ip, o)


@njit(inline="always", **HOT)
def observe_miss(oi, of, ip, fp, o):
    """A use of an object that is not cached and will not be admitted (keeps global counts)."""
    if ip[IP_COUNTS_MISSES] != 0:
        ip[IP_EVENTS] += 1
        on_access(oi, of, ip, fp, o, True)


@njit(inline="always", **HOT)
def remove(status, oi, of, links, heap, nodes, parts, ip, o):
    """Take ``o`` out of the cache (eviction or cancelled prefetch)."""
    s = ip[IP_STRUCT]
    if s == STRUCT_LIST:
        list_unlink(links, o)
    elif s == STRUCT_HEAP:
        heap_remove(heap, parts, oi, of, o)
    elif s == STRUCT_BUCKETS:
        bucket_remove(nodes, links, oi, ip, o)
    status[o] = 0
    parts[oi[o, OI_PART], P_USED] -= oi[o, OI_SIZE]


@njit(inline="always", **HOT)
def evictable(status, oi, o, pin_lo, pin_hi, need_by, need_limit, arrive, now):
    """Resident (or arrived), not protected by a pin in [pin_lo, pin_hi], not needed sooner.

    "Needed sooner": an outstanding prefetch aims it at a group no later than ``need_limit``.
    A prefetch aimed at the current group or an earlier one that went unused protects nothing
    (the current group is ``(pin_lo - 1) >> 2``: callers pass ``pin_lo`` = 4g + 1 or 4g + 2).
    """
    s = status[o]
    if s == RESIDENT:
        pass
    elif s == IN_FLIGHT:
        if arrive[o] > now:
            return False
    else:
        return False
    pv = oi[o, OI_PIN]
    if pv >= pin_lo and pv <= pin_hi:
        return False
    nb = need_by[o]
    return nb > need_limit or nb <= ((pin_lo - 1) >> 2)


@njit(**HOT)
def _frontier_push(stash, m, heap, base, pos):
    """Push heap position ``pos`` onto the frontier min-heap ``stash[:m]``; returns m + 1."""
    j = m
    stash[j] = pos
    while j > 0:
        parent = (j - 1) >> 1
        if row_less(heap, base + stash[j], base + stash[parent]):
            t = stash[j]
            stash[j] = stash[parent]
            stash[parent] = t
            j = parent
        else:
            break
    return m + 1


@njit(**HOT)
def _frontier_pop(stash, m, heap, base):
    """Remove the frontier's smallest position (stash[0]); returns m - 1."""
    m -= 1
    stash[0] = stash[m]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= m:
            break
        if c + 1 < m and row_less(heap, base + stash[c + 1], base + stash[c]):
            c += 1
        if row_less(heap, base + stash[c], base + stash[j]):
            t = stash[j]
            stash[j] = stash[c]
            stash[c] = t
            j = c
        else:
            break
    return m


@njit(inline="always", **HOT)
def victim(status, oi, of, links, heap, nodes, parts, stash, ip, p, pin_lo, pin_hi, need_by,
           need_limit, arrive, now):  # fmt: skip
    """The policy's first evictable object in partition ``p``, or -1 if none qualifies."""
    s = ip[IP_STRUCT]
    if ip[IP_POLICY] == moe_infinity.PID and pin_lo > 1:
        # the lowest priority at the current group (4g + 1 or 4g + 2 = pin_lo); ties: LRU first
        return moe_infinity.victim_scan(status, oi, of, links, nodes, parts, ip, p,
                                        (pin_lo - 1) >> 2, pin_lo, pin_hi, need_by, need_limit,
                                        arrive, now, evictable)  # fmt: skip
    if s == STRUCT_LIST:
        sentinel = links.shape[0] - parts.shape[0] + p
        c = links[sentinel, L_PREV]
        while c != sentinel:
            if evictable(status, oi, c, pin_lo, pin_hi, need_by, need_limit, arrive, now):
                return c
            c = links[c, L_PREV]
        return -1
    if s == STRUCT_BUCKETS:
        sentinel = nodes.shape[0] - parts.shape[0] + p
        n = nodes[sentinel, N_NEXT]
        while n != sentinel:
            c = nodes[n, N_HEAD]
            while c >= 0:
                if evictable(status, oi, c, pin_lo, pin_hi, need_by, need_limit, arrive, now):
                    return c
                c = links[c, L_NEXT]
            n = nodes[n, N_NEXT]
        return -1
    if s != STRUCT_HEAP:
        return -1
    base = parts[p, P_HBASE]
    n = parts[p, P_HLEN]
    if n == 0:
        return -1
    root = int(heap[base, H_OBJ])
    if evictable(status, oi, root, pin_lo, pin_hi, need_by, need_limit, arrive, now):
        return root
    # Best-first search in key order: a frontier min-heap of heap positions (in stash).
    m = 0
    if n > 1:
        m = _frontier_push(stash, m, heap, base, 1)
    if n > 2:
        m = _frontier_push(stash, m, heap, base, 2)
    while m > 0:
        i = stash[0]
        m = _frontier_pop(stash, m, heap, base)
        o = int(heap[base + i, H_OBJ])
        if evictable(status, oi, o, pin_lo, pin_hi, need_by, need_limit, arrive, now):
            return o
        c = 2 * i + 1
        if c < n:
            m = _frontier_push(stash, m, heap, base, c)
        if c + 1 < n:
            m = _frontier_push(stash, m, heap, base, c + 1)
    return -1
