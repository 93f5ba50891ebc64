"""Prefetchers by name: parsing ``replay.prefetch`` and building the lists the kernels consume.

A prefetcher is named like a policy: ``NAME`` or ``NAME:key=value,key=value``
(``moe-infinity:capacity=200``, ``learned:model=pred.npz``, ``adaptive:base=cross-layer,max=4``).
Every prefetcher here depends only on the trace and the configuration, so its requests are
computed once before the replay, in numba, and handed to the kernel as flat lists:

- timed mode: lists by *issuing* group (``off``, ``obj``, ``tgt``: at the gate of group ``g`` the
  kernel queues ``obj[off[g]:off[g+1]]`` behind demand fetches, in that order, aimed at groups
  ``tgt``);
- count mode with free prefetch: lists by *target* group (the experts inserted at zero cost right
  before it).

Built lists are memoised on the :class:`~simulator.engine.Prepared` trace, so a sweep over cache
sizes builds them once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator import adaptive_horizon, history_predictors, moe_infinity
from simulator import kernels as K
from simulator.prefetch_lists import _by_issuer, _issuer, _union_rows, empty_lists
from traces.errors import ConfigError


@dataclass(frozen=True)
class PrefetcherSpec:
    name: str
    summary: str
    #: parameter -> (type: "int" | "float" | "path" | "name", default or None, help)
    params: dict


_TOP_N = ("int", None, "experts named per token and layer (default: the model's top-k)")
PREFETCHERS: dict[str, PrefetcherSpec] = {
    s.name: s
    for s in (
        PrefetcherSpec("none", "no prefetching: demand fetches only", {}),
        PrefetcherSpec(
            "oracle", "knows the trace's future: fetches each layer's experts `horizon` "
            "groups ahead, in order of need (the upper bound)", {}),
        PrefetcherSpec(
            "trace", "the trace's recorded predictions (pred_h{horizon} columns, e.g. gate "
            "lookahead captured with `moesim capture --lookahead`)", {}),
        PrefetcherSpec(
            "prev-token", "gate-lookahead stand-in: the sequence's previous token's experts at "
            "the same layer", {}),
        PrefetcherSpec(
            "cross-layer", "gate-lookahead stand-in: transition counts from the token's experts "
            "`horizon` layers earlier, learned online (and from train=TRACE)",
            {"train": ("path", None, "training trace whose transition counts warm the table"),
             "top_n": _TOP_N}),
        PrefetcherSpec(
            "moe-infinity", "MoE-Infinity: match the sequence's expert activation matrix "
            "against a collection of past sequences', prefetch by count x layer decay",
            {"capacity": ("int", 1000, "matrices kept in the collection (its code: 1000)"),
             "warm": ("path", None, "training trace whose sequences fill the collection first"),
             "top_n": _TOP_N}),
        PrefetcherSpec(
            "learned", "moesim's learned predictor (`moesim train`): its top-k guesses for each "
            "token, made `horizon` layers ahead",
            {"model": ("path", None, "model file written by `moesim train` (required)"),
             "top_n": _TOP_N}),
        PrefetcherSpec(
            "adaptive", "ExpertFlow-style adaptive horizon over a base predictor: per layer, "
            "as many layers ahead as transfers need, fewer where recent guesses miss",
            {"base": ("name", "cross-layer", "base predictor: trace, prev-token, cross-layer "
                      "or learned"),
             "max": ("int", 4, "largest horizon, layers"),
             "min_precision": ("float", 0.3, "shrink the horizon while the recent precision "
                               "at it is below this"),
             "alpha": ("float", 0.05, "weight of each row in the precision's moving average"),
             "model": ("path", None, "base=learned: the model file"),
             "train": ("path", None, "base=cross-layer: training trace"),
             "top_n": _TOP_N}),
    )
}  # fmt: skip
_ROW_BASES = ("trace", "prev-token", "cross-layer", "learned")


def parse_prefetch(text: str) -> tuple[str, dict]:
    """``NAME[:key=value,...]`` -> (name, parameters with defaults); one-line errors."""
    name, _, rest = str(text).partition(":")
    name = name.strip()
    if name not in PREFETCHERS:
        raise ConfigError(
            f"replay.prefetch: unknown prefetcher {name!r} (known: {', '.join(PREFETCHERS)})"
        )
    spec = PREFETCHERS[name]
    values = {k: v[1] for k, v in spec.params.items()}
    if rest.strip():
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or key not in spec.params:
                known = ", ".join(spec.params) or "none"
                raise ConfigError(
                    f"prefetcher '{name}': unknown parameter '{key}' (parameters: {known})"
                )
            kind = spec.params[key][0]
            try:
                if kind == "int":
                    val = int(raw)
                    ok = val >= 1
                elif kind == "float":
                    val = float(raw)
                    ok = val >= 0
                else:
                    val, ok = raw, bool(raw)
            except ValueError:
                val, ok = None, False
            if not ok:
                want = {"int": "an integer >= 1", "float": "a number >= 0"}.get(kind, "a value")
                raise ConfigError(f"prefetcher '{name}': parameter '{key}': expected {want}, "
                                  f"got {raw!r}")  # fmt: skip
            values[key] = val
    if name == "learned" and not values["model"]:
        raise ConfigError("prefetcher 'learned': needs model=PATH (a file from `moesim train`)")
    if name == "adaptive":
        if values["base"] not in _ROW_BASES:
            raise ConfigError(f"prefetcher 'adaptive': base: expected one of "
                              f"{', '.join(_ROW_BASES)}, got {values['base']!r}")  # fmt: skip
        if values["base"] == "learned" and not values["model"]:
            raise ConfigError("prefetcher 'adaptive': base=learned needs model=PATH")
        if values["alpha"] > 1:
            raise ConfigError("prefetcher 'adaptive': parameter 'alpha': expected 0..1")
    return name, values


def _memo(prep, key, make):
    cache = prep.cache
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _top_n(prep, values) -> int:
    n = values.get("top_n")
    return int(n) if n else history_predictors.default_top_n(prep.trace)


def row_predictions(prep, name: str, values: dict, horizon: int):
    """Per-row predicted experts (offsets, ids) of a row predictor at ``horizon``."""
    trace = prep.trace
    if name == "trace":
        if horizon not in trace.preds:
            have = ", ".join(f"pred_h{h}" for h in sorted(trace.preds)) or "none"
            raise ConfigError(
                f"{trace.path}: prefetch 'trace' with horizon {horizon} needs column "
                f"'pred_h{horizon}' (trace has: {have})"
            )
        return trace.preds[horizon]
    if name == "prev-token":
        return _memo(prep, ("prev-token",),
                     lambda: history_predictors.prev_token(trace, prep.acc))  # fmt: skip
    top_n = _top_n(prep, values)
    if name == "cross-layer":
        train = values.get("train")

        def make():
            warm = None
            if train:
                warm = _memo(prep, ("cross-layer-warm", train, horizon),
                             lambda: history_predictors.transition_counts(_read(prep, train),
                                                                         horizon))  # fmt: skip
            return history_predictors.cross_layer(trace, prep.acc, horizon, top_n, warm)

        return _memo(prep, ("cross-layer", train, horizon, top_n), make)
    if name == "learned":
        model_path = resolve_path(values["model"])
        key = ("learned", str(model_path), horizon, top_n)
        if key not in prep.cache:
            from policies.learned import LearnedPredictor

            model = LearnedPredictor.load(model_path)
            src = _with_text(trace) if model.token_kind == "text" else trace
            model.check_trace(src, str(model_path))
            if horizon not in model.horizons:
                raise ConfigError(f"{model_path}: the model predicts horizons "
                                  f"{model.horizons}, not {horizon}")  # fmt: skip
            # the mix reads every longer horizon's networks anyway: predict those horizons in
            # the same pass (adaptive asks for them next), each kept under its own key
            hs = (
                [h for h in model.horizons if h >= horizon]
                if model.cfg.horizon_mix > 0
                else [horizon]
            )
            for h, pred in model.predict_many(src, hs, top_n).items():
                prep.cache[("learned", str(model_path), h, top_n)] = pred
        return prep.cache[key]
    raise ConfigError(f"prefetcher '{name}' gives no per-row predictions")


def resolve_path(path) -> str:
    """``path`` as given, or, when relative and absent, relative to moesim's own tree (so the
    bundled ``traces/sample/sample-predictor.npz`` is found from any working directory)."""
    from pathlib import Path

    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    mine = Path(__file__).resolve().parents[1] / p
    return str(mine) if mine.exists() else str(p)


def _with_text(trace):
    """``trace`` with its token text: traces are read without it by default (it is large), so a
    model that reads text gets it from the trace's file here, once."""
    import dataclasses
    from pathlib import Path

    if trace.token is not None or not Path(trace.path).exists():
        return trace
    from traces.io import read_trace

    full = read_trace(trace.path, columns=["token"], load_text=True, validate=False)
    if full.token is None or full.num_rows != trace.num_rows:
        return trace
    return dataclasses.replace(trace, token=full.token)


def _read(prep, path):
    """A training trace (``train=``, ``warm=``), read once per prepared trace: the transition
    counts of each horizon and MoE-Infinity's warm collection all start from it (adaptive over
    cross-layer used to read it once per horizon, about 1.5 s each for the DeepSeek training
    set)."""
    from traces.io import read_trace

    path = resolve_path(path)
    return _memo(prep, ("training trace", path), lambda: read_trace(path, load_text=False))


def _row_issue_lists(prep, preds, horizon: int, same_step: bool = True):
    acc = prep.acc
    trace = prep.trace
    offs, ids = preds
    t_off, t_obj = _union_rows(acc.row_group, offs, ids, trace.layer, acc.layer_base,
                               acc.num_groups, acc.num_objects)  # fmt: skip
    issuer = _issuer(acc.group_step, acc.group_layer, horizon, same_step)
    return _by_issuer(issuer, np.asarray(t_off, np.int64), t_obj, acc.num_groups)


def _mi_matches(prep, values):
    """MoE-Infinity's matches for ``values`` (capacity, warm): memoised apart from the lists,
    since they depend on neither the horizon nor ``top_n``."""
    cap = int(values["capacity"])
    warm_path = values.get("warm")

    def make():
        warm = None
        if warm_path:
            wt = _read(prep, warm_path)
            if list(wt.meta.experts_per_layer) != list(prep.meta.experts_per_layer):
                raise ConfigError(f"moe-infinity warm={warm_path}: its model shape differs "
                                  "from the replayed trace's")  # fmt: skip
            warm = moe_infinity.eam_of_sequences(wt)
        return moe_infinity.match(prep.trace, prep.acc, cap, warm)

    return _memo(prep, ("moe-infinity matches", cap, warm_path), make)


def _moe_infinity(prep, values, horizon: int):
    """MoE-Infinity's issue lists (off, obj, tgt) at ``horizon``."""
    top_n = _top_n(prep, values)
    key = ("moe-infinity", int(values["capacity"]), values.get("warm"), horizon, top_n)
    return _memo(prep, key, lambda: moe_infinity.issue_lists(
        prep.trace, prep.acc, _mi_matches(prep, values), horizon, top_n))  # fmt: skip


def adaptive_inputs(prep, cfg) -> tuple[float, np.ndarray]:
    """Seconds per (mean-sized) expert transfer and the four compute-cost figures."""
    from simulator.engine import hardware_vector

    hw = hardware_vector(prep, cfg)
    mean_bytes = float(np.mean(prep.meta.expert_bytes))
    t_x = hw[K.H_LATENCY] + mean_bytes / hw[K.H_BW]
    cost = hw[[K.H_DENSE, K.H_DENSE_TOK, K.H_EXPERT, K.H_EXPERT_TOK]].copy()
    return float(t_x), cost


def _adaptive(prep, cfg, values):
    base = values["base"]
    h_max = int(values["max"])
    t_x, cost = adaptive_inputs(prep, cfg)
    preds = {}
    for h in range(1, h_max + 1):
        if base == "trace" and h not in prep.trace.preds:
            continue
        if base == "learned":
            from policies.learned import LearnedPredictor

            if h not in _memo(
                prep,
                ("learned-horizons", values["model"]),
                lambda: LearnedPredictor.load(values["model"]).horizons,
            ):
                continue
        preds[h] = row_predictions(prep, base, values, h)
    if not preds:
        raise ConfigError(f"prefetcher 'adaptive': base {base!r} has no predictions at "
                          f"horizons 1..{h_max}")  # fmt: skip
    key = ("adaptive", base, values.get("model"), values.get("train"), values.get("top_n"),
           h_max, values["min_precision"], values["alpha"], t_x, tuple(cost))  # fmt: skip
    return _memo(prep, key, lambda: adaptive_horizon.build(
        prep.acc, prep.trace, preds, t_x, cost, h_max, values["min_precision"],
        values["alpha"]))  # fmt: skip


def issue_lists(prep, cfg):
    """Timed mode: (off, obj, tgt) by issuing group for ``cfg.replay.prefetch``."""
    r = cfg.replay
    name, values = parse_prefetch(r.prefetch)
    acc = prep.acc
    if name == "none":
        return empty_lists(acc.num_groups)
    if name == "oracle":
        # the oracle may look across steps
        return _memo(prep, ("oracle-issue", r.horizon), lambda: _by_issuer(
            _issuer(acc.group_step, acc.group_layer, r.horizon, False), acc.group_offsets,
            acc.obj, acc.num_groups))  # fmt: skip
    if name == "moe-infinity":
        return _moe_infinity(prep, values, r.horizon)
    if name == "adaptive":
        off, obj, tgt, _ = _adaptive(prep, cfg, values)
        return off, obj, tgt
    preds = row_predictions(prep, name, values, r.horizon)
    key = ("issue", r.prefetch, r.horizon)
    return _memo(prep, key, lambda: _row_issue_lists(prep, preds, r.horizon))


def free_lists(prep, cfg):
    """Count mode, free prefetch: (off int64[G+1], obj) of experts inserted before each group."""
    r = cfg.replay
    name, values = parse_prefetch(r.prefetch)
    acc = prep.acc
    if name == "none":
        off, obj, _ = empty_lists(acc.num_groups)
        return off, obj
    if name == "oracle":
        return acc.group_offsets, acc.obj
    if name in ("moe-infinity", "adaptive"):
        off, obj, tgt = issue_lists(prep, cfg)
        return _by_target(off, obj, tgt, acc.num_groups)
    offs, ids = row_predictions(prep, name, values, r.horizon)
    t_off, t_obj = _union_rows(acc.row_group, offs, ids, prep.trace.layer, acc.layer_base,
                               acc.num_groups, acc.num_objects)  # fmt: skip
    return np.asarray(t_off, np.int64), t_obj


def _by_target(off, obj, tgt, n_groups):
    """Issue lists regrouped by target group (issue order kept, duplicates dropped)."""
    order = np.argsort(tgt, kind="stable")
    t_sorted = tgt[order]
    o_sorted = obj[order]
    keep = np.ones(order.shape[0], np.bool_)
    if order.size:
        pair = t_sorted * (int(obj.max()) + 1 if obj.size else 1) + o_sorted
        _, first = np.unique(pair, return_index=True)
        keep[:] = False
        keep[first] = True
    t_sorted, o_sorted = t_sorted[keep], o_sorted[keep]
    t_off = np.searchsorted(t_sorted, np.arange(n_groups + 1)).astype(np.int64)
    return t_off, np.ascontiguousarray(o_sorted, np.int32)


def matches(prep, cfg):
    """MoE-Infinity's matches (for activation-aware eviction), building them if needed."""
    name, values = parse_prefetch(cfg.replay.prefetch)
    if name != "moe-infinity":
        values = parse_prefetch("moe-infinity")[1]
    return _mi_matches(prep, values)
