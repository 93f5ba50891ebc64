"""Traces of expert activations: format, I/O, validation, importers, synthesis, statistics."""

import traces._jit  # noqa: F401  (must run before any kernel is defined)
from traces.format import TraceError, TraceMeta
from traces.io import read_meta, read_trace, trace_from_arrays, write_trace
from traces.trace import Trace

__all__ = [
    "Trace",
    "TraceError",
    "TraceMeta",
    "read_meta",
    "read_trace",
    "trace_from_arrays",
    "write_trace",
]
