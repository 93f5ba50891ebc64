"""What a policy declares about itself: its name, id, structure, help text and parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

STRUCT_LIST = 0  # residents kept in a per-partition list (LRU, FIFO)
STRUCT_HEAP = 1  # residents ranked by a key (k1, k2) in a per-partition min-heap
STRUCT_NONE = 2  # nothing is cached
STRUCT_BUCKETS = 3  # residents in count buckets, FIFO within a bucket (O(1) LFU)


@dataclass(frozen=True)
class Param:
    """A policy parameter: stored at ``fp[slot]`` of the cache state."""

    name: str
    default: float
    help: str
    slot: int


@dataclass(frozen=True)
class PolicySpec:
    """A registered eviction policy.

    Attributes:
        name: the name users pass to ``--policy``.
        pid: the integer id the kernels branch on (unique).
        structure: STRUCT_LIST, STRUCT_HEAP, STRUCT_BUCKETS or STRUCT_NONE.
        summary: one line for ``--help`` and docs.
        params: tunable parameters (``--policy NAME:key=value``).
        uses_future: True when the policy reads the trace's future (offline bounds such as Belady).
        move_on_hit: list policies only: a hit moves the expert to the recent end (LRU).
        counts_misses: the hook also runs for uses of experts that are not cached (policies
            whose counts outlive residency), with ``is_insert`` True.
        prepare: optional Python hook ``prepare(state, context) -> initial residents (int array)``
            run once before replay (profiles, preloads); ``context`` is a :class:`PrepareContext`.
        attach: optional Python hook ``attach(state, context) -> state`` run before ``prepare``:
            returns the state with policy data attached (wider ``of``, own ``nodes`` rows).
    """

    name: str
    pid: int
    structure: int
    summary: str
    params: tuple[Param, ...] = ()
    uses_future: bool = False
    move_on_hit: bool = False
    counts_misses: bool = False
    prepare: Callable | None = field(default=None, compare=False)
    attach: Callable | None = field(default=None, compare=False)
