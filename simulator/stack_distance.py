"""LRU stack distances of the replay order in one pass (Mattson et al., 1970), as histograms.

The stack distance of an access is the number of distinct experts of its cache partition used
since the previous access of the same expert (cold: never accessed before, or not since the
last cache reset). An LRU cache of ``C`` slots hits exactly the accesses with distance < ``C``
(sequential access), so one pass gives the hit count of every cache size at once.

With ``atomic`` access (a group's experts are protected together), the distance is taken at the
start of the group: experts first used earlier in the same group do not count. When every
group fits in its partition, atomic LRU keeps the ``C`` most recently used experts at each group
boundary and hits exactly the accesses whose start-of-group distance is < ``C``
(:mod:`simulator.lru_curve` uses it only there; docs/sweep.md has the argument).

Each expert has one mark, a bit at the time of its last access; the distance is the number of
marks after the previous access's: a Fenwick tree over 64-bit words counts whole words, a
popcount the last one. Times live in a window of twice the partition's expert count (plus
64) and are renumbered when the window fills. Hot path: no allocation, the caller passes every
array.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from traces._jit import HOT

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(inline="always", **HOT)
def _popcount(x):
    x = x - ((x >> _ONE) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(inline="always", **HOT)
def _fw_add(tree, base, n, i, v):
    """Add ``v`` to word ``i`` of the Fenwick tree over ``n`` words at ``base`` (1-based)."""
    i += 1
    while i <= n:
        tree[base + i] += v
        i += i & (-i)


@njit(inline="always", **HOT)
def _marks_upto(tree, bits, fbase, wbase, t):
    """Marks at times 0..t (inclusive): whole words by the tree, the last word by popcount."""
    w = t >> 6
    i = w  # words 0..w-1
    s = 0
    while i > 0:
        s += tree[fbase + i]
        i -= i & (-i)
    b = t & 63
    mask = _ALL if b == 63 else (_ONE << np.uint64(b + 1)) - _ONE
    return s + _popcount(bits[wbase + w] & mask)


@njit(inline="always", **HOT)
def _mark(tree, bits, fbase, wbase, nw, t, v):
    """Set (``v = 1``) or clear (``v = -1``) the mark at time ``t``."""
    w = t >> 6
    bit = _ONE << np.uint64(t & 63)
    if v > 0:
        bits[wbase + w] |= bit
    else:
        bits[wbase + w] &= ~bit
    _fw_add(tree, fbase, nw, w, v)


@njit(**HOT)
def _compact(tree, bits, who, fbase, wbase, nw, last, clock):
    """Renumber the partition's marks 0..m-1 in time order, rebuild its words; return m."""
    m = 0
    for pos in range(clock):
        if bits[wbase + (pos >> 6)] & (_ONE << np.uint64(pos & 63)):
            o = who[wbase * 64 + pos]
            who[wbase * 64 + m] = o
            last[o] = m
            m += 1
    for w in range(nw):
        full = m - 64 * w
        if full >= 64:
            bits[wbase + w] = _ALL
        elif full > 0:
            bits[wbase + w] = (_ONE << np.uint64(full)) - _ONE
        else:
            bits[wbase + w] = np.uint64(0)
    for i in range(1, nw + 1):
        low = i - (i & (-i))  # tree entry i covers words low .. i-1
        tree[fbase + i] = min(m, 64 * i) - min(m, 64 * low)
    return m


@njit(**HOT)
def _reset(tree, bits, last, clock, seen):
    for i in range(tree.shape[0]):
        tree[i] = 0
    for i in range(bits.shape[0]):
        bits[i] = np.uint64(0)
    for o in range(last.shape[0]):
        last[o] = -1
    for p in range(clock.shape[0]):
        clock[p] = 0
        seen[p] = 0


@njit(**HOT)
def stack_histograms(obj, obj_part, g_off, g_layer, atomic, reset, measure, fbase, wbase, nwords,
                     tree, bits, who, last, clock, seen, hit_hist, all_hist, cold_seen,
                     kmax):  # fmt: skip
    """One pass over the replay order; fills the histograms (all zero on entry).

    ``obj_part[o]``: the cache partition of expert ``o`` (0 for a global cache, its layer for
    per-layer partitions). Partition ``p`` keeps its marks as bits in
    ``bits[wbase[p] : wbase[p] + nwords[p]]`` (time ``t`` is bit ``t % 64`` of word ``t // 64``),
    the expert marked at each time in ``who[64 * wbase[p] + t]``, and the marks per word in a
    Fenwick tree ``tree[fbase[p] + 1 : fbase[p] + nwords[p] + 1]``. ``last[o]``: the time of
    ``o``'s mark, -1 if none; ``clock[p]``, ``seen[p]``: next time and number of marks.
    ``reset[g]`` empties the cache before group ``g`` and ``measure[g]`` False leaves group
    ``g`` out of ``hit_hist`` (empty arrays: never, always).

    Outputs, with ``D = hit_hist.shape[1] - 1`` at least the largest partition:
    ``hit_hist[layer, d]``: measured accesses of that layer at distance ``d`` (``d = D``: cold);
    ``all_hist[p, d]``: every access (measured or not) of partition ``p`` at distance ``d``;
    ``cold_seen[p, s]``: cold accesses of partition ``p`` that found ``s`` distinct experts
    seen since the last reset (a miss then evicts iff ``s >= C``); ``kmax[p]``: the largest
    group of partition ``p``.
    """
    n_groups = g_layer.shape[0]
    cold = hit_hist.shape[1] - 1
    for g in range(n_groups):
        if reset.shape[0] > 0 and reset[g]:
            _reset(tree, bits, last, clock, seen)
        a0 = g_off[g]
        a1 = g_off[g + 1]
        if a1 == a0:
            continue
        lay = g_layer[g]
        p = obj_part[obj[a0]]
        fb = fbase[p]
        wb = wbase[p]
        nw = nwords[p]
        k = a1 - a0
        if k > kmax[p]:
            kmax[p] = k
        if clock[p] + k > 64 * nw:
            clock[p] = _compact(tree, bits, who, fb, wb, nw, last, clock[p])
        counted = measure.shape[0] == 0 or measure[g]
        fresh = 0  # atomic: cold experts met so far in this group
        for a in range(a0, a1):
            o = obj[a]
            t = last[o]
            if t < 0:
                d = cold
                cold_seen[p, seen[p] + fresh] += 1
                if atomic:
                    fresh += 1
                else:
                    seen[p] += 1
            else:
                d = seen[p] - _marks_upto(tree, bits, fb, wb, t)
                all_hist[p, d] += 1
            if counted:
                hit_hist[lay, d] += 1
            if not atomic:
                if t >= 0:
                    _mark(tree, bits, fb, wb, nw, t, -1)
                now = clock[p]
                clock[p] = now + 1
                _mark(tree, bits, fb, wb, nw, now, 1)
                who[64 * wb + now] = o
                last[o] = now
        if atomic:
            seen[p] += fresh
            for a in range(a0, a1):
                o = obj[a]
                t = last[o]
                if t >= 0:
                    _mark(tree, bits, fb, wb, nw, t, -1)
                now = clock[p]
                clock[p] = now + 1
                _mark(tree, bits, fb, wb, nw, now, 1)
                who[64 * wb + now] = o
                last[o] = now


def scratch(part_sizes: np.ndarray, n_obj: int):
    """Arrays for :func:`stack_histograms` (``fbase`` .. ``seen``) for partitions of
    ``part_sizes`` experts. A partition's window holds 2 x its experts + 64 times, enough for
    its live marks plus one group; it is renumbered when full."""
    part_sizes = np.asarray(part_sizes, np.int64)
    n = part_sizes.shape[0]
    nwords = (2 * part_sizes + 64 + 63) // 64
    wbase = np.zeros(n, np.int64)
    wbase[1:] = np.cumsum(nwords)[:-1]
    fbase = wbase + np.arange(n, dtype=np.int64)  # one extra (unused 0th) entry per tree
    total = int(nwords.sum())
    tree = np.zeros(total + n, np.int32)
    bits = np.zeros(total, np.uint64)
    who = np.full(64 * total, -1, np.int32)
    last = np.full(n_obj, -1, np.int64)
    return fbase, wbase, nwords, tree, bits, who, last, np.zeros(n, np.int64), np.zeros(n, np.int64)
