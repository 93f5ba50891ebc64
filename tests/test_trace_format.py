"""The trace format: schema round trips, parts, streaming, atomic writes, every validation error
(one line, naming file, column or key and what was expected) and the replay order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import traces.io as tio
from simulator.accesses import NEVER, build_accesses
from traces.errors import TraceError
from traces.format import (
    META_CRC_KEY,
    META_KEY,
    SCHEMA_VERSION,
    TraceMeta,
    arrow_schema,
    meta_crc,
    pred_column,
    pred_horizon,
)
from traces.io import (
    TraceWriter,
    atomic_path,
    iter_batches,
    read_meta,
    read_trace,
    sort_trace,
    trace_from_arrays,
    trace_to_table,
    write_trace,
)
from traces.trace import Trace, _tokens_by_table, tokens_by_sort

ARRAYS = ("step", "seq", "pos", "phase", "layer", "offsets", "experts")


# --------------------------------------------------------------------------- helpers
def make_meta(**kw) -> TraceMeta:
    base = dict(
        model="test/tiny-moe",
        num_layers=2,
        experts_per_layer=[4, 3],
        top_k=None,
        expert_bytes=[1000, 2000],
    )
    base.update(kw)
    return TraceMeta(**base)


def worked_example(meta: TraceMeta | None = None, **optional) -> Trace:
    """The example of docs/trace-format.md: a 2-token prefill of seq 0, then one decode step
    of seqs 0 and 1; 2 layers with 4 and 3 experts; dynamic top-k (one row has no experts)."""
    return trace_from_arrays(
        meta or make_meta(),
        step=[0, 0, 0, 0, 1, 1, 1, 1],
        seq=[0, 0, 0, 0, 0, 1, 0, 1],
        pos=[0, 1, 0, 1, 2, 5, 2, 5],
        phase=[0, 0, 0, 0, 1, 1, 1, 1],
        layer=[0, 0, 1, 1, 0, 0, 1, 1],
        offsets=[0, 2, 4, 5, 7, 8, 10, 10, 11],
        experts=[2, 0, 0, 3, 1, 2, 1, 3, 3, 2, 0],
        **optional,
    )


def full_optional() -> dict:
    """Every optional column for :func:`worked_example` (two prediction horizons)."""
    return dict(
        weights=[0.6, 0.4, 0.7, 0.3, 1.0, 0.5, 0.5, 0.9, 0.8, 0.2, 1.0],
        token_id=[101, 102, 101, 102, 7, 9, 7, 9],
        token=["Hello", " wörld", "Hello", " wörld", "!", "", "!", ""],
        preds={
            1: ([0, 1, 1, 2, 4, 5, 5, 5, 6], [3, 1, 2, 0, 3, 0]),
            3: ([0, 0, 0, 0, 0, 0, 0, 0, 0], []),
        },
    )


def assert_same(a: Trace, b: Trace) -> None:
    """Exactly equal traces: metadata, every array (values and dtypes), optional columns."""
    assert a.meta == b.meta
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in ("weights", "token_id"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.token is None) == (b.token is None)
    if a.token is not None:
        assert list(a.token) == list(b.token)
    assert sorted(a.preds) == sorted(b.preds)
    for h in a.preds:
        for x, y in zip(a.preds[h], b.preds[h], strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def raises_one_line(fn, *fragments: str) -> str:
    """Call ``fn``; it must raise TraceError with a one-line message holding every fragment."""
    with pytest.raises(TraceError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def write_table(path: Path, table: pa.Table, meta_json: str | bytes | None, crc: bool = True):
    """Write ``table`` as Parquet with ``meta_json`` under the key 'moesim' (None: no key)."""
    md = {}
    if meta_json is not None:
        raw = meta_json.encode() if isinstance(meta_json, str) else meta_json
        md[META_KEY] = raw
        if crc:
            md[META_CRC_KEY] = meta_crc(raw)
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


def good_table() -> pa.Table:
    return trace_to_table(worked_example(**full_optional()))


def replace_column(table: pa.Table, name: str, array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, array.type), array)


# --------------------------------------------------------------------------- round trips
def test_round_trip_required_columns_only(tmp_path):
    tr = worked_example()
    write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(tmp_path / "t.parquet")
    assert_same(back, tr)
    assert back.weights is None and back.token_id is None and back.token is None
    assert back.preds == {}
    assert back.path == str(tmp_path / "t.parquet")


def test_round_trip_every_optional_column(tmp_path):
    tr = worked_example(**full_optional())
    write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(tmp_path / "t.parquet", load_text=True)
    assert_same(back, tr)
    assert back.meta.pred_horizons == [1, 3]
    names = pq.ParquetFile(tmp_path / "t.parquet").schema_arrow.names
    assert names[:6] == ["step", "seq", "pos", "phase", "layer", "experts"]
    assert {"weights", "token_id", "token", "pred_h1", "pred_h3"} <= set(names)


def test_read_leaves_token_text_out_unless_asked(tmp_path):
    write_trace(worked_example(**full_optional()), tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet").token is None
    only = read_trace(tmp_path / "t.parquet", columns=["pred_h3"])
    assert only.weights is None and only.token_id is None and sorted(only.preds) == [3]


def test_arrays_are_flat_contiguous_numpy(tmp_path):
    write_trace(worked_example(**full_optional()), tmp_path / "t.parquet")
    tr = read_trace(tmp_path / "t.parquet")
    expected = {"step": np.int64, "seq": np.int64, "pos": np.int32, "phase": np.int8,
                "layer": np.int16, "offsets": np.int64, "experts": np.int16}  # fmt: skip
    for name, dtype in expected.items():
        arr = getattr(tr, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.ndim == 1
        assert arr.flags.c_contiguous, name
    assert tr.weights.dtype == np.float32 and tr.token_id.dtype == np.int32
    assert all(a.dtype in (np.int64, np.int16) for a in tr.preds[1])


def test_per_layer_expert_counts_differ(tmp_path):
    meta = make_meta(num_layers=3, experts_per_layer=[2, 64, 5], expert_bytes=[1, 2, 3])
    tr = trace_from_arrays(
        meta, step=[0, 0, 0], seq=[0, 0, 0], pos=[0, 0, 0], phase=[0, 0, 0], layer=[0, 1, 2],
        offsets=[0, 1, 3, 4], experts=[1, 63, 40, 4],
    )  # fmt: skip
    write_trace(tr, tmp_path / "t.parquet")
    assert_same(read_trace(tmp_path / "t.parquet"), tr)
    # expert 4 is valid in layer 2 (5 experts) but not in layer 0 (2 experts)
    bad = trace_from_arrays(
        meta, step=[0], seq=[0], pos=[0], phase=[0], layer=[0], offsets=[0, 1], experts=[4]
    )
    raises_one_line(lambda: write_trace(bad, tmp_path / "b.parquet"), "0..1 for layer 0")


def test_dynamic_top_k_variable_lengths_and_empty_rows(tmp_path):
    tr = worked_example(make_meta(top_k=None))
    assert 0 in tr.row_lengths() and len(set(tr.row_lengths().tolist())) > 1
    write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(tmp_path / "t.parquet")
    assert back.meta.top_k is None
    np.testing.assert_array_equal(back.row_lengths(), [2, 2, 1, 2, 1, 2, 0, 1])
    assert_same(back, tr)


def test_trace_counts():
    tr = worked_example()
    assert (tr.num_rows, tr.num_activations, tr.num_sequences, tr.num_steps) == (8, 11, 2, 2)
    assert tr.num_tokens == 4
    part = trace_from_arrays(  # token (0, 1) has no row at layer 0
        make_meta(), step=[0, 0, 0], seq=[0, 0, 0], pos=[0, 0, 1], phase=[0, 0, 0],
        layer=[0, 1, 1], offsets=[0, 1, 2, 3], experts=[0, 0, 1],
    )  # fmt: skip
    assert part.num_tokens == 2
    assert tr.summary()["decode_rows"] == 4


def test_token_count_table_equals_sort():
    """The presence-table count of distinct (seq, pos) tokens equals the sort's, and sparse or
    negative ids fall back to the sort."""
    rng = np.random.default_rng(5)
    for n, n_seq, n_pos in [(1, 1, 1), (50, 3, 10), (2000, 40, 300), (500, 500, 5)]:
        seq = rng.integers(0, n_seq, n).astype(np.int64)
        pos = rng.integers(0, n_pos, n).astype(np.int32)
        want = len(set(zip(seq.tolist(), pos.tolist(), strict=True)))
        assert _tokens_by_table(seq, pos) == want == tokens_by_sort(seq, pos)
    seq = np.array([0, 5, 0], np.int64)
    assert _tokens_by_table(seq, np.array([0, 1, 1 << 30], np.int32)) == -1  # sparse positions
    assert _tokens_by_table(np.array([-1, 0], np.int64), np.array([0, 0], np.int32)) == -1
    assert _tokens_by_table(np.array([1 << 40, 0], np.int64), np.array([0, 0], np.int32)) == -1
    tr = worked_example()
    sparse = Trace(**{**tr.__dict__, "seq": tr.seq * (1 << 40)})  # the sort's path
    assert sparse.num_tokens == tr.num_tokens == 4


def test_fixed_top_k_round_trip(tmp_path):
    meta = make_meta(top_k=2)
    tr = trace_from_arrays(
        meta, step=[0, 0], seq=[3, 3], pos=[0, 0], phase=[0, 0], layer=[0, 1],
        offsets=[0, 2, 4], experts=[3, 1, 0, 2], weights=[0.75, 0.25, 0.5, 0.5],
    )  # fmt: skip
    write_trace(tr, tmp_path / "t.parquet")
    assert_same(read_trace(tmp_path / "t.parquet"), tr)


def test_empty_trace_round_trip(tmp_path):
    tr = trace_from_arrays(
        make_meta(), step=[], seq=[], pos=[], phase=[], layer=[], offsets=[0], experts=[]
    )
    write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(tmp_path / "t.parquet")
    assert back.num_rows == 0 and back.offsets.tolist() == [0]
    assert build_accesses(back).num_groups == 0


def test_metadata_round_trip_all_keys(tmp_path):
    meta = TraceMeta(
        model="deepseek-ai/DeepSeek-V2-Lite-Chat",
        num_layers=3,
        experts_per_layer=[64, 64, 32],
        top_k=6,
        expert_bytes=[8_650_752, 8_650_752, 4_325_376],
        shared_experts=[2, 2, 1],
        shared_expert_bytes=8_650_752,
        dtype="float16",
        source="import moe-beyond --steps per-token",
        layer_ids=[1, 2, 5],
        steps="per-token",
        pred_horizons=[],
        pred_source="moe-beyond",
        extra={"prompt_set": "sharegpt", "nested": {"a": [1, 2.5, None]}},
    )
    tr = trace_from_arrays(
        meta, step=[0], seq=[0], pos=[0], phase=[0], layer=[2], offsets=[0, 6],
        experts=[0, 1, 2, 3, 4, 31],
    )  # fmt: skip
    write_trace(tr, tmp_path / "t.parquet")
    assert read_meta(tmp_path / "t.parquet") == meta
    assert read_trace(tmp_path / "t.parquet").meta == meta
    assert TraceMeta.from_json(meta.to_json()) == meta
    assert meta.total_experts == 160 and meta.max_experts == 64


def test_meta_defaults_and_numpy_ints():
    meta = TraceMeta(
        model="m", num_layers=np.int64(3), experts_per_layer=8, top_k=np.int32(2),
        expert_bytes=np.array([5, 5, 5]),
    )  # fmt: skip
    assert meta.num_layers == 3 and type(meta.num_layers) is int
    assert meta.experts_per_layer == [8, 8, 8] and meta.expert_bytes == [5, 5, 5]
    assert meta.shared_experts == [0, 0, 0] and meta.layer_ids == [0, 1, 2]
    assert meta.schema_version == SCHEMA_VERSION and meta.steps == "native"
    meta.validate()
    json.loads(meta.to_json())


def test_pred_column_names():
    assert pred_column(4) == "pred_h4" and pred_horizon("pred_h4") == 4
    assert pred_horizon("pred_h12") == 12
    for name in ("pred_h0", "pred_h01", "pred_h", "pred_hx", "weights", "pred_h١"):
        assert pred_horizon(name) is None, name


def test_arrow_schema_types():
    schema = arrow_schema(make_meta(), ["weights", "token_id", "token", "pred_h2"])
    assert schema.field("experts").type == pa.list_(pa.int16())
    assert schema.field("pred_h2").type == pa.list_(pa.int16())
    assert schema.field("weights").type == pa.list_(pa.float32())
    assert not schema.field("step").nullable
    assert TraceMeta.from_json(schema.metadata[META_KEY]) == make_meta()
    raises_one_line(lambda: arrow_schema(make_meta(), ["bogus"]), "'bogus'")


def test_wider_integer_types_are_accepted(tmp_path):
    """Files from other tools may store ints wider than needed: read if the values fit."""
    table = good_table()
    for name in ("pos", "phase", "layer", "token_id"):
        table = replace_column(table, name, table.column(name).cast(pa.int64()))
    for name in ("experts", "pred_h1"):
        table = replace_column(table, name, table.column(name).cast(pa.large_list(pa.int64())))
    table = replace_column(table, "weights", table.column("weights").cast(pa.list_(pa.float64())))
    path = write_table(tmp_path / "wide.parquet", table, make_meta(pred_horizons=[1, 3]).to_json())
    expected = worked_example(make_meta(pred_horizons=[1, 3]), **full_optional())
    expected.token = None
    assert_same(read_trace(path), expected)


def test_pandas_written_trace(tmp_path):
    """Writing from pandas: build a DataFrame, convert with the schema, attach metadata."""
    import pandas as pd

    meta = make_meta()
    df = pd.DataFrame(
        {
            "step": [0, 0, 1],
            "seq": [0, 0, 0],
            "pos": [0, 0, 1],
            "phase": [0, 0, 1],
            "layer": [0, 1, 0],
            "experts": [[1, 2], [0], [3]],
        }
    )
    table = pa.Table.from_pandas(df, schema=arrow_schema(meta), preserve_index=False)
    with atomic_path(tmp_path / "pd.parquet") as tmp:
        pq.write_table(table, tmp)
    tr = read_trace(tmp_path / "pd.parquet")
    assert tr.experts.tolist() == [1, 2, 0, 3] and tr.offsets.tolist() == [0, 2, 3, 4]
    # a pandas index column is ignored
    df.index = [10, 11, 12]
    pq.write_table(
        pa.Table.from_pandas(df).replace_schema_metadata(arrow_schema(meta).metadata),
        tmp_path / "idx.parquet",
    )
    assert read_trace(tmp_path / "idx.parquet").num_rows == 3


# --------------------------------------------------------------------------- parts, streaming
def split_parts(tr: Trace, folder: Path, cuts: list[int]) -> list[Path]:
    """Write rows [cuts[i], cuts[i+1]) of ``tr`` as folder/part-00i.parquet."""
    folder.mkdir()
    paths = []
    table = trace_to_table(tr)
    bounds = [0, *cuts, tr.num_rows]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        p = folder / f"part-{i:03d}.parquet"
        pq.write_table(table.slice(a, b - a), p)
        paths.append(p)
    return paths


def test_folder_of_parts(tmp_path):
    tr = worked_example(**full_optional())
    split_parts(tr, tmp_path / "parts", [3, 4])
    (tmp_path / "parts" / "README.txt").write_text("not a part")
    back = read_trace(tmp_path / "parts", load_text=True)
    assert_same(back, tr)
    assert read_meta(tmp_path / "parts") == tr.meta


def test_folder_parts_may_order_columns_differently(tmp_path):
    tr = worked_example(**full_optional())
    folder = tmp_path / "parts"
    split_parts(tr, folder, [4])
    second = pq.read_table(folder / "part-001.parquet")
    pq.write_table(second.select(list(reversed(second.column_names))), folder / "part-001.parquet")
    assert_same(read_trace(folder, load_text=True), tr)


def test_folder_parts_are_read_in_name_order_and_checked_across_seams(tmp_path):
    tr = worked_example()
    paths = split_parts(tr, tmp_path / "parts", [4])
    os.replace(paths[0], tmp_path / "parts" / "part-999.parquet")  # step 0 now comes last
    raises_one_line(lambda: read_trace(tmp_path / "parts"), "parts", "sorted by (step, layer")


def test_folder_parts_must_agree(tmp_path):
    tr = worked_example(**full_optional())
    folder = tmp_path / "parts"
    split_parts(tr, folder, [4])
    second = pq.read_table(folder / "part-001.parquet").drop_columns(["weights"])
    pq.write_table(second, folder / "part-001.parquet")
    raises_one_line(lambda: read_trace(folder), "part-001.parquet", "column 'weights'",
                    "part-000.parquet")  # fmt: skip
    other = make_meta(experts_per_layer=[4, 4], pred_horizons=[1, 3])
    write_table(folder / "part-001.parquet", pq.read_table(folder / "part-000.parquet"),
                other.to_json())  # fmt: skip
    raises_one_line(lambda: read_trace(folder), "part-001.parquet", "metadata differs")


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    raises_one_line(lambda: read_trace(tmp_path / "empty"), "empty", "no *.parquet")
    raises_one_line(lambda: read_trace(tmp_path / "nope.parquet"), "nope.parquet", "no such")
    raises_one_line(lambda: read_meta(tmp_path / "nope.parquet"), "nope.parquet")


def test_row_groups_and_iter_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(tio, "ROW_GROUP_ROWS", 3)
    tr = worked_example(**full_optional())
    path = write_trace(tr, tmp_path / "t.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert_same(read_trace(path, load_text=True), tr)
    batches = list(iter_batches(path, rows=2))
    assert all(b.num_rows <= 2 for b in batches)
    streamed = pa.Table.from_batches(batches)
    assert streamed.num_rows == tr.num_rows
    assert streamed.column("experts").to_pylist()[:2] == [[2, 0], [0, 3]]
    assert streamed.column("step").to_pylist() == tr.step.tolist()
    some = list(iter_batches(path, columns=["step", "layer"]))
    assert some[0].schema.names == ["step", "layer"]
    raises_one_line(lambda: list(iter_batches(path, columns=["nope"])), "nope")


def test_iter_batches_over_parts(tmp_path):
    tr = worked_example()
    split_parts(tr, tmp_path / "parts", [2, 5])
    steps = [s for b in iter_batches(tmp_path / "parts") for s in b.column("step").to_pylist()]
    assert steps == tr.step.tolist()


def test_iter_batches_errors(tmp_path):
    path = write_trace(worked_example(), tmp_path / "t.parquet")
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    raises_one_line(lambda: list(iter_batches(tmp_path / "cut.parquet")), "cut.parquet",
                    "Parquet")  # fmt: skip
    write_table(tmp_path / "nometa.parquet", pq.read_table(path), None)
    raises_one_line(lambda: list(iter_batches(tmp_path / "nometa.parquet")), "'moesim'")


# --------------------------------------------------------------------------- sort_trace
def test_sort_trace_restores_replay_order(tmp_path):
    tr = worked_example(**full_optional())
    order = np.array([7, 2, 5, 0, 3, 6, 1, 4])
    shuffled = trace_from_arrays(
        tr.meta,
        step=tr.step[order], seq=tr.seq[order], pos=tr.pos[order], phase=tr.phase[order],
        layer=tr.layer[order],
        offsets=np.concatenate([[0], np.cumsum(tr.row_lengths()[order])]),
        experts=np.concatenate([tr.experts[tr.offsets[i]:tr.offsets[i + 1]] for i in order]),
        weights=np.concatenate([tr.weights[tr.offsets[i]:tr.offsets[i + 1]] for i in order]),
        token_id=tr.token_id[order], token=tr.token[order],
        preds={
            h: (np.concatenate([[0], np.cumsum(np.diff(o)[order])]),
                np.concatenate([v[o[i]:o[i + 1]] for i in order]))
            for h, (o, v) in tr.preds.items()
        },
    )  # fmt: skip
    raises_one_line(lambda: write_trace(shuffled, tmp_path / "x.parquet"), "sorted")
    assert_same(sort_trace(shuffled), tr)
    assert sort_trace(tr) is tr


# --------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = write_trace(worked_example(), tmp_path / "t.parquet")
    before = path.read_bytes()
    bad = worked_example()
    bad.layer[0] = 5
    raises_one_line(lambda: write_trace(bad, path), "t.parquet", "column 'layer'")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = write_trace(worked_example(), tmp_path / "t.parquet")
    before = path.read_bytes()

    def half_then_crash(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tio.pq, "write_table", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_trace(worked_example(**full_optional()), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


def test_atomic_path_context(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["out.bin"]


def test_trace_writer_streams_batches(tmp_path):
    tr = worked_example(**full_optional())
    table = trace_to_table(tr)
    optional = [c for c in table.column_names if c not in ARRAYS]
    path = tmp_path / "w.parquet"
    with TraceWriter(path, tr.meta, optional) as w:
        w.write(table.slice(0, 3))
        w.write(table.slice(3, 2).to_batches()[0])
        w.write({name: table.column(name).slice(5) for name in table.column_names})
        assert not path.exists()
    assert w.rows == tr.num_rows
    assert_same(read_trace(path, load_text=True), tr)
    assert sorted(os.listdir(tmp_path)) == ["w.parquet"]


def test_trace_writer_accepts_traces(tmp_path):
    tr = worked_example()
    with TraceWriter(tmp_path / "w.parquet", tr.meta) as w:
        w.write(tr)
    assert_same(read_trace(tmp_path / "w.parquet"), tr)


def test_trace_writer_abort_and_exceptions(tmp_path):
    tr = worked_example()
    path = write_trace(tr, tmp_path / "t.parquet")
    before = path.read_bytes()
    w = TraceWriter(path, tr.meta)
    w.write(trace_to_table(tr))
    w.abort()
    assert path.read_bytes() == before
    with pytest.raises(KeyError), TraceWriter(path, tr.meta) as w:
        w.write(trace_to_table(tr))
        raise KeyError("caller failed")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]
    raises_one_line(lambda: w.write(trace_to_table(tr)), "after close() or abort()")


def test_trace_writer_validates_on_close(tmp_path):
    tr = worked_example()
    path = write_trace(tr, tmp_path / "t.parquet")
    before = path.read_bytes()
    table = trace_to_table(tr)
    w = TraceWriter(path, tr.meta)
    w.write(table.slice(4))  # step 1 first: the seam between batches is unsorted
    w.write(table.slice(0, 4))
    msg = raises_one_line(w.close, str(path), "sorted by (step, layer, seq, pos)")
    assert ".tmp" not in msg
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


def test_trace_writer_rejects_rows_off_schema(tmp_path):
    tr = worked_example()
    w = TraceWriter(tmp_path / "w.parquet", tr.meta)
    raises_one_line(lambda: w.write(trace_to_table(tr).drop_columns(["layer"])),
                    "w.parquet", "missing column 'layer'", "int16")  # fmt: skip
    bad = replace_column(trace_to_table(tr), "experts", pa.array([["x"]] * tr.num_rows))
    raises_one_line(lambda: w.write(bad), "w.parquet", "trace schema")
    w.abort()
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- validation errors
@pytest.fixture
def good(tmp_path) -> Path:
    return write_trace(worked_example(**full_optional()), tmp_path / "good.parquet")


def test_error_missing_column(tmp_path):
    meta = make_meta(pred_horizons=[1, 3]).to_json()
    for name, typ in [("step", "int64"), ("layer", "int16"), ("experts", "list<int16>")]:
        path = write_table(tmp_path / f"no_{name}.parquet", good_table().drop_columns([name]), meta)
        raises_one_line(lambda p=path: read_trace(p), f"no_{name}.parquet",
                        f"missing column '{name}'", f"expected {typ}")  # fmt: skip


def test_error_expert_out_of_range(tmp_path):
    for value, layer in [(4, 0), (3, 1), (-1, 0)]:
        tr = worked_example()
        row = int(np.flatnonzero(tr.layer == layer)[0])
        tr.experts[tr.offsets[row]] = value
        path = write_trace(tr, tmp_path / "x.parquet", validate=False)
        n = tr.meta.experts_per_layer[layer]
        raises_one_line(lambda p=path: read_trace(p), "x.parquet", "column 'experts'",
                        f"row {row}", f"expected expert ids in 0..{n - 1} for layer {layer}",
                        f"got {value}")  # fmt: skip


def test_error_layer_out_of_range(tmp_path):
    for value in (2, -1):
        tr = worked_example()
        tr.layer[-1] = value
        path = write_trace(tr, tmp_path / "x.parquet", validate=False)
        raises_one_line(lambda p=path: read_trace(p), "x.parquet", "column 'layer'",
                        "expected 0..1", f"got {value}")  # fmt: skip


def test_error_layer_does_not_fit_int16(tmp_path):
    table = replace_column(good_table(), "layer", pa.array([0, 0, 1, 1, 0, 0, 1, 70000]))
    path = write_table(tmp_path / "x.parquet", table, make_meta(pred_horizons=[1, 3]).to_json())
    raises_one_line(lambda: read_trace(path), "x.parquet", "column 'layer'", "fit int16",
                    "70000")  # fmt: skip


def test_error_unsorted_rows(tmp_path):
    tr = worked_example()
    tr.seq[4:6] = [1, 0]  # step 1, layer 0: seq 1 before seq 0
    tr.pos[4:6] = [5, 2]
    path = write_trace(tr, tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "x.parquet", "row 5",
                    "sorted by (step, layer, seq, pos)")  # fmt: skip


def test_error_duplicated_row_same_step(tmp_path):
    tr = worked_example()
    tr.pos[1] = 0  # (step 0, layer 0, seq 0, pos 0) twice
    path = write_trace(tr, tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "x.parquet", "row 1", "duplicated",
                    "(step=0, layer=0, seq=0, pos=0)")  # fmt: skip


def test_error_duplicated_token_layer_in_later_step(tmp_path):
    tr = worked_example()
    tr.pos[4] = 1  # seq 0 pos 1 at layer 0 again in step 1
    path = write_trace(tr, tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "x.parquet", "row 4", "duplicated or out-of-order",
                    "(seq, pos, layer)")  # fmt: skip


def test_error_wrong_dtypes(tmp_path):
    meta = make_meta(pred_horizons=[1, 3]).to_json()
    n = 8
    cases = {
        "layer": (pa.array([0.0] * n), "expected int16, got double"),
        "step": (pa.array(["0"] * n), "expected int64, got string"),
        "phase": (pa.array([False] * n), "expected int8, got bool"),
        "experts": (pa.array([[1.0]] * n), "expected list<int16>, got list<double>"),
        "weights": (pa.array([["a"]] * n), "expected list<float>, got list<string>"),
        "token": (pa.array([1] * n), "expected string, got int64"),
        "pred_h1": (pa.array([1] * n, pa.int16()), "expected list<int16>, got int16"),
    }
    for name, (array, expected) in cases.items():
        path = write_table(tmp_path / f"{name}.parquet", replace_column(good_table(), name, array),
                           meta)  # fmt: skip
        raises_one_line(lambda p=path: read_trace(p), f"{name}.parquet", f"column '{name}'",
                        expected)  # fmt: skip


def test_error_nulls(tmp_path):
    meta = make_meta(pred_horizons=[1, 3]).to_json()
    table = replace_column(good_table(), "seq", pa.array([0, 0, 0, None, 0, 1, 0, 1], pa.int64()))
    path = write_table(tmp_path / "x.parquet", table, meta)
    raises_one_line(lambda: read_trace(path), "column 'seq'", "expected no nulls")
    experts = pa.array([[2, 0], None, [1], [2, 1], [3], [3, 2], [], [0]], pa.list_(pa.int16()))
    path = write_table(tmp_path / "y.parquet", replace_column(good_table(), "experts", experts),
                       meta)  # fmt: skip
    raises_one_line(lambda: read_trace(path), "column 'experts'", "expected no null lists")
    experts = pa.array([[2, None]] + [[0]] * 7, pa.list_(pa.int16()))
    path = write_table(tmp_path / "z.parquet", replace_column(good_table(), "experts", experts),
                       meta)  # fmt: skip
    raises_one_line(lambda: read_trace(path), "column 'experts'", "no null elements")


def test_null_pred_lists_and_token_ids_are_allowed(tmp_path):
    meta = make_meta(pred_horizons=[1, 3]).to_json()
    table = replace_column(good_table(), "pred_h3", pa.array([None] * 8, pa.list_(pa.int16())))
    table = replace_column(table, "token_id", pa.array([None] * 8, pa.int32()))
    tr = read_trace(write_table(tmp_path / "x.parquet", table, meta))
    assert tr.preds[3][0].tolist() == [0] * 9
    assert tr.token_id.tolist() == [-1] * 8


def test_error_unknown_and_duplicated_columns(tmp_path):
    meta = make_meta(pred_horizons=[1, 3]).to_json()
    table = good_table().append_column("colour", pa.array(["red"] * 8))
    path = write_table(tmp_path / "x.parquet", table, meta)
    raises_one_line(lambda: read_trace(path), "x.parquet", "unknown column 'colour'",
                    "expected only step, seq")  # fmt: skip
    table = good_table().append_column("layer", pa.array([0] * 8, pa.int16()))
    path = write_table(tmp_path / "y.parquet", table, meta)
    raises_one_line(lambda: read_trace(path), "y.parquet", "column 'layer'", "one column")


def test_error_pred_columns_disagree_with_metadata(tmp_path):
    path = write_table(tmp_path / "x.parquet", good_table(), make_meta(pred_horizons=[1]).to_json())
    raises_one_line(lambda: read_trace(path), "x.parquet", "column 'pred_h3'", "pred_horizons")


def test_error_pred_ids_out_of_range(tmp_path):
    opt = full_optional()
    opt["preds"][1][1][0] = 9
    path = write_trace(worked_example(**opt), tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "x.parquet", "column 'pred_h1'", "row 0",
                    "expected expert ids in 0..3 for layer 0, got 9")  # fmt: skip


def test_error_weights(tmp_path):
    opt = full_optional()
    opt["weights"][3] = np.nan
    path = write_trace(worked_example(**opt), tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "column 'weights'", "row 1", "finite")
    weights = pa.array([[0.5]] * 8, pa.list_(pa.float32()))  # one weight per row, not per expert
    table = replace_column(good_table(), "weights", weights)
    path = write_table(tmp_path / "y.parquet", table, make_meta(pred_horizons=[1, 3]).to_json())
    raises_one_line(lambda: read_trace(path), "y.parquet", "column 'weights'",
                    "one weight per routed expert")  # fmt: skip


def test_error_top_k_count(tmp_path):
    path = write_trace(worked_example(make_meta(top_k=2)), tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "x.parquet", "column 'experts'", "row 2",
                    "expected top_k=2 experts", "got 1")  # fmt: skip


def test_error_expert_listed_twice(tmp_path):
    tr = worked_example()
    tr.experts[1] = 2
    path = write_trace(tr, tmp_path / "x.parquet", validate=False)
    raises_one_line(lambda: read_trace(path), "column 'experts'", "row 0", "expert 2 listed twice")


def test_error_phase_pos_step(tmp_path):
    for name, value, expected in [("phase", 2, "expected 0 (prefill) or 1 (decode)"),
                                  ("pos", -3, "expected a position >= 0"),
                                  ("step", -1, "expected a step >= 0")]:  # fmt: skip
        tr = worked_example()
        getattr(tr, name)[0] = value
        path = write_trace(tr, tmp_path / f"{name}.parquet", validate=False)
        raises_one_line(lambda p=path: read_trace(p), f"{name}.parquet", f"column '{name}'",
                        "row 0", expected, f"got {value}")  # fmt: skip


def test_error_truncated_file(good):
    data = good.read_bytes()
    for cut in (0, 3, 100, len(data) // 2, len(data) - 1):
        bad = good.with_name(f"cut{cut}.parquet")
        bad.write_bytes(data[:cut])
        raises_one_line(lambda b=bad: read_trace(b), bad.name, "expected a Parquet file")
        raises_one_line(lambda b=bad: read_meta(b), bad.name, "expected a Parquet file")


def test_error_not_parquet(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("step,seq,pos\n0,0,0\n")
    raises_one_line(lambda: read_trace(path), "notes.parquet", "expected a Parquet file")
    raises_one_line(lambda: read_trace(tmp_path), "notes.parquet", "expected a Parquet file")


def test_error_corrupt_data_page_is_detected(good):
    """Pages carry CRCs: a flipped byte inside column data is an error, never wrong data."""
    md = pq.ParquetFile(good).metadata
    col = md.row_group(0).column(5)  # experts
    assert col.path_in_schema.startswith("experts")
    data = bytearray(good.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    end = start + col.total_compressed_size
    data[end - 2] ^= 0xFF
    bad = good.with_name("flip.parquet")
    bad.write_bytes(bytes(data))
    raises_one_line(lambda: read_trace(bad), "flip.parquet", "corrupt")


def test_error_missing_metadata(tmp_path):
    path = write_table(tmp_path / "x.parquet", good_table(), None)
    raises_one_line(lambda: read_trace(path), "x.parquet", "missing metadata key 'moesim'")
    raises_one_line(lambda: read_meta(path), "x.parquet", "missing metadata key 'moesim'")


def test_error_metadata_not_json(tmp_path):
    for text in ("{not json", "", '"a string"', "[1, 2]", b"\xff\xfe{", "[" * 100_000):
        path = write_table(tmp_path / "x.parquet", good_table(), text)
        raises_one_line(lambda p=path: read_meta(p), "x.parquet", "metadata key 'moesim'",
                        "expected")  # fmt: skip


def test_error_metadata_crc(tmp_path):
    raw = make_meta(pred_horizons=[1, 3]).to_json().encode()
    table = good_table().replace_schema_metadata(
        {META_KEY: raw.replace(b"1000", b"1001"), META_CRC_KEY: meta_crc(raw)}
    )
    pq.write_table(table, tmp_path / "x.parquet")
    raises_one_line(lambda: read_meta(tmp_path / "x.parquet"), "x.parquet",
                    "metadata key 'moesim'", "CRC-32")  # fmt: skip


def test_error_metadata_missing_key(tmp_path):
    for key in ("model", "num_layers", "experts_per_layer", "top_k", "expert_bytes"):
        raw = json.loads(make_meta().to_json())
        del raw[key]
        path = write_table(tmp_path / "x.parquet", good_table(), json.dumps(raw))
        raises_one_line(lambda p=path: read_meta(p), "x.parquet", f"missing key '{key}'",
                        "expected")  # fmt: skip


def test_error_metadata_unknown_key_and_newer_version(tmp_path):
    raw = json.loads(make_meta().to_json())
    raw["colour"] = "red"
    path = write_table(tmp_path / "x.parquet", good_table(), json.dumps(raw))
    raises_one_line(lambda: read_meta(path), "x.parquet", "unknown key 'colour'", "expected")
    raw = json.loads(make_meta().to_json())
    raw["schema_version"] = SCHEMA_VERSION + 1
    path = write_table(tmp_path / "y.parquet", good_table(), json.dumps(raw))
    raises_one_line(lambda: read_meta(path), "y.parquet", "metadata key 'schema_version'",
                    "newer moesim")  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model", 7, "a string"),
        ("num_layers", "2", "an integer in 1..32767"),
        ("num_layers", 0, "an integer in 1..32767"),
        ("num_layers", 10**12, "an integer in 1..32767"),
        ("num_layers", True, "an integer"),
        ("experts_per_layer", [4], "a list of 2 integers"),
        ("experts_per_layer", [4, 0], "integers in 1..32767"),
        ("experts_per_layer", [4, 2.5], "a list of 2 integers"),
        ("top_k", 0, "a positive integer or null"),
        ("top_k", 5, "at most experts_per_layer (4)"),
        ("top_k", "2", "a positive integer or null"),
        ("expert_bytes", [1, 0], "positive integers (bytes)"),
        ("expert_bytes", None, "a list of 2 integers"),
        ("shared_experts", [0, -1], "non-negative integers"),
        ("shared_expert_bytes", -5, "a non-negative integer"),
        ("dtype", None, "a string"),
        ("source", ["x"], "a string"),
        ("layer_ids", ["a", "b"], "a list of 2 integers"),
        ("steps", "sometimes", "'native', 'per-token' or 'per-sequence'"),
        ("pred_horizons", [0], "a list of positive integers"),
        ("pred_source", 1, "a string"),
        ("schema_version", "1", "an integer"),
        ("schema_version", 0, "an integer"),
        ("extra", [1], "a JSON object"),
    ],
)
def test_error_metadata_wrong_types(tmp_path, key, value, expected):
    raw = json.loads(make_meta().to_json())
    raw[key] = value
    path = write_table(tmp_path / "x.parquet", good_table(), json.dumps(raw))
    raises_one_line(lambda: read_meta(path), "x.parquet", f"metadata key '{key}'",
                    f"expected {expected}")  # fmt: skip


def test_error_in_memory_trace_shapes(tmp_path):
    tr = worked_example()
    tr.offsets = np.array([0, 2, 1, 5, 7, 8, 10, 10, 11])
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet"), "column 'experts'",
                    "non-decreasing list offsets")  # fmt: skip
    tr = worked_example()
    tr.offsets = tr.offsets[:-1]
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet"), "column 'experts'",
                    "expected 9 list offsets")  # fmt: skip
    tr = worked_example()
    tr.pos = tr.pos[:-1]
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet"), "column 'pos'",
                    "expected 8 rows")  # fmt: skip
    tr = worked_example(preds={2: ([0, 1], [0])})
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet"), "column 'pred_h2'",
                    "expected 9 list offsets")  # fmt: skip


def test_trace_from_arrays_refuses_values_that_do_not_fit():
    kw = dict(step=[0], seq=[0], pos=[0], phase=[0], layer=[65536], offsets=[0, 0], experts=[])
    raises_one_line(lambda: trace_from_arrays(make_meta(), **kw), "column 'layer'", "int16",
                    "65536")  # fmt: skip
    kw.update(layer=[0.5])
    raises_one_line(lambda: trace_from_arrays(make_meta(), **kw), "column 'layer'", "integers")
    kw.update(layer=[1.0])
    assert trace_from_arrays(make_meta(), **kw).layer.tolist() == [1]


def test_error_unconvertible_columns_on_write(tmp_path):
    tr = worked_example(token=[1, 2, 3, 4, 5, 6, 7, 8])  # token text must be strings
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet"), "x.parquet",
                    "column 'token'", "cannot convert")  # fmt: skip
    tr = worked_example()
    tr.layer = tr.layer.astype(np.int64)
    tr.layer[0] = 70000
    raises_one_line(lambda: write_trace(tr, tmp_path / "x.parquet", validate=False),
                    "column 'layer'", "cannot convert")  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_error_list_values_do_not_fit(tmp_path):
    experts = pa.array([[2, 0], [0, 3], [1], [2, 1], [3], [3, 2], [], [70000]])
    table = replace_column(good_table(), "experts", experts)
    path = write_table(tmp_path / "x.parquet", table, make_meta(pred_horizons=[1, 3]).to_json())
    raises_one_line(lambda: read_trace(path), "x.parquet", "column 'experts'",
                    "expected values that fit int16, got 70000 at index 10")  # fmt: skip


# --------------------------------------------------------------------------- replay order
def test_build_accesses_worked_example():
    """The example of docs/trace-format.md, worked by hand."""
    acc = build_accesses(worked_example())
    # objects: layer 0 experts 0..3 are objects 0..3, layer 1 experts 0..2 are objects 4..6
    assert acc.layer_base.tolist() == [0, 4, 7]
    assert acc.obj_layer.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert acc.obj_expert.tolist() == [0, 1, 2, 3, 0, 1, 2]
    # groups (step, layer) in order: (0,0) (0,1) (1,0) (1,1)
    assert acc.group_step.tolist() == [0, 0, 1, 1]
    assert acc.group_layer.tolist() == [0, 1, 0, 1]
    assert acc.group_offsets.tolist() == [0, 3, 5, 7, 8]
    assert acc.group_prefill.tolist() == [2, 2, 0, 0]
    assert acc.group_decode.tolist() == [0, 0, 2, 2]
    assert acc.row_group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # step 0 layer 0: tokens [2,0] and [0,3] -> 2, 0, 3 (first appearance), 0 used by both
    # step 0 layer 1: [1] and [2,1] -> 1, 2 = objects 5, 6; 1 used twice
    # step 1 layer 0: [3] and [3,2] -> 3, 2;  step 1 layer 1: [] and [0] -> object 4
    assert acc.obj.tolist() == [2, 0, 3, 5, 6, 3, 2, 4]
    assert acc.count.tolist() == [1, 2, 1, 2, 1, 2, 1, 1]
    assert acc.next_use().tolist() == [6, NEVER, 5, NEVER, NEVER, NEVER, NEVER, NEVER]
    assert acc.access_group().tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert (acc.num_objects, acc.num_accesses, acc.num_groups) == (7, 8, 4)
