#!/usr/bin/env python
"""End to end: the whole DeepSeek-V2-Lite training set from Parquet under six policies.

Measures, in one fresh process: importing moesim and loading its compiled kernels, reading the
Parquet trace, ``prepare`` (the replay order and next-use arrays) and one ``run`` per policy,
each stage's wall time, the total (target: under a minute) and the peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). ``--cli`` instead times the command a user
types, ``moesim replay TRACE --policy ... --cache-fraction 0.1 --mode MODE`` in a child
process (wall time and the child's peak memory from ``RUSAGE_CHILDREN``).

    python benchmarks/bench_end_to_end.py [TRACE] [--mode count|timed] [--cli]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()
T_MAIN = T_START

import argparse  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import REPO, default_trace, git_head, machine, peak_rss_mib  # noqa: E402

POLICIES = ["lru", "fifo", "lfu", "lfu-aged", "belady", "static"]


def in_process(path: Path, mode: str, access: str, fraction: float, policies: list[str]) -> float:
    stages: list[tuple[str, float, str]] = []
    t = time.perf_counter()
    from simulator.config import SimConfig
    from simulator.engine import prepare, run
    from simulator.warmup import warm_up
    from traces.io import read_trace

    warm_up(mode)
    stages.append(("import moesim + load kernels", time.perf_counter() - t, ""))
    t = time.perf_counter()
    trace = read_trace(path)
    stages.append(("read Parquet", time.perf_counter() - t, f"{trace.num_rows:,} rows"))
    t = time.perf_counter()
    prep = prepare(trace)
    n = prep.acc.num_accesses
    stages.append(("prepare", time.perf_counter() - t, f"{n:,} accesses"))
    cfg = SimConfig()
    cfg.cache.fraction = fraction
    cfg.replay.mode = mode
    cfg.replay.access = access
    cfg.validate()
    for policy in policies:
        t = time.perf_counter()
        rec = run(prep, cfg, policy)
        wall = time.perf_counter() - t
        note = (f"hit rate {rec['hit_rate']:.4f}, kernel {rec['kernel_s']:.2f} s "
                f"({n / rec['kernel_s'] / 1e6:.1f} M accesses/s)")  # fmt: skip
        stages.append((f"run {policy}", wall, note))
    total = sum(sec for _, sec, _ in stages)
    for name, sec, note in stages:
        print(f"  {name:30} {sec:7.2f} s  {note}")
    print(f"  {'(Python start-up, before)':30} {T_MAIN - T_START:7.2f} s")
    return total


def via_cli(path: Path, mode: str, access: str, fraction: float, policies: list[str]) -> float:
    cmd = [sys.executable, "-m", "simulator.cli", "replay", str(path), "--mode", mode,
           "--access", access, "--cache-fraction", str(fraction)]  # fmt: skip
    for p in policies:
        cmd += ["--policy", p]
    print("  $ " + " ".join(cmd[1:]))
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        raise SystemExit(r.returncode)
    for line in r.stdout.splitlines():
        print("  | " + line)
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"  child wall {wall:.2f} s, child peak RSS {child:.0f} MiB")
    return wall


def main(argv=None) -> int:
    global T_MAIN
    T_MAIN = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", help="moesim trace (.parquet); default: Puffin set")
    ap.add_argument("--mode", choices=["count", "timed"], default="count")
    ap.add_argument("--access", choices=["atomic", "sequential"], default="atomic")
    ap.add_argument("--fraction", type=float, default=0.1, help="cache size, fraction of experts")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    ap.add_argument("--cli", action="store_true", help="time `moesim replay` in a child process")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    path = Path(args.trace) if args.trace else default_trace()
    print(f"# moesim end to end ({machine()})")
    print(f"# moesim at {git_head()}")
    print(f"trace {path} ({path.stat().st_size / 2**20:.0f} MiB), {len(policies)} policies: "
          f"{', '.join(policies)}; {args.mode} mode, {args.access}, cache fraction "
          f"{args.fraction}")  # fmt: skip
    if args.cli:
        total = via_cli(path, args.mode, args.access, args.fraction, policies)
    else:
        total = in_process(path, args.mode, args.access, args.fraction, policies)
        print(f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"total {total:.1f} s: {'within' if total < 60 else 'OVER'} the one-minute target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
