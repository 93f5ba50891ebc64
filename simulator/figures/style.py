"""How figures look: series labels, one fixed colour/marker/line style per series, saving.

A *series* is what one line shows: a policy, plus its prefetcher where that is not "none"
("lru + moe-infinity", "belady + oracle"), plus the horizon where a table holds several for that
pair ("lru + oracle h=2"). :func:`series_style` maps a series label to its look as a pure
function of the label, so the same series has the same colour in every figure whatever other
series share it: the policy picks the hue (a fixed palette for the known policies, a CRC-32 of
the name for others), the prefetcher picks the marker and a lighter or darker shade. Series that
know the future (Belady, oracle prefetch) are drawn black or darkened, dashed or dotted; only
Belady alone and Belady with the oracle prefetcher are *bounds* and labelled "(bound)" (LRU with
the oracle prefetcher is not a bound: a real prefetcher with a better eviction can beat it).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from traces.errors import ConfigError
from traces.io import atomic_path

#: Known policies in legend order, with their colours (matplotlib's tab10, Belady black).
POLICY_COLOURS = {
    "lru": "#1f77b4",
    "fifo": "#ff7f0e",
    "lfu": "#2ca02c",
    "lfu-perfect": "#9467bd",
    "lfu-aged": "#8c564b",
    "static": "#e377c2",
    "none": "#7f7f7f",
    "belady": "#000000",
}
#: Colours for policies not listed above, chosen by a CRC-32 of the policy name.
EXTRA_COLOURS = [
    "#bcbd22",
    "#17becf",
    "#d62728",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
]
#: Known prefetchers in legend order: (marker, shade; > 0 lightens towards white, < 0 darkens).
PREFETCH_LOOKS = {
    "none": ("o", 0.0),
    "trace": ("^", 0.35),
    "free-trace": ("v", 0.35),
    "moe-infinity": ("s", -0.3),
    "learned": ("D", 0.5),
    "adaptive": ("P", -0.5),
    "oracle": ("*", -0.6),
    "free-oracle": ("*", -0.6),
}
EXTRA_MARKERS = ["X", "h", "p", "<", ">", "d", "8"]
#: Markers of horizons 2, 3, ... where a table holds several horizons of one pair.
HORIZON_MARKERS = ["p", "h", "8", "d", "<", ">"]
#: Prefetchers that know the trace's future: their series are bounds.
ORACLE_PREFETCH = ("oracle", "free-oracle")
BOUND = " (bound)"

#: Output formats and the savefig metadata that keeps files byte-identical across runs.
FORMATS = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
DPI = 120
#: Text stays text (SVG labels searchable, PDF fonts TrueType); fixed SVG ids (same bytes each run).
RC = {"svg.fonttype": "none", "svg.hashsalt": "moesim", "pdf.fonttype": 42}


@dataclass(frozen=True)
class SeriesStyle:
    color: str
    linestyle: str
    marker: str
    bound: bool


def short_text(text: str) -> str:
    """A policy or prefetcher text with file paths in its parameters cut to their file name."""
    name, sep, params = str(text).partition(":")
    if not sep:
        return name
    parts = []
    for kv in params.split(","):
        k, eq, v = kv.partition("=")
        parts.append(f"{k}{eq}{Path(v).name}" if eq and "/" in v else kv)
    return f"{name}:{','.join(parts)}"


def series_label(policy: str, prefetch: str | None = "none", horizon: int | None = None) -> str:
    """'policy', 'policy + prefetch' or 'policy + prefetch h=H' (horizon only where given)."""
    label = short_text(policy)
    if prefetch not in (None, "", "none"):
        label += f" + {short_text(prefetch)}"
        if horizon is not None:
            label += f" h={int(horizon)}"
    return label


def parse_label(label: str) -> tuple[str, str, int | None]:
    """(policy, prefetch, horizon or None) of a series label."""
    policy, _, rest = label.partition(" + ")
    prefetch, horizon = rest or "none", None
    if " h=" in prefetch:
        prefetch, _, h = prefetch.rpartition(" h=")
        horizon = int(h)
    return policy, prefetch, horizon


def _base(text: str) -> str:
    return text.partition(":")[0]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _shade(colour: str, amount: float) -> str:
    """``colour`` mixed with white (amount > 0) or black (amount < 0) by |amount|."""
    rgb = to_rgb(colour)
    target = 1.0 if amount > 0 else 0.0
    a = abs(amount)
    return to_hex(tuple(c + (target - c) * a for c in rgb))


def knows_future(label: str) -> bool:
    """Belady or an oracle prefetcher: drawn in the bounds' style."""
    policy, prefetch, _ = parse_label(label)
    return _base(policy) == "belady" or _base(prefetch) in ORACLE_PREFETCH


def is_bound(label: str) -> bool:
    """Belady alone (fewest misses of demand caching) or with the oracle prefetcher."""
    policy, prefetch, _ = parse_label(label)
    return _base(policy) == "belady" and _base(prefetch) in ("none", *ORACLE_PREFETCH)


def series_style(label: str) -> SeriesStyle:
    """The look of a series: a function of its label alone (same label, same look, always)."""
    policy, prefetch, horizon = parse_label(label)
    pol, pf = _base(policy), _base(prefetch)
    colour = POLICY_COLOURS.get(pol) or EXTRA_COLOURS[_crc(pol) % len(EXTRA_COLOURS)]
    if policy != pol:  # parameters ("lfu-aged:decay=0.5"): a shade of the policy's colour
        colour = _shade(colour, (0.3, -0.3, 0.5)[_crc(policy) % 3])
    marker, shade = PREFETCH_LOOKS.get(pf, (None, 0.0))
    if marker is None:
        marker = EXTRA_MARKERS[_crc(pf) % len(EXTRA_MARKERS)]
        shade = -0.2 if _crc(pf) % 2 else 0.4
    if horizon is not None:  # horizons of one pair: lighter and another marker per step
        shade = max(-0.8, min(0.7, shade + 0.25 * (min(horizon, 6) - 1)))
        if horizon > 1:
            marker = HORIZON_MARKERS[(horizon - 2) % len(HORIZON_MARKERS)]
    if pol == "belady":
        if pf == "none":
            return SeriesStyle("#000000", "--", "x", True)
        grey = _shade("#4d4d4d", 0.15 * (min(horizon, 5) - 1)) if horizon else "#4d4d4d"
        return SeriesStyle(grey, "-.", marker, is_bound(label))
    if knows_future(label):
        return SeriesStyle(_shade(colour, shade), ":", marker, False)
    return SeriesStyle(_shade(colour, shade) if shade else colour, "-", marker, False)


def legend_label(label: str) -> str:
    """The legend's text: the label, file paths in parameters cut to their names, "(bound)"."""
    import re

    short = re.sub(r"=([^,=\s]*/)+", "=", label)  # model=/a/b/m.npz -> model=m.npz
    return short + (BOUND if is_bound(label) else "")


def series_order(label: str) -> tuple:
    """Sort key: non-bounds first, then known policies in palette order, then prefetchers."""
    policy, prefetch, horizon = parse_label(label)
    pols = list(POLICY_COLOURS)
    pfs = list(PREFETCH_LOOKS)
    pol, pf = _base(policy), _base(prefetch)
    return (
        is_bound(label),
        pols.index(pol) if pol in pols else len(pols),
        pol,
        policy,
        pfs.index(pf) if pf in pfs else len(pfs),
        prefetch,
        horizon or 0,
    )


# --------------------------------------------------------------------------- figures
def new_figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw):
    """A Figure with an Agg canvas (no pyplot state) and a 2-D array of axes."""
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def parse_formats(text: str | list[str] | None) -> list[str]:
    """'png,svg' -> ['png', 'svg']; ConfigError naming an unknown format."""
    items = text if isinstance(text, list) else [text or "png"]
    out: list[str] = []
    for item in items:
        for f in str(item).split(","):
            f = f.strip().lower().lstrip(".")
            if not f:
                continue
            if f not in FORMATS:
                raise ConfigError(f"--format: unknown format {f!r} (expected png, svg or pdf)")
            if f not in out:
                out.append(f)
    if not out:
        raise ConfigError("--format: expected at least one of png, svg, pdf")
    return out


def save(fig: Figure, out_dir: Path, name: str, formats: list[str]) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.FORMAT`` for each format, each atomically."""
    paths = []
    for fmt in formats:
        path = Path(out_dir) / f"{name}.{fmt}"
        try:
            with atomic_path(path) as tmp, rc_context(RC):
                fig.savefig(tmp, format=fmt, metadata=FORMATS[fmt])
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write the figure: {exc.strerror or exc}") from None
        paths.append(path)
    return paths
