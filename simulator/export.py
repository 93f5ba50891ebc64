"""Export the replay order for other cache simulators.

``oracle-general``: libCacheSim's oracleGeneral binary trace, one packed little-endian record
per (step, layer, expert) access: uint32 time (the group index), uint64 object id
(``layer * experts + expert``, with per-layer offsets when layers differ), uint32 size (1),
int64 index of the object's next access (-1 when never used again).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulator.accesses import NEVER
from simulator.engine import Prepared
from traces.errors import ConfigError
from traces.io import atomic_path

ORACLE_GENERAL = np.dtype(
    [("time", "<u4"), ("obj_id", "<u8"), ("size", "<u4"), ("next_access", "<i8")], align=False
)
FORMATS = ("oracle-general", "csv")


def oracle_general_records(prep: Prepared) -> np.ndarray:
    """The oracleGeneral records of a prepared trace (a structured numpy array)."""
    acc = prep.acc
    if acc.num_groups >= 2**32:
        raise ConfigError("trace has more than 2**32 step-layers: too long for oracleGeneral")
    rec = np.empty(acc.num_accesses, ORACLE_GENERAL)
    rec["time"] = acc.access_group().astype(np.uint32)
    rec["obj_id"] = acc.obj.astype(np.uint64)
    rec["size"] = 1
    nxt = prep.next_use.copy()
    nxt[nxt == NEVER] = -1
    rec["next_access"] = nxt
    return rec


def export(prep: Prepared, path: str | Path, fmt: str = "oracle-general") -> Path:
    """Write the replay order of ``prep`` to ``path`` atomically in format ``fmt``."""
    path = Path(path)
    if fmt == "oracle-general":
        rec = oracle_general_records(prep)
        with atomic_path(path) as tmp:
            rec.tofile(tmp)
    elif fmt == "csv":
        acc = prep.acc
        g = acc.access_group()
        import pandas as pd

        df = pd.DataFrame({
            "group": g,
            "step": acc.group_step[g],
            "layer": acc.group_layer[g],
            "expert": acc.obj_expert[acc.obj],
            "obj_id": acc.obj,
            "tokens": acc.count,
        })  # fmt: skip
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    else:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return path
