"""Jitted data structures the policies share: per-partition circular lists and indexed min-heaps.

Lists give O(1) LRU/FIFO; heaps give O(log n) for any policy that ranks residents by a key
``(k1, k2)`` (smallest is evicted first).
"""

from __future__ import annotations

from numba import njit


# --------------------------------------------------------------------------- lists
@njit(cache=True, inline="always")
def list_push_front(st, o):
    """Insert object ``o`` at the most-recent end of its partition's list."""
    s = st.prev.shape[0] - st.cap.shape[0] + st.part[o]
    h = st.nxt[s]
    st.nxt[o] = h
    st.prev[o] = s
    st.prev[h] = o
    st.nxt[s] = o


@njit(cache=True, inline="always")
def list_unlink(st, o):
    p = st.prev[o]
    n = st.nxt[o]
    st.nxt[p] = n
    st.prev[n] = p
    st.prev[o] = -1
    st.nxt[o] = -1


@njit(cache=True, inline="always")
def list_move_front(st, o):
    s = st.prev.shape[0] - st.cap.shape[0] + st.part[o]
    if st.nxt[s] == o:
        return
    list_unlink(st, o)
    list_push_front(st, o)


# --------------------------------------------------------------------------- heaps
@njit(cache=True, inline="always")
def _less(st, a, b):
    ka = st.k1[a]
    kb = st.k1[b]
    if ka < kb:
        return True
    if ka > kb:
        return False
    return st.k2[a] < st.k2[b]


@njit(cache=True)
def _sift_up(st, base, i):
    heap = st.heap
    o = heap[base + i]
    while i > 0:
        parent = (i - 1) >> 1
        q = heap[base + parent]
        if _less(st, o, q):
            heap[base + i] = q
            st.hpos[q] = i
            i = parent
        else:
            break
    heap[base + i] = o
    st.hpos[o] = i


@njit(cache=True)
def _sift_down(st, base, n, i):
    heap = st.heap
    o = heap[base + i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        r = c + 1
        if r < n and _less(st, heap[base + r], heap[base + c]):
            c = r
        q = heap[base + c]
        if _less(st, q, o):
            heap[base + i] = q
            st.hpos[q] = i
            i = c
        else:
            break
    heap[base + i] = o
    st.hpos[o] = i


@njit(cache=True)
def heap_push(st, o):
    p = st.part[o]
    base = st.hbase[p]
    n = st.hlen[p]
    st.heap[base + n] = o
    st.hpos[o] = n
    st.hlen[p] = n + 1
    _sift_up(st, base, n)


@njit(cache=True)
def heap_remove(st, o):
    p = st.part[o]
    base = st.hbase[p]
    i = st.hpos[o]
    n = st.hlen[p] - 1
    st.hlen[p] = n
    st.hpos[o] = -1
    if i == n:
        return
    last = st.heap[base + n]
    st.heap[base + i] = last
    st.hpos[last] = i
    if i > 0 and _less(st, last, st.heap[base + ((i - 1) >> 1)]):
        _sift_up(st, base, i)
    else:
        _sift_down(st, base, n, i)


@njit(cache=True)
def heap_update(st, o):
    """Restore heap order after object ``o``'s key changed (either direction)."""
    p = st.part[o]
    base = st.hbase[p]
    i = st.hpos[o]
    if i > 0 and _less(st, o, st.heap[base + ((i - 1) >> 1)]):
        _sift_up(st, base, i)
    else:
        _sift_down(st, base, st.hlen[p], i)


@njit(cache=True)
def heap_rescale_k1(st, factor):
    """Multiply every k1 by ``factor`` > 0 (order is unchanged, so heaps stay valid)."""
    for o in range(st.k1.shape[0]):
        st.k1[o] *= factor
