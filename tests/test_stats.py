"""Tests of ``moesim stats``: hand-computed values on tiny traces, pure-Python twins of every
kernel on small random traces, the real FLAME-MoE trace, and the command line."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest

import simulator.cli as cli
from traces import stats as S
from traces.format import TraceMeta
from traces.io import sort_trace, trace_from_arrays, write_trace
from traces.validate import validate_trace


# =========================================================================== builders
def make_trace(rows, experts_per_layer, top_k=None, layer_ids=None):
    """A validated Trace from rows (step, seq, pos, phase, layer, [experts]) in any order."""
    L = len(experts_per_layer)
    meta = TraceMeta(model="t", num_layers=L, experts_per_layer=list(experts_per_layer),
                     top_k=top_k, expert_bytes=[1] * L, layer_ids=layer_ids or [])  # fmt: skip
    lengths = [len(r[5]) for r in rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = [e for r in rows for e in r[5]]
    c = list(zip(*[r[:5] for r in rows], strict=True)) if rows else [[]] * 5
    t = trace_from_arrays(meta, step=c[0], seq=c[1], pos=c[2], phase=c[3], layer=c[4],
                          offsets=offsets, experts=np.array(flat, np.int64))  # fmt: skip
    t = sort_trace(t)
    validate_trace(t)
    return t


def trace_rows(t):
    """The rows of a Trace as Python tuples (step, seq, pos, phase, layer, [experts])."""
    return [
        (int(t.step[i]), int(t.seq[i]), int(t.pos[i]), int(t.phase[i]), int(t.layer[i]),
         [int(e) for e in t.experts[t.offsets[i] : t.offsets[i + 1]]])
        for i in range(t.num_rows)
    ]  # fmt: skip


def random_trace(seed, epl=(5, 8, 6), max_k=3, n_seq=5):
    """Prefill steps and batched decode steps (some mixed), variable k, some gaps and holes."""
    rng = np.random.default_rng(seed)
    seq_ids = rng.choice(1000, n_seq, replace=False)
    rows = []
    step = 0
    next_pos = {}
    decoding = []
    for s in seq_ids:
        plen = int(rng.integers(1, 6))
        mixed = decoding and rng.random() < 0.3
        toks = [(int(s), p, 0) for p in range(plen)]
        if mixed:  # decode tokens of running sequences in the same step as this prefill
            for d in decoding:
                toks.append((d, next_pos[d], 1))
                next_pos[d] += 1 + int(rng.random() < 0.1)
        next_pos[int(s)] = plen
        decoding.append(int(s))
        _emit(rows, rng, step, toks, epl, max_k)
        step += int(rng.integers(1, 3))
        for _ in range(int(rng.integers(0, 3))):
            toks = []
            for d in decoding:
                toks.append((d, next_pos[d], 1))
                next_pos[d] += 1 + int(rng.random() < 0.1)
            _emit(rows, rng, step, toks, epl, max_k)
            step += 1
    return make_trace(rows, epl)


def _emit(rows, rng, step, toks, epl, max_k):
    for seq, pos, phase in toks:
        for lay, e in enumerate(epl):
            if rng.random() < 0.08:
                continue  # a token missing in a layer
            k = int(rng.integers(0, min(max_k, e) + 1)) if rng.random() < 0.05 else int(
                rng.integers(1, min(max_k, e) + 1))  # fmt: skip
            p = np.arange(1, e + 1, dtype=float) ** -1.0
            ex = rng.choice(e, k, replace=False, p=p / p.sum())
            rows.append((step, seq, pos, phase, lay, [int(x) for x in ex]))


# =========================================================================== twins
def twin_popularity(rows, L, max_e):
    counts = np.zeros((2, L, max_e), np.int64)
    n = np.zeros((2, L), np.int64)
    for _step, _seq, _pos, ph, lay, ex in rows:
        n[ph, lay] += 1
        for e in ex:
            counts[ph, lay, e] += 1
    return counts, n


def twin_metrics(c, E, k):
    c = [int(x) for x in c[:E]]
    tot = sum(c)
    p = [x / tot for x in c]
    h = -sum(x * math.log2(x) for x in p if x > 0)
    desc = sorted(c, reverse=True)
    gini = sum(abs(a - b) for a in c for b in c) / (2 * E * tot)
    return {
        "entropy_norm": h / math.log2(E),
        "top10_share": sum(desc[: max(1, math.ceil(0.1 * E))]) / tot,
        "topk_share": sum(desc[: int(round(k))]) / tot,
        "gini": gini,
        "max_load": max(c) * E / tot,
        "unused": sum(1 for x in c if x == 0),
    }


def twin_replay(rows):
    """Groups (step, layer, kind, [experts in first-appearance order])."""
    groups = []
    for step, _seq, _pos, ph, lay, ex in rows:
        if not groups or groups[-1][0] != step or groups[-1][1] != lay:
            groups.append([step, lay, set(), []])
        g = groups[-1]
        g[2].add(ph)
        for e in ex:
            if e not in g[3]:
                g[3].append(e)
    out = []
    for step, lay, phases, ex in groups:
        kind = 2 if len(phases) == 2 else phases.pop()
        out.append((step, lay, kind, ex))
    return out


def twin_reuse(rows):
    """Per access (layer, kind, stack within layer, stack over all layers, steps), -1 = cold."""
    acc = []
    steps = []
    for step, lay, kind, ex in twin_replay(rows):
        if not steps or steps[-1] != step:
            steps.append(step)
        for e in ex:
            acc.append((lay, e, kind, len(steps) - 1))
    out = []
    for a, (lay, e, kind, rank) in enumerate(acc):
        prev = [b for b in range(a) if acc[b][:2] == (lay, e)]
        if not prev:
            out.append((lay, kind, -1, -1, -1))
            continue
        p = prev[-1]
        between = acc[p + 1 : a]
        d_l = len({x[1] for x in between if x[0] == lay})
        d_g = len({x[:2] for x in between})
        out.append((lay, kind, d_l, d_g, rank - acc[p][3]))
    return out


def twin_overlap(rows, epl):
    by = {}
    for _step, seq, pos, ph, lay, ex in rows:
        by[(seq, lay, pos)] = (ph, ex)
    ratio = defaultdict(float)
    chance = defaultdict(float)
    pairs = defaultdict(int)
    for (seq, lay, pos), (ph, ex) in by.items():
        prev = by.get((seq, lay, pos - 1))
        if prev is None or not ex:
            continue
        inter = len(set(prev[1]) & set(ex))
        ratio[ph, lay] += inter / len(ex)
        chance[ph, lay] += len(prev[1]) / epl[lay]
        pairs[ph, lay] += 1
    return ratio, chance, pairs


def twin_coact(rows, epl):
    """In-sample, cross-fitted and popularity recall sums and pair counts per (phase, l)."""
    seqs = sorted({r[1] for r in rows})
    fold_of = {s: i % 2 for i, s in enumerate(seqs)}
    tok = {}
    for _step, seq, pos, ph, lay, ex in rows:
        tok[(seq, pos, lay)] = (ph, ex)
    pairs = []
    for (seq, pos, lay), (_ph, ex) in tok.items():
        nxt = tok.get((seq, pos, lay + 1))
        if nxt is not None:
            pairs.append((lay, fold_of[seq], nxt[0], ex, nxt[1]))
    L1 = len(epl) - 1
    C = [[defaultdict(int) for _ in range(L1)] for _ in range(2)]
    na = [[defaultdict(int) for _ in range(L1)] for _ in range(2)]
    nb = [defaultdict(int) for _ in range(L1)]
    for lay, f, _ph, A, B in pairs:
        for a in A:
            na[f][lay][a] += 1
            for b in B:
                C[f][lay][a, b] += 1
        for b in B:
            nb[lay][b] += 1
    res = defaultdict(float)
    cnt = defaultdict(int)
    for lay, f, ph, A, B in pairs:
        if not B:
            continue
        eb = epl[lay + 1]
        o = 1 - f
        s_in = [0.0] * eb
        s_cv = [0.0] * eb
        for a in A:
            n_all = na[0][lay][a] + na[1][lay][a]
            for b in range(eb):
                s_in[b] += float(C[0][lay][a, b] + C[1][lay][a, b]) * (1.0 / n_all)
            if na[o][lay][a]:
                for b in range(eb):
                    s_cv[b] += float(C[o][lay][a, b]) * (1.0 / na[o][lay][a])
        top_in = sorted(range(eb), key=lambda b: (-s_in[b], b))[: len(B)]
        top_cv = sorted(range(eb), key=lambda b: (-s_cv[b], b))[: len(B)]
        top_pop = sorted(range(eb), key=lambda b: (-nb[lay][b], b))[: len(B)]
        res["in", ph, lay] += len(set(top_in) & set(B)) / len(B)
        res["pop", ph, lay] += len(set(top_pop) & set(B)) / len(B)
        cnt["pairs", ph, lay] += 1
        if sum(na[0][lay].values()) and sum(na[1][lay].values()):
            res["cv", ph, lay] += len(set(top_cv) & set(B)) / len(B)
            cnt["cv", ph, lay] += 1
    mi = []
    for lay in range(L1):
        joint = defaultdict(int)
        for f in (0, 1):
            for key, v in C[f][lay].items():
                joint[key] += v
        tot = sum(joint.values())
        px = defaultdict(float)
        py = defaultdict(float)
        for (a, b), v in joint.items():
            px[a] += v / tot
            py[b] += v / tot
        m = sum(
            v / tot * math.log2((v / tot) / (px[a] * py[b])) for (a, b), v in joint.items() if v
        )
        hy = -sum(p * math.log2(p) for p in py.values() if p > 0)
        mi.append((m, hy))
    return res, cnt, mi


# =========================================================================== hand-made values
def test_entropy_uniform_and_one_hot():
    # layer 0: 8 tokens spread evenly over 4 experts; layer 1: all 8 on expert 2
    rows = [(0, 0, p, 0, 0, [p % 4]) for p in range(8)] + [(0, 0, p, 0, 1, [2]) for p in range(8)]
    st = S.compute_stats(make_trace(rows, [4, 4], top_k=1))
    pop = st.popularity
    assert pop["entropy_norm"][0] == pytest.approx(1.0)
    assert pop["gini"][0] == pytest.approx(0.0)
    assert pop["top10_share"][0] == pytest.approx(0.25)  # ceil(0.4) = 1 expert
    assert pop["max_load"][0] == pytest.approx(1.0)
    assert pop["entropy_norm"][1] == pytest.approx(0.0)
    assert pop["gini"][1] == pytest.approx(0.75)  # (E-1)/E
    assert pop["top10_share"][1] == pytest.approx(1.0)
    assert pop["max_load"][1] == pytest.approx(4.0)
    assert pop["unused"].tolist() == [0, 3]
    np.testing.assert_allclose(pop["share"][1], [0, 0, 1, 0])


def test_reuse_known_histogram():
    # one layer, one token per step, experts A B A C B A = 0 1 0 2 1 0 at steps 0..5
    seqn = [0, 1, 0, 2, 1, 0]
    rows = [(s, 0, s, 1, 0, [e]) for s, e in enumerate(seqn)]
    r = S.reuse_stats(make_trace(rows, [4], top_k=1), keep=True)
    stack, glob, step = r.per_access
    assert stack.tolist() == [-1, -1, 1, -1, 2, 2]
    assert glob.tolist() == [-1, -1, 1, -1, 2, 2]
    assert step.tolist() == [-1, -1, 2, -1, 3, 3]
    assert r.stack_hist[0].tolist() == [0, 1, 2, 0]
    assert r.cold.tolist() == [3] and r.accesses.tolist() == [6]
    assert r.step_hist[0, :5].tolist() == [0, 0, 1, 2, 0]
    assert r.accesses_kind.tolist() == [0, 6, 0]
    assert r.lru_hit_ratio(3) == pytest.approx(3 / 6)
    assert r.lru_hit_ratio(2) == pytest.approx(1 / 6)
    assert S.hist_percentile(r.stack_hist[0], 50) == 2


def test_reuse_global_counts_other_layers_and_steps_are_ranks():
    # steps 10, 20, 40 (ranks 0, 1, 2); layer 0 expert 0 at steps 10 and 40; layer 1 busy between
    rows = [(10, 0, 0, 0, 0, [0]), (10, 0, 0, 0, 1, [0]),
            (20, 0, 1, 1, 0, [1]), (20, 0, 1, 1, 1, [1]),
            (40, 0, 2, 1, 0, [0]), (40, 0, 2, 1, 1, [0])]  # fmt: skip
    r = S.reuse_stats(make_trace(rows, [2, 2], top_k=1), keep=True)
    stack, glob, step = r.per_access
    # replay order: (10,L0):0 (10,L1):0 (20,L0):1 (20,L1):1 (40,L0):0 (40,L1):0
    assert stack.tolist() == [-1, -1, -1, -1, 1, 1]
    assert glob.tolist() == [-1, -1, -1, -1, 3, 3]
    assert step.tolist() == [-1, -1, -1, -1, 2, 2]


def test_overlap_crafted_sequence():
    sets = [[0, 1], [1, 2], [2, 1], [5, 6]]  # overlaps 1/2, 2/2, 0/2
    rows = [(p, 7, p, 0 if p == 0 else 1, 0, s) for p, s in enumerate(sets)]
    rows.append((9, 7, 5, 1, 0, [5, 6]))  # pos 5 follows pos 3: a gap, not a pair
    ov = S.overlap_stats(make_trace(rows, [8], top_k=2))
    assert ov.pairs.sum() == 3
    assert ov.mean[0] == pytest.approx(0.5)
    assert ov.chance[0] == pytest.approx(2 / 8)
    assert ov.pairs[1, 0] == 3  # all three later tokens are decode
    assert ov.inter_hist[1].tolist() == [1, 1, 1]


def test_coactivation_deterministic_rule_gives_perfect_recall():
    rng = np.random.default_rng(1)
    E = 8
    rows = []
    for seq in range(6):
        for pos in range(30):
            a = [int(x) for x in rng.choice(E, 2, replace=False)]
            rows.append((seq, seq, pos, 0, 0, a))
            rows.append((seq, seq, pos, 0, 1, [(x + 3) % E for x in a]))
    c = S.coactivation_stats(make_trace(rows, [E, E], top_k=2))
    assert c.pairs.sum() == 180
    assert c.recall(0)[0] == pytest.approx(1.0)
    assert c.recall(1)[0] == pytest.approx(1.0)
    assert c.recall(2)[0] < 0.6
    # k = 1 and a bijection: the next layer is fully determined, NMI = 1
    rows1 = [(s, s, p, 0, lay, [(p + s + 5 * lay) % E]) for s in range(4) for p in range(16)
             for lay in range(3)]  # fmt: skip
    c1 = S.coactivation_stats(make_trace(rows1, [E, E, E], top_k=1))
    np.testing.assert_allclose(c1.nmi, [1.0, 1.0])
    np.testing.assert_allclose(c1.mi_bits, [3.0, 3.0])
    np.testing.assert_allclose(c1.recall(0), [1.0, 1.0])
    P = c1.conditional(0)
    assert P[0, 5] == pytest.approx(1.0) and P[0].sum() == pytest.approx(1.0)


def test_phase_split_and_js():
    # prefill tokens all use expert 0, decode tokens expert 1: disjoint popularity, JS = 1 bit
    rows = [(0, 0, p, 0, 0, [0]) for p in range(4)]
    rows += [(1 + p, 0, 4 + p, 1, 0, [1]) for p in range(3)]
    st = S.compute_stats(make_trace(rows, [4], top_k=1))
    assert st.counts[0, 0].tolist() == [4, 0, 0, 0]
    assert st.counts[1, 0].tolist() == [0, 3, 0, 0]
    assert st.rows.tolist() == [[4], [3]]
    assert st.js[0] == pytest.approx(1.0)
    assert st.popularity_phase[0]["entropy_norm"][0] == pytest.approx(0.0)
    # overlaps: prefill pairs 3 x 1.0; decode: 4->5 is 0 (prefill->decode), then 2 x 1.0
    assert st.overlap.pairs.tolist() == [[3], [3]]
    assert st.overlap.ratio_sum[1, 0] == pytest.approx(2.0)
    s = st.summary()
    assert s["phases"]["prefill"]["overlap"] == pytest.approx(1.0)
    assert s["phases"]["decode"]["overlap"] == pytest.approx(2 / 3)
    assert s["phases"]["js_prefill_decode_mean"] == pytest.approx(1.0)
    # replay: group (0, L0) prefill with expert 0; 3 decode groups with expert 1
    assert st.reuse.accesses_kind.tolist() == [1, 3, 0]
    assert st.reuse.cold_kind.tolist() == [1, 1, 0]
    same = S.js_divergence(np.array([[1, 2, 3]]), np.array([[2, 4, 6]]))
    assert same[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(S.js_divergence(np.array([[1, 0]]), np.array([[0, 0]]))[0])


def test_step_bins_cover_the_integers():
    edges = S.step_bin_edges()
    assert edges[:3].tolist() == [0, 1, 2] and np.all(np.diff(edges) > 0)
    for b in list(range(0, 200)) + [S.STEP_BINS - 1]:
        assert S.step_bin(int(edges[b])) == b
        assert S.step_bin(int(edges[b + 1]) - 1) == b
    assert np.all(np.diff(edges[S.STEP_EXACT :]) <= edges[S.STEP_EXACT:-1] / 16)  # fmt: skip


def test_hist_percentile_is_nearest_rank():
    h = np.array([0, 3, 0, 1])  # values 1, 1, 1, 3
    assert S.hist_percentile(h, 50) == 1
    assert S.hist_percentile(h, 75) == 1
    assert S.hist_percentile(h, 76) == 3
    assert math.isnan(S.hist_percentile(np.zeros(3), 50))


# =========================================================================== twins on random traces
@pytest.mark.parametrize("seed", range(6))
def test_kernels_match_python_twins(seed):
    t = random_trace(seed)
    rows = trace_rows(t)
    epl = list(t.meta.experts_per_layer)
    L, max_e = len(epl), max(epl)
    # popularity
    counts, n = S.popularity_counts(t)
    tc, tn = twin_popularity(rows, L, max_e)
    np.testing.assert_array_equal(counts, tc)
    np.testing.assert_array_equal(n, tn)
    allc = counts.sum(axis=0)
    k = S.effective_k(allc, n.sum(axis=0), None)
    m = S.popularity_metrics(allc, np.array(epl), k)
    for lay in range(L):
        want = twin_metrics(allc[lay], epl[lay], k[lay])
        for key, v in want.items():
            assert m[key][lay] == pytest.approx(v, abs=1e-12), (key, lay)
    # reuse
    r = S.reuse_stats(t, keep=True)
    tw = twin_reuse(rows)
    stack, glob, step = r.per_access
    assert stack.tolist() == [x[2] for x in tw]
    assert glob.tolist() == [x[3] for x in tw]
    assert step.tolist() == [x[4] for x in tw]
    h = np.zeros_like(r.stack_hist)
    hk = np.zeros_like(r.stack_kind)
    sk = np.zeros_like(r.step_kind)
    for lay, kind, d_l, _d_g, d_s in tw:
        if d_l >= 0:
            h[lay, d_l] += 1
            hk[kind, d_l] += 1
            sk[kind, S.step_bin(d_s)] += 1
    np.testing.assert_array_equal(r.stack_hist, h)
    np.testing.assert_array_equal(r.stack_kind, hk)
    np.testing.assert_array_equal(r.step_kind, sk)
    assert r.cold.sum() == sum(1 for x in tw if x[2] < 0)
    # overlap
    ov = S.overlap_stats(t)
    ratio, chance, pairs = twin_overlap(rows, epl)
    for ph in (0, 1):
        for lay in range(L):
            assert ov.pairs[ph, lay] == pairs[ph, lay]
            assert ov.ratio_sum[ph, lay] == pytest.approx(ratio[ph, lay])
            assert ov.chance_sum[ph, lay] == pytest.approx(chance[ph, lay])
    # co-activation
    c = S.coactivation_stats(t)
    res, cnt, mi = twin_coact(rows, epl)
    for ph in (0, 1):
        for lay in range(L - 1):
            assert c.pairs[ph, lay] == cnt["pairs", ph, lay]
            assert c.cv_pairs[ph, lay] == cnt["cv", ph, lay]
            assert c.recall_sum[0, ph, lay] == pytest.approx(res["in", ph, lay])
            assert c.recall_sum[1, ph, lay] == pytest.approx(res["cv", ph, lay])
            assert c.recall_sum[2, ph, lay] == pytest.approx(res["pop", ph, lay])
    for lay in range(L - 1):
        assert c.mi_bits[lay] == pytest.approx(mi[lay][0], abs=1e-9)
        assert c.h_next_bits[lay] == pytest.approx(mi[lay][1], abs=1e-9)
    # everything together serialises to strict JSON
    json.dumps(S.compute_stats(t).to_dict(), allow_nan=False)


def test_reuse_long_trace_matches_twin():
    """Many more accesses than 4x the experts: the kernel renumbers its windows many times."""
    rng = np.random.default_rng(7)
    rows = [(s, 0, s, 1, lay, [int(x) for x in rng.choice(3 + lay, 1 + lay, replace=False)])
            for s in range(150) for lay in range(2)]  # fmt: skip
    t = make_trace(rows, [3, 4])
    r = S.reuse_stats(t, keep=True)
    tw = twin_reuse(trace_rows(t))
    assert len(tw) > 40 * 7
    assert r.per_access[0].tolist() == [x[2] for x in tw]
    assert r.per_access[1].tolist() == [x[3] for x in tw]
    assert r.per_access[2].tolist() == [x[4] for x in tw]


def test_huge_positions_use_the_sparse_token_index():
    """Positions near 2**31 make a dense (seq, pos) table too big: the fallback must agree."""
    t = random_trace(2)
    rows = trace_rows(t)
    far = [(st, sq, pos + 2_000_000_000 - 50 * (sq % 7), ph, lay, ex)
           for st, sq, pos, ph, lay, ex in rows]  # fmt: skip
    a, b = S.compute_stats(t), S.compute_stats(make_trace(far, t.meta.experts_per_layer))
    for name in ("pairs", "ratio_sum", "chance_sum"):
        np.testing.assert_array_equal(getattr(a.overlap, name), getattr(b.overlap, name))
    np.testing.assert_array_equal(a.coact.recall_sum, b.coact.recall_sum)
    np.testing.assert_array_equal(a.coact.counts, b.coact.counts)
    assert a.info["tokens"] == b.info["tokens"]
    idx, n = S._dense_pair(np.array([0, 5, 5]), 10**7, np.array([3, 2**30, 3]), 2**31, 3)
    assert idx.tolist() == [0, 2, 1] and n == 3


# =========================================================================== real trace
def flame_trace(real_path, n_seq=32):
    """FLAME-MoE-290M prefill: layers 2..9 -> 0..7, 32 sequences x 64 tokens, a step each."""
    d = np.load(real_path("flame-moe-290m", "flame_moe_290m_prefill_2048tok.npz"))
    ids = d["topk_ids"][:, : n_seq * 64]  # [8, T, 6]
    L = ids.shape[0]
    seq = np.repeat(np.arange(n_seq), L * 64)
    layer = np.tile(np.repeat(np.arange(L), 64), n_seq)
    pos = np.tile(np.arange(64), n_seq * L)
    ex = ids[layer, seq * 64 + pos]
    n = ex.shape[0]
    meta = TraceMeta(model="CMU-FLAME/FLAME-MoE-290M", num_layers=L, experts_per_layer=64,
                     top_k=6, expert_bytes=1, layer_ids=[int(x) for x in d["layers"]],
                     steps="per-sequence")  # fmt: skip
    t = trace_from_arrays(meta, step=seq, seq=seq, pos=pos, phase=np.zeros(n), layer=layer,
                          offsets=np.arange(n + 1) * 6, experts=ex.ravel())  # fmt: skip
    validate_trace(t)
    return t


@pytest.mark.real
def test_flame_matches_published_quick_statistics(real):
    st = S.compute_stats(flame_trace(real))
    E = 64
    c = st.counts.sum(axis=0)
    assert (c.sum(axis=1) == 12288).all()
    top16 = np.sort(c, axis=1)[:, ::-1][:, :16].sum(axis=1) / 12288
    assert ((top16 > 0.29) & (top16 < 0.35)).all()  # SOURCE.md: 30-34%
    assert (c.min(axis=1) >= 55).all() and (c.max(axis=1) <= 358).all()
    ov = st.overlap.mean
    assert ((ov > 0.099) & (ov < 0.112)).all()  # SOURCE.md: about 0.10-0.11
    np.testing.assert_allclose(st.overlap.chance, 6 / E)
    assert (st.popularity["entropy_norm"] > 0.98).all()
    rec = st.coact.recall(0)
    assert (rec > st.coact.recall(2) + 0.1).all() and (st.coact.recall(1) <= rec + 1e-12).all()
    assert st.info["tokens"] == 2048 and st.layer_table()["model_layer"].tolist() == list(
        range(2, 10))  # fmt: skip


@pytest.mark.real
def test_flame_subset_matches_twins(real):
    t = flame_trace(real, n_seq=3)
    rows = trace_rows(t)
    r = S.reuse_stats(t, keep=True)
    tw = twin_reuse(rows)
    assert r.per_access[0].tolist() == [x[2] for x in tw]
    assert r.per_access[1].tolist() == [x[3] for x in tw]
    c = S.coactivation_stats(t)
    res, cnt, _ = twin_coact(rows, list(t.meta.experts_per_layer))
    for lay in range(7):
        assert c.recall_sum[0, 0, lay] == pytest.approx(res["in", 0, lay])
        assert c.recall_sum[1, 0, lay] == pytest.approx(res["cv", 0, lay])


# =========================================================================== command line
@pytest.fixture
def moesim(monkeypatch, capsys):
    """Run ``moesim ARGS`` (only the stats command registered); return (code, out, err)."""
    monkeypatch.setattr(cli, "COMMANDS", ["traces.cmd_stats"])

    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def trace_file(tmp_path):
    return write_trace(random_trace(3), tmp_path / "t.parquet")


def test_cli_table(moesim, trace_file):
    code, out, err = moesim("stats", trace_file)
    assert code == 0, err
    for word in ("popularity", "reuse", "overlap", "co-activ.", "prefill vs decode", "per layer"):
        assert word in out
    assert "H/logE" in out and "JS" in out


def test_cli_json_parses(moesim, trace_file):
    code, out, _ = moesim("stats", trace_file, "--json")
    assert code == 0
    d = json.loads(out)
    assert set(d) >= {"trace", "summary", "layers", "popularity_counts", "reuse_histograms"}
    assert len(d["layers"]) == 3 and d["trace"]["rows"] > 0
    assert d["summary"]["reuse"]["accesses"] == sum(
        sum(h) for h in d["reuse_histograms"]["stack_distance"]["per_layer"]
    ) + sum(d["reuse_histograms"]["cold_per_layer"])


def test_cli_plots(moesim, trace_file, tmp_path):
    out_dir = tmp_path / "figs"
    code, out, err = moesim("stats", trace_file, "--plot", out_dir, "--pair", 1)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["coactivation.png", "lru_hit_ratio.png", "per_layer.png",
                     "popularity_heatmap.png", "reuse_distance.png"]  # fmt: skip
    for p in out_dir.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_layers_table_is_summarised():
    L = 150
    rows = [(0, s, 0, 0, lay, [(s + lay) % 4]) for s in range(3) for lay in range(L)]
    st = S.compute_stats(make_trace(rows, [4] * L, top_k=1))
    from traces.cmd_stats import format_layers, format_report

    txt = format_layers(st, 20)
    assert len(txt.splitlines()) < 60 and "20 of 150 layers" in txt
    assert len(format_layers(st, 0).splitlines()) == 2 * (L + 2) + 1
    assert "per layer" in format_report(st, 20)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-layers", "-1"], "--max-layers"),
        (["--pair", "2"], "--pair: expected a layer 0..1"),
    ],
)
def test_cli_bad_options(moesim, trace_file, args, message):
    code, _, err = moesim("stats", trace_file, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_bad_input(moesim, tmp_path):
    code, _, err = moesim("stats", tmp_path / "missing.parquet")
    assert code == 2 and "missing.parquet" in err and "Traceback" not in err
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    code, _, err = moesim("stats", junk)
    assert code == 2 and "junk.parquet" in err and "Parquet" in err and "Traceback" not in err
    empty = write_trace(make_trace([], [4]), tmp_path / "empty.parquet")
    code, _, err = moesim("stats", empty)
    assert code == 2 and "no rows" in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    good = write_trace(random_trace(0), tmp_path / "g.parquet")
    code, _, err = moesim("stats", good, "--plot", afile)
    assert code == 2 and "not a folder" in err
