"""Aged LFU: use counts that decay exponentially, halving every ``half_life`` accesses.

Stored as ``freq = sum of 2**(t_i / half_life)`` over the uses ``t_i`` (a growing weight instead
of shrinking every count): comparing stored values compares decayed counts at any common time.
When weights grow large, all values are rescaled at once (order is unchanged). Counts survive
eviction. Ties: least recently used first.
"""

import math

from numba import njit

from policies.spec import STRUCT_HEAP, Param, PolicySpec
from policies.state import FP_0, FP_1, IP_CLOCK, IP_EVENTS
from policies.structures import heap_rescale_k1

PID = 5
SPEC = PolicySpec(
    "lfu-aged",
    PID,
    STRUCT_HEAP,
    "decayed use counts (halved every half_life accesses; counts survive eviction)",
    params=(Param("half_life", 1000.0, "accesses after which a use counts half", FP_0),),
)

_RESCALE_AT = 1e250


@njit(cache=True)
def on_access(st, o, is_insert):
    # fp[FP_1] holds log2 of the current scale (subtracted from the exponent).
    expo = st.ip[IP_CLOCK] / st.fp[FP_0] - st.fp[FP_1]
    w = math.pow(2.0, expo)
    if w > _RESCALE_AT:
        factor = 1.0 / w
        heap_rescale_k1(st, factor)
        for i in range(st.freq.shape[0]):
            st.freq[i] *= factor
        st.fp[FP_1] += expo
        w = 1.0
    st.freq[o] += w
    st.k1[o] = st.freq[o]
    st.k2[o] = st.ip[IP_EVENTS]
