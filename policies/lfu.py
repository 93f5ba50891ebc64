"""LFU (in-cache): evict the resident with the fewest uses since it entered the cache.

Counts restart at 1 on every admission (libCacheSim's LFU). Among equal counts the expert that
reached its count first is evicted (libCacheSim keeps one FIFO list per count, so an expert
joins the back of its new count's list on every hit): key = (count, stamp of last use).
"""

from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec
from policies.state import IP_EVENTS

PID = 3
SPEC = PolicySpec("lfu", PID, STRUCT_HEAP, "fewest uses since admission is evicted (ties: FIFO per count)")


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    if is_insert:
        st.k1[o] = 1.0
    else:
        st.k1[o] += 1.0
    st.k2[o] = st.ip[IP_EVENTS]
