"""``moesim demo``: the first five minutes — replay the bundled sample under several policies."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from simulator.config import SimConfig
from simulator.engine import prepare, run
from simulator.report import table
from simulator.warmup import warm_up
from traces.io import read_trace

SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "sample" / "sample.parquet"
DEMO_POLICIES = ["lru", "fifo", "lfu", "lfu-perfect", "static", "belady", "none"]
FRACTIONS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="replay the bundled sample trace under several policies; write a hit-rate plot",
        description="Replays the small synthetic sample trace shipped with moesim (DeepSeek-V2-"
        "Lite shape) in timed mode at a 10%% cache, prints a table, then replays it in count "
        "mode at several cache sizes and plots hit rate against cache size.",
    )
    p.add_argument("--trace", default=str(SAMPLE), help="trace to use instead of the sample")
    p.add_argument("--out", default="results/demo", help="folder for the plot")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    prep = prepare(read_trace(args.trace))
    warm_up("timed")
    warm_up("count")
    meta = prep.meta
    print(f"{args.trace}\n  {meta.model}: {meta.num_layers} MoE layers x {meta.max_experts} "
          f"experts, top-{meta.top_k}, {meta.expert_bytes[0] / 1e6:.1f} MB per expert; "
          f"{prep.acc.num_accesses} (step, layer, expert) accesses\n")  # fmt: skip
    cfg = SimConfig()
    records = [run(prep, cfg, p) for p in DEMO_POLICIES]
    for r in records:
        r["bandwidth_gbps"] = cfg.link.bandwidth_gbps
    print(f"Timed replay, global cache of {records[0]['cache_slots']} experts (10%), "
          f"PCIe {cfg.link.bandwidth_gbps:g} GB/s:")  # fmt: skip
    print(table(records))
    cfg.replay.mode = "count"
    curves = {}
    for policy in DEMO_POLICIES[:-1]:
        curves[policy] = []
        for f in FRACTIONS:
            cfg.cache.fraction = f
            curves[policy].append(run(prep, cfg, policy)["hit_rate"])
    out = Path(args.out)
    path = plot_hit_rate(curves, FRACTIONS, out / "hit_rate.png", title=meta.model)
    print(f"\nHit rate vs cache size (count mode) written to {path}")
    return 0


def plot_hit_rate(curves: dict[str, list[float]], fractions, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from traces.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, ys in curves.items():
        style = "--" if policy == "belady" else "-"
        ax.plot(np.asarray(fractions) * 100, np.asarray(ys) * 100, style, marker="o", ms=3,
                label=policy + (" (bound)" if policy == "belady" else ""))  # fmt: skip
    ax.set_xlabel("cache size (% of all routed experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(f"{title}: hit rate vs cache size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
