"""The request path's policy calls, written once for all policies.

Kernels call :func:`admit`, :func:`touch`, :func:`remove` and :func:`victim`; these do the
structure work (list or heap) and branch on the policy id to the policy's ``on_access`` hook.
One branch per policy: a chain of integer comparisons numba compiles into the kernel.
"""

from __future__ import annotations

from numba import njit

from policies import belady, fifo, lfu, lfu_aged, lfu_perfect, lru, no_cache, static
from policies.spec import STRUCT_HEAP, STRUCT_LIST
from policies.state import IN_FLIGHT, IP_EVENTS, IP_INSERTS, IP_POLICY, IP_STRUCT, RESIDENT
from policies.structures import (
    heap_push,
    heap_remove,
    heap_update,
    list_push_front,
    list_unlink,
)


@njit(cache=True, inline="always")
def structure_of(st):
    return st.ip[IP_STRUCT]


@njit(cache=True)
def _on_access(st, o, is_insert):
    pid = st.ip[IP_POLICY]
    if pid == lru.PID:
        lru.on_access(st, o, is_insert)
    elif pid == fifo.PID:
        fifo.on_access(st, o, is_insert)
    elif pid == lfu.PID:
        lfu.on_access(st, o, is_insert)
    elif pid == lfu_perfect.PID:
        lfu_perfect.on_access(st, o, is_insert)
    elif pid == lfu_aged.PID:
        lfu_aged.on_access(st, o, is_insert)
    elif pid == belady.PID:
        belady.on_access(st, o, is_insert)
    elif pid == static.PID:
        static.on_access(st, o, is_insert)
    elif pid == no_cache.PID:
        no_cache.on_access(st, o, is_insert)


@njit(cache=True)
def admit(st, o, status):
    """Put ``o`` (not cached) into its partition with ``status`` (RESIDENT or IN_FLIGHT)."""
    st.status[o] = status
    st.used[st.part[o]] += st.size[o]
    st.ip[IP_INSERTS] += 1
    st.ip[IP_EVENTS] += 1
    _on_access(st, o, True)
    s = structure_of(st)
    if s == STRUCT_LIST:
        list_push_front(st, o)
    elif s == STRUCT_HEAP:
        heap_push(st, o)


@njit(cache=True)
def touch(st, o):
    """A use of the cached object ``o``."""
    st.ip[IP_EVENTS] += 1
    _on_access(st, o, False)
    if structure_of(st) == STRUCT_HEAP:
        heap_update(st, o)


@njit(cache=True)
def observe_miss(st, o):
    """A use of an object that is not cached and will not be admitted (keeps global counts)."""
    pid = st.ip[IP_POLICY]
    if pid == lfu_perfect.PID or pid == lfu_aged.PID:
        st.ip[IP_EVENTS] += 1
        _on_access(st, o, True)


@njit(cache=True)
def remove(st, o):
    """Take ``o`` out of the cache (eviction or cancelled prefetch)."""
    s = structure_of(st)
    if s == STRUCT_LIST:
        list_unlink(st, o)
    elif s == STRUCT_HEAP:
        heap_remove(st, o)
    st.status[o] = 0
    st.used[st.part[o]] -= st.size[o]


@njit(cache=True, inline="always")
def evictable(st, o, pin_lo, pin_hi, need_by, need_limit, arrive, now):
    """Resident (or arrived), not protected by a pin stamp in [pin_lo, pin_hi], not needed sooner."""
    s = st.status[o]
    if s == RESIDENT:
        pass
    elif s == IN_FLIGHT:
        if arrive[o] > now:
            return False
    else:
        return False
    pv = st.pin[o]
    if pv >= pin_lo and pv <= pin_hi:
        return False
    return need_by[o] > need_limit


@njit(cache=True)
def victim(st, p, pin_lo, pin_hi, need_by, need_limit, arrive, now):
    """The policy's first evictable object in partition ``p``, or -1 if none qualifies."""
    s = structure_of(st)
    if s == STRUCT_LIST:
        sentinel = st.prev.shape[0] - st.cap.shape[0] + p
        c = st.prev[sentinel]
        while c != sentinel:
            if evictable(st, c, pin_lo, pin_hi, need_by, need_limit, arrive, now):
                return c
            c = st.prev[c]
        return -1
    if s != STRUCT_HEAP:
        return -1
    base = st.hbase[p]
    n = st.hlen[p]
    if n == 0:
        return -1
    root = st.heap[base]
    if evictable(st, root, pin_lo, pin_hi, need_by, need_limit, arrive, now):
        return root
    # Best-first search over the heap: the frontier holds heap positions (in st.stash).
    frontier = st.stash
    m = 0
    for c in (1, 2):
        if c < n:
            frontier[m] = c
            m += 1
    while m > 0:
        best = 0
        bo = st.heap[base + frontier[0]]
        for j in range(1, m):
            q = st.heap[base + frontier[j]]
            if st.k1[q] < st.k1[bo] or (st.k1[q] == st.k1[bo] and st.k2[q] < st.k2[bo]):
                best = j
                bo = q
        i = frontier[best]
        m -= 1
        frontier[best] = frontier[m]
        if evictable(st, bo, pin_lo, pin_hi, need_by, need_limit, arrive, now):
            return bo
        for c in (2 * i + 1, 2 * i + 2):
            if c < n:
                frontier[m] = c
                m += 1
    return -1
