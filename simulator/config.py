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
    prefetch: str = _f("none", "prefetcher: 'none', 'oracle' (knows the trace's future) or "
                       "'trace' (the trace's pred_h{H} columns)",
                       choices=("none", "oracle", "trace"))  # fmt: skip
    horizon: int = _f(1, "prefetch horizon in layers (groups) ahead")
    events: int = _f(0, "keep up to this many timeline events (0 = none)")


@dataclass
class SimConfig:
    """The whole configuration (see sim.toml)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

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
        for sec in (c, ln, cp, r):
            for f in dataclasses.fields(sec):
                choices = f.metadata.get("choices")
                if choices and getattr(sec, f.name) not in choices:
                    raise ConfigError(
                        f"{_section_name(sec)}.{f.name}: expected one of "
                        f"{', '.join(choices)}, got {getattr(sec, f.name)!r}"
                    )
        return self


_SECTIONS = {"cache": CacheConfig, "link": LinkConfig, "compute": ComputeConfig,
             "replay": ReplayConfig}  # fmt: skip


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
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def config_from_dict(raw: dict[str, Any], where: str = "config") -> SimConfig:
    """Build a SimConfig from nested dicts (TOML tables); unknown keys are errors."""
    cfg = SimConfig()
    for section, values in raw.items():
        if section not in _SECTIONS:
            if section in ("sweep", "traces", "output", "model"):
                continue  # read by `moesim sweep`
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
    return cfg


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
    return cfg


def config_to_dict(cfg: SimConfig) -> dict[str, Any]:
    """Plain dict (for saving next to results)."""
    return dataclasses.asdict(cfg)
