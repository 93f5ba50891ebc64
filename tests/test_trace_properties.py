"""Property tests of the trace format: random valid traces round-trip exactly; random malformed
traces (corrupt or truncated files, dropped columns, wrong types, out-of-range values, shuffled or
duplicated rows, broken metadata) give a one-line TraceError, never another exception and never
a silently different result."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from simulator.accesses import build_accesses, layer_base_of
from traces.errors import TraceError
from traces.format import META_CRC_KEY, META_KEY, TraceMeta, meta_crc
from traces.io import (
    TraceWriter,
    iter_batches,
    read_meta,
    read_trace,
    sort_trace,
    trace_from_arrays,
    trace_to_table,
    write_trace,
)
from traces.trace import Trace

#: Modest by default (the file runs in seconds); MOESIM_PROP_EXAMPLES=2000 for a long fuzz.
SETTINGS = settings(
    max_examples=int(os.environ.get("MOESIM_PROP_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
REQUIRED = ("step", "seq", "pos", "phase", "layer", "experts")
ARRAYS = ("step", "seq", "pos", "phase", "layer", "offsets", "experts")


# --------------------------------------------------------------------------- helpers
@contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="moesim-prop-") as d:
        yield Path(d)


def one_line_error(fn) -> str:
    """``fn`` must raise TraceError (nothing else) with a one-line message; return it."""
    try:
        result = fn()
    except TraceError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return msg
    raise AssertionError(f"no TraceError; got a result: {result!r:.300}")


def assert_same(a: Trace, b: Trace) -> None:
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
            np.testing.assert_array_equal(x, y)


def take_rows(tr: Trace, order) -> Trace:
    """The rows ``order`` of ``tr`` (any order, repeats allowed), every column carried along."""
    order = np.asarray(order, dtype=np.int64)

    def gather(offsets, values):
        parts = [values[offsets[i] : offsets[i + 1]] for i in order]
        lengths = [len(p) for p in parts]
        flat = np.concatenate(parts) if parts else values[:0]
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), flat

    offsets, experts = gather(tr.offsets, tr.experts)
    return trace_from_arrays(
        tr.meta,
        step=tr.step[order], seq=tr.seq[order], pos=tr.pos[order], phase=tr.phase[order],
        layer=tr.layer[order], offsets=offsets, experts=experts,
        weights=None if tr.weights is None else gather(tr.offsets, tr.weights)[1],
        token_id=None if tr.token_id is None else tr.token_id[order],
        token=None if tr.token is None else tr.token[order],
        preds={h: gather(o, v) for h, (o, v) in tr.preds.items()},
    )  # fmt: skip


# --------------------------------------------------------------------------- strategies
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@st.composite
def metas(draw) -> TraceMeta:
    n = draw(st.integers(1, 4))
    epl = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    return TraceMeta(
        model=draw(TEXT),
        num_layers=n,
        experts_per_layer=epl,
        top_k=draw(st.none() | st.integers(1, min(epl))),
        expert_bytes=draw(st.lists(st.integers(1, 2**40), min_size=n, max_size=n)),
        shared_experts=draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
        shared_expert_bytes=draw(st.integers(0, 2**40)),
        dtype=draw(st.sampled_from(["bfloat16", "float16", "float8", "int4"])),
        source=draw(TEXT),
        layer_ids=draw(st.lists(st.integers(0, 200), min_size=n, max_size=n)),
        steps=draw(st.sampled_from(["native", "per-token", "per-sequence"])),
        pred_source=draw(TEXT),
        extra=draw(st.dictionaries(TEXT, st.integers() | TEXT | st.none(), max_size=3)),
    )


@st.composite
def traces(draw, min_rows: int = 0) -> Trace:
    """A random valid trace: prefill chunks and batched decode steps over a few sequences,
    dynamic or fixed top-k, any subset of the optional columns, seq ids up to 2**40."""
    meta = draw(metas())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_steps = draw(st.integers(0 if min_rows == 0 else 1, 6))
    L, epl = meta.num_layers, meta.experts_per_layer
    next_pos: dict[int, int] = {}
    rows = []  # (step, layer, seq, pos, phase)
    step = int(rng.integers(0, 3))
    for _ in range(n_steps):
        if not next_pos or rng.random() < 0.4:  # a prefill chunk of a new or running sequence
            seq = int(rng.choice(list(next_pos))) if next_pos and rng.random() < 0.3 else None
            if seq is None:
                seq = int(rng.integers(0, 2**40))
                next_pos.setdefault(seq, 0)
            tokens = [(seq, next_pos[seq] + i, 0) for i in range(int(rng.integers(1, 5)))]
        else:  # a decode step: one token of each of a few sequences
            batch = rng.choice(list(next_pos), size=min(len(next_pos), int(rng.integers(1, 4))),
                               replace=False)  # fmt: skip
            tokens = [(int(s), next_pos[int(s)], 1) for s in batch]
        for s, p, _ in tokens:
            next_pos[s] = max(next_pos[s], p + 1)
        for layer in range(L):
            for s, p, phase in sorted(tokens):
                if rng.random() < 0.9:  # a few (token, layer) rows missing is allowed
                    rows.append((step, layer, s, p, phase))
        step += int(rng.integers(1, 3))
    assume(len(rows) >= min_rows)
    n = len(rows)
    arr = np.array(rows, dtype=np.int64).reshape(n, 5)
    experts, lengths = [], []
    for _, layer, *_ in rows:
        k = meta.top_k if meta.top_k is not None else int(rng.integers(0, epl[layer] + 1))
        experts.append(rng.permutation(epl[layer])[:k])
        lengths.append(k)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    experts = np.concatenate(experts) if experts else np.zeros(0, np.int16)
    optional = {}
    if draw(st.booleans()):
        optional["weights"] = rng.random(experts.shape[0]).astype(np.float32)
    if draw(st.booleans()):
        optional["token_id"] = rng.integers(-1, 2**31 - 1, n)
    if draw(st.booleans()):
        words = ["", "the", " wörld", "\n", "日本", "🙂", None]
        optional["token"] = [words[i] for i in rng.integers(0, len(words), n)]
    preds = {}
    for h in draw(st.sets(st.sampled_from([1, 2, 3, 8]), max_size=3)):
        plen = rng.integers(0, 4, n)
        ids = [rng.integers(0, epl[arr[i, 1]], plen[i]) for i in range(n)]
        preds[h] = (np.concatenate([[0], np.cumsum(plen)]),
                    np.concatenate(ids) if ids else np.zeros(0))  # fmt: skip
    meta.pred_horizons = sorted(preds)
    return trace_from_arrays(
        meta, step=arr[:, 0], layer=arr[:, 1], seq=arr[:, 2], pos=arr[:, 3], phase=arr[:, 4],
        offsets=offsets, experts=experts, preds=preds, **optional,
    )  # fmt: skip


def written(tr: Trace, d: Path, name: str = "t.parquet") -> Path:
    return write_trace(tr, d / name)


# --------------------------------------------------------------------------- valid traces
@SETTINGS
@given(tr=traces(), data=st.data())
def test_random_traces_round_trip_exactly(tr, data):
    with workdir() as d:
        path = written(tr, d)
        assert_same(read_trace(path, load_text=True), tr)
        assert read_meta(path) == tr.meta
        table = pq.read_table(path)
        # streaming hands back the same rows
        rows = data.draw(st.integers(1, 7), label="batch rows")
        streamed = [b for b in iter_batches(path, rows=rows)]
        assert all(b.num_rows <= rows for b in streamed)
        if streamed:
            assert pa.Table.from_batches(streamed).equals(table)
        # a folder of parts cut anywhere reads back the same trace
        cuts = sorted(data.draw(st.lists(st.integers(0, tr.num_rows), max_size=3), label="cuts"))
        (d / "parts").mkdir()
        bounds = [0, *cuts, tr.num_rows]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            pq.write_table(table.slice(a, b - a), d / "parts" / f"part-{i:03d}.parquet")
        assert_same(read_trace(d / "parts", load_text=True), tr)
        # TraceWriter in batches writes the same trace
        optional = [c for c in table.column_names if c not in REQUIRED]
        with TraceWriter(d / "w.parquet", tr.meta, optional) as w:
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                w.write(table.slice(a, b - a))
        assert_same(read_trace(d / "w.parquet", load_text=True), tr)


@SETTINGS
@given(tr=traces(min_rows=2), seed=st.integers(0, 2**32 - 1))
def test_sort_trace_undoes_any_shuffle(tr, seed):
    order = np.random.default_rng(seed).permutation(tr.num_rows)
    assert_same(sort_trace(take_rows(tr, order)), tr)


def reference_accesses(tr: Trace):
    """build_accesses the slow, obvious way: per (step, layer) group, experts by first
    appearance (row order, then rank) with the number of the group's tokens routed to each."""
    base = layer_base_of(tr.meta.experts_per_layer)
    groups: dict[tuple[int, int], dict[int, int]] = {}
    for i in range(tr.num_rows):
        g = groups.setdefault((int(tr.step[i]), int(tr.layer[i])), {})
        for e in tr.experts[tr.offsets[i] : tr.offsets[i + 1]]:
            obj = int(base[tr.layer[i]] + e)
            g[obj] = g.get(obj, 0) + 1
    return groups


@SETTINGS
@given(tr=traces())
def test_build_accesses_matches_reference(tr):
    acc = build_accesses(tr)
    ref = reference_accesses(tr)
    assert list(zip(acc.group_step.tolist(), acc.group_layer.tolist(), strict=True)) == list(ref)
    for g, counts in enumerate(ref.values()):
        a, b = acc.group_offsets[g], acc.group_offsets[g + 1]
        assert acc.obj[a:b].tolist() == list(counts)
        assert acc.count[a:b].tolist() == list(counts.values())
    nxt = acc.next_use()
    for i, o in enumerate(acc.obj.tolist()):
        later = np.flatnonzero(acc.obj[i + 1 :] == o)
        assert nxt[i] == (i + 1 + later[0] if later.size else np.iinfo(np.int64).max)


# --------------------------------------------------------------------------- corrupt files
@SETTINGS
@given(tr=traces(min_rows=1), data=st.data())
def test_corrupt_bytes_never_pass_silently(tr, data):
    with workdir() as d:
        good = written(tr, d).read_bytes()
        flips = data.draw(
            st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)),
                     min_size=1, max_size=4),
            label="flips",
        )  # fmt: skip
        bad = bytearray(good)
        for i, x in flips:
            bad[i] ^= x
        (d / "bad.parquet").write_bytes(bytes(bad))
        try:
            back = read_trace(d / "bad.parquet", load_text=True)
        except TraceError as exc:
            assert "\n" not in str(exc) and "bad.parquet" in str(exc)
        else:  # only bytes that do not matter (statistics, padding) may be hit
            assert_same(back, tr)


@SETTINGS
@given(tr=traces(), data=st.data())
def test_truncated_file_is_an_error(tr, data):
    with workdir() as d:
        good = written(tr, d).read_bytes()
        cut = data.draw(st.integers(0, len(good) - 1), label="cut")
        (d / "cut.parquet").write_bytes(good[:cut])
        for fn in (read_trace, read_meta, lambda p: list(iter_batches(p))):
            assert "cut.parquet" in one_line_error(lambda f=fn: f(d / "cut.parquet"))


# --------------------------------------------------------------------------- bad columns
def write_table(path: Path, table: pa.Table, meta: TraceMeta | str) -> Path:
    raw = (meta if isinstance(meta, str) else meta.to_json()).encode()
    pq.write_table(table.replace_schema_metadata({META_KEY: raw, META_CRC_KEY: meta_crc(raw)}),
                   path)  # fmt: skip
    return path


@SETTINGS
@given(tr=traces(), data=st.data())
def test_dropped_columns(tr, data):
    table = trace_to_table(tr)
    dropped = data.draw(st.sets(st.sampled_from(table.column_names), min_size=1), label="drop")
    with workdir() as d:
        path = write_table(d / "x.parquet", table.drop_columns(sorted(dropped)), tr.meta)
        if dropped & {*REQUIRED, *(c for c in table.column_names if c.startswith("pred_h"))}:
            msg = one_line_error(lambda: read_trace(path))
            assert "x.parquet" in msg and any(f"column '{c}'" in msg for c in dropped), msg
        else:  # optional columns may be left out
            back = read_trace(path, load_text=True)
            assert back.num_rows == tr.num_rows
            assert all(getattr(back, c) is None for c in dropped)


WRONG_TYPES = {
    "int": [pa.float64(), pa.string(), pa.bool_(), pa.list_(pa.int16()), pa.binary(),
            pa.float16()],
    "ids": [pa.int16(), pa.list_(pa.float64()), pa.list_(pa.string()), pa.string(),
            pa.list_(pa.bool_()), pa.list_(pa.list_(pa.int16()))],
    "weights": [pa.float32(), pa.list_(pa.string()), pa.list_(pa.int64()), pa.string()],
    "token": [pa.int64(), pa.list_(pa.string()), pa.bool_()],
}  # fmt: skip


def kind_of(name: str) -> str:
    if name in ("experts",) or name.startswith("pred_h"):
        return "ids"
    if name in ("weights", "token"):
        return name
    return "int"


def fake_column(typ: pa.DataType, n: int) -> pa.Array:
    """An ``n``-row array of type ``typ`` with harmless-looking values."""
    if pa.types.is_list(typ):
        inner = fake_column(typ.value_type, n)
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), inner)
    if pa.types.is_string(typ):
        return pa.array(["1"] * n, typ)
    if pa.types.is_binary(typ):
        return pa.array([b"1"] * n, typ)
    if pa.types.is_boolean(typ):
        return pa.array([False] * n, typ)
    if pa.types.is_floating(typ):
        return pa.array(np.zeros(n, typ.to_pandas_dtype()), typ)
    return pa.array(np.zeros(n, np.int64)).cast(typ)


@SETTINGS
@given(tr=traces(), data=st.data())
def test_wrong_column_types(tr, data):
    table = trace_to_table(tr)
    name = data.draw(st.sampled_from(table.column_names), label="column")
    typ = data.draw(st.sampled_from(WRONG_TYPES[kind_of(name)]), label="type")
    i = table.schema.get_field_index(name)
    table = table.set_column(i, pa.field(name, typ), fake_column(typ, tr.num_rows))
    with workdir() as d:
        path = write_table(d / "x.parquet", table, tr.meta)
        msg = one_line_error(lambda: read_trace(path, load_text=True))
        assert "x.parquet" in msg and f"column '{name}'" in msg and "expected" in msg, msg
        msg = one_line_error(lambda: list(iter_batches(path)))
        assert f"column '{name}'" in msg


@SETTINGS
@given(tr=traces(min_rows=1), data=st.data())
def test_out_of_range_values(tr, data):
    n, L = tr.num_rows, tr.meta.num_layers
    choices = ["layer", "phase", "pos", "step"]
    if tr.num_activations:
        choices.append("experts")
    choices += [f"pred_h{h}" for h, (o, v) in tr.preds.items() if v.size]
    what = data.draw(st.sampled_from(choices), label="what")
    if what in ("layer", "phase", "pos", "step"):
        row = data.draw(st.integers(0, n - 1), label="row")
        value = {
            "layer": st.integers(-(2**15), -1) | st.integers(L, 2**15 - 1),
            "phase": st.integers(-128, -1) | st.integers(2, 127),
            "pos": st.integers(-(2**31), -1),
            "step": st.integers(-(2**63), -1),
        }[what]
        getattr(tr, what)[row] = data.draw(value, label="value")
    else:
        offsets, ids = (tr.offsets, tr.experts) if what == "experts" else tr.preds[int(what[6:])]
        j = data.draw(st.integers(0, ids.shape[0] - 1), label="index")
        row = int(np.searchsorted(offsets, j, side="right") - 1)
        n_e = tr.meta.experts_per_layer[tr.layer[row]]
        ids[j] = data.draw(st.integers(-(2**15), -1) | st.integers(n_e, 2**15 - 1), label="id")
    with workdir() as d:
        path = write_trace(tr, d / "x.parquet", validate=False)
        msg = one_line_error(lambda: read_trace(path))
        assert "x.parquet" in msg and f"column '{what}'" in msg and f"row {row}" in msg, msg
        assert "expected" in msg


@SETTINGS
@given(tr=traces(min_rows=1), data=st.data())
def test_values_too_wide_for_the_column(tr, data):
    table = trace_to_table(tr)
    name, lo, hi = data.draw(st.sampled_from([("layer", -(2**15), 2**15 - 1),
                                              ("pos", -(2**31), 2**31 - 1),
                                              ("phase", -128, 127)]), label="column")  # fmt: skip
    values = table.column(name).to_numpy().astype(np.int64)
    row = data.draw(st.integers(0, tr.num_rows - 1), label="row")
    values[row] = data.draw(st.integers(hi + 1, 2**62) | st.integers(-(2**62), lo - 1))
    table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    with workdir() as d:
        path = write_table(d / "x.parquet", table, tr.meta)
        msg = one_line_error(lambda: read_trace(path))
        assert f"column '{name}'" in msg and "fit" in msg, msg


# --------------------------------------------------------------------------- bad row order
@SETTINGS
@given(tr=traces(min_rows=2), seed=st.integers(0, 2**32 - 1))
def test_shuffled_rows(tr, seed):
    order = np.random.default_rng(seed).permutation(tr.num_rows)
    assume(not np.array_equal(order, np.arange(tr.num_rows)))
    with workdir() as d:
        path = write_trace(take_rows(tr, order), d / "x.parquet", validate=False)
        msg = one_line_error(lambda: read_trace(path))
        assert "x.parquet" in msg and "sorted by (step, layer, seq, pos)" in msg, msg
        one_line_error(lambda: write_trace(take_rows(tr, order), d / "y.parquet"))
        assert not (d / "y.parquet").exists()


@SETTINGS
@given(tr=traces(min_rows=1), data=st.data())
def test_duplicated_rows(tr, data):
    n = tr.num_rows
    row = data.draw(st.integers(0, n - 1), label="row")
    at = data.draw(st.integers(0, n), label="insert at")
    order = np.insert(np.arange(n), at, row)
    with workdir() as d:
        path = write_trace(take_rows(tr, order), d / "x.parquet", validate=False)
        msg = one_line_error(lambda: read_trace(path))
        assert "x.parquet" in msg
        assert "duplicated" in msg or "sorted by (step, layer, seq, pos)" in msg, msg


# --------------------------------------------------------------------------- bad metadata
def mutate_bytes(data, raw: bytes) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "replace", "insert", "delete"]), label="how")
    i = data.draw(st.integers(0, len(raw) - 1), label="at")
    if how == "truncate":
        return raw[:i]
    if how == "delete":
        return raw[:i] + raw[i + 1 :]
    junk = data.draw(st.binary(min_size=1, max_size=4), label="junk")
    return raw[:i] + junk + raw[i + (1 if how == "replace" else 0) :]


@SETTINGS
@given(tr=traces(), data=st.data())
def test_broken_metadata_json_with_crc(tr, data):
    """Any change to the metadata JSON is caught (JSON error, bad value or CRC mismatch)."""
    raw = tr.meta.to_json().encode()
    bad = mutate_bytes(data, raw)
    assume(bad != raw)
    table = trace_to_table(tr).replace_schema_metadata({META_KEY: bad, META_CRC_KEY: meta_crc(raw)})
    with workdir() as d:
        pq.write_table(table, d / "x.parquet")
        for fn in (read_meta, read_trace):
            msg = one_line_error(lambda f=fn: f(d / "x.parquet"))
            assert "x.parquet" in msg and "metadata" in msg, msg


@SETTINGS
@given(tr=traces(), data=st.data())
def test_broken_metadata_json_without_crc(tr, data):
    """Files from tools that write no CRC: a broken JSON is a TraceError; a JSON that still
    parses must still describe a trace that passes every check, or be a TraceError."""
    bad = mutate_bytes(data, tr.meta.to_json().encode())
    table = trace_to_table(tr).replace_schema_metadata({META_KEY: bad})
    with workdir() as d:
        pq.write_table(table, d / "x.parquet")
        try:
            back = read_trace(d / "x.parquet")
        except TraceError as exc:
            assert "\n" not in str(exc) and "x.parquet" in str(exc)
        else:
            assert back.num_rows == tr.num_rows
            assert np.array_equal(back.experts, tr.experts)


BAD_VALUES = {
    "model": [None, 1, [], {}],
    "num_layers": ["2", 2.5, None, 0, -1, [2], True, 40000, 10**30],
    "experts_per_layer": ["8", None, [], [0], [2.5], [True], [40000], {}, "x" * 100],
    "top_k": ["1", 0, -2, 1.5, True, [1], 40000],
    "expert_bytes": [None, "x", [0], [-5], [1.5], {}],
    "shared_experts": [[-1], "x", [None], 3.5],
    "shared_expert_bytes": [-1, "1", None, 1.5, []],
    "dtype": [None, 1, []],
    "source": [1, ["x"], None],
    "layer_ids": [["a"], "x", None],
    "steps": ["sometimes", 1, None, ["native"]],
    "pred_horizons": [[0], ["1"], 1, None, [-3]],
    "pred_source": [1, None],
    "schema_version": [2, 0, "1", 1.5, None, True, 99],
    "extra": [[1], "x", 1, None],
}


@SETTINGS
@given(tr=traces(), data=st.data())
def test_wrong_metadata_types(tr, data):
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="key")
    value = data.draw(st.sampled_from(BAD_VALUES[key]), label="value")
    raw = json.loads(tr.meta.to_json())
    if key in ("experts_per_layer", "expert_bytes", "shared_experts", "layer_ids") and isinstance(
        value, list
    ):
        value = value * tr.meta.num_layers if value else value  # right length, wrong contents
    raw[key] = value
    with workdir() as d:
        path = write_table(d / "x.parquet", trace_to_table(tr), json.dumps(raw))
        for fn in (read_meta, read_trace):
            msg = one_line_error(lambda f=fn: f(path))
            assert "x.parquet" in msg and f"'{key}'" in msg and "expected" in msg, msg


@SETTINGS
@given(tr=traces(), data=st.data())
def test_missing_or_unknown_metadata_keys(tr, data):
    raw = json.loads(tr.meta.to_json())
    if data.draw(st.booleans(), label="drop a key"):
        key = data.draw(st.sampled_from(["model", "num_layers", "experts_per_layer", "top_k",
                                         "expert_bytes"]), label="key")  # fmt: skip
        del raw[key]
        expect = f"missing key '{key}'"
    else:
        key = data.draw(TEXT.filter(lambda k: k not in raw), label="key")
        raw[key] = 1
        expect = "unknown key"
    with workdir() as d:
        path = write_table(d / "x.parquet", trace_to_table(tr), json.dumps(raw))
        msg = one_line_error(lambda: read_meta(path))
        assert "x.parquet" in msg and expect in msg and "expected" in msg, msg


@pytest.mark.parametrize("payload", [b"", b"null", b"[]", b"\x00\xff", b'{"model": "m"'])
def test_metadata_payloads_that_are_not_objects(tmp_path, payload):
    table = pa.table({"step": pa.array([], pa.int64())})
    pq.write_table(table.replace_schema_metadata({META_KEY: payload}), tmp_path / "x.parquet")
    msg = one_line_error(lambda: read_trace(tmp_path / "x.parquet"))
    assert "'moesim'" in msg and "expected" in msg
