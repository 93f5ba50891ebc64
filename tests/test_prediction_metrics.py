"""Precision, recall and F1 of pred_h columns (simulator/prediction.py), checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulator.prediction import score_predictions, scores_json, token_rank
from tests.conftest import real_path
from tests.helpers import random_trace
from traces.errors import ConfigError, TraceError
from traces.format import TraceMeta
from traces.io import read_trace, trace_from_arrays


def _trace(preds=None, top_k=None):
    """2 layers x 4 experts; seq 0 has 3 tokens, seq 1 has 2 (per-token steps)."""
    meta = TraceMeta(
        model="t", num_layers=2, experts_per_layer=[4, 4], top_k=top_k, expert_bytes=[1, 1]
    )
    # rows sorted (step, layer, seq, pos); one token per step
    toks = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    rows = [(s, lay, q, p) for s, (q, p) in enumerate(toks) for lay in range(2)]
    step, layer, seq, pos = (np.array(c) for c in zip(*rows, strict=True))
    experts = [[0, 1], [2, 3], [1, 2], [0], [3, 0], [1, 2], [0, 1], [2, 3], [1], [0, 2]]
    off = np.concatenate([[0], np.cumsum([len(e) for e in experts])])
    pr = {}
    for h, lists in (preds or {}).items():
        po = np.concatenate([[0], np.cumsum([len(e) for e in lists])])
        pr[h] = (po, np.array([x for e in lists for x in e], dtype=np.int16))
    return trace_from_arrays(
        meta, step=step, layer=layer, seq=seq, pos=pos, phase=np.ones(len(rows)),
        offsets=off, experts=np.concatenate([np.array(e) for e in experts]), preds=pr,
    )  # fmt: skip


# predictions per row (rows in the order above: token (0,0) L0, L1, token (0,1) L0, L1, ...)
PRED = [[0, 3], [2], [1, 2], [], [0, 3], [1, 2], [3, 2], [2, 3], [1, 0], [2, 1]]
# hits:    1      1     2     0     2       2       0       2       1       1


def test_hand_computed_micro_averages():
    s = score_predictions(_trace({1: PRED}), 1)
    hits, npred, nact = 12, 17, 18
    assert s["rows"] == 10 and s["rows_predicted"] == 9
    assert (s["hits"], s["predicted"], s["actual"]) == (hits, npred, nact)
    assert s["precision"] == pytest.approx(hits / npred)
    assert s["recall"] == pytest.approx(hits / nact)
    assert s["f1"] == pytest.approx(
        2 * (hits / npred) * (hits / nact) / (hits / npred + hits / nact)
    )
    # per layer: layer 0 = rows 0, 2, 4, 6, 8; layer 1 = rows 1, 3, 5, 7, 9
    pl = s["per_layer"]
    assert pl["rows"].tolist() == [5, 5]
    assert pl["precision"][0] == pytest.approx(6 / 10) and pl["recall"][0] == pytest.approx(6 / 9)
    assert pl["precision"][1] == pytest.approx(6 / 7) and pl["recall"][1] == pytest.approx(6 / 9)
    assert pl["f1"][1] == pytest.approx(2 * (6 / 7) * (6 / 9) / (6 / 7 + 6 / 9))


def test_skip_first_tokens_of_each_sequence():
    tr = _trace({1: PRED})
    assert token_rank(tr).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1]
    s = score_predictions(tr, 1, skip_first=1)  # rows 2, 3, 4, 5, 8, 9
    assert s["rows"] == 6
    assert s["hits"] == 2 + 0 + 2 + 2 + 1 + 1
    assert s["predicted"] == 2 + 0 + 2 + 2 + 2 + 2 and s["actual"] == 2 + 1 + 2 + 2 + 1 + 2
    assert score_predictions(tr, 1, skip_first=5)["rows"] == 0
    assert math.isnan(score_predictions(tr, 1, skip_first=5)["recall"])


def test_precision_differs_from_recall_with_longer_predictions():
    wide = [[0, 1, 2, 3]] * 10  # predicts everything: recall 1, precision = actual / 40
    s = score_predictions(_trace({2: wide}), 2)
    assert s["recall"] == 1.0 and s["precision"] == pytest.approx(18 / 40)


def test_errors_and_json():
    tr = _trace({1: PRED})
    with pytest.raises(TraceError, match="no column 'pred_h2'.*present: \\[1\\]"):
        score_predictions(tr, 2)
    with pytest.raises(ConfigError, match="skip_first"):
        score_predictions(tr, 1, skip_first=-1)
    j = scores_json(score_predictions(tr, 1, skip_first=5))
    assert j["recall"] is None and j["per_layer"]["recall"] == [None, None]


def test_random_trace_matches_python_reference():
    tr = random_trace(np.random.default_rng(3), layers=4, experts=8, top_k=3, preds=(1, 3))
    for h in (1, 3):
        po, pi = tr.preds[h]
        hits = sum(
            len(set(pi[po[r] : po[r + 1]]) & set(tr.experts[tr.offsets[r] : tr.offsets[r + 1]]))
            for r in range(tr.num_rows)
        )
        s = score_predictions(tr, h)
        assert s["hits"] == hits and s["recall"] == pytest.approx(hits / tr.num_activations)


@pytest.mark.real
def test_moe_beyond_published_predictions():
    from traces.importers import import_moe_beyond

    folder = real_path("deepseek-v2-lite-moe-beyond", "webglm-test-predicted")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pred.parquet"
        import_moe_beyond([folder], out)
        tr = read_trace(out)
    assert score_predictions(tr, 1)["recall"] == pytest.approx(0.756, abs=0.001)
    assert score_predictions(tr, 1, skip_first=10)["recall"] == pytest.approx(0.721, abs=0.001)
