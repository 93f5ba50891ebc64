"""Jitted data structures the policies share: per-partition circular lists and indexed min-heaps.

Lists give O(1) LRU/FIFO; count buckets give O(1) LFU (one FIFO list per count, as
libCacheSim); heaps give O(log n) for any policy that ranks residents by a key ``(k1, k2)``
(smallest is evicted first). Heap rows hold a copy of the key next to the object,
so sifting touches one contiguous array. All functions take plain arrays (see state.py).
"""

from __future__ import annotations

from numba import njit

from policies.state import (
    H_K1,
    H_K2,
    H_OBJ,
    IP_BFREE,
    L_NEXT,
    L_PREV,
    N_COUNT,
    N_HEAD,
    N_NEXT,
    N_PREV,
    N_TAIL,
    OF_K1,
    OI_HPOS,
    OI_K2,
    OI_PART,
    P_HBASE,
    P_HLEN,
)
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
def row_less(heap, i, j):
    """Whether heap row ``i`` ranks before row ``j`` (is evicted first)."""
    a = heap[i, H_K1]
    b = heap[j, H_K1]
    if a < b:
        return True
    if a > b:
        return False
    return heap[i, H_K2] < heap[j, H_K2]


@njit(**HOT)
def _sift_up(heap, oi, base, i):
    k1 = heap[base + i, H_K1]
    k2 = heap[base + i, H_K2]
    ob = heap[base + i, H_OBJ]
    while i > 0:
        parent = (i - 1) >> 1
        r = base + parent
        pk1 = heap[r, H_K1]
        if k1 < pk1 or (k1 == pk1 and k2 < heap[r, H_K2]):
            heap[base + i, H_K1] = pk1
            heap[base + i, H_K2] = heap[r, H_K2]
            heap[base + i, H_OBJ] = heap[r, H_OBJ]
            oi[int(heap[r, H_OBJ]), OI_HPOS] = i
            i = parent
        else:
            break
    heap[base + i, H_K1] = k1
    heap[base + i, H_K2] = k2
    heap[base + i, H_OBJ] = ob
    oi[int(ob), OI_HPOS] = i


@njit(**HOT)
def _sift_down(heap, oi, base, n, i):
    k1 = heap[base + i, H_K1]
    k2 = heap[base + i, H_K2]
    ob = heap[base + i, H_OBJ]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and row_less(heap, base + c + 1, base + c):
            c += 1
        r = base + c
        ck1 = heap[r, H_K1]
        if ck1 < k1 or (ck1 == k1 and heap[r, H_K2] < k2):
            heap[base + i, H_K1] = ck1
            heap[base + i, H_K2] = heap[r, H_K2]
            heap[base + i, H_OBJ] = heap[r, H_OBJ]
            oi[int(heap[r, H_OBJ]), OI_HPOS] = i
            i = c
        else:
            break
    heap[base + i, H_K1] = k1
    heap[base + i, H_K2] = k2
    heap[base + i, H_OBJ] = ob
    oi[int(ob), OI_HPOS] = i


@njit(**HOT)
def heap_push(heap, parts, oi, of, o):
    p = oi[o, OI_PART]
    base = parts[p, P_HBASE]
    n = parts[p, P_HLEN]
    heap[base + n, H_K1] = of[o, OF_K1]
    heap[base + n, H_K2] = oi[o, OI_K2]
    heap[base + n, H_OBJ] = o
    parts[p, P_HLEN] = n + 1
    _sift_up(heap, oi, base, n)


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
    heap[base + i, H_K1] = heap[base + n, H_K1]
    heap[base + i, H_K2] = heap[base + n, H_K2]
    heap[base + i, H_OBJ] = heap[base + n, H_OBJ]
    oi[int(heap[base + i, H_OBJ]), OI_HPOS] = i
    if i > 0 and row_less(heap, base + i, base + ((i - 1) >> 1)):
        _sift_up(heap, oi, base, i)
    else:
        _sift_down(heap, oi, base, n, i)


@njit(**HOT)
def heap_update(heap, parts, oi, of, o):
    """Restore heap order after object ``o``'s key (OF_K1, OI_K2) changed, either way."""
    p = oi[o, OI_PART]
    base = parts[p, P_HBASE]
    i = oi[o, OI_HPOS]
    heap[base + i, H_K1] = of[o, OF_K1]
    heap[base + i, H_K2] = oi[o, OI_K2]
    if i > 0 and row_less(heap, base + i, base + ((i - 1) >> 1)):
        _sift_up(heap, oi, base, i)
    else:
        _sift_down(heap, oi, base, parts[p, P_HLEN], i)


# --------------------------------------------------------------------------- count buckets
@njit(**HOT)
def _node_new(nodes, ip, count, after):
    """Take a node from the free list for ``count`` and link it right after node ``after``."""
    n = ip[IP_BFREE]
    ip[IP_BFREE] = nodes[n, N_NEXT]
    nodes[n, N_COUNT] = count
    nodes[n, N_HEAD] = -1
    nodes[n, N_TAIL] = -1
    nx = nodes[after, N_NEXT]
    nodes[n, N_PREV] = after
    nodes[n, N_NEXT] = nx
    nodes[nx, N_PREV] = n
    nodes[after, N_NEXT] = n
    return n


@njit(**HOT)
def _node_drop(nodes, ip, n):
    pr = nodes[n, N_PREV]
    nx = nodes[n, N_NEXT]
    nodes[pr, N_NEXT] = nx
    nodes[nx, N_PREV] = pr
    nodes[n, N_NEXT] = ip[IP_BFREE]
    ip[IP_BFREE] = n


@njit(**HOT)
def _bucket_append(nodes, links, n, o):
    t = nodes[n, N_TAIL]
    links[o, L_PREV] = t
    links[o, L_NEXT] = -1
    if t >= 0:
        links[t, L_NEXT] = o
    else:
        nodes[n, N_HEAD] = o
    nodes[n, N_TAIL] = o


@njit(**HOT)
def _bucket_unlink(nodes, links, n, o):
    pr = links[o, L_PREV]
    nx = links[o, L_NEXT]
    if pr >= 0:
        links[pr, L_NEXT] = nx
    else:
        nodes[n, N_HEAD] = nx
    if nx >= 0:
        links[nx, L_PREV] = pr
    else:
        nodes[n, N_TAIL] = pr
    links[o, L_PREV] = -1
    links[o, L_NEXT] = -1


@njit(**HOT)
def bucket_insert(nodes, links, parts, oi, ip, o):
    """Admit ``o`` with count 1, newest in its bucket (O(1))."""
    s = nodes.shape[0] - parts.shape[0] + oi[o, OI_PART]
    n = nodes[s, N_NEXT]
    if nodes[n, N_COUNT] != 1:  # sentinels hold -1
        n = _node_new(nodes, ip, 1, s)
    _bucket_append(nodes, links, n, o)
    oi[o, OI_HPOS] = n


@njit(**HOT)
def bucket_hit(nodes, links, oi, ip, o):
    """Move ``o`` from count c to count c + 1, newest there (O(1))."""
    n = oi[o, OI_HPOS]
    c = nodes[n, N_COUNT]
    m = nodes[n, N_NEXT]
    if nodes[m, N_COUNT] != c + 1:
        m = _node_new(nodes, ip, c + 1, n)
    _bucket_unlink(nodes, links, n, o)
    if nodes[n, N_HEAD] < 0:
        _node_drop(nodes, ip, n)
    _bucket_append(nodes, links, m, o)
    oi[o, OI_HPOS] = m


@njit(**HOT)
def bucket_remove(nodes, links, oi, ip, o):
    n = oi[o, OI_HPOS]
    _bucket_unlink(nodes, links, n, o)
    if nodes[n, N_HEAD] < 0:
        _node_drop(nodes, ip, n)
    oi[o, OI_HPOS] = -1
