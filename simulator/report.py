"""Result records as readable tables and JSON lines."""

from __future__ import annotations

import json
import math

import pandas as pd

#: Columns of the readable table: (record key, header, format).
TABLE_COLUMNS = [
    ("policy", "policy", "{}"),
    ("prefetch", "prefetch", "{}"),
    ("bandwidth_gbps", "GB/s", "{:g}"),
    ("cache_slots", "slots", "{}"),
    ("accesses", "accesses", "{}"),
    ("hits", "hits", "{}"),
    ("misses", "misses", "{}"),
    ("hit_rate", "hit rate", "{:.2%}"),
    ("inflight_hits", "late hits", "{}"),
    ("stall_s", "stall s", "{:.4g}"),
    ("total_s", "total s", "{:.4g}"),
    ("decode_step_s", "decode ms/step", "ms"),
    ("link_busy", "link busy", "{:.1%}"),
    ("kernel_s", "kernel s", "{:.3f}"),
]


def public(record: dict) -> dict:
    """The record without private keys (those starting with '_')."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def json_line(record: dict) -> str:
    """One JSON object on one line (NaN becomes null)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in public(record).items()
    }
    return json.dumps(clean, sort_keys=False)


def table(records: list[dict]) -> str:
    """A plain-text table of the main figures, one row per record."""
    rows = []
    present = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in records)]
    if all(r.get("prefetch") in (None, "none") for r in records):
        present = [c for c in present if c[0] != "prefetch"]
    for r in records:
        row = {}
        for key, head, fmt in present:
            v = r.get(key)
            if v is None:
                row[head] = "-"
            elif fmt == "ms":
                row[head] = f"{v * 1e3:.3f}"
            else:
                row[head] = fmt.format(v)
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)
