"""Eviction policies: one file per algorithm behind one small interface (see registry.py)."""

import traces._jit  # noqa: F401  (must run before any kernel is defined)
