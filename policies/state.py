"""Cache state shared by every policy: plain arrays in one NamedTuple (numba-cacheable).

Objects are experts numbered across layers (``obj = layer_base[layer] + expert``). The cache is
split into partitions: one for a global pool, one per layer for a per-layer partition. Each
partition has a capacity in size units (slots, or bytes for a byte budget) and, for the policies
that need them, a circular doubly-linked list and an indexed binary min-heap.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# status of an object
ABSENT = 0
RESIDENT = 1
IN_FLIGHT = 2  # a transfer is queued or running; its slot is reserved
PINNED = 3  # always resident (declared pinned); never evicted, never counted as a miss

# ip (integer parameters) slots
IP_POLICY = 0  # policy id
IP_CLOCK = 1  # logical clock: accesses seen so far
IP_INSERTS = 2  # insertions so far (FIFO order of arrival)
IP_STRUCT = 3  # STRUCT_LIST / STRUCT_HEAP / STRUCT_NONE of the policy
IP_EVENTS = 4  # admissions and touches so far: a unique, increasing tie-break stamp

# fp (float parameters) slots: policy-specific, documented by each policy
FP_0 = 0
FP_1 = 1
FP_2 = 2


class CacheState(NamedTuple):
    """Arrays of one simulated cache. ``O`` objects, ``P`` partitions.

    status (int8[O]): ABSENT / RESIDENT / IN_FLIGHT / PINNED.
    part (int32[O]): partition of each object.
    size (int64[O]): size units an object takes (1 for slot budgets, bytes for byte budgets).
    nbytes (int64[O]): bytes of each object's weights (what a transfer moves).
    pin (int64[O]): protection stamp relative to the current group (see kernels).
    k1 (float64[O]), k2 (int64[O]): heap keys; the victim is the smallest (k1, k2).
    freq (float64[O]): counts that outlive residency (perfect/aged LFU, static profile).
    obj_next (int64[O]): index of the object's next access (maintained by the kernels).
    prev, nxt (int32[O+P]): circular lists; node ``O + p`` is partition p's sentinel.
        ``nxt[sentinel]`` is the most recent end, ``prev[sentinel]`` the eviction end.
    heap (int32[O]), hpos (int32[O]), hlen (int64[P]), hbase (int64[P]): indexed min-heaps;
        partition p uses ``heap[hbase[p]:hbase[p] + hlen[p]]``.
    used (int64[P]), cap (int64[P]): size units in use and capacity of each partition.
    stash (int32[O]): scratch space for skipping protected heap entries.
    ip (int64[8]), fp (float64[8]): policy id, clocks and policy parameters.
    """

    status: np.ndarray
    part: np.ndarray
    size: np.ndarray
    nbytes: np.ndarray
    pin: np.ndarray
    k1: np.ndarray
    k2: np.ndarray
    freq: np.ndarray
    obj_next: np.ndarray
    prev: np.ndarray
    nxt: np.ndarray
    heap: np.ndarray
    hpos: np.ndarray
    hlen: np.ndarray
    hbase: np.ndarray
    used: np.ndarray
    cap: np.ndarray
    stash: np.ndarray
    ip: np.ndarray
    fp: np.ndarray


def new_state(
    policy_id: int,
    structure: int,
    part: np.ndarray,
    size: np.ndarray,
    cap: np.ndarray,
    hbase: np.ndarray,
    fparams: tuple[float, ...] = (),
    nbytes: np.ndarray | None = None,
) -> CacheState:
    """An empty cache. ``part``/``size`` per object, ``cap``/``hbase`` per partition."""
    n_obj = int(part.shape[0])
    n_part = int(cap.shape[0])
    prev = np.empty(n_obj + n_part, np.int32)
    nxt = np.empty(n_obj + n_part, np.int32)
    sentinels = np.arange(n_obj, n_obj + n_part, dtype=np.int32)
    prev[sentinels] = sentinels
    nxt[sentinels] = sentinels
    prev[:n_obj] = -1
    nxt[:n_obj] = -1
    ip = np.zeros(8, np.int64)
    ip[IP_POLICY] = policy_id
    ip[IP_STRUCT] = structure
    fp = np.zeros(8, np.float64)
    fp[: len(fparams)] = fparams
    return CacheState(
        status=np.zeros(n_obj, np.int8),
        part=np.ascontiguousarray(part, dtype=np.int32),
        size=np.ascontiguousarray(size, dtype=np.int64),
        nbytes=np.ascontiguousarray(size if nbytes is None else nbytes, dtype=np.int64),
        pin=np.full(n_obj, -1, np.int64),
        k1=np.zeros(n_obj, np.float64),
        k2=np.zeros(n_obj, np.int64),
        freq=np.zeros(n_obj, np.float64),
        obj_next=np.full(n_obj, np.iinfo(np.int64).max, np.int64),
        prev=prev,
        nxt=nxt,
        heap=np.full(n_obj, -1, np.int32),
        hpos=np.full(n_obj, -1, np.int32),
        hlen=np.zeros(n_part, np.int64),
        hbase=np.ascontiguousarray(hbase, dtype=np.int64),
        used=np.zeros(n_part, np.int64),
        cap=np.ascontiguousarray(cap, dtype=np.int64),
        stash=np.zeros(n_obj, np.int32),
        ip=ip,
        fp=fp,
    )
