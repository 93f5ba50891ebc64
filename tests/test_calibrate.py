"""moesim calibrate: line fits worked out by hand, the profile as a valid configuration, and the
command end to end on the CPU with a tiny model (skipped without the capture extra)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from simulator.calibrate import (
    DenseMeasure,
    ExpertMeasure,
    LinkMeasure,
    Profile,
    fit_line,
    link_sizes,
    render_profile,
)
from simulator.config import load_config
from tests.test_capture import CAPTURE, needs_capture
from traces.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_fit_line_exact_and_clipped():
    # points on a line are recovered exactly
    x = [1, 2, 4, 8, 64]
    assert fit_line(x, [2e-5 + 3e-7 * v for v in x]) == pytest.approx((2e-5, 3e-7), rel=1e-9)
    # falling times: the slope is pinned to 0 and the level minimises relative error:
    # c = sum(1/y) / sum(1/y^2) = (1/2 + 1/1) / (1/4 + 1) = 1.2
    assert fit_line([1, 2], [2.0, 1.0]) == pytest.approx((1.2, 0.0))
    # the line through (1, 1) and (3, 4) has intercept -0.5: a proportional fit instead,
    # slope = sum(x/y) / sum((x/y)^2) with x/y = 1 and 0.75: 1.75 / 1.5625 = 1.12
    assert fit_line([1, 3], [1.0, 4.0]) == pytest.approx((0.0, 1.12))
    # one distinct x: a flat line through the (relative) mean
    assert fit_line([4, 4], [1.0, 1.0]) == (1.0, 0.0)
    with pytest.raises(ConfigError):
        fit_line([1, 2], [1.0, 0.0])


def test_link_sizes():
    assert link_sizes(1 << 20) == [4096, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21]
    assert link_sizes(10_000) == [4096, 5000, 10_000, 20_000]  # 1/8 and 1/4 fall below 4 KiB
    assert link_sizes(3 << 30)[-1] == 3 << 29  # nothing above 2 GiB


def make_profile(device="cuda:0"):
    # pinned copies: 10 us + bytes / 25 GB/s; experts: 20 us + 0.5 us per token;
    # dense: 100 us + 0.2 us per token (decode passes of 1 and 4 tokens, prefill of 64)
    pinned = LinkMeasure("pinned", [(b, 1e-5 + b / 25e9) for b in (4096, 1 << 20, 1 << 24)], 5)
    pageable = LinkMeasure("pageable", [(b, 2e-5 + b / 10e9) for b in (4096, 1 << 24)], 5)
    experts = [
        ExpertMeasure(i, f"model.layers.{i}.mlp", [(n, 2e-5 + 5e-7 * n) for n in (1, 4, 16)])
        for i in range(2)
    ]
    dense = DenseMeasure(
        points=[(n, 1e-4 + 2e-7 * n) for n in (1, 1, 4, 4, 64)],
        per_layer={0: 9e-5, 1: 8e-5},
        batch_sizes=[1, 4],
        context=64,
        decode_steps=2,
    )
    return Profile(
        device=device,
        device_name="Test GPU",
        versions="torch x",
        link=[pinned, pageable],
        model="tiny",
        model_summary="Mixtral, 2 MoE layers",
        experts=experts,
        dense=dense,
    )


def test_profile_is_a_config_with_the_fitted_values(tmp_path):
    text = render_profile(make_profile())
    path = tmp_path / "profile.toml"
    path.write_text(text)
    cfg = load_config(path).validate()
    assert cfg.link.bandwidth_gbps == pytest.approx(25.0)
    assert cfg.link.latency_s == pytest.approx(1e-5)
    assert cfg.compute.expert_s == pytest.approx(2e-5)
    assert cfg.compute.expert_per_token_s == pytest.approx(5e-7)
    assert cfg.compute.dense_s == pytest.approx(1e-4)
    assert cfg.compute.dense_per_token_s == pytest.approx(2e-7)
    assert cfg.cache.fraction == 0.1 and cfg.link.engines == 1  # the rest: defaults
    assert "# device: cuda:0 (Test GPU)" in text and "pageable" in text
    assert "NOTE: measured on the CPU" not in text and "WARNING" not in text
    raw = tomllib.loads(text)
    assert set(raw) == {"link", "compute"}


def test_profile_on_cpu_says_so_and_merges_a_base(tmp_path):
    prof = make_profile(device="cpu")
    prof.link = [LinkMeasure("host memcpy", prof.link[0].points, 5)]
    prof.experts, prof.dense = [], None
    text = render_profile(prof, tomllib.loads((REPO / "sim.toml").read_text()))
    assert "NOTE: measured on the CPU" in text and "host memcpy" in text
    path = tmp_path / "full.toml"
    path.write_text(text)
    cfg = load_config(path).validate()
    assert cfg.link.bandwidth_gbps == pytest.approx(25.0)  # measured
    base = load_config(REPO / "sim.toml")
    assert cfg.compute == base.compute and cfg.replay == base.replay and cfg.cache == base.cache
    assert cfg.link.engines == base.link.engines
    assert "[compute]" in text and "expert_s" not in tomllib.loads(text)["compute"]


# ----------------------------------------------------------------------------- with torch

if CAPTURE:
    import torch

    from simulator.calibrate import _outer_layer, measure_link
    from tests.test_capture import make_model, moesim, save_tiny
    from traces.capture.routers import find_moe_layers, get_arch


@needs_capture
def test_measure_link_on_cpu_times_every_size():
    m = measure_link(torch.device("cpu"), [4096, 1 << 20], repeats=3, pinned=False)
    assert m.kind == "host memcpy" and [b for b, _ in m.points] == [4096, 1 << 20]
    assert all(s > 0 for _, s in m.points)


@needs_capture
def test_outer_layer_is_the_decoder_or_encoder_block():
    model = make_model("mixtral")
    layers = find_moe_layers(model, get_arch("mixtral", "t"), "t")
    assert all(_outer_layer(model, x.name) is model.model.layers[i] for i, x in enumerate(layers))
    switch = make_model("switch_transformers")
    layers = find_moe_layers(switch, get_arch("switch_transformers", "t"), "t")
    assert _outer_layer(switch, layers[0].name) is switch.encoder.block[1]
    assert _outer_layer(switch, layers[3].name) is switch.decoder.block[3]


@needs_capture
def test_cli_calibrate_on_cpu(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir)
    out = tmp_path / "profile.toml"
    r = moesim(
        capsys,
        monkeypatch,
        f"calibrate --model {model_dir} --device cpu --repeats 2 "
        "--tokens 1,8 --batch-sizes 1,2 --context 8 --decode-steps 2 "
        f"--base {REPO / 'sim.toml'} -o {out}",
    )
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    cfg = load_config(out).validate()
    assert "NOTE: measured on the CPU" in text and "Mixtral, 3 MoE layers x 8 experts" in text
    for key in ("dense_s", "dense_per_token_s", "expert_s", "expert_per_token_s"):
        assert getattr(cfg.compute, key) >= 0
    assert cfg.compute.expert_s + 8 * cfg.compute.expert_per_token_s > 0
    assert cfg.link.bandwidth_gbps > 0 and cfg.replay.policies == ["lru", "lfu", "belady"]
    # the measured rows: 3 MoE layers of expert timings, the copy sizes of a 3 x 32 x 24 x 4 B
    # expert
    assert text.count("\n#   0 ") == 1 and "#   4,096 " in text and "#   9,216 " in text
    assert np.isfinite(cfg.link.latency_s)

    # link only, no model; errors
    r = moesim(
        capsys,
        monkeypatch,
        f"calibrate --device cpu --expert-bytes {1 << 16} --repeats 2 -o {tmp_path / 'link.toml'}",
    )
    assert r.returncode == 0, r.stderr
    assert set(tomllib.loads((tmp_path / "link.toml").read_text())) == {"link"}
    r = moesim(
        capsys,
        monkeypatch,
        f"calibrate --model {tmp_path / 'absent'} --device cpu -o {tmp_path / 'x.toml'}",
    )
    assert r.returncode == 2 and "no such model folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.toml").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("[link]\nbandwidth = 3\n")
    r = moesim(capsys, monkeypatch, f"calibrate --base {bad} --device cpu -o {tmp_path / 'x.toml'}")
    assert r.returncode == 2 and "unknown key 'link.bandwidth'" in r.stderr


def test_uneven_layers_are_flagged_in_the_profile():
    # the H200 run: layer 0 of each decode step held 36 ms of host-side work, layer 1 0.8 ms
    prof = make_profile()
    prof.dense.per_layer = {0: 0.0356, 1: 0.000786}
    assert prof.dense.uneven.startswith("uneven layers: decoder layer 0 (0.0356 s)")
    assert "others took 0.000786 s" in prof.dense.uneven
    prof.dense.per_layer = {0: 0.0356, 1: 0.000786, 2: 0.0008, 3: 0.0090}
    assert "decoder layer 0 (0.0356 s), 3 (0.009 s) took" in prof.dense.uneven
    assert "others took 0.000793 s" in prof.dense.uneven  # median of layers 1 and 2
    text = render_profile(prof)
    assert "# WARNING: uneven layers" in text
    tomllib.loads(text)  # still a valid profile
    prof.dense.per_layer = {0: 0.0039, 1: 0.000786, 2: 0.0008}  # under 5x: no warning
    assert prof.dense.uneven is None
    prof.dense.per_layer = {0: 0.0356}
    assert prof.dense.uneven is None
