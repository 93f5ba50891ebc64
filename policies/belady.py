"""Belady / MIN: evict the resident whose next use lies farthest in the future.

Always admits the new expert. Offline optimal for demand caching (the lower bound on misses);
needs the trace's future, kept by the kernels in ``oi[:, OI_NEXT]`` (NEVER when not used again).
"""

from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec
from policies.state import OF_K1, OI_K2, OI_NEXT
from traces._jit import HOT

PID = 6
SPEC = PolicySpec(
    "belady", PID, STRUCT_HEAP, "offline optimum: evict the farthest next use", uses_future=True
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    of[o, OF_K1] = -float(oi[o, OI_NEXT])
    oi[o, OI_K2] = 0
