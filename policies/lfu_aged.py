"""Aged LFU: use counts that decay exponentially, halving every ``half_life`` accesses.

The decayed count at time t of uses at times t_i is ``sum 2**((t_i - t) / half_life)``; ranking
by it equals ranking by ``sum 2**(t_i / half_life)``, kept in log2 form
(``log2(2**a + 2**b) = max + log2(1 + 2**-(|a - b|))``) so it never overflows however long the
trace. Counts survive eviction. Ties: least recently used first.
"""

import math

import numpy as np
from numba import njit

from policies.spec import STRUCT_HEAP, Param, PolicySpec
from policies.state import FP_0, IP_CLOCK, IP_EVENTS, OF_FREQ, OF_K1, OI_K2
from traces._jit import HOT


def prepare(st, ctx):
    """No use yet: log2 of an empty sum."""
    st.of[:, OF_FREQ] = -np.inf
    return np.zeros(0, np.int64)


PID = 5
SPEC = PolicySpec(
    "lfu-aged",
    PID,
    STRUCT_HEAP,
    "decayed use counts (halved every half_life accesses; counts survive eviction)",
    params=(Param("half_life", 1000.0, "accesses after which a use counts half", FP_0),),
    counts_misses=True,
    prepare=prepare,
)


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    x = ip[IP_CLOCK] / fp[FP_0]
    f = of[o, OF_FREQ]
    if f == -math.inf:
        f = x
    elif f >= x:
        f = f + math.log2(1.0 + math.pow(2.0, x - f))
    else:
        f = x + math.log2(1.0 + math.pow(2.0, f - x))
    of[o, OF_FREQ] = f
    of[o, OF_K1] = f
    oi[o, OI_K2] = ip[IP_EVENTS]
