"""Contract tests every registered policy must pass (cachetools style): new policies get them
for free through the registry."""

from __future__ import annotations

import numpy as np
import pytest

from policies.registry import POLICIES, parse_policy
from simulator.config import SimConfig
from simulator.engine import prepare, run
from tests.helpers import random_trace
from traces.errors import ConfigError

NAMES = sorted(POLICIES)


@pytest.fixture(scope="module")
def prep():
    rng = np.random.default_rng(2024)
    return prepare(random_trace(rng, layers=3, experts=8, top_k=2, sequences=5, prefill=4,
                                decode=5, batch=2, preds=(1,)))  # fmt: skip


def _cfg(mode, scope="global", access="atomic", slots=None, fraction=None, prefetch="none"):
    cfg = SimConfig()
    cfg.cache.fraction = fraction
    cfg.cache.slots = slots
    cfg.cache.scope = scope
    cfg.replay.mode = mode
    cfg.replay.access = access
    cfg.replay.prefetch = prefetch
    return cfg.validate()


@pytest.mark.parametrize("name", NAMES)
def test_accounting_and_capacity(prep, name):
    for mode in ("count", "timed"):
        for scope in ("global", "per-layer"):
            for access in ("atomic", "sequential"):
                r = run(prep, _cfg(mode, scope, access, slots=9), name)
                assert r["capacity_overflows"] == 0
                assert r["hits"] + r["misses"] + r["inflight_hits"] == r["accesses"]
                assert r["accesses"] == prep.acc.num_accesses
                assert 0.0 <= r["hit_rate"] <= 1.0
                per_layer = [x for x in r["hit_rate_per_layer"] if x is not None]
                assert all(0.0 <= x <= 1.0 for x in per_layer)


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_of_every_expert_misses_only_cold(prep, name):
    cold = int(np.unique(prep.acc.obj).shape[0])
    r = run(prep, _cfg("count", fraction=1.0), name)
    if name == "none":
        assert r["misses"] == r["accesses"]
    elif name == "static":
        assert r["misses"] == 0  # every used expert was preloaded
    else:
        assert r["misses"] == cold
        assert r["evictions"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(prep, name):
    a = run(prep, _cfg("timed", slots=7, prefetch="oracle"), name)
    b = run(prep, _cfg("timed", slots=7, prefetch="oracle"), name)
    a.pop("kernel_s"), b.pop("kernel_s")
    assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_parameters(name):
    spec, values = parse_policy(name)
    assert set(values) == {p.name for p in spec.params}
    with pytest.raises(ConfigError, match="unknown parameter"):
        parse_policy(f"{name}:no_such_parameter=1")
    for p in spec.params:
        with pytest.raises(ConfigError, match="expected a number"):
            parse_policy(f"{name}:{p.name}=abc")


def test_specs_are_consistent():
    ids = [s.pid for s in POLICIES.values()]
    assert len(set(ids)) == len(ids)
    for name, spec in POLICIES.items():
        assert spec.name == name and spec.summary
    with pytest.raises(ConfigError, match="unknown policy 'nope'.*moe-infinity-lfu"):
        parse_policy("nope")


def test_alias_moe_infinity_lfu_is_lfu_and_keeps_its_name(prep):
    """MoE-Infinity's runtime eviction (fewest uses since load) is in-cache LFU."""
    cfg = SimConfig()
    cfg.replay.mode = "count"
    a, b = run(prep, cfg, "moe-infinity-lfu"), run(prep, cfg, "lfu")
    assert a["policy"] == "moe-infinity-lfu" and b["policy"] == "lfu"
    for key in ("hits", "misses", "evictions", "hit_rate_per_layer"):
        assert a[key] == b[key]


def test_aged_lfu_forgets_old_popularity():
    """One layer, top-1, 2 slots: expert 0 is used 20 times, then 1 and 2 alternate 10 times.
    Perfect LFU keeps 0 for good, so 1 and 2 fight over the other slot: 1 + 10 misses.
    Aged LFU (half-life 2 accesses) lets 0's count decay below theirs within a few rounds and
    then keeps 1 and 2."""
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    experts = [0] * 20 + [1, 2] * 5
    n = len(experts)
    meta = TraceMeta(model="t", num_layers=1, experts_per_layer=3, top_k=1, expert_bytes=1)
    tr = trace_from_arrays(meta, step=range(n), seq=[0] * n, pos=range(n), phase=[1] * n,
                           layer=[0] * n, offsets=np.arange(n + 1), experts=experts)  # fmt: skip
    prep = prepare(tr)
    assert run(prep, _cfg("count", slots=2), "lfu-perfect")["misses"] == 11
    aged = run(prep, _cfg("count", slots=2), "lfu-aged:half_life=2")["misses"]
    assert aged <= 6
    assert run(prep, _cfg("count", slots=2), "lfu-aged:half_life=1000")["misses"] == 11
