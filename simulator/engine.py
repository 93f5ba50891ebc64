"""Python orchestration of a replay: configuration -> cache geometry and state -> kernel -> result.

Python does the per-run set-up (O(experts) work) and calls one jitted kernel that walks every
access; it never loops per access itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from policies.registry import parse_policy
from policies.spec import STRUCT_NONE, PolicySpec
from policies.state import (
    IP_COUNTS_MISSES,
    IP_FUTURE,
    IP_MOVE_ON_HIT,
    OI_NEXT,
    P_USED,
    PINNED,
    new_state,
)
from simulator import fast_count, fast_timed, prefetchers
from simulator import kernels as K
from simulator.accesses import Accesses, build_accesses
from simulator.config import SimConfig
from simulator.kernel_clock import KernelClock
from simulator.prefetch_lists import empty_lists
from traces.errors import ConfigError
from traces.presets import DTYPE_BYTES
from traces.trace import Trace

EVENT_KINDS = {K.EV_DENSE: "dense", K.EV_COMPUTE: "compute", K.EV_DEMAND: "demand",
               K.EV_PREFETCH: "prefetch", K.EV_STALL: "stall"}  # fmt: skip


@dataclass
class Prepared:
    """A trace made ready for many replays (built once, reused by every policy and size)."""

    trace: Trace
    acc: Accesses
    next_use: np.ndarray
    first_use: np.ndarray
    obj_bytes: np.ndarray
    #: prefetch lists and predictions built for this trace, reused across runs (prefetchers.py)
    cache: dict = field(default_factory=dict)

    @property
    def meta(self):
        return self.trace.meta


def prepare(trace: Trace) -> Prepared:
    acc = build_accesses(trace)
    nxt = acc.next_use()
    first = np.full(acc.num_objects, np.iinfo(np.int64).max, np.int64)
    # first access of each object: the smallest index among its accesses
    np.minimum.at(first, acc.obj, np.arange(acc.num_accesses, dtype=np.int64))
    eb = np.asarray(trace.meta.expert_bytes, np.int64)
    obj_bytes = eb[acc.obj_layer]
    return Prepared(trace, acc, nxt, first, obj_bytes)


@dataclass
class Geometry:
    """Cache partitions: which partition each expert uses, its size there, capacities."""

    part: np.ndarray
    size: np.ndarray
    cap: np.ndarray
    hbase: np.ndarray
    slots: int  # total capacity in experts (byte budgets: in experts of the largest size)
    bytes: int  # total capacity in bytes


def geometry(prep: Prepared, cfg: SimConfig, nocache: bool = False) -> Geometry:
    meta = prep.meta
    acc = prep.acc
    n_obj = acc.num_objects
    n_layers = meta.num_layers
    c = cfg.cache
    per_layer = c.scope == "per-layer"
    top_k = meta.top_k or 1
    if per_layer:
        part = acc.obj_layer.astype(np.int32)
        hbase = acc.layer_base[:-1].copy()
        n_part = n_layers
    else:
        part = np.zeros(n_obj, np.int32)
        hbase = np.zeros(1, np.int64)
        n_part = 1
    eb = np.asarray(meta.expert_bytes, np.int64)
    if c.bytes is not None:
        size = prep.obj_bytes.copy()
        total = int(c.bytes)
        if total > int(size.sum()):
            raise ConfigError(
                f"cache.bytes: {total} bytes exceed all {n_obj} experts ({int(size.sum())} bytes)"
            )
        cap = _split(total, n_part)
        need = top_k * (eb if per_layer else np.array([eb.max()]))
        if not nocache and np.any(cap < need):
            raise ConfigError(
                f"cache.bytes: {total} bytes hold fewer than top_k={top_k} experts "
                f"{'in some layer' if per_layer else ''}".rstrip()
            )
        slots = int(total // int(eb.max()))
        total_bytes = total
    else:
        if c.slots is not None:
            slots = int(c.slots)
            key = "cache.slots"
        else:
            slots = int(round(float(c.fraction) * n_obj))
            key = f"cache.fraction ({c.fraction} of {n_obj} experts = {slots} slots)"
        if slots > n_obj:
            raise ConfigError(f"{key}: {slots} slots exceed the trace's {n_obj} experts")
        if slots < 1 and not nocache:
            raise ConfigError(f"{key}: expected at least 1 slot")
        size = np.ones(n_obj, np.int64)
        cap = _split(slots, n_part)
        if not nocache and int(cap.min()) < top_k:
            where = "per layer " if per_layer else ""
            raise ConfigError(
                f"{key}: {int(cap.min())} slots {where}is fewer than top_k={top_k} "
                "(a token's experts must fit at once)"
            )
        total_bytes = int((cap * (eb if per_layer else eb.max())).sum())
    if nocache:
        cap = np.full(n_part, np.iinfo(np.int64).max // 4, np.int64)
    return Geometry(part, size, cap, hbase, slots, total_bytes)


def _split(total: int, n: int) -> np.ndarray:
    """``total`` units split over ``n`` partitions as evenly as possible (first ones get more)."""
    cap = np.full(n, total // n, np.int64)
    cap[: total % n] += 1
    return cap


class PrepareContext:
    """What a policy's ``prepare`` hook may ask for."""

    def __init__(self, prep: Prepared, profile: Prepared | None = None, cfg: SimConfig = None):
        self._prep = prep
        self._profile = profile
        self._cfg = cfg

    def group_layer(self) -> np.ndarray:
        """int64[G]: the MoE layer of each step-layer group."""
        return self._prep.acc.group_layer.astype(np.int64)

    def moe_infinity_matches(self):
        """MoE-Infinity's matches of this trace (simulator/moe_infinity.py), with the settings of
        ``replay.prefetch`` when that is ``moe-infinity:...``, else its defaults; memoised."""
        return prefetchers.matches(self._prep, self._cfg or SimConfig())

    def profile_counts(self) -> np.ndarray:
        """Accesses per expert in the profiling trace (default: the replayed trace)."""
        src = self._profile or self._prep
        n = self._prep.acc.num_objects
        if src.acc.num_objects != n:
            raise ConfigError("profile trace: expert count differs from the replayed trace")
        return np.bincount(src.acc.obj, minlength=n).astype(np.float64)


def _pinned_objects(prep: Prepared, items: list[str]) -> np.ndarray:
    out = []
    meta = prep.meta
    for item in items:
        lay, ex = (int(x) for x in str(item).split(":"))
        if not 0 <= lay < meta.num_layers or not 0 <= ex < meta.experts_per_layer[lay]:
            raise ConfigError(f"cache.pinned: no expert {item!r} in this model")
        out.append(int(prep.acc.layer_base[lay]) + ex)
    return np.asarray(out, np.int64)


def _fparams(spec: PolicySpec, values: dict[str, float]) -> tuple[float, ...]:
    fp = [0.0] * 8
    for p in spec.params:
        fp[p.slot] = values[p.name]
    return tuple(fp)


def run(
    prep: Prepared,
    cfg: SimConfig,
    policy: str,
    *,
    profile: Prepared | None = None,
    free_prefetch: bool = False,
    reset_groups: np.ndarray | None = None,
    measure_groups: np.ndarray | None = None,
) -> dict:
    """Replay ``prep`` under one policy; returns the result record (JSON-ready dict).

    ``free_prefetch`` (count mode): the prefetcher's experts are inserted at zero cost right
    before their layer (the setting MoE-Beyond reports). ``reset_groups``: bool[G], empty the
    cache before these groups (e.g. per prompt). ``measure_groups``: bool[G], count only these
    groups' accesses (others warm the cache up); both count mode only.
    """
    spec, values = parse_policy(policy)
    r = cfg.replay
    nocache = spec.structure == STRUCT_NONE
    geo = geometry(prep, cfg, nocache)
    acc = prep.acc
    st = new_state(spec.pid, spec.structure, geo.part, geo.size, geo.cap, geo.hbase,
                   _fparams(spec, values), nbytes=prep.obj_bytes,
                   layer=acc.obj_layer)  # fmt: skip
    if spec.attach is not None:
        st = spec.attach(st, PrepareContext(prep, profile, cfg))
    st.ip[IP_MOVE_ON_HIT] = int(spec.move_on_hit)
    st.ip[IP_COUNTS_MISSES] = int(spec.counts_misses)
    st.ip[IP_FUTURE] = int(spec.uses_future)
    st.oi[:, OI_NEXT] = prep.first_use
    pinned = _pinned_objects(prep, cfg.cache.pinned)
    if pinned.size and not nocache:
        for o in pinned:
            p = geo.part[o]
            st.status[o] = PINNED
            st.parts[p, P_USED] += geo.size[o]
        if np.any(st.cap - st.used < (prep.meta.top_k or 1) * geo.size.max()):
            raise ConfigError(
                "cache.pinned: pinned experts leave less room than one token's top_k experts"
            )
    if spec.prepare is not None:
        K.preload(*st, spec.prepare(st, PrepareContext(prep, profile, cfg)))
    n_layers = prep.meta.num_layers
    cnt = np.zeros(K.N_COUNTERS, np.int64)
    fl = np.zeros(K.N_FLOATS, np.float64)
    hits_layer = np.zeros(n_layers, np.int64)
    acc_layer = np.zeros(n_layers, np.int64)
    stall_layer = np.zeros(n_layers, np.float64)
    atomic = r.access == "atomic"
    events = None
    if r.mode == "count":
        if r.prefetch != "none" and free_prefetch:
            pf_off, pf_obj = prefetchers.free_lists(prep, cfg)
        elif r.prefetch != "none":
            raise ConfigError(
                "replay.prefetch: count mode has no link to prefetch over; use mode 'timed' "
                "or free prefetch"
            )
        else:
            pf_off, pf_obj, _ = empty_lists(acc.num_groups)
        reset = _bool_mask(reset_groups, acc.num_groups, "reset_groups")
        measure = _bool_mask(measure_groups, acc.num_groups, "measure_groups")
        with KernelClock() as clock:
            if fast_count.applies(spec, st):  # LRU/FIFO: the list-only kernel, same counts
                fast_count.replay_count(st, spec, acc, atomic, pf_off, pf_obj, reset, measure,
                                        prep.obj_bytes, cnt, hits_layer, acc_layer)  # fmt: skip
            else:
                K.replay_count(*st, acc.group_offsets, acc.group_layer, acc.obj, prep.next_use,
                               atomic, pf_off, pf_obj, reset, measure, prep.obj_bytes, cnt,
                               hits_layer, acc_layer,
                               *K.count_scratch(acc.num_objects))  # fmt: skip
        kernel_s = clock.seconds
    else:
        if free_prefetch or reset_groups is not None or measure_groups is not None:
            raise ConfigError("free prefetch, cache resets and warm-up are count-mode settings")
        pf_off, pf_obj, pf_tgt = prefetchers.issue_lists(prep, cfg)
        hw = hardware_vector(prep, cfg)
        n_ev = int(r.events)
        ev = (np.zeros(n_ev, np.int8), np.zeros(n_ev, np.int64), np.zeros(n_ev, np.int32),
              np.zeros(n_ev, np.float64), np.zeros(n_ev, np.float64))  # fmt: skip
        scratch = K.timed_scratch(acc.num_objects, cfg.link.engines)
        with KernelClock() as clock:
            fast = fast_timed.applies(spec, st, n_ev)  # the fast loop where it applies, same record
            if fast and not fast_timed.replay(st, spec, acc, atomic, pf_off, pf_obj, pf_tgt,
                                              prep.obj_bytes, hw, cnt, fl, hits_layer, acc_layer,
                                              stall_layer, scratch):  # fmt: skip
                fast = False  # it gave up (a deferred fetch): the general kernel, afresh
                for a in (cnt, fl, hits_layer, acc_layer, stall_layer):
                    a[:] = 0
                scratch = K.timed_scratch(acc.num_objects, cfg.link.engines)
            if not fast:
                K.replay_timed(*st, acc.group_offsets, acc.group_layer, acc.group_step,
                               acc.group_prefill, acc.group_decode, acc.obj, acc.count,
                               prep.next_use, atomic, pf_off, pf_obj, pf_tgt, prep.obj_bytes,
                               hw, cnt, fl, hits_layer, acc_layer, stall_layer, *ev,
                               *scratch)  # fmt: skip
        kernel_s = clock.seconds
        if n_ev:
            n = int(cnt[K.C_EVENTS])
            events = pd.DataFrame({
                "kind": [EVENT_KINDS[int(k)] for k in ev[0][:n]],
                "group": ev[1][:n],
                "step": acc.group_step[ev[1][:n]],
                "layer": acc.group_layer[ev[1][:n]],
                "expert": np.where(ev[2][:n] >= 0, acc.obj_expert[np.maximum(ev[2][:n], 0)], -1),
                "start_s": ev[3][:n],
                "end_s": ev[4][:n],
            })  # fmt: skip
    return _result(prep, cfg, spec.name, policy, geo, cnt, fl, hits_layer, acc_layer,
                   stall_layer, kernel_s, events, free_prefetch)  # fmt: skip


def _bool_mask(mask, n_groups: int, name: str) -> np.ndarray:
    if mask is None:
        return np.zeros(0, np.bool_)
    mask = np.ascontiguousarray(mask, np.bool_)
    if mask.shape != (n_groups,):
        raise ConfigError(f"{name}: expected one flag per step-layer group ({n_groups})")
    return mask


def hardware_vector(prep: Prepared, cfg: SimConfig) -> np.ndarray:
    """Seconds and bytes/s for the timed kernel, deriving unset expert times by roofline."""
    cp = cfg.compute
    hw = np.zeros(K.N_HW, np.float64)
    hw[K.H_BW] = cfg.link.bandwidth_gbps * 1e9
    hw[K.H_LATENCY] = cfg.link.latency_s
    hw[K.H_ENGINES] = cfg.link.engines
    hw[K.H_DENSE] = cp.dense_s
    hw[K.H_DENSE_TOK] = cp.dense_per_token_s
    mean_bytes = float(np.mean(prep.meta.expert_bytes))
    if cp.expert_s is None:
        hw[K.H_EXPERT] = mean_bytes / (cp.gpu_hbm_gbps * 1e9)
    else:
        hw[K.H_EXPERT] = cp.expert_s
    if cp.expert_per_token_s is None:
        params = mean_bytes / DTYPE_BYTES.get(prep.meta.dtype, 2.0)
        hw[K.H_EXPERT_TOK] = 2.0 * params / (cp.gpu_tflops * 1e12)
    else:
        hw[K.H_EXPERT_TOK] = cp.expert_per_token_s
    return hw


def _result(prep, cfg, name, policy_text, geo, cnt, fl, hits_layer, acc_layer, stall_layer,
            kernel_s, events, free_prefetch) -> dict:  # fmt: skip
    r = cfg.replay
    accesses = int(acc_layer.sum())
    hits = int(cnt[K.C_HITS])
    timed = r.mode == "timed"
    if "num_tokens" not in prep.cache:
        prep.cache["num_tokens"] = prep.trace.num_tokens
    tokens = prep.cache["num_tokens"]
    res = {
        "policy": name if policy_text == name else policy_text,
        "trace": prep.trace.path,
        "model": prep.meta.model,
        "mode": r.mode,
        "access": r.access,
        "scope": cfg.cache.scope,
        "prefetch": ("free-" if free_prefetch else "") + r.prefetch,
        "horizon": r.horizon if r.prefetch != "none" else 0,
        "cache_slots": geo.slots,
        "cache_bytes": geo.bytes,
        "cache_fraction": geo.slots / prep.acc.num_objects,
        "accesses": accesses,
        "hits": hits,
        "misses": int(cnt[K.C_MISSES]),
        "inflight_hits": int(cnt[K.C_INFLIGHT_HITS]),
        "hit_rate": hits / accesses if accesses else 0.0,
        "evictions": int(cnt[K.C_EVICTIONS]),
        "forced_evictions": int(cnt[K.C_FORCED]),
        "deferred_fetches": int(cnt[K.C_DEFERRED]),
        "capacity_overflows": int(cnt[K.C_OVERFLOW]),
        "bytes_moved": int(cnt[K.C_BYTES]),
        "prefetch_issued": int(cnt[K.C_PF_ISSUED]),
        "prefetch_used": int(cnt[K.C_PF_USED]),
        "prefetch_wasted": int(cnt[K.C_PF_WASTED]),
        "prefetch_bytes": int(cnt[K.C_PF_BYTES]),
        "prefetch_wasted_bytes": int(cnt[K.C_PF_WASTED_BYTES]),
        "prefetch_late": int(cnt[K.C_PF_LATE]),
        "prefetch_cancelled": int(cnt[K.C_PF_CANCELLED]),
        "prefetch_dropped": int(cnt[K.C_PF_DROPPED]),
        "tokens": tokens,
        "stall_s": float(fl[K.F_STALL]) if timed else None,
        "stall_s_per_token": float(fl[K.F_STALL]) / max(tokens, 1) if timed else None,
        "late_prefetch_stall_s": float(fl[K.F_LATE_STALL]) if timed else None,
        "total_s": float(fl[K.F_TOTAL]) if timed else None,
        "compute_s": float(fl[K.F_COMPUTE]) if timed else None,
        "link_busy": float(fl[K.F_LINK_BUSY] / (fl[K.F_TOTAL] * cfg.link.engines))
        if timed and fl[K.F_TOTAL] > 0
        else None,
        "prefill_s_per_token": _ratio(fl[K.F_PREFILL_TIME], cnt[K.C_PREFILL_TOKENS], timed),
        "decode_s_per_token": _ratio(fl[K.F_DECODE_TIME], cnt[K.C_DECODE_TOKENS], timed),
        "decode_step_s": _ratio(fl[K.F_DECODE_TIME], cnt[K.C_DECODE_STEPS], timed),
        "hit_rate_per_layer": [
            float(h / a) if a else None for h, a in zip(hits_layer, acc_layer, strict=True)
        ],
        "stall_s_per_layer": [float(x) for x in stall_layer] if timed else None,
        "kernel_s": kernel_s,
    }
    if events is not None:
        res["_events"] = events
    return res


def _ratio(num, den, timed):
    if not timed or den == 0:
        return None
    return float(num / den)
