"""Shared test helpers: the real traces in ../shared (skipped cleanly where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOESIM_SHARED", REPO.parent / "shared"))
REAL = SHARED / "traces" / "real"


def real_path(*parts: str) -> Path:
    """Path under ../shared/traces/real, or skip the calling test where it is absent."""
    p = REAL.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real trace data not present: {p}")
    return p


@pytest.fixture
def real():
    """The real-trace path helper as a fixture: ``real("deepseek-v2-lite-moe-beyond")``."""
    return real_path
