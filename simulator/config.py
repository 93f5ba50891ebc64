"""Typed, validated simulation configuration: ``sim.toml`` and CLI flags -> one object.

Each section is a dataclass whose fields carry their help text and unit in ``metadata``.
:func:`load_config` reads TOML, rejects unknown keys and wrong types with one-line errors
naming the key, and :func:`apply_overrides` applies ``section.key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traces.errors import ConfigError
from traces.presets import DTYPE_BYTES


def _f(default, help: str, **kw):
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CacheConfig:
    """The GPU expert cache."""

    slots: int | None = _f(None, "cache size in experts (all layers together)")
    fraction: float | None = _f(0.1, "cache size as a fraction of all routed experts (0, 1]")
    bytes: int | None = _f(None, "cache size as a byte budget (experts may differ in size)")
    scope: str = _f("global", "'global' (one pool, MoE-Infinity) or 'per-layer' partitions "
                    "(mixtral-offloading)", choices=("global", "per-layer"))  # fmt: skip
    pinned: list[str] = _f([], "experts kept resident for good, as 'LAYER:EXPERT' strings")
    fractions: list[float] = _f([0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                                "sweep: cache sizes as fractions of all routed experts "
                                "(one of fractions, slots_list, slots_range; all empty = the "
                                "single size above)")  # fmt: skip
    slots_list: list[int] = _f([], "sweep: cache sizes in experts")
    slots_range: list[int] = _f([], "sweep: cache sizes in experts as [start, stop, step], "
                                "stop excluded (Python's range)")  # fmt: skip


@dataclass
class LinkConfig:
    """The host-to-GPU link (PCIe)."""

    bandwidth_gbps: float = _f(25.0, "link bandwidth in GB/s (1e9 bytes/s); PCIe 4.0 x16 ~ 25")
    latency_s: float = _f(1.0e-5, "fixed cost per transfer, seconds")
    engines: int = _f(1, "transfers that may run at once (copy engines / streams)")


@dataclass
class ComputeConfig:
    """GPU compute times. Left unset (null), expert times follow a roofline from the GPU figures."""

    dense_s: float = _f(1.0e-4, "attention/dense/router work per layer per step, seconds")
    dense_per_token_s: float = _f(2.0e-7, "extra dense work per token per layer, seconds")
    expert_s: float | None = _f(None, "per expert per layer-step (weights read once), seconds; "
                                "null = expert_bytes / gpu_hbm_gbps")  # fmt: skip
    expert_per_token_s: float | None = _f(None, "per token routed to an expert, seconds; "
                                          "null = 2 x params / gpu_tflops")  # fmt: skip
    gpu_hbm_gbps: float = _f(1555.0, "GPU memory bandwidth, GB/s (A100-40GB: 1555)")
    gpu_tflops: float = _f(312.0, "GPU dense bf16 throughput, TFLOP/s (A100: 312)")


@dataclass
class ReplayConfig:
    """How the trace is replayed."""

    policies: list[str] = _f(["lru", "lfu", "belady"], "eviction policies ('NAME' or "
                             "'NAME:param=value')")  # fmt: skip
    mode: str = _f("timed", "'count' (hits and misses only) or 'timed' (link and compute)",
                   choices=("count", "timed"))  # fmt: skip
    access: str = _f("atomic", "'atomic' (a layer's experts are protected together, as runtimes "
                     "do) or 'sequential' (each access alone, as classic cache simulators)",
                     choices=("atomic", "sequential"))  # fmt: skip
    prefetch: str = _f("none", "prefetcher: 'none', 'oracle' (knows the trace's future), "
                       "'trace' (the trace's pred_h{H} columns), 'prev-token', 'cross-layer', "
                       "'moe-infinity', 'learned:model=PATH' or 'adaptive' (NAME:key=value "
                       "sets parameters; docs/policies.md)")  # fmt: skip
    horizon: int = _f(1, "prefetch horizon in layers (groups) ahead")
    events: int = _f(0, "keep up to this many timeline events (0 = none)")


@dataclass
class TracesConfig:
    """The traces a sweep replays."""

    paths: list[str] = _f(["traces/sample/sample.parquet"], "trace files or folders, or glob "
                          "patterns; relative ones are looked up in the working directory, "
                          "then beside the configuration file")  # fmt: skip


@dataclass
class ModelConfig:
    """Overrides of the traces' model shape (unset: as recorded in each trace)."""

    dtype: str | None = _f(None, "weight dtype of the routed experts (float32, bfloat16, "
                           "float16, float8, int8, mxfp4, int4): expert bytes are rescaled "
                           "from the trace's dtype, the parameter count stays")  # fmt: skip
    expert_bytes: int | None = _f(None, "bytes of one routed expert, every layer")


@dataclass
class SweepConfig:
    """The grid `moesim sweep` runs: every combination of these lists, with replay.policies
    and the cache sizes. An empty list means the single value of the other sections."""

    prefetchers: list[str] = _f(["none", "oracle", "moe-infinity",
                                 "learned:model=traces/sample/sample-predictor.npz"],
                                "prefetchers (as replay.prefetch)")  # fmt: skip
    horizons: list[int] = _f([1], "prefetch horizons in layers (not crossed with 'none')")
    modes: list[str] = _f([], "'count' and/or 'timed' (empty: replay.mode)")
    accesses: list[str] = _f([], "'atomic' and/or 'sequential' (empty: replay.access)")
    scopes: list[str] = _f([], "'global' and/or 'per-layer' (empty: cache.scope)")
    bandwidths_gbps: list[float] = _f([], "link bandwidths, GB/s, timed mode only (empty: "
                                      "link.bandwidth_gbps)")  # fmt: skip
    free_prefetch: bool = _f(False, "count mode: run prefetchers as free prefetch (as "
                             "`moesim replay --free-prefetch`); false: count mode has no "
                             "prefetch rows")  # fmt: skip
    one_pass: bool = _f(True, "count-mode LRU: every cache size from one stack-distance pass "
                        "(same results as replays)")  # fmt: skip
    workers: int = _f(0, "local worker processes (0 = all cores)")
    cluster: str = _f("", "Dask scheduler address (e.g. 'tcp://host:8786') to run on instead "
                      "of local processes; needs the 'cluster' extra")  # fmt: skip


@dataclass
class OutputConfig:
    """Where results go."""

    folder: str = _f("results/sweep", "folder for results.parquet, config.toml and parts/")


@dataclass
class SimConfig:
    """The whole configuration (see sim.toml)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> SimConfig:
        c = self.cache
        sizes = [k for k in ("slots", "fraction", "bytes") if getattr(c, k) is not None]
        if len(sizes) != 1:
            raise ConfigError(
                f"cache: set exactly one of 'slots', 'fraction', 'bytes' (got {sizes or 'none'})"
            )
        if c.slots is not None and c.slots < 1:
            raise ConfigError(f"cache.slots: expected at least 1 slot, got {c.slots}")
        if c.fraction is not None and not 0.0 < c.fraction <= 1.0:
            raise ConfigError(f"cache.fraction: expected a fraction in (0, 1], got {c.fraction}")
        if c.bytes is not None and c.bytes < 1:
            raise ConfigError(f"cache.bytes: expected a positive byte budget, got {c.bytes}")
        for item in c.pinned:
            parts = str(item).split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ConfigError(f"cache.pinned: expected 'LAYER:EXPERT', got {item!r}")
        ln = self.link
        if not ln.bandwidth_gbps > 0:
            raise ConfigError(f"link.bandwidth_gbps: expected > 0 GB/s, got {ln.bandwidth_gbps}")
        if ln.latency_s < 0:
            raise ConfigError(f"link.latency_s: expected >= 0 seconds, got {ln.latency_s}")
        if ln.engines < 1:
            raise ConfigError(f"link.engines: expected at least 1 copy engine, got {ln.engines}")
        cp = self.compute
        for key in ("dense_s", "dense_per_token_s", "expert_s", "expert_per_token_s"):
            v = getattr(cp, key)
            if v is not None and v < 0:
                raise ConfigError(f"compute.{key}: expected >= 0 seconds, got {v}")
        for key in ("gpu_hbm_gbps", "gpu_tflops"):
            if not getattr(cp, key) > 0:
                raise ConfigError(f"compute.{key}: expected > 0, got {getattr(cp, key)}")
        r = self.replay
        if not r.policies:
            raise ConfigError("replay.policies: expected at least one policy")
        if r.horizon < 1:
            raise ConfigError(f"replay.horizon: expected at least 1 layer, got {r.horizon}")
        if r.events < 0:
            raise ConfigError(f"replay.events: expected >= 0, got {r.events}")
        from policies.registry import parse_policy

        for p in r.policies:
            parse_policy(p)
        from simulator.prefetchers import parse_prefetch

        parse_prefetch(r.prefetch)
        for sec in (c, ln, cp, r):
            for f in dataclasses.fields(sec):
                choices = f.metadata.get("choices")
                if choices and getattr(sec, f.name) not in choices:
                    raise ConfigError(
                        f"{_section_name(sec)}.{f.name}: expected one of "
                        f"{', '.join(choices)}, got {getattr(sec, f.name)!r}"
                    )
        self._validate_sweep()
        return self

    def _validate_sweep(self) -> None:
        """The sections `moesim sweep` reads: cache size lists, traces, model, sweep, output."""
        c = self.cache
        lists = [k for k in ("fractions", "slots_list", "slots_range") if getattr(c, k)]
        if len(lists) > 1:
            raise ConfigError(f"cache: set at most one of 'fractions', 'slots_list', "
                              f"'slots_range' (got {', '.join(lists)})")  # fmt: skip
        for f in c.fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"cache.fractions: expected fractions in (0, 1], got {f}")
        for n in c.slots_list:
            if n < 1:
                raise ConfigError(f"cache.slots_list: expected at least 1 slot, got {n}")
        if c.slots_range:
            rg = c.slots_range
            if len(rg) != 3 or rg[0] < 1 or rg[2] < 1 or rg[1] <= rg[0]:
                raise ConfigError(f"cache.slots_range: expected [start, stop, step] with "
                                  f"1 <= start < stop and step >= 1, got {rg}")  # fmt: skip
        if not self.traces.paths:
            raise ConfigError("traces.paths: expected at least one trace path or pattern")
        m = self.model
        if m.dtype is not None and m.dtype not in DTYPE_BYTES:
            raise ConfigError(f"model.dtype: expected one of {', '.join(DTYPE_BYTES)}, "
                              f"got {m.dtype!r}")  # fmt: skip
        if m.expert_bytes is not None and m.expert_bytes < 1:
            raise ConfigError(f"model.expert_bytes: expected >= 1 byte, got {m.expert_bytes}")
        if m.dtype is not None and m.expert_bytes is not None:
            raise ConfigError("model: set 'dtype' or 'expert_bytes', not both")
        sw = self.sweep
        choices = {"modes": ("count", "timed"), "accesses": ("atomic", "sequential"),
                   "scopes": ("global", "per-layer")}  # fmt: skip
        for key, allowed in choices.items():
            for v in getattr(sw, key):
                if v not in allowed:
                    raise ConfigError(f"sweep.{key}: expected values among "
                                      f"{', '.join(allowed)}, got {v!r}")  # fmt: skip
        for h in sw.horizons:
            if h < 1:
                raise ConfigError(f"sweep.horizons: expected horizons >= 1 layer, got {h}")
        for bw in sw.bandwidths_gbps:
            if not bw > 0:
                raise ConfigError(f"sweep.bandwidths_gbps: expected > 0 GB/s, got {bw}")
        if sw.workers < 0:
            raise ConfigError(f"sweep.workers: expected >= 0 (0 = all cores), got {sw.workers}")
        if not self.output.folder:
            raise ConfigError("output.folder: expected a folder name")


_SECTIONS = {"cache": CacheConfig, "link": LinkConfig, "compute": ComputeConfig,
             "replay": ReplayConfig, "traces": TracesConfig, "model": ModelConfig,
             "sweep": SweepConfig, "output": OutputConfig}  # fmt: skip


def _section_name(obj) -> str:
    for name, cls in _SECTIONS.items():
        if isinstance(obj, cls):
            return name
    return type(obj).__name__


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    hint = typing.get_type_hints(type("X", (), {"__annotations__": {"v": annotation}}))["v"]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if typing.get_origin(opt) is list and isinstance(value, list):
            (inner,) = typing.get_args(opt)
            return [_check_type(key, v, inner) for v in value]
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is list:
        return "list of " + _type_name(typing.get_args(t)[0])
    return getattr(t, "__name__", str(t)).replace("NoneType", "null")


def config_from_dict(raw: dict[str, Any], where: str = "config") -> SimConfig:
    """Build a SimConfig from nested dicts (TOML tables); unknown keys are errors."""
    cfg = SimConfig()
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}] "
                              f"(expected {', '.join(_SECTIONS)})")  # fmt: skip
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{where}: unknown key '{section}.{key}' (keys: {', '.join(fields)})"
                )
            setattr(obj, key, _check_type(f"{where}: {section}.{key}", value, fields[key].type))
        for key in values:
            _clear_alternatives(obj, section, key, keep=values)
    return cfg


#: Keys of which one is set at a time: setting one (in a file or with --set) unsets the others
#: unless the same table sets them too (then validate() reports the conflict).
_ALTERNATIVES = {"cache": (("slots", "fraction", "bytes"),
                           ("fractions", "slots_list", "slots_range"))}  # fmt: skip


def _clear_alternatives(obj, section: str, key: str, keep) -> None:
    for group in _ALTERNATIVES.get(section, ()):
        if key in group:
            for other in group:
                if other != key and other not in keep:
                    setattr(obj, other, [] if isinstance(getattr(obj, other), list) else None)


def load_config(path: str | Path | None) -> SimConfig:
    """Read ``path`` (TOML) into a SimConfig; None gives the built-in defaults."""
    if path is None:
        return SimConfig()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such configuration file")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return config_from_dict(raw, str(p))


def apply_overrides(cfg: SimConfig, items: list[str]) -> SimConfig:
    """Apply ``section.key=value`` overrides (value in TOML syntax, e.g. ``[0.05,0.1]``)."""
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word is a string
        section, _, name = key.strip().partition(".")
        merged = config_from_dict({section: {name: value}}, "--set")
        setattr(getattr(cfg, section), name, getattr(getattr(merged, section), name))
        _clear_alternatives(getattr(cfg, section), section, name, keep=(name,))
    return cfg


def config_to_dict(cfg: SimConfig) -> dict[str, Any]:
    """Plain dict (for saving next to results)."""
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: SimConfig) -> str:
    """The configuration as TOML that :func:`load_config` reads back to an equal object
    (unset values, null, are left out: absent keys read back as unset)."""
    lines = ["# moesim configuration (resolved); moesim sweep and moesim replay read it back."]
    for section, values in config_to_dict(cfg).items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    import json
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")
