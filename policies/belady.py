"""Belady / MIN: evict the resident whose next use lies farthest in the future.

Always admits the new expert. Offline optimal for demand caching (the lower bound on misses);
needs the trace's future, kept by the kernels in ``obj_next`` (NEVER when not used again).
"""

from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec

PID = 6
SPEC = PolicySpec(
    "belady", PID, STRUCT_HEAP, "offline optimum: evict the farthest next use", uses_future=True
)


@njit(cache=True, inline="always")
def on_access(st, o, is_insert):
    st.k1[o] = -float(st.obj_next[o])
    st.k2[o] = 0
