"""Cache state shared by every policy: a few flat arrays (numba-cacheable, cheap to pass).

Objects are experts numbered across layers (``obj = layer_base[layer] + expert``). The cache is
split into partitions: one for a global pool, one per layer for a per-layer partition. Each
partition has a capacity in size units (slots, or bytes for a byte budget) and, for the policies
that need them, a circular doubly-linked list and an indexed binary min-heap.

Jitted code receives the arrays one by one, never the tuple: numba reference-counts every array
of a tuple at each call, which costs about 100 ns per call for this state (measured).
Per-object integer fields live in the columns of ``oi``, float fields in ``of``; the ``OI_*``,
``OF_*`` and ``P_*`` constants name the columns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# status of an object
ABSENT = 0
RESIDENT = 1
IN_FLIGHT = 2  # a transfer is queued or running; its slot is reserved
PINNED = 3  # always resident (declared pinned); never evicted, never counted as a miss

# oi: per-object integers
OI_PART = 0  # partition of the object
OI_SIZE = 1  # size units it takes (1 for slot budgets, bytes for byte budgets)
OI_BYTES = 2  # bytes of its weights (what a transfer moves)
OI_PIN = 3  # protection stamp relative to the current group (see simulator/kernels.py)
OI_K2 = 4  # heap key, second part (tie-break)
OI_NEXT = 5  # index of the object's next access (maintained by the kernels)
OI_HPOS = 6  # position in its partition's heap, -1 when not in a heap
OI_LAYER = 7  # the object's MoE layer
N_OI = 8

# of: per-object floats
OF_K1 = 0  # heap key, first part: the victim is the smallest (k1, k2)
OF_FREQ = 1  # counts that outlive residency (perfect/aged LFU, static profile)
N_OF = 2

# nodes: int64[O + 2 + P, 5] count buckets (LFU): a pool of bucket nodes, then one sentinel row
# per partition heading a circular list of its non-empty buckets in increasing count order.
# An object in a bucket policy keeps its node in OI_HPOS and its place in the bucket in links.
N_COUNT = 0  # the bucket's count (-1 for a sentinel)
N_HEAD = 1  # oldest object in the bucket (-1 when empty)
N_TAIL = 2  # newest object in the bucket
N_PREV = 3  # neighbouring buckets (sentinel-terminated circular list; free list uses N_NEXT)
N_NEXT = 4

# links: int32[O + P, 2] circular lists; row O + p is partition p's sentinel.
L_PREV = 0  # towards the eviction end: links[sentinel, L_PREV] is the next victim
L_NEXT = 1  # towards the recent end: links[sentinel, L_NEXT] is the most recent

# parts: per-partition integers
P_USED = 0  # size units in use
P_CAP = 1  # capacity in size units
P_HLEN = 2  # entries in the partition's heap
P_HBASE = 3  # first index of the partition's heap in ``heap``
N_P = 4

# ip: integer scalars
IP_POLICY = 0  # policy id
IP_CLOCK = 1  # accesses seen so far
IP_INSERTS = 2  # admissions so far
IP_STRUCT = 3  # STRUCT_LIST / STRUCT_HEAP / STRUCT_NONE of the policy
IP_EVENTS = 4  # admissions and touches so far: a unique, increasing tie-break stamp
IP_MOVE_ON_HIT = 5  # list policies: 1 if a hit moves the object to the recent end
IP_COUNTS_MISSES = 6  # 1 if the hook also sees uses of objects that are not cached
IP_FUTURE = 7  # 1 if the policy reads OI_NEXT (the kernels then keep it up to date)
IP_BFREE = 8  # first free bucket node (-1: none)
IP_NLAYERS = 9  # MoE layers of the model

# heap: float64[O, 3] rows of per-partition indexed min-heaps, keys stored inline for locality
H_K1 = 0  # copy of the object's OF_K1
H_K2 = 1  # copy of its OI_K2 (exact as a float below 2**53)
H_OBJ = 2  # the object

# fp: float parameters, policy-specific (documented by each policy)
FP_0 = 0
FP_1 = 1
FP_2 = 2


class CacheState(NamedTuple):
    """Arrays of one simulated cache. ``O`` objects, ``P`` partitions.

    status (int8[O]): ABSENT / RESIDENT / IN_FLIGHT / PINNED.
    oi (int64[O, N_OI]), of (float64[O, N_OF]): per-object fields (see the OI_/OF_ columns).
    links (int32[O+P, 2]): per-partition circular lists.
    heap (float64[O, 3]): per-partition indexed min-heaps of rows (k1, k2, object); partition
        p uses rows ``parts[p, P_HBASE]:parts[p, P_HBASE] + parts[p, P_HLEN]``.
    nodes (int64[O+2+P, 5]): count buckets for bucket policies (see the N_* columns).
    A policy whose ``attach`` hook needs more data replaces ``of`` (extra columns after the
    OF_* ones) and, if it keeps no buckets, ``nodes`` (rows of its own); see
    policies/moe_infinity.py. The kernels only pass these arrays on.
    parts (int64[P, N_P]): used, capacity and heap bounds of each partition.
    stash (int32[O]): scratch space for the ordered search of a heap.
    ip (int64[16]), fp (float64[8]): policy id, clocks and policy parameters.

    Pass ``*state`` to the kernels: they take these arrays in this order.
    """

    status: np.ndarray
    oi: np.ndarray
    of: np.ndarray
    links: np.ndarray
    heap: np.ndarray
    nodes: np.ndarray
    parts: np.ndarray
    stash: np.ndarray
    ip: np.ndarray
    fp: np.ndarray

    @property
    def num_objects(self) -> int:
        return int(self.status.shape[0])

    @property
    def part(self) -> np.ndarray:
        return self.oi[:, OI_PART]

    @property
    def size(self) -> np.ndarray:
        return self.oi[:, OI_SIZE]

    @property
    def cap(self) -> np.ndarray:
        return self.parts[:, P_CAP]

    @property
    def used(self) -> np.ndarray:
        return self.parts[:, P_USED]

    @property
    def freq(self) -> np.ndarray:
        return self.of[:, OF_FREQ]


def new_state(
    policy_id: int,
    structure: int,
    part: np.ndarray,
    size: np.ndarray,
    cap: np.ndarray,
    hbase: np.ndarray,
    fparams: tuple[float, ...] = (),
    nbytes: np.ndarray | None = None,
    layer: np.ndarray | None = None,
) -> CacheState:
    """An empty cache. ``part``/``size``/``nbytes`` per object, ``cap``/``hbase`` per partition."""
    n_obj = int(part.shape[0])
    n_part = int(cap.shape[0])
    links = np.full((n_obj + n_part, 2), -1, np.int32)
    sentinels = np.arange(n_obj, n_obj + n_part, dtype=np.int32)
    links[sentinels, L_PREV] = sentinels
    links[sentinels, L_NEXT] = sentinels
    oi = np.zeros((n_obj, N_OI), np.int64)
    oi[:, OI_PART] = part
    oi[:, OI_SIZE] = size
    oi[:, OI_BYTES] = size if nbytes is None else nbytes
    oi[:, OI_PIN] = -1
    oi[:, OI_NEXT] = np.iinfo(np.int64).max
    oi[:, OI_HPOS] = -1
    if layer is not None:
        oi[:, OI_LAYER] = layer
    parts = np.zeros((n_part, N_P), np.int64)
    parts[:, P_CAP] = cap
    parts[:, P_HBASE] = hbase
    nodes = np.full((n_obj + 2 + n_part, 5), -1, np.int64)
    nodes[: n_obj + 1, N_NEXT] = np.arange(1, n_obj + 2)  # the free list
    sent = np.arange(n_obj + 2, n_obj + 2 + n_part)
    nodes[sent, N_PREV] = sent
    nodes[sent, N_NEXT] = sent
    ip = np.zeros(16, np.int64)
    ip[IP_POLICY] = policy_id
    ip[IP_STRUCT] = structure
    ip[IP_BFREE] = 0
    if layer is not None and len(layer):
        ip[IP_NLAYERS] = int(np.max(layer)) + 1
    fp = np.zeros(8, np.float64)
    fp[: len(fparams)] = fparams
    return CacheState(
        status=np.zeros(n_obj, np.int8),
        oi=oi,
        of=np.zeros((n_obj, N_OF), np.float64),
        links=links,
        heap=np.zeros((n_obj, 3), np.float64),
        nodes=nodes,
        parts=parts,
        stash=np.zeros(n_obj + 2, np.int32),
        ip=ip,
        fp=fp,
    )
