"""The configuration's sweep sections: defaults, one-line errors, overrides, saving it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.config import SimConfig, apply_overrides, config_to_toml, load_config
from traces.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_sim_toml_holds_every_section_with_the_defaults():
    text = (REPO / "sim.toml").read_text()
    for section in ("traces", "model", "cache", "link", "compute", "replay", "sweep", "output"):
        assert f"[{section}]" in text
    assert load_config(REPO / "sim.toml") == SimConfig()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[sweep]\nmodes = ['count', 'fast']\n", "sweep.modes: expected values among count"),
        ("[sweep]\nhorizons = [0]\n", "sweep.horizons: expected horizons >= 1"),
        ("[sweep]\nhorizons = [1.5]\n", "sweep.horizons: expected int, got 1.5"),
        ("[sweep]\nworkers = 'many'\n", "sweep.workers: expected int, got 'many'"),
        ("[sweep]\nfree_prefetch = 1\n", "sweep.free_prefetch: expected bool, got 1"),
        ("[sweep]\nbandwidths_gbps = [25, -1]\n", "sweep.bandwidths_gbps: expected > 0"),
        ("[sweep]\nspeed = 2\n", "unknown key 'sweep.speed'"),
        ("[cache]\nfractions = [0.1, 1.5]\n", "cache.fractions: expected fractions in (0, 1]"),
        ("[cache]\nslots_range = [8, 4, 1]\n", "cache.slots_range: expected [start, stop, step]"),
        ("[cache]\nslots_list = [8]\nfractions = [0.1]\n", "set at most one of 'fractions'"),
        ("[traces]\npaths = []\n", "traces.paths: expected at least one"),
        ("[traces]\npaths = 'a.parquet'\n", "traces.paths: expected list of str, got 'a.parquet'"),
        ("[model]\ndtype = 'int3'\n", "model.dtype: expected one of"),
        ("[model]\ndtype = 'int4'\nexpert_bytes = 100\n", "set 'dtype' or 'expert_bytes'"),
        ("[output]\nfolder = ''\n", "output.folder: expected a folder name"),
    ],
)
def test_errors_name_the_key(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path).validate()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_one_size_setting_replaces_the_others(tmp_path):
    cfg = apply_overrides(SimConfig(), ["cache.slots=100", "cache.slots_list=[8,16]"])
    assert (cfg.cache.slots, cfg.cache.fraction) == (100, None)
    assert (cfg.cache.slots_list, cfg.cache.fractions) == ([8, 16], [])
    cfg.validate()
    path = tmp_path / "c.toml"
    path.write_text("[cache]\nslots = 64\nslots_range = [8, 64, 8]\n")
    cfg = load_config(path).validate()
    assert (cfg.cache.slots, cfg.cache.fraction, cfg.cache.fractions) == (64, None, [])
    assert cfg.cache.slots_range == [8, 64, 8]


def test_saved_toml_reads_back_equal(tmp_path):
    cfg = apply_overrides(SimConfig(), [
        "cache.slots=300", "cache.pinned=['0:1', '2:3']", "compute.expert_s=1.5e-05",
        "model.dtype=int4", "sweep.free_prefetch=true", "sweep.modes=['count', 'timed']",
        "replay.policies=['lru', 'lfu-aged:half_life=7']", "traces.paths=['a \"b\".parquet']",
        "link.bandwidth_gbps=1e3",
    ]).validate()  # fmt: skip
    path = tmp_path / "saved.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg
    path.write_text(config_to_toml(SimConfig()))
    assert load_config(path) == SimConfig()
