"""Synthetic expert-activation traces: a seeded, numba-compiled generator with researcher knobs.

The model (``docs/synth.md`` is the user-facing description):

* **Steps (continuous batching).** Sequences are admitted in id order while fewer than
  ``batch_size`` are running. Admitting a sequence runs its prompt as one prefill step (all its
  prompt tokens). Then one decode step runs one token of every running sequence (ascending id);
  a sequence leaves after its last decode token and the freed slot is filled before the next
  decode step. With equal lengths this is static batching in lockstep.
* **Routing.** For each (token, layer) row, each of the ``top_k`` slots ``j`` picks a mechanism:
  with probability ``reuse`` it re-uses slot ``j`` of the previous token of the same sequence at
  the same layer; otherwise, with probability ``cross_layer``, it draws from the token's
  *cross-layer group* at this layer; otherwise from the whole layer's popularity. Popularity is
  Zipf with exponent ``skew`` over a seeded per-layer permutation. Each layer's experts, in
  popularity order, are dealt round-robin into ``experts // cross_group`` groups of (nearly)
  equal popularity; the token's group at layer ``l`` is the group number of its top (slot 0)
  expert at layer ``l-1``. Draws within a group are weighted by popularity, so the layer's
  marginal popularity stays Zipf. Draws are without replacement (a taken expert is redrawn,
  a failed group draw falls back to the layer): rows hold exactly ``top_k`` distinct experts.
* **Gate weights.** ``top_k`` standard normal logits, sorted descending, softmax over the row,
  rounded to bfloat16 precision; slot 0 holds the largest weight (rank order).
* **Randomness.** A counter-based generator (SplitMix64 finaliser of ``key + counter``): every
  uniform is a pure function of (seed, row, slot, draw), so the same seed gives the same trace
  on any machine, and changing a knob changes only the decisions it governs (the fit relies on
  this: common random numbers).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import atomic_path, trace_from_arrays
from traces.presets import ModelPreset, get_preset
from traces.trace import Trace

#: Version of the generator's model; stored in ``meta.extra["synth_version"]``.
SYNTH_VERSION = 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0
#: Draws per (row, slot): 0 reuse, 1 cross, 2..13 popularity attempts, 14-15 gate logit.
_DRAWS = 16
_POP_TRIES = 12

# Command-line flag of each knob, for error messages.
_FLAGS = {
    "skew": "--skew",
    "reuse": "--reuse",
    "cross_layer": "--cross-layer",
    "cross_group": "--cross-group",
    "sequences": "--sequences",
    "prefill_len": "--prefill-len",
    "prefill_jitter": "--prefill-jitter",
    "decode_len": "--decode-len",
    "decode_jitter": "--decode-jitter",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "fitted_from": "fitted_from",
}


# --------------------------------------------------------------------------- knobs
@dataclass
class SynthKnobs:
    """The knobs of the synthetic-trace model (saved in ``meta.extra["synth"]`` of each trace).

    The routing defaults are about what ``synth --fit`` finds on DeepSeek-V2-Lite chat prompts.

    Attributes:
        skew: Zipf exponent of expert popularity (>= 0; 0 = uniform): expert of popularity rank
            ``r`` (0-based) is drawn with weight ``(r + 1) ** -skew``. One number for every layer
            or a list with one per layer (a list of another length is stretched over the depth).
        reuse: probability (0..1) that a slot re-uses the expert in the same slot of the previous
            token of the same sequence at the same layer (temporal locality).
        cross_layer: probability (0..1) that a slot not re-used is drawn from the token's
            cross-layer group instead of the whole layer: the group is the most frequent one
            among the token's experts at the previous layer (see ``cross_group``), so earlier
            layers predict it.
        cross_group: experts per cross-layer group (0 = twice top-k); the layer's experts, in
            popularity order, are dealt round-robin into ``experts // cross_group`` groups.
        sequences: number of sequences (requests).
        prefill_len: prompt tokens per sequence (mean; >= 1).
        prefill_jitter: relative spread of prompt lengths (0..1): each length is drawn uniformly
            from ``prefill_len * [1 - j, 1 + j]`` and rounded (at least 1).
        decode_len: generated (decode) tokens per sequence (mean; >= 0).
        decode_jitter: relative spread of decode lengths (0..1), as ``prefill_jitter``.
        batch_size: most sequences decoding together (continuous batching slots; >= 1).
        seed: seed of everything random (0 .. 2**63-1): same knobs and seed, same trace.
        fitted_from: where fitted knobs came from (informative; empty for hand-set knobs).
    """

    skew: float | list[float] = 0.5
    reuse: float = 0.15
    cross_layer: float = 0.8
    cross_group: int = 0
    sequences: int = 16
    prefill_len: int = 128
    prefill_jitter: float = 0.0
    decode_len: int = 128
    decode_jitter: float = 0.0
    batch_size: int = 8
    seed: int = 0
    fitted_from: str = ""

    # ------------------------------------------------------------------ checks
    def validate(self, where: str | None = None) -> SynthKnobs:
        """Raise ConfigError naming the flag (or, with ``where``, the JSON key) of a bad value."""

        def bad(key: str, expected: str, got: Any) -> ConfigError:
            name = f"{where}: key '{key}'" if where else _FLAGS[key]
            return ConfigError(f"{name}: expected {expected}, got {got!r}")

        skews = self.skew if isinstance(self.skew, list) else [self.skew]
        if not skews or not all(_is_real(s) and 0.0 <= s <= 20.0 for s in skews):
            raise bad("skew", "a number in 0..20 (or a non-empty list of them)", self.skew)
        for key in ("reuse", "cross_layer", "prefill_jitter", "decode_jitter"):
            value = getattr(self, key)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise bad(key, "a probability in [0, 1]" if "jitter" not in key else
                          "a fraction in [0, 1]", value)  # fmt: skip
        for key, low in (("sequences", 1), ("prefill_len", 1), ("decode_len", 0),
                         ("batch_size", 1), ("seed", 0), ("cross_group", 0)):  # fmt: skip
            value = getattr(self, key)
            if not _is_int(value) or value < low or value >= 2**63:
                raise bad(key, f"an integer >= {low}", value)
        if not isinstance(self.fitted_from, str):
            raise bad("fitted_from", "a string", self.fitted_from)
        return self

    def skew_per_layer(self, num_layers: int) -> np.ndarray:
        """float64[num_layers]: the skew of each layer (a list of other length is interpolated
        linearly over relative depth)."""
        if not isinstance(self.skew, list):
            return np.full(num_layers, float(self.skew))
        src = np.asarray(self.skew, dtype=np.float64)
        if src.shape[0] == num_layers:
            return src.copy()
        if src.shape[0] == 1:
            return np.full(num_layers, src[0])
        x_src = (np.arange(src.shape[0]) + 0.5) / src.shape[0]
        x_dst = (np.arange(num_layers) + 0.5) / num_layers
        return np.interp(x_dst, x_src, src)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["skew"], list):
            d["skew"] = [float(s) for s in d["skew"]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, where: str = "knobs") -> SynthKnobs:
        """Knobs from a dict (missing keys take their defaults); ConfigError naming a bad key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object of synth knobs")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key '{unknown[0]}' (expected some of {', '.join(sorted(known))})"
            )
        knobs = cls(**raw)
        return knobs.validate(where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SynthKnobs:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read knobs file ({exc.strerror or exc})") from None
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, str(p))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        with atomic_path(p) as tmp:
            tmp.write_text(self.to_json())
        return p


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


# --------------------------------------------------------------------------- RNG
@njit(cache=True)
def _mix64(z):
    """SplitMix64 finaliser: a bijective 64-bit mixer."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _u01(key, counter):
    """Uniform in [0, 1) that depends only on (key, counter)."""
    z = _mix64(key + np.uint64(counter) * _GOLDEN)
    return np.float64(z >> np.uint64(11)) * _INV53


@njit(cache=True)
def _derive_key(seed, stream):
    """Independent 64-bit keys for the generator's streams (0 layout, 1 lengths, 2 routing)."""
    return _mix64(_mix64(np.uint64(seed) + _GOLDEN) + np.uint64(stream + 1) * _M1)


def _key(seed: int, stream: int) -> np.uint64:
    """The key of one stream as a numpy uint64 (numba returns a Python int)."""
    return np.uint64(_derive_key(np.int64(seed), np.int64(stream)))


# --------------------------------------------------------------------------- tables
@njit(cache=True)
def _tables(epl, skews, group, key):
    """Popularity tables of every layer.

    Returns ``cdf[l, r]`` (cumulative Zipf weight of ranks 0..r), ``perm[l, r]`` (expert of
    popularity rank r), ``rank[l, e]`` (its inverse), ``n_groups[l]`` and, for the cross-layer
    groups (group ``z`` holds ranks ``z, z + C, z + 2C, ...``), ``gcdf[l, z, i]`` (cumulative
    weight of its first i+1 members) and ``gsize[l, z]``.
    """
    n_layers = epl.shape[0]
    e_max = 0
    for e in epl:
        e_max = max(e_max, e)
    cdf = np.ones((n_layers, e_max), np.float64)
    perm = np.full((n_layers, e_max), -1, np.int64)
    rank = np.full((n_layers, e_max), -1, np.int64)
    n_groups = np.empty(n_layers, np.int64)
    c_max = max(1, e_max // group)
    gcdf = np.ones((n_layers, c_max, max(1, e_max)), np.float64)
    gsize = np.zeros((n_layers, c_max), np.int64)
    ctr = 0
    for l in range(n_layers):
        n_e = epl[l]
        weight = np.empty(n_e, np.float64)
        total = 0.0
        for r in range(n_e):
            weight[r] = (r + 1.0) ** (-skews[l])
            total += weight[r]
        acc = 0.0
        for r in range(n_e):
            acc += weight[r]
            cdf[l, r] = acc / total
        cdf[l, n_e - 1] = 1.0
        for r in range(n_e):
            perm[l, r] = r
        for r in range(n_e - 1, 0, -1):  # Fisher-Yates
            u = _u01(key, ctr)
            ctr += 1
            s = int(u * (r + 1))
            perm[l, r], perm[l, s] = perm[l, s], perm[l, r]
        for r in range(n_e):
            rank[l, perm[l, r]] = r
        c = max(1, n_e // group)
        n_groups[l] = c
        for z in range(c):
            gt = 0.0
            i = 0
            for r in range(z, n_e, c):
                gt += weight[r]
                gcdf[l, z, i] = gt
                i += 1
            gsize[l, z] = i
            for j in range(i):
                gcdf[l, z, j] /= gt
            gcdf[l, z, i - 1] = 1.0
    return cdf, perm, rank, n_groups, gcdf, gsize


@njit(cache=True)
def _lengths(mean, jitter, n, key, stream, low):
    out = np.empty(n, np.int64)
    for s in range(n):
        u = _u01(key, 2 * s + stream)
        x = mean * (1.0 + jitter * (2.0 * u - 1.0))
        out[s] = max(low, int(math.floor(x + 0.5)))
    return out


@njit(cache=True)
def _schedule(prefill, decode, batch):
    """Continuous batching: token arrays in step order plus step start offsets."""
    n_seq = prefill.shape[0]
    n_tok = 0
    n_dec = 0
    for s in range(n_seq):
        n_tok += prefill[s] + decode[s]
        n_dec += decode[s]
    tok_seq = np.empty(n_tok, np.int64)
    tok_pos = np.empty(n_tok, np.int32)
    tok_phase = np.empty(n_tok, np.int8)
    step_start = np.empty(n_seq + n_dec + 1, np.int64)
    running = np.empty(batch, np.int64)
    done = np.zeros(n_seq, np.int64)
    n_run = 0
    nxt = 0
    t = 0
    st = 0
    while nxt < n_seq or n_run > 0:
        while n_run < batch and nxt < n_seq:
            s = nxt
            nxt += 1
            if prefill[s] > 0:
                step_start[st] = t
                st += 1
                for p in range(prefill[s]):
                    tok_seq[t] = s
                    tok_pos[t] = p
                    tok_phase[t] = 0
                    t += 1
            if decode[s] > 0:
                running[n_run] = s
                n_run += 1
        if n_run > 0:
            step_start[st] = t
            st += 1
            m = 0
            for i in range(n_run):
                s = running[i]
                tok_seq[t] = s
                tok_pos[t] = prefill[s] + done[s]
                tok_phase[t] = 1
                t += 1
                done[s] += 1
                if done[s] < decode[s]:
                    running[m] = s
                    m += 1
            n_run = m
    step_start[st] = t
    return tok_seq, tok_pos, tok_phase, step_start[: st + 1].copy()


# --------------------------------------------------------------------------- routing kernel
@njit(cache=True)
def _search(table, n, u):
    """First index i < n with table[i] > u (table ascending, table[n-1] == 1 > u)."""
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if table[mid] > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True)
def _route(tok_seq, step_start, n_seq, top_k, epl, cdf, perm, rank, n_groups, gcdf, gsize,
           reuse, cross, key):  # fmt: skip
    """Experts and gate weights of every row, rows in (step, layer, seq, pos) order.

    Returns (row_token int64[n], row_layer int16[n], experts int16[n*k], weights float32[n*k]).
    """
    n_layers = epl.shape[0]
    n_tok = tok_seq.shape[0]
    n_rows = n_tok * n_layers
    k = top_k
    row_token = np.empty(n_rows, np.int64)
    row_layer = np.empty(n_rows, np.int16)
    experts = np.empty(n_rows * k, np.int16)
    weights = np.empty(n_rows * k, np.float32)
    last = np.full(n_seq * n_layers, -1, np.int64)
    e_max = perm.shape[1]
    mark = np.full(e_max, -1, np.int64)
    kind = np.empty(k, np.int8)
    z = np.empty(k, np.float64)
    gcount = np.zeros(e_max, np.int64)
    grp = 0
    n_g = 1
    n_c = 1
    row = 0
    for st in range(step_start.shape[0] - 1):
        a = step_start[st]
        b = step_start[st + 1]
        m = b - a
        for l in range(n_layers):
            n_e = epl[l]
            for t in range(a, b):
                s = tok_seq[t]
                row_token[row] = t
                row_layer[row] = l
                base = row * k
                prev = last[s * n_layers + l]
                for j in range(k):
                    c0 = (row * k + j) * _DRAWS
                    if prev >= 0 and _u01(key, c0) < reuse:
                        kind[j] = 0
                    elif l > 0 and _u01(key, c0 + 1) < cross:
                        kind[j] = 1
                    else:
                        kind[j] = 2
                for j in range(k):  # re-use: distinct because the previous row is
                    if kind[j] == 0:
                        e = experts[prev * k + j]
                        experts[base + j] = e
                        mark[e] = row
                if l > 0:  # the token's group: the most frequent among its experts one layer up
                    n_c = n_groups[l]
                    up = (row - m) * k
                    for j in range(k):
                        gcount[rank[l - 1, experts[up + j]] % n_c] = 0
                    best = -1
                    for j in range(k):  # ties go to the group of the higher-ranked expert
                        g = rank[l - 1, experts[up + j]] % n_c
                        gcount[g] += 1
                    for j in range(k):
                        g = rank[l - 1, experts[up + j]] % n_c
                        if gcount[g] > best:
                            best = gcount[g]
                            grp = g
                    n_g = gsize[l, grp]
                for j in range(k):  # cross-layer: popularity-weighted within the group
                    if kind[j] == 1:
                        c0 = (row * k + j) * _DRAWS
                        kind[j] = 2
                        for att in range(_POP_TRIES):
                            i = _search(gcdf[l, grp], n_g, _u01(key, c0 + 2 + att))
                            cand = perm[l, grp + i * n_c]
                            if mark[cand] != row:
                                experts[base + j] = cand
                                mark[cand] = row
                                kind[j] = 1
                                break
                for j in range(k):  # popularity, without replacement
                    if kind[j] == 2:
                        c0 = (row * k + j) * _DRAWS
                        e = -1
                        for att in range(_POP_TRIES):
                            cand = perm[l, _search(cdf[l], n_e, _u01(key, c0 + 2 + att))]
                            if mark[cand] != row:
                                e = cand
                                break
                        if e < 0:  # the most popular expert not yet taken
                            for r in range(n_e):
                                if mark[perm[l, r]] != row:
                                    e = perm[l, r]
                                    break
                        experts[base + j] = e
                        mark[e] = row
                for j in range(k):  # gate logits: standard normal (Box-Muller)
                    c0 = (row * k + j) * _DRAWS
                    u1 = _u01(key, c0 + 14)
                    u2 = _u01(key, c0 + 15)
                    z[j] = math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
                for j in range(1, k):  # sort descending (k is small)
                    v = z[j]
                    i = j - 1
                    while i >= 0 and z[i] < v:
                        z[i + 1] = z[i]
                        i -= 1
                    z[i + 1] = v
                zmax = z[0]
                total = 0.0
                for j in range(k):
                    z[j] = math.exp(z[j] - zmax)
                    total += z[j]
                for j in range(k):
                    weights[base + j] = np.float32(z[j] / total)
                last[s * n_layers + l] = row
                row += 1
    return row_token, row_layer, experts, weights


def _round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) to bfloat16 precision, kept as float32."""
    bits = w.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------- API
@dataclass
class Routed:
    """Raw generator output (rows in replay order) before it becomes a :class:`Trace`."""

    step: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    top_k: int

    @property
    def offsets(self) -> np.ndarray:
        return np.arange(self.layer.shape[0] + 1, dtype=np.int64) * self.top_k


def sequence_lengths(knobs: SynthKnobs) -> tuple[np.ndarray, np.ndarray]:
    """(prefill int64[S], decode int64[S]): the jittered lengths of each sequence."""
    key = _key(knobs.seed, 1)
    n = int(knobs.sequences)
    pre = _lengths(float(knobs.prefill_len), float(knobs.prefill_jitter), n, key, 0, 1)
    dec = _lengths(float(knobs.decode_len), float(knobs.decode_jitter), n, key, 1, 0)
    return pre, dec


def generate(
    experts_per_layer,
    top_k: int,
    skews,
    reuse: float,
    cross_layer: float,
    prefill: np.ndarray,
    decode: np.ndarray,
    batch_size: int,
    seed: int,
    group: int = 0,
) -> Routed:
    """Generate rows for explicit per-sequence lengths (the core used by synth and the fit)."""
    epl = np.ascontiguousarray(experts_per_layer, dtype=np.int64)
    if top_k > int(epl.min()):
        raise ConfigError(f"top_k={top_k} exceeds the experts of a layer ({int(epl.min())})")
    skews = np.ascontiguousarray(skews, dtype=np.float64)
    prefill = np.ascontiguousarray(prefill, dtype=np.int64)
    decode = np.ascontiguousarray(decode, dtype=np.int64)
    n_act = int(prefill.sum() + decode.sum()) * epl.shape[0] * int(top_k)
    if n_act >= 2**31:
        raise ConfigError(
            f"the knobs give {n_act:,} activations: more than one trace file holds (2**31); "
            "use fewer --sequences or shorter lengths"
        )
    group = int(group) if group else 2 * int(top_k)
    cdf, perm, rank, n_groups, gcdf, gsize = _tables(epl, skews, np.int64(group), _key(seed, 0))
    tok_seq, tok_pos, tok_phase, step_start = _schedule(prefill, decode, np.int64(batch_size))
    row_token, row_layer, experts, weights = _route(
        tok_seq, step_start, np.int64(prefill.shape[0]), np.int64(top_k), epl, cdf, perm, rank,
        n_groups, gcdf, gsize, float(reuse), float(cross_layer), _key(seed, 2),
    )  # fmt: skip
    tok_step = np.repeat(np.arange(step_start.shape[0] - 1, dtype=np.int64), np.diff(step_start))
    return Routed(
        step=tok_step[row_token],
        seq=tok_seq[row_token],
        pos=tok_pos[row_token],
        phase=tok_phase[row_token],
        layer=row_layer,
        experts=experts,
        weights=_round_bf16(weights),
        top_k=int(top_k),
    )


def synth_trace(model: str | ModelPreset, knobs: SynthKnobs, source: str = "") -> Trace:
    """A synthetic trace of ``model``'s shape generated with ``knobs`` (validated first)."""
    preset = get_preset(model) if isinstance(model, str) else model
    knobs.validate()
    n_layers = preset.num_layers
    prefill, decode = sequence_lengths(knobs)
    skews = knobs.skew_per_layer(n_layers)
    routed = generate(
        [preset.experts] * n_layers, preset.top_k, skews, knobs.reuse, knobs.cross_layer,
        prefill, decode, knobs.batch_size, knobs.seed, knobs.cross_group,
    )  # fmt: skip
    meta = TraceMeta(
        model=preset.hf_id,
        num_layers=n_layers,
        experts_per_layer=[preset.experts] * n_layers,
        top_k=preset.top_k,
        expert_bytes=[preset.expert_bytes] * n_layers,
        shared_experts=[preset.shared_experts] * n_layers,
        shared_expert_bytes=preset.shared_expert_bytes,
        dtype=preset.dtype,
        source=source or f"moesim synth --model {preset.name} (synthetic, seed {knobs.seed})",
        steps="native",
        extra={
            "synth": knobs.to_dict(),
            "synth_version": SYNTH_VERSION,
            "synth_preset": preset.name,
            "synth_batching": "continuous",
        },
    )
    return trace_from_arrays(
        meta,
        step=routed.step,
        seq=routed.seq,
        pos=routed.pos,
        phase=routed.phase,
        layer=routed.layer,
        offsets=routed.offsets,
        experts=routed.experts,
        weights=routed.weights,
        path="<synth>",
    )
