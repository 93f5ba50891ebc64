"""Tests of ``moesim import``: MoE-Beyond CSV, vLLM JSONL and generic tables.

Small hand-made inputs (written in tmp_path) with exactly known expected arrays, the real
shared traces (skipped where ../shared is absent) with spot checks against the raw files, and
the error cases (one-line TraceError naming file and column).
"""

from __future__ import annotations

import csv
import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import real_path

from simulator.cli import main
from traces import read_trace
from traces.errors import ConfigError, TraceError
from traces.importers import Mapping, ModelOptions, import_moe_beyond, import_table, import_vllm

TOY = ModelOptions(model="toy/model", experts_per_layer=8, top_k=2, expert_bytes=1000)


def _write(path, text: str):
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _experts(t) -> list[list[int]]:
    return [t.experts[a:b].tolist() for a, b in zip(t.offsets[:-1], t.offsets[1:], strict=True)]


# =========================================================================== MoE-Beyond
MB_HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]


@pytest.fixture
def mb_dir(tmp_path):
    """Two prompts (3 and 10, so that name order != number order), layers 1..2."""
    d = tmp_path / "mb"
    d.mkdir()
    # prompt 3: two tokens "<s>" and 'a,"b' (CSV quoting), grouped by layer
    _write(d / "prompt_3_data.csv", _csv([
        [1, 0, "<s>", "[1, 2]"], [1, 0, 'a,"b', "[3, 4]"],
        [2, 0, "<s>", "[5, 6]"], [2, 0, 'a,"b', "[7, 0]"],
    ], MB_HEADER))  # fmt: skip
    _write(d / "prompt_10_data.csv.gz", _csv([
        [1, 0, "x", "[0, 1]"], [2, 0, "x", "[2, 3]"],
    ], MB_HEADER))  # fmt: skip
    return d


def test_moe_beyond_per_token_exact(mb_dir, tmp_path):
    out = tmp_path / "t.parquet"
    r = import_moe_beyond([mb_dir], out, model=TOY)
    t = read_trace(out, load_text=True)
    assert t.step.tolist() == [0, 0, 1, 1, 2, 2]
    assert t.layer.tolist() == [0, 1, 0, 1, 0, 1]
    assert t.seq.tolist() == [3, 3, 3, 3, 10, 10]
    assert t.pos.tolist() == [0, 0, 1, 1, 0, 0]
    assert t.phase.tolist() == [1] * 6
    assert _experts(t) == [[1, 2], [5, 6], [3, 4], [7, 0], [0, 1], [2, 3]]
    assert t.token.tolist() == ["<s>", "<s>", 'a,"b', 'a,"b', "x", "x"]
    assert t.meta.layer_ids == [1, 2] and t.meta.steps == "per-token"
    assert t.meta.num_layers == 2 and t.meta.top_k == 2 and t.meta.expert_bytes == [1000, 1000]
    assert (r.rows, r.activations, r.sequences, r.steps, r.files) == (6, 12, 2, 3, 2)
    assert "6 rows" in r.summary() and "3 steps" in r.summary()


def test_moe_beyond_per_sequence_exact(mb_dir, tmp_path):
    out = tmp_path / "t.parquet"
    import_moe_beyond([mb_dir], out, model=TOY, steps="per-sequence")
    t = read_trace(out)
    assert t.step.tolist() == [0, 0, 0, 0, 1, 1]
    assert t.layer.tolist() == [0, 0, 1, 1, 0, 1]
    assert t.seq.tolist() == [3, 3, 3, 3, 10, 10]
    assert t.pos.tolist() == [0, 1, 0, 1, 0, 0]
    assert t.phase.tolist() == [0] * 6
    assert _experts(t) == [[1, 2], [3, 4], [5, 6], [7, 0], [0, 1], [2, 3]]
    assert t.meta.steps == "per-sequence"


def test_moe_beyond_interleaved_layers_and_limit(tmp_path):
    d = tmp_path / "mb"
    d.mkdir()
    # rows not grouped by layer: token i of a layer is still that layer's i-th row
    _write(d / "prompt_1.csv", _csv([
        [2, 0, "a", "[5, 6]"], [1, 0, "a", "[1, 2]"], [1, 0, "b", "[3, 4]"], [2, 0, "b", "[7, 0]"],
    ], MB_HEADER))  # fmt: skip
    _write(d / "prompt_2.csv", _csv([[1, 0, "c", "[0, 1]"], [2, 0, "c", "[2, 3]"]], MB_HEADER))
    out = tmp_path / "t.parquet"
    r = import_moe_beyond([d], out, model=TOY, limit=1)
    t = read_trace(out)
    assert r.files == 1 and t.seq.tolist() == [1, 1, 1, 1]
    assert _experts(t) == [[1, 2], [5, 6], [3, 4], [7, 0]]


def test_moe_beyond_predicted_layout(tmp_path):
    d = tmp_path / "pred"
    d.mkdir()
    header = ["Layer ID", "Token", "Activated Expert IDs", "Predicted Expert IDs"]
    _write(d / "prompt_5_data_predicted.csv.gz", _csv([
        [1, 0, "[1, 2]", "[1, 3]"], [1, 1, "[3, 4]", "[]"],
        [2, 0, "[5, 6]", "[5, 6, 7]"], [2, 1, "[0, 7]", "[0]"],
    ], header))  # fmt: skip
    out = tmp_path / "p.parquet"
    import_moe_beyond([d], out, model=TOY)
    t = read_trace(out, load_text=True)
    assert t.token is None  # the Token column held the token index: checked, not stored
    po, pv = t.preds[1]
    assert [pv[a:b].tolist() for a, b in zip(po[:-1], po[1:], strict=True)] == [
        [1, 3], [5, 6, 7], [], [0],
    ]  # fmt: skip
    assert t.meta.pred_source == "moe-beyond" and t.meta.pred_horizons == [1]
    assert "horizon-free" in t.meta.extra["pred_note"]
    assert t.meta.extra["expert_order"].startswith("ascending")


@pytest.mark.parametrize(
    "rows, name, match",
    [
        ([[1, 0, "a", "[1, x]"], [2, 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"prompt_1.csv line 2: column 'Activated Expert IDs': expected a list of integer"),
        ([[1, 0, "a", "[1, 2"], [2, 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"prompt_1.csv line 2: column 'Activated Expert IDs': expected a list like"),
        ([[1, 0, "a", "[1, 2]"], [1, 0, "b", "[1, 2]"], [2, 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"layer 1 has 2 rows but layer 2 has 1"),
        ([[1, 0, "a", "[1, 2]"], [2, 0, "a", "[1, 2]"]], "prompt.csv",
         r"prompt.csv: expected a number in the file name"),
        ([[1, 0, "a", "[1, 2]"], ["one", 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"line 3: column 'Layer ID': expected an integer layer number, got 'one'"),
        ([[1, 0, "a", "[1, 9]"], [2, 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"column 'experts': row 0: expected expert ids in 0..7 for layer 0, got 9"),
        ([[1, 0, "a", "[1, 2, 3]"], [2, 0, "a", "[1, 2]"]], "prompt_1.csv",
         r"expected top_k=2 experts"),
    ],
)  # fmt: skip
def test_moe_beyond_errors(tmp_path, rows, name, match):
    d = tmp_path / "bad"
    d.mkdir()
    _write(d / name, _csv(rows, MB_HEADER))
    out = tmp_path / "out.parquet"
    out.write_bytes(b"old")
    with pytest.raises(TraceError, match=match) as err:
        import_moe_beyond([d], out, model=TOY)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"old"  # atomic: the old output is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_moe_beyond_missing_layer_and_column(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    _write(d / "prompt_1.csv", _csv([[1, 0, "a", "[1, 2]"], [2, 0, "a", "[1, 2]"]], MB_HEADER))
    _write(d / "prompt_2.csv", _csv([[1, 0, "a", "[1, 2]"]], MB_HEADER))
    with pytest.raises(TraceError, match=r"prompt_2.csv: column 'Layer ID': wrong layer count"):
        import_moe_beyond([d], tmp_path / "o.parquet", model=TOY)
    _write(d / "prompt_2.csv", "Layer ID,Token,Experts\n1,a,[1]\n")
    with pytest.raises(TraceError, match=r"prompt_2.csv: missing column 'Activated Expert IDs'"):
        import_moe_beyond([d], tmp_path / "o.parquet", model=TOY)
    # the default preset (deepseek-v2-lite) expects 26 layers
    (d / "prompt_2.csv").unlink()
    with pytest.raises(TraceError, match=r"wrong layer count: the input has 2 layers"):
        import_moe_beyond([d], tmp_path / "o.parquet")


def test_moe_beyond_pool_path(tmp_path, monkeypatch):
    """The process-pool path gives the same trace as the in-process one."""
    import traces.importers.moe_beyond as mb

    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        n = int(rng.integers(1, 4))
        rows = [[lay, 0, f"t{j}", str(sorted(rng.choice(8, 2, replace=False).tolist()))]
                for lay in (1, 2) for j in range(n)]  # fmt: skip
        _write(d / f"prompt_{i}.csv.gz", _csv(rows, MB_HEADER))
    import_moe_beyond([d], tmp_path / "a.parquet", model=TOY, jobs=1)
    monkeypatch.setattr(mb, "POOL_MIN_FILES", 2)
    import_moe_beyond([d], tmp_path / "b.parquet", model=TOY, jobs=2)
    a = pq.read_table(tmp_path / "a.parquet")
    b = pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b)


# =========================================================================== vLLM JSONL
def _route(idx, layer, ids, weights=None):
    w = weights if weights is not None else [round(0.5 - 0.1 * i, 3) for i in range(len(ids))]
    return {"type": "route", "req_id": "r1", "token_idx": idx, "layer": layer,
            "topk_ids": ids, "topk_weights": w}  # fmt: skip


def _log(path, layer, calls, header=True, model_id="toy/model"):
    """calls: list of lists of expert-id pairs; token_idx restarts at 0 per call."""
    lines = []
    if header:
        lines.append({"type": "meta", "model_id": model_id, "top_k": 2, "layers_logged": [layer]})
    for call in calls:
        lines += [_route(i, layer, ids) for i, ids in enumerate(call)]
    _write(path, "".join(json.dumps(x) + "\n" for x in lines))
    return path


def _calls(offset):
    warm = [[7, 6]] * 5  # dummy warm-up call: 5 identical rows
    prefill = [[(i + offset) % 8, (i + offset + 1) % 8] for i in range(6)]
    decode = [[[(i + offset) % 8, (i + 2 + offset) % 8] for i in range(n)] for n in (3, 3, 2)]
    return [warm, prefill, *decode]


VLLM_KW = dict(max_decode_batch=4, warmup_min_rows=4, model=ModelOptions(expert_bytes=1000,
               experts_per_layer=8))  # fmt: skip


def test_vllm_native_exact(tmp_path):
    a = _log(tmp_path / "moe_layer0.jsonl", 0, _calls(0))
    b = _log(tmp_path / "moe_layer5.jsonl.gz", 5, _calls(1))
    out = tmp_path / "v.parquet"
    r = import_vllm([b, a], out, **VLLM_KW)
    t = read_trace(out)
    # steps: prefill call (6 rows) then decode calls of 3, 3, 2 rows; layers 0 and 5
    exp_step, exp_layer, exp_seq, exp_pos, exp_phase = [], [], [], [], []
    for step, (seqs, poss, ph) in enumerate([
        ([3] * 6, list(range(6)), 0), ([0, 1, 2], [0, 0, 0], 1), ([0, 1, 2], [1, 1, 1], 1),
        ([0, 1], [2, 2], 1),
    ]):  # fmt: skip
        for lay in (0, 1):
            exp_step += [step] * len(seqs)
            exp_layer += [lay] * len(seqs)
            exp_seq += seqs
            exp_pos += poss
            exp_phase += [ph] * len(seqs)
    assert t.step.tolist() == exp_step
    assert t.layer.tolist() == exp_layer
    assert t.seq.tolist() == exp_seq
    assert t.pos.tolist() == exp_pos
    assert t.phase.tolist() == exp_phase
    ex = _experts(t)
    assert ex[:7] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [1, 2]]
    assert ex[12:15] == [[0, 2], [1, 3], [2, 4]]  # first decode call, layer 0
    assert np.allclose(t.weights[:2], [0.5, 0.4])
    assert t.meta.layer_ids == [0, 5] and t.meta.steps == "native" and t.meta.top_k == 2
    assert t.meta.extra["warmup_rows_dropped"] == 5
    assert r.steps == 4 and r.sequences == 4


def test_vllm_keep_warmup_and_per_token(tmp_path):
    a = _log(tmp_path / "l0.jsonl", 0, _calls(0))
    out = tmp_path / "v.parquet"
    import_vllm([a], out, keep_warmup=True, **VLLM_KW)
    t = read_trace(out)
    assert t.num_rows == 5 + 6 + 8 and t.step.max() == 4
    assert t.seq[:5].tolist() == [3] * 5 and t.seq[5:11].tolist() == [4] * 6  # two prefill calls
    import_vllm([a], out, steps="per-token", **VLLM_KW)
    t = read_trace(out)
    assert t.step.tolist() == list(range(14)) and t.pos.tolist() == list(range(14))
    assert set(t.seq.tolist()) == {0} and set(t.phase.tolist()) == {1}
    assert t.meta.steps == "per-token"


def test_vllm_global_counter_drops_leading_run(tmp_path):
    rows = [[7, 6]] * 5 + [[i % 8, (i + 3) % 8] for i in range(10)]
    lines = [{"type": "meta", "model_id": "toy", "top_k": 2, "num_experts": 8}]
    lines += [_route(i, 0, ids) for i, ids in enumerate(rows)]  # token_idx never restarts
    src = _write(tmp_path / "routes.jsonl.gz", "".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o.parquet"
    r = import_vllm([src], out, warmup_min_rows=4, model=ModelOptions(expert_bytes=10))
    t = read_trace(out)
    assert t.num_rows == 10 and t.meta.steps == "per-token" and r.steps == 10
    assert _experts(t)[0] == [0, 3] and t.meta.experts_per_layer == [8]  # from the header


def test_vllm_errors(tmp_path):
    a = _log(tmp_path / "l0.jsonl", 0, _calls(0))
    calls = _calls(1)
    calls[-1] = calls[-1] + [[1, 2]]
    b = _log(tmp_path / "l1.jsonl", 1, calls)
    with pytest.raises(TraceError, match=r"l1.jsonl: layer 1 does not align with layer 0"):
        import_vllm([a, b], tmp_path / "o.parquet", **VLLM_KW)
    calls = _calls(1)
    calls[2] = calls[2] + calls[3][:1]
    calls[3] = calls[3][1:]  # same row count, different call boundaries
    b = _log(tmp_path / "l1.jsonl", 1, calls)
    with pytest.raises(TraceError, match=r"l1.jsonl line \d+: column 'token_idx': layer 1 does"):
        import_vllm([a, b], tmp_path / "o.parquet", **VLLM_KW)
    b = _log(tmp_path / "l1.jsonl", 0, _calls(1))
    with pytest.raises(TraceError, match=r"layer 0 is also in"):
        import_vllm([a, b], tmp_path / "o.parquet", **VLLM_KW)
    bad = _write(tmp_path / "bad.jsonl", '{"type": "meta"}\n{"type": "route", "token_idx": \n')
    with pytest.raises(TraceError, match=r"bad.jsonl: cannot parse as vLLM JSON lines"):
        import_vllm([bad], tmp_path / "o.parquet", **VLLM_KW)
    bad = _write(tmp_path / "bad.jsonl", json.dumps(_route(0, 0, [1, 2, 3])) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl line 1: column 'topk_ids': expected top_k=2"):
        import_vllm([bad], tmp_path / "o.parquet", model=TOY)
    with pytest.raises(ConfigError, match=r"--expert-bytes"):
        import_vllm([a], tmp_path / "o.parquet", max_decode_batch=4, warmup_min_rows=4)


# =========================================================================== generic tables
TABLE_HEADER = ["seq", "pos", "layer", "e0", "e1", "s0", "s1", "tid"]
TABLE_ROWS = [
    [0, 0, 2, 1, 2, 0.5, 0.25, 11], [0, 0, 3, 3, 4, 0.5, 0.25, 11],
    [0, 1, 2, 5, 6, 0.5, 0.25, 12], [0, 1, 3, 7, 0, 0.5, 0.25, 12],
    [1, 0, 2, 0, 1, 0.5, 0.25, 13], [1, 0, 3, 2, 3, 0.5, 0.25, 13],
]  # fmt: skip
TABLE_MAP = Mapping(experts=["e0", "e1"], weights=["s0", "s1"], layer="layer", seq="seq",
                    pos="pos", token_id="tid")  # fmt: skip


def test_table_per_token_and_per_sequence(tmp_path):
    src = _write(tmp_path / "t.csv.gz", _csv(TABLE_ROWS[::-1], TABLE_HEADER))  # any row order
    out = tmp_path / "o.parquet"
    import_table([src], out, TABLE_MAP, model=TOY)
    t = read_trace(out)
    assert t.step.tolist() == [0, 0, 1, 1, 2, 2]
    assert t.layer.tolist() == [0, 1, 0, 1, 0, 1]
    assert t.seq.tolist() == [0, 0, 0, 0, 1, 1]
    assert t.pos.tolist() == [0, 0, 1, 1, 0, 0]
    assert t.phase.tolist() == [1] * 6
    assert _experts(t) == [[1, 2], [3, 4], [5, 6], [7, 0], [0, 1], [2, 3]]
    assert t.weights.tolist() == [0.5, 0.25] * 6
    assert t.token_id.tolist() == [11, 11, 12, 12, 13, 13]
    assert t.meta.layer_ids == [2, 3] and t.meta.steps == "per-token"
    import_table([src], out, TABLE_MAP, model=TOY, steps="per-sequence")
    t = read_trace(out)
    assert t.step.tolist() == [0, 0, 0, 0, 1, 1]
    assert t.layer.tolist() == [0, 0, 1, 1, 0, 1]
    assert t.pos.tolist() == [0, 1, 0, 1, 0, 0]
    assert t.phase.tolist() == [0] * 6 and t.meta.steps == "per-sequence"


def test_table_parquet_lists_step_column_and_phase_inference(tmp_path):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "step": [0, 0, 1, 1],  # step 0: prefill of seq 5 (two tokens); step 1: decode of seq 5
        "s": [5, 5, 5, 5], "p": [0, 1, 2, 2], "L": [0, 0, 0, 1],
        "ex": pa.array([[1, 2], [3, 4], [5, 6], [7, 0]], pa.list_(pa.int32())),
        "txt": ["a", "b", "c", "c"],
    }), src)  # fmt: skip
    out = tmp_path / "o.parquet"
    m = Mapping(experts=["ex"], step="step", seq="s", pos="p", layer="L", token="txt")
    import_table([src], out, m, model=TOY)
    t = read_trace(out, load_text=True)
    assert t.phase.tolist() == [0, 0, 1, 1] and t.meta.steps == "native"
    assert t.token.tolist() == ["a", "b", "c", "c"]
    # CSV list strings, no pos column (order of appearance), a phase column of words
    src = _write(tmp_path / "l.csv", 'layer,ex,ph\n0,"[1, 2]",decode\n0,[3 4],Decode\n')
    import_table([src], out, Mapping(experts=["ex"], layer="layer", phase="ph"), model=TOY)
    t = read_trace(out)
    assert t.pos.tolist() == [0, 1] and _experts(t) == [[1, 2], [3, 4]]
    assert t.phase.tolist() == [1, 1]


def test_table_errors(tmp_path):
    src = _write(tmp_path / "t.csv", _csv(TABLE_ROWS, TABLE_HEADER))
    out = tmp_path / "o.parquet"
    with pytest.raises(TraceError, match=r"t.csv: missing column 'sq' \(named by --seq"):
        import_table([src], out, Mapping(experts=["e0", "e1"], seq="sq"), model=TOY)
    # without --layer both layers' rows of a token collide
    with pytest.raises(TraceError, match=r"t.csv line 3: repeats the \(step, layer, seq, pos\) of"):
        import_table([src], out, Mapping(experts=["e0", "e1"], seq="seq", pos="pos"), model=TOY)
    with pytest.raises(TraceError, match=r"expected top_k=3 experts, got 2"):
        import_table([src], out, TABLE_MAP, model=ModelOptions(
            experts_per_layer=8, top_k=3, expert_bytes=1))  # fmt: skip
    bad = _write(tmp_path / "b.csv", "layer,e0,e1\n0,1,2\n0,1,x\n")
    with pytest.raises(TraceError, match=r"b.csv line 3: column 'e1' \(--experts\): expected int"):
        import_table([bad], out, Mapping(experts=["e0", "e1"], layer="layer"), model=TOY)
    with pytest.raises(ConfigError, match=r"--preset NAME or --experts-per-layer"):
        import_table([src], out, TABLE_MAP)


# =========================================================================== CLI
def test_cli_import_table_and_error(tmp_path, capsys):
    src = _write(tmp_path / "t.csv", _csv(TABLE_ROWS, TABLE_HEADER))
    out = tmp_path / "o.parquet"
    argv = ["import", "table", str(src), "-o", str(out), "--seq", "seq", "--pos", "pos",
            "--layer", "layer", "--experts", "e0,e1", "--weights", "s0,s1", "--token-id", "tid",
            "--experts-per-layer", "8", "--top-k", "2", "--expert-bytes", "1000"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Imported 6 rows (12 expert activations) of 2 sequences in 3 steps" in text
    assert read_trace(out).num_rows == 6
    assert main(argv[:-6] + ["--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim import: error: unknown model preset 'nope'")
    assert err.count("\n") == 1


# =========================================================================== real traces
MB = "deepseek-v2-lite-moe-beyond"


def test_real_moe_beyond_train_subset(tmp_path):
    src = real_path(MB, "puffin-train")
    out = tmp_path / "train.parquet"
    r = import_moe_beyond([src], out, limit=3)
    t = read_trace(out, load_text=True)
    assert sorted(set(t.seq.tolist())) == [1, 2, 3] and r.files == 3
    lines = sum(len(gzip.open(src / f"prompt_{n}_data.csv.gz").read().splitlines()) - 1
                for n in (1, 2, 3))  # fmt: skip
    assert t.num_rows == lines
    assert t.meta.layer_ids == list(range(1, 27)) and t.meta.num_layers == 26
    assert t.meta.model == "deepseek-ai/DeepSeek-V2-Lite-Chat" and t.meta.shared_experts[0] == 2
    assert _experts(t)[0] == [8, 26, 56, 57, 60, 43]  # prompt 1, layer 1, token 0
    assert t.token[0] == "<｜begin▁of▁sentence｜>" and t.token[26] == "How"
    assert t.step[26] == 1 and t.pos[26] == 1 and t.layer[26] == 0


def test_real_moe_beyond_test_and_predicted(tmp_path):
    out = tmp_path / "test.parquet"
    r = import_moe_beyond([real_path(MB, "webglm-test")], out, steps="per-sequence")
    t = read_trace(out)
    assert (r.rows, r.sequences, r.steps) == (40_118, 100, 100) and t.meta.pred_horizons == []
    out = tmp_path / "pred.parquet"
    r = import_moe_beyond([real_path(MB, "webglm-test-predicted")], out)
    t = read_trace(out, load_text=True)
    assert r.rows == 40_118 and t.token is None and t.meta.pred_source == "moe-beyond"
    po, pv = t.preds[1]
    assert _experts(t)[0] == [8, 26, 43, 56, 57, 60]
    assert pv[po[0] : po[1]].tolist() == [8, 26, 43, 56, 57, 60]
    assert pv[po[1] : po[2]].tolist() == [3, 35, 38, 60, 62, 63]  # prompt 1, layer 2, token 0


def test_real_qwen_vllm_five_layers(tmp_path):
    src = real_path("qwen1.5-moe-a2.7b-vllm")
    out = tmp_path / "q.parquet"
    r = import_vllm([src], out)
    t = read_trace(out)
    assert t.meta.layer_ids == [0, 8, 12, 18, 23] and t.meta.experts_per_layer == [60] * 5
    assert t.meta.top_k == 4 and t.meta.extra["preset"] == "qwen1.5-moe-a2.7b"
    assert t.meta.extra["warmup_rows_dropped"] == 8192 + 256
    real = 12_805 - 8_448
    assert t.num_rows == 5 * real and r.steps == 129
    assert int((t.phase == 0).sum()) == 5 * (65 + 1406)
    with gzip.open(src / "moe_layer0.jsonl.gz", "rt") as fh:
        raw = [json.loads(line) for _, line in zip(range(8_450), fh, strict=False)]
    assert _experts(t)[0] == raw[8_449]["topk_ids"]  # first real row (line 8450)
    assert np.allclose(t.weights[:4], raw[8_449]["topk_weights"])
    last = t.step == t.step.max()
    assert int(last.sum()) == 5 * 11 and set(t.phase[last].tolist()) == {1}


def test_real_olmoe_vllm(tmp_path):
    src = real_path("olmoe-1b-7b-vllm-layer0", "moe_routes.jsonl.gz")
    out = tmp_path / "o.parquet"
    r = import_vllm([src], out)
    t = read_trace(out)
    assert t.num_rows == 4_471 and r.steps == 4_471 and t.meta.steps == "per-token"
    assert t.meta.top_k == 8 and t.meta.extra["preset"] == "olmoe-1b-7b"
    with gzip.open(src, "rt") as fh:
        raw = [json.loads(line) for _, line in zip(range(2_050), fh, strict=False)]
    assert _experts(t)[0] == raw[2_049]["topk_ids"]
    import_vllm([src], out, keep_warmup=True)
    assert read_trace(out).num_rows == 6_519


def test_real_flame_table(tmp_path):
    src = real_path("flame-moe-290m", "flame_moe_290m_prefill_2048tok.csv.gz")
    out = tmp_path / "f.parquet"
    argv = ["import", "table", str(src), "-o", str(out), "--preset", "flame-moe-290m",
            "--seq", "seq", "--pos", "pos", "--layer", "layer", "--experts",
            "e0,e1,e2,e3,e4,e5", "--weights", "s0,s1,s2,s3,s4,s5", "--token-id", "token_id",
            "--steps", "per-sequence"]  # fmt: skip
    assert main(argv) == 0
    t = read_trace(out)
    assert t.num_rows == 16_384 and t.meta.layer_ids == list(range(2, 10))
    assert t.num_sequences == 32 and t.num_steps == 32 and set(t.phase.tolist()) == {0}
    assert _experts(t)[0] == [34, 28, 21, 47, 3, 12] and t.token_id[0] == 1512
    assert np.allclose(t.weights[:2], [0.099801, 0.052281])
