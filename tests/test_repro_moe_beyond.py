"""MoE-Beyond's per-prompt protocol (simulator/protocols.py): hand-checked toy cases, the
engine against a plain-Python replay, and sanity relations on real test prompts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_path

from simulator.config import SimConfig
from simulator.protocols import (
    MOE_BEYOND_CODE,
    PerSequenceProtocol,
    ProtocolRunner,
    moe_beyond_reference,
    popularity_predictions,
)
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import trace_from_arrays


def _cfg(slots, access="sequential", prefetch=False, scope="global"):
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.scope = scope
    cfg.replay.mode = "count"
    cfg.replay.access = access
    cfg.replay.prefetch = "trace" if prefetch else "none"
    cfg.replay.horizon = 1
    return cfg.validate()


def _toy(seqs, preds=None):
    """One layer, 4 experts, top-1; every token its own step; ``seqs``: experts per token."""
    step, seq, pos, experts, pred_ids = [], [], [], [], []
    for s, toks in enumerate(seqs):
        for p, e in enumerate(toks):
            step.append(len(step))
            seq.append(s)
            pos.append(p)
            experts.append(e)
            pred_ids.append((preds or {}).get((s, p), []))
    n = len(step)
    meta = TraceMeta(model="toy", num_layers=1, experts_per_layer=4, top_k=1, expert_bytes=10)
    po = np.zeros(n + 1, np.int64)
    np.cumsum([len(x) for x in pred_ids], out=po[1:])
    pv = np.array([e for x in pred_ids for e in x], np.int64)
    return trace_from_arrays(meta, step=step, seq=seq, pos=pos, phase=[1] * n, layer=[0] * n,
                             offsets=np.arange(n + 1), experts=experts,
                             preds={1: (po, pv)})  # fmt: skip


# Two prompts through 2 LRU slots, 2 warm-up tokens:
#   prompt 0: 0 1 | 0 2 0   warm-up 0, 1 -> [0 1]; 0 hit; 2 miss (evicts 1); 0 hit: 2 of 3
#   prompt 1: 3 3 | 0       reset; warm-up 3, 3 -> [3]; 0 miss: 0 of 1
# Without the reset prompt 1 starts from [2 0] (LRU first): 3 evicts 2, 3 hits, 0 hits: 1 of 1.
SEQS = [[0, 1, 0, 2, 0], [3, 3, 0]]


def _hits(runner, slots=2, prefetch=False, access="sequential"):
    r = runner.run(_cfg(slots, access, prefetch), "lru", free_prefetch=prefetch)
    return r["hits"], r["accesses"]


def test_reset_per_prompt_and_warm_up_exclusion_by_hand():
    tr = _toy(SEQS)
    assert _hits(ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=2))) == (2, 4)
    assert _hits(ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=2, reset=False))) == (3, 4)
    # no warm-up: everything counted; prompt 0: m m h m h, prompt 1: m h m
    assert _hits(ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=0))) == (3, 8)
    for access in ("sequential", "atomic"):
        assert _hits(ProtocolRunner(tr), access=access) == (0, 0)  # both prompts <= 10 tokens
    assert moe_beyond_reference(tr, 2, warmup_tokens=2, predictions=False) == (2, 4)
    rep = ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=2)).replay(_cfg(2))
    assert (rep.sequences, rep.measured_sequences, rep.measured_rows) == (2, 2, 4)
    assert rep.reset_groups.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert rep.measure_groups.tolist() == [0, 0, 1, 1, 1, 0, 0, 1]


def test_free_prefetch_only_after_warm_up_by_hand():
    """Prompt 0 token 3 predicts 2: inserted before it (evicting 1), so 2 hits: 3 of 3.
    Prompt 1 token 1 (warm-up) predicts 0: ignored by default (0 misses later); inserted with
    prefetch_during_warmup ([3 0], 3 hits, then 0 hits)."""
    tr = _toy(SEQS, preds={(0, 3): [2], (1, 1): [0]})
    p = PerSequenceProtocol(warmup_tokens=2)
    assert _hits(ProtocolRunner(tr, p), prefetch=True) == (3, 4)
    assert moe_beyond_reference(tr, 2, warmup_tokens=2) == (3, 4)
    q = PerSequenceProtocol(warmup_tokens=2, prefetch_during_warmup=True)
    assert _hits(ProtocolRunner(tr, q), prefetch=True) == (4, 4)


def test_repeated_first_measured_row_by_hand():
    """The MoE-Beyond loop boundary: prompt 1's first measured token (0) is also accessed in
    the warm-up, so it hits: 1 of 1 (prompt 0 unchanged)."""
    tr = _toy(SEQS)
    p = PerSequenceProtocol(warmup_tokens=2, repeat_first_measured=True)
    assert _hits(ProtocolRunner(tr, p)) == (3, 4)
    ref = moe_beyond_reference(tr, 2, warmup_tokens=2, predictions=False,
                               repeat_first_measured=True)  # fmt: skip
    assert ref == (3, 4)


def test_random_fill_by_hand():
    """No warm-up, 2 slots filled with 2 random experts per prompt: a prompt's first access
    hits exactly when its expert was drawn; the fills are distinct objects, per prompt."""
    tr = _toy([[0], [1], [2], [3]] * 3)
    for seed in range(5):
        runner = ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=0, fill="random", seed=seed))
        rep = runner.replay(_cfg(2))
        want = sum(int(e in rep.fills[s]) for s, (e,) in enumerate([[0], [1], [2], [3]] * 3))
        assert all(len(set(f.tolist())) == 2 for f in rep.fills.values())
        assert _hits(runner) == (want, 12)
    first = ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=0, fill="random", seed=1))
    again = ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=0, fill="random", seed=1))
    f1, f2 = first.replay(_cfg(2)).fills, again.replay(_cfg(2)).fills
    assert all(np.array_equal(f1[s], f2[s]) for s in f1)  # seeded


def test_profile_fill_and_per_layer_random_fill():
    rng = np.random.default_rng(3)
    tr = random_trace(rng, layers=3, experts=6, top_k=2, sequences=3, prefill=3, decode=3,
                      batch=1, steps="per-token")  # fmt: skip
    counts = np.arange(18, dtype=float)  # hotter with higher id
    r = ProtocolRunner(tr, PerSequenceProtocol(warmup_tokens=0, fill="profile"),
                       profile_counts=counts)  # fmt: skip
    assert r.replay(_cfg(4)).fills[0].tolist() == [14, 15, 16, 17]  # coldest first
    per_layer = r.replay(_cfg(7, scope="per-layer")).fills[0]
    assert sorted(per_layer.tolist()) == [3, 4, 5, 10, 11, 16, 17]  # 3 + 2 + 2 slots
    rnd = ProtocolRunner(tr, PerSequenceProtocol(fill="random", warmup_tokens=1))
    f = rnd.replay(_cfg(7, scope="per-layer")).fills
    for objs in f.values():
        assert np.bincount(objs // 6, minlength=3).tolist() == [3, 2, 2]
    res = rnd.run(_cfg(7, scope="per-layer", access="atomic"), "lru")
    assert 0 <= res["hits"] <= res["accesses"]


@pytest.mark.parametrize("seed", range(4))
def test_engine_equals_plain_python_replay(seed):
    """Sequential LRU under every option combination equals the OrderedDict replay."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, layers=3, experts=5, top_k=2, sequences=4, prefill=4, decode=5,
                      batch=1, steps="per-token", preds=(1,))  # fmt: skip
    for slots in (2, 5, 9):
        for fill in ("none", "random"):
            for repeat in (False, True):
                for prefetch in (False, True):
                    p = PerSequenceProtocol(warmup_tokens=3, fill=fill, seed=seed,
                                            repeat_first_measured=repeat)  # fmt: skip
                    runner = ProtocolRunner(tr, p)
                    rep = runner.replay(_cfg(slots))
                    want = moe_beyond_reference(tr, slots, warmup_tokens=3, fills=rep.fills,
                                                predictions=prefetch,
                                                repeat_first_measured=repeat)  # fmt: skip
                    assert _hits(runner, slots, prefetch) == want, (slots, fill, repeat)


def test_refused_settings():
    with pytest.raises(ConfigError, match="needs reset"):
        PerSequenceProtocol(fill="random", reset=False)
    with pytest.raises(ConfigError, match="expected one of"):
        PerSequenceProtocol(fill="lucky")
    rng = np.random.default_rng(0)
    batched = random_trace(rng, sequences=4, batch=2)  # decode steps hold two sequences
    with pytest.raises(ConfigError, match="several sequences"):
        ProtocolRunner(batched)
    one_step = random_trace(rng, sequences=2, prefill=4, decode=0, batch=1)  # prefill steps
    with pytest.raises(ConfigError, match="per-token steps"):
        ProtocolRunner(one_step, PerSequenceProtocol(warmup_tokens=2)).replay(_cfg(6))
    with pytest.raises(ConfigError, match="count mode"):
        cfg = _cfg(6)
        cfg.replay.mode = "timed"
        ProtocolRunner(one_step, PerSequenceProtocol(warmup_tokens=0)).run(cfg, "lru")


@pytest.fixture(scope="module")
def webglm_pred(tmp_path_factory):
    from traces.importers import import_moe_beyond
    from traces.io import read_trace

    src = real_path("deepseek-v2-lite-moe-beyond", "webglm-test-predicted")
    out = tmp_path_factory.mktemp("repro") / "pred.parquet"
    import_moe_beyond([src], out, limit=12)
    return read_trace(out)


def test_real_prompts_protocol_relations(webglm_pred):
    tr = webglm_pred
    layers = tr.meta.num_layers
    tokens = np.bincount(tr.seq[tr.layer == 0].astype(np.int64))
    tokens = tokens[tokens > 0]
    want_accesses = int(np.maximum(tokens - 10, 0).sum()) * layers * 6
    assert want_accesses > 0
    paper = ProtocolRunner(tr)
    for access in ("sequential", "atomic"):
        rates = {}
        for slots in (166, 832):
            for prefetch in (False, True):
                r = paper.run(_cfg(slots, access, prefetch), "lru", free_prefetch=prefetch)
                assert r["accesses"] == want_accesses  # warm-up tokens excluded
                assert r["hits"] + r["misses"] == r["accesses"]
                assert 0.0 <= r["hit_rate"] <= 1.0
                rates[slots, prefetch] = r["hit_rate"]
        assert rates[166, True] > rates[166, False] + 0.2
        assert rates[832, True] > rates[832, False]
        assert rates[832, False] > rates[166, False]
        belady = paper.run(_cfg(166, access), "belady")["hit_rate"]
        assert rates[166, False] <= belady <= 1.0
    # the engine is MoE-Beyond's replay, hit for hit
    r = paper.run(_cfg(166, prefetch=True), "lru", free_prefetch=True)
    assert (r["hits"], r["accesses"]) == moe_beyond_reference(tr, 166)
    code = ProtocolRunner(tr, MOE_BEYOND_CODE)
    rep = code.replay(_cfg(166))
    got = code.run(_cfg(166, prefetch=True), "lru", free_prefetch=True)
    want = moe_beyond_reference(tr, 166, fills=rep.fills, repeat_first_measured=True)
    assert (got["hits"], got["accesses"]) == want
    # at 166 slots the warm-up (about 780+ distinct experts) flushes any initial fill
    no_fill = ProtocolRunner(tr, PerSequenceProtocol(repeat_first_measured=True))
    assert no_fill.run(_cfg(166, prefetch=True), "lru", free_prefetch=True)["hits"] == got["hits"]


def test_popularity_predictions():
    rng = np.random.default_rng(1)
    tr = random_trace(rng, layers=2, experts=4, top_k=2, steps="per-token", batch=1)
    counts = np.array([5, 1, 5, 0, 2, 9, 2, 9], float)
    hi = popularity_predictions(tr, counts, 2)
    lo = popularity_predictions(tr, counts, 2, ties="low")
    po, pv = hi.preds[1]
    assert np.array_equal(np.diff(po), np.full(tr.num_rows, 2))
    row0 = {0: [2, 0], 1: [3, 1]}
    row0_low = {0: [0, 2], 1: [1, 3]}
    for r in range(tr.num_rows):
        lay = int(tr.layer[r])
        assert pv[po[r] : po[r + 1]].tolist() == row0[lay]
        assert lo.preds[1][1][2 * r : 2 * r + 2].tolist() == row0_low[lay]
    with pytest.raises(ConfigError):
        popularity_predictions(tr, counts, 5)
