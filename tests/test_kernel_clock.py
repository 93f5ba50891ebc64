"""``kernel_s`` leaves out numba's compiling and loading of a kernel (simulator/kernel_clock.py)."""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

from simulator.kernel_clock import KernelClock


def _fresh_kernel():
    """A jitted function no process has compiled yet (not cached: compiled on its first call)."""

    @njit(cache=False)
    def total(x):
        s = 0.0
        for v in x:
            s += v
        return s

    return total


def test_first_call_compiling_is_not_kernel_time():
    kernel = _fresh_kernel()
    x = np.arange(1000.0)
    with KernelClock() as first:
        assert kernel(x) == x.sum()
    assert first.loading > 0.0  # numba took its compiler lock to compile
    assert first.seconds == max(0.0, first.wall - first.loading) < first.wall
    with KernelClock() as second:
        kernel(x)
    assert second.loading == 0.0 and second.seconds == second.wall  # compiled: no lock


def test_another_threads_compiling_is_not_taken_away():
    x = np.arange(10.0)
    started, done = threading.Event(), threading.Event()

    def other():
        started.wait()
        _fresh_kernel()(x)  # compiles in another thread while the block runs
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with KernelClock() as clock:
        started.set()
        done.wait(60)
    t.join()
    assert done.is_set() and clock.loading == 0.0 and clock.seconds == clock.wall
