"""The count-mode LRU curve: every cache size from one pass over the trace.

:func:`lru_curve` returns, for many cache sizes, exactly the records that
``simulator.engine.run(prep, cfg, "lru")`` returns one size at a time (count mode, no
prefetch), from one pass that computes each access's LRU stack distance
(:mod:`simulator.stack_distance`, Mattson's algorithm): a cache of ``C`` slots hits the
accesses whose distance is below ``C``. Only ``kernel_s`` differs: each record gets an equal
share of the one pass's kernel time.

Where it is exact (tests/test_lru_curve.py checks every counter against replays):

- ``sequential`` access: every cache size.
- ``atomic`` access: sizes whose every partition holds the largest group (step-layer) that uses
  it; below that, a group can force its own experts out and the curve is not a stack property.
  Such sizes are replayed with :func:`~simulator.engine.run` instead, so the result is exact
  for every size either way (records say which in their private key ``_one_pass``).
- global or per-layer scope, slot or fraction sizes, cache resets and warm-up (measure) masks.
  Not: byte budgets, pinned experts, prefetching (they fall back to replays in ``moesim sweep``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from policies.registry import parse_policy
from simulator import kernels as K
from simulator import stack_distance as S
from simulator.config import SimConfig
from simulator.engine import Prepared, _bool_mask, _result, geometry, run
from simulator.kernel_clock import KernelClock


@dataclass
class StackProfile:
    """Cumulative stack-distance counts of one trace under one scope and access semantics.

    ``D`` is the largest partition (experts). ``hit_cum[l, c]``: measured accesses of layer
    ``l`` with distance < ``c`` (``c`` in 0..D); ``acc_layer[l]``: measured accesses of layer
    ``l``. Per partition ``p``: ``all_cum[p, c]`` every non-cold access with distance < ``c``
    and ``all_reuse[p]`` all of them; ``cold_cum[p, c]`` cold accesses that found fewer than
    ``c`` experts seen since the last reset and ``cold[p]`` all of them; ``kmax[p]`` the
    largest group. ``part_of_layer[l]``: the partition of layer ``l``.
    """

    scope: str
    access: str
    part_of_layer: np.ndarray
    hit_cum: np.ndarray
    acc_layer: np.ndarray
    all_cum: np.ndarray
    all_reuse: np.ndarray
    cold_cum: np.ndarray
    cold: np.ndarray
    kmax: np.ndarray
    kernel_s: float

    def exact(self, cap: np.ndarray) -> bool:
        """True if partition capacities ``cap`` (experts) are served exactly by this profile."""
        return self.access == "sequential" or bool(np.all(np.asarray(cap) >= self.kmax))

    def counts(self, cap: np.ndarray, layer_bytes: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(hits per layer, evictions, bytes moved) of an LRU cache with capacities ``cap``."""
        d = self.hit_cum.shape[1] - 1
        c = np.minimum(np.asarray(cap, np.int64), d)
        hits_layer = self.hit_cum[np.arange(self.hit_cum.shape[0]), c[self.part_of_layer]]
        parts = np.arange(self.all_cum.shape[0])
        evictions = int(
            (self.all_reuse - self.all_cum[parts, c]).sum()
            + (self.cold - self.cold_cum[parts, c]).sum()
        )
        moved = int(((self.acc_layer - hits_layer) * layer_bytes).sum())
        return hits_layer, evictions, moved


def stack_profile(prep: Prepared, scope: str = "global", access: str = "sequential", *,
                  reset_groups=None, measure_groups=None) -> StackProfile:  # fmt: skip
    """One pass over ``prep``'s replay order (see :mod:`simulator.stack_distance`)."""
    acc = prep.acc
    n_obj = acc.num_objects
    n_layers = prep.meta.num_layers
    if scope == "per-layer":
        obj_part = acc.obj_layer.astype(np.int32)
        part_sizes = np.diff(acc.layer_base)
        part_of_layer = np.arange(n_layers)
    else:
        obj_part = np.zeros(n_obj, np.int32)
        part_sizes = np.array([n_obj], np.int64)
        part_of_layer = np.zeros(n_layers, np.int64)
    n_part = part_sizes.shape[0]
    d = int(part_sizes.max()) if n_part else 0
    reset = _bool_mask(reset_groups, acc.num_groups, "reset_groups")
    measure = _bool_mask(measure_groups, acc.num_groups, "measure_groups")
    hit_hist = np.zeros((n_layers, d + 1), np.int64)
    all_hist = np.zeros((n_part, d + 1), np.int64)
    cold_seen = np.zeros((n_part, d + 1), np.int64)
    kmax = np.zeros(n_part, np.int64)
    scratch = S.scratch(part_sizes, n_obj)
    with KernelClock() as clock:
        S.stack_histograms(acc.obj, obj_part, acc.group_offsets, acc.group_layer,
                           access == "atomic", reset, measure, *scratch, hit_hist, all_hist,
                           cold_seen, kmax)  # fmt: skip
    kernel_s = clock.seconds

    def cum(h):  # cum[:, c] = sum of h[:, :c], c = 0..d (index d of h, cold, left out)
        out = np.zeros_like(h)
        np.cumsum(h[:, :-1], axis=1, out=out[:, 1:])
        return out

    return StackProfile(
        scope=scope,
        access=access,
        part_of_layer=part_of_layer,
        hit_cum=cum(hit_hist),
        acc_layer=hit_hist.sum(axis=1),
        all_cum=cum(all_hist),
        all_reuse=all_hist[:, :-1].sum(axis=1),
        cold_cum=cum(cold_seen),
        cold=cold_seen.sum(axis=1),
        kmax=kmax,
        kernel_s=kernel_s,
    )


def one_pass_reason(cfg: SimConfig, policy: str, free_prefetch: bool = False) -> str | None:
    """Why the one-pass curve cannot stand in for ``run(prep, cfg, policy)``; None if it can
    (atomic sizes below the largest group are then still replayed, see the module docs)."""
    spec, _ = parse_policy(policy)
    if spec.name != "lru":
        return f"policy {policy!r} is not LRU"
    if cfg.replay.mode != "count":
        return "timed mode"
    if cfg.replay.prefetch != "none" or free_prefetch:
        return "prefetching"
    if cfg.cache.pinned:
        return "pinned experts"
    if cfg.cache.bytes is not None:
        return "a byte budget"
    return None


def lru_curve(prep: Prepared, cfg: SimConfig, *, slots=None, fractions=None, policy: str = "lru",
              reset_groups=None, measure_groups=None,
              profile: StackProfile | None = None) -> list[dict]:  # fmt: skip
    """Records of ``run(prep, cfg, policy)`` at each size in ``slots`` (experts) or
    ``fractions`` (of all routed experts), in that order, from one pass.

    ``cfg`` gives everything but the size (count mode, ``lru``, no prefetch: see
    :func:`one_pass_reason`); neither list given means ``cfg``'s own size. Invalid sizes raise
    the same one-line errors as ``run``. ``profile``: a :func:`stack_profile` of the same
    trace, scope, access and masks, to reuse.
    """
    reason = one_pass_reason(cfg, policy)
    if reason is not None:
        from traces.errors import ConfigError

        raise ConfigError(f"the one-pass LRU curve does not apply: {reason}")
    if slots is not None and fractions is not None:
        raise ValueError("give slots or fractions, not both")
    sizes: list[tuple[str, float]]
    if slots is not None:
        sizes = [("slots", int(s)) for s in slots]
    elif fractions is not None:
        sizes = [("fraction", float(f)) for f in fractions]
    else:
        sizes = [("slots", cfg.cache.slots)] if cfg.cache.slots is not None else [
            ("fraction", cfg.cache.fraction)]  # fmt: skip
    r = cfg.replay
    if profile is None:
        profile = stack_profile(prep, cfg.cache.scope, r.access, reset_groups=reset_groups,
                                measure_groups=measure_groups)  # fmt: skip
    elif (profile.scope, profile.access) != (cfg.cache.scope, r.access):
        raise ValueError("profile was computed for another scope or access")
    spec, _ = parse_policy(policy)
    layer_bytes = np.asarray(prep.meta.expert_bytes, np.int64)
    n_layers = prep.meta.num_layers
    plan = []
    for kind, value in sizes:
        c = copy.deepcopy(cfg)
        c.cache.slots, c.cache.fraction, c.cache.bytes = None, None, None
        setattr(c.cache, kind, value)
        geo = geometry(prep, c)
        plan.append((c, geo, profile.exact(geo.cap)))
    n_pass = sum(1 for _, _, ok in plan if ok)
    share = profile.kernel_s / n_pass if n_pass else 0.0
    out = []
    for c, geo, ok in plan:
        if not ok:
            rec = run(prep, c, policy, reset_groups=reset_groups, measure_groups=measure_groups)
            rec["_one_pass"] = False
            out.append(rec)
            continue
        hits_layer, evictions, moved = profile.counts(geo.cap, layer_bytes)
        hits = int(hits_layer.sum())
        cnt = np.zeros(K.N_COUNTERS, np.int64)
        cnt[K.C_HITS] = hits
        cnt[K.C_MISSES] = int(profile.acc_layer.sum()) - hits
        cnt[K.C_EVICTIONS] = evictions
        cnt[K.C_BYTES] = moved
        rec = _result(prep, c, spec.name, policy, geo, cnt, np.zeros(K.N_FLOATS),
                      hits_layer.astype(np.int64), profile.acc_layer.copy(),
                      np.zeros(n_layers), share, None, False)  # fmt: skip
        rec["_one_pass"] = True
        out.append(rec)
    return out
