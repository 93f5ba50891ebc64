"""Timed mode: timelines worked out by hand, and invariants on random traces.

Unless a test says otherwise: every expert is 1000 bytes and the link moves 1e6 bytes/s with no
latency, so a transfer takes exactly 1 ms; dense work takes 1 ms per layer-step; an expert
computes in 0.5 ms; one copy engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import SimConfig
from simulator.engine import prepare, run
from tests.helpers import random_trace
from traces.format import TraceMeta
from traces.io import trace_from_arrays

MS = 1e-3


def _cfg(slots, *, dense=1.0, engines=1, scope="global", prefetch="none", horizon=1,
         events=0, access="atomic"):  # fmt: skip
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.scope = scope
    cfg.link.bandwidth_gbps = 1e-3  # 1e6 bytes/s
    cfg.link.latency_s = 0.0
    cfg.link.engines = engines
    cfg.compute.dense_s = dense * MS
    cfg.compute.dense_per_token_s = 0.0
    cfg.compute.expert_s = 0.5 * MS
    cfg.compute.expert_per_token_s = 0.0
    cfg.replay.mode = "timed"
    cfg.replay.access = access
    cfg.replay.prefetch = prefetch
    cfg.replay.horizon = horizon
    cfg.replay.events = events
    return cfg.validate()


def _trace(layers, experts, top_k, steps, preds=None):
    """``steps``: list of steps, each a list of per-layer expert lists for one token."""
    meta = TraceMeta(model="hand", num_layers=layers, experts_per_layer=experts, top_k=top_k,
                     expert_bytes=1000)  # fmt: skip
    rows = []
    for s, per_layer in enumerate(steps):
        for lay, ex in enumerate(per_layer):
            rows.append((s, lay, ex))
    lengths = [len(r[2]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pred = None
    if preds is not None:
        plen = [len(p) for p in preds]
        pred = {1: (np.concatenate([[0], np.cumsum(plen)]), np.concatenate(preds))}
    return trace_from_arrays(
        meta, step=[r[0] for r in rows], seq=[0] * len(rows), pos=[r[0] for r in rows],
        phase=[1] * len(rows), layer=[r[1] for r in rows], offsets=offsets,
        experts=np.concatenate([r[2] for r in rows]), preds=pred,
    )  # fmt: skip


def _check(res, **want):
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key


def test_one_miss():
    """dense 0-1, demand fetch 1-2, compute 2-2.5: total 2.5 ms, stall 1 ms."""
    res = run(prepare(_trace(1, 2, 1, [[[0]]])), _cfg(1, events=20), "lru")
    _check(res, total_s=2.5 * MS, stall_s=1.0 * MS, compute_s=1.5 * MS, misses=1, hits=0,
           bytes_moved=1000, link_busy=1.0 / 2.5)  # fmt: skip
    ev = res["_events"]
    assert list(ev["kind"]) == ["dense", "demand", "stall", "compute"]
    assert list(ev["start_s"] / MS) == pytest.approx([0, 1, 1, 2])
    assert list(ev["end_s"] / MS) == pytest.approx([1, 2, 2, 2.5])


def test_full_link_serialises_two_misses():
    """One engine: fetches 1-2 and 2-3; computes 2-2.5 and 3-3.5: total 3.5, stall 1.5."""
    res = run(prepare(_trace(1, 4, 2, [[[0, 1]]])), _cfg(2), "lru")
    _check(res, total_s=3.5 * MS, stall_s=1.5 * MS, misses=2, bytes_moved=2000)


def test_two_copy_engines_overlap_transfers():
    """Two engines: both fetches 1-2; computes 2-2.5 and 2.5-3: total 3.0, stall 1.0."""
    res = run(prepare(_trace(1, 4, 2, [[[0, 1]]])), _cfg(2, engines=2), "lru")
    _check(res, total_s=3.0 * MS, stall_s=1.0 * MS, misses=2)


def test_hits_do_not_stall():
    """Step 1 reuses step 0's experts: dense 3.5-4.5, computes 4.5-5.5: total 5.5, stall 1.5."""
    res = run(prepare(_trace(1, 4, 2, [[[0, 1]], [[0, 1]]])), _cfg(2), "lru")
    _check(res, total_s=5.5 * MS, stall_s=1.5 * MS, misses=2, hits=2, decode_step_s=2.75 * MS)


def test_timely_prefetch_hides_the_transfer():
    """Oracle, horizon 1. g0: dense 0-1, demand 1-2, prefetch of g1's expert queued behind it
    2-3, compute 2-2.5. g1: dense 2.5-3.5, expert arrived at 3: hit, compute 3.5-4."""
    res = run(prepare(_trace(2, 4, 1, [[[0], [0]]])), _cfg(2, prefetch="oracle"), "lru")
    _check(res, total_s=4.0 * MS, stall_s=1.0 * MS, hits=1, misses=1, prefetch_issued=1,
           prefetch_used=1, prefetch_late=0, inflight_hits=0, bytes_moved=2000)  # fmt: skip


def test_late_prefetch_still_stalls():
    """Dense 0.2 ms. g0: dense 0-0.2, demand 0.2-1.2, prefetch 1.2-2.2, compute 1.2-1.7.
    g1: dense 1.7-1.9; the expert is still in flight (arrives 2.2): compute 2.2-2.7.
    Stall 1.0 + 0.3, of which 0.3 is late-prefetch stall."""
    res = run(prepare(_trace(2, 4, 1, [[[0], [0]]])), _cfg(2, dense=0.2, prefetch="oracle"), "lru")
    _check(res, total_s=2.7 * MS, stall_s=1.3 * MS, late_prefetch_stall_s=0.3 * MS, hits=0,
           inflight_hits=1, misses=1, prefetch_late=1, prefetch_used=1)  # fmt: skip


def test_wrong_prefetch_wastes_the_link():
    """The trace predicts expert 1 for layer 1; the token uses expert 0. Dense 0.2 ms.
    g0: demand 0.2-1.2, wrong prefetch 1.2-2.2, compute 1.2-1.7. g1: dense 1.7-1.9, miss,
    its fetch waits for the link: 2.2-3.2, compute 3.2-3.7. Stall 1.0 + 1.3."""
    tr = _trace(2, 4, 1, [[[0], [0]]], preds=[[0], [1]])
    res = run(prepare(tr), _cfg(2, dense=0.2, prefetch="trace"), "lru")
    _check(
        res,
        total_s=3.7 * MS,
        stall_s=2.3 * MS,
        misses=2,
        hits=0,
        prefetch_issued=1,
        prefetch_used=0,
        prefetch_wasted=1,
        prefetch_wasted_bytes=1000,
        bytes_moved=3000,
    )


def test_cancelled_prefetches_free_the_link():
    """Three wrong predictions for layer 1, 4 slots, dense 0.2 ms. g0: demand 0.2-1.2; the
    prefetches queue behind it; the first runs 1.2-2.2. g1 (gate 1.9) misses; the two
    prefetches still queued are dropped; its fetch runs 2.2-3.2 after the one in flight."""
    tr = _trace(2, 4, 1, [[[0], [0]]], preds=[[0], [1, 2, 3]])
    res = run(prepare(tr), _cfg(4, dense=0.2, prefetch="trace"), "lru")
    _check(res, total_s=3.7 * MS, stall_s=2.3 * MS, prefetch_issued=3, prefetch_cancelled=2,
           prefetch_wasted=1, prefetch_used=0, bytes_moved=3000)  # fmt: skip


def test_per_layer_partition():
    """Layer 0 uses 0, 1, 0 and layer 1 uses 0, 1, 0 over three steps; 3 slots.
    per-layer ([2, 1]): layer 0 keeps both experts; layer 1 thrashes: 5 misses, 1 hit.
    Each miss costs dense 1 + fetch 1 + compute 0.5; a hit dense 1 + compute 0.5:
    total 5 x 2.5 + 1.5 = 14 ms. Global LRU evicts layer 0's expert 0 instead: 6 misses, 15 ms."""
    steps = [[[0], [0]], [[1], [1]], [[0], [0]]]
    per = run(prepare(_trace(2, 4, 1, steps)), _cfg(3, scope="per-layer"), "lru")
    _check(per, total_s=14 * MS, stall_s=5 * MS, misses=5, hits=1)
    assert per["hit_rate_per_layer"] == [pytest.approx(1 / 3), 0.0]
    glob = run(prepare(_trace(2, 4, 1, steps)), _cfg(3), "lru")
    _check(glob, total_s=15 * MS, stall_s=6 * MS, misses=6, hits=0)


def test_three_misses_queue_on_one_link():
    """Top-3, 3 slots: fetches 1-2, 2-3, 3-4; computes 2-2.5, 3-3.5, 4-4.5: total 4.5 ms,
    stall 1 + 0.5 + 0.5 ms.
    With no cache ('none') the timeline is the same; with 2 slots the token cannot fit and the
    configuration is refused."""
    tr = _trace(1, 4, 3, [[[0, 1, 2]]])
    for policy in ("lru", "none"):
        res = run(prepare(tr), _cfg(3), policy)
        _check(res, total_s=4.5 * MS, stall_s=2.0 * MS, misses=3)
    with pytest.raises(Exception, match="fewer than top_k"):
        run(prepare(tr), _cfg(2), "lru")


def test_deferred_fetch_in_a_prefill_step():
    """Prefill: 2 tokens of one layer need experts 0, 1 (token 0) and 2, 3 (token 1), top-2,
    2 slots. Fetches 0: 1-2, 1: 2-3. Experts 2 and 3 wait for slots: after expert 0 computes
    (2-2.5) its slot goes to 2 (fetch 3-4, link busy till 3); after expert 1 (3-3.5) to 3
    (fetch 4-5). Computes 4-4.5 and 5-5.5."""
    meta = TraceMeta(model="hand", num_layers=1, experts_per_layer=4, top_k=2, expert_bytes=1000)
    tr = trace_from_arrays(meta, step=[0, 0], seq=[0, 0], pos=[0, 1], phase=[0, 0], layer=[0, 0],
                           offsets=[0, 2, 4], experts=[0, 1, 2, 3])  # fmt: skip
    res = run(prepare(tr), _cfg(2), "lru")
    _check(res, total_s=5.5 * MS, misses=4, deferred_fetches=2, capacity_overflows=0,
           prefill_s_per_token=5.5 * MS / 2)  # fmt: skip


POLICIES = ["lru", "fifo", "lfu", "lfu-perfect", "lfu-aged", "belady", "static", "none"]


@pytest.mark.parametrize("seed", range(4))
def test_invariants_on_random_traces(seed):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, layers=3, experts=8, top_k=2, sequences=4, prefill=3, decode=4,
                      batch=2, steps="per-token" if seed % 2 else "native", preds=(1,))  # fmt: skip
    prep = prepare(tr)
    for slots in (6, 12):
        for prefetch in ("none", "oracle", "trace"):
            for policy in POLICIES:
                cfg = _cfg(slots, prefetch=prefetch, dense=0.3)
                r = run(prep, cfg, policy)
                assert r["hits"] + r["misses"] + r["inflight_hits"] == r["accesses"]
                assert r["capacity_overflows"] == 0
                assert r["total_s"] >= r["compute_s"] - 1e-12
                assert r["total_s"] == pytest.approx(r["compute_s"] + r["stall_s"], rel=1e-9)
                assert r["link_busy"] <= 1.0 + 1e-9
                assert (
                    r["prefetch_used"] + r["prefetch_wasted"] + r["prefetch_cancelled"]
                    <= (r["prefetch_issued"])
                )
                if prefetch == "none":
                    assert r["bytes_moved"] == r["misses"] * 1000
                    assert r["prefetch_issued"] == 0
                # an infinitely fast link never stalls
                cfg.link.bandwidth_gbps = 1e12
                fast = run(prep, cfg, policy)
                assert fast["stall_s"] < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_timed_hits_equal_count_hits_without_prefetch(seed):
    """Where every step-layer fits in the cache, timing does not change who hits (atomic)."""
    rng = np.random.default_rng(50 + seed)
    tr = random_trace(rng, layers=3, experts=6, top_k=2, steps="per-token", batch=1)
    prep = prepare(tr)
    for policy in POLICIES:
        timed = run(prep, _cfg(4), policy)
        cfg = _cfg(4)
        cfg.replay.mode = "count"
        count = run(prep, cfg, policy)
        assert (timed["hits"], timed["misses"]) == (count["hits"], count["misses"]), policy


def test_same_inputs_same_outputs():
    rng = np.random.default_rng(5)
    prep = prepare(random_trace(rng))
    a = run(prep, _cfg(6, prefetch="oracle"), "lfu")
    b = run(prep, _cfg(6, prefetch="oracle"), "lfu")
    a.pop("kernel_s"), b.pop("kernel_s")
    assert a == b
