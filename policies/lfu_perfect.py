"""Perfect LFU: counts every use of an expert over the whole run, resident or not.

The count survives eviction, so an expert that was popular long ago keeps its rank.
Ties: least recently used first.
"""

from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec
from policies.state import IP_EVENTS, OF_FREQ, OF_K1, OI_K2
from traces._jit import HOT

PID = 4
SPEC = PolicySpec(
    "lfu-perfect",
    PID,
    STRUCT_HEAP,
    "fewest uses over the whole run (counts survive eviction)",
    counts_misses=True,
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    of[o, OF_FREQ] += 1.0
    of[o, OF_K1] = of[o, OF_FREQ]
    oi[o, OI_K2] = ip[IP_EVENTS]
