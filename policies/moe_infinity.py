"""MoE-Infinity's activation-aware eviction: evict the resident with the lowest priority.

MoE-Infinity's paper ranks cached experts with the same activation-aware priority it prefetches
by (``../shared/docs/policies.md``): at the current step-layer ``l``, expert ``e`` of layer ``l'``
scores ``(M[l', e] + 1e-8) * (1 - d / (L + 1))``, ``M`` the expert activation matrix the current
sequence matched in the collection (simulator/moe_infinity.py) and ``d`` the distance in layers
to its next possible use: ``l' - l`` for a later layer of this forward pass, ``L - (l - l')`` for
this or an earlier layer (its next use is in the next pass). Summed over the group's sequences
(up to four; the rest are ignored). With no match (an empty matrix), only the decay ranks:
the expert whose layer comes round last goes first. Ties: least recently used first.

The priority changes at every layer, so the victim is found by a scan of the partition's
residents (O(cache) per eviction) in :func:`policies.dispatch.victim`; the residents are kept in
LRU order for the ties. The open-source runtime's rule (counts since load) is ``lfu``, also
named ``moe-infinity-lfu``.

Data (attached before the replay by :func:`attach`): ``of[:, 2 + s]`` the snapshot ``s`` of the
collection (float, by object); ``nodes[g]`` = (layer of group g, up to four matched snapshot ids,
-1 for none); ``oi[:, OI_LAYER]`` and ``ip[IP_NLAYERS]`` as the state has them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.spec import STRUCT_LIST, PolicySpec
from policies.state import IP_NLAYERS, OI_LAYER
from policies.state import L_PREV as L_PREV_
from traces._jit import HOT

PID = 9
EPS = 1e-8
N_MATCH = 4  # matched snapshots kept per group


def attach(state, ctx):
    """Attach the matching pass's snapshots and per-group matches to ``state``."""
    m = ctx.moe_infinity_matches()
    g_layer = ctx.group_layer()
    n_obj = state.num_objects
    n_snap = m.snap.shape[0]
    of = np.zeros((n_obj, 2 + max(n_snap, 1)), np.float64)
    of[:, :2] = state.of
    if n_snap:
        of[:, 2 : 2 + n_snap] = m.snap.T
    n_groups = g_layer.shape[0]
    nodes = np.full((max(n_groups, state.nodes.shape[0]), 5), -1, np.int64)
    nodes[:n_groups, 0] = g_layer
    counts = np.diff(m.off)
    for j in range(N_MATCH):  # the j-th match of each group that has one
        has = counts > j
        nodes[:n_groups][has, 1 + j] = m.ids[m.off[:-1][has] + j]
    return state._replace(of=of, nodes=nodes)


SPEC = PolicySpec(
    "moe-infinity",
    PID,
    STRUCT_LIST,
    "MoE-Infinity's activation-aware eviction: lowest matched activation x layer decay first",
    move_on_hit=True,
    attach=attach,
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    pass  # the list keeps recency (ties); the priority is computed at eviction time


@njit(inline="always", **HOT)
def priority(oi, of, nodes, ip, o, g):
    """Priority of object ``o`` at group ``g`` (lower: evicted first); the rule as written."""
    n_layers = ip[IP_NLAYERS]
    cur = nodes[g, 0]
    d = (oi[o, OI_LAYER] - cur - 1) % n_layers + 1  # 1 .. L layers until its next use
    decay = 1.0 - d / (n_layers + 1.0)
    p = 0.0
    found = False
    for j in range(1, 1 + N_MATCH):
        s = nodes[g, j]
        if s >= 0:
            p += (of[o, 2 + s] + EPS) * decay
            found = True
    if not found:
        p = EPS * decay
    return p


@njit(inline="always", **HOT)
def victim_scan(status, oi, of, links, nodes, parts, ip, p, g, pin_lo, pin_hi, need_by,
                need_limit, arrive, now, evictable):  # fmt: skip
    """The evictable resident of partition ``p`` with the lowest :func:`priority` at group ``g``
    (ties: the least recently used), or -1. The common one-match case is computed without the
    general loop; it gives the same values as :func:`priority`."""
    sentinel = links.shape[0] - parts.shape[0] + p
    n_layers = ip[IP_NLAYERS]
    cur = nodes[g, 0]
    single = nodes[g, 1] >= 0 and nodes[g, 2] < 0
    col = 2 + nodes[g, 1]
    best = -1
    best_p = 0.0
    c = links[sentinel, L_PREV_]
    while c != sentinel:
        if evictable(status, oi, c, pin_lo, pin_hi, need_by, need_limit, arrive, now):
            if single:
                d = oi[c, OI_LAYER] - cur
                if d <= 0:
                    d += n_layers
                pc = (of[c, col] + EPS) * (1.0 - d / (n_layers + 1.0))
            else:
                pc = priority(oi, of, nodes, ip, c, g)
            if best < 0 or pc < best_p:
                best = c
                best_p = pc
        c = links[c, L_PREV_]
    return best
