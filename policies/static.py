"""Static popularity pinning (Fiddler-style placement).

The experts most used in a profiling trace (by default the replayed trace itself) are loaded
before the run and rank by that profile for good: eviction takes the resident with the lowest
profile count (ties: least recently used), so the hot set never leaves and the remaining slots
churn among the colder experts.
"""

import numpy as np
from numba import njit

from policies.spec import STRUCT_HEAP, PolicySpec
from policies.state import IP_EVENTS, OF_FREQ, OF_K1, OI_K2
from traces._jit import HOT


def prepare(st, ctx):
    """Profile counts into ``freq``; return the experts to preload (hottest first per partition)."""
    counts = ctx.profile_counts()
    st.of[:, OF_FREQ] = counts
    order = np.lexsort((np.arange(counts.shape[0]), -counts))
    room = st.cap.copy()
    chosen = []
    for o in order:
        p = st.part[o]
        if counts[o] > 0 and st.size[o] <= room[p]:
            room[p] -= st.size[o]
            chosen.append(o)
    return np.asarray(chosen, dtype=np.int64)


PID = 7
SPEC = PolicySpec(
    "static",
    PID,
    STRUCT_HEAP,
    "profile-hottest experts preloaded and kept; the rest churn by profile rank",
    prepare=prepare,
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    of[o, OF_K1] = of[o, OF_FREQ]
    oi[o, OI_K2] = ip[IP_EVENTS]
