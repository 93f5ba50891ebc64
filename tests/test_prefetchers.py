"""Prefetchers of issue #4: each kernel against a slow, obvious twin; hand-worked cases.

Twins are plain Python over the trace's rows in replay order, written from the documented rules
(simulator/history_predictors.py, moe_infinity.py, adaptive_horizon.py), not from the kernels.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple

import numpy as np
import pytest

from simulator import adaptive_horizon, history_predictors, moe_infinity
from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.prefetchers import issue_lists, parse_prefetch
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import trace_from_arrays


def _rows(tr):
    """Per row: (step, seq, pos, layer, [experts])."""
    out = []
    for r in range(tr.num_rows):
        ex = [int(x) for x in tr.experts[tr.offsets[r] : tr.offsets[r + 1]]]
        out.append((int(tr.step[r]), int(tr.seq[r]), int(tr.pos[r]), int(tr.layer[r]), ex))
    return out


def _groups(rows):
    """Row indices per (step, layer) group, in replay order."""
    groups = []
    for r, row in enumerate(rows):
        if r == 0 or row[0] != rows[r - 1][0] or row[3] != rows[r - 1][3]:
            groups.append([])
        groups[-1].append(r)
    return groups


def _csr_lists(off, ids):
    return [list(map(int, ids[off[r] : off[r + 1]])) for r in range(len(off) - 1)]


TRACES = [
    dict(layers=3, experts=6, top_k=2, sequences=3, batch=2),
    dict(layers=4, experts=8, top_k=2, sequences=5, batch=1, steps="per-token"),
    dict(layers=5, experts=[4, 6, 5, 6, 4], top_k=1, sequences=6, batch=3, prefill=2, decode=4),
    dict(layers=2, experts=5, top_k=3, sequences=8, batch=2, skew=2.0),
]


# ------------------------------------------------------------------------------ prev-token


def _prev_token_twin(tr):
    rows = _rows(tr)
    last = {}
    pred = [[] for _ in rows]
    for grp in _groups(rows):
        for r in grp:
            _, q, _, lay, _ = rows[r]
            pred[r] = list(last.get((q, lay), []))
        for r in grp:
            last[(rows[r][1], rows[r][3])] = rows[r][4]
    return pred


@pytest.mark.parametrize("case", range(len(TRACES)))
def test_prev_token_equals_twin(case):
    tr = random_trace(np.random.default_rng(case), **TRACES[case])
    acc = prepare(tr).acc
    off, ids = history_predictors.prev_token(tr, acc)
    assert _csr_lists(off, ids) == _prev_token_twin(tr)


# ----------------------------------------------------------------------------- cross-layer


def _cross_layer_twin(tr, h, top_n, warm=None):
    rows = _rows(tr)
    token_row = {(s, q, p, lay): r for r, (s, q, p, lay, _) in enumerate(rows)}
    t = defaultdict(float)
    if warm is not None:
        for (lay, e, f), v in np.ndenumerate(warm):
            if v:
                t[(lay, e, f)] = float(v)
    epl = tr.meta.experts_per_layer
    pred = [[] for _ in rows]
    for grp in _groups(rows):
        for r in grp:
            s, q, p, lay, ex = rows[r]
            src = token_row.get((s, q, p, lay - h))
            if src is not None:
                for e in rows[src][4]:
                    for f in ex:
                        t[(lay - h, e, f)] += 1
        for r in grp:
            s, q, p, lay, ex = rows[r]
            d = token_row.get((s, q, p, lay + h))
            if d is None:
                continue
            score = {f: sum(t[(lay, e, f)] for e in ex) for f in range(epl[lay + h])}
            ranked = sorted((f for f in score if score[f] > 0), key=lambda f: (-score[f], f))
            pred[d] = ranked[:top_n]
    return pred


@pytest.mark.parametrize("case", range(len(TRACES)))
@pytest.mark.parametrize("h", [1, 2])
def test_cross_layer_equals_twin(case, h):
    tr = random_trace(np.random.default_rng(10 + case), **TRACES[case])
    acc = prepare(tr).acc
    off, ids = history_predictors.cross_layer(tr, acc, h, 2)
    assert _csr_lists(off, ids) == _cross_layer_twin(tr, h, 2)


@pytest.mark.parametrize("top_n", [1, 6, 13])
def test_cross_layer_top6_rows_equal_twin(top_n):
    """Six experts per token (DeepSeek, Qwen: the kernel's one-pass sum of six rows), experts
    of unequal counts per layer, many tied scores, and more names asked for than are scored."""
    tr = random_trace(np.random.default_rng(31), layers=4, experts=[12, 16, 9, 16], top_k=6,
                      sequences=6, batch=2, prefill=3, decode=5, skew=1.5)  # fmt: skip
    acc = prepare(tr).acc
    off, ids = history_predictors.cross_layer(tr, acc, 1, top_n)
    got = _csr_lists(off, ids)
    assert got == _cross_layer_twin(tr, 1, top_n)
    assert max(len(p) for p in got) == min(top_n, 16)


def _rows_with_gaps(rng):
    """(step, seq, pos, layer) rows, steps in order, rows shuffled inside each step: tokens
    without rows at some layers, a few duplicated rows, and the same (seq, pos) in two steps
    (a recomputed token)."""
    rows = []
    for s in range(6):
        part = []
        for q in rng.choice(5, 3, replace=False):
            for p in rng.choice(4, int(rng.integers(1, 4)), replace=False):
                for lay in range(5):
                    if rng.random() < 0.75:
                        part.append((s, q, p, lay))
                    if rng.random() < 0.1:
                        part.append((s, q, p, lay))
        rng.shuffle(part)
        rows += part
    step, seq, pos, layer = (np.array(c) for c in zip(*rows, strict=True))
    return step.astype(np.int64), seq.astype(np.int64), pos.astype(np.int32), layer.astype(np.int16)


def _source_twin(step, seq, pos, layer, h):
    row = {}
    for r, key in enumerate(zip(step, seq, pos, layer, strict=True)):
        row[key] = r  # of two rows of one token and layer, the later one
    return [row.get((step[r], seq[r], pos[r], layer[r] - h), -1) for r in range(len(step))]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("h", [1, 2, 3])
def test_source_rows_table_and_sort_equal_twin(seed, h):
    """The token table and the sort give the same source rows as a dict of tokens, with gaps
    in the layers, duplicates and recomputed tokens; rows whose steps are out of order go to
    the sort."""
    from types import SimpleNamespace

    step, seq, pos, layer = _rows_with_gaps(np.random.default_rng(seed))
    tr = SimpleNamespace(step=step, seq=seq, pos=pos, layer=layer, num_rows=len(step),
                         meta=SimpleNamespace(num_layers=5))  # fmt: skip
    expect = _source_twin(step, seq, pos, layer, h)
    assert max(expect) >= 0
    table = history_predictors._source_by_table(seq, pos, step, layer.astype(np.int64), 5, h)
    assert table is not None and table.tolist() == expect
    assert history_predictors.source_rows_by_sort(tr, h).tolist() == expect
    assert history_predictors.source_rows(tr, h).tolist() == expect
    perm = np.random.default_rng(seed).permutation(len(step))  # steps out of order
    tp = SimpleNamespace(step=step[perm], seq=seq[perm], pos=pos[perm], layer=layer[perm],
                         num_rows=len(step), meta=tr.meta)  # fmt: skip
    assert history_predictors._source_by_table(tp.seq, tp.pos, tp.step,
                                               tp.layer.astype(np.int64), 5, h) is None  # fmt: skip
    assert history_predictors.source_rows(tp, h).tolist() == _source_twin(
        tp.step, tp.seq, tp.pos, tp.layer, h
    )
    wide = SimpleNamespace(**{**vars(tr), "pos": pos * 100_000})  # a table too large: the sort
    assert history_predictors._source_by_table(seq, wide.pos, step, layer.astype(np.int64), 5,
                                               h) is None  # fmt: skip
    assert history_predictors.source_rows(wide, h).tolist() == expect


def test_cross_layer_warm_counts_and_shape_check():
    rng = np.random.default_rng(5)
    train = random_trace(rng, layers=3, experts=6, top_k=2, sequences=4)
    test = random_trace(rng, layers=3, experts=6, top_k=2, sequences=2)
    warm = history_predictors.transition_counts(train, 1)
    # the warm table is the count of (token, e at l, e' at l+1) pairs of the training trace
    twin = np.zeros_like(warm)
    for s, q, p, lay, ex in _rows(train):
        for s2, q2, p2, lay2, ex2 in _rows(train):
            if (s2, q2, p2, lay2) == (s, q, p, lay + 1):
                for e in ex:
                    for f in ex2:
                        twin[lay, e, f] += 1
    assert np.array_equal(warm, twin)
    off, ids = history_predictors.cross_layer(test, prepare(test).acc, 1, 3, warm)
    assert _csr_lists(off, ids) == _cross_layer_twin(test, 1, 3, warm)
    with pytest.raises(ConfigError, match="expected a model of 3 layers"):
        history_predictors.cross_layer(test, prepare(test).acc, 1, 3, warm[:2])


def test_cross_layer_learns_a_planted_rule():
    """Expert e at layer 0 always leads to expert (e + 1) % 4 at layer 1: a pair's first
    sighting has no guess (nothing learned from e yet), every later one is exact."""
    steps = [[[e], [(e + 1) % 4]] for e in [0, 1, 2, 3, 2, 0, 3, 1, 1, 2]]
    tr = _hand_trace(2, 4, 1, steps)
    off, ids = history_predictors.cross_layer(tr, prepare(tr).acc, 1, 1)
    pred = _csr_lists(off, ids)
    layer1 = [pred[2 * s + 1] for s in range(len(steps))]
    truth = [[(e[0][0] + 1) % 4] for e in steps]
    assert layer1[:4] == [[], [], [], []]  # experts 0..3 at layer 0 for the first time
    assert layer1[4:] == truth[4:]


# ---------------------------------------------------------------------------- MoE-Infinity


def _moe_infinity_twin(tr, horizon, top_n, capacity, warm=None):
    rows = _rows(tr)
    n_layers = tr.meta.num_layers
    e_max = max(tr.meta.experts_per_layer)
    base = np.r_[0, np.cumsum(tr.meta.experts_per_layer)]
    groups = _groups(rows)
    last_group = {}
    for gi, grp in enumerate(groups):
        for r in grp:
            last_group[rows[r][1]] = gi
    coll = []  # entries: dict(mat, matched, born, snap)
    snaps = []
    born = 0

    def add(mat):
        nonlocal born
        entry = dict(mat=mat.astype(np.float32).copy(), matched=0, born=born, snap=len(snaps))
        snaps.append(entry["mat"])
        born += 1
        if len(coll) < capacity:
            coll.append(entry)
        else:
            k = min(range(len(coll)), key=lambda c: (coll[c]["matched"], coll[c]["born"]))
            coll[k] = entry

    for w in [] if warm is None else warm[-capacity:]:
        add(w)
    eam = {}
    issue = []
    match = []
    step_groups = defaultdict(list)
    for gi, grp in enumerate(groups):
        step_groups[rows[grp[0]][0]].append(gi)
    for s in sorted(step_groups):
        gis = step_groups[s]
        layer_group = {rows[groups[gi][0]][3]: gi for gi in gis}
        finished = []
        for gi in gis:
            lay = rows[groups[gi][0]][3]
            seqs = []
            for r in groups[gi]:
                q = rows[r][1]
                if q not in eam:
                    eam[q] = np.zeros((n_layers, e_max))
                if q not in seqs:
                    seqs.append(q)
            # match (rows after `lay` are as at the start of the step)
            best = {}
            for q in seqs:
                a = eam[q]
                score = np.zeros(len(coll), np.float32)  # float32 throughout, as the pass
                for j in range(n_layers - 1, lay, -1):
                    asq = float((a[j] ** 2).sum())
                    if asq == 0:
                        continue
                    w = np.float32(1 / np.sqrt(asq))
                    for k, ent in enumerate(coll):
                        sq = float((ent["mat"][j].astype(np.float64) ** 2).sum())
                        inv = np.float32(1 / np.sqrt(sq)) if sq > 0 else np.float32(0)
                        dot = np.float32(a[j] @ ent["mat"][j].astype(np.float64))
                        score[k] = score[k] + np.float32(np.float32(dot * inv) * w)
                k = -1
                for c in range(len(coll)):
                    if score[c] > (score[k] if k >= 0 else 0.0):
                        k = c
                best[q] = k
            for r in groups[gi]:
                q = rows[r][1]
                for e in rows[r][4]:
                    eam[q][lay, e] += 1
                if last_group[q] == gi and q not in finished:
                    finished.append(q)
            cand = {}
            order = []
            ids = []
            for q in seqs:
                k = best[q]
                if k < 0:
                    continue
                coll[k]["matched"] += 1
                ids.append(coll[k]["snap"])
                m = coll[k]["mat"]
                for tl in range(lay + 1, min(lay + horizon, n_layers - 1) + 1):
                    if tl not in layer_group:
                        continue
                    n_e = tr.meta.experts_per_layer[tl]
                    top = sorted((e for e in range(n_e) if m[tl, e] > 0),
                                 key=lambda e: (-m[tl, e], e))[:top_n]  # fmt: skip
                    for e in top:
                        o = int(base[tl] + e)
                        p = (float(m[tl, e]) + 1e-8) * (1 - (tl - lay) / (n_layers + 1))
                        if o not in cand:
                            cand[o] = [p, layer_group[tl]]
                            order.append(o)
                        else:
                            cand[o][0] += p
            order.sort(key=lambda o: -cand[o][0])  # stable: first named first on ties
            issue.append([(o, cand[o][1]) for o in order])
            match.append(ids)
        for q in finished:
            add(eam.pop(q))
    return issue, match, snaps


def _issue_by_group(off, obj, tgt):
    return [
        [(int(obj[j]), int(tgt[j])) for j in range(off[g], off[g + 1])] for g in range(len(off) - 1)
    ]


@pytest.mark.parametrize("case", range(len(TRACES)))
@pytest.mark.parametrize("horizon,capacity", [(1, 1000), (2, 2), (3, 1)])
def test_moe_infinity_equals_twin(case, horizon, capacity):
    rng = np.random.default_rng(20 + case)
    tr = random_trace(rng, **TRACES[case])
    warm = moe_infinity.eam_of_sequences(random_trace(rng, **TRACES[case]))
    for w in (None, warm):
        (off, obj, tgt), m = moe_infinity.build(tr, prepare(tr).acc, horizon, 2, capacity, w)
        issue, match, snaps = _moe_infinity_twin(tr, horizon, 2, capacity, w)
        assert _issue_by_group(off, obj, tgt) == issue
        assert _csr_lists(m.off, m.ids) == match
        assert len(snaps) == m.snap.shape[0]
        base = np.r_[0, np.cumsum(tr.meta.experts_per_layer)]
        for s, mat in enumerate(snaps):
            for lay, n_e in enumerate(tr.meta.experts_per_layer):
                assert np.array_equal(m.snap[s, base[lay] : base[lay] + n_e], mat[lay, :n_e])


@pytest.mark.parametrize("case", range(len(TRACES)))
def test_moe_infinity_blocks_segments_and_cores_change_nothing(case):
    """The matching pass cut into blocks of 16 entries run on the cores (par_min=0), and into
    segments of one run (each group alone, grown buffers for groups of several sequences),
    gives every list, match and snapshot of the default pass and of the twin."""
    rng = np.random.default_rng(40 + case)
    tr = random_trace(rng, **TRACES[case])
    warm = moe_infinity.eam_of_sequences(
        random_trace(rng, **{**TRACES[case], "sequences": 40})
    )  # 40 entries: three blocks of 16
    acc = prepare(tr).acc
    ref = moe_infinity.build(tr, acc, 2, 2, 1000, warm)
    issue, match, _ = _moe_infinity_twin(tr, 2, 2, 1000, warm)
    assert _issue_by_group(*ref[0]) == issue and _csr_lists(ref[1].off, ref[1].ids) == match
    for chunk, par_min, seg_runs in [(16, 0, 4096), (16, 0, 1), (16, 1 << 62, 1), (48, 0, 3)]:
        (off, obj, tgt), m = moe_infinity.build(tr, acc, 2, 2, 1000, warm, chunk=chunk,
                                                par_min=par_min, seg_runs=seg_runs)  # fmt: skip
        for a, b in zip(
            (off, obj, tgt, m.snap, m.off, m.ids), (*ref[0], *astuple(ref[1])), strict=True
        ):
            assert np.array_equal(a, b)
    # from another thread the blocks run in that thread (see build): same result
    with ThreadPoolExecutor(1) as pool:
        (off, obj, tgt), m = pool.submit(
            moe_infinity.build, tr, acc, 2, 2, 1000, warm, chunk=16, par_min=0
        ).result()
    assert _issue_by_group(off, obj, tgt) == issue and np.array_equal(m.ids, ref[1].ids)
    # capacity 3: entries are replaced while blocks and segments are small
    small = moe_infinity.build(tr, acc, 1, 2, 3, warm)
    cut = moe_infinity.build(tr, acc, 1, 2, 3, warm, chunk=16, par_min=0, seg_runs=1)
    assert _issue_by_group(*cut[0]) == _issue_by_group(*small[0])
    assert _csr_lists(cut[1].off, cut[1].ids) == _moe_infinity_twin(tr, 1, 2, 3, warm)[1]


@pytest.mark.parametrize("case", range(len(TRACES)))
def test_moe_infinity_lists_from_one_match_at_any_horizon(case):
    """The matches do not depend on the horizon or top_n (the prefetcher memoises them apart):
    lists written from one match() at several horizons and top_n equal the twin's, and the
    matches equal those of a build() at another horizon."""
    rng = np.random.default_rng(60 + case)
    tr = random_trace(rng, **TRACES[case])
    warm = moe_infinity.eam_of_sequences(random_trace(rng, **TRACES[case]))
    acc = prepare(tr).acc
    m = moe_infinity.match(tr, acc, 1000, warm)
    for horizon, top_n in [(1, 1), (2, 2), (3, 3), (4, 2)]:
        issue, match, _ = _moe_infinity_twin(tr, horizon, top_n, 1000, warm)
        assert _csr_lists(m.off, m.ids) == match
        assert _issue_by_group(*moe_infinity.issue_lists(tr, acc, m, horizon, top_n)) == issue
    _, other = moe_infinity.build(tr, acc, 3, 1, 1000, warm)
    for a, b in zip(astuple(m), astuple(other), strict=True):
        assert np.array_equal(a, b)
    for horizon, top_n in [(0, 2), (1, 0)]:
        with pytest.raises(ValueError, match="horizon and top_n must be >= 1"):
            moe_infinity.issue_lists(tr, acc, m, horizon, top_n)


@pytest.mark.parametrize("steps", ["native", "per-token"])
def test_moe_infinity_top6_and_count_types(steps):
    """Top-6 routing (the unrolled update: one token's six experts, and prefill runs of two
    tokens whose union is six experts with counts of 2) with the counts in int16/int32 and in
    float32: both equal the twin."""
    rng = np.random.default_rng(7)
    tr = random_trace(rng, layers=3, experts=7, top_k=6, sequences=8, batch=2, prefill=2,
                      decode=3, steps=steps)  # fmt: skip
    acc = prepare(tr).acc
    warm = moe_infinity.eam_of_sequences(random_trace(rng, layers=3, experts=7, top_k=6))
    issue, match, _ = _moe_infinity_twin(tr, 2, 3, 1000, warm)
    for int_counts in (True, False):
        (off, obj, tgt), m = moe_infinity.build(tr, acc, 2, 3, 1000, warm, chunk=16,
                                                int_counts=int_counts)  # fmt: skip
        assert _issue_by_group(off, obj, tgt) == issue
        assert _csr_lists(m.off, m.ids) == match
    runs = defaultdict(list)  # (step, seq, layer): the run's experts
    for step, seq, _, layer, ex in _rows(tr):
        runs[step, seq, layer] += ex
    union6 = [len(ex) for ex in runs.values() if len(set(ex)) == 6]
    assert 6 in union6  # one token's six experts
    if steps == "native":
        assert 12 in union6  # two prefill tokens on the same six experts: counts of 2


def test_moe_infinity_count_types_chosen():
    """int16/int32 counts only where every count and dot product fits."""
    rng = np.random.default_rng(3)
    tr = random_trace(rng, **TRACES[0])
    seqd, n_seq = history_predictors.dense_seq(tr)
    none = np.zeros((0, tr.meta.num_layers, 6), np.float32)
    assert moe_infinity.counts_fit_int(tr, seqd, n_seq, none)
    big = np.zeros((1, tr.meta.num_layers, 6), np.float32)
    big[0, 0, 0] = 2.0**15  # a count int16 cannot hold
    assert not moe_infinity.counts_fit_int(tr, seqd, n_seq, big)
    big[0, 0, 0] = 2.0**15 - 1
    big[0, 1, :] = 2.0**14  # row sum 6 x 2**14, times the largest count: over 2**31
    assert not moe_infinity.counts_fit_int(tr, seqd, n_seq, big)
    big[0, 1, :] = 2.0**10
    assert moe_infinity.counts_fit_int(tr, seqd, n_seq, big)
    big[0, 2, 0] = 0.5  # warm matrices that are not counts stay float32
    assert not moe_infinity.counts_fit_int(tr, seqd, n_seq, big)
    big[0, 2, 0] = -1.0
    assert not moe_infinity.counts_fit_int(tr, seqd, n_seq, big)


def _hand_trace(layers, experts, top_k, steps, seqs=None, preds=None):
    """``steps``: list of steps, each a list of per-layer expert lists for one token."""
    meta = TraceMeta(model="hand", num_layers=layers, experts_per_layer=experts, top_k=top_k,
                     expert_bytes=1000)  # fmt: skip
    seqs = seqs or [0] * len(steps)
    rows = [(s, lay, seqs[s], ex) for s, per in enumerate(steps) for lay, ex in enumerate(per)]
    offsets = np.concatenate([[0], np.cumsum([len(r[3]) for r in rows])])
    pos = {}
    p = []
    for s, _, q, _ in rows:
        pos.setdefault((q, s), len([k for k in pos if k[0] == q]))
        p.append(pos[(q, s)])
    pred = None
    if preds is not None:
        pred = {1: (np.concatenate([[0], np.cumsum([len(x) for x in preds])]),
                    np.concatenate(preds))}  # fmt: skip
    return trace_from_arrays(
        meta, step=[r[0] for r in rows], seq=[r[2] for r in rows], pos=p,
        phase=[1] * len(rows), layer=[r[1] for r in rows], offsets=offsets,
        experts=np.concatenate([r[3] for r in rows]), preds=pred,
    )  # fmt: skip


def test_eam_match_on_crafted_matrices():
    """Collection: A uses experts {0,1} at layers 1-2, B uses {2,3}, C mixes them. A sequence
    that ran {2,3} at layers 1-2 in its previous token matches B at layer 0 of its next token:
    B's counts give the prefetches (priority = count x (1 - d / (L + 1)))."""
    n_layers, e = 3, 4
    a = np.zeros((n_layers, e), np.float32)
    a[:, 0], a[:, 1] = 5, 3
    b = np.zeros((n_layers, e), np.float32)
    b[:, 2], b[:, 3] = 4, 2
    c = np.zeros((n_layers, e), np.float32)
    c[:, 0], c[:, 2] = 1, 1
    warm = np.stack([a, b, c])
    steps = [[[2], [2], [3]], [[0], [2], [3]]]  # one sequence, two tokens
    tr = _hand_trace(n_layers, e, 1, steps)
    (off, obj, tgt), m = moe_infinity.build(tr, prepare(tr).acc, 2, 2, 1000, warm)
    issue = _issue_by_group(off, obj, tgt)
    # first token: the matrix is empty, so nothing matches
    assert issue[:3] == [[], [], []]
    assert list(m.ids[m.off[0] : m.off[3]]) == []
    # second token, layer 0: layers 1, 2 of the sequence ({2} then {3}) are closest to B
    assert list(m.ids[m.off[3] : m.off[4]]) == [1]
    # B: layer 1 experts 2 (4 x 3/4 = 3.0), 3 (2 x 3/4 = 1.5); layer 2: 2 (4 x 2/4), 3 (1.0)
    g1, g2 = 4, 5
    assert issue[3] == [(4 + 2, g1), (8 + 2, g2), (4 + 3, g1), (8 + 3, g2)]
    # at layer 1, only layer 2 remains: its row {3} is closest to... B again (C has no 3)
    assert list(m.ids[m.off[4] : m.off[5]]) == [1]
    assert issue[4] == [(8 + 2, g2), (8 + 3, g2)]
    # the finished sequence joined the collection as snapshot 3
    assert m.snap.shape[0] == 4
    assert m.snap[3].reshape(n_layers, e).tolist() == [[1, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 2]]


def test_moe_infinity_replaces_the_least_matched_entry():
    """Capacity 2, one expert per layer, two tokens per sequence. Sequences 0 ({0}) and 1 ({1})
    fill the collection; sequence 2 ({0}) matches sequence 0's matrix, so when it finishes it
    replaces sequence 1's (never matched), not the oldest. Sequence 3 ({1}) then finds no
    matrix with expert 1 (a FIFO collection would still hold sequence 1's)."""
    steps = [[[e], [e]] for e in (0, 0, 1, 1, 0, 0, 1, 1)]
    seqs = [0, 0, 1, 1, 2, 2, 3, 3]
    tr = _hand_trace(2, 2, 1, steps, seqs=seqs)
    _, m = moe_infinity.build(tr, prepare(tr).acc, 1, 1, 2)
    ids = _csr_lists(m.off, m.ids)
    assert ids[10] == [0]  # sequence 2, second token, layer 0: sequence 0's matrix
    assert ids[14] == []  # sequence 3, second token: sequence 1's matrix is gone
    assert ids == _moe_infinity_twin(tr, 1, 1, 2)[1]


# ------------------------------------------------------------------------ adaptive horizon


def _adaptive_twin(tr, acc, preds, t_x, cost, h_max, min_prec, alpha):
    rows = _rows(tr)
    groups = _groups(rows)
    base = np.r_[0, np.cumsum(tr.meta.experts_per_layer)]
    prec = {h: 1.0 for h in range(1, h_max + 1)}
    lists = {h: _csr_lists(*preds[h]) for h in preds}
    chosen, issue = [], []
    covered_step, covered = None, -1
    for gi, grp in enumerate(groups):
        s, lay = rows[grp[0]][0], rows[grp[0]][3]
        if s != covered_step:
            covered_step, covered = s, -1
        for r in grp:
            for h in sorted(lists):
                p = lists[h][r]
                if p:
                    hit = len(set(p) & set(rows[r][4]))
                    prec[h] = (1 - alpha) * prec[h] + alpha * hit / len(p)
        objs = acc.obj[acc.group_offsets[gi] : acc.group_offsets[gi + 1]]
        m = len(objs)
        routed = int(acc.count[acc.group_offsets[gi] : acc.group_offsets[gi + 1]].sum())
        tokens = len({(rows[r][1], rows[r][2]) for r in grp})
        t_layer = cost[0] + tokens * cost[1] + m * cost[2] + routed * cost[3]
        h = max(1, min(int(np.ceil(m * t_x / t_layer)), h_max))
        while h > 1 and (h not in lists or prec[h] < min_prec):
            h -= 1
        chosen.append(h)
        out = []
        for tl in range(max(covered + 1, lay + 1), min(lay + h, tr.meta.num_layers - 1) + 1):
            d = tl - lay
            tg = next((g2 for g2, gr in enumerate(groups)
                       if rows[gr[0]][0] == s and rows[gr[0]][3] == tl), None)  # fmt: skip
            if tg is None or d not in lists:
                continue
            for r in groups[tg]:
                for e in lists[d][r]:
                    o = int(base[tl] + e)
                    if (o, tg) not in out:
                        out.append((o, tg))
        covered = max(covered, min(lay + h, tr.meta.num_layers - 1))
        issue.append(out)
    return chosen, issue


@pytest.mark.parametrize("case", range(len(TRACES)))
@pytest.mark.parametrize("t_x", [1e-4, 1e-3, 5e-3])
def test_adaptive_equals_twin(case, t_x):
    rng = np.random.default_rng(40 + case)
    spec = TRACES[case]
    tr = random_trace(rng, preds=(1, 2, 3), **spec)
    acc = prepare(tr).acc
    cost = np.array([1e-3, 1e-5, 2e-4, 1e-5])
    off, obj, tgt, chosen = adaptive_horizon.build(acc, tr, tr.preds, t_x, cost, 3, 0.3, 0.2)
    twin_chosen, twin_issue = _adaptive_twin(tr, acc, tr.preds, t_x, cost, 3, 0.3, 0.2)
    assert list(chosen) == twin_chosen
    assert _issue_by_group(off, obj, tgt) == twin_issue


def test_adaptive_horizon_follows_bandwidth_and_accuracy():
    """One token per step, 6 layers, 1 expert per layer; a layer computes in 1 ms.
    A transfer of 0.4 ms needs horizon 1; of 2.5 ms, horizon 3 (ceil 2.5). With horizon 3's
    guesses always wrong, the precision gate brings it back to 2 once p_3 < 0.5."""
    steps = [[[e % 2] for e in range(6)] for _ in range(8)]
    tr = _hand_trace(6, 2, 1, steps)
    acc = prepare(tr).acc
    right = (np.arange(tr.num_rows + 1, dtype=np.int64), tr.experts.astype(np.int16))
    wrong = (right[0], (1 - tr.experts).astype(np.int16))
    cost = np.array([1e-3, 0.0, 0.0, 0.0])
    preds = {1: right, 2: right, 3: right}
    *_, ch = adaptive_horizon.build(acc, tr, preds, 0.4e-3, cost, 4, 0.5, 0.5)
    assert set(ch) == {1}
    *_, ch = adaptive_horizon.build(acc, tr, preds, 2.5e-3, cost, 4, 0.5, 0.5)
    assert set(ch) == {3}  # 4 lacks predictions: never chosen
    preds = {1: right, 2: right, 3: wrong}
    *_, ch = adaptive_horizon.build(acc, tr, preds, 2.5e-3, cost, 4, 0.5, 0.5)
    # p_3 starts at 1 and halves with every row scored: 0.5 after the first (not below the
    # threshold: horizon 3 at group 0), 0.25 after the second (horizon 2 from group 1 on)
    assert ch[0] == 3 and set(ch[1:]) == {2}


# ---------------------------------------------------------------- timelines (timed mode)

MS = 1e-3


def _cfg(slots, prefetch, *, dense=1.0, horizon=1):
    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.link.bandwidth_gbps = 1e-3  # 1 ms per 1000-byte expert
    cfg.link.latency_s = 0.0
    cfg.compute.dense_s = dense * MS
    cfg.compute.dense_per_token_s = 0.0
    cfg.compute.expert_s = 0.5 * MS
    cfg.compute.expert_per_token_s = 0.0
    cfg.replay.mode = "timed"
    cfg.replay.prefetch = prefetch
    cfg.replay.horizon = horizon
    return cfg.validate()


def _check(res, **want):
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key


def _warm_file(tmp_path):
    """A one-sequence training trace using experts 0, 1, 2 at layers 0, 1, 2."""
    from traces.io import write_trace

    return str(write_trace(_hand_trace(3, 4, 1, [[[0], [1], [2]]]), tmp_path / "warm.parquet"))


HIDE = ["prev-token", "cross-layer", "moe-infinity:warm={warm}", "adaptive:max=2"]


@pytest.mark.parametrize("prefetch", HIDE)
def test_correct_prefetch_hides_a_transfer(prefetch, tmp_path):
    """3 layers, 2 slots, dense 1 ms, transfer 1 ms, expert 0.5 ms; two tokens using experts
    0, 1, 2. Every prefetcher guesses token 1's next expert right: prev-token (token 0 used it),
    cross-layer (0 -> 1 -> 2 learned in token 0), MoE-Infinity (matches the warm matrix),
    adaptive (a layer computes in 1.5 ms > 1 ms transfer: horizon 1, over cross-layer).
    Token 0: dense 0-1, fetch e0 1-2, compute 2-2.5; dense 2.5-3.5, e1 3.5-4.5, 4.5-5;
    dense 5-6, e2 evicts e0 6-7, 7-7.5. Token 1, layer 0: dense 7.5-8.5, e0 evicts e1 (LRU)
    8.5-9.5; the gate's prefetch of e1 evicts e2 (e0 is in use) and queues 9.5-10.5; compute
    9.5-10. Layer 1: dense 10-11, e1 landed at 10.5: hit; the prefetch of e2 evicts e0, 11-12;
    compute 11-11.5. Layer 2: dense 11.5-12.5, e2 landed at 12: hit; compute 12.5-13."""
    steps = [[[0], [1], [2]], [[0], [1], [2]]]
    cfg = _cfg(2, prefetch.format(warm=_warm_file(tmp_path)))
    res = run(prepare(_hand_trace(3, 4, 1, steps)), cfg, "lru")
    _check(res, total_s=13 * MS, stall_s=4 * MS, misses=4, hits=2, prefetch_issued=2,
           prefetch_used=2, prefetch_late=0, prefetch_wasted=0, bytes_moved=6000)  # fmt: skip


@pytest.mark.parametrize("prefetch", ["prev-token", "moe-infinity:warm={warm}"])
def test_wrong_prefetch_wastes_the_link(prefetch, tmp_path):
    """As above, but token 1 uses expert 3 at layer 1: the guess e1 is wrong.
    Token 1, layer 0 as above (e0 8.5-9.5, prefetch e1 9.5-10.5, compute 9.5-10). Layer 1:
    dense 10-11, miss e3, evicts e0 (LRU; e1 arrived later): 11-12, compute 12-12.5; the gate
    guesses e2 for layer 2 and evicts the unused e1 (wasted) for it: 12-13. Layer 2: dense
    12.5-13.5, e2 landed at 13: hit, compute 13.5-14."""
    steps = [[[0], [1], [2]], [[0], [3], [2]]]
    cfg = _cfg(2, prefetch.format(warm=_warm_file(tmp_path)))
    res = run(prepare(_hand_trace(3, 4, 1, steps)), cfg, "lru")
    _check(res, total_s=14 * MS, stall_s=5 * MS, misses=5, hits=1, prefetch_issued=2,
           prefetch_used=1, prefetch_wasted=1, prefetch_wasted_bytes=1000,
           bytes_moved=7000)  # fmt: skip


@pytest.mark.parametrize("prefetch", ["prev-token", "cross-layer", "moe-infinity:warm={warm}"])
def test_late_prefetch_still_stalls(prefetch, tmp_path):
    """The first timeline with dense work of 0.2 ms: the guesses are right but late.
    Token 0: 0-0.2 dense, e0 0.2-1.2, 1.2-1.7; 1.7-1.9, e1 1.9-2.9, 2.9-3.4; 3.4-3.6, e2
    3.6-4.6, 4.6-5.1. Token 1: dense 5.1-5.3, e0 5.3-6.3, prefetch e1 6.3-7.3, compute 6.3-6.8;
    dense 6.8-7.0, e1 in flight: compute 7.3-7.8 (0.3 late stall), prefetch e2 7.3-8.3;
    dense 7.8-8.0, e2 in flight: compute 8.3-8.8 (0.3 late stall)."""
    steps = [[[0], [1], [2]], [[0], [1], [2]]]
    cfg = _cfg(2, prefetch.format(warm=_warm_file(tmp_path)), dense=0.2)
    res = run(prepare(_hand_trace(3, 4, 1, steps)), cfg, "lru")
    _check(res, total_s=8.8 * MS, stall_s=4.6 * MS, late_prefetch_stall_s=0.6 * MS, misses=4,
           hits=0, inflight_hits=2, prefetch_late=2, prefetch_used=2)  # fmt: skip


def test_cancelled_prefetch_frees_the_link(tmp_path):
    """MoE-Infinity, top_n 3, 4 slots, dense 0.2 ms. The warm matrix used experts 2 (twice),
    1 and 3 at layer 1; the sequence's two tokens use 0 then 1. Token 0: 0-0.2, e0 0.2-1.2,
    1.2-1.7; 1.7-1.9, e1 1.9-2.9, 2.9-3.4. Token 1, layer 0: dense 3.4-3.6, hit; the match
    (layer 1: {1} against {1, 2, 2, 3}) names e2 (priority 2 x 2/3), e1 (resident), e3: e2
    transfers 3.6-4.6, e3 queues behind it; compute 3.6-4.1. Layer 1: dense 4.1-4.3, e1 hits;
    the queued e3 is cancelled, e2 lands unused (wasted); compute 4.3-4.8."""
    from traces.io import write_trace

    warm = _hand_trace(2, 4, 1, [[[0], [1, 2, 3]], [[0], [2]]])  # one sequence, two tokens
    warm.meta.top_k = None
    path = write_trace(warm, tmp_path / "w.parquet")
    cfg = _cfg(4, f"moe-infinity:warm={path},top_n=3", dense=0.2)
    res = run(prepare(_hand_trace(2, 4, 1, [[[0], [1]], [[0], [1]]])), cfg, "lru")
    _check(
        res,
        total_s=4.8 * MS,
        stall_s=2 * MS,
        misses=2,
        hits=2,
        prefetch_issued=2,
        prefetch_cancelled=1,
        prefetch_wasted=1,
        prefetch_used=0,
        bytes_moved=3000,
    )


# ------------------------------------------------------------------------------ bounds


@pytest.mark.parametrize("seed", range(6))
def test_oracle_never_worse_in_stall_time(seed):
    """Belady with the oracle prefetcher stalls no longer than any real policy + prefetcher."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, layers=4, experts=8, top_k=2, sequences=4, batch=2, preds=(1,))
    prep = prepare(tr)
    cfg = _cfg(6, "oracle", dense=0.3)
    bound = run(prep, cfg, "belady")["stall_s"]
    for pf in ("none", "trace", "prev-token", "cross-layer", "moe-infinity", "adaptive"):
        cfg = _cfg(6, pf, dense=0.3)
        for policy in ("lru", "lfu", "fifo"):
            assert bound <= run(prep, cfg, policy)["stall_s"] + 1e-12, (pf, policy)


# ------------------------------------------------------------------------------- parsing


def test_parse_prefetch():
    assert parse_prefetch("moe-infinity") == (
        "moe-infinity",
        {"capacity": 1000, "warm": None, "top_n": None},
    )
    name, v = parse_prefetch("adaptive:base=prev-token,max=3,min_precision=0.5")
    assert (name, v["base"], v["max"], v["min_precision"]) == ("adaptive", "prev-token", 3, 0.5)
    for bad, msg in [
        ("magic", "unknown prefetcher 'magic'"),
        ("moe-infinity:capacity=0", "parameter 'capacity': expected an integer >= 1"),
        ("moe-infinity:depth=3", "unknown parameter 'depth'"),
        ("learned", "needs model=PATH"),
        ("adaptive:base=oracle", "base: expected one of"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_prefetch(bad)
    cfg = SimConfig()
    cfg.replay.prefetch = "nope"
    with pytest.raises(ConfigError, match="unknown prefetcher"):
        cfg.validate()


def test_trace_prefetch_without_columns_is_one_line():
    tr = random_trace(np.random.default_rng(1))
    cfg = _cfg(4, "trace", horizon=2)
    with pytest.raises(ConfigError, match="needs column 'pred_h2'"):
        issue_lists(prepare(tr), cfg)


def test_learned_prefetch_reads_token_text_from_the_file(tmp_path):
    """Traces are read without their token text by default; a learned model that uses it gets
    it from the trace's file, and replays exactly as on a trace read with its text."""
    import dataclasses

    from policies.learned import LearnedConfig, LearnedPredictor
    from traces.io import read_trace, write_trace

    tr = random_trace(np.random.default_rng(3), layers=3, experts=6, top_k=2, sequences=4)
    words = np.array([f"w{p % 3}" for p in tr.pos], dtype=object)
    path = write_trace(dataclasses.replace(tr, token=words), tmp_path / "t.parquet")
    model = LearnedPredictor.train(read_trace(path, load_text=True),
                                   LearnedConfig(horizons=[1], hidden=8, epochs=1))  # fmt: skip
    assert model.token_kind == "text"
    mpath = model.save(tmp_path / "m.npz")
    cfg = _cfg(4, f"learned:model={mpath}")
    plain = run(prepare(read_trace(path)), cfg, "lru")
    with_text = run(prepare(read_trace(path, load_text=True)), cfg, "lru")
    plain.pop("kernel_s"), with_text.pop("kernel_s")
    assert plain == with_text and plain["prefetch_issued"] > 0


def test_dense_seq_ranks_ids_as_unique_does():
    """Both ways of renumbering sequences (a presence table for small ids, a sort otherwise)
    give np.unique's inverse and count."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    for ids in (rng.integers(0, 50, 300), rng.integers(5, 9, 40), np.array([3]),
                rng.integers(-5, 5, 100), rng.integers(0, 1 << 40, 200)):  # fmt: skip
        inv, n = history_predictors.dense_seq(SimpleNamespace(seq=ids))
        uniq, ref = np.unique(ids, return_inverse=True)
        assert n == uniq.size and np.array_equal(inv, ref) and inv.dtype == np.int64


def test_training_trace_read_once_per_prepared_trace(tmp_path, monkeypatch):
    """adaptive over cross-layer with train= needs transition counts at each horizon, and
    MoE-Infinity's warm= the same file: it is read from disk once, not once per horizon."""
    import traces.io

    warm = _warm_file(tmp_path)
    reads = []
    real = traces.io.read_trace

    def counting(path, *a, **k):
        reads.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(traces.io, "read_trace", counting)
    prep = prepare(_hand_trace(3, 4, 2, [[[0], [1], [2]], [[0], [1], [2]]]))
    for pf in (f"adaptive:train={warm},max=3", f"cross-layer:train={warm}",
               f"moe-infinity:warm={warm}"):  # fmt: skip
        run(prep, _cfg(2, pf), "lru")
    assert reads == [warm]


def test_moe_infinity_matches_once_per_collection(monkeypatch):
    """MoE-Infinity's matching depends on the collection (capacity, warm) only: prefetching at
    horizons 1 and 2, with another top_n, and its eviction policy without its prefetcher all
    reuse one matching pass; another capacity matches again."""
    calls = []
    real = moe_infinity.match

    def counting(trace, acc, capacity=1000, *a, **k):
        calls.append(capacity)
        return real(trace, acc, capacity, *a, **k)

    monkeypatch.setattr(moe_infinity, "match", counting)
    prep = prepare(_hand_trace(3, 4, 2, [[[0], [1], [2]], [[0], [1], [2]], [[3], [1], [0]]]))
    for policy, pf, horizon in [("lru", "moe-infinity", 1), ("lru", "moe-infinity", 2),
                                ("lru", "moe-infinity:top_n=1", 1), ("moe-infinity", "none", 1),
                                ("lru", "moe-infinity:capacity=1", 1)]:  # fmt: skip
        run(prep, _cfg(2, pf, horizon=horizon), policy)
    assert calls == [1000, 1]
