"""No cache: every routed expert is fetched when needed and dropped after its layer."""

from numba import njit

from policies.spec import STRUCT_NONE, PolicySpec

PID = 8
SPEC = PolicySpec("none", PID, STRUCT_NONE, "no expert cache: every access is fetched")


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    pass
