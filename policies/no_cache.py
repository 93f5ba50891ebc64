"""No cache: every routed expert is fetched when needed and dropped after its layer."""

from numba import njit

from policies.spec import STRUCT_NONE, PolicySpec
from traces._jit import HOT

PID = 8
SPEC = PolicySpec("none", PID, STRUCT_NONE, "no expert cache: every access is fetched")


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    pass
