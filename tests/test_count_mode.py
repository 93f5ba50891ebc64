"""Count mode: the jitted kernel agrees exactly with the slow reference, libCacheSim and an
exhaustive search; golden counts on a hand-worked trace."""

from __future__ import annotations

import numpy as np
import pytest

from policies.registry import POLICIES
from simulator.config import SimConfig
from simulator.engine import geometry, prepare, run
from tests.helpers import random_trace
from tests.reference import exhaustive_min_misses, replay_count_reference

ALL = ["lru", "fifo", "lfu", "lfu-perfect", "lfu-aged:half_life=7", "belady", "static", "none",
       "moe-infinity"]  # fmt: skip


def _cfg(slots=None, nbytes=None, scope="global", access="atomic", pinned=()):
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.bytes = nbytes
    cfg.cache.scope = scope
    cfg.cache.pinned = list(pinned)
    cfg.replay.mode = "count"
    cfg.replay.access = access
    return cfg.validate()


def _reference(prep, cfg, policy):
    name, _, par = policy.partition(":")
    params = {k: float(v) for k, v in (x.split("=") for x in par.split(","))} if par else {}
    acc = prep.acc
    geo = geometry(prep, cfg, name == "none")
    groups = []
    for g in range(acc.num_groups):
        a0, a1 = acc.group_offsets[g], acc.group_offsets[g + 1]
        groups.append([(a, int(acc.obj[a])) for a in range(a0, a1)])
    pinned = [int(acc.layer_base[int(x.split(":")[0])]) + int(x.split(":")[1])
              for x in cfg.cache.pinned]  # fmt: skip
    profile = np.bincount(acc.obj, minlength=acc.num_objects).astype(float)
    priority = _moe_infinity_priority(prep, cfg) if name == "moe-infinity" else None
    return replay_count_reference(
        groups, acc.num_objects, geo.part.tolist(), geo.size.tolist(), geo.cap.tolist(), name,
        cfg.replay.access == "atomic", next_use=prep.next_use.tolist(), params=params,
        profile=profile, pinned=pinned, layer_of=acc.obj_layer.tolist(), priority=priority,
    )  # fmt: skip


def _moe_infinity_priority(prep, cfg):
    """policies/moe_infinity.py's rule, written out: the matched snapshots' counts (the matching
    itself is checked against its own twin in tests/test_prefetchers.py) times the layer decay."""
    from simulator.prefetchers import matches

    m = matches(prep, cfg)
    n_layers = prep.meta.num_layers
    g_layer = prep.acc.group_layer
    o_layer = prep.acc.obj_layer

    def priority(g, o):
        d = (int(o_layer[o]) - int(g_layer[g]) - 1) % n_layers + 1
        decay = 1.0 - d / (n_layers + 1.0)
        ids = m.ids[m.off[g] : m.off[g + 1]][:4]
        if len(ids) == 0:
            return 1e-8 * decay
        p = 0.0
        for s in ids:
            p += (float(m.snap[s, o]) + 1e-8) * decay
        return p

    return priority


CASES = [
    dict(steps="native", batch=2),
    dict(steps="per-token", batch=1),
    dict(steps="native", batch=3, layers=2, experts=8, top_k=3),
    dict(steps="native", batch=1, layers=4, experts=5, top_k=1, skew=0.3),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("access", ["atomic", "sequential"])
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_kernel_equals_reference(case, access, scope):
    rng = np.random.default_rng(100 + case)
    tr = random_trace(rng, sequences=4, prefill=4, decode=4, **CASES[case])
    prep = prepare(tr)
    n_layers = tr.meta.num_layers
    top_k = tr.meta.top_k
    lo = top_k * (n_layers if scope == "per-layer" else 1)
    for slots in sorted({lo, lo + 1, (lo + prep.acc.num_objects) // 2}):
        cfg = _cfg(slots=slots, scope=scope, access=access)
        for policy in ALL:
            got = run(prep, cfg, policy)
            hits, misses, per_layer = _reference(prep, cfg, policy)
            assert (got["hits"], got["misses"]) == (hits, misses), (policy, slots)
            acc_layer = np.bincount(prep.acc.obj_layer[prep.acc.obj], minlength=n_layers)
            want = [per_layer.get(i, 0) / a if a else None for i, a in enumerate(acc_layer)]
            assert got["hit_rate_per_layer"] == pytest.approx(want), policy


def test_byte_budget_with_differing_expert_sizes_equals_reference():
    rng = np.random.default_rng(7)
    tr = random_trace(rng, layers=3, experts=5, top_k=2, expert_bytes=[100, 250, 400])
    prep = prepare(tr)
    for scope in ("global", "per-layer"):
        for nbytes in (2400, 3000, 3500):
            cfg = _cfg(nbytes=nbytes, scope=scope)
            for policy in ALL:
                got = run(prep, cfg, policy)
                hits, misses, _ = _reference(prep, cfg, policy)
                assert (got["hits"], got["misses"]) == (hits, misses), (policy, nbytes, scope)


def test_pinned_experts_always_hit_and_take_room():
    rng = np.random.default_rng(3)
    tr = random_trace(rng, layers=2, experts=6, top_k=2)
    prep = prepare(tr)
    cfg = _cfg(slots=5, pinned=["0:0", "1:0"])
    for policy in ("lru", "lfu", "belady"):
        got = run(prep, cfg, policy)
        assert (got["hits"], got["misses"]) == _reference(prep, cfg, policy)[:2]
    # pinned experts are hits every time they are used
    uses = int(np.count_nonzero(np.isin(prep.acc.obj, [0, 6])))
    assert run(prep, cfg, "none")["hits"] == 0
    assert run(prep, cfg, "lru")["hits"] >= uses


def test_every_registered_policy_is_covered():
    assert {p.split(":")[0] for p in ALL} == set(POLICIES)


def test_golden_counts_on_hand_worked_trace():
    """Two layers x 3 experts, one token per step, top-2; 3 global slots, atomic.

    Accesses (layer:expert) per step-layer group:
      g0 0:0 0:1 | g1 1:0 1:1 | g2 0:0 0:2 | g3 1:0 1:2
    Access indices: 0:00 1:01 | 2:10 3:11 | 4:00 5:02 | 6:10 7:12.
    LRU: g1 fills the third slot with 10, then 11 evicts 00 (least recent) -> {01 10 11};
         g2: 00 evicts 01, 02 evicts 10 -> {11 00 02}; g3: 10 evicts 11, 12 evicts 00.
         0 hits, 8 misses (FIFO evicts the same experts here).
    Belady: g1: 11 evicts 01 (never used again; 00 is next used at 4) -> {00 10 11};
         g2: 00 hits, 02 evicts 11 (never again; 10 is next used at 6) -> {00 10 02};
         g3: 10 hits, 12 evicts 00 or 02 (neither used again). 2 hits, 6 misses.
    """
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    meta = TraceMeta(model="golden", num_layers=2, experts_per_layer=3, top_k=2, expert_bytes=1)
    tr = trace_from_arrays(
        meta, step=[0, 0, 1, 1], seq=[0, 0, 0, 0], pos=[0, 0, 1, 1], phase=[1, 1, 1, 1],
        layer=[0, 1, 0, 1], offsets=[0, 2, 4, 6, 8], experts=[0, 1, 0, 1, 0, 2, 0, 2],
    )  # fmt: skip
    prep = prepare(tr)
    cfg = _cfg(slots=3)
    lru = run(prep, cfg, "lru")
    assert (lru["hits"], lru["misses"]) == (0, 8)
    bel = run(prep, cfg, "belady")
    assert (bel["hits"], bel["misses"]) == (2, 6)
    fifo = run(prep, cfg, "fifo")
    assert (fifo["hits"], fifo["misses"]) == (0, 8)
    assert run(prep, cfg, "none")["misses"] == 8


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("access", ["atomic", "sequential"])
def test_belady_equals_exhaustive_optimum(seed, access):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, layers=2, experts=3, top_k=2, sequences=2, prefill=1, decode=2,
                      batch=int(rng.integers(1, 3)))  # fmt: skip
    prep = prepare(tr)
    acc = prep.acc
    groups = [[(a, int(acc.obj[a])) for a in range(acc.group_offsets[g], acc.group_offsets[g + 1])]
              for g in range(acc.num_groups)]  # fmt: skip
    biggest = max(len(g) for g in groups)
    for slots in range(2, min(acc.num_objects, biggest + 2)):
        cfg = _cfg(slots=slots, access=access)
        got = run(prep, cfg, "belady")["misses"]
        best = exhaustive_min_misses(groups, slots, access == "atomic")
        assert got == best, (slots, got, best)
        # a lower bound for every demand policy that starts cold ('static' preloads for free)
        for other in ("lru", "lfu", "fifo", "lfu-perfect"):
            assert run(prep, cfg, other)["misses"] >= got


def test_atomic_protects_members_where_sequential_evicts_them():
    """One layer, 2 slots: step 0 needs [0, 1], step 1 needs [2, 0].

    sequential LRU: 2 evicts 0 (least recent), then 0 misses again: 4 misses.
    atomic LRU: 0 is needed by the same step, so 2 evicts 1; 0 hits: 3 misses.
    """
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    meta = TraceMeta(model="t", num_layers=1, experts_per_layer=3, top_k=2, expert_bytes=1)
    tr = trace_from_arrays(meta, step=[0, 1], seq=[0, 0], pos=[0, 1], phase=[1, 1], layer=[0, 0],
                           offsets=[0, 2, 4], experts=[0, 1, 2, 0])  # fmt: skip
    prep = prepare(tr)
    assert run(prep, _cfg(slots=2, access="sequential"), "lru")["misses"] == 4
    assert run(prep, _cfg(slots=2, access="atomic"), "lru")["misses"] == 3


def _one_layer(experts, preds=None):
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    n = len(experts)
    meta = TraceMeta(model="t", num_layers=1, experts_per_layer=4, top_k=1, expert_bytes=10)
    pred = None if preds is None else {1: (np.arange(n + 1), np.asarray(preds))}
    return trace_from_arrays(meta, step=range(n), seq=[0] * n, pos=range(n), phase=[1] * n,
                             layer=[0] * n, offsets=np.arange(n + 1), experts=experts,
                             preds=pred)  # fmt: skip


def test_free_prefetch_inserts_predicted_experts_at_no_cost():
    """Perfect predictions for tokens 0, 1, 2, 0 and 2 slots: every expert is inserted right
    before its layer, so every access hits; 4 insertions (0 was evicted by 2), no bytes moved."""
    prep = prepare(_one_layer([0, 1, 2, 0], preds=[0, 1, 2, 0]))
    cfg = _cfg(slots=2)
    cfg.replay.prefetch = "trace"
    r = run(prep, cfg, "lru", free_prefetch=True)
    assert (r["hits"], r["misses"], r["bytes_moved"]) == (4, 0, 0)
    assert (r["prefetch_issued"], r["prefetch_used"], r["prefetch_wasted"]) == (4, 4, 0)
    assert r["prefetch"] == "free-trace"
    # wrong predictions: inserted, evicted unused (wasted), and the real expert still misses
    r = run(prepare(_one_layer([0, 1, 0], preds=[2, 3, 2])), cfg, "lru", free_prefetch=True)
    assert (r["hits"], r["misses"]) == (0, 3)
    assert r["prefetch_wasted"] == r["prefetch_issued"] == 3


def test_reset_and_warm_up_groups():
    """Tokens use 0, 1, 0 with 2 slots: LRU misses, misses, hits. Emptying the cache before
    the third turns its hit into a miss; not measuring the first leaves 2 counted accesses."""
    prep = prepare(_one_layer([0, 1, 0]))
    cfg = _cfg(slots=2)
    assert run(prep, cfg, "lru")["misses"] == 2
    assert run(prep, cfg, "lru", reset_groups=[False, False, True])["misses"] == 3
    r = run(prep, cfg, "lru", measure_groups=[False, True, True])
    assert (r["accesses"], r["hits"], r["misses"]) == (2, 1, 1)
    with pytest.raises(Exception, match="one flag per step-layer group"):
        run(prep, cfg, "lru", measure_groups=[True])


def test_prefetches_dropped_by_a_reset_count_as_wasted():
    prep = prepare(_one_layer([0, 1, 0, 1], preds=[2, 3, 0, 2]))
    cfg = _cfg(slots=2)
    cfg.replay.prefetch = "trace"
    r = run(prep, cfg, "lru", free_prefetch=True, reset_groups=[False, False, True, False])
    assert r["prefetch_used"] + r["prefetch_wasted"] == r["prefetch_issued"]
    assert r["prefetch_wasted"] >= 2  # 2 and 3 were never used; 3 was dropped by the reset


def test_moe_infinity_eviction_hand_worked():
    """One sequence, 3 layers, one expert each (objects o0, o1, o2), 4 tokens, 2 slots, atomic.
    The collection stays empty (no sequence finishes before the end), so only the layer decay
    ranks: the resident whose layer comes round last is evicted. Step 0: three misses; at L2 the
    victim is o1 (next use 2 layers away) rather than o0 (1 away): {o0, o2}. Step 1: o0 hit, o1
    misses and evicts o0 (2 away) not o2 (1 away), o2 hits. Step 2: o0 misses (evicts o2), o1
    hits, o2 misses (evicts o1). Step 3 as step 1. Hits 0 + 2 + 1 + 2 = 5, misses 7; LRU misses
    all 12 (a loop one larger than the cache)."""
    meta_steps = [[[0], [0], [0]]] * 4
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    meta = TraceMeta(model="hand", num_layers=3, experts_per_layer=2, top_k=1, expert_bytes=1000)
    rows = [(s, lay) for s in range(len(meta_steps)) for lay in range(3)]
    tr = trace_from_arrays(
        meta, step=[r[0] for r in rows], seq=[0] * len(rows), pos=[r[0] for r in rows],
        phase=[1] * len(rows), layer=[r[1] for r in rows],
        offsets=np.arange(len(rows) + 1), experts=np.zeros(len(rows), np.int64),
    )  # fmt: skip
    prep = prepare(tr)
    got = run(prep, _cfg(slots=2), "moe-infinity")
    assert (got["hits"], got["misses"]) == (5, 7)
    assert (run(prep, _cfg(slots=2), "lru")["hits"]) == 0
