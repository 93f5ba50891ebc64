"""The moesim trace format: column names, Arrow types and file-level metadata.

A trace is a table with one row per (token, MoE layer). Rows are stored in replay order:
sorted by ``(step, layer, seq, pos)``, strictly increasing. ``docs/trace-format.md`` is the
user-facing description; this module is the single source of truth for names and types.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from traces.errors import TraceError

SCHEMA_VERSION = 1
META_KEY = b"moesim"
#: Parquet metadata key holding the CRC-32 (8 hex digits) of the ``moesim`` JSON; optional.
META_CRC_KEY = b"moesim.crc32"

PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}

#: Required columns and their Arrow types.
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(),
    "seq": pa.int64(),
    "pos": pa.int32(),
    "phase": pa.int8(),
    "layer": pa.int16(),
    "experts": pa.list_(pa.int16()),
}

#: Optional columns and their Arrow types. ``pred_h{H}`` columns are matched by prefix.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "weights": pa.list_(pa.float32()),
    "token_id": pa.int32(),
    "token": pa.string(),
}
PRED_PREFIX = "pred_h"
PRED_TYPE = pa.list_(pa.int16())


def pred_column(horizon: int) -> str:
    """Name of the predicted-experts column for a horizon of ``horizon`` layers."""
    return f"{PRED_PREFIX}{int(horizon)}"


def pred_horizon(column: str) -> int | None:
    """Horizon of a ``pred_h{H}`` column name (H >= 1, no leading zeros), or None otherwise."""
    digits = column[len(PRED_PREFIX) :]
    if (
        column.startswith(PRED_PREFIX)
        and digits.isascii()
        and digits.isdigit()
        and not digits.startswith("0")
    ):
        return int(digits)
    return None


#: Largest number of MoE layers and of experts per layer (layer and expert ids are int16).
MAX_LAYERS = 32767
MAX_EXPERTS = 32767


@dataclass
class TraceMeta:
    """File-level metadata of a trace, stored as JSON under the Parquet key ``moesim``.

    Attributes:
        model: model name, e.g. ``"deepseek-ai/DeepSeek-V2-Lite-Chat"``.
        num_layers: number of MoE layers recorded (layer ids in the trace run 0..num_layers-1).
        experts_per_layer: routed experts in each MoE layer (a list of ``num_layers`` ints).
        top_k: experts routed per token, or None where routing is dynamic (threshold, top-p).
        expert_bytes: bytes of one routed expert's weights in each layer (list of ``num_layers``).
        shared_experts: always-active shared experts per layer (list of ``num_layers``);
            they are always resident and never appear in ``experts``.
        shared_expert_bytes: bytes of one shared expert (0 where there are none).
        dtype: weight dtype the byte sizes assume, e.g. ``"bfloat16"``.
        source: where the trace came from (importer, capture, synth and their arguments).
        layer_ids: the model's own layer numbers of the MoE layers (for labels only).
        steps: how steps were formed: ``"native"`` (as the runtime ran them),
            ``"per-token"`` or ``"per-sequence"`` (set by importers of whole-prompt captures).
        pred_horizons: horizons of the ``pred_h{H}`` columns present.
        pred_source: who made the predictions (e.g. ``"moe-beyond"``, ``"gate-lookahead"``).
        schema_version: format version; readers refuse newer versions.
        extra: anything else worth keeping (free-form JSON).
    """

    model: str
    num_layers: int
    experts_per_layer: list[int]
    top_k: int | None
    expert_bytes: list[int]
    shared_experts: list[int] = field(default_factory=list)
    shared_expert_bytes: int = 0
    dtype: str = "bfloat16"
    source: str = ""
    layer_ids: list[int] = field(default_factory=list)
    steps: str = "native"
    pred_horizons: list[int] = field(default_factory=list)
    pred_source: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fill the per-layer defaults only where num_layers is sane; validate() reports the rest
        # (so that metadata read from a file never raises anything but TraceError).
        for key in _INT_KEYS:
            setattr(self, key, _plain(getattr(self, key)))
        if not (_is_int(self.num_layers) and 1 <= self.num_layers <= MAX_LAYERS):
            return
        n = int(self.num_layers)
        if isinstance(self.shared_experts, list) and not self.shared_experts:
            self.shared_experts = [0] * n
        if isinstance(self.layer_ids, list) and not self.layer_ids:
            self.layer_ids = list(range(n))
        if _is_int(self.experts_per_layer):
            self.experts_per_layer = [self.experts_per_layer] * n
        if _is_int(self.expert_bytes):
            self.expert_bytes = [self.expert_bytes] * n

    # ------------------------------------------------------------------ derived
    @property
    def total_experts(self) -> int:
        """Routed experts over all layers (the number of distinct cacheable objects)."""
        return int(sum(self.experts_per_layer))

    @property
    def max_experts(self) -> int:
        return int(max(self.experts_per_layer))

    def to_json(self) -> str:
        try:
            return json.dumps(asdict(self), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TraceError(
                f"metadata: expected JSON-serialisable values (check 'extra'): {exc}"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "trace") -> TraceMeta:
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            msg = " ".join(str(exc).split())
            raise TraceError(
                f"{where}: metadata key 'moesim': expected valid JSON ({msg})"
            ) from None
        if not isinstance(raw, dict):
            raise TraceError(f"{where}: metadata key 'moesim': expected a JSON object")
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "trace") -> TraceMeta:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TraceError(
                f"{where}: metadata: unknown key {unknown[0]!r} (expected only the keys of "
                f"schema version {SCHEMA_VERSION}: {', '.join(sorted(known))})"
            )
        for key, expected in _REQUIRED_KEYS.items():
            if key not in raw:
                raise TraceError(f"{where}: metadata: missing key '{key}' (expected {expected})")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if not _is_int(version) or version > SCHEMA_VERSION or version < 1:
            raise TraceError(
                f"{where}: metadata key 'schema_version': expected an integer 1..{SCHEMA_VERSION}, "
                f"got {version!r} (written by a newer moesim?)"
            )
        meta = cls(**raw)
        meta.validate(where)
        return meta

    def validate(self, where: str = "trace") -> None:
        """Check types and internal consistency; raise TraceError naming the key."""

        def bad(key: str, expected: str, got: Any) -> TraceError:
            text = repr(got)
            if len(text) > 80:
                text = text[:77] + "..."
            return TraceError(f"{where}: metadata key '{key}': expected {expected}, got {text}")

        if not isinstance(self.model, str):
            raise bad("model", "a string", self.model)
        if not _is_int(self.num_layers) or not 1 <= self.num_layers <= MAX_LAYERS:
            raise bad("num_layers", f"an integer in 1..{MAX_LAYERS}", self.num_layers)
        n = int(self.num_layers)
        for key in ("experts_per_layer", "expert_bytes", "shared_experts", "layer_ids"):
            value = getattr(self, key)
            if not isinstance(value, list) or len(value) != n or not all(map(_is_int, value)):
                raise bad(key, f"a list of {n} integers", value)
        if any(e < 1 or e > MAX_EXPERTS for e in self.experts_per_layer):
            raise bad("experts_per_layer", f"integers in 1..{MAX_EXPERTS}", self.experts_per_layer)
        if any(b < 1 for b in self.expert_bytes):
            raise bad("expert_bytes", "positive integers (bytes)", self.expert_bytes)
        if any(s < 0 for s in self.shared_experts):
            raise bad("shared_experts", "non-negative integers", self.shared_experts)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "a positive integer or null", self.top_k)
        if self.top_k is not None and self.top_k > self.max_experts:
            raise bad("top_k", f"at most experts_per_layer ({self.max_experts})", self.top_k)
        if not _is_int(self.shared_expert_bytes) or self.shared_expert_bytes < 0:
            raise bad("shared_expert_bytes", "a non-negative integer", self.shared_expert_bytes)
        if not isinstance(self.steps, str) or self.steps not in STEP_MODES:
            raise bad("steps", "'native', 'per-token' or 'per-sequence'", self.steps)
        if not isinstance(self.pred_horizons, list) or not all(
            _is_int(h) and h >= 1 for h in self.pred_horizons
        ):
            raise bad("pred_horizons", "a list of positive integers", self.pred_horizons)
        for key in ("dtype", "source", "pred_source"):
            if not isinstance(getattr(self, key), str):
                raise bad(key, "a string", getattr(self, key))
        if not _is_int(self.schema_version) or not 1 <= self.schema_version <= SCHEMA_VERSION:
            raise bad("schema_version", f"an integer in 1..{SCHEMA_VERSION}", self.schema_version)
        if not isinstance(self.extra, dict):
            raise bad("extra", "a JSON object", self.extra)


#: How steps were formed (``TraceMeta.steps``).
STEP_MODES = ("native", "per-token", "per-sequence")

#: Metadata keys holding integers or lists of integers (numpy ints are converted).
_INT_KEYS = ("num_layers", "top_k", "shared_expert_bytes", "schema_version", "experts_per_layer",
             "expert_bytes", "shared_experts", "layer_ids", "pred_horizons")  # fmt: skip

#: Metadata keys without a default, and what each must hold.
_REQUIRED_KEYS = {
    "model": "the model name, a string",
    "num_layers": "the number of MoE layers, an integer",
    "experts_per_layer": "a list of routed-expert counts, one per layer",
    "top_k": "experts per token, an integer or null",
    "expert_bytes": "a list of expert sizes in bytes, one per layer",
}


def _plain(value: Any) -> Any:
    """numpy integers (and tuples or arrays of them) as plain Python ints and lists."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [int(v) if isinstance(v, np.integer) else v for v in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def arrow_schema(meta: TraceMeta, optional: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of a trace with the given optional columns, metadata attached."""
    fields = [pa.field(name, typ, nullable=False) for name, typ in REQUIRED_COLUMNS.items()]
    for name in optional:
        if name in OPTIONAL_COLUMNS:
            fields.append(pa.field(name, OPTIONAL_COLUMNS[name]))
        elif pred_horizon(name) is not None:
            fields.append(pa.field(name, PRED_TYPE))
        else:
            raise TraceError(f"unknown trace column {name!r}")
    text = meta.to_json().encode()
    return pa.schema(fields, metadata={META_KEY: text, META_CRC_KEY: meta_crc(text)})


def meta_crc(text: bytes) -> bytes:
    """The value stored under :data:`META_CRC_KEY` for the metadata JSON ``text``."""
    return f"{zlib.crc32(text):08x}".encode()
