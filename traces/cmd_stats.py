"""``moesim stats TRACE``: what a trace says about expert activation (docs/stats.md)."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pandas as pd

from traces.errors import ConfigError
from traces.io import read_trace
from traces.stats import PHASES, TraceStats, compute_stats

#: Per-layer table columns shown in the text output: (column of layer_table(), header, format).
TABLE_COLUMNS = [
    ("model_layer", "layer", "d"),
    ("experts", "E", "d"),
    ("tokens", "tokens", "d"),
    ("entropy_norm", "H/logE", ".3f"),
    ("top10_share", "top10%", ".3f"),
    ("topk_share", "top-k", ".3f"),
    ("gini", "gini", ".3f"),
    ("max_load", "max/avg", ".2f"),
    ("unused", "unused", "d"),
    ("stack_p50", "stk50", ".0f"),
    ("stack_p90", "stk90", ".0f"),
    ("step_p50", "step50", ".0f"),
    ("step_p90", "step90", ".0f"),
    ("cold_frac", "cold", ".4f"),
    ("overlap", "overlap", ".3f"),
    ("overlap_chance", "chance", ".3f"),
    ("recall_next", "rec>", ".3f"),
    ("recall_next_cv", "rec>cv", ".3f"),
    ("recall_next_pop", "rec>pop", ".3f"),
    ("nmi_next", "nmi>", ".3f"),
    ("js_prefill_decode", "JS", ".3f"),
]

LEGEND = (
    "H/logE: normalised entropy of expert popularity; top10%/top-k: share of activations on the "
    "hottest 10% / k experts; max/avg: hottest expert's load vs uniform; stk50/90: LRU stack "
    "distance within the layer (p50/p90); step50/90: steps since the expert's last use; cold: "
    "first-use share of accesses; overlap: |E_t ∩ E_t+1|/k of consecutive tokens vs chance k/E; "
    "rec>: top-k recall of the next layer's experts by the co-occurrence predictor (in-sample, "
    "cv = 2-fold by sequence, pop = popularity baseline); nmi>: normalised mutual information "
    "with the next layer; JS: prefill vs decode popularity divergence (bits). See docs/stats.md."
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stats",
        help="describe a trace's expert activation: popularity, reuse, locality, co-activation",
        description="Report the statistics the MoE-offloading literature studies about expert "
        "activation: per-layer expert popularity (normalised entropy, share of the hottest "
        "experts, Gini), reuse distance (LRU stack distance per layer and shared, steps since "
        "last use, LRU hit ratios), overlap of consecutive tokens' expert sets against chance, "
        "cross-layer co-activation (top-k recall of a co-occurrence predictor, mutual "
        "information) and prefill/decode differences (Jensen-Shannon divergence). Prints a "
        "summary and a per-layer table; every statistic is defined in docs/stats.md.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file (.parquet) or a folder of parts")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (summary, per-layer records, histograms) instead of tables",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="also write PNG figures into DIR: popularity heatmap, reuse-distance histograms, "
        "LRU hit-ratio curves, per-layer lines, co-activation matrix of one layer pair",
    )
    p.add_argument(
        "--max-layers",
        type=int,
        default=40,
        metavar="N",
        help="per-layer tables: show at most N layers, the first and last halves (default 40); "
        "0 shows all",
    )
    p.add_argument(
        "--pair",
        type=int,
        default=None,
        metavar="L",
        help="co-activation figure: layer pair (L, L+1) in trace layer numbering "
        "(default: the pair with the highest normalised mutual information)",
    )
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the row checks when reading (only for traces just validated)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_layers < 0:
        raise ConfigError(f"--max-layers: expected an integer >= 0, got {args.max_layers}")
    trace = read_trace(args.trace, columns=[], validate=not args.no_validate)
    L = int(trace.meta.num_layers)
    if args.pair is not None and not 0 <= args.pair < L - 1:
        raise ConfigError(
            f"--pair: expected a layer 0..{L - 2} (pairs L -> L+1 of a {L}-layer trace), "
            f"got {args.pair}"
        )
    stats = compute_stats(trace)
    plots = []
    if args.plot:
        from traces.stats_plots import write_plots

        plots = write_plots(stats, args.plot, args.pair)
    if args.json:
        d = stats.to_dict()
        d["plots"] = [str(p) for p in plots]
        json.dump(d, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(format_report(stats, args.max_layers))
        if plots:
            print(f"\nfigures written: {', '.join(str(p) for p in plots)}")
    return 0


# --------------------------------------------------------------------------- text output
def _f(x, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def _n(x) -> str:
    return f"{int(x):,}"


def format_report(stats: TraceStats, max_layers: int = 40) -> str:
    """The text report: summary block, phase comparison (if both phases), per-layer table."""
    s = stats.summary()
    info = stats.info
    E = stats.experts_per_layer
    e_txt = str(int(E[0])) if (E == E[0]).all() else f"{int(E.min())}-{int(E.max())}"
    k_txt = f"top-{stats.top_k}" if stats.top_k is not None else "dynamic k"
    pop, reu, ov, co = s["popularity"], s["reuse"], s["overlap"], s["coactivation"]
    pad = " " * 13
    lines = [
        f"trace        {info['path']}",
        f"{pad}{info['model']}: {stats.num_layers} layers x {e_txt} experts, {k_txt}",
        f"{pad}rows {_n(info['rows'])}, activations {_n(info['activations'])}, "
        f"tokens {_n(info['tokens'])}, sequences {_n(info['sequences'])}",
        f"{pad}steps {_n(info['steps'])} ({info['steps_kind']}), prefill rows "
        f"{_n(info['prefill_rows'])}, decode rows {_n(info['decode_rows'])}",
        "popularity   normalised entropy (bits / log2 E): mean "
        f"{_f(pop['entropy_norm_mean'])}, min {_f(pop['entropy_norm_min'])}",
        f"{pad}share of activations on the hottest 10% of experts: "
        f"{_f(pop['top10_share_mean'])} (layer max {_f(pop['top10_share_max'])}); "
        f"hottest k: {_f(pop['topk_share_mean'])}",
        f"{pad}Gini {_f(pop['gini_mean'])}; unused experts {pop['unused_experts']}",
    ]
    if pop["hottest"]:
        h = pop["hottest"]
        lines[-1] += (
            f"; hottest expert: layer {h['model_layer']} expert {h['expert']} at "
            f"{_f(h['max_load'], '.2f')}x its uniform share"
        )
    shared = ", ".join(f"{k} {_f(v)}" for k, v in reu["lru_shared_hit_ratio"].items())
    per_layer = ", ".join(f"{k} {_f(v)}" for k, v in reu["lru_per_layer_hit_ratio"].items())
    lines += [
        f"reuse        {_n(reu['accesses'])} accesses in replay order, "
        f"cold {_f(reu['cold_frac'], '.4f')}",
        f"{pad}LRU stack distance within a layer p50 {_f(reu['stack_p50'], '.0f')}, "
        f"p90 {_f(reu['stack_p90'], '.0f')}; over all layers p50 "
        f"{_f(reu['global_stack_p50'], '.0f')}, p90 {_f(reu['global_stack_p90'], '.0f')}",
        f"{pad}steps since the expert's last use p50 {_f(reu['step_p50'], '.0f')}, "
        f"p90 {_f(reu['step_p90'], '.0f')}",
        f"{pad}LRU hit ratio, one cache of x% of all experts: {shared}",
        f"{pad}LRU hit ratio, n slots per layer: {per_layer}",
        f"overlap      consecutive tokens |E_t ∩ E_t+1| / k: {_f(ov['mean'])} "
        f"({_n(ov['pairs'])} pairs)",
        f"{pad}chance {_f(ov['chance_uniform'])}; independent tokens with the layer's "
        f"popularity {_f(ov['chance_popularity'])}",
        f"co-activ.    recall of layer l+1's experts from layer l's by co-occurrence "
        f"{_f(co['recall'])} (2-fold {_f(co['recall_cv'])})",
        f"{pad}popularity {_f(co['recall_popularity'])}, chance {_f(co['chance'])}; "
        f"normalised MI {_f(co['nmi_mean'])} ({_n(co['token_pairs'])} token pairs)",
    ]
    out = "\n".join(lines)
    phase_txt = format_phases(stats, s)
    if phase_txt:
        out += "\n\nprefill vs decode\n" + phase_txt
    out += "\n\nper layer: " + format_layers(stats, max_layers)
    out += "\n\n" + _wrap(LEGEND, 100)
    return out


def format_phases(stats: TraceStats, s: dict | None = None) -> str:
    """A phases x figures table, or '' unless the trace has both prefill and decode rows."""
    s = stats.summary() if s is None else s
    ph = s["phases"]
    if len(stats.phases_present()) < 2:
        return ""
    rows = {}
    for p in PHASES:
        d = ph[p]
        g = ph.get(f"reuse_{p}_groups", {})
        rows[p] = {
            "rows": _n(d["rows"]),
            "activations": _n(d["activations"]),
            "H/logE": _f(d["entropy_norm_mean"]),
            "top10%": _f(d["top10_share_mean"]),
            "overlap": _f(d["overlap"]),
            "rec>": _f(d["recall_next"]),
            "rec>cv": _f(d["recall_next_cv"]),
            "accesses": _n(g["accesses"]) if g else "-",
            "stk50": _f(g.get("stack_p50"), ".0f"),
            "step50": _f(g.get("step_p50"), ".0f"),
        }
    df = pd.DataFrame(rows).T
    txt = df.to_string()
    if "reuse_mixed_groups" in ph:
        m = ph["reuse_mixed_groups"]
        txt += (
            f"\nmixed groups (prefill and decode tokens in one step-layer): "
            f"{_n(m['accesses'])} accesses, stack p50 {_f(m['stack_p50'], '.0f')}"
        )
    txt += (
        f"\nJensen-Shannon divergence of prefill vs decode popularity (bits, 0..1): mean "
        f"{_f(ph.get('js_prefill_decode_mean'))}, max {_f(ph.get('js_prefill_decode_max'))}"
    )
    return txt


#: The two per-layer tables of the text output (columns of TABLE_COLUMNS by header).
TABLE_SPLIT = (
    ("popularity and reuse", ["layer", "E", "tokens", "H/logE", "top10%", "top-k", "gini",
                              "max/avg", "unused", "stk50", "stk90", "step50", "step90", "cold"]),
    ("locality and co-activation (layer -> next layer)",
     ["layer", "overlap", "chance", "rec>", "rec>cv", "rec>pop", "nmi>", "JS"]),
)  # fmt: skip


def format_layers(stats: TraceStats, max_layers: int = 40) -> str:
    """The per-layer tables; with more than ``max_layers`` layers, the first and last ones."""
    df = stats.layer_table()
    view = pd.DataFrame(index=df.index)
    for col, head, fmt in TABLE_COLUMNS:
        if col == "js_prefill_decode" and len(stats.phases_present()) < 2:
            continue
        view[head] = [_f(v, fmt) if fmt != "d" else _n(v) for v in df[col].to_numpy()]
    L = stats.num_layers
    parts = []
    for title, heads in TABLE_SPLIT:
        sub = view[[h for h in heads if h in view.columns]]
        if max_layers and L > max_layers:
            half = max(1, max_layers // 2)
            txt = sub.to_string(index=False, max_rows=2 * half, min_rows=2 * half)
        else:
            txt = sub.to_string(index=False)
        parts.append(f"{title}\n{txt}")
    out = "\n\n".join(parts)
    if max_layers and L > max_layers:
        half = max(1, max_layers // 2)
        out += f"\n({2 * half} of {L} layers shown; --max-layers 0 shows all, --json has all)"
    return out


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
