"""Wall seconds inside a replay kernel, less numba's compiling or loading of it (``kernel_s``).

The first call of a jitted kernel in a process compiles it, or loads it from numba's disk cache
(here 1-2 s to load the replay kernels, a minute or more to compile one afresh); later calls
do neither.
``kernel_s`` promises the kernel's own time, so a run must not count that first-call work, also
where a library user calls ``run()`` without the CLI's warm-up. numba holds its compiler lock
while it compiles or loads a kernel (and a thread waits on it while another thread does), and
announces it as the ``numba:compiler_lock`` event; :class:`KernelClock` measures the block's
wall time and takes away this thread's time under that lock. A kernel already loaded takes no
lock, so a warm run is timed as before, with no work added.
"""

from __future__ import annotations

import threading
import time

from numba.core import event as ev

_KIND = "numba:compiler_lock"


class KernelClock(ev.Listener):
    """Context manager: ``seconds`` is the block's wall time (seconds) less the time this
    thread spent in numba's compiler lock inside it; ``loading`` is the latter."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._depth = 0
        self._since = 0.0
        self._start = 0.0
        self.wall = 0.0
        self.loading = 0.0

    def on_start(self, event) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread compiling: not this block's time
        if self._depth == 0:
            self._since = time.perf_counter()
        self._depth += 1

    def on_end(self, event) -> None:
        if threading.get_ident() != self._thread or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self.loading += time.perf_counter() - self._since

    def __enter__(self) -> KernelClock:
        ev.register(_KIND, self)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._start
        ev.unregister(_KIND, self)

    @property
    def seconds(self) -> float:
        return max(0.0, self.wall - self.loading)
