"""The replay order: a trace's rows turned into (step, layer, expert) accesses.

A step-layer ("group") needs the union of its tokens' experts, ordered by first appearance
(token order, then rank), each expert once, with the number of the group's tokens routed to it.
Experts of all layers share one id space: ``obj = layer_base[layer] + expert``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from traces.trace import Trace

#: "Never used again" in next-use arrays.
NEVER = np.iinfo(np.int64).max


@dataclass
class Accesses:
    """Flat replay arrays of a trace (``G`` groups, ``A`` accesses, ``O`` objects).

    Attributes:
        layer_base (int64[L+1]): first object id of each layer; ``layer_base[L] == O``.
        obj_layer (int16[O]), obj_expert (int16[O]): layer and expert of each object.
        group_offsets (int64[G+1]): accesses of group g are ``group_offsets[g]:group_offsets[g+1]``.
        group_step (int64[G]), group_layer (int16[G]): the step and layer of each group.
        group_prefill (int32[G]), group_decode (int32[G]): prefill and decode tokens in the group.
        obj (int32[A]): object of each access; count (int32[A]): tokens routed to it there.
        row_group (int64[R]): the group of each trace row (rows are in group order).
    """

    layer_base: np.ndarray
    obj_layer: np.ndarray
    obj_expert: np.ndarray
    group_offsets: np.ndarray
    group_step: np.ndarray
    group_layer: np.ndarray
    group_prefill: np.ndarray
    group_decode: np.ndarray
    obj: np.ndarray
    count: np.ndarray
    row_group: np.ndarray

    @property
    def num_objects(self) -> int:
        return int(self.layer_base[-1])

    @property
    def num_accesses(self) -> int:
        return int(self.obj.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_step.shape[0])

    def next_use(self) -> np.ndarray:
        """int64[A]: index of the next access of the same object, or NEVER."""
        return _next_use(self.obj, self.num_objects)

    def access_group(self) -> np.ndarray:
        """int64[A]: the group of each access."""
        return np.repeat(np.arange(self.num_groups, dtype=np.int64), np.diff(self.group_offsets))


def layer_base_of(experts_per_layer) -> np.ndarray:
    epl = np.asarray(experts_per_layer, dtype=np.int64)
    base = np.zeros(epl.shape[0] + 1, np.int64)
    np.cumsum(epl, out=base[1:])
    return base


def build_accesses(trace: Trace) -> Accesses:
    """The replay order of a validated trace (rows sorted by step, layer, seq, pos)."""
    base = layer_base_of(trace.meta.experts_per_layer)
    n_obj = int(base[-1])
    (g_off, g_step, g_layer, g_pre, g_dec, obj, count, row_group) = _build(
        trace.step, trace.layer, trace.phase, trace.offsets, trace.experts, base, n_obj
    )
    obj_layer = np.repeat(
        np.arange(base.shape[0] - 1, dtype=np.int16), np.diff(base).astype(np.int64)
    )
    obj_expert = (np.arange(n_obj, dtype=np.int64) - base[obj_layer]).astype(np.int16)
    return Accesses(base, obj_layer, obj_expert, g_off, g_step, g_layer, g_pre, g_dec, obj,
                    count, row_group)  # fmt: skip


@njit(cache=True)
def _build(step, layer, phase, offsets, experts, layer_base, n_obj):
    n = step.shape[0]
    nnz = experts.shape[0]
    n_groups = 0
    for i in range(n):
        if i == 0 or step[i] != step[i - 1] or layer[i] != layer[i - 1]:
            n_groups += 1
    g_off = np.zeros(n_groups + 1, np.int64)
    g_step = np.empty(n_groups, np.int64)
    g_layer = np.empty(n_groups, np.int16)
    g_pre = np.zeros(n_groups, np.int32)
    g_dec = np.zeros(n_groups, np.int32)
    row_group = np.empty(n, np.int64)
    obj = np.empty(nnz, np.int32)
    count = np.empty(nnz, np.int32)
    stamp = np.full(n_obj, -1, np.int64)
    where = np.zeros(n_obj, np.int64)
    g = -1
    a = 0
    for i in range(n):
        if i == 0 or step[i] != step[i - 1] or layer[i] != layer[i - 1]:
            g += 1
            g_off[g] = a
            g_step[g] = step[i]
            g_layer[g] = layer[i]
        row_group[i] = g
        if phase[i] == 0:
            g_pre[g] += 1
        else:
            g_dec[g] += 1
        lb = layer_base[layer[i]]
        for j in range(offsets[i], offsets[i + 1]):
            o = lb + experts[j]
            if stamp[o] != g:
                stamp[o] = g
                where[o] = a
                obj[a] = o
                count[a] = 1
                a += 1
            else:
                count[where[o]] += 1
    g_off[n_groups] = a
    return g_off, g_step, g_layer, g_pre, g_dec, obj[:a].copy(), count[:a].copy(), row_group


@njit(cache=True)
def _next_use(obj, n_obj):
    n = obj.shape[0]
    nxt = np.empty(n, np.int64)
    last = np.full(n_obj, NEVER, np.int64)
    for i in range(n - 1, -1, -1):
        o = obj[i]
        nxt[i] = last[o]
        last[o] = i
    return nxt
