"""Load (or compile) the replay kernels on a tiny trace, so timings exclude compilation."""

from __future__ import annotations

import numpy as np

_done: set[str] = set()


def warm_up(mode: str = "count") -> None:
    """Run the ``mode`` kernel once on a 2-layer toy trace (no-op after the first call)."""
    if mode in _done:
        return
    from simulator.config import SimConfig
    from simulator.engine import prepare, run
    from traces.format import TraceMeta
    from traces.io import trace_from_arrays

    meta = TraceMeta(model="warm-up", num_layers=2, experts_per_layer=4, top_k=2,
                     expert_bytes=1000)  # fmt: skip
    tr = trace_from_arrays(
        meta,
        step=[0, 0, 1, 1],
        seq=[0, 0, 0, 0],
        pos=[0, 0, 1, 1],
        phase=[0, 0, 1, 1],
        layer=[0, 1, 0, 1],
        offsets=[0, 2, 4, 6, 8],
        experts=np.array([0, 1, 2, 3, 1, 2, 0, 3]),
    )
    cfg = SimConfig()
    cfg.cache.fraction, cfg.cache.slots = None, 3
    cfg.replay.mode = mode
    prep = prepare(tr)
    for policy in ("lru", "belady", "static"):
        run(prep, cfg, policy)
    if mode == "count":  # the fast LRU/FIFO path's sequential loop too
        cfg.replay.access = "sequential"
        run(prep, cfg, "lru")
        cfg.replay.access = "atomic"
    if mode == "timed":  # the prefetch-list builders too
        cfg.replay.prefetch = "oracle"
        run(prep, cfg, "lru")
    _done.add(mode)
