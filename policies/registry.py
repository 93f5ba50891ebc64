"""The registry of eviction policies: name -> PolicySpec.

Adding a policy: write ``policies/NAME.py`` with ``PID``, ``SPEC`` and a jitted
``on_access(st, o, is_insert)`` hook, then register it here and in ``policies/dispatch.py``
(one import and one branch).
"""

from __future__ import annotations

from policies import belady, fifo, lfu, lfu_aged, lfu_perfect, lru, moe_infinity, no_cache, static
from policies.spec import PolicySpec
from traces.errors import ConfigError

_MODULES = (lru, fifo, lfu, lfu_perfect, lfu_aged, belady, static, no_cache, moe_infinity)

POLICIES: dict[str, PolicySpec] = {m.SPEC.name: m.SPEC for m in _MODULES}

assert len({s.pid for s in POLICIES.values()}) == len(POLICIES), "duplicate policy ids"


#: Other names of registered policies: a system's rule that one of ours already implements.
#: MoE-Infinity's open-source runtime evicts the resident with the fewest uses since it was
#: loaded: in-cache LFU. Results keep the name the user gave.
ALIASES: dict[str, str] = {"moe-infinity-lfu": "lfu"}


def get_policy(name: str) -> PolicySpec:
    """The policy called ``name`` (or an alias); ConfigError listing the known names otherwise."""
    spec = POLICIES.get(ALIASES.get(name.lower(), name.lower()))
    if spec is None:
        known = ", ".join([*POLICIES, *ALIASES])
        raise ConfigError(f"unknown policy '{name}': expected one of {known}")
    return spec


def parse_policy(text: str) -> tuple[PolicySpec, dict[str, float]]:
    """Parse ``NAME`` or ``NAME:key=value,key=value`` into a spec and parameter values."""
    name, _, rest = text.partition(":")
    spec = get_policy(name.strip())
    values = {p.name: p.default for p in spec.params}
    if rest:
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in values:
                known = ", ".join(values) or "none"
                raise ConfigError(
                    f"policy '{spec.name}': unknown parameter '{key}' (parameters: {known})"
                )
            try:
                values[key] = float(raw)
            except ValueError:
                raise ConfigError(
                    f"policy '{spec.name}': parameter '{key}': expected a number, got {raw!r}"
                ) from None
            if values[key] <= 0:
                raise ConfigError(f"policy '{spec.name}': parameter '{key}': expected > 0")
    return spec, values
