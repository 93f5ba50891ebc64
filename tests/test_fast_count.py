"""The count-mode fast path for list policies (simulator/fast_count.py) gives exactly the
general kernel's result record: every counter, on random traces, every cache size, both
scopes, both access modes, slot and byte budgets, pinned experts, free prefetch, cache resets
and warm-up masks, step-layers without accesses; and the slow reference's hits and misses."""

from __future__ import annotations

import numpy as np
import pytest

from policies.registry import POLICIES, parse_policy
from simulator import fast_count
from simulator.config import SimConfig
from simulator.engine import prepare, run
from tests.helpers import random_trace
from tests.reference import replay_count_reference
from tests.test_count_mode import _reference
from traces.format import TraceMeta
from traces.io import sort_trace, trace_from_arrays

LIST = ["lru", "fifo"]


def _cfg(slots=None, nbytes=None, scope="global", access="atomic", pinned=(), prefetch="none"):
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.bytes = nbytes
    cfg.cache.scope = scope
    cfg.cache.pinned = list(pinned)
    cfg.replay.mode = "count"
    cfg.replay.access = access
    cfg.replay.prefetch = prefetch
    return cfg.validate()


def _both(prep, cfg, policy, **kw):
    """(fast path's record, general kernel's record), checking the fast path was taken."""
    calls = []
    real = fast_count.replay_count

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    fast_count.replay_count = spy
    try:
        fast = run(prep, cfg, policy, **kw)
    finally:
        fast_count.replay_count = real
    assert calls == [1], "the fast path was not taken"
    with fast_count.general_kernel():
        general = run(prep, cfg, policy, **kw)
    return fast, general


def _same(prep, cfg, policy, **kw):
    fast, general = _both(prep, cfg, policy, **kw)
    fast.pop("kernel_s")
    general.pop("kernel_s")
    assert fast == general, (policy, {k: (fast[k], general[k]) for k in fast
                                      if fast[k] != general[k]})  # fmt: skip
    return fast


def _ragged_trace(rng, layers=3, experts=5, steps=12, batch=2, empty=0.25, expert_bytes=None):
    """Routing with a varying number of experts per token (top_k unset), some tokens none at
    all, so some step-layers have no accesses."""
    meta = TraceMeta(model="ragged", num_layers=layers, experts_per_layer=experts, top_k=None,
                     expert_bytes=expert_bytes or [1000] * layers)  # fmt: skip
    rows, chosen, lengths = [], [], []
    for step in range(steps):
        for lay in range(layers):
            for s in range(batch):
                k = 0 if rng.random() < empty else int(rng.integers(1, experts + 1))
                rows.append((step, lay, s, step))
                chosen += list(rng.choice(experts, size=k, replace=False))
                lengths.append(k)
    arr = np.array(rows, dtype=np.int64)
    tr = trace_from_arrays(
        meta, step=arr[:, 0], layer=arr[:, 1], seq=arr[:, 2], pos=arr[:, 3],
        phase=np.ones(len(rows), np.int64), offsets=np.concatenate([[0], np.cumsum(lengths)]),
        experts=np.array(chosen, np.int64),
    )  # fmt: skip
    return sort_trace(tr)


CASES = [
    dict(steps="native", batch=2),
    dict(steps="per-token", batch=1),
    dict(steps="native", batch=3, layers=2, experts=8, top_k=3),
    dict(steps="native", batch=4, layers=2, experts=6, top_k=2, skew=0.3),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("access", ["atomic", "sequential"])
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_fast_path_equals_general_kernel_every_size(case, access, scope):
    rng = np.random.default_rng(500 + case)
    prep = prepare(random_trace(rng, sequences=4, prefill=3, decode=4, **CASES[case]))
    n_layers = prep.meta.num_layers
    lo = prep.meta.top_k * (n_layers if scope == "per-layer" else 1)
    forced = 0
    for slots in range(lo, prep.acc.num_objects + 1):
        for policy in LIST:
            rec = _same(prep, _cfg(slots=slots, scope=scope, access=access), policy)
            forced += rec["forced_evictions"]
    if access == "atomic" and CASES[case]["batch"] > 1:
        assert forced > 0  # the forced-eviction path was exercised


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_fast_path_byte_budgets_and_pins(scope):
    rng = np.random.default_rng(9)
    prep = prepare(random_trace(rng, layers=3, experts=5, top_k=2, sequences=4, batch=2,
                                expert_bytes=[100, 250, 400]))  # fmt: skip
    for access in ("atomic", "sequential"):
        for nbytes in (2400, 2800, 3100, 3600):
            for policy in LIST:
                _same(prep, _cfg(nbytes=nbytes, scope=scope, access=access), policy)
        for pinned in (["0:0"], ["0:0", "1:1", "2:4"]):
            for slots in (9, 11):
                for policy in LIST:
                    cfg = _cfg(slots=slots, scope=scope, access=access, pinned=pinned)
                    rec = _same(prep, cfg, policy)
                    hits, misses, _ = _reference(prep, cfg, policy)
                    assert (rec["hits"], rec["misses"]) == (hits, misses)
            for policy in LIST:
                _same(prep, _cfg(nbytes=3600, scope=scope, access=access, pinned=pinned),
                      policy)  # fmt: skip


@pytest.mark.parametrize("access", ["atomic", "sequential"])
def test_fast_path_free_prefetch_resets_and_warm_up(access):
    """Free prefetch (oracle and the trace's predictions), random resets and measure masks,
    alone and together, as simulator/protocols.py uses them."""
    rng = np.random.default_rng(21)
    prep = prepare(random_trace(rng, layers=3, experts=6, top_k=2, sequences=5, prefill=3,
                                decode=5, batch=2, preds=(1,)))  # fmt: skip
    n_groups = prep.acc.num_groups
    seen = {"prefetch_wasted": 0, "prefetch_used": 0}
    if access == "atomic":
        seen["forced_evictions"] = 0
    for _trial in range(3):
        reset = rng.random(n_groups) < 0.15
        measure = rng.random(n_groups) < 0.7
        for scope in ("global", "per-layer"):
            for slots in (6, 7, 10):
                for prefetch in ("none", "oracle", "trace"):
                    cfg = _cfg(slots=slots, scope=scope, access=access, prefetch=prefetch)
                    free = prefetch != "none"
                    for policy in LIST:
                        for kw in ({}, {"reset_groups": reset}, {"measure_groups": measure},
                                   {"reset_groups": reset, "measure_groups": measure}):  # fmt: skip
                            rec = _same(prep, cfg, policy, free_prefetch=free, **kw)
                            for k in seen:
                                seen[k] += rec[k]
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.parametrize("access", ["atomic", "sequential"])
def test_fast_path_step_layers_without_accesses(access):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        prep = prepare(_ragged_trace(rng, expert_bytes=[100, 300, 200]))
        n_groups = prep.acc.num_groups
        assert np.any(np.diff(prep.acc.group_offsets) == 0)
        reset = rng.random(n_groups) < 0.2
        measure = rng.random(n_groups) < 0.8
        for scope in ("global", "per-layer"):
            for slots in (3, 6, 9, 15):
                cfg = _cfg(slots=slots, scope=scope, access=access)
                for policy in LIST:
                    _same(prep, cfg, policy)
                    _same(prep, cfg, policy, reset_groups=reset, measure_groups=measure)
            cfg = _cfg(nbytes=1500, scope=scope, access=access, prefetch="oracle")
            for policy in LIST:
                _same(prep, cfg, policy, free_prefetch=True, reset_groups=reset)


@pytest.mark.parametrize("access", ["atomic", "sequential"])
def test_fast_path_equals_slow_reference(access):
    rng = np.random.default_rng(33)
    prep = prepare(random_trace(rng, layers=3, experts=6, top_k=2, sequences=4, prefill=4,
                                decode=4, batch=3))  # fmt: skip
    acc = prep.acc
    for scope in ("global", "per-layer"):
        for slots in (6, 8, 12):
            cfg = _cfg(slots=slots, scope=scope, access=access)
            for policy in LIST:
                got = run(prep, cfg, policy)  # the fast path (checked taken elsewhere)
                hits, misses, per_layer = _reference(prep, cfg, policy)
                assert (got["hits"], got["misses"]) == (hits, misses), (policy, slots, scope)
                n_acc = np.bincount(acc.obj_layer[acc.obj], minlength=prep.meta.num_layers)
                want = [per_layer.get(i, 0) / a if a else None for i, a in enumerate(n_acc)]
                assert got["hit_rate_per_layer"] == want


def test_hand_worked_lru_forced_eviction_on_fast_path():
    """One layer of 4 experts, 2 slots, atomic LRU. Step 0 needs [0, 1]: 2 misses.
    Step 1 needs [2, 3]: 2 evicts 0, 3 evicts 1 (neither is needed by step 1); list 3, 2.
    Step 2 (a batch) needs [0, 1, 2]: 0 evicts 3 (not a member; 2 is); list 0, 2. 1 finds
    only members: it evicts 0, already used, rather than 2, still to come: a forced
    eviction. 2 hits. 6 misses, 1 hit, 4 evictions, 1 of them forced."""
    meta = TraceMeta(model="t", num_layers=1, experts_per_layer=4, top_k=None,
                     expert_bytes=1)  # fmt: skip
    tr = trace_from_arrays(meta, step=[0, 1, 2], seq=[0, 0, 0], pos=[0, 1, 2], phase=[1, 1, 1],
                           layer=[0, 0, 0], offsets=[0, 2, 4, 7],
                           experts=[0, 1, 2, 3, 0, 1, 2])  # fmt: skip
    prep = prepare(tr)
    fast, general = _both(prep, _cfg(slots=2), "lru")
    for rec in (fast, general):
        assert (rec["misses"], rec["hits"], rec["forced_evictions"]) == (6, 1, 1)
        assert rec["evictions"] == 4


def test_fast_path_dispatch_and_switch():
    """LRU and FIFO take the fast path, other policies never; the switch turns it off."""
    rng = np.random.default_rng(1)
    prep = prepare(random_trace(rng))
    st_empty = type("S", (), {"status": np.zeros(3, np.int8)})()
    for name, spec in POLICIES.items():
        assert fast_count.applies(spec, st_empty) == (name in ("lru", "fifo")), name
    with fast_count.general_kernel():
        assert not fast_count.applies(parse_policy("lru")[0], st_empty)
    assert fast_count.applies(parse_policy("lru")[0], st_empty)
    st_full = type("S", (), {"status": np.ones(3, np.int8)})()  # already holds experts
    assert not fast_count.applies(parse_policy("lru")[0], st_full)
    _same(prep, _cfg(slots=4), "lru")


def test_fast_path_equals_reference_on_a_batched_trace():
    """A batched trace where atomic protection matters, straight against the reference."""
    rng = np.random.default_rng(77)
    prep = prepare(random_trace(rng, layers=2, experts=7, top_k=3, sequences=6, batch=3))
    acc = prep.acc
    groups = [[(a, int(acc.obj[a])) for a in range(acc.group_offsets[g], acc.group_offsets[g + 1])]
              for g in range(acc.num_groups)]  # fmt: skip
    for slots in (3, 4, 5, 9):
        for policy in LIST:
            for atomic in (True, False):
                cfg = _cfg(slots=slots, access="atomic" if atomic else "sequential")
                got = run(prep, cfg, policy)
                hits, misses, _ = replay_count_reference(
                    groups, acc.num_objects, [0] * acc.num_objects, [1] * acc.num_objects,
                    [slots], policy, atomic, next_use=prep.next_use.tolist(),
                )  # fmt: skip
                assert (got["hits"], got["misses"]) == (hits, misses), (slots, policy, atomic)
