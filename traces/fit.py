"""Estimate synth knobs from a trace (``moesim synth --fit``), by matching statistics.

Structure knobs (sequences, prefill/decode lengths and their jitter, batch size) are read off
the trace. The routing knobs (per-layer ``skew``, ``reuse``, ``cross_layer``) are fitted by
*indirect inference*: three statistics are measured on the trace,

* per-layer popularity entropy ``H_l`` (nats) of the experts' assignment counts,
* ``overlap``: mean ``|S_t & S_{t-1}| / k`` of the expert sets of consecutive tokens of a
  sequence at the same layer,
* ``cross_mi``: mutual information (nats, averaged over layer pairs) between an expert of a
  token at layer ``l-1`` and one at layer ``l`` (all ``k x k`` pairs),

and the knobs are adjusted (damped Newton steps, Jacobian from finite differences) until a
synthetic trace with the *same* layers, experts, top-k and per-sequence lengths shows the same
statistics. Finite-sample biases (an entropy estimate is low, mutual information high, on few
tokens) then cancel, and knobs mean the same thing in fitted and hand-set traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from traces.errors import TraceError
from traces.synth import SynthKnobs, generate
from traces.trace import Trace

#: Seed of the calibration traces (any fixed value: the fit is deterministic).
FIT_SEED = 0x5EEDF17
#: Traces with more activations are fitted on their first sequences up to this many.
FIT_MAX_ACTIVATIONS = 4_000_000
SKEW_MAX = 6.0


# --------------------------------------------------------------------------- statistics
@dataclass
class RoutingStats:
    """Statistics of a trace's routing (the quantities the fit matches).

    Attributes:
        entropy: float64[L]: entropy (nats) of each layer's expert assignment counts.
        overlap: mean overlap ``|S_t & S_prev| / k`` of consecutive tokens (same seq, layer).
        overlap_chance: what ``overlap`` would be for independent tokens with the same
            per-layer popularity (``sum_e pi_e**2 / k``, averaged like ``overlap``).
        cross_mi: mean over layer pairs (l-1, l) of the mutual information (nats) between a
            token's experts at the two layers.
        overlap_per_layer, cross_mi_per_layer: float64[L] (NaN where there are no pairs).
        reuse_pairs, cross_pairs: number of consecutive-token / adjacent-layer row pairs.
    """

    entropy: np.ndarray
    overlap: float
    overlap_chance: float
    cross_mi: float
    overlap_per_layer: np.ndarray
    cross_mi_per_layer: np.ndarray
    reuse_pairs: int
    cross_pairs: int

    @property
    def reuse_corrected(self) -> float:
        """Chance-corrected overlap: (overlap - chance) / (1 - chance)."""
        c = self.overlap_chance
        return float((self.overlap - c) / (1.0 - c)) if c < 1.0 else 0.0


def row_pairs(seq, pos, layer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs (prev_tok, cur_tok) of consecutive recorded tokens of a sequence at one layer,
    and (prev_layer, cur_layer) of one token at layers l-1 and l."""
    seq = np.asarray(seq)
    pos = np.asarray(pos)
    layer = np.asarray(layer)
    o = np.lexsort((pos, layer, seq))
    same = (seq[o[1:]] == seq[o[:-1]]) & (layer[o[1:]] == layer[o[:-1]])
    tok_prev, tok_cur = o[:-1][same], o[1:][same]
    o = np.lexsort((layer, pos, seq))
    adj = (
        (seq[o[1:]] == seq[o[:-1]])
        & (pos[o[1:]] == pos[o[:-1]])
        & (layer[o[1:]].astype(np.int64) == layer[o[:-1]].astype(np.int64) + 1)
    )
    lay_prev, lay_cur = o[:-1][adj], o[1:][adj]
    return (tok_prev.astype(np.int64), tok_cur.astype(np.int64),
            lay_prev.astype(np.int64), lay_cur.astype(np.int64))  # fmt: skip


@njit(cache=True)
def _stats_kernel(layer, offsets, experts, n_layers, e_max, tok_prev, tok_cur, lay_prev, lay_cur):
    counts = np.zeros((n_layers, e_max), np.float64)
    for i in range(layer.shape[0]):
        for j in range(offsets[i], offsets[i + 1]):
            counts[layer[i], experts[j]] += 1.0
    rows = np.zeros(n_layers, np.float64)
    for i in range(layer.shape[0]):
        rows[layer[i]] += 1.0
    entropy = np.zeros(n_layers, np.float64)
    chance = np.zeros(n_layers, np.float64)
    for l in range(n_layers):
        total = 0.0
        for e in range(e_max):
            total += counts[l, e]
        h = 0.0
        sq = 0.0
        for e in range(e_max):
            c = counts[l, e]
            if c > 0:
                p = c / total
                h -= p * math.log(p)
            if rows[l] > 0:
                sq += (c / rows[l]) ** 2
        entropy[l] = h
        k_mean = total / rows[l] if rows[l] > 0 else 1.0
        chance[l] = sq / k_mean
    ov = np.zeros(n_layers, np.float64)
    ov_n = np.zeros(n_layers, np.float64)
    for p in range(tok_prev.shape[0]):
        a = tok_prev[p]
        b = tok_cur[p]
        hit = 0
        for x in range(offsets[a], offsets[a + 1]):
            for y in range(offsets[b], offsets[b + 1]):
                if experts[x] == experts[y]:
                    hit += 1
        n = min(offsets[a + 1] - offsets[a], offsets[b + 1] - offsets[b])
        if n > 0:
            ov[layer[b]] += hit / n
            ov_n[layer[b]] += 1.0
    joint = np.zeros((n_layers, e_max, e_max), np.float64)
    for p in range(lay_prev.shape[0]):
        a = lay_prev[p]
        b = lay_cur[p]
        lb = layer[b]
        for x in range(offsets[a], offsets[a + 1]):
            for y in range(offsets[b], offsets[b + 1]):
                joint[lb, experts[x], experts[y]] += 1.0
    mi = np.full(n_layers, np.nan)
    pa = np.zeros(e_max, np.float64)
    pb = np.zeros(e_max, np.float64)
    for l in range(1, n_layers):
        total = 0.0
        pa[:] = 0.0
        pb[:] = 0.0
        for x in range(e_max):
            for y in range(e_max):
                c = joint[l, x, y]
                total += c
                pa[x] += c
                pb[y] += c
        if total == 0:
            continue
        s = 0.0
        for x in range(e_max):
            for y in range(e_max):
                c = joint[l, x, y]
                if c > 0:
                    s += c / total * math.log(c * total / (pa[x] * pb[y]))
        mi[l] = s
    return entropy, chance, ov, ov_n, mi


def stats_of_arrays(layer, offsets, experts, n_layers, e_max, pairs) -> RoutingStats:
    """RoutingStats of rows given as arrays, with pairs from :func:`row_pairs`."""
    tok_prev, tok_cur, lay_prev, lay_cur = pairs
    entropy, chance, ov, ov_n, mi = _stats_kernel(
        np.ascontiguousarray(layer, dtype=np.int64), np.ascontiguousarray(offsets, np.int64),
        np.ascontiguousarray(experts, np.int64), np.int64(n_layers), np.int64(e_max),
        tok_prev, tok_cur, lay_prev, lay_cur,
    )  # fmt: skip
    n_pairs = ov_n.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        ov_layer = np.where(ov_n > 0, ov / np.maximum(ov_n, 1), np.nan)
    overlap = float(ov.sum() / n_pairs) if n_pairs else float("nan")
    ov_chance = float((chance * ov_n).sum() / n_pairs) if n_pairs else float("nan")
    finite = mi[np.isfinite(mi)]
    return RoutingStats(
        entropy=entropy,
        overlap=overlap,
        overlap_chance=ov_chance,
        cross_mi=float(finite.mean()) if finite.size else float("nan"),
        overlap_per_layer=ov_layer,
        cross_mi_per_layer=mi,
        reuse_pairs=int(tok_prev.shape[0]),
        cross_pairs=int(lay_prev.shape[0]),
    )


def routing_stats(trace: Trace) -> RoutingStats:
    """The statistics :func:`fit_knobs` matches, measured on ``trace``."""
    pairs = row_pairs(trace.seq, trace.pos, trace.layer)
    return stats_of_arrays(trace.layer, trace.offsets, trace.experts, trace.meta.num_layers,
                           trace.meta.max_experts, pairs)  # fmt: skip


# --------------------------------------------------------------------------- structure
@dataclass
class Structure:
    """How a trace's tokens are laid out: per-sequence lengths and the decode batch."""

    prefill: np.ndarray  # int64[S]: prefill tokens of each sequence
    decode: np.ndarray  # int64[S]: decode tokens of each sequence
    batch_size: int | None  # most decode tokens in one step; None without decode steps

    def knobs(self) -> dict:
        pre, dec = self.prefill.astype(np.float64), self.decode.astype(np.float64)
        return {
            "sequences": int(pre.shape[0]),
            "prefill_len": max(1, int(round(pre.mean()))),
            "prefill_jitter": _jitter(pre),
            "decode_len": int(round(dec.mean())),
            "decode_jitter": _jitter(dec),
        }


def _jitter(x: np.ndarray) -> float:
    """Relative half-width of the uniform law with the lengths' mean and spread, in [0, 1]."""
    m = float(x.mean())
    if m <= 0 or x.shape[0] < 2:
        return 0.0
    return round(min(1.0, math.sqrt(3.0) * float(x.std()) / m), 3)


def trace_structure(trace: Trace) -> Structure:
    """Per-sequence prefill/decode token counts and the largest decode batch of ``trace``."""
    if trace.num_rows == 0:
        raise TraceError(f"{trace.path}: the trace has no rows to fit")
    seq_values, seq_idx = np.unique(trace.seq, return_inverse=True)
    key = seq_idx.astype(np.int64) * (int(trace.pos.max()) + 1) + trace.pos
    _, first = np.unique(key, return_index=True)
    tok_seq = seq_idx[first]
    tok_phase = trace.phase[first]
    n = seq_values.shape[0]
    prefill = np.bincount(tok_seq[tok_phase == 0], minlength=n).astype(np.int64)
    decode = np.bincount(tok_seq[tok_phase == 1], minlength=n).astype(np.int64)
    batch = None
    dec = tok_phase == 1
    if dec.any():
        _, per_step = np.unique(trace.step[first][dec], return_counts=True)
        batch = int(per_step.max())
    return Structure(prefill, decode, batch)


def _subset(trace: Trace, max_activations: int) -> Trace:
    """The rows of the first sequences (by id) holding at most ``max_activations``."""
    if trace.num_activations <= max_activations:
        return trace
    seq_values, seq_idx = np.unique(trace.seq, return_inverse=True)
    per_seq = np.bincount(seq_idx, weights=np.diff(trace.offsets), minlength=seq_values.shape[0])
    keep_n = max(1, int(np.searchsorted(np.cumsum(per_seq), max_activations, side="right")))
    rows = np.flatnonzero(seq_idx < keep_n)
    lengths = np.diff(trace.offsets)[rows]
    offsets = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = trace.offsets[rows]
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(lengths.sum()))
    return Trace(
        meta=trace.meta, step=trace.step[rows], seq=trace.seq[rows], pos=trace.pos[rows],
        phase=trace.phase[rows], layer=trace.layer[rows], offsets=offsets,
        experts=trace.experts[idx], path=trace.path,
    )  # fmt: skip


# --------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    """Fitted knobs and how well the calibrated synthetic trace matches the target.

    Attributes:
        knobs: the fitted knobs (structure from the trace, routing from the calibration).
        target: statistics of the (possibly truncated) trace.
        achieved: statistics of the synthetic calibration trace at the fitted knobs.
        iterations: Newton iterations run (each generates 4 or more synthetic traces).
        fitted_activations: activations of the trace the statistics were measured on.
        notes: anything the fit could not estimate (kept at the given defaults).
    """

    knobs: SynthKnobs
    target: RoutingStats
    achieved: RoutingStats
    iterations: int
    fitted_activations: int
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        k, t, a = self.knobs, self.target, self.achieved
        skews = k.skew_per_layer(t.entropy.shape[0])
        lines = [
            f"fitted on {self.fitted_activations:,} activations in {self.iterations} iterations",
            f"  skew         {skews.mean():.3f} (layers {skews.min():.3f}..{skews.max():.3f})   "
            f"entropy target {t.entropy.mean():.4f} / synthetic {a.entropy.mean():.4f} nats",
            f"  reuse        {k.reuse:.3f}   overlap target {t.overlap:.4f} / synthetic "
            f"{a.overlap:.4f} (chance {t.overlap_chance:.4f})",
            f"  cross_layer  {k.cross_layer:.3f}   mutual information target {t.cross_mi:.4f} / "
            f"synthetic {a.cross_mi:.4f} nats",
            f"  sequences {k.sequences}, prefill_len {k.prefill_len} (jitter {k.prefill_jitter}), "
            f"decode_len {k.decode_len} (jitter {k.decode_jitter}), batch_size {k.batch_size}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def fit_knobs(
    trace: Trace,
    base: SynthKnobs | None = None,
    *,
    max_iter: int = 8,
    max_activations: int = FIT_MAX_ACTIVATIONS,
    seed: int = FIT_SEED,
) -> FitResult:
    """Estimate synth knobs that make synthetic traces look like ``trace``.

    Args:
        trace: a valid trace with a fixed top-k (or rows of equal length).
        base: knobs to start from; those the trace cannot tell (e.g. ``batch_size`` of a trace
            without decode steps, ``seed``) are kept from it.
        max_iter: most calibration iterations.
        max_activations: fit on the first sequences holding at most this many activations.
        seed: seed of the synthetic calibration traces.
    """
    base = base or SynthKnobs()
    notes: list[str] = []
    meta = trace.meta
    lengths = np.diff(trace.offsets)
    top_k = meta.top_k
    if top_k is None:
        values, counts = np.unique(lengths, return_counts=True)
        top_k = int(values[np.argmax(counts)])
        if values.shape[0] > 1:
            raise TraceError(f"{trace.path}: rows route different numbers of experts: cannot fit")
    epl = np.asarray(meta.experts_per_layer, dtype=np.int64)
    n_layers = int(meta.num_layers)

    full = trace_structure(trace)
    structure = full.knobs()
    batch = full.batch_size if full.batch_size is not None else base.batch_size
    if meta.steps != "native":
        batch = base.batch_size
        notes.append(
            f"steps were formed by the importer (steps '{meta.steps}'), not by a runtime: "
            f"batch_size kept at {base.batch_size}; phases taken as recorded"
        )
    elif full.batch_size is None:
        notes.append(f"no decode steps: batch_size kept at {base.batch_size}")

    sub = _subset(trace, max_activations)
    if sub is not trace:
        notes.append(f"statistics from the first {np.unique(sub.seq).shape[0]} sequences")
    target = routing_stats(sub)
    st = trace_structure(sub)
    prefill, decode = st.prefill, st.decode

    fit_reuse = target.reuse_pairs > 0
    fit_cross = target.cross_pairs > 0 and n_layers > 1
    if not fit_reuse:
        notes.append(f"no consecutive tokens: reuse kept at {base.reuse}")
    if not fit_cross:
        notes.append(f"no adjacent layers: cross_layer kept at {base.cross_layer}")

    # Calibration structure: the same sequences (decode batch does not change statistics).
    cal_batch = max(1, full.batch_size or 1)
    pairs_cache: list = []

    def stats_for(skews: np.ndarray, reuse: float, cross: float) -> RoutingStats:
        r = generate(epl, top_k, skews, reuse, cross, prefill, decode, cal_batch, seed)
        if not pairs_cache:
            pairs_cache.append(row_pairs(r.seq, r.pos, r.layer))
        return stats_of_arrays(r.layer, r.offsets, r.experts, n_layers, int(epl.max()),
                               pairs_cache[0])  # fmt: skip

    # Starting point: reuse from the chance-corrected overlap, then a few bisection steps on
    # each knob alone (each statistic grows or falls monotonically with its knob): cross_layer
    # on the mutual information, one skew for all layers on the mean entropy, then reuse.
    skews = np.full(n_layers, 0.5)
    reuse = float(np.clip(target.reuse_corrected, 0.0, 0.95)) if fit_reuse else float(base.reuse)
    cross = float(base.cross_layer)
    if fit_cross:
        a, b = 0.0, 1.0
        for _ in range(4):
            mid = (a + b) / 2
            if stats_for(skews, reuse, mid).cross_mi < target.cross_mi:
                a = mid
            else:
                b = mid
        cross = (a + b) / 2
    a, b = 0.0, 2.0
    for _ in range(4):
        mid = (a + b) / 2
        if stats_for(np.full(n_layers, mid), reuse, cross).entropy.mean() > target.entropy.mean():
            a = mid
        else:
            b = mid
    skews = np.full(n_layers, (a + b) / 2)
    if fit_reuse:
        a, b = 0.0, 1.0
        for _ in range(3):
            mid = (a + b) / 2
            if stats_for(skews, mid, cross).overlap < target.overlap:
                a = mid
            else:
                b = mid
        reuse = (a + b) / 2

    def residual(s: RoutingStats) -> np.ndarray:
        return np.concatenate(
            [
                target.entropy - s.entropy,
                [target.overlap - s.overlap if fit_reuse else 0.0],
                [_log(target.cross_mi) - _log(s.cross_mi) if fit_cross else 0.0],
            ]
        )

    # Newton iterations on x = (skew_0..skew_{L-1}, reuse, cross) with a fresh Jacobian each
    # time and backtracking on the residual scaled by each statistic's tolerance.
    tol = np.concatenate([np.full(n_layers, 5e-3), [2e-3, 1e-2]])
    scale = np.concatenate([np.full(n_layers, 1.0 / math.sqrt(n_layers)), [1.0, 1.0]]) / tol
    lo = np.zeros(n_layers + 2)
    hi = np.concatenate([np.full(n_layers, SKEW_MAX), [1.0, 1.0]])
    max_step = np.concatenate([np.full(n_layers, 0.5), [0.25, 0.25]])
    free = np.concatenate([np.ones(n_layers, bool), [fit_reuse, fit_cross]])
    x = np.concatenate([skews, [reuse, cross]])

    def evaluate(x: np.ndarray) -> tuple[RoutingStats, np.ndarray, float]:
        s = stats_for(x[:n_layers], float(x[n_layers]), float(x[n_layers + 1]))
        r = residual(s)
        return s, r, float(np.linalg.norm(r * scale))

    cur, res, norm = evaluate(x)
    it = 0
    while it < max_iter and not np.all(np.abs(res) <= tol):
        it += 1
        jac = _jacobian(stats_for, residual, res, x[:n_layers], float(x[n_layers]),
                        float(x[n_layers + 1]), fit_reuse, fit_cross)  # fmt: skip
        step = np.where(free, np.clip(_solve(jac, res), -max_step, max_step), 0.0)
        improved = False
        for _ in range(3):
            x_new = np.clip(x + step, lo, hi)
            s_new, r_new, n_new = evaluate(x_new)
            if n_new < norm:
                x, cur, res, norm = x_new, s_new, r_new, n_new
                improved = True
                break
            step = step / 2
        if not improved:  # noisy Jacobian: try moving one block of knobs alone
            for block in (
                slice(0, n_layers),
                slice(n_layers, n_layers + 1),
                slice(n_layers + 1, None),
            ):
                only = np.zeros_like(step)
                only[block] = step[block] * 4
                x_new = np.clip(x + only, lo, hi)
                s_new, r_new, n_new = evaluate(x_new)
                if n_new < norm:
                    x, cur, res, norm = x_new, s_new, r_new, n_new
                    improved = True
        if not improved:
            break
    if not np.all(np.abs(res) <= 4 * tol):
        notes.append(
            "calibration stopped short of matching the statistics (mean |entropy| error "
            f"{np.abs(res[:n_layers]).mean():.4f} nats, overlap {res[n_layers]:+.4f}, "
            f"log mutual information {res[n_layers + 1]:+.3f}): knobs are approximate"
        )
    skews, reuse, cross = x[:n_layers], float(x[n_layers]), float(x[n_layers + 1])

    knobs = SynthKnobs(
        skew=[round(float(s), 4) for s in skews],
        reuse=round(reuse, 4),
        cross_layer=round(cross, 4),
        sequences=structure["sequences"],
        prefill_len=structure["prefill_len"],
        prefill_jitter=structure["prefill_jitter"],
        decode_len=structure["decode_len"],
        decode_jitter=structure["decode_jitter"],
        batch_size=int(batch),
        seed=base.seed,
        fitted_from=f"{meta.model} ({Path(trace.path).name})",
    )
    return FitResult(knobs, target, cur, it, sub.num_activations, notes)


def _log(x: float) -> float:
    """Mutual information is matched on a log scale (it grows about geometrically with
    ``cross_layer``)."""
    return math.log(max(float(x), 1e-9))


def _jacobian(stats_for, residual, res, skews, reuse, cross, fit_reuse, fit_cross):
    """Jacobian of the statistics (entropy_l..., overlap, cross_mi) by finite differences.

    Skews move together in one run: each layer's entropy is credited to its own skew, the
    overlap's and mutual information's response is spread evenly over the layers.
    """
    n_layers = skews.shape[0]
    n = n_layers + 2
    jac = np.zeros((n, n))
    d = 0.05
    dir_s = np.where(skews + d <= SKEW_MAX, d, -d)
    diff = res - residual(stats_for(skews + dir_s, reuse, cross))  # change of the statistics
    jac[np.arange(n_layers), np.arange(n_layers)] = diff[:n_layers] / dir_s
    if abs(dir_s.sum()) > 0:
        jac[n_layers:, :n_layers] = diff[n_layers:, None] / dir_s.sum()
    for idx, on, value in ((n_layers, fit_reuse, reuse), (n_layers + 1, fit_cross, cross)):
        if not on:
            jac[idx, idx] = 1.0
            continue
        h = d if value + d <= 1.0 else -d
        r2, c2 = (reuse + h, cross) if idx == n_layers else (reuse, cross + h)
        jac[:, idx] = (res - residual(stats_for(skews, r2, c2))) / h
        if abs(jac[idx, idx]) < 1e-6:
            jac[idx, idx] = 1e-6
    for l in range(n_layers):
        if abs(jac[l, l]) < 1e-4:  # entropy is flat in skew near 0: keep the step bounded
            jac[l, l] = -1e-4
    return jac


def _solve(jac: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Newton step: solve jac @ step = res (least squares if singular)."""
    try:
        return np.linalg.solve(jac, res)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(jac, res, rcond=None)[0]
