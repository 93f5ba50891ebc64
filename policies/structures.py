"""Jitted data structures the policies share: per-partition circular lists and indexed min-heaps.

Lists give O(1) LRU/FIFO; heaps give O(log n) for any policy that ranks residents by a key
``(k1, k2)`` (smallest is evicted first). All functions take plain arrays (see state.py).
"""

from __future__ import annotations

from numba import njit

from policies.state import L_NEXT, L_PREV, OF_K1, OI_HPOS, OI_K2, OI_PART, P_HBASE, P_HLEN
from traces._jit import HOT


# --------------------------------------------------------------------------- lists
@njit(**HOT)
def _sentinel(links, parts, oi, o):
    return links.shape[0] - parts.shape[0] + oi[o, OI_PART]


@njit(**HOT)
def list_push_front(links, parts, oi, o):
    """Insert object ``o`` at the most-recent end of its partition's list."""
    s = _sentinel(links, parts, oi, o)
    h = links[s, L_NEXT]
    links[o, L_NEXT] = h
    links[o, L_PREV] = s
    links[h, L_PREV] = o
    links[s, L_NEXT] = o


@njit(**HOT)
def list_unlink(links, o):
    p = links[o, L_PREV]
    n = links[o, L_NEXT]
    links[p, L_NEXT] = n
    links[n, L_PREV] = p
    links[o, L_PREV] = -1
    links[o, L_NEXT] = -1


@njit(**HOT)
def list_move_front(links, parts, oi, o):
    s = _sentinel(links, parts, oi, o)
    if links[s, L_NEXT] == o:
        return
    list_unlink(links, o)
    list_push_front(links, parts, oi, o)


# --------------------------------------------------------------------------- heaps
@njit(**HOT)
def less(oi, of, a, b):
    """Whether object ``a`` ranks before ``b`` (is evicted first)."""
    ka = of[a, OF_K1]
    kb = of[b, OF_K1]
    if ka < kb:
        return True
    if ka > kb:
        return False
    return oi[a, OI_K2] < oi[b, OI_K2]


@njit(**HOT)
def _sift_up(heap, oi, of, base, i):
    o = heap[base + i]
    while i > 0:
        parent = (i - 1) >> 1
        q = heap[base + parent]
        if less(oi, of, o, q):
            heap[base + i] = q
            oi[q, OI_HPOS] = i
            i = parent
        else:
            break
    heap[base + i] = o
    oi[o, OI_HPOS] = i


@njit(**HOT)
def _sift_down(heap, oi, of, base, n, i):
    o = heap[base + i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        r = c + 1
        if r < n and less(oi, of, heap[base + r], heap[base + c]):
            c = r
        q = heap[base + c]
        if less(oi, of, q, o):
            heap[base + i] = q
            oi[q, OI_HPOS] = i
            i = c
        else:
            break
    heap[base + i] = o
    oi[o, OI_HPOS] = i


@njit(**HOT)
def heap_push(heap, parts, oi, of, o):
    p = oi[o, OI_PART]
    base = parts[p, P_HBASE]
    n = parts[p, P_HLEN]
    heap[base + n] = o
    oi[o, OI_HPOS] = n
    parts[p, P_HLEN] = n + 1
    _sift_up(heap, oi, of, base, n)


@njit(**HOT)
def heap_remove(heap, parts, oi, of, o):
    p = oi[o, OI_PART]
    base = parts[p, P_HBASE]
    i = oi[o, OI_HPOS]
    n = parts[p, P_HLEN] - 1
    parts[p, P_HLEN] = n
    oi[o, OI_HPOS] = -1
    if i == n:
        return
    last = heap[base + n]
    heap[base + i] = last
    oi[last, OI_HPOS] = i
    if i > 0 and less(oi, of, last, heap[base + ((i - 1) >> 1)]):
        _sift_up(heap, oi, of, base, i)
    else:
        _sift_down(heap, oi, of, base, n, i)


@njit(**HOT)
def heap_update(heap, parts, oi, of, o):
    """Restore heap order after object ``o``'s key changed (either direction)."""
    p = oi[o, OI_PART]
    base = parts[p, P_HBASE]
    i = oi[o, OI_HPOS]
    if i > 0 and less(oi, of, o, heap[base + ((i - 1) >> 1)]):
        _sift_up(heap, oi, of, base, i)
    else:
        _sift_down(heap, oi, of, base, parts[p, P_HLEN], i)
