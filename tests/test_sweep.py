"""`moesim sweep`: the grid, the results table, resuming, local processes and a Dask cluster."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from simulator.cli import main
from simulator.config import SimConfig, apply_overrides, load_config
from simulator.engine import prepare, run
from simulator.lru_curve import stack_profile
from simulator.sweep import PARAM_COLUMNS, expand, resolve_traces, run_sweep
from tests.helpers import random_trace
from traces.errors import ConfigError
from traces.io import read_trace, write_trace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traces")
    paths = []
    for seed in (1, 2):
        p = folder / f"t{seed}.parquet"
        write_trace(random_trace(np.random.default_rng(seed), layers=3, experts=8, top_k=2,
                                 sequences=4, batch=2), p)  # fmt: skip
        paths.append(str(p))
    return paths


def _grid(traces) -> SimConfig:
    """Two traces x (count: lru, fifo) + (timed: lru, fifo x none, oracle h1, h2 x 2 GB/s) x
    3 sizes: 2 x 3 x (2 + 2 x 3 x 2) = 84 runs."""
    cfg = SimConfig()
    apply_overrides(cfg, [
        f"traces.paths={traces!r}", "replay.policies=['lru','fifo']",
        "cache.slots_list=[4,8,12]", "sweep.modes=['count','timed']",
        "sweep.prefetchers=['none','oracle']", "sweep.horizons=[1,2]",
        "sweep.bandwidths_gbps=[10.0,40.0]",
    ])  # fmt: skip
    return cfg.validate()


def _table(path, drop=("kernel_s",)):
    return pq.read_table(path).drop_columns(list(drop))


def test_grid_crosses_only_the_axes_that_apply(traces):
    cfg = _grid(traces)
    points = expand(cfg, traces)
    assert len(points) == 84 and len(set(points)) == 84
    count = [p for p in points if p.mode == "count"]
    assert len(count) == 2 * 2 * 3  # no prefetcher, no bandwidth in count mode
    assert {(p.prefetch, p.horizon, p.bandwidth_gbps) for p in count} == {("none", 0, None)}
    timed = [p for p in points if p.mode == "timed"]
    assert {(p.prefetch, p.horizon) for p in timed} == {("none", 0), ("oracle", 1), ("oracle", 2)}
    cfg.sweep.free_prefetch = True
    assert len(expand(cfg, traces)) == 84 + 2 * 2 * 2 * 3  # count x free oracle h1, h2


def test_rows_equal_direct_runs(traces, tmp_path):
    cfg = _grid(traces)
    s = run_sweep(cfg, out=tmp_path / "out", workers=1, quiet=True)
    assert (s.total, s.skipped, s.ran) == (84, 0, 84)
    # count-mode LRU by one pass where every step-layer fits (atomic access), else replayed
    kmax = {t: int(stack_profile(prepare(read_trace(t)), "global", "atomic").kmax[0])
            for t in traces}  # fmt: skip
    assert s.one_pass == sum(n >= kmax[t] for t in traces for n in (4, 8, 12)) >= 2
    df = pd.read_parquet(s.results)
    assert len(df) == 84 and df["run_key"].is_unique
    prep = prepare(read_trace(traces[1]))
    some = df[(df.trace == traces[1]) & (df.cache_slots == 8)]
    assert len(some) == 14
    for row in some.to_dict("records"):
        c = copy.deepcopy(cfg)
        c.cache.slots_list, c.cache.slots, c.cache.fraction = [], 8, None
        c.replay.mode, c.replay.prefetch = row["mode"], row["prefetch"]
        c.replay.horizon = max(1, row["horizon"])
        if row["mode"] == "timed":
            c.link.bandwidth_gbps = row["bandwidth_gbps"]
            assert row["latency_s"] == c.link.latency_s and row["engines"] == 1
        else:
            assert pd.isna(row["bandwidth_gbps"]) and pd.isna(row["stall_s"])
        rec = run(prep, c, row["policy"])
        assert set(rec) - {"_events"} <= set(row)
        for k, v in rec.items():
            if k in ("kernel_s", "trace"):
                continue
            got = row[k]
            if isinstance(v, list):
                np.testing.assert_array_equal(np.asarray(got, float), np.asarray(v, float))
            elif v is None:
                assert got is None or pd.isna(got), k
            else:
                assert got == v, k
        one = (row["mode"], row["policy"]) == ("count", "lru") and 8 >= kmax[traces[1]]
        method = "one-pass" if one else "replay"
        assert row["method"] == method
    assert set(PARAM_COLUMNS) <= set(df.columns)
    order = df[df.trace == traces[0]]
    assert order.cache_slots.tolist()[:3] == [4, 8, 12]  # grid order, sizes innermost


def test_resume_runs_only_missing_points(traces, tmp_path):
    cfg = _grid(traces)
    full = run_sweep(cfg, out=tmp_path / "full", workers=1, quiet=True)

    class Stop(Exception):
        pass

    stored = []

    def interrupt(rows):
        stored.append(len(rows))
        if len(stored) == 3:
            raise Stop

    out = tmp_path / "cut"
    with pytest.raises(Stop):
        run_sweep(cfg, out=out, workers=1, quiet=True, on_part=interrupt)
    assert not (out / "results.parquet").exists()
    assert len(list((out / "parts").glob("part-*.parquet"))) == 3
    again = run_sweep(cfg, out=out, workers=1, quiet=True)
    assert again.skipped == sum(stored) and again.ran == 84 - sum(stored)
    assert _table(again.results).equals(_table(full.results))
    assert run_sweep(cfg, out=out, workers=1, quiet=True).ran == 0
    assert run_sweep(cfg, out=out, workers=1, quiet=True, fresh=True).ran == 84


def test_local_processes_give_the_same_table(traces, tmp_path):
    cfg = _grid(traces)
    one = run_sweep(cfg, out=tmp_path / "one", workers=1, quiet=True)
    two = run_sweep(cfg, out=tmp_path / "two", workers=2, quiet=True)
    assert _table(two.results).equals(_table(one.results))


@pytest.mark.slow  # about 10 s: starting the cluster and its two worker processes
def test_dask_local_cluster(traces, tmp_path):
    distributed = pytest.importorskip("distributed")
    cfg = _grid(traces)
    cfg.sweep.modes = ["count", "timed"]
    cfg.cache.slots_list = [4, 12]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:  # fmt: skip
        on_dask = run_sweep(cfg, out=tmp_path / "dask", cluster=cluster.scheduler_address,
                            quiet=True)  # fmt: skip
    here = run_sweep(cfg, out=tmp_path / "here", workers=1, quiet=True)
    assert on_dask.ran == here.ran == 56
    assert _table(on_dask.results).equals(_table(here.results))


def test_cli_writes_results_and_resolved_config(traces, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_file = tmp_path / "my.toml"
    cfg_file.write_text(
        f'[traces]\npaths = ["{Path(traces[0]).parent}/t*.parquet"]\n'
        "[cache]\nslots_list = [4, 8]\n"
        '[replay]\npolicies = ["lru", "belady"]\naccess = "sequential"\n'
        '[sweep]\nprefetchers = ["none"]\n'
    )
    code = main(["sweep", str(cfg_file), "--set", "sweep.modes=['count']", "-o", "res",
                 "--quiet", "--workers", "1"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "sweep: 8 runs" in out and "4 of them by the one-pass LRU curve" in out
    df = pd.read_parquet(tmp_path / "res" / "results.parquet")
    assert sorted(set(df.trace)) == traces and len(df) == 8
    saved = load_config(tmp_path / "res" / "config.toml")
    assert saved.traces.paths == traces and saved.sweep.modes == ["count"]
    assert saved.cache.fractions == [] and saved.cache.slots_list == [4, 8]
    assert main(["sweep", str(tmp_path / "res" / "config.toml"), "-o", "res", "-q"]) == 0
    assert "8 found done, 0 run now" in capsys.readouterr().out
    assert main(["sweep", str(cfg_file), "-o", "res", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "8 runs (0 count-mode LRU, for the one-pass curve), 0 already done" in dry


def test_default_configuration_on_the_sample(tmp_path, monkeypatch):
    """sim.toml's sweep: LRU, LFU, Belady, with no prefetching, the oracle, MoE-Infinity and
    the bundled learned predictor (horizon 1), >= 8 sizes."""
    cfg = load_config(REPO / "sim.toml")
    assert len(cfg.cache.fractions) >= 8
    monkeypatch.chdir(tmp_path)  # the sample is found beside the configuration file
    traces = resolve_traces(cfg.traces.paths, REPO)
    assert traces == [str(REPO / "traces" / "sample" / "sample.parquet")]
    points = expand(cfg, traces)
    assert {p.policy for p in points} >= {"lru", "lfu", "belady"}
    pfs = {p.prefetch for p in points}
    assert pfs >= {"none", "oracle", "moe-infinity"}
    assert any(p.startswith("learned:model=") for p in pfs)
    cfg.cache.fractions = [0.3, 0.6]  # two sizes keep the test short
    s = run_sweep(cfg, base_dir=REPO, out=tmp_path / "o", workers=1, quiet=True)
    df = pd.read_parquet(s.results)
    # 3 policies x (no prefetch + 3 prefetchers) x 2 sizes
    assert len(df) == 3 * (1 + 3) * 2 and (df["mode"] == "timed").all()
    best = df[df.prefetch == "none"].groupby("policy")["hit_rate"].min()
    assert best["belady"] >= best["lru"]  # Belady is the bound


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "sweep.modes=['fast']"], "sweep.modes: expected values among count, timed"),
        (["--set", "sweep.prefetchers=['psychic']"], "sweep: replay.prefetch: unknown prefetcher"),
        (["--set", "traces.paths=['nope/*.parquet']"], "'nope/*.parquet' matches no trace"),
        (["--set", "cache.slots_list=[1]"], "fewer than top_k=2"),
        (["--set", "sweep.speed=3"], "unknown key 'sweep.speed'"),
        (["--set", "replay.policies=['nope']"], "unknown policy 'nope'"),
        (["--cluster", "nonsense://x"], "sweep.cluster: cannot reach the Dask scheduler"),
    ],
)
def test_bad_input_is_one_line(traces, tmp_path, capsys, args, message):
    code = main(["sweep", "--set", f"traces.paths={traces[:1]!r}", "--set",
                 "cache.slots_list=[4]", "-o", str(tmp_path / "o"), "-q", "--workers", "1",
                 *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_failing_point_names_itself(traces, tmp_path):
    cfg = _grid(traces)
    cfg.sweep.prefetchers = ["trace"]  # the traces have no pred_h columns
    cfg.sweep.modes = ["timed"]
    with pytest.raises(ConfigError, match=r"t1.parquet: mode=timed .* prefetch=trace horizon=1"):
        run_sweep(cfg, out=tmp_path / "o", workers=1, quiet=True)
