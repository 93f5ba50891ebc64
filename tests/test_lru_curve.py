"""The one-pass LRU curve (Mattson stack distances) equals per-size replays exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from simulator.cli import main
from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.lru_curve import lru_curve, one_pass_reason, stack_profile
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import read_trace, trace_from_arrays, write_trace

SAMPLE = "traces/sample/sample.parquet"


def _cfg(access="sequential", scope="global"):
    cfg = SimConfig()
    cfg.replay.mode = "count"
    cfg.replay.access = access
    cfg.cache.scope = scope
    return cfg


def _replay(prep, cfg, slots, **kw):
    c = copy.deepcopy(cfg)
    c.cache.fraction, c.cache.slots = None, slots
    return run(prep, c, "lru", **kw)


def _same(a, b):
    """Records equal in every key but the kernel time (and the private keys)."""
    strip = lambda r: {k: v for k, v in r.items() if k != "kernel_s" and not k.startswith("_")}  # noqa: E731
    assert strip(a) == strip(b)


def _sizes(prep, scope):
    top_k = prep.meta.top_k
    lo = top_k * (prep.meta.num_layers if scope == "per-layer" else 1)
    return list(range(lo, prep.acc.num_objects + 1))


def _random_prep(seed, **kw):
    rng = np.random.default_rng(seed)
    args = dict(layers=3, experts=8, top_k=2, sequences=6, prefill=4, decode=6, batch=3,
                skew=float(rng.uniform(0, 2)))  # fmt: skip
    args.update(kw)
    return prepare(random_trace(rng, **args))


def test_hand_computed_distances():
    # one layer, one expert per step: 0 1 2 0 1 3 0 -> distances cold x3, 2, 2, cold, 2
    meta = TraceMeta(model="hand", num_layers=1, experts_per_layer=4, top_k=1, expert_bytes=10)
    seq = [0, 1, 2, 0, 1, 3, 0]
    n = len(seq)
    tr = trace_from_arrays(meta, step=range(n), seq=[0] * n, pos=range(n), phase=[1] * n,
                           layer=[0] * n, offsets=range(n + 1), experts=seq)  # fmt: skip
    prep = prepare(tr)
    recs = {r["cache_slots"]: r for r in lru_curve(prep, _cfg(), slots=[1, 2, 3, 4])}
    assert [recs[c]["hits"] for c in (1, 2, 3, 4)] == [0, 0, 3, 3]
    # C=2: 7 misses; the two cold misses that find 2+ experts seen evict, and 3 reuse misses
    assert recs[2]["evictions"] == 5 and recs[2]["bytes_moved"] == 70
    assert recs[3]["evictions"] == 1 and recs[4]["evictions"] == 0
    for c, rec in recs.items():
        _same(rec, _replay(prep, _cfg(), c))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_sequential_equals_replays_at_every_size(seed, scope):
    prep = _random_prep(seed)
    cfg = _cfg("sequential", scope)
    sizes = _sizes(prep, scope)
    recs = lru_curve(prep, cfg, slots=sizes)
    assert all(r["_one_pass"] for r in recs)
    for s, rec in zip(sizes, recs, strict=True):
        _same(rec, _replay(prep, cfg, s))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_atomic_equals_replays_one_pass_where_groups_fit(seed, scope):
    prep = _random_prep(seed, experts=[8, 10, 6])
    cfg = _cfg("atomic", scope)
    sizes = _sizes(prep, scope)
    recs = lru_curve(prep, cfg, slots=sizes)
    prof = stack_profile(prep, scope, "atomic")
    assert prof.kmax.max() > prep.meta.top_k  # batched groups: some sizes are replayed
    for s, rec in zip(sizes, recs, strict=True):
        c = copy.deepcopy(cfg)
        c.cache.fraction, c.cache.slots = None, s
        from simulator.engine import geometry

        assert rec["_one_pass"] == bool(np.all(geometry(prep, c).cap >= prof.kmax))
        _same(rec, _replay(prep, cfg, s))
    assert any(r["_one_pass"] for r in recs)


def test_atomic_below_the_largest_group_is_not_a_stack_property():
    """Why atomic sizes below the largest group are replayed: forcing the one pass there
    gets the hit counts wrong."""
    prep = _random_prep(0)
    cfg = _cfg("atomic", "per-layer")
    prof = stack_profile(prep, "per-layer", "atomic")
    prof.kmax[:] = 0  # pretend every size is served exactly
    sizes = list(range(6, 12))  # 2-3 slots per layer, below the largest groups (5-6 experts)
    recs = lru_curve(prep, cfg, slots=sizes, profile=prof)
    wrong = [r["hits"] != _replay(prep, cfg, s)["hits"] for s, r in zip(sizes, recs, strict=True)]
    assert sum(wrong) >= 3


@pytest.mark.parametrize("access", ["sequential", "atomic"])
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_reset_and_measure_masks(access, scope):
    prep = _random_prep(7, sequences=9)
    rng = np.random.default_rng(3)
    g = prep.acc.num_groups
    kw = dict(reset_groups=rng.random(g) < 0.1, measure_groups=rng.random(g) < 0.6)
    cfg = _cfg(access, scope)
    sizes = _sizes(prep, scope)
    recs = lru_curve(prep, cfg, slots=sizes, **kw)
    for s, rec in zip(sizes, recs, strict=True):
        _same(rec, _replay(prep, cfg, s, **kw))
    assert recs[0]["accesses"] < prep.acc.num_accesses  # the mask took effect


@pytest.mark.parametrize("access", ["sequential", "atomic"])
def test_sample_trace_many_sizes(access):
    prep = prepare(read_trace(SAMPLE))
    cfg = _cfg(access)
    fractions = [round(0.02 + 0.03 * i, 2) for i in range(32)]  # 0.02 .. 0.95
    recs = lru_curve(prep, cfg, fractions=fractions)
    assert sum(r["_one_pass"] for r in recs) >= 30
    hits = [r["hits"] for r in recs]
    assert hits == sorted(hits) and hits[-1] > hits[0]  # LRU's inclusion property
    for f, rec in zip(fractions, recs, strict=True):
        c = copy.deepcopy(cfg)
        c.cache.fraction = f
        _same(rec, run(prep, c, "lru"))


def test_where_the_one_pass_applies():
    cfg = _cfg()
    assert one_pass_reason(cfg, "lru") is None
    assert "not LRU" in one_pass_reason(cfg, "fifo")
    assert one_pass_reason(cfg, "lru", free_prefetch=True) == "prefetching"
    timed = copy.deepcopy(cfg)
    timed.replay.mode = "timed"
    assert one_pass_reason(timed, "lru") == "timed mode"
    pinned = copy.deepcopy(cfg)
    pinned.cache.pinned = ["0:1"]
    assert one_pass_reason(pinned, "lru") == "pinned experts"
    with pytest.raises(ConfigError, match="does not apply: timed mode"):
        lru_curve(_random_prep(0), timed, slots=[4])


def test_invalid_sizes_raise_the_replay_errors():
    prep = _random_prep(0)
    with pytest.raises(ConfigError, match="fewer than top_k=2"):
        lru_curve(prep, _cfg(), slots=[1])
    with pytest.raises(ConfigError, match="exceed the trace's 24 experts"):
        lru_curve(prep, _cfg(), slots=[25])


def test_cli_curve_matches_replay(capsys, tmp_path):
    path = tmp_path / "t.parquet"
    write_trace(random_trace(np.random.default_rng(2), layers=3, experts=8, top_k=2), path)
    out = tmp_path / "curve.parquet"
    code = main(["curve", str(path), "--slots", "4", "9", "17", "--access", "sequential",
                 "--json", "-o", str(out)])  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["cache_slots"] for r in rows] == [4, 9, 17]
    for r in rows:
        main(["replay", str(path), "--mode", "count", "--policy", "lru", "--access",
              "sequential", "--cache-slots", str(r["cache_slots"]), "--json"])  # fmt: skip
        ref = json.loads(capsys.readouterr().out)
        r.pop("kernel_s"), ref.pop("kernel_s"), ref.pop("bandwidth_gbps")
        assert r == ref
    import pandas as pd

    assert pd.read_parquet(out)["hits"].tolist() == [r["hits"] for r in rows]
    code = main(["curve", str(path), "--slots", "1"])
    assert code == 2 and "fewer than top_k" in capsys.readouterr().err
