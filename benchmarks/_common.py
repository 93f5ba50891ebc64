"""Helpers shared by the benchmark scripts: finding or making the benchmark trace, timing."""

from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout whether or not moesim is installed
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("MOESIM_SHARED", REPO.parent / "shared"))
MOE_BEYOND = SHARED / "traces" / "real" / "deepseek-v2-lite-moe-beyond"
PUFFIN = MOE_BEYOND / "puffin-train"
WEBGLM = MOE_BEYOND / "webglm-test"
CACHE_DIR = Path(tempfile.gettempdir()) / "moesim-bench"

# A DeepSeek-V2-Lite-shaped synthetic trace of about 11 M accesses (continuous batching of 4),
# used where the real training set is absent.
SYNTH_KNOBS = dict(sequences=600, prefill_len=64, decode_len=128, batch_size=4, seed=0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_trace(cache_dir: Path = CACHE_DIR) -> Path:
    """The imported DeepSeek-V2-Lite training set (Puffin, 1,999 prompts, ~30 M accesses).

    Imported once into ``cache_dir`` from ../shared; where ../shared is absent, a synthetic
    DeepSeek-V2-Lite-shaped trace of about 11 M accesses is generated there instead.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    if PUFFIN.is_dir():
        out = cache_dir / "puffin-train.parquet"
        if not out.exists():
            from traces.importers import import_moe_beyond

            log(f"importing {PUFFIN} -> {out} (once) ...")
            t = time.perf_counter()
            import_moe_beyond([PUFFIN], out)
            log(f"  imported in {time.perf_counter() - t:.1f} s")
        return out
    out = cache_dir / "synth-deepseek-v2-lite-11M.parquet"
    if not out.exists():
        from traces.io import write_trace
        from traces.synth import SynthKnobs, synth_trace

        log(f"{PUFFIN} absent: generating a synthetic DeepSeek-V2-Lite trace -> {out} (once) ...")
        t = time.perf_counter()
        write_trace(synth_trace("deepseek-v2-lite", SynthKnobs(**SYNTH_KNOBS)), out)
        log(f"  generated in {time.perf_counter() - t:.1f} s")
    return out


def count_config(slots: int, access: str = "atomic", mode: str = "count", prefetch: str = "none"):
    from simulator.config import SimConfig

    cfg = SimConfig()
    cfg.cache.fraction = None
    cfg.cache.slots = slots
    cfg.cache.scope = "global"
    cfg.replay.mode = mode
    cfg.replay.access = access
    cfg.replay.prefetch = prefetch
    return cfg.validate()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def git_head() -> str:
    try:
        import subprocess

        out = subprocess.run(["git", "log", "--oneline", "-1"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)  # fmt: skip
        if out.returncode:
            return "(not a git checkout)"
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def rate(n: int, seconds: float) -> str:
    """Accesses per second, in millions."""
    return f"{n / seconds / 1e6:8.1f}" if seconds > 0 else "     inf"


def best_of(repeat: int, fn):
    """Run ``fn() -> (seconds, ...)`` ``repeat`` times (at least once); the fastest run's
    tuple."""
    best = None
    for _ in range(max(1, repeat)):
        res = fn()
        if best is None or res[0] < best[0]:
            best = res
    return best
