"""Sequential count mode equals libCacheSim exactly (LRU, FIFO, LFU, Belady).

moesim replays ``replay.access='sequential'`` the way classic cache simulators do (each access
alone), so on the same access sequence (the oracleGeneral export) its hit and miss counts must
be equal to libCacheSim's, not merely close: on small random traces (every cache size), on a
DeepSeek-V2-Lite-shaped synthetic trace and on the real DeepSeek-V2-Lite WebGLM test set.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.export import export, oracle_general_records
from tests.helpers import random_trace
from traces.format import TraceMeta
from traces.importers import import_moe_beyond
from traces.io import read_trace, trace_from_arrays
from traces.validate import validate_trace

lcs = pytest.importorskip("libcachesim")

POLICIES = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "belady": "Belady"}

# oracleGeneral as libCacheSim reads it (24-byte little-endian records), written out here
# independently of simulator.export so that the layout itself is checked too.
RECORD = np.dtype(
    [("time", "<u4"), ("obj_id", "<u8"), ("size", "<u4"), ("next_access", "<i8")], align=False
)


def _cfg(slots: int, access: str = "sequential", scope: str = "global") -> SimConfig:
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.scope = scope
    cfg.replay.mode = "count"
    cfg.replay.access = access
    return cfg.validate()


def _cache(policy: str, slots: int):
    # hashpower: log2 of the hash table's buckets. The default (24) allocates 16 M buckets per
    # cache, about 20 ms each; a few thousand experts need far fewer (the table grows anyway).
    return getattr(lcs, POLICIES[policy])(cache_size=slots, hashpower=12)


def _reader(path):
    return lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)


def lcs_misses(path, policy: str, slots: int, n: int) -> int:
    """libCacheSim's misses from ``process_trace`` (C loop; it returns only the miss ratio).

    The ratio is a double of ``misses / n``, so ``ratio * n`` lies within 1e-9 of the count
    for any n this suite uses; the assertion guards that.
    """
    ratio, _ = _cache(policy, slots).process_trace(_reader(path))
    misses = round(ratio * n)
    assert abs(ratio * n - misses) < 1e-6, (ratio, n)
    return misses


def lcs_hits_exact(path, policy: str, slots: int) -> np.ndarray:
    """libCacheSim's hit (True) or miss of every request, counted exactly (one get() each)."""
    cache = _cache(policy, slots)
    return np.array([bool(cache.get(req)) for req in _reader(path)], dtype=bool)


def _write(records: np.ndarray, path) -> None:
    records.astype(RECORD).tofile(path)


# ------------------------------------------------------------------ small random traces

CASES = [
    dict(layers=3, experts=6, top_k=2, steps="native", batch=2),
    dict(layers=3, experts=6, top_k=2, steps="per-token", batch=1),
    dict(layers=2, experts=8, top_k=3, steps="native", batch=3, skew=0.3),
    dict(layers=4, experts=5, top_k=1, steps="native", batch=1, skew=1.5),
    dict(layers=2, experts=[4, 7], top_k=2, steps="native", batch=2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_small_random_traces_every_cache_size(case, tmp_path):
    """Exact per-request counts from libCacheSim, every size from top_k to all experts."""
    path = tmp_path / "t.oracleGeneral"
    for seed in range(3):
        rng = np.random.default_rng(1000 * case + seed)
        prep = prepare(random_trace(rng, sequences=4, prefill=3, decode=5, **CASES[case]))
        export(prep, path, "oracle-general")
        n = prep.acc.num_accesses
        for slots in range(prep.meta.top_k, prep.acc.num_objects + 1):
            for policy in POLICIES:
                got = run(prep, _cfg(slots), policy)
                hits = lcs_hits_exact(path, policy, slots)
                assert len(hits) == n
                want = (int(hits.sum()), int(n - hits.sum()))
                assert (got["hits"], got["misses"]) == want, (case, seed, slots, policy)
                assert lcs_misses(path, policy, slots, n) == want[1]


@st.composite
def tiny_traces(draw):
    """Any small trace: every step runs every layer for 1-2 sequences, k experts each."""
    n_layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 5))
    top_k = draw(st.integers(1, min(3, experts)))
    n_steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 2))
    perm = st.permutations(range(experts)).map(lambda p: list(p[:top_k]))
    rows, chosen = [], []
    for step in range(n_steps):
        for lay in range(n_layers):
            for s in range(batch):
                rows.append((step, lay, s, step))
                chosen += draw(perm)
    arr = np.array(rows, dtype=np.int64)
    meta = TraceMeta(model="tiny", num_layers=n_layers, experts_per_layer=experts,
                     top_k=top_k, expert_bytes=1000)  # fmt: skip
    tr = trace_from_arrays(
        meta, step=arr[:, 0], layer=arr[:, 1], seq=arr[:, 2], pos=arr[:, 3],
        phase=np.ones(len(rows), np.int64), offsets=np.arange(len(rows) + 1) * top_k,
        experts=np.array(chosen),
    )  # fmt: skip
    validate_trace(tr)
    return tr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tr=tiny_traces(), data=st.data())
def test_any_tiny_trace_equals_libcachesim(tmp_path_factory, tr, data):
    """Property form: on a mismatch, hypothesis shrinks to the smallest failing sequence."""
    prep = prepare(tr)
    path = tmp_path_factory.mktemp("tiny") / "t.oracleGeneral"
    export(prep, path, "oracle-general")
    slots = data.draw(st.integers(prep.meta.top_k, prep.acc.num_objects), label="slots")
    for policy in POLICIES:
        hits = lcs_hits_exact(path, policy, slots)
        got = run(prep, _cfg(slots), policy)
        seq = prep.acc.obj.tolist()
        assert (got["hits"], got["misses"]) == (hits.sum(), len(hits) - hits.sum()), (
            policy, slots, seq, hits.astype(int).tolist())  # fmt: skip


def test_synthetic_deepseek_shaped_trace(tmp_path):
    """26 layers x 64 experts, top-6, continuous batching: the real geometry, synthetic routing."""
    from traces.synth import SynthKnobs, synth_trace

    knobs = SynthKnobs(sequences=6, prefill_len=12, decode_len=10, batch_size=3, skew=0.6, seed=5)
    prep = prepare(synth_trace("deepseek-v2-lite", knobs))
    path = tmp_path / "ds.oracleGeneral"
    export(prep, path, "oracle-general")
    n = prep.acc.num_accesses
    assert n > 10_000
    for slots in (6, 64, 166, 416, 832, 1500):
        for policy in POLICIES:
            got = run(prep, _cfg(slots), policy)["misses"]
            assert got == lcs_misses(path, policy, slots, n), (slots, policy)


def test_per_layer_scope_equals_one_libcachesim_cache_per_layer(tmp_path):
    """Per-layer partitions are independent caches over each layer's own subsequence."""
    rng = np.random.default_rng(77)
    prep = prepare(random_trace(rng, layers=3, experts=7, top_k=2, sequences=5, prefill=4,
                                decode=6, batch=2))  # fmt: skip
    rec = oracle_general_records(prep)
    layer_of = prep.acc.obj_layer[prep.acc.obj]
    n_layers = prep.meta.num_layers
    for per_layer in (2, 3, 5):  # slots divisible by the layers: every partition the same size
        for policy in POLICIES:
            want = 0
            for lay in range(n_layers):
                path = tmp_path / f"l{lay}.oracleGeneral"
                sub = rec[layer_of == lay]  # global next-access indices keep their order
                _write(sub, path)
                want += int(len(sub) - lcs_hits_exact(path, policy, per_layer).sum())
            got = run(prep, _cfg(per_layer * n_layers, scope="per-layer"), policy)["misses"]
            assert got == want, (per_layer, policy)


def test_object_id_zero_is_an_ordinary_object(tmp_path):
    """The export numbers layer 0's expert 0 as object 0: libCacheSim must not treat it apart.

    Same sequences with every id shifted by one give the same per-request hits, and a trace of
    object 0 alone hits after its first access.
    """
    only0 = np.zeros(5, RECORD)
    only0["time"] = np.arange(5)
    only0["size"] = 1
    only0["next_access"] = [1, 2, 3, 4, -1]
    _write(only0, tmp_path / "zero.bin")
    for policy in POLICIES:
        assert lcs_hits_exact(tmp_path / "zero.bin", policy, 1).tolist() == [0, 1, 1, 1, 1]
    rng = np.random.default_rng(3)
    prep = prepare(random_trace(rng, layers=2, experts=4, top_k=2, sequences=3, prefill=3,
                                decode=4, skew=1.5))  # fmt: skip
    rec = oracle_general_records(prep)
    assert (rec["obj_id"] == 0).sum() > 0
    shifted = rec.copy()
    shifted["obj_id"] += 1
    _write(rec, tmp_path / "a.bin")
    _write(shifted, tmp_path / "b.bin")
    for slots in (2, 3, 5):
        for policy in POLICIES:
            a = lcs_hits_exact(tmp_path / "a.bin", policy, slots)
            b = lcs_hits_exact(tmp_path / "b.bin", policy, slots)
            assert a.tolist() == b.tolist(), (slots, policy)


def test_libcachesim_reads_the_export_record_by_record(tmp_path):
    """Object ids, times and next-access indices arrive as written (-1 = never again)."""
    rng = np.random.default_rng(11)
    prep = prepare(random_trace(rng, layers=2, experts=5, top_k=2, sequences=3))
    path = tmp_path / "t.oracleGeneral"
    export(prep, path, "oracle-general")
    reader = _reader(path)
    assert reader.n_total_req == prep.acc.num_accesses
    reqs = list(_reader(path))
    assert [r.obj_id for r in reqs] == prep.acc.obj.tolist()
    assert [r.clock_time for r in reqs] == prep.acc.access_group().tolist()
    assert all(r.obj_size == 1 for r in reqs)
    got_next = np.array([r.next_access_vtime for r in reqs])
    never = got_next >= np.iinfo(np.int64).max // 2  # libCacheSim maps -1 to its "no reuse"
    want = np.asarray(prep.next_use)
    assert np.array_equal(never, want == np.iinfo(np.int64).max)
    assert np.array_equal(got_next[~never], want[~never])


# ------------------------------------------------------------------ the real test set


@pytest.fixture(scope="module")
def webglm(tmp_path_factory):
    """The real DeepSeek-V2-Lite WebGLM test set (100 prompts), imported and exported once."""
    src = real_path("deepseek-v2-lite-moe-beyond", "webglm-test")
    d = tmp_path_factory.mktemp("webglm")
    out = d / "webglm.parquet"
    import_moe_beyond([src], out, jobs=1)
    prep = prepare(read_trace(out))
    path = d / "webglm.oracleGeneral"
    export(prep, path, "oracle-general")
    return prep, path


@pytest.mark.real
@pytest.mark.parametrize("slots", [6, 166, 416, 832, 1300])
def test_real_deepseek_webglm_equals_libcachesim(webglm, slots):
    prep, path = webglm
    n = prep.acc.num_accesses
    assert n == 240_708
    for policy in POLICIES:
        got = run(prep, _cfg(slots), policy)
        assert got["accesses"] == n
        assert got["misses"] == lcs_misses(path, policy, slots, n), (slots, policy)


@pytest.mark.real
def test_real_deepseek_webglm_atomic_never_beats_sequential_belady(webglm):
    """Sequential Belady is the demand-paging optimum; atomic access restricts its choices.

    (Atomic LRU may land on either side of sequential LRU; Belady cannot.)
    """
    prep, _ = webglm
    for slots in (166, 416):
        seq = run(prep, _cfg(slots), "belady")["misses"]
        atomic = run(prep, _cfg(slots, access="atomic"), "belady")["misses"]
        assert atomic >= seq
