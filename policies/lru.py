"""LRU: evict the resident expert used least recently (list; O(1) per access)."""

from numba import njit

from policies.spec import STRUCT_LIST, PolicySpec
from policies.structures import list_move_front

PID = 1
SPEC = PolicySpec("lru", PID, STRUCT_LIST, "least recently used expert is evicted")


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    if not is_insert:
        list_move_front(st, o)
