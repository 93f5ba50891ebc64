"""The learned expert predictor (policies/learned.py) and `moesim train` / `moesim predict`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from policies.learned import (
    LearnedConfig,
    LearnedPredictor,
    _gather,
    _gather_parallel,
    token_table,
)
from simulator.cli import main
from simulator.prediction import score_predictions
from tests.conftest import real_path
from tests.helpers import random_trace
from traces.errors import ConfigError, TraceError
from traces.format import TraceMeta
from traces.io import read_trace, trace_from_arrays, write_trace

SMALL = dict(hidden=32, batch=64, lr=1e-2, epochs=6)


def _planted(rng, *, sequences=30, tokens=16, layers=4, experts=8, top_k=2, text=False):
    """Per-token trace where the experts at layer l+1 are a fixed function of those at layer l.

    Layer 0: a random pair per token (from a vocabulary of 12 'words': the word decides it).
    Layer l+1: the image of layer l's experts under a fixed permutation per layer. The rule is
    the same for every call; ``rng`` draws the words.
    """
    rule = np.random.default_rng(1234)
    perms = [rule.permutation(experts) for _ in range(layers)]
    word_experts = [rule.choice(experts, top_k, replace=False) for _ in range(12)]
    rows, ex, words = [], [], []
    step = 0
    for s in range(sequences):
        for p in range(tokens):
            w = int(rng.integers(12))
            cur = word_experts[w]
            for lay in range(layers):
                if lay:
                    cur = perms[lay][cur]
                rows.append((step, lay, s, p))
                ex.append(cur)
                words.append(w)
            step += 1
    step, layer, seq, pos = (np.array(c) for c in zip(*rows, strict=True))
    meta = TraceMeta(
        model="planted", num_layers=layers, experts_per_layer=experts, top_k=top_k,
        expert_bytes=1000, steps="per-token",
    )  # fmt: skip
    words = np.array(words)
    return trace_from_arrays(
        meta, step=step, layer=layer, seq=seq, pos=pos, phase=np.ones(len(rows)),
        offsets=np.arange(len(rows) + 1) * top_k, experts=np.concatenate(ex),
        token=np.array([f"w{w}" for w in words], dtype=object) if text else None,
        token_id=None if text else words + 100,
    )  # fmt: skip


def _recall_from_layer(trace, model, h, first_layer):
    trace.preds[h] = model.predict(trace, h)
    rec = score_predictions(trace, h)["per_layer"]["recall"]
    return rec[first_layer:]


def test_recovers_planted_cross_layer_rule():
    rng = np.random.default_rng(0)
    train, test = _planted(rng), _planted(np.random.default_rng(1))
    cfg = LearnedConfig(horizons=[1, 2], use_token=False, prev_tokens=0, **SMALL)
    model = LearnedPredictor.train(train, cfg)
    assert model.token_kind is None
    # layers >= h are determined by the token's experts h layers earlier
    assert np.all(_recall_from_layer(test, model, 1, 1) > 0.97)
    assert np.all(_recall_from_layer(test, model, 2, 2) > 0.97)


def test_token_feature_and_its_absence():
    train, test = _planted(np.random.default_rng(2)), _planted(np.random.default_rng(3))
    # layer 0 is decided by the token alone: learnable only with the token feature
    with_tok = LearnedPredictor.train(train, LearnedConfig(horizons=[1], **SMALL))
    without = LearnedPredictor.train(
        train, LearnedConfig(horizons=[1], use_token=False, **SMALL)
    )  # fmt: skip
    assert with_tok.token_kind == "id" and len(with_tok.vocab) == 12
    assert _recall_from_layer(test, with_tok, 1, 0)[0] > 0.97
    assert _recall_from_layer(test, without, 1, 0)[0] < 0.8


def test_prev_tokens_only_from_earlier_steps():
    rng = np.random.default_rng(4)
    tr = random_trace(rng, layers=3, experts=6, top_k=2, sequences=2, prefill=3, decode=3)
    cfg = LearnedConfig(horizons=[1], src_layers=0, prev_tokens=2, use_token=False)
    model = LearnedPredictor(
        {"num_layers": 3, "experts_per_layer": [6] * 3, "top_k": 2, "model": "r"}, cfg, None,
        np.zeros(0, np.int64), {},
    )  # fmt: skip
    table = token_table(tr)
    rows = np.arange(tr.num_rows, dtype=np.int64)
    F = model._max_feats(tr)
    feats = np.empty((tr.num_rows, F), np.int32)
    vals = np.empty((tr.num_rows, F), np.float32)
    nf = np.empty(tr.num_rows, np.int32)
    model._feats(model._prepare(tr), tr, rows, 1, feats, vals, nf)
    rank = table.tok_rank[table.tok]
    prefill = tr.phase == 0
    assert np.all(nf[prefill] == 1)  # the layer feature only: earlier tokens ran in this step
    # decode token i (rank 3+) has 2 previous tokens that ran in earlier steps
    assert np.all(nf[~prefill & (rank >= 3)] == 1 + 2 * 2)


def test_parallel_gather_and_thread_agree():
    """The embedding sums on all cores equal the serial ones, number for number, and a model
    predicts the same from a worker thread (where the gather stays on that thread)."""
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 24)).astype(np.float32)
    feats = rng.integers(0, 300, (257, 9)).astype(np.int32)
    vals = rng.random((257, 9)).astype(np.float32)
    nf = rng.integers(0, 10, 257).astype(np.int32)
    z1, z2 = np.empty((257, 24), np.float32), np.empty((257, 24), np.float32)
    _gather(emb, feats, vals, nf, z1)
    _gather_parallel(emb, feats, vals, nf, z2)
    assert np.array_equal(z1, z2) and not np.all(z1 == 0)
    tr = _planted(np.random.default_rng(6), sequences=6, text=True)
    model = LearnedPredictor.train(tr, LearnedConfig(horizons=[1], hidden=16, epochs=1))
    here = model.log_probs(tr, 1)
    with ThreadPoolExecutor(1) as pool:
        there = pool.submit(model.log_probs, tr, 1).result()
    assert np.array_equal(here, there)


def test_save_load_round_trip(tmp_path):
    tr = _planted(np.random.default_rng(5), sequences=8, text=True)
    model = LearnedPredictor.train(tr, LearnedConfig(horizons=[1, 3], hidden=16, epochs=1))
    path = model.save(tmp_path / "m.npz")
    again = LearnedPredictor.load(path)
    assert again.horizons == [1, 3] and again.token_kind == "text"
    assert again.vocab.tolist() == model.vocab.tolist()
    for h in (1, 3):
        a, b = model.predict(tr, h), again.predict(tr, h)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.array_equal(a[0], np.arange(tr.num_rows + 1) * 2)  # top_k of the trace
    head = json.loads(str(np.load(path)["meta_json"]))
    assert head["shape"]["num_layers"] == 4 and head["shape"]["experts_per_layer"] == [8] * 4
    assert head["horizons"] == [1, 3] and head["config"]["hidden"] == 16


def test_ensemble_and_horizon_mix(tmp_path):
    tr = _planted(np.random.default_rng(9), sequences=10)
    cfg = LearnedConfig(horizons=[1, 2], ensemble=2, hidden=16, epochs=2, batch=64)
    model = LearnedPredictor.train(tr, cfg)
    assert [len(model.nets[h]) for h in (1, 2)] == [2, 2]
    again = LearnedPredictor.load(model.save(tmp_path / "e.npz"))
    # h=1 mixes in h=2's log-probabilities (weight 0.5 by default); h=2 has nothing longer
    lp1, lp2 = model.log_probs(tr, 1), model.log_probs(tr, 2)
    np.testing.assert_allclose(model.scores(tr, 1), lp1 + 0.5 * lp2, rtol=1e-5)
    np.testing.assert_allclose(model.scores(tr, 1, mix=0), lp1)
    np.testing.assert_allclose(model.scores(tr, 2), lp2)
    np.testing.assert_array_equal(again.scores(tr, 1), model.scores(tr, 1))
    # the ensemble's log-probabilities are the mean of its networks'
    one = LearnedPredictor(model.shape, model.cfg, model.token_kind, model.vocab,
                           {1: model.nets[1][:1]})  # fmt: skip
    two = LearnedPredictor(model.shape, model.cfg, model.token_kind, model.vocab,
                           {1: model.nets[1][1:]})  # fmt: skip
    np.testing.assert_allclose(lp1, (one.log_probs(tr, 1) + two.log_probs(tr, 1)) / 2, rtol=1e-5)


def test_predict_many_equals_one_horizon_at_a_time_and_the_scores():
    """All horizons in one pass (each network once per row) give what one call per horizon
    gives, and both are the top k of the horizon's scores (the mix of the longer horizons'
    log-probabilities), best first."""
    tr = _planted(np.random.default_rng(5), sequences=8)
    cfg = LearnedConfig(horizons=[1, 2, 3], hidden=16, epochs=1, batch=64)
    model = LearnedPredictor.train(tr, cfg)
    for mix in (None, 0.0, 1.5):
        many = model.predict_many(tr, [3, 1, 2], 3, mix)
        assert sorted(many) == [1, 2, 3]
        for h in (1, 2, 3):
            off, ids = model.predict(tr, h, 3, mix)
            assert np.array_equal(many[h][0], off) and np.array_equal(many[h][1], ids)
            assert np.array_equal(off, np.arange(tr.num_rows + 1) * 3)
            best = np.argsort(-model.scores(tr, h, mix), axis=1, kind="stable")[:, :3]
            assert np.array_equal(ids.reshape(-1, 3), best)
    assert not np.array_equal(many[1][1], model.predict(tr, 1, 3, 0.0)[1])  # the mix counts


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a moesim learned-predictor model"):
        LearnedPredictor.load(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="no JSON header"):
        LearnedPredictor.load(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="no such model file"):
        LearnedPredictor.load(tmp_path / "missing.npz")


def test_config_errors():
    tr = _planted(np.random.default_rng(6), sequences=2)
    with pytest.raises(ConfigError, match="horizons"):
        LearnedPredictor.train(tr, LearnedConfig(horizons=[0]))
    with pytest.raises(ConfigError, match="hidden"):
        LearnedPredictor.train(tr, LearnedConfig(hidden=0))
    model = LearnedPredictor.train(tr, LearnedConfig(horizons=[1], hidden=8, epochs=1))
    assert model.token_kind == "id"
    with pytest.raises(ConfigError, match="trained for horizons \\[1\\]"):
        model.predict(tr, 2)
    with pytest.raises(ConfigError, match="horizon mix"):
        model.predict(tr, 1, mix=-1)
    tr.token_id = None
    with pytest.raises(TraceError, match="no column 'token_id'"):
        model.predict(tr, 1)


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_cli_train_predict_replay(tmp_path, capsys):
    tr = _planted(np.random.default_rng(7), sequences=12, text=True)
    tr.weights = np.ones(tr.num_activations, np.float32)
    src = write_trace(tr, tmp_path / "t.parquet")
    model = tmp_path / "m.npz"
    assert _cli("train", src, "--horizons", 1, 2, "--hidden", 16, "-o", model, "--valid", src) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "valid" in out
    dst = tmp_path / "p.parquet"
    assert _cli("predict", src, "--model", model, "-o", dst, "--skip-first", 2) == 0
    out = capsys.readouterr().out
    assert "pred_h1, pred_h2" in out and "recall" in out
    got = read_trace(dst, load_text=True)
    assert got.meta.pred_source == "moesim-learned" and got.meta.pred_horizons == [1, 2]
    for name in ("step", "seq", "pos", "phase", "layer", "offsets", "experts", "weights"):
        assert np.array_equal(getattr(got, name), getattr(tr, name)), name
    assert got.token.tolist() == tr.token.tolist()
    # score-only on the written predictions, JSON
    assert _cli("predict", dst, "--score-only", "--horizons", 2, "--json") == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["horizon"] == 2 and 0 <= line["recall"] <= 1
    # the simulator prefetches them
    assert _cli("replay", dst, "--policy", "lru", "--cache-slots", 8, "--prefetch", "trace",
                "--horizon", 1, "--json") == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prefetch_issued"] > 0


def test_cli_errors(tmp_path, capsys):
    tr = _planted(np.random.default_rng(8), sequences=4, text=True)
    src = write_trace(tr, tmp_path / "t.parquet")
    model = tmp_path / "m.npz"
    assert _cli("train", src, "--horizons", 1, "--hidden", 8, "--epochs", 1, "-o", model) == 0
    capsys.readouterr()
    # another model shape
    other = random_trace(np.random.default_rng(0), layers=3, experts=6, top_k=2)
    other_path = write_trace(other, tmp_path / "other.parquet")
    assert _cli("predict", other_path, "--model", model, "-o", tmp_path / "x.parquet") == 2
    err = capsys.readouterr().err
    assert "trained for 4 MoE layers x 8 experts" in err and "3 MoE layers x 6 experts" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.parquet").exists()
    # same shape, but without the token text the model needs
    tr.token = None
    notext = write_trace(tr, tmp_path / "notext.parquet")
    assert _cli("predict", notext, "--model", model, "-o", tmp_path / "x.parquet") == 2
    assert "no column 'token'" in capsys.readouterr().err
    # a horizon the model lacks; no model; nothing to score; bad numbers
    assert (
        _cli("predict", src, "--model", model, "--horizons", 4, "-o", tmp_path / "x.parquet") == 2
    )
    assert "trained for horizons [1]" in capsys.readouterr().err
    assert _cli("predict", src, "-o", tmp_path / "x.parquet") == 2
    assert "expected --model" in capsys.readouterr().err
    assert _cli("predict", src, "--score-only") == 2
    assert "no pred_h columns" in capsys.readouterr().err
    assert _cli("predict", src, "--score-only", "--horizons", 3) == 2
    assert "no column 'pred_h3'" in capsys.readouterr().err
    assert _cli("train", src, "--horizons", 0, "-o", model) == 2
    assert "horizons" in capsys.readouterr().err
    assert _cli("predict", src, "--model", tmp_path / "nope.npz", "-o", tmp_path / "x.parquet") == 2
    assert "no such model file" in capsys.readouterr().err


@pytest.mark.real
def test_real_data_beats_popularity(tmp_path):
    """Train on 60 Puffin prompts, test on 20 WebGLM prompts: h=1 recall >> popularity."""
    from traces.importers import import_moe_beyond

    base = real_path("deepseek-v2-lite-moe-beyond")
    import_moe_beyond([base / "puffin-train"], tmp_path / "train.parquet", limit=60, jobs=1)
    import_moe_beyond([base / "webglm-test"], tmp_path / "test.parquet", limit=20, jobs=1)
    train = read_trace(tmp_path / "train.parquet", load_text=True)
    test = read_trace(tmp_path / "test.parquet", load_text=True)
    cfg = LearnedConfig(horizons=[1], hidden=128, batch=256, epochs=2, lr=3e-3)
    model = LearnedPredictor.train(train, cfg)
    test.preds[1] = model.predict(test, 1)
    learned = score_predictions(test, 1)["recall"]
    # per-layer popularity from the same training rows
    nl, E = 26, 64
    counts = np.zeros((nl, E))
    np.add.at(counts, (np.repeat(train.layer, np.diff(train.offsets)), train.experts), 1)
    top = np.argsort(-counts, axis=1)[:, :6]
    test.preds[1] = (np.arange(test.num_rows + 1) * 6, top[test.layer].ravel())
    popular = score_predictions(test, 1)["recall"]
    assert popular < 0.3
    print(f"learned {learned:.3f} popularity {popular:.3f}")
    assert learned > popular + 0.3, (learned, popular)
