"""Random valid traces for tests (small, seeded)."""

from __future__ import annotations

import numpy as np

from traces.format import TraceMeta
from traces.io import sort_trace, trace_from_arrays


def random_trace(rng: np.random.Generator, *, layers=3, experts=6, top_k=2, sequences=3,
                 prefill=3, decode=3, batch=2, steps="native", skew=1.0, expert_bytes=None,
                 preds=()):  # fmt: skip
    """A valid random trace: per sequence one prefill step, then batched decode steps.

    steps='per-token' makes every token its own step instead.
    """
    experts_per_layer = [experts] * layers if np.isscalar(experts) else list(experts)
    meta = TraceMeta(
        model="random",
        num_layers=layers,
        experts_per_layer=experts_per_layer,
        top_k=top_k,
        expert_bytes=expert_bytes or [1000] * layers,
    )
    rows = []  # (step, layer, seq, pos, phase)
    step = 0
    for start in range(0, sequences, batch):
        batch_seqs = list(range(start, min(start + batch, sequences)))
        for s in batch_seqs:
            if steps == "per-token":
                for p in range(prefill):
                    rows += [(step, lay, s, p, 0) for lay in range(layers)]
                    step += 1
            else:
                rows += [(step, lay, s, p, 0) for lay in range(layers) for p in range(prefill)]
                step += 1
        for d in range(decode):
            rows += [(step, lay, s, prefill + d, 1) for lay in range(layers) for s in batch_seqs]
            step += 1
    rows.sort()
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    experts_list = []
    for _, lay, *_ in rows:
        e = experts_per_layer[lay]
        w = 1.0 / np.arange(1, e + 1) ** skew
        experts_list.append(rng.choice(e, size=top_k, replace=False, p=w / w.sum()))
    offsets = np.arange(len(rows) + 1) * top_k
    pred = {}
    for h in preds:
        pl = [rng.choice(experts_per_layer[r[1]], size=top_k, replace=False) for r in rows]
        pred[h] = (offsets, np.concatenate(pl) if pl else np.zeros(0))
    tr = trace_from_arrays(
        meta, step=arr[:, 0], layer=arr[:, 1], seq=arr[:, 2], pos=arr[:, 3], phase=arr[:, 4],
        offsets=offsets, experts=np.concatenate(experts_list) if rows else np.zeros(0),
        preds=pred,
    )  # fmt: skip
    return sort_trace(tr)
