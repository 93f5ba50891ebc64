"""``moesim import``: convert traces published in other layouts into moesim traces."""

from __future__ import annotations

import argparse
import importlib

from traces.importers import IMPORTERS

DESCRIPTION = """\
Convert expert-activation traces published in other layouts into a moesim trace (Parquet,
one row per token and MoE layer, in replay order). The output is validated before it is
written, and written atomically: on any error OUT is left as it was.

layouts:
  moe-beyond  MoE-Beyond per-prompt CSV captures (DeepSeek-V2-Lite), with their predictions
  vllm        vLLM MoE-logger JSONL route logs, one file per layer or one for all (Qwen, OLMoE)
  table       any CSV, CSV.gz or Parquet table, given which column holds what

Run 'moesim import LAYOUT --help' for each layout's options; docs/importers.md explains how
steps, phases, sequences and positions are assigned where the source does not record them."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="convert MoE-Beyond CSV, vLLM JSONL or generic tables into a moesim trace",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="layout", metavar="LAYOUT", required=True)
    for name in IMPORTERS:
        importlib.import_module(IMPORTERS[name]).add_parser(sub)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = args.importer(args)
    print(result.summary())
    return 0
