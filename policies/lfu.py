"""LFU (in-cache): evict the resident with the fewest uses since it entered the cache.

Counts restart at 1 on every admission (libCacheSim's LFU). Among equal counts the expert that
reached its count first is evicted (libCacheSim keeps one FIFO list per count, so an expert
joins the back of its new count's list on every hit). Kept the same way here, in count
buckets (O(1) per access); the hook records the count and last-use stamp for inspection.
"""

from numba import njit

from policies.spec import STRUCT_BUCKETS, PolicySpec
from policies.state import IP_EVENTS, OF_K1, OI_K2
from traces._jit import HOT

PID = 3
SPEC = PolicySpec(
    "lfu", PID, STRUCT_BUCKETS, "fewest uses since admission is evicted (ties: FIFO per count)"
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    if is_insert:
        of[o, OF_K1] = 1.0
    else:
        of[o, OF_K1] += 1.0
    oi[o, OI_K2] = ip[IP_EVENTS]
