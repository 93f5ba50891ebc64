"""Aged LFU: use counts that decay exponentially, halving every ``half_life`` accesses.

Stored as ``freq = sum of 2**(t_i / half_life)`` over the uses ``t_i`` (a growing weight instead
of shrinking every count): comparing stored values compares decayed counts at any common time.
When weights grow large, all values are rescaled at once (order is unchanged). Counts survive
eviction. Ties: least recently used first.
"""

import math

from numba import njit

from policies.spec import STRUCT_HEAP, Param, PolicySpec
from policies.state import FP_0, FP_1, IP_CLOCK, IP_EVENTS, OF_FREQ, OF_K1, OI_K2
from traces._jit import HOT

PID = 5
SPEC = PolicySpec(
    "lfu-aged",
    PID,
    STRUCT_HEAP,
    "decayed use counts (halved every half_life accesses; counts survive eviction)",
    params=(Param("half_life", 1000.0, "accesses after which a use counts half", FP_0),),
    counts_misses=True,
)

_RESCALE_LOG2 = 830.0  # rescale before 2**expo nears the float64 limit (2**1024)


@njit(**HOT)
def _rescale(of, fp, expo):
    """Divide every stored weight by 2**expo (same factor for all: the ranking is unchanged)."""
    factor = math.pow(2.0, -expo)
    for i in range(of.shape[0]):
        of[i, OF_K1] *= factor
        of[i, OF_FREQ] *= factor
    fp[FP_1] += expo


@njit(**HOT)
def on_access(oi, of, ip, fp, o, is_insert):
    # fp[FP_1] holds log2 of the current scale (subtracted from the exponent).
    expo = ip[IP_CLOCK] / fp[FP_0] - fp[FP_1]
    if expo > _RESCALE_LOG2:
        _rescale(of, fp, expo)
        expo = 0.0
    w = math.pow(2.0, expo)
    of[o, OF_FREQ] += w
    of[o, OF_K1] = of[o, OF_FREQ]
    oi[o, OI_K2] = ip[IP_EVENTS]
