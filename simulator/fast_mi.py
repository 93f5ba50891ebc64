"""MoE-Infinity's activation-aware eviction for the timed fast path: residents ranked per layer.

MoE-Infinity's eviction (:mod:`policies.moe_infinity`) evicts the resident with the lowest
priority ``(M[l', e] + 1e-8) * decay(l')`` at the current step-layer, ``M`` the group's matched
snapshots summed, ``decay`` a function of the distance from the current layer to ``l'`` only;
ties go to the least recently used. The general kernel finds that victim with a scan of every
resident, each eviction (about 1.4 us at 166 slots, 22 M times on the DeepSeek training set).

Here each layer's residents are kept (in no order), and each layer's lowest evictable resident
by (summed count in the current match set, recency stamp) is found by a scan of that layer
alone (``stamp``: a clock ticked at every admission and hit, the order the general kernel's
list keeps). Inside one layer the decay is common, so that resident has the layer's lowest
priority, and the victim is the lowest of at most one per layer. Each layer's candidate is
kept between evictions and a tournament tree over the layers holds the lowest (see
:func:`victim` for when a kept candidate still holds); a layer is scanned again only when its
residents changed or its candidate no longer holds. A change of match set (about one group in
five on the training set) only marks every layer to be scanned again: the sums are read from
the snapshots during the scan, so nothing is re-sorted (an earlier version kept each layer
sorted: as fast, with more code, the re-sorting costing what the scans cost here). On the
training set at 166 slots the kernel takes about a quarter of the general kernel's time, with
the same record.

This gives the general kernel's victim exactly where the counts are whole numbers, non-negative
and below 2**24 (:func:`exact_for`; traces only give such counts): they are then exact in the
float32 copy kept here, two different sums differ by at least 1, far above the rounding of the
products, so the order by sum is the order by priority, and equal sums in a layer have equal
priorities (one snapshot) or are compared by their priority as the general kernel computes it,
bit for bit (several snapshots). Collections of other values replay on the general kernel.

State (``mi``, a tuple of arrays, as :func:`new_state` makes it; the comments there name them):
each layer's residents and their number, each resident's place in its layer's row, its recency
stamp and its layer, the collection's snapshots (float32[S, O]), each group's matched
snapshots (int64[G, 4], -1: none), ``ms`` (the current set, the clock, the model's layers, the
stale stack's size, the tree's first leaf, the protection the kept candidates are for), each
layer's kept candidate (``ho``: expert, -1 none, ``STALE`` to be found again), its priority,
stamp and whether no resident of its layer ranks before it, the decays by (current layer,
layer), the tree and the stack of layers whose residents changed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.moe_infinity import EPS, N_MATCH
from policies.state import IN_FLIGHT, IP_NLAYERS, OI_LAYER, RESIDENT
from traces._jit import HOT

M_CLOCK = 4  # ms[0:4]: the current set of snapshots (-1: none)
M_LAYERS = 5
M_NSTALE = 6  # layers in the stale stack ``sk``
M_LEAF = 7  # first leaf of the tournament tree ``tr``
M_KEY = 8  # ms[8:12]: the (group, pin_lo, pin_hi, need_limit) the kept lowest residents are for
STALE = -2  # ``ho[l]``: layer l's lowest resident is to be found again (-1: none evictable)
_LIMIT = 2.0**24  # counts at or above: the general kernel's scan (see the module)


def exact_for(st) -> bool:
    """Whether the ranking gives the general kernel's victims for this state's snapshots:
    whole, non-negative counts below 2**24 (see the module)."""
    snap = st.of[:, 2:]
    return bool(np.all(snap >= 0) and np.all(snap < _LIMIT) and np.all(snap == np.floor(snap)))


def new_state(st, n_groups: int):
    """The ranking's arrays for MoE-Infinity's attached state ``st`` (nothing resident)."""
    lay = st.oi[:, OI_LAYER].astype(np.int64)
    n_layers = int(st.ip[IP_NLAYERS])
    width = int(np.bincount(lay, minlength=n_layers).max()) if lay.size else 1
    leaf = 1
    while leaf < n_layers:
        leaf *= 2
    ms = np.full(12, -1, np.int64)
    ms[M_CLOCK] = 0
    ms[M_LAYERS] = n_layers
    ms[M_NSTALE] = 0
    ms[M_LEAF] = leaf
    tr = np.full(2 * leaf, -1, np.int64)
    tr[leaf : leaf + n_layers] = np.arange(n_layers)
    return (
        np.zeros((n_layers, max(width, 1)), np.int32),  # lr
        np.zeros(n_layers, np.int64),  # ln
        np.zeros(lay.shape[0], np.int64),  # pos: place in its layer's row of ``lr``
        np.zeros(lay.shape[0], np.int64),  # stamp
        lay,
        np.ascontiguousarray(st.of[:, 2:].T, np.float32),  # snap: whole counts < 2**24, exact
        np.ascontiguousarray(st.nodes[:n_groups, 1 : 1 + N_MATCH]),  # gm
        ms,
        np.full(n_layers, STALE, np.int64),  # ho
        np.full(n_layers, np.inf),  # hk
        np.zeros(n_layers, np.int64),  # hs
        np.zeros(n_layers, np.int64),  # hf
        _decays(n_layers),  # wt
        tr,
        np.zeros(n_layers, np.int64),  # sk
    )


def _decays(n_layers: int) -> np.ndarray:
    """``w[cur, l]``: the decay of layer ``l`` at layer ``cur``, as the general kernel computes
    it (``d`` = 1 .. L layers until its next use)."""
    w = np.empty((n_layers, n_layers), np.float64)
    for cur in range(n_layers):
        for l in range(n_layers):
            d = (l - cur - 1) % n_layers + 1
            w[cur, l] = 1.0 - d / (n_layers + 1.0)
    return w


def dummy_state():
    """Placeholder arrays for the other policies (never read)."""
    i1 = np.zeros(1, np.int64)
    return (np.zeros((1, 1), np.int32), i1, i1, i1, i1, np.zeros((1, 1), np.float32),
            np.full((1, N_MATCH), -1, np.int64), np.zeros(12, np.int64), i1, np.zeros(1), i1,
            i1, np.zeros((1, 1)), np.zeros(2, np.int64), i1)  # fmt: skip


@njit(inline="always", **HOT)
def evictable(status, pin, need_by, arrive, o, pin_lo, pin_hi, need_limit, g, now):
    """:func:`policies.dispatch.evictable` on the timed fast path's state (``g``: the current
    group); :mod:`simulator.fast_timed` uses it too."""
    s = status[o]
    if s == IN_FLIGHT:
        if arrive[o] > now:
            return False
    elif s != RESIDENT:
        return False
    pv = pin[o]
    if pv >= pin_lo and pv <= pin_hi:
        return False
    nb = need_by[o]
    return nb > need_limit or nb <= g


@njit(inline="always", **HOT)
def _sum(snap, ms, o):
    """``o``'s count summed over the current set's snapshots (whole numbers: exact); the
    common case of one snapshot or none (unbatched decoding) in one load."""
    s = ms[0]
    if ms[1] < 0:
        return np.float64(snap[s, o]) if s >= 0 else 0.0
    v = 0.0
    for j in range(N_MATCH):
        s = ms[j]
        if s >= 0:
            v += snap[s, o]
    return v


@njit(inline="always", **HOT)
def _stale(ho, sk, ms, l):
    """Layer ``l``'s kept lowest resident no longer holds: onto the stale stack."""
    if ho[l] != STALE:
        ho[l] = STALE
        sk[ms[M_NSTALE]] = l
        ms[M_NSTALE] += 1


@njit(inline="always", **HOT)
def _restamp(ms, stamp, ho, sk, lay, o):
    """``o`` is the most recently used now (the general kernel's list front): a new stamp, and
    its layer's kept lowest resident to be found again."""
    ms[M_CLOCK] += 1
    stamp[o] = ms[M_CLOCK]
    _stale(ho, sk, ms, lay[o])


@njit(inline="always", **HOT)
def admit(mi, o):
    """``o`` enters the cache, the most recently used."""
    lr, ln, pos, stamp, lay, snap, gm, ms, ho, hk, hs, hf, wt, tr, sk = mi
    l = lay[o]
    pos[o] = ln[l]
    lr[l, ln[l]] = o
    ln[l] += 1
    _restamp(ms, stamp, ho, sk, lay, o)


@njit(inline="always", **HOT)
def touch(mi, o):
    """A use of the cached ``o``: the most recently used now."""
    lr, ln, pos, stamp, lay, snap, gm, ms, ho, hk, hs, hf, wt, tr, sk = mi
    _restamp(ms, stamp, ho, sk, lay, o)


@njit(inline="always", **HOT)
def remove(mi, o):
    """``o`` leaves the cache (an eviction or a cancelled prefetch): its layer's last resident
    takes its place."""
    lr, ln, pos, stamp, lay, snap, gm, ms, ho, hk, hs, hf, wt, tr, sk = mi
    l = lay[o]
    n = ln[l] - 1
    last = lr[l, n]
    lr[l, pos[o]] = last
    pos[last] = pos[o]
    ln[l] = n
    _stale(ho, sk, ms, l)


@njit(inline="always", **HOT)
def _priority(snap, gm, g, o, w):
    """:func:`policies.moe_infinity.priority` at group ``g`` with decay ``w``, bit for bit."""
    if gm[g, 1] < 0:  # one snapshot or none: the same sums, unrolled
        s = gm[g, 0]
        return (snap[s, o] + EPS) * w if s >= 0 else EPS * w
    p = 0.0
    found = False
    for j in range(N_MATCH):
        s = gm[g, j]
        if s >= 0:
            p += (snap[s, o] + EPS) * w
            found = True
    if not found:
        p = EPS * w
    return p


@njit(inline="always", **HOT)
def _lowest(mi, status, pin, need_by, arrive, pin_lo, pin_hi, need_limit, g, now, l, w,
            several):  # fmt: skip
    """Layer ``l``'s evictable resident of lowest (sum, priority, recency) into ``ho[l]``,
    ``hk[l]`` (its priority), ``hs[l]`` (its stamp); ``ho[l]`` = -1 and ``hk[l]`` = inf if
    none. Equal sums have equal priorities with one snapshot or none; with several they may
    round apart, so the priority decides between them, as the general kernel's does.
    ``hf[l]``: 1 if no resident of the layer, evictable or not, ranks before it (found with
    one snapshot or none), so it stays the lowest for as long as it is evictable and the
    layer's residents and the match set stay as they are."""
    lr, ln, pos, stamp, lay, snap, gm, ms, ho, hk, hs, hf, wt, tr, sk = mi
    best = -1
    bv = 0.0
    bp = 0.0
    bs = 0
    pv = np.inf  # the lowest (sum, stamp) among the protected residents
    ps = 0
    for i in range(ln[l]):
        c = lr[l, i]
        v = _sum(snap, ms, c)
        sc = stamp[c]
        if evictable(status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now):
            if several:
                p = _priority(snap, gm, g, c, w)
                if best < 0 or v < bv or (v == bv and (p < bp or (p == bp and sc < bs))):
                    best, bv, bp, bs = c, v, p, sc
            elif best < 0 or v < bv or (v == bv and sc < bs):
                best, bv, bs = c, v, sc
        elif v < pv or (v == pv and sc < ps):
            pv = v
            ps = sc
    ho[l] = best
    hf[l] = 0
    if best < 0:
        hk[l] = np.inf
        return
    hk[l] = bp if several else _priority(snap, gm, g, best, w)
    hs[l] = bs
    if not several and (bv < pv or (bv == pv and bs < ps)):
        hf[l] = 1


@njit(inline="always", **HOT)
def _better(hk, hs, a, b):
    """The layer (``a`` or ``b``, -1: none) whose kept resident ranks first."""
    if b < 0:
        return a
    if a < 0:
        return b
    if hk[b] < hk[a] or (hk[b] == hk[a] and hs[b] < hs[a]):
        return b
    return a


@njit(inline="always", **HOT)
def _climb(tr, hk, hs, i):
    """The tournament tree again from node ``i`` up to its root."""
    while i >= 1:
        tr[i] = _better(hk, hs, tr[2 * i], tr[2 * i + 1])
        i >>= 1


@njit(inline="always", **HOT)
def victim(mi, status, pin, need_by, arrive, pin_lo, pin_hi, need_limit, g, now, cur):
    """The general kernel's MoE-Infinity victim at group ``g`` (layer ``cur``), or -1: the
    lowest priority among the evictable residents, ties to the least recently used; at
    ``pin_lo`` <= 1 (the first group) the least recently used, as the general kernel does.

    Each layer's lowest evictable resident is kept between calls, and a tournament tree over
    the layers holds the lowest of them. While the group and the protection stay the same,
    experts only ever become protected, never free, so a kept one is a lower bound: where the
    lowest of all is still evictable it is the victim, else its layer is looked at again. When
    they change, a kept resident that no resident of its layer ranks before (``hf``) stays
    while it is evictable, with its priority at this layer; other layers are looked at again.
    A layer whose residents changed (the stale stack) is always looked at again, and every
    layer when the match set changes."""
    lr, ln, pos, stamp, lay, snap, gm, ms, ho, hk, hs, hf, wt, tr, sk = mi
    n_layers = ms[M_LAYERS]
    if pin_lo <= 1:
        best = -1
        bs = 0
        for l in range(n_layers):
            for i in range(ln[l]):
                c = lr[l, i]
                if (best < 0 or stamp[c] < bs) and evictable(
                    status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now
                ):
                    best = c
                    bs = stamp[c]
        return best
    again = (ms[M_KEY] != g or ms[M_KEY + 1] != pin_lo or ms[M_KEY + 2] != pin_hi
             or ms[M_KEY + 3] != need_limit)  # fmt: skip
    same = True
    for j in range(N_MATCH):
        if gm[g, j] != ms[j]:
            same = False
    if not same:
        for j in range(N_MATCH):  # the sums change: every layer is scanned again
            ms[j] = gm[g, j]
        for l in range(n_layers):
            ho[l] = STALE
        again = True
    several = gm[g, 1] >= 0
    leaf = ms[M_LEAF]
    if again:
        ms[M_KEY] = g
        ms[M_KEY + 1] = pin_lo
        ms[M_KEY + 2] = pin_hi
        ms[M_KEY + 3] = need_limit
        ms[M_NSTALE] = 0
        for l in range(n_layers):
            c = ho[l]
            w = wt[cur, l]
            if (
                c >= 0
                and hf[l] != 0
                and not several
                and evictable(status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now)
            ):
                hk[l] = _priority(snap, gm, g, c, w)
            else:
                _lowest(mi, status, pin, need_by, arrive, pin_lo, pin_hi, need_limit, g, now, l,
                        w, several)  # fmt: skip
        for i in range(leaf - 1, 0, -1):
            tr[i] = _better(hk, hs, tr[2 * i], tr[2 * i + 1])
    while True:
        for x in range(ms[M_NSTALE]):
            l = sk[x]
            _lowest(mi, status, pin, need_by, arrive, pin_lo, pin_hi, need_limit, g, now, l,
                    wt[cur, l], several)  # fmt: skip
            _climb(tr, hk, hs, (leaf + l) >> 1)
        ms[M_NSTALE] = 0
        bl = tr[1]
        if bl < 0 or ho[bl] < 0:
            return -1
        c = ho[bl]
        if evictable(status, pin, need_by, arrive, c, pin_lo, pin_hi, need_limit, g, now):
            return c
        _stale(ho, sk, ms, bl)
