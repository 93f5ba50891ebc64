"""Importers: turn traces published in other layouts into moesim traces.

- :mod:`traces.importers.moe_beyond`: MoE-Beyond per-prompt CSV captures (DeepSeek-V2-Lite).
- :mod:`traces.importers.vllm_jsonl`: vLLM MoE-logger JSONL route logs (Qwen1.5-MoE, OLMoE).
- :mod:`traces.importers.generic`: any CSV/Parquet table, given a column mapping.

Each returns an :class:`~traces.importers.common.ImportResult` and writes its output atomically.
``docs/importers.md`` describes the layouts and every decision the importers make.
"""

from traces.importers.common import ImportResult, ModelOptions
from traces.importers.generic import Mapping, import_table
from traces.importers.moe_beyond import import_moe_beyond
from traces.importers.vllm_jsonl import import_vllm

#: Importer name (``moesim import NAME``) -> module providing ``add_parser(subparsers)``.
IMPORTERS = {
    "moe-beyond": "traces.importers.moe_beyond",
    "vllm": "traces.importers.vllm_jsonl",
    "table": "traces.importers.generic",
}

__all__ = [
    "IMPORTERS",
    "ImportResult",
    "Mapping",
    "ModelOptions",
    "import_moe_beyond",
    "import_table",
    "import_vllm",
]
