"""Evaluation protocols from published work, built on the count-mode engine.

MoE-Beyond (arXiv 2508.17137) scores its expert predictor with a per-prompt cache protocol:

- each prompt is replayed token by token (token-major: token 0 at layers 1..26, token 1, ...)
  through a global LRU cache that is **emptied at the start of every prompt**;
- the first ``warmup_tokens`` (10) tokens of a prompt only **warm the cache** (not counted, no
  predictions inserted);
- before each later (token, layer) the **predicted experts are accessed at zero cost** (a hit
  moves them to the MRU end, a miss inserts them), then the real experts are accessed and
  counted, one by one (classic sequential cache semantics);
- hit rate = hits / accesses summed over all prompts (prompts of at most ``warmup_tokens``
  tokens count nothing).

Two details of its simulator's code (``cache_simulator/infinity_moe_sim.py`` of
ngavhane/moe-beyond) go beyond that description; both are options here:

- ``fill="random"``: the emptied cache is first filled with ``cache slots`` experts drawn at
  random from all layers (unseeded ``np.random.shuffle`` there, ``seed`` here), the first drawn
  being the least recently used;
- ``repeat_first_measured=True``: its warm-up loop stops *after* accessing the first row it
  then measures (token ``warmup_tokens`` at the first layer), so that row is accessed twice.

:class:`ProtocolRunner` turns a trace into a :class:`~simulator.engine.Prepared` replay plus
``reset_groups``/``measure_groups`` masks for :func:`simulator.engine.run`. A fill is played as
extra unmeasured steps right after the reset, one step per filled expert in fill order: on an
empty cache these are inserted without evictions, which leaves an LRU (or FIFO) cache exactly
as MoE-Beyond's ``OrderedDict`` after its random initial fill (other policies see one use
each). :func:`moe_beyond_reference` is a plain-Python replay of the protocol written from the
description above, to check the engine against.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from simulator.config import SimConfig
from simulator.engine import Prepared, prepare, run
from traces.errors import ConfigError
from traces.io import trace_from_arrays
from traces.trace import Trace

FILLS = ("none", "random", "profile")


@dataclass(frozen=True)
class PerSequenceProtocol:
    """A per-sequence cache protocol (defaults: MoE-Beyond's as its paper describes it).

    Attributes:
        warmup_tokens: tokens (``pos`` < this) of each sequence replayed but not counted.
        reset: empty the cache at the start of every sequence.
        fill: after the reset, ``"none"``; ``"random"``: as many random experts as the cache
            (or each per-layer partition) holds, drawn afresh for every sequence from
            ``numpy.random.default_rng(seed)``; ``"profile"``: the profile's hottest experts
            (the placement of a static policy), accessed coldest first.
        seed: seed of the random fill.
        prefetch_during_warmup: also insert predicted experts before warm-up tokens.
        repeat_first_measured: access the first measured group's experts once more as part of
            the warm-up (the MoE-Beyond code's loop boundary).
    """

    warmup_tokens: int = 10
    reset: bool = True
    fill: str = "none"
    seed: int = 0
    prefetch_during_warmup: bool = False
    repeat_first_measured: bool = False

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ConfigError(
                f"protocol fill: expected one of {', '.join(FILLS)}, got {self.fill!r}"
            )
        if self.fill != "none" and not self.reset:
            raise ConfigError(
                "protocol fill: a fill needs reset=True (it refills the emptied cache)"
            )
        if self.warmup_tokens < 0:
            raise ConfigError("protocol warmup_tokens: expected >= 0")


#: MoE-Beyond's protocol as its paper states it (reset per prompt, 10 warm-up tokens).
MOE_BEYOND = PerSequenceProtocol()
#: The same as its simulator's code runs it (random initial fill, row repeated at the boundary).
MOE_BEYOND_CODE = PerSequenceProtocol(fill="random", repeat_first_measured=True)


@dataclass
class ProtocolReplay:
    """A trace rebuilt for one protocol (and one cache geometry, where the fill depends on it)."""

    prep: Prepared
    reset_groups: np.ndarray
    measure_groups: np.ndarray
    fills: dict[int, np.ndarray] = field(default_factory=dict)  # seq -> objects, in fill order
    sequences: int = 0
    measured_sequences: int = 0
    measured_rows: int = 0


def split_slots(total: int, n: int) -> np.ndarray:
    """``total`` slots over ``n`` partitions, the first ones one more (as the engine splits)."""
    cap = np.full(n, total // n, np.int64)
    cap[: total % n] += 1
    return cap


def _cache_slots(cfg: SimConfig, n_obj: int) -> int:
    c = cfg.cache
    if c.bytes is not None:
        raise ConfigError("protocol fill: byte budgets are not supported, give cache slots")
    return int(c.slots) if c.slots is not None else int(round(float(c.fraction) * n_obj))


def _csr_take(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray):
    """CSR lists of ``rows`` (``-1``: an empty list): (offsets, values)."""
    lens = np.where(rows >= 0, offsets[rows + 1] - offsets[np.maximum(rows, 0)], 0)
    off = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    starts = np.where(rows >= 0, offsets[np.maximum(rows, 0)], 0)
    idx = np.repeat(starts - off[:-1], lens) + np.arange(off[-1])
    return off, values[idx]


def _sequence_runs(trace: Trace):
    """Per sequence, in replay order: (seq, first row, end row). Raises unless every step holds
    one sequence and each sequence's steps are consecutive."""
    n = trace.num_rows
    if n == 0:
        return []
    step, seq = trace.step, trace.seq
    new_step = np.ones(n, bool)
    new_step[1:] = step[1:] != step[:-1]
    step_start = np.flatnonzero(new_step)
    step_id = np.cumsum(new_step) - 1
    # every row of a step belongs to the step's first row's sequence
    if np.any(seq != seq[step_start][step_id]):
        raise ConfigError(
            "per-sequence protocol: a step holds several sequences; import with per-token "
            "steps (one sequence per step)"
        )
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    ends = np.r_[starts[1:], n]
    if np.unique(seq[starts]).shape[0] != starts.shape[0]:
        raise ConfigError(
            "per-sequence protocol: a sequence's steps are not consecutive (sequences interleave)"
        )
    return [(int(seq[a]), int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


class ProtocolRunner:
    """Replays one trace under a :class:`PerSequenceProtocol` for many policies and sizes.

    ``profile_counts`` (float[objects]): uses per expert in a profiling trace, for
    ``fill="profile"``. The rebuilt trace is cached per cache geometry (only fills depend on it).
    """

    def __init__(
        self,
        trace: Trace,
        protocol: PerSequenceProtocol = MOE_BEYOND,
        *,
        profile_counts: np.ndarray | None = None,
    ):
        self.trace = trace
        self.protocol = protocol
        self.profile_counts = profile_counts
        self._runs = _sequence_runs(trace)
        self._built: dict[tuple, ProtocolReplay] = {}
        epl = np.asarray(trace.meta.experts_per_layer, np.int64)
        self.layer_base = np.r_[0, np.cumsum(epl)]
        self.num_objects = int(self.layer_base[-1])
        if protocol.fill == "profile":
            if profile_counts is None:
                raise ConfigError("protocol fill 'profile': give profile_counts")
            if np.asarray(profile_counts).shape != (self.num_objects,):
                raise ConfigError("protocol fill 'profile': profile expert count differs")

    # -- building -------------------------------------------------------------------------
    def replay(self, cfg: SimConfig) -> ProtocolReplay:
        """The rebuilt trace and masks for ``cfg``'s cache geometry."""
        p = self.protocol
        key = ("any",)
        if p.fill != "none":
            key = (_cache_slots(cfg, self.num_objects), cfg.cache.scope)
        if key not in self._built:
            caps = None
            if p.fill != "none":
                slots, scope = key
                n_layers = self.trace.meta.num_layers
                caps = split_slots(slots, n_layers) if scope == "per-layer" else np.array([slots])
            self._built[key] = self._build(caps)
        return self._built[key]

    def _fill_objects(self, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        per_layer = caps.shape[0] > 1
        base = self.layer_base
        if self.protocol.fill == "random":
            if not per_layer:
                return rng.permutation(self.num_objects)[: int(caps[0])]
            chosen = np.concatenate([
                base[lay] + rng.permutation(int(base[lay + 1] - base[lay]))[: int(c)]
                for lay, c in enumerate(caps)
            ])  # fmt: skip
            return rng.permutation(chosen)
        counts = np.asarray(self.profile_counts, np.float64)
        order = np.lexsort((np.arange(self.num_objects), -counts))  # hottest first
        layer_of = np.searchsorted(base, order, side="right") - 1
        part = layer_of if per_layer else np.zeros_like(layer_of)
        room = caps.copy()
        keep = []
        for o, q in zip(order, part, strict=True):
            if counts[o] > 0 and room[q] > 0:
                room[q] -= 1
                keep.append(o)
        return np.asarray(keep[::-1], np.int64)  # coldest first: the hottest end up MRU

    def _build(self, caps: np.ndarray | None) -> ProtocolReplay:
        p, tr = self.protocol, self.trace
        rng = np.random.default_rng(p.seed)
        # per output row: source row (-1: a fill row), filled object, new step, sequence,
        # measured, keeps its predictions
        src_p, obj_p, step_p, seq_p, meas_p, pred_p = [], [], [], [], [], []
        starts = []  # first output row of each sequence
        fills: dict[int, np.ndarray] = {}
        n_rows = n_steps = measured_sequences = 0

        def emit(src, obj, step, seq, meas, pred):
            nonlocal n_rows
            k = src.shape[0]
            src_p.append(src)
            obj_p.append(obj)
            step_p.append(step)
            seq_p.append(np.full(k, seq, np.int64))
            meas_p.append(meas)
            pred_p.append(pred)
            n_rows += k

        for seq, a, b in self._runs:
            starts.append(n_rows)
            rows = np.arange(a, b, dtype=np.int64)
            measured = tr.pos[a:b] >= p.warmup_tokens
            _, local = np.unique(tr.step[a:b], return_inverse=True)
            local = local.astype(np.int64)
            # a group (step, layer) must be all warm-up or all measured
            gid = np.unique(local * (1 << 16) + tr.layer[a:b], return_inverse=True)[1]
            all_meas = np.ones(b - a, bool)
            np.logical_and.at(all_meas, gid, measured)
            if np.any(all_meas[gid] != measured):
                raise ConfigError(
                    "per-sequence protocol: a step-layer group mixes warm-up and measured "
                    "tokens; warm-up by tokens needs per-token steps"
                )
            if caps is not None:
                objs = self._fill_objects(caps, rng).astype(np.int64)
                fills[seq] = objs
                k = objs.shape[0]
                none = np.zeros(k, bool)
                emit(np.full(k, -1, np.int64), objs, n_steps + np.arange(k), seq, none, none)
                n_steps += k
            keep_pred = measured | p.prefetch_during_warmup
            if measured.any():
                measured_sequences += 1
            if p.repeat_first_measured and measured.any():
                s0 = local[int(np.argmax(measured))]  # the first measured step
                j = int(np.searchsorted(local, s0))  # its first row
                lay = tr.layer[a:b]
                rep = rows[(local == s0) & (lay == lay[local == s0].min())]
                none = np.zeros(rep.shape[0], bool)
                emit(rows[:j], np.full(j, -1, np.int64), n_steps + local[:j], seq,
                     measured[:j], keep_pred[:j])  # fmt: skip
                emit(rep, np.full(rep.shape[0], -1, np.int64),
                     np.full(rep.shape[0], n_steps + s0), seq, none, none)  # fmt: skip
                emit(rows[j:], np.full(b - a - j, -1, np.int64), n_steps + 1 + local[j:], seq,
                     measured[j:], keep_pred[j:])  # fmt: skip
                n_steps += int(local[-1]) + 2
            else:
                emit(rows, np.full(b - a, -1, np.int64), n_steps + local, seq, measured,
                     keep_pred)  # fmt: skip
                n_steps += int(local[-1]) + 1
        cat = np.concatenate
        src, meas_row = cat(src_p), cat(meas_p)
        new_tr = self._trace(src, cat(obj_p), cat(step_p), cat(seq_p), cat(pred_p))
        prep = prepare(new_tr)
        g = prep.acc.row_group
        measure = np.zeros(prep.acc.num_groups, bool)
        measure[g[meas_row]] = True
        reset = np.zeros(prep.acc.num_groups, bool)
        if p.reset:
            reset[g[np.asarray(starts, np.int64)]] = True
        return ProtocolReplay(prep, reset, measure, fills, len(self._runs), measured_sequences,
                              int(meas_row.sum()))  # fmt: skip

    def _trace(self, src, fill_obj, new_step, seq, pred_row) -> Trace:
        tr = self.trace
        base = self.layer_base
        is_fill = src < 0
        s = np.maximum(src, 0)
        fill_layer = np.searchsorted(base, np.maximum(fill_obj, 0), side="right") - 1
        layer = np.where(is_fill, fill_layer, tr.layer[s])
        off, ex = _csr_take(tr.offsets, tr.experts, src)
        # fill rows: one expert each, spliced in where the row is a fill
        lens = np.diff(off) + is_fill
        off2 = np.zeros(src.shape[0] + 1, np.int64)
        np.cumsum(lens, out=off2[1:])
        experts = np.empty(int(off2[-1]), np.int64)
        experts[np.repeat(~is_fill, lens)] = ex
        experts[off2[:-1][is_fill]] = fill_obj[is_fill] - base[fill_layer[is_fill]]
        preds = {
            h: _csr_take(po, pv, np.where(pred_row & ~is_fill, src, -1))
            for h, (po, pv) in tr.preds.items()
        }
        return trace_from_arrays(tr.meta, step=new_step, seq=seq,
                                 pos=np.where(is_fill, -1, tr.pos[s]),
                                 phase=np.where(is_fill, 1, tr.phase[s]), layer=layer,
                                 offsets=off2, experts=experts, preds=preds,
                                 path=tr.path)  # fmt: skip

    # -- running --------------------------------------------------------------------------
    def run(
        self,
        cfg: SimConfig,
        policy: str,
        *,
        free_prefetch: bool = False,
        profile: Prepared | None = None,
    ) -> dict:
        """:func:`simulator.engine.run` under the protocol (count mode)."""
        if cfg.replay.mode != "count":
            raise ConfigError("per-sequence protocol: count mode only")
        rep = self.replay(cfg)
        return run(rep.prep, cfg, policy, profile=profile, free_prefetch=free_prefetch,
                   reset_groups=rep.reset_groups, measure_groups=rep.measure_groups)  # fmt: skip


def popularity_predictions(
    trace: Trace, counts: np.ndarray, k: int, horizon: int = 1, ties: str = "high"
) -> Trace:
    """A copy of ``trace`` whose ``pred_h{horizon}`` gives every row its layer's ``k`` most
    used experts in ``counts`` (float[objects]; ``ties="high"``: among equal counts the higher
    expert id first, as a reversed ascending sort; ``"low"``: the lower first).

    A static per-layer popularity predictor: what the activation-matrix (MoE-Infinity-style)
    heuristic of MoE-Beyond's simulator predicts when its collection is clustered into one
    centroid (the mean matrix of its profiling prompts).
    """
    epl = np.asarray(trace.meta.experts_per_layer, np.int64)
    if not 0 < k <= int(epl.min()):
        raise ConfigError(f"popularity_predictions: k={k} must be 1..{int(epl.min())}")
    base = np.r_[0, np.cumsum(epl)]
    tops = []
    for lay in range(trace.meta.num_layers):
        c = np.asarray(counts[base[lay] : base[lay + 1]], np.float64)
        if ties == "high":
            tops.append(np.argsort(c, kind="stable")[::-1][:k])
        elif ties == "low":
            tops.append(np.argsort(-c, kind="stable")[:k])
        else:
            raise ConfigError(
                f"popularity_predictions ties: expected 'high' or 'low', got {ties!r}"
            )
    top = np.asarray(tops, np.int64)  # [layers, k]
    n = trace.num_rows
    off = np.arange(n + 1, dtype=np.int64) * k
    ids = top[trace.layer.astype(np.int64)].reshape(-1)
    preds = dict(trace.preds)
    preds[horizon] = (off, ids)
    return dataclasses.replace(trace, preds=preds)


class _LRU:
    """A plain LRU of ``slots`` keys (an ``OrderedDict``, least recently used first)."""

    def __init__(self, slots: int, fill=()):
        self.slots = slots
        self.d: OrderedDict[int, bool] = OrderedDict((int(o), True) for o in fill)

    def access(self, o: int) -> bool:
        if o in self.d:
            self.d.move_to_end(o)
            return True
        if len(self.d) >= self.slots:
            self.d.popitem(last=False)
        self.d[o] = True
        return False


def moe_beyond_reference(
    trace: Trace,
    slots: int,
    *,
    warmup_tokens: int = 10,
    fills: dict[int, np.ndarray] | None = None,
    predictions: bool = True,
    repeat_first_measured: bool = False,
    horizon: int = 1,
) -> tuple[int, int]:
    """(hits, accesses) of MoE-Beyond's protocol replayed in plain Python (global LRU).

    Per sequence: a fresh LRU of ``slots`` experts, first holding ``fills[seq]`` (oldest first);
    rows in step then layer order; the rows of the first ``warmup_tokens`` tokens (and, with
    ``repeat_first_measured``, the next row too) access their experts uncounted; every later
    row first accesses its predicted experts (uncounted) and then its experts, each counted.
    A slow reference for tests; not for whole traces.
    """
    base = np.r_[0, np.cumsum(np.asarray(trace.meta.experts_per_layer, np.int64))]
    hits = accesses = 0
    pred = trace.preds.get(horizon) if predictions else None

    def objects(r: int, offsets, ids) -> list[int]:
        lb = int(base[trace.layer[r]])
        return [lb + int(e) for e in ids[offsets[r] : offsets[r + 1]]]

    for seq, a, b in _sequence_runs(trace):
        order = np.lexsort((trace.layer[a:b], trace.step[a:b])) + a
        cache = _LRU(slots, (fills or {}).get(seq, ()))
        warm = [r for r in order if trace.pos[r] < warmup_tokens]
        meas = [r for r in order if trace.pos[r] >= warmup_tokens]
        extra = meas[:1] if repeat_first_measured else []
        for r in warm + extra:
            for o in objects(r, trace.offsets, trace.experts):
                cache.access(o)
        for r in meas:
            if pred is not None:
                for o in objects(r, *pred):
                    cache.access(o)
            for o in dict.fromkeys(objects(r, trace.offsets, trace.experts)):
                accesses += 1
                hits += cache.access(o)
    return hits, accesses
