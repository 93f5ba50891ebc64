"""``moesim export``: the oracleGeneral and CSV files hold exactly the replay order.

The expected replay order is rebuilt here from the trace rows in plain Python (a group is a
(step, layer); its accesses are the union of its tokens' experts in order of first
appearance), independently of simulator.accesses.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import real_path

import simulator.export as export_mod
from simulator.engine import prepare
from simulator.export import export, oracle_general_records
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import read_trace, trace_from_arrays, write_trace

REPO = Path(__file__).resolve().parents[1]

# libCacheSim's oracleGeneral record, written out independently of simulator.export.
RECORD = np.dtype(
    [("time", "<u4"), ("obj_id", "<u8"), ("size", "<u4"), ("next_access", "<i8")], align=False
)


def replay_order(tr):
    """(group, step, layer, expert, obj_id, tokens) of every access, from the rows."""
    base = np.concatenate([[0], np.cumsum(tr.meta.experts_per_layer)])
    out = []  # [group, step, layer, expert, obj, tokens]
    key = None
    group = -1
    where: dict[int, int] = {}
    for i in range(len(tr.step)):
        k = (int(tr.step[i]), int(tr.layer[i]))
        if k != key:
            key, group, where = k, group + 1, {}
        for e in tr.experts[tr.offsets[i] : tr.offsets[i + 1]].tolist():
            if e in where:
                out[where[e]][5] += 1
            else:
                where[e] = len(out)
                out.append([group, k[0], k[1], e, int(base[k[1]]) + e, 1])
    return out


def next_access(objs):
    """Index of each access's object's next access, -1 for never (brute force)."""
    nxt = []
    for i, o in enumerate(objs):
        later = [j for j in range(i + 1, len(objs)) if objs[j] == o]
        nxt.append(later[0] if later else -1)
    return nxt


def hand_trace():
    """2 layers x 4 experts, top-2; step 0 is a batch of two tokens sharing expert 1."""
    meta = TraceMeta(model="hand", num_layers=2, experts_per_layer=4, top_k=2,
                     expert_bytes=1000)  # fmt: skip
    return trace_from_arrays(
        meta,
        step=[0, 0, 0, 0, 1, 1],
        layer=[0, 0, 1, 1, 0, 1],
        seq=[0, 1, 0, 1, 0, 0],
        pos=[0, 0, 0, 0, 1, 1],
        phase=[0, 0, 0, 0, 1, 1],
        offsets=[0, 2, 4, 6, 8, 10, 12],
        experts=np.array([3, 1, 1, 2, 0, 3, 3, 0, 1, 0, 2, 3]),
    )


def test_oracle_general_hand_worked_bytes(tmp_path):
    # group 0 (step 0, layer 0): experts 3, 1, 2 -> objects 3, 1, 2 (expert 1 twice)
    # group 1 (step 0, layer 1): experts 0, 3    -> objects 4, 7 (both twice)
    # group 2 (step 1, layer 0): experts 1, 0    -> objects 1, 0
    # group 3 (step 1, layer 1): experts 2, 3    -> objects 6, 7
    want = [(0, 3, -1), (0, 1, 5), (0, 2, -1), (1, 4, -1), (1, 7, 8), (2, 1, -1), (2, 0, -1),
            (3, 6, -1), (3, 7, -1)]  # fmt: skip
    path = export(prepare(hand_trace()), tmp_path / "h.oracleGeneral", "oracle-general")
    raw = path.read_bytes()
    assert raw == b"".join(struct.pack("<IQIq", t, o, 1, n) for t, o, n in want)
    assert len(raw) == 24 * len(want)


def test_csv_hand_worked(tmp_path):
    path = export(prepare(hand_trace()), tmp_path / "h.csv", "csv")
    df = pd.read_csv(path)
    assert list(df.columns) == ["group", "step", "layer", "expert", "obj_id", "tokens"]
    assert df.values.tolist() == [
        [0, 0, 0, 3, 3, 1], [0, 0, 0, 1, 1, 2], [0, 0, 0, 2, 2, 1],
        [1, 0, 1, 0, 4, 2], [1, 0, 1, 3, 7, 2],
        [2, 1, 0, 1, 1, 1], [2, 1, 0, 0, 0, 1],
        [3, 1, 1, 2, 6, 1], [3, 1, 1, 3, 7, 1],
    ]  # fmt: skip


CASES = [
    dict(layers=3, experts=6, top_k=2, steps="native", batch=2),
    dict(layers=3, experts=6, top_k=2, steps="per-token", batch=1),
    dict(layers=2, experts=[4, 9], top_k=3, steps="native", batch=3, skew=0.3),
    dict(layers=4, experts=5, top_k=1, steps="native", batch=1, skew=1.5),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_oracle_general_round_trips(case, tmp_path):
    rng = np.random.default_rng(40 + case)
    tr = random_trace(rng, sequences=4, prefill=3, decode=4, **CASES[case])
    prep = prepare(tr)
    path = export(prep, tmp_path / "t.oracleGeneral", "oracle-general")
    got = np.fromfile(path, RECORD)
    order = replay_order(tr)
    objs = [r[4] for r in order]
    assert path.stat().st_size == 24 * len(order)
    assert got["obj_id"].tolist() == objs
    assert got["time"].tolist() == [r[0] for r in order]
    assert got["size"].tolist() == [1] * len(order)
    assert got["next_access"].tolist() == next_access(objs)
    assert np.array_equal(got, oracle_general_records(prep))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_csv_round_trips(case, tmp_path):
    rng = np.random.default_rng(40 + case)
    tr = random_trace(rng, sequences=4, prefill=3, decode=4, **CASES[case])
    path = export(prepare(tr), tmp_path / "t.csv", "csv")
    df = pd.read_csv(path)
    assert df.values.tolist() == replay_order(tr)
    assert int(df["tokens"].sum()) == tr.num_activations


def test_python_api_rejects_unknown_format(tmp_path):
    out = tmp_path / "x.bin"
    with pytest.raises(ConfigError, match="--format.*oracle-general"):
        export(prepare(hand_trace()), out, "parquet")
    assert not out.exists()


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fmt", ["oracle-general", "csv"])
def test_failed_export_leaves_the_old_file_and_no_temporary(fmt, tmp_path, monkeypatch):
    prep = prepare(hand_trace())
    out = tmp_path / "out"
    out.write_bytes(b"old contents")

    def half_write(path, *args, **kwargs):  # writes part of the output, then fails
        Path(path).write_bytes(b"partial")
        raise _Boom("disk full")

    if fmt == "oracle-general":
        real = export_mod.oracle_general_records

        class Records(np.ndarray):
            def tofile(self, path, *args, **kwargs):
                half_write(path)

        monkeypatch.setattr(export_mod, "oracle_general_records",
                            lambda p: real(p).view(Records))  # fmt: skip
    else:
        monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, path, **kw: half_write(path))
    with pytest.raises(_Boom):
        export(prep, out, fmt)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["oracle-general", "csv"])
def test_export_replaces_atomically_with_normal_permissions(fmt, tmp_path):
    out = tmp_path / "sub" / "out"  # the folder is created
    export(prepare(hand_trace()), out, fmt)
    first = out.read_bytes()
    export(prepare(hand_trace()), out, fmt)  # overwrite in place
    assert out.read_bytes() == first
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# ------------------------------------------------------------------ command line


def moesim(*args, cwd):
    """Run the CLI in a fresh process on the tree under test (as the `moesim` script does)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "simulator.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_export_writes_both_formats(tmp_path):
    tr = hand_trace()
    src = write_trace(tr, tmp_path / "t.parquet")
    r = moesim("export", src, "-o", tmp_path / "t.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 9 accesses (oracle-general)" in r.stdout
    prep = prepare(read_trace(src))
    assert np.array_equal(np.fromfile(tmp_path / "t.bin", RECORD), oracle_general_records(prep))
    r = moesim("export", src, "--format", "csv", "-o", tmp_path / "t.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(tmp_path / "t.csv").values.tolist() == replay_order(tr)


def test_cli_export_errors_cleanly(tmp_path):
    src = write_trace(hand_trace(), tmp_path / "t.parquet")
    out = tmp_path / "out.bin"
    bad_format = moesim("export", src, "--format", "parquet", "-o", out, cwd=tmp_path)
    assert bad_format.returncode == 2
    assert "invalid choice: 'parquet'" in bad_format.stderr
    assert "oracle-general" in bad_format.stderr
    missing = tmp_path / "missing.parquet"
    no_trace = moesim("export", missing, "-o", out, cwd=tmp_path)
    assert no_trace.returncode == 2
    assert no_trace.stderr.strip() == f"moesim export: error: {missing}: no such trace file"
    (tmp_path / "junk.parquet").write_text("not a parquet file")
    junk = moesim("export", tmp_path / "junk.parquet", "-o", out, cwd=tmp_path)
    assert junk.returncode == 2
    assert junk.stderr.startswith("moesim export: error: ")
    assert len(junk.stderr.strip().splitlines()) == 1
    no_output = moesim("export", src, cwd=tmp_path)
    assert no_output.returncode == 2 and "-o/--output" in no_output.stderr
    for r in (bad_format, no_trace, junk, no_output):
        assert "Traceback" not in r.stderr
        assert r.stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.parquet", "t.parquet"]


@pytest.mark.real
def test_real_webglm_export_is_consistent(tmp_path):
    """On the real test set: every next-access index points at the same object, later on."""
    from traces.importers import import_moe_beyond

    src = real_path("deepseek-v2-lite-moe-beyond", "webglm-test")
    import_moe_beyond([src], tmp_path / "w.parquet", jobs=1)
    prep = prepare(read_trace(tmp_path / "w.parquet"))
    path = export(prep, tmp_path / "w.oracleGeneral", "oracle-general")
    rec = np.fromfile(path, RECORD)
    n = len(rec)
    assert n == prep.acc.num_accesses == 240_708
    idx = np.arange(n)
    has = rec["next_access"] >= 0
    assert np.all(rec["next_access"][has] > idx[has])
    assert np.array_equal(rec["obj_id"][rec["next_access"][has]], rec["obj_id"][has])
    # each object's last access says never; so exactly one -1 per distinct object
    assert int((~has).sum()) == len(np.unique(rec["obj_id"]))
    assert np.all(np.diff(rec["time"].astype(np.int64)) >= 0)
    assert int(rec["obj_id"].max()) < 26 * 64
