"""Tests of ``moesim synth``: the generator, its knobs, the fit and the bundled sample."""

from __future__ import annotations

import ast
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import real_path

from simulator.cli import main
from traces.errors import ConfigError
from traces.fit import fit_knobs, routing_stats, trace_structure
from traces.format import TraceMeta
from traces.io import read_trace, sort_trace, trace_from_arrays, write_trace
from traces.make_sample import SAMPLE_KNOBS, SAMPLE_PATH, build_sample, write_sample
from traces.presets import get_preset
from traces.synth import SynthKnobs, synth_trace
from traces.validate import validate_trace

SMALL = dict(sequences=6, prefill_len=12, prefill_jitter=0.5, decode_len=10, decode_jitter=0.3,
             batch_size=3)  # fmt: skip

#: Fit tolerance (docs/synth.md): absolute error of the fitted knobs on a trace synthesised with
#: known knobs in the realistic range (about 3,000 tokens of DeepSeek-V2-Lite shape).
TOL_SKEW_MEAN = 0.05
TOL_SKEW_LAYER = 0.15
TOL_REUSE = 0.02
TOL_CROSS = 0.03


def small(**kw) -> SynthKnobs:
    return SynthKnobs(**(SMALL | kw))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- generator
def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    write_trace(synth_trace("deepseek-v2-lite", small(seed=5)), a)
    write_trace(synth_trace("deepseek-v2-lite", small(seed=5)), b)
    write_trace(synth_trace("deepseek-v2-lite", small(seed=6)), c)
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


@pytest.mark.parametrize(
    "model",
    ["mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "switch-base-128",
     "deepseek-v3"],
)  # fmt: skip
def test_shape_and_metadata_per_preset(model, tmp_path):
    preset = get_preset(model)
    knobs = small(skew=0.8, reuse=0.3, cross_layer=0.7)
    path = write_trace(synth_trace(model, knobs), tmp_path / "t.parquet")
    t = read_trace(path)  # validates every row: sorted, top_k distinct experts in range
    m = t.meta
    assert (m.num_layers, m.top_k) == (preset.num_layers, preset.top_k)
    assert m.experts_per_layer == [preset.experts] * preset.num_layers
    assert m.expert_bytes == [preset.expert_bytes] * preset.num_layers
    assert m.shared_experts == [preset.shared_experts] * preset.num_layers
    assert m.shared_expert_bytes == preset.shared_expert_bytes
    assert m.model == preset.hf_id and m.steps == "native"
    assert SynthKnobs.from_dict(m.extra["synth"]) == knobs
    assert t.num_rows == t.num_tokens * preset.num_layers
    assert t.num_activations == t.num_rows * preset.top_k
    w = t.weights.reshape(-1, preset.top_k)
    assert np.all(np.diff(w, axis=1) <= 0), "gate weights are in rank (descending) order"
    assert np.allclose(w.sum(axis=1), 1.0, atol=0.02)


def test_steps_continuous_batching():
    knobs = small(sequences=7, batch_size=3)
    t = synth_trace("mixtral-8x7b", knobs)
    l0 = t.layer == 0
    st = trace_structure(t)
    assert st.prefill.shape[0] == 7
    assert st.batch_size == 3
    for step in np.unique(t.step):
        rows = l0 & (t.step == step)
        phases = np.unique(t.phase[rows])
        assert phases.shape[0] == 1
        if phases[0] == 0:  # a prefill step holds the whole prompt of one sequence
            seqs = np.unique(t.seq[rows])
            assert seqs.shape[0] == 1
            assert np.array_equal(t.pos[rows], np.arange(st.prefill[seqs[0]]))
        else:  # a decode step: one token of each running sequence
            assert np.unique(t.seq[rows]).shape[0] == np.count_nonzero(rows) <= 3
    # per sequence: prefill positions then decode positions, contiguous
    for s in range(7):
        rows = l0 & (t.seq == s)
        assert np.array_equal(np.sort(t.pos[rows]), np.arange(np.count_nonzero(rows)))
    # every layer of a step is present for each of its tokens
    assert np.array_equal(np.bincount(t.layer), np.full(32, np.count_nonzero(l0)))


def test_lengths_and_jitter():
    knobs = SynthKnobs(sequences=40, prefill_len=20, prefill_jitter=0.5, decode_len=30,
                       decode_jitter=0.0, batch_size=5)  # fmt: skip
    t = synth_trace("olmoe-1b-7b", knobs)
    st = trace_structure(t)
    assert st.prefill.min() >= 10 and st.prefill.max() <= 30 and st.prefill.std() > 2
    assert np.all(st.decode == 30)


def test_no_decode_and_batch_one():
    t = synth_trace("switch-base-128", SynthKnobs(sequences=3, prefill_len=5, decode_len=0))
    validate_trace(t)
    assert np.all(t.phase == 0) and t.num_steps == 3
    t = synth_trace("switch-base-128", SynthKnobs(sequences=3, prefill_len=2, decode_len=4,
                                                  batch_size=1))  # fmt: skip
    l0 = t.layer == 0
    assert list(t.seq[l0]) == [0] * 6 + [1] * 6 + [2] * 6  # one sequence at a time


def test_per_layer_skew_list():
    knobs = small(skew=[0.0, 2.0])  # stretched over the 26 layers
    assert np.allclose(knobs.skew_per_layer(2), [0.0, 2.0])
    s = knobs.skew_per_layer(26)
    assert s[0] == 0.0 and s[-1] == 2.0 and np.all(np.diff(s) >= 0)
    t = synth_trace("deepseek-v2-lite", SynthKnobs(skew=[0.0] * 13 + [2.0] * 13, reuse=0.0,
                                                   cross_layer=0.0, sequences=4, prefill_len=64,
                                                   decode_len=0))  # fmt: skip
    h = routing_stats(t).entropy
    assert h[:13].min() > h[13:].max() + 0.3


# --------------------------------------------------------------------------- knob effects
def _stats(**kw):
    knobs = SynthKnobs(**({"sequences": 8, "prefill_len": 48, "decode_len": 48, "batch_size": 4,
                           "seed": 3} | kw))  # fmt: skip
    return routing_stats(synth_trace("deepseek-v2-lite", knobs))


def test_knob_effects_go_the_right_way():
    h = [_stats(skew=s, reuse=0.1, cross_layer=0.5).entropy.mean() for s in (0.0, 0.5, 1.0, 1.5)]
    assert np.all(np.diff(h) < 0), h
    ov = [_stats(skew=0.5, reuse=r, cross_layer=0.5).overlap for r in (0.0, 0.2, 0.5, 0.9)]
    assert np.all(np.diff(ov) > 0), ov
    mi = [_stats(skew=0.5, reuse=0.1, cross_layer=c).cross_mi for c in (0.0, 0.4, 0.7, 1.0)]
    assert np.all(np.diff(mi) > 0), mi
    # reuse of 1 repeats the previous token's row exactly
    z = _stats(skew=0.5, reuse=1.0, cross_layer=0.0)
    assert z.overlap == pytest.approx(1.0)


# --------------------------------------------------------------------------- fit
def test_fit_recovers_known_knobs():
    truth = SynthKnobs(skew=0.6, reuse=0.1, cross_layer=0.8, sequences=24, prefill_len=32,
                       prefill_jitter=0.3, decode_len=96, batch_size=8, seed=11)  # fmt: skip
    res = fit_knobs(synth_trace("deepseek-v2-lite", truth))
    k = res.knobs
    skews = np.asarray(k.skew)
    assert skews.shape == (26,)
    assert abs(skews.mean() - truth.skew) <= TOL_SKEW_MEAN
    assert np.abs(skews - truth.skew).max() <= TOL_SKEW_LAYER
    assert abs(k.reuse - truth.reuse) <= TOL_REUSE
    assert abs(k.cross_layer - truth.cross_layer) <= TOL_CROSS
    assert (k.sequences, k.decode_len, k.batch_size) == (24, 96, 8)
    assert abs(k.prefill_len - 32) <= 2 and abs(k.prefill_jitter - 0.3) <= 0.1
    assert k.seed == SynthKnobs().seed and "DeepSeek-V2-Lite" in k.fitted_from
    # fitted knobs reproduce the statistics
    assert abs(res.achieved.overlap - res.target.overlap) < 0.005
    assert np.abs(res.achieved.entropy - res.target.entropy).max() < 0.02


def test_fit_other_shape_and_low_locality():
    truth = SynthKnobs(skew=0.3, reuse=0.3, cross_layer=0.5, sequences=16, prefill_len=48,
                       decode_len=64, batch_size=8, seed=2)  # fmt: skip
    k = fit_knobs(synth_trace("olmoe-1b-7b", truth)).knobs
    assert abs(np.mean(k.skew) - 0.3) <= TOL_SKEW_MEAN
    assert abs(k.reuse - 0.3) <= TOL_REUSE
    assert abs(k.cross_layer - 0.5) <= TOL_CROSS


def test_fit_notes_what_it_cannot_estimate():
    t = synth_trace("mixtral-8x7b", SynthKnobs(sequences=4, prefill_len=40, decode_len=0))
    res = fit_knobs(t, base=SynthKnobs(batch_size=5, seed=9))
    assert res.knobs.batch_size == 5 and res.knobs.seed == 9 and res.knobs.decode_len == 0
    assert any("batch_size" in n for n in res.notes)
    assert res.summary_lines()[0].startswith("fitted on")


def test_fit_truncates_large_traces():
    t = synth_trace("mixtral-8x7b", SynthKnobs(sequences=10, prefill_len=40, decode_len=10))
    res = fit_knobs(t, max_activations=t.num_activations // 3)
    assert res.fitted_activations <= t.num_activations // 3
    assert res.knobs.sequences == 10  # structure from the whole trace
    assert any("first" in n for n in res.notes)


# --------------------------------------------------------------------------- knobs files
def test_knobs_json_round_trip(tmp_path):
    k = small(skew=[0.1, 0.2, 0.3], fitted_from="x")
    p = k.save(tmp_path / "k.json")
    assert SynthKnobs.load(p) == k
    assert json.loads(p.read_text())["skew"] == [0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    "raw, key",
    [({"reuse": 2}, "reuse"), ({"bogus": 1}, "bogus"), ({"sequences": 0}, "sequences"),
     ({"skew": "high"}, "skew"), ({"decode_len": 1.5}, "decode_len"), ({"seed": -1}, "seed")],
)  # fmt: skip
def test_knobs_file_errors_name_the_key(tmp_path, raw, key):
    p = tmp_path / "k.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SynthKnobs.load(p)


def test_knobs_file_not_json(tmp_path):
    p = tmp_path / "k.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SynthKnobs.load(p)


# --------------------------------------------------------------------------- sample
def test_bundled_sample_equals_regeneration(tmp_path):
    fresh = write_sample(tmp_path / "sample.parquet")
    bundled_meta = pq.ParquetFile(SAMPLE_PATH).metadata
    fresh_meta = pq.ParquetFile(fresh).metadata
    if bundled_meta.created_by == fresh_meta.created_by:
        assert sha(fresh) == sha(SAMPLE_PATH), "run: python -m traces.make_sample"
    # whatever writer made the file, the content is the same
    assert pq.read_table(fresh).equals(pq.read_table(SAMPLE_PATH))
    assert pq.read_schema(fresh).metadata == pq.read_schema(SAMPLE_PATH).metadata


def test_bundled_sample_is_small_and_batched():
    assert SAMPLE_PATH.stat().st_size < 400_000
    t = read_trace(SAMPLE_PATH)
    assert t.meta.extra["synth"] == SAMPLE_KNOBS.to_dict()
    assert t.meta.num_layers == 26 and t.meta.top_k == 6
    st = trace_structure(t)
    assert st.batch_size == SAMPLE_KNOBS.batch_size > 1
    assert np.array_equal(build_sample().experts, t.experts)


# --------------------------------------------------------------------------- CLI
def test_cli_writes_trace(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    rc = main(["synth", "--model", "mixtral-8x7b", "-o", str(out), "--sequences", "3",
               "--prefill-len", "5", "--decode-len", "4", "--batch-size", "2", "--seed", "4",
               "--reuse", "0.5"])  # fmt: skip
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    t = read_trace(out)
    assert t.meta.extra["synth"]["reuse"] == 0.5 and t.meta.extra["synth"]["seed"] == 4
    assert t.num_sequences == 3


@pytest.mark.parametrize(
    "argv, flag",
    [(["--model", "nope"], "--model"), ([], "--model"),
     (["--model", "mixtral-8x7b", "--reuse", "1.5"], "--reuse"),
     (["--model", "mixtral-8x7b", "--cross-layer", "-0.1"], "--cross-layer"),
     (["--model", "mixtral-8x7b", "--prefill-len", "0"], "--prefill-len"),
     (["--model", "mixtral-8x7b", "--decode-len", "-3"], "--decode-len"),
     (["--model", "mixtral-8x7b", "--sequences", "-1"], "--sequences"),
     (["--model", "mixtral-8x7b", "--batch-size", "0"], "--batch-size"),
     (["--model", "mixtral-8x7b", "--skew", "-1"], "--skew"),
     (["--model", "mixtral-8x7b", "--prefill-jitter", "2"], "--prefill-jitter")],
)  # fmt: skip
def test_cli_bad_values_one_line_error(argv, flag, tmp_path, capsys):
    rc = main(["synth", "-o", str(tmp_path / "x.parquet"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("moesim synth: error: ") and flag in err
    assert not (tmp_path / "x.parquet").exists()


def test_cli_fit_save_and_reuse_knobs(tmp_path, capsys):
    real = write_trace(
        synth_trace("olmoe-1b-7b", SynthKnobs(sequences=6, prefill_len=24, decode_len=24,
                                              batch_size=3, reuse=0.4, seed=1)),
        tmp_path / "real.parquet",
    )  # fmt: skip
    kfile = tmp_path / "k.json"
    assert main(["synth", "--fit", str(real), "--save-knobs", str(kfile)]) == 0
    out = capsys.readouterr().out
    assert "reuse" in out and "wrote knobs" in out
    assert not list(tmp_path.glob("synth-*.parquet"))  # knobs only
    k = SynthKnobs.load(kfile)
    assert k.batch_size == 3 and k.sequences == 6 and abs(k.reuse - 0.4) < 0.1
    # --knobs FILE, with a flag overriding one knob; model from --model
    out2 = tmp_path / "o.parquet"
    assert main(["synth", "--model", "olmoe-1b-7b", "--knobs", str(kfile), "--sequences", "2",
                 "-o", str(out2)]) == 0  # fmt: skip
    meta = read_trace(out2).meta.extra["synth"]
    assert meta["sequences"] == 2 and meta["reuse"] == k.reuse
    # --fit and write: the model defaults to the preset the fitted trace matches
    out3 = tmp_path / "f.parquet"
    assert main(["synth", "--fit", str(real), "-o", str(out3), "--decode-len", "3"]) == 0
    t = read_trace(out3)
    assert t.meta.model == get_preset("olmoe-1b-7b").hf_id
    assert t.meta.extra["synth"]["decode_len"] == 3


def test_cli_bad_knobs_file(tmp_path, capsys):
    p = tmp_path / "k.json"
    p.write_text('{"reuse": -1}')
    assert main(["synth", "--model", "mixtral-8x7b", "--knobs", str(p)]) == 2
    err = capsys.readouterr().err
    assert "'reuse'" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- real traces
def _trace(model, n_experts, k, seq, pos, layer, experts, n_layers):
    meta = TraceMeta(model=model, num_layers=n_layers, experts_per_layer=n_experts, top_k=k,
                     expert_bytes=1)  # fmt: skip
    n = seq.shape[0]
    t = trace_from_arrays(meta, step=seq, seq=seq, pos=pos, phase=np.zeros(n), layer=layer,
                          offsets=np.arange(n + 1) * k, experts=experts.reshape(-1))  # fmt: skip
    t = sort_trace(t)
    validate_trace(t)
    return t


@pytest.mark.real
def test_fit_flame_moe_prefill():
    d = np.load(real_path("flame-moe-290m", "flame_moe_290m_prefill_2048tok.npz"))
    ids = d["topk_ids"]  # [8 layers, 2048 tokens, 6]; 32 sequences x 64 tokens
    n_layers, n_tok, k = ids.shape
    tok = np.tile(np.arange(n_tok), n_layers)
    t = _trace("CMU-FLAME/FLAME-MoE-290M", 64, k, tok // 64, tok % 64,
               np.repeat(np.arange(n_layers), n_tok), ids.reshape(-1, k), n_layers)  # fmt: skip
    res = fit_knobs(t)
    k = res.knobs
    assert (k.sequences, k.prefill_len, k.decode_len) == (32, 64, 0)
    assert 0.1 < np.mean(k.skew) < 0.5  # mild: trained with load balancing
    assert k.reuse < 0.05  # consecutive overlap barely above chance (SOURCE.md)
    assert k.cross_layer > 0.5


@pytest.mark.real
def test_fit_deepseek_csv_prompts():
    pd = pytest.importorskip("pandas")
    folder = real_path("deepseek-v2-lite-moe-beyond", "webglm-test")
    parts = []
    for s, f in enumerate(sorted(folder.glob("*.csv.gz"))[:8]):
        df = pd.read_csv(f)
        ex = np.array([ast.literal_eval(x) for x in df["Activated Expert IDs"]], np.int16)
        pos = df.groupby("Layer ID").cumcount().to_numpy()
        parts.append((np.full(len(df), s), pos, df["Layer ID"].to_numpy() - 1, ex))
    seq, pos, layer, ex = (np.concatenate([p[i] for p in parts]) for i in range(4))
    t = _trace("deepseek-ai/DeepSeek-V2-Lite-Chat", 64, 6, seq, pos, layer, ex, 26)
    k = fit_knobs(t).knobs
    assert k.sequences == 8 and k.decode_len == 0
    assert 0.2 < np.mean(k.skew) < 1.2
    assert 0.03 < k.reuse < 0.4
    assert k.cross_layer > 0.5


# --------------------------------------------------------------------------- speed
@pytest.mark.slow
def test_generates_ten_million_activations_in_seconds():
    import time

    synth_trace("deepseek-v2-lite", small())  # compile
    knobs = SynthKnobs(sequences=100, prefill_len=128, decode_len=512, batch_size=16)
    t0 = time.perf_counter()
    t = synth_trace("deepseek-v2-lite", knobs)
    dt = time.perf_counter() - t0
    assert t.num_activations == 100 * 640 * 26 * 6
    assert dt < 10.0, f"{t.num_activations / dt / 1e6:.1f} M activations/s"
