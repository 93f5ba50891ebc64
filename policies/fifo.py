"""FIFO: evict the expert that entered the cache first; hits do not reorder (list; O(1))."""

from numba import njit

from policies.spec import STRUCT_LIST, PolicySpec

PID = 2
SPEC = PolicySpec("fifo", PID, STRUCT_LIST, "first expert in is the first evicted; hits change nothing")


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    pass
