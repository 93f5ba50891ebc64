"""The optional capture extra (torch, transformers): imported lazily, with a one-line error."""

from __future__ import annotations

from traces.errors import ConfigError

#: Oldest transformers whose MoE routers are modules returning (logits, weights, experts).
MIN_TRANSFORMERS = (5, 0)


def require() -> tuple:
    """``(torch, transformers)``, or ConfigError naming the extra to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        why = (
            f"{exc.name} is not installed"
            if isinstance(exc, ModuleNotFoundError)
            else f"importing it failed: {' '.join(str(exc).split())[:120]}"
        )
        raise ConfigError(
            f"moesim capture/calibrate need the optional 'capture' extra ({why}): "
            "pip install 'moesim[capture]'"
        ) from None
    if _version(transformers.__version__) < MIN_TRANSFORMERS:
        raise ConfigError(
            f"moesim capture needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
            f"(routers as modules), found {transformers.__version__}: "
            "pip install -U 'moesim[capture]'"
        )
    return torch, transformers


def available() -> bool:
    """True when the capture extra is installed and recent enough (for tests and help texts)."""
    try:
        require()
    except ConfigError:
        return False
    return True


def _version(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))
