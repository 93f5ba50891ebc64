"""`moesim plot`: the numbers behind every figure equal the results table, files are valid,
colours are fixed per series, bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator.cli import main
from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.figures.curves import curve_data, draw_curves
from simulator.figures.heatmaps import layer_heatmap_data, popularity_data
from simulator.figures.style import POLICY_COLOURS, legend_label, series_style
from simulator.figures.table import Table, apply_filters, normalise, read_results
from simulator.figures.timeline import link_lanes, read_events, timeline_data
from traces.errors import ConfigError
from traces.io import read_trace

SAMPLE = str(Path(__file__).resolve().parents[1] / "traces" / "sample" / "sample.parquet")
FRACTIONS = (0.1, 0.25, 0.5)
BANDWIDTHS = (16.0, 64.0)
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def _rows(prep, mode, fractions, bandwidths, series):
    """Result records as moesim sweep writes them: the record plus the grid columns."""
    rows = []
    for f in fractions:
        for bw in bandwidths:
            for policy, prefetch in series:
                cfg = SimConfig()
                cfg.replay.mode, cfg.cache.fraction, cfg.link.bandwidth_gbps = mode, f, bw
                cfg.replay.prefetch = prefetch
                rec = run(prep, cfg, policy, free_prefetch=mode == "count" and prefetch != "none")
                rec.pop("_events", None)
                rec.update(
                    bandwidth_gbps=bw,
                    latency_s=cfg.link.latency_s,
                    engines=cfg.link.engines,
                    run_key=f"{len(rows)}",
                )
                rows.append(rec)
    return rows


@pytest.fixture(scope="module")
def prep():
    return prepare(read_trace(SAMPLE))


@pytest.fixture(scope="module")
def table_dir(prep, tmp_path_factory):
    """Count rows (bandwidth in the grid: identical per bandwidth) and timed rows at 2 links."""
    base = [("lru", "none"), ("lfu", "none"), ("belady", "none"), ("lru", "oracle")]
    rows = _rows(prep, "count", FRACTIONS, BANDWIDTHS, base)
    rows += _rows(prep, "timed", FRACTIONS, BANDWIDTHS, base)
    d = tmp_path_factory.mktemp("sweep")
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    return d


@pytest.fixture(scope="module")
def table(table_dir):
    return read_results(table_dir)


def _cli(capsys, *argv):
    code = main(["plot", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _row(df, **eq):
    m = np.ones(df.shape[0], bool)
    for k, v in eq.items():
        m &= (df[k] == v).to_numpy()
    assert m.sum() >= 1, eq
    return df[m].iloc[0]


# --------------------------------------------------------------------------- data = table
def test_hit_rate_points_equal_the_table(table):
    data = curve_data(table, "hit-rate")
    assert list(dict.fromkeys(data["panel"])) == [
        "count mode",
        "timed mode, 16 GB/s",
        "timed mode, 64 GB/s",
    ]
    # count rows repeated per bandwidth are identical: kept once, no bandwidth panels
    assert len(data) == 3 * 4 + 2 * 3 * 4
    assert set(data["series"]) == {"lru", "lfu", "belady", "lru + oracle", "lru + free-oracle"}
    assert set(data[data["bound"]]["series"]) == {"belady"}  # LRU + oracle is not a bound
    df = table.df
    for p in data.itertuples():
        policy, _, pf = p.series.partition(" + ")
        mode = "count" if p.panel == "count mode" else "timed"
        want = _row(
            df,
            policy=policy,
            prefetch=pf or "none",
            mode=mode,
            cache_slots=p.slots,
            **({} if mode == "count" else {"bandwidth_gbps": 16.0 if "16" in p.panel else 64.0}),
        )
        assert p.y == pytest.approx(want["hit_rate"] * 100, rel=1e-12)
        assert p.x == pytest.approx(want["cache_fraction"] * 100, rel=1e-12)
    # 10% of 1664 experts rounds to 166 slots; the x axis is what the run had
    assert sorted(set(data["slots"])) == [166, 416, 832]
    assert data["x"].min() == pytest.approx(166 / 1664 * 100)


def test_timed_figures_use_timed_rows_only(table):
    df = table.df
    for kind, col, scale in (("stall", "stall_s", 1.0), ("time-per-token", "decode_step_s", 1e3)):
        data = curve_data(table, kind)
        assert list(dict.fromkeys(data["panel"])) == ["16 GB/s", "64 GB/s"]
        assert len(data) == 2 * 3 * 4
        for p in data.itertuples():
            policy, _, pf = p.series.partition(" + ")
            want = _row(
                df,
                policy=policy,
                prefetch=pf or "none",
                mode="timed",
                cache_slots=p.slots,
                bandwidth_gbps=float(p.panel.split()[0]),
            )
            assert p.y == pytest.approx(want[col] * scale, rel=1e-12)
    # a faster link never stalls LRU longer
    s = curve_data(table, "stall")
    lru = s[s["series"] == "lru"]
    assert (
        lru[lru["panel"] == "64 GB/s"]["y"].to_numpy()
        < lru[lru["panel"] == "16 GB/s"]["y"].to_numpy()
    ).all()


def test_bandwidth_points_one_panel_per_cache_size(table):
    data = curve_data(table, "bandwidth")
    assert list(dict.fromkeys(data["panel"])) == [
        "cache 9.98% (166 experts)",
        "cache 25% (416 experts)",
        "cache 50% (832 experts)",
    ]
    assert set(data["x"]) == set(BANDWIDTHS)
    df = table.df
    for p in data.itertuples():
        policy, _, pf = p.series.partition(" + ")
        want = _row(
            df,
            policy=policy,
            prefetch=pf or "none",
            mode="timed",
            cache_slots=p.slots,
            bandwidth_gbps=p.x,
        )
        assert p.y == pytest.approx(want["hit_rate"] * 100, rel=1e-12)


def test_drawn_lines_are_the_data(table):
    data = curve_data(table, "hit-rate")
    fig = draw_curves(data, "hit-rate")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == list(dict.fromkeys(data["panel"]))
    n = 0
    for ax in axes:
        for line in ax.get_lines():
            series = line.get_label().removesuffix(" (bound)")
            want = data[(data["panel"] == ax.get_title()) & (data["series"] == series)]
            np.testing.assert_array_equal(line.get_xdata(), want["x"].to_numpy())
            np.testing.assert_array_equal(line.get_ydata(), want["y"].to_numpy())
            n += 1
    assert n == data.groupby(["panel", "series"]).ngroups
    assert axes[0].get_ylabel() == "hit rate (%)"
    assert "cache size (% of all routed experts)" in {ax.get_xlabel() for ax in axes}


def test_layer_heatmap_at_the_median_and_a_chosen_size(table):
    df = table.df
    data = layer_heatmap_data(table)
    assert set(data["slots"]) == {416}  # median of 166, 416, 832
    assert data["layer"].max() == 25
    for (panel, series), part in data.groupby(["panel", "series"]):
        policy, _, pf = series.partition(" + ")
        mode = "count" if panel.startswith("count") else "timed"
        want = _row(
            df,
            policy=policy,
            prefetch=pf or "none",
            mode=mode,
            cache_slots=416,
            **({} if mode == "count" else {"bandwidth_gbps": float(panel.split()[2])}),
        )
        np.testing.assert_allclose(part["y"].to_numpy(), want["hit_rate_per_layer"] * 100)
    small = layer_heatmap_data(table, 0.1)  # 0.1 -> the 166 slots its rounding gave
    assert set(small["slots"]) == {166}
    with pytest.raises(ConfigError, match=r"--cache-fraction 0.3: no such cache size"):
        layer_heatmap_data(table, 0.3)


def test_popularity_counts_and_normalisation(prep):
    trace = prep.trace
    data = popularity_data(trace)
    L, E = trace.meta.num_layers, 64
    want = np.zeros((L, E), np.int64)
    rows = np.repeat(np.arange(trace.num_rows), np.diff(trace.offsets))
    np.add.at(want, (trace.layer[rows], trace.experts), 1)
    got = data.pivot(index="layer", columns="expert", values="count").to_numpy()
    np.testing.assert_array_equal(got, want)
    share = data.groupby("layer")["share"].sum().to_numpy()
    np.testing.assert_allclose(share, 1.0)
    np.testing.assert_allclose(data.groupby("layer")["load"].mean().to_numpy(), 1.0)


# --------------------------------------------------------------------------- timeline
def test_link_lanes_by_hand():
    start = np.array([0.0, 0.0, 1.0, 2.5])
    end = np.array([2.0, 1.0, 3.0, 3.0])
    # unknown engine count: the first lane free by the start, else a new one
    assert link_lanes(start, end).tolist() == [0, 1, 1, 0]
    # three engines: the engine that frees first, as the timed kernel picks it
    assert link_lanes(start, end, engines=3).tolist() == [0, 1, 2, 1]


def test_timeline_of_a_two_engine_run(prep):
    cfg = SimConfig()
    cfg.cache.fraction, cfg.link.engines, cfg.replay.events = 0.25, 2, 100_000
    cfg.replay.prefetch = "oracle"
    ev = run(prep, cfg, "lru")["_events"]
    for engines in (None, 2):
        data = timeline_data(ev, steps=1, engines=engines)
        assert set(data["step"]) == {0}
        first = ev[ev["step"] == 0]
        assert len(data) == len(first)
        np.testing.assert_allclose(np.sort(data["start_ms"]), np.sort(first["start_s"]) * 1e3)
        links = data[data["kind"].isin(["demand", "prefetch"])]
        assert set(links["lane"]) == {"link 1", "link 2"}
        for _, lane in links.groupby("lane"):
            lane = lane.sort_values("start_ms")
            assert (lane["start_ms"].to_numpy()[1:] >= lane["end_ms"].to_numpy()[:-1] - 1e-9).all()
        assert set(data[data["kind"] == "stall"]["lane"]) == {"stall"}
        assert set(data[data["kind"].isin(["dense", "compute"])]["lane"]) == {"compute"}


# --------------------------------------------------------------------------- CLI and files
def test_cli_writes_every_figure(capsys, table_dir, tmp_path):
    ev = tmp_path / "ev.csv"
    assert (
        main(
            [
                "replay",
                SAMPLE,
                "--policy",
                "lru",
                "--cache-fraction",
                "0.25",
                "--events",
                str(ev),
                "--bandwidth-gbps",
                "16",
                "32",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "figs"
    code, stdout, err = _cli(capsys, table_dir, "-o", out, "--events", ev)
    assert code == 0, err
    names = [
        "hit_rate",
        "stall",
        "time_per_token",
        "bandwidth",
        "layer_heatmap",
        "popularity",
        "timeline",
    ]
    want = sorted(f"{n}.png" for n in names)
    assert sorted(p.name for p in out.iterdir()) == want  # no temporary files left
    assert sorted(Path(line).name for line in stdout.split()) == want
    for n in names:
        assert (out / f"{n}.png").read_bytes().startswith(MAGIC["png"])


def test_svg_and_pdf_beside_the_table(capsys, table_dir):
    """Without -o the figures go to RESULTS' folder/figures; one file per format."""
    code, _, err = _cli(
        capsys, table_dir / "results.parquet", "--kind", "stall", "--format", "svg,pdf"
    )
    assert code == 0, err
    out = table_dir / "figures"
    assert sorted(p.name for p in out.iterdir()) == ["stall.pdf", "stall.svg"]
    assert (out / "stall.pdf").read_bytes().startswith(MAGIC["pdf"])
    svg = (out / "stall.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")
    assert "stall time, whole run (s)" in svg  # labels kept as text


def test_timeline_from_a_small_replay(capsys, tmp_path):
    code, _, err = _cli(
        capsys,
        "--kind",
        "timeline",
        "--trace",
        SAMPLE,
        "--cache-fraction",
        "0.2",
        "--steps",
        "1",
        "-o",
        tmp_path,
    )
    assert code == 0, err
    assert (tmp_path / "timeline.png").read_bytes().startswith(MAGIC["png"])


def test_same_series_same_colour_in_every_figure(table):
    def colours(filters):
        t = Table(apply_filters(table.df, filters, "t"), "t")
        fig = draw_curves(curve_data(t, "hit-rate"), "hit-rate")
        return {ln.get_label(): ln.get_color() for ax in fig.axes for ln in ax.get_lines()}

    a = colours(["policy=lru,belady", "prefetch=none"])
    b = colours(["policy=lfu,lru"])
    assert set(a) == {"lru", "belady (bound)"}
    assert {"lru", "lfu", "lru + oracle", "lru + free-oracle"} <= set(b)
    assert a["lru"] == b["lru"] == POLICY_COLOURS["lru"]
    assert len({b["lru"], b["lfu"], b["lru + oracle"]}) == 3
    st = series_style("belady")
    assert st.bound and st.linestyle == "--" and st.color == "#000000"
    assert not series_style("lru + oracle").bound and series_style("lru + oracle").linestyle == ":"
    assert not series_style("lru + moe-infinity").bound
    assert legend_label("belady + oracle") == "belady + oracle (bound)"
    h1, h2 = series_style("lru + oracle h=1"), series_style("lru + oracle h=2")
    assert h1.color != h2.color and h1.marker != h2.marker and not (h1.bound or h2.bound)
    assert legend_label("lru + oracle") == "lru + oracle"
    # an unknown policy gets a colour from its name alone, the same in any company
    assert series_style("my-policy").color == series_style("my-policy").color
    assert series_style("my-policy").color not in POLICY_COLOURS.values()


def test_replay_json_records(capsys, tmp_path):
    lines = []
    for f in ("0.1", "0.3"):
        code = main(
            [
                "replay",
                SAMPLE,
                "--mode",
                "count",
                "--policy",
                "lru",
                "--policy",
                "belady",
                "--cache-fraction",
                f,
                "--json",
            ]
        )
        assert code == 0
        lines += capsys.readouterr().out.strip().splitlines()
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = curve_data(read_results(path), "hit-rate")
    recs = [json.loads(x) for x in lines]
    assert len(data) == 4 and set(data["panel"]) == {""}
    for r in recs:
        got = data[(data["series"] == r["policy"]) & (data["slots"] == r["cache_slots"])]["y"]
        assert got.item() == pytest.approx(r["hit_rate"] * 100)


# --------------------------------------------------------------------------- errors
def _small(prep, tmp_path, mode="count", fractions=(0.1, 0.2), extra=None):
    rows = _rows(prep, mode, fractions, (25.0,), [("lru", "none")])
    df = pd.DataFrame(rows)
    if extra:
        df = extra(df)
    d = tmp_path / "t"
    d.mkdir(exist_ok=True)
    df.to_parquet(d / "results.parquet")
    return d


def _dup(df):
    b = df.copy()
    b["dense_s"], df["dense_s"] = 2e-4, 1e-4
    b["hit_rate"] += 0.01
    return pd.concat([df, b])


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (
            "count",
            ["--kind", "stall"],
            "results.parquet: no timed rows (mode='timed') for the stall figure",
        ),
        (
            "one-size",
            ["--kind", "hit-rate"],
            "one cache size only (9.98%); the hit-rate figure needs at least two",
        ),
        ("dup", ["--kind", "hit-rate"], "they differ in dense_s; choose with --filter dense_s"),
        ("count", ["--filter", "colour=red"], "--filter colour=red: "),
        ("count", ["--filter", "policy=fifo"], "no row of"),
        ("count", ["--kind", "scatter"], "--kind: unknown figure 'scatter'"),
        ("count", ["--format", "gif"], "--format: unknown format 'gif'"),
        ("no-policy", [], "missing column 'policy'"),
        ("garbage", [], "cannot read the results table"),
        ("empty-dir", [], "no results.parquet in this folder"),
        ("bad-events", ["--kind", "timeline", "--events", "EV"], "missing column 'start_s'"),
    ],
)
def test_errors_are_one_line(capsys, prep, tmp_path, setup, argv, message):
    if setup == "count":
        target = _small(prep, tmp_path)
    elif setup == "one-size":
        target = _small(prep, tmp_path, fractions=(0.1,))
    elif setup == "dup":
        target = _small(prep, tmp_path, extra=_dup)
    elif setup == "no-policy":
        target = _small(prep, tmp_path, extra=lambda df: df.drop(columns="policy"))
    elif setup == "garbage":
        target = tmp_path / "results.parquet"
        target.write_bytes(b"not parquet at all")
    elif setup == "empty-dir":
        target = tmp_path
    else:
        target = _small(prep, tmp_path)
        (tmp_path / "ev.csv").write_text("kind,step,start\ndense,0,0\n")
        argv = [str(tmp_path / "ev.csv") if a == "EV" else a for a in argv]
    code, _, err = _cli(capsys, target, "-o", tmp_path / "o", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("moesim plot: error: ")
    assert message in err


def test_all_skips_what_the_table_cannot_give(capsys, prep, tmp_path):
    d = _small(prep, tmp_path)  # count rows only
    code, out, err = _cli(capsys, d, "-o", tmp_path / "o")
    assert code == 0
    assert "skipped stall: " in err and "no timed rows" in err
    assert {Path(x).name for x in out.split()} == {
        "hit_rate.png",
        "layer_heatmap.png",
        "popularity.png",
    }


def test_filters_and_normalise(table):
    df = apply_filters(table.df, ["cache_fraction=0.1", "mode=count", "trace=sample"], "t")
    assert set(df["cache_slots"]) == {166} and set(df["mode"]) == {"count"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_filters(table.df, ["policy"], "t")
    # replay --json records lack grid columns: filled, lists parsed from CSV text
    raw = pd.DataFrame(
        {
            "policy": ["lru"],
            "cache_slots": [10],
            "cache_fraction": [0.1],
            "hit_rate_per_layer": ["[0.5, null]"],
        }
    )
    n = normalise(raw, "r.csv")
    assert n["prefetch"].item() == "none" and n["horizon"].item() == 0
    np.testing.assert_array_equal(n["hit_rate_per_layer"].item(), [0.5, np.nan])
    assert np.isnan(n["bandwidth_gbps"].item())


def test_read_events_checks_kinds(tmp_path):
    p = tmp_path / "ev.csv"
    p.write_text("kind,step,start_s,end_s\nwarp,0,0,1\n")
    with pytest.raises(ConfigError, match="unknown event kind 'warp'"):
        read_events(p)


def test_two_traces_two_panels_and_two_popularity_files(capsys, table, tmp_path):
    other = tmp_path / "other" / "sample.parquet"
    other.parent.mkdir()
    shutil.copy(SAMPLE, other)
    count = table.df[table.df["mode"] == "count"]
    df = pd.concat([count, count.assign(trace=str(other), hit_rate=count["hit_rate"] / 2)])
    df.to_parquet(tmp_path / "results.parquet")
    t = read_results(tmp_path)
    data = curve_data(t, "hit-rate")
    # one panel per trace, named by its last two path parts (their order follows the paths)
    assert sorted(dict.fromkeys(data["panel"])) == ["other/sample", "sample/sample"]
    a = data[data["panel"] == "sample/sample"]["y"].to_numpy()
    b = data[data["panel"] == "other/sample"]["y"].to_numpy()
    np.testing.assert_allclose(b, a / 2)
    code, out, err = _cli(capsys, tmp_path, "--kind", "popularity", "-o", tmp_path / "o")
    assert code == 0, err
    assert sorted(Path(x).name for x in out.split()) == [
        "popularity_other_sample.png",
        "popularity_sample_sample.png",
    ]
    code, _, err = _cli(capsys, tmp_path, "--kind", "popularity", "--filter", "trace=nope")
    assert code == 2 and "--filter trace=nope: no row" in err
