"""The numba-jitted discrete-event core: replay kernels, configuration, metrics, CLI."""

import traces._jit  # noqa: F401  (must run before any kernel is defined)
