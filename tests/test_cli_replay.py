"""`moesim replay`, `moesim demo` and the configuration: what a user types and reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator.cli import main
from simulator.config import SimConfig, apply_overrides, load_config
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.io import write_trace

REPO = Path(__file__).resolve().parents[1]
KEYS = {"policy", "cache_slots", "accesses", "hits", "misses", "hit_rate", "stall_s", "kernel_s"}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "t.parquet"
    write_trace(random_trace(np.random.default_rng(1), layers=3, experts=8, top_k=2), path)
    return str(path)


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_lines_one_per_policy_and_bandwidth(capsys, trace_path):
    code, out, _ = _run(capsys, "replay", trace_path, "--policy", "lru", "--policy", "belady",
                        "--cache-slots", "6", "--bandwidth-gbps", "10", "20", "--json")  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["policy"], r["bandwidth_gbps"]) for r in rows] == [
        ("lru", 10), ("lru", 20), ("belady", 10), ("belady", 20)]  # fmt: skip
    for r in rows:
        assert KEYS <= set(r)
        assert (
            r["cache_slots"] == 6 and r["hits"] + r["misses"] + r["inflight_hits"] == r["accesses"]
        )
    assert rows[0]["stall_s"] > rows[1]["stall_s"]  # a faster link stalls less
    assert rows[2]["misses"] <= rows[0]["misses"]  # Belady is a lower bound


def test_same_inputs_same_json(capsys, trace_path):
    args = ("replay", trace_path, "--policy", "lfu", "--cache-fraction", "0.3", "--json")
    a = json.loads(_run(capsys, *args)[1])
    b = json.loads(_run(capsys, *args)[1])
    a.pop("kernel_s"), b.pop("kernel_s")
    assert a == b


def test_table_output(capsys, trace_path):
    code, out, _ = _run(capsys, "replay", trace_path, "--cache-slots", "6", "--mode", "count")
    assert code == 0
    assert "hit rate" in out and "belady" in out and "lru" in out  # the config's policies


def test_events_csv(capsys, trace_path, tmp_path):
    ev = tmp_path / "ev.csv"
    code, _, _ = _run(capsys, "replay", trace_path, "--policy", "lru", "--cache-slots", "6",
                      "--events", str(ev))  # fmt: skip
    assert code == 0
    df = pd.read_csv(ev)
    assert {"kind", "start_s", "end_s", "layer", "expert", "policy"} <= set(df.columns)
    assert set(df["kind"]) >= {"dense", "compute", "demand"}
    assert (df["end_s"] >= df["start_s"]).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-slots", "0"], "cache.slots: expected at least 1 slot"),
        (["--cache-slots", "1"], "fewer than top_k=2"),
        (["--cache-slots", "999"], "exceed the trace's 24 experts"),
        (["--cache-fraction", "1.5"], "cache.fraction: expected a fraction"),
        (["--cache-slots", "6", "--bandwidth-gbps", "-1"], "--bandwidth-gbps: expected > 0"),
        (["--cache-slots", "6", "--policy", "nope"], "unknown policy 'nope'"),
        (["--cache-slots", "6", "--engines", "0"], "link.engines: expected at least 1"),
        (["--cache-slots", "6", "--prefetch", "trace"], "needs column 'pred_h1'"),
        (["--cache-slots", "6", "--mode", "count", "--events", "x.csv"], "timed mode only"),
        (["--cache-slots", "6", "--pin", "7:0"], "no expert '7:0'"),
        (["--cache-slots", "6", "--set", "link.speed=3"], "unknown key 'link.speed'"),
        (["--cache-slots", "6", "--free-prefetch"], "needs --mode count and a --prefetch"),
    ],
)
def test_bad_configuration_is_one_line(capsys, trace_path, args, message):
    code, out, err = _run(capsys, "replay", trace_path, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_trace_is_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "replay", str(tmp_path / "nope.parquet"), "--cache-slots", "6")
    assert code == 2 and "no such trace file" in err and len(err.strip().splitlines()) == 1


def test_sim_toml_is_the_default_configuration():
    assert load_config(REPO / "sim.toml") == SimConfig()


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nslots = 'many'\nfraction = 0.1\n")
    with pytest.raises(ConfigError, match=r"cache.slots: expected int or null, got 'many'"):
        load_config(bad)
    bad.write_text("[cache]\nsize = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'cache.size'"):
        load_config(bad)
    bad.write_text("[gpu]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[gpu\]"):
        load_config(bad)
    bad.write_text("[cache\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    cfg = SimConfig()
    cfg.cache.slots = 4
    with pytest.raises(ConfigError, match="set exactly one of"):
        cfg.validate()


def test_overrides_use_toml_values():
    cfg = apply_overrides(SimConfig(), ["link.bandwidth_gbps=50", "replay.policies=['fifo']",
                                        "replay.mode=count"])  # fmt: skip
    assert cfg.link.bandwidth_gbps == 50.0
    assert cfg.replay.policies == ["fifo"]
    assert cfg.replay.mode == "count"
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(SimConfig(), ["bandwidth=3"])


def test_demo_on_the_bundled_sample(capsys, tmp_path):
    code, out, _ = _run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0
    assert "belady" in out and "hit rate" in out
    png = tmp_path / "hit_rate.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "replay", "export", "import", "synth", "stats"):
        assert cmd in out


def test_free_prefetch_flag(capsys, trace_path):
    args = ["--policy", "lru", "--cache-slots", "6", "--mode", "count", "--prefetch", "oracle"]
    code, out, _ = _run(capsys, "replay", trace_path, *args, "--free-prefetch", "--json")
    r = json.loads(out)
    assert code == 0 and r["prefetch"] == "free-oracle"
    assert r["hits"] == r["accesses"] and r["bytes_moved"] == 0
