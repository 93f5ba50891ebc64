"""Perfect LFU: counts every use of an expert over the whole run, resident or not.

The count survives eviction, so an expert that was popular long ago keeps its rank.
Ties: least recently used first.
"""

from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec
from policies.state import IP_EVENTS

PID = 4
SPEC = PolicySpec("lfu-perfect", PID, STRUCT_HEAP, "fewest uses over the whole run (counts survive eviction)")


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    st.freq[o] += 1.0
    st.k1[o] = st.freq[o]
    st.k2[o] = st.ip[IP_EVENTS]
