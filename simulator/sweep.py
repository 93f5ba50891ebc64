"""`moesim sweep`: the grid of runs a configuration asks for, the work each worker does, the rows.

A configuration (sim.toml) names traces, policies, prefetchers, horizons, cache sizes,
bandwidths, modes, access semantics and scopes; :func:`expand` turns it into grid
:class:`Point` s (axes that do not apply are not crossed: no horizon without a prefetcher, no
bandwidth in count mode), each with a :func:`run_key` (a hash of everything its result depends
on, used to resume). :func:`plan` groups points into tasks per trace; :func:`run_task` runs
one in a worker process, which reads and prepares each trace once and keeps it
(:func:`load_prepared`). Count-mode LRU points of one trace, access and scope form one task
served by the one-pass curve (:mod:`simulator.lru_curve`). :func:`run_sweep` drives it all
(:mod:`simulator.cluster` runs the tasks, :mod:`simulator.sweep_store` keeps the results).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from simulator.config import SimConfig
from traces.errors import ConfigError, MoesimError

#: Bump when a grid point's meaning changes, so old parts are not taken for new results.
KEY_VERSION = 1
#: Where relative trace paths are looked up when no configuration file is given: the folder
#: holding moesim's packages (the checkout, or site-packages), where traces/sample/ lives.
INSTALL_ROOT = Path(__file__).resolve().parents[1]
#: Parameter columns every row gets besides run()'s record (docs/sweep.md).
PARAM_COLUMNS = ("bandwidth_gbps", "latency_s", "engines", "dense_s", "dense_per_token_s",
                 "expert_s", "expert_per_token_s", "gpu_hbm_gbps", "gpu_tflops", "pinned",
                 "dtype", "expert_bytes", "method", "run_key")  # fmt: skip


# --------------------------------------------------------------------------- traces
def resolve_traces(patterns: list[str], base_dir: Path | None = None) -> list[str]:
    """Absolute paths of the traces ``patterns`` name (files, folders or glob patterns).

    A relative pattern is looked up in the working directory, then in ``base_dir`` (the
    configuration file's folder; moesim's install root when None). Order kept, duplicates
    dropped; a pattern that matches nothing is an error.
    """
    base = Path(base_dir) if base_dir is not None else INSTALL_ROOT
    out: list[str] = []
    for pat in patterns:
        text = os.path.expanduser(pat)
        roots = [Path(text)] if os.path.isabs(text) else [Path.cwd() / text, base / text]
        found: list[str] = []
        for cand in roots:
            found = sorted(glob.glob(str(cand))) if glob.has_magic(text) else (
                [str(cand)] if cand.exists() else [])  # fmt: skip
            if found:
                break
        if not found:
            where = " or ".join(str(r.parent) for r in roots)
            raise ConfigError(f"traces.paths: {pat!r} matches no trace (looked in {where})")
        for f in found:
            f = str(Path(f).resolve())
            if f not in out:
                out.append(f)
    return out


def fingerprint(path: str) -> str:
    """Identity of a trace's files for run keys: names, sizes and modification times."""
    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    items = []
    for f in files:
        st = f.stat()
        items.append([f.name, st.st_size, st.st_mtime_ns])
    return json.dumps(items)


def model_meta(meta, model_cfg):
    """``meta`` with the [model] overrides applied (expert bytes, dtype)."""
    from traces.presets import DTYPE_BYTES

    if model_cfg.expert_bytes is not None:
        return dataclasses.replace(meta, expert_bytes=[int(model_cfg.expert_bytes)]
                                   * meta.num_layers)  # fmt: skip
    if model_cfg.dtype is not None and model_cfg.dtype != meta.dtype:
        if meta.dtype not in DTYPE_BYTES:
            raise ConfigError(
                f"model.dtype: the trace's dtype {meta.dtype!r} is not one of "
                f"{', '.join(DTYPE_BYTES)}; set model.expert_bytes instead"
            )
        ratio = DTYPE_BYTES[model_cfg.dtype] / DTYPE_BYTES[meta.dtype]
        return dataclasses.replace(
            meta,
            dtype=model_cfg.dtype,
            expert_bytes=[max(1, int(round(b * ratio))) for b in meta.expert_bytes],
            shared_expert_bytes=int(round(meta.shared_expert_bytes * ratio)),
        )
    return meta


#: Per worker process: prepared traces by (path, fingerprint, model overrides), newest last.
_PREPARED: dict[tuple, object] = {}
#: How many prepared traces a worker keeps (tasks come grouped by trace).
KEEP_PREPARED = 2


def load_prepared(path: str, model_cfg, fp: str | None = None):
    """The :class:`~simulator.engine.Prepared` trace at ``path`` with ``model_cfg`` applied,
    read and prepared once per worker process and kept for the tasks that follow."""
    from simulator.engine import prepare
    from traces.io import read_trace

    key = (path, fp or fingerprint(path), model_cfg.dtype, model_cfg.expert_bytes)
    prep = _PREPARED.pop(key, None)
    if prep is None:
        trace = read_trace(path)
        trace = dataclasses.replace(trace, meta=model_meta(trace.meta, model_cfg))
        prep = prepare(trace)
        while len(_PREPARED) >= KEEP_PREPARED:
            _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = prep
    return prep


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Point:
    """One run of the grid. ``size`` is ``(kind, value)`` with kind 'fraction', 'slots' or
    'bytes'; ``horizon`` is 0 without a prefetcher; ``bandwidth_gbps`` None in count mode."""

    trace: str
    mode: str
    access: str
    scope: str
    policy: str
    prefetch: str
    horizon: int
    size: tuple
    bandwidth_gbps: float | None
    free_prefetch: bool

    def config(self, base: SimConfig) -> SimConfig:
        """``base`` with this point's settings (not validated)."""
        c = copy.deepcopy(base)
        c.cache.slots, c.cache.fraction, c.cache.bytes = None, None, None
        setattr(c.cache, self.size[0], self.size[1])
        c.cache.scope = self.scope
        r = c.replay
        r.policies = [self.policy]
        r.mode, r.access, r.prefetch = self.mode, self.access, self.prefetch
        if self.horizon:
            r.horizon = self.horizon
        r.events = 0
        if self.bandwidth_gbps is not None:
            c.link.bandwidth_gbps = self.bandwidth_gbps
        return c

    def describe(self) -> str:
        bw = f" bandwidth={self.bandwidth_gbps:g}" if self.bandwidth_gbps is not None else ""
        hz = f" horizon={self.horizon}" if self.horizon else ""
        return (f"{self.trace}: mode={self.mode} access={self.access} scope={self.scope} "
                f"policy={self.policy} prefetch={self.prefetch}{hz} "
                f"{self.size[0]}={self.size[1]}{bw}")  # fmt: skip


def cache_sizes(cfg: SimConfig) -> list[tuple[str, float]]:
    """The sweep's cache sizes: cache.fractions, slots_list or slots_range, else the one size."""
    c = cfg.cache
    if c.fractions:
        return [("fraction", float(f)) for f in c.fractions]
    if c.slots_list:
        return [("slots", int(n)) for n in c.slots_list]
    if c.slots_range:
        return [("slots", n) for n in range(*c.slots_range)]
    for kind in ("slots", "fraction", "bytes"):
        if getattr(c, kind) is not None:
            return [(kind, getattr(c, kind))]
    raise ConfigError("cache: no cache size given")


def expand(cfg: SimConfig, traces: list[str]) -> list[Point]:
    """Every grid point, in table order (trace, mode, access, scope, policy, prefetcher,
    horizon, size, bandwidth), each once. Each point's configuration is validated."""
    sw = cfg.sweep
    modes = sw.modes or [cfg.replay.mode]
    accesses = sw.accesses or [cfg.replay.access]
    scopes = sw.scopes or [cfg.cache.scope]
    prefetchers = sw.prefetchers or [cfg.replay.prefetch]
    horizons = sw.horizons or [cfg.replay.horizon]
    bandwidths = sw.bandwidths_gbps or [cfg.link.bandwidth_gbps]
    sizes = cache_sizes(cfg)
    points: list[Point] = []
    seen: set[Point] = set()
    checked: set[tuple] = set()
    for trace in traces:
        for mode in modes:
            for access in accesses:
                for scope in scopes:
                    for policy in cfg.replay.policies:
                        for pf in prefetchers:
                            none = pf.strip() == "none"
                            if mode == "count" and not none and not sw.free_prefetch:
                                continue
                            for h in [0] if none else horizons:
                                for size in sizes:
                                    for bw in bandwidths if mode == "timed" else [None]:
                                        p = Point(trace, mode, access, scope, policy,
                                                  "none" if none else pf, h, size, bw,
                                                  mode == "count" and not none)  # fmt: skip
                                        if p in seen:
                                            continue
                                        seen.add(p)
                                        sig = (mode, access, scope, policy, pf, h, size[0], bw)
                                        if sig not in checked:
                                            _validate_point(p, cfg)
                                            checked.add(sig)
                                        points.append(p)
    return points


def _validate_point(p: Point, base: SimConfig) -> None:
    try:
        p.config(base).validate()
    except ConfigError as exc:
        raise ConfigError(f"sweep: {exc}") from None


def fixed_params(cfg: SimConfig, mode: str) -> dict:
    """The settings outside the grid that a run of ``mode`` depends on."""
    out = {"pinned": list(cfg.cache.pinned), "model": dataclasses.asdict(cfg.model)}
    if mode == "timed":
        out["link"] = {"latency_s": cfg.link.latency_s, "engines": cfg.link.engines}
        out["compute"] = dataclasses.asdict(cfg.compute)
    return out


def run_key(p: Point, cfg: SimConfig, fp: str) -> str:
    """A stable hash of everything the point's result depends on (resume key)."""
    body = {"v": KEY_VERSION, "point": dataclasses.asdict(p), "fixed": fixed_params(cfg, p.mode),
            "files": fp}  # fmt: skip
    text = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """Work for one worker: points of one trace, replayed one by one (``kind='replay'``) or
    all count-mode LRU sizes of one access and scope from one pass (``kind='curve'``)."""

    kind: str
    trace: str
    fingerprint: str
    base: SimConfig
    points: list[Point]
    keys: list[str]


def curve_group(p: Point, cfg: SimConfig) -> tuple | None:
    """The one-pass group of a point (trace, access, scope), or None if it is replayed."""
    if not cfg.sweep.one_pass:
        return None
    from simulator.lru_curve import one_pass_reason

    if one_pass_reason(p.config(cfg), p.policy, p.free_prefetch) is not None:
        return None
    return (p.trace, p.access, p.scope, p.policy)


def plan(points: list[Point], keys: list[str], cfg: SimConfig, fps: dict[str, str],
         workers: int) -> list[Task]:  # fmt: skip
    """Tasks for ``points``: one-pass curve groups, then replays in chunks per trace, small
    enough to spread over ``workers`` and large enough to keep the overhead per run low."""
    curves: dict[tuple, Task] = {}
    replays: dict[str, list[tuple[Point, str]]] = {}
    for p, k in zip(points, keys, strict=True):
        g = curve_group(p, cfg)
        if g is not None:
            t = curves.setdefault(g, Task("curve", p.trace, fps[p.trace], cfg, [], []))
            t.points.append(p)
            t.keys.append(k)
        else:
            replays.setdefault(p.trace, []).append((p, k))
    tasks = list(curves.values())
    for trace, items in replays.items():
        tasks += chunk_replays(trace, fps[trace], cfg, items, workers)
    return tasks


def chunk_replays(trace: str, fp: str, cfg: SimConfig, items, workers: int) -> list[Task]:
    n = len(items)
    size = max(1, min(32, math.ceil(n / (4 * max(1, workers)))))
    return [Task("replay", trace, fp, cfg, [p for p, _ in items[i : i + size]],
                 [k for _, k in items[i : i + size]]) for i in range(0, n, size)]  # fmt: skip


def run_task(task: Task) -> tuple[list[dict], list[tuple[Point, str]]]:
    """Run ``task`` in this process: (result rows, points left to replay).

    A curve task leaves the atomic sizes the one pass cannot serve exactly (docs/sweep.md) for
    the caller to replay. A failing point raises its one-line error, naming the point.
    """
    from simulator.warmup import warm_up

    cfg = task.base
    prep = load_prepared(task.trace, cfg.model, task.fingerprint)
    rows: list[dict] = []
    left: list[tuple[Point, str]] = []
    if task.kind == "curve":
        rows, left = _curve(prep, task)
    else:
        from simulator.engine import run

        for p, k in zip(task.points, task.keys, strict=True):
            warm_up(p.mode)
            c = p.config(cfg)
            try:
                rec = run(prep, c, p.policy, free_prefetch=p.free_prefetch)
            except MoesimError as exc:
                raise type(exc)(f"{p.describe()}: {exc}") from None
            rows.append(make_row(rec, p, c, prep, k, "replay"))
    return rows, left


def _curve(prep, task: Task):
    from simulator.engine import geometry
    from simulator.lru_curve import lru_curve, stack_profile

    first = task.points[0]
    profile = stack_profile(prep, first.scope, first.access)
    exact, left = [], []
    for p, k in zip(task.points, task.keys, strict=True):
        c = p.config(task.base)
        try:
            ok = profile.exact(geometry(prep, c).cap)
        except MoesimError as exc:
            raise type(exc)(f"{p.describe()}: {exc}") from None
        (exact if ok else left).append((p, k, c))
    rows = []
    if exact:
        by_kind: dict[str, list] = {}
        for item in exact:
            by_kind.setdefault(item[0].size[0], []).append(item)
        for kind, items in by_kind.items():
            values = [p.size[1] for p, _, _ in items]
            kw = {"slots": values} if kind == "slots" else {"fractions": values}
            recs = lru_curve(prep, items[0][2], policy=first.policy, profile=profile, **kw)
            for (p, k, c), rec in zip(items, recs, strict=True):
                rows.append(make_row(rec, p, c, prep, k, "one-pass"))
    return rows, [(p, k) for p, k, _ in left]


def make_row(rec: dict, p: Point, cfg: SimConfig, prep, key: str, method: str) -> dict:
    """A results-table row: run()'s record (no private keys) plus the parameter columns."""
    row = {k: v for k, v in rec.items() if not k.startswith("_")}
    row["trace"] = p.trace
    timed = p.mode == "timed"
    cp = cfg.compute
    meta = prep.meta
    row.update({
        "bandwidth_gbps": cfg.link.bandwidth_gbps if timed else None,
        "latency_s": cfg.link.latency_s if timed else None,
        "engines": cfg.link.engines if timed else None,
        "dense_s": cp.dense_s if timed else None,
        "dense_per_token_s": cp.dense_per_token_s if timed else None,
        "expert_s": cp.expert_s if timed else None,
        "expert_per_token_s": cp.expert_per_token_s if timed else None,
        "gpu_hbm_gbps": cp.gpu_hbm_gbps if timed else None,
        "gpu_tflops": cp.gpu_tflops if timed else None,
        "pinned": list(cfg.cache.pinned),
        "dtype": meta.dtype,
        "expert_bytes": float(sum(meta.expert_bytes) / len(meta.expert_bytes)),
        "method": method,
        "run_key": key,
    })  # fmt: skip
    return row


# --------------------------------------------------------------------------- driver
@dataclass
class SweepSummary:
    """What :func:`run_sweep` did."""

    results: Path
    total: int  # grid points
    skipped: int  # found finished in parts/ from an earlier run
    ran: int  # run now
    one_pass: int  # of those, served by the one-pass LRU curve
    seconds: float


def run_sweep(cfg: SimConfig, *, out: str | Path | None = None, base_dir: Path | None = None,
              workers: int | None = None, cluster: str | None = None, quiet: bool = False,
              fresh: bool = False, on_part=None) -> SweepSummary:  # fmt: skip
    """Run the grid of ``cfg`` (validated here) and write ``OUT/results.parquet``.

    ``out`` overrides output.folder, ``workers`` sweep.workers, ``cluster`` sweep.cluster.
    Finished points found in ``OUT/parts/`` are skipped (``fresh`` deletes them first).
    ``on_part(rows)`` is called after each batch of results is stored (tests interrupt there).
    """
    from simulator.cluster import executor_for
    from simulator.sweep_store import Store

    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    if out is not None:
        cfg.output.folder = str(out)
    if workers is not None:
        cfg.sweep.workers = workers
    if cluster is not None:
        cfg.sweep.cluster = cluster
    cfg.validate()
    traces = resolve_traces(cfg.traces.paths, base_dir)
    cfg.traces.paths = traces
    points = expand(cfg, traces)
    for t in traces:
        check_sizes(t, cfg)
    fps = {t: fingerprint(t) for t in traces}
    keys = [run_key(p, cfg, fps[p.trace]) for p in points]
    store = Store(Path(cfg.output.folder))
    if fresh:
        store.clear_parts()
    store.write_config(cfg)
    done = store.done_keys()
    todo = [(p, k) for p, k in zip(points, keys, strict=True) if k not in done]
    n_workers = _workers(cfg.sweep.workers)
    ran = one_pass = 0
    if todo:
        tasks = plan([p for p, _ in todo], [k for _, k in todo], cfg, fps, n_workers)
        with executor_for(cfg.sweep.cluster, min(n_workers, len(tasks))) as ex, \
                _progress(len(todo), quiet) as bar:  # fmt: skip
            pending = {ex.submit(run_task, t): t for t in tasks}
            while pending:
                for fut in ex.wait_first(pending):
                    task = pending.pop(fut)
                    rows, left = fut.result()
                    if rows:
                        store.write_part(rows)
                    ran += len(rows)
                    one_pass += sum(r["method"] == "one-pass" for r in rows)
                    bar.update(len(rows))
                    for t in chunk_replays(task.trace, task.fingerprint, cfg, left, n_workers):
                        pending[ex.submit(run_task, t)] = t
                    if on_part is not None and rows:
                        on_part(rows)
    path = store.merge(keys)
    return SweepSummary(path, len(points), len(points) - len(todo), ran, one_pass,
                        time.perf_counter() - t0)  # fmt: skip


def check_sizes(trace: str, cfg: SimConfig) -> None:
    """Fail before any run if a cache size does not fit ``trace`` (read from its footer)."""
    import numpy as np

    from simulator.engine import geometry
    from traces.io import read_meta

    meta = model_meta(read_meta(trace), cfg.model)
    base = np.zeros(meta.num_layers + 1, np.int64)
    np.cumsum(meta.experts_per_layer, out=base[1:])
    obj_layer = np.repeat(np.arange(meta.num_layers), np.diff(base))
    acc = _Shape(num_objects=int(base[-1]), obj_layer=obj_layer, layer_base=base)
    shape = _Shape(meta=meta, acc=acc,
                   obj_bytes=np.asarray(meta.expert_bytes, np.int64)[obj_layer])  # fmt: skip
    for scope in cfg.sweep.scopes or [cfg.cache.scope]:
        for size in cache_sizes(cfg):
            c = copy.deepcopy(cfg)
            c.cache.slots, c.cache.fraction, c.cache.bytes = None, None, None
            setattr(c.cache, size[0], size[1])
            c.cache.scope = scope
            try:
                geometry(shape, c)
            except ConfigError as exc:
                raise ConfigError(f"{trace}: {exc}") from None


class _Shape:
    """Stand-in for a prepared trace where only the model shape is needed."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _workers(n: int) -> int:
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _progress(total: int, quiet: bool):
    import sys

    import tqdm as tq

    tq.tqdm.monitor_interval = 0  # no monitor thread: the local pool forks worker processes
    return tq.tqdm(total=total, unit="run", desc="sweep", file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty(), smoothing=0.1)  # fmt: skip
