"""Every policy and prefetcher on the real DeepSeek-V2-Lite test prompts, timed, PCIe 4.0 and 5.0.

Not a speed benchmark: the comparison table of issue #4. The 100 WebGLM test prompts (per-token
steps, MoE-Beyond's traces) replayed in timed mode with a global cache of 5-50% of the 1,664
routed experts, at PCIe 4.0 (25 GB/s) and 5.0 (50 GB/s), 10 us per transfer, one copy engine.
Predictors that learn (cross-layer transitions, MoE-Infinity's collection, the learned model)
learn from the 1,999 Puffin training prompts only.

Cost model (DeepSeek-V2-Lite on an RTX A5000, from its figures: 768 GB/s, ~111 TFLOP/s bf16):
an expert is 17.3 MB (bf16, from the trace's metadata), computed in 17.3 MB / 768 GB/s = 22.5 us
plus 2 x 8.65 M params / 111 TFLOP/s = 0.16 us per token routed to it; the dense part of a layer
(MLA attention, two shared experts, router: about 23 M params, 46 MB) takes 60 us per step.
For scale, MoE-Infinity's README reports 0.155 s per token for this model on an A5000 (with its
own cache and prefetching); the `s/token` column is comparable to it.

    python benchmarks/compare_timed.py [DATA] [--model LEARNED.npz] [--fractions ...] [--json]

DATA defaults to ../shared/traces/real/deepseek-v2-lite-moe-beyond. Without --model the learned
predictor is trained first (`moesim train`, horizons 1 2 4; several minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import CACHE_DIR, MOE_BEYOND, default_trace, log, machine

from simulator.config import SimConfig
from simulator.engine import prepare, run
from traces.io import read_trace

HW = dict(dense_s=60e-6, dense_per_token_s=0.0, expert_s=22.5e-6, expert_per_token_s=0.16e-6)
BANDWIDTHS = {"PCIe 4.0": 25.0, "PCIe 5.0": 50.0}


def combos(train: str, model: str | None) -> list[tuple[str, str, str]]:
    """(label, eviction policy, prefetcher)."""
    rows = [
        ("LRU", "lru", "none"),
        ("LFU", "lfu", "none"),
        ("Belady", "belady", "none"),
        ("LRU + prev-token", "lru", "prev-token"),
        ("LRU + cross-layer", "lru", f"cross-layer:train={train}"),
        ("LRU + MoE-Infinity", "lru", f"moe-infinity:warm={train}"),
        ("LFU + MoE-Infinity (its runtime)", "lfu", f"moe-infinity:warm={train}"),
        ("MoE-Infinity eviction (no prefetch)**", "moe-infinity", "none"),
        ("MoE-Infinity eviction + prefetch (paper)", "moe-infinity", f"moe-infinity:warm={train}"),
        ("LRU + MoE-Beyond predictions*", "lru", "trace"),
    ]
    if model:
        rows += [
            ("LRU + learned", "lru", f"learned:model={model}"),
            ("LRU + adaptive(learned)", "lru", f"adaptive:base=learned,model={model}"),
        ]
    rows += [
        ("LRU + adaptive(cross-layer)", "lru", f"adaptive:base=cross-layer,train={train}"),
        ("LRU + oracle", "lru", "oracle"),
        ("Belady + oracle (bound)", "belady", "oracle"),
    ]
    return rows


def cfg_for(fraction: float, bandwidth: float, prefetch: str) -> SimConfig:
    cfg = SimConfig()
    cfg.cache.fraction = fraction
    cfg.link.bandwidth_gbps = bandwidth
    cfg.link.latency_s = 1e-5
    cfg.link.engines = 1
    for k, v in HW.items():
        setattr(cfg.compute, k, v)
    cfg.replay.mode = "timed"
    cfg.replay.prefetch = prefetch
    cfg.replay.horizon = 1
    return cfg.validate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=str(MOE_BEYOND))
    ap.add_argument("--model", help="learned predictor (.npz) trained on the Puffin prompts")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--json", help="also write every record here (JSON lines)")
    args = ap.parse_args()
    data = Path(args.data)
    from traces.importers import import_moe_beyond

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    test_path = CACHE_DIR / "webglm-test-text.parquet"
    if not test_path.exists():
        import_moe_beyond([data / "webglm-test"], test_path)
    pred_path = CACHE_DIR / "webglm-test-predicted.parquet"
    if not pred_path.exists():
        import_moe_beyond([data / "webglm-test-predicted"], pred_path)
    train_path = default_trace()
    model = args.model
    if model is None:
        import subprocess

        model = str(CACHE_DIR / "learned-puffin.npz")
        if not Path(model).exists():
            log(f"training the learned predictor on {train_path} -> {model} ...")
            subprocess.run(["moesim", "train", str(train_path), "--horizons", "1", "2", "4",
                            "-o", model], check=True)  # fmt: skip
    trace = read_trace(test_path, load_text=True)  # the learned predictor reads token text
    prep = prepare(trace)
    pred_prep = prepare(read_trace(pred_path))
    log(f"{test_path}: {trace.num_sequences} prompts, {prep.acc.num_accesses:,} accesses; "
        f"{machine()}")  # fmt: skip
    out = open(args.json, "w") if args.json else None
    for bw_name, bw in BANDWIDTHS.items():
        print(f"\n### {bw_name} ({bw:g} GB/s), timed, global cache, horizon 1\n")
        head = "| policy + prefetcher | " + " | ".join(
            f"{f:.0%}: hit / stall s / s per token" for f in args.fractions) + " |"  # fmt: skip
        print(head)
        print("|---|" + "---:|" * len(args.fractions))
        for label, policy, pf in combos(str(train_path), model):
            cells = []
            for f in args.fractions:
                t = time.perf_counter()
                use = pred_prep if pf == "trace" else prep
                rec = run(use, cfg_for(f, bw, pf), policy)
                rec["label"], rec["bandwidth_gbps"] = label, bw
                rec["wall_s"] = time.perf_counter() - t
                tokens = trace.num_tokens
                per_tok = rec["total_s"] / tokens
                cells.append(f"{rec['hit_rate']:.1%} / {rec['stall_s']:.1f} / {per_tok:.4f}")
                if out:
                    rec.pop("hit_rate_per_layer", None)
                    out.write(json.dumps(rec) + "\n")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        print(
            "\n\\* replayed on MoE-Beyond's `webglm-test-predicted` files: the same 100 prompts "
            "recorded again with its predictions; their expert lists match `webglm-test` on "
            "only about 10% of (prompt, token, layer) rows, so this row is not strictly "
            "comparable with the others. \\*\\* its collection fills only with the test "
            "prompts as they finish (warm= is a prefetcher setting)"
        )
    if out:
        out.close()


if __name__ == "__main__":
    main()
