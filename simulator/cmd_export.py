"""``moesim export``: write a trace's replay order for other simulators (libCacheSim)."""

from __future__ import annotations

import argparse

from simulator.engine import prepare
from simulator.export import FORMATS, export
from traces.io import read_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the replay order as a libCacheSim oracleGeneral trace (or CSV)",
        description="Write the (step, layer, expert) access sequence that `moesim replay` "
        "walks, so other cache simulators can replay exactly the same order. "
        "oracle-general: libCacheSim's binary format (24-byte records: uint32 time, "
        "uint64 obj id = layer*experts+expert, uint32 size=1, int64 next access index or -1).",
    )
    p.add_argument("trace", help="trace file (.parquet) or folder of parts")
    p.add_argument("--format", default="oracle-general", choices=FORMATS, help="output format")
    p.add_argument("-o", "--output", required=True, help="output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prep = prepare(read_trace(args.trace))
    path = export(prep, args.output, args.format)
    print(f"wrote {prep.acc.num_accesses} accesses ({args.format}) to {path}")
    return 0
