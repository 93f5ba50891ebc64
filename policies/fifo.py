"""FIFO: evict the expert that entered the cache first; hits do not reorder (list; O(1))."""

from numba import njit

from policies.spec import STRUCT_LIST, PolicySpec
from traces._jit import HOT

PID = 2
SPEC = PolicySpec(
    "fifo", PID, STRUCT_LIST, "first expert in is the first evicted; hits change nothing"
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    pass
