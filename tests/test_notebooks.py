"""The notebooks in notebooks/ run top to bottom and show what they say they show.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working directory
is ``notebooks/`` (as Jupyter runs it), with one extra cell appended that prints the
notebook's results as JSON; the tests check those against invariants and published figures.
Skipped where nbclient, nbformat or ipykernel are absent (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import real_path

nbformat = pytest.importorskip("nbformat", reason="nbformat absent: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient absent: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel absent: pip install -e '.[test]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MARK = "NOTEBOOK-PROBE "
#: Seconds one cell may take: generous, since the first run may compile the numba kernels.
CELL_TIMEOUT = 600


def execute(name: str, probe: str) -> tuple[dict, list]:
    """Run notebook ``name`` with ``probe`` (code printing one JSON object) appended.

    Returns the probe's object and the executed cells. Any cell that raises fails the test
    (nbclient's CellExecutionError names the cell and shows its traceback).
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(f"import json\nprint({MARK!r} + json.dumps({probe}))")
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{name}: a cell raised {out.get('ename')}"
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    line = [t for t in text.splitlines() if t.startswith(MARK)]
    assert line, f"{name}: the probe printed nothing: {text!r}"
    return json.loads(line[-1][len(MARK) :]), nb.cells


def stdout_of(cells) -> str:
    return "".join(
        o.get("text", "") for c in cells for o in c.get("outputs", []) if o.get("name") == "stdout"
    )


def test_notebooks_have_no_outputs_committed():
    """Outputs are stripped in the committed files (CI executes them; diffs stay small)."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs"


def test_quickstart_runs_and_its_sweep_is_consistent():
    probe = (
        "{'results': results[['policy', 'prefetch', 'horizon', 'cache_slots', 'hit_rate', "
        "'stall_s', 'decode_step_s', 'mode']].to_dict('records'), "
        "'replays': replays[['mode', 'policy', 'cache_slots', 'hit_rate', 'stall_s']]"
        ".to_dict('records'), "
        "'bars': {'steps': sorted(int(s) for s in bars.step.unique()), "
        "'kinds': sorted(bars.kind.unique()), 'lanes': sorted(bars.lane.unique())}, "
        "'prefetch_used': rec['prefetch_used']}"
    )
    got, _ = execute("quickstart.ipynb", probe)
    res = pd.DataFrame(got["results"])
    # the sweep: 3 policies x (none + 3 prefetchers at horizon 1) x 10 sizes, all timed
    assert len(res) == 120
    assert res["cache_slots"].nunique() == 10
    assert set(res["policy"]) == {"lru", "lfu", "belady"}
    assert res["prefetch"].str.split(":").str[0].value_counts().to_dict() == {
        "none": 30,
        "oracle": 30,
        "moe-infinity": 30,
        "learned": 30,
    }
    assert (res["mode"] == "timed").all() and res["stall_s"].notna().all()
    # Belady is optimal: at every size it hits at least as often as LRU (no prefetching)
    plain = res[res["prefetch"] == "none"].pivot_table(
        index="cache_slots", columns="policy", values="hit_rate"
    )
    assert (plain["belady"] >= plain["lru"]).all()
    assert (plain["belady"] > plain["lru"]).any()
    # the sweep's LRU row at 20% equals the notebook's direct timed replay at 20%
    direct = pd.DataFrame(got["replays"])
    lru20 = direct[(direct["mode"] == "timed") & (direct["policy"] == "lru")].iloc[0]
    row = res[(res["policy"] == "lru") & (res["prefetch"] == "none")]
    row = row[row["cache_slots"] == lru20["cache_slots"]].iloc[0]
    assert row["hit_rate"] == lru20["hit_rate"]
    assert row["stall_s"] == pytest.approx(lru20["stall_s"], rel=1e-12)
    # the timeline: the two decode steps asked for, transfers on the link lane, compute, stalls
    assert got["bars"]["steps"] == [10, 11]
    assert {"demand", "compute", "stall"} <= set(got["bars"]["kinds"])
    assert "link 1" in got["bars"]["lanes"] and got["prefetch_used"] > 0


def test_study_notebook_skips_cleanly_without_data(tmp_path, monkeypatch):
    """Without ../shared every cell after the first does nothing, and the notebook says so."""
    monkeypatch.setenv("MOESIM_SHARED", str(tmp_path / "absent"))
    got, cells = execute("deepseek_study.ipynb", "{'have_data': HAVE_DATA}")
    assert got == {"have_data": False}
    text = stdout_of(cells)
    assert "DeepSeek-V2-Lite traces not found" in text
    assert "the rest of this notebook is skipped" in text


@pytest.mark.real
@pytest.mark.slow
def test_study_notebook_on_the_real_traces():
    data = real_path("deepseek-v2-lite-moe-beyond")
    for part in ("puffin-train", "webglm-test", "webglm-test-predicted"):
        real_path("deepseek-v2-lite-moe-beyond", part)
    probe = (
        "{'have_data': HAVE_DATA, 'data': str(DATA), 'scores': scores.to_dict(), "
        "'free': {k: v['hit_rate'] for k, v in free.items()}, 'gap': float(gap), "
        "'runs': runs[['policy', 'prefetch', 'replayed', 'bandwidth_gbps', 'cache_slots', "
        "'hit_rate', 'decode_step_s']].to_dict('records')}"
    )
    got, _ = execute("deepseek_study.ipynb", probe)
    assert got["have_data"] and Path(got["data"]) == data
    # MoE-Beyond's published predictions, scored as docs/predictors.md reports them
    mb = got["scores"]["MoE-Beyond (published)"]
    assert mb["recall, all tokens"] == pytest.approx(0.756, abs=5e-4)
    assert mb["recall, first 10 tokens of each prompt left out"] == pytest.approx(0.721, abs=5e-4)
    # the reduced learned model (or MOESIM_LEARNED_MODEL): far above the co-occurrence baseline
    # (50%), below or near MoE-Beyond's
    learned = got["scores"]["moesim learned (h=1)"]["recall, all tokens"]
    assert 0.65 < learned < 0.80
    # free prefetch at 166 slots: LRU 26.7% -> 75.7% with MoE-Beyond's (docs/predictors.md)
    assert got["free"]["lru"] == pytest.approx(0.267, abs=5e-4)
    assert got["free"]["lru + MoE-Beyond's predictions (free)"] == pytest.approx(0.757, abs=5e-4)
    assert got["free"]["lru + oracle (free)"] > 0.99
    runs = pd.DataFrame(got["runs"])
    # 10 series (9 drawn + the order check) x 7 sizes x 2 bandwidths
    assert len(runs) == 140 and runs["cache_slots"].nunique() == 7
    assert got["gap"] < 0.01  # the two prompt orders replay alike under LRU
    plain = runs[(runs["prefetch"] == "none") & (runs["replayed"] == "test")].pivot_table(
        index=["bandwidth_gbps", "cache_slots"], columns="policy", values="hit_rate"
    )
    assert (plain["belady"] >= plain["lru"]).all()
    # a faster link never makes a run slower
    t = runs.pivot_table(
        index=["policy", "prefetch", "replayed", "cache_slots"],
        columns="bandwidth_gbps",
        values="decode_step_s",
    )
    assert (t[50.0] < t[25.0]).all()
