"""LRU: evict the resident expert used least recently (list; O(1) per access)."""

from numba import njit

from policies.spec import STRUCT_LIST, PolicySpec
from traces._jit import HOT

PID = 1
SPEC = PolicySpec(
    "lru", PID, STRUCT_LIST, "least recently used expert is evicted", move_on_hit=True
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    pass  # the request path moves the expert to the recent end of the list (move_on_hit)
