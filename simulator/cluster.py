"""Where sweep tasks run: this process, local worker processes, or a Dask cluster.

All three offer the same two calls, ``submit(fn, arg) -> future`` and
``wait_first(futures) -> finished futures``, and are context managers that cancel what is
still pending on the way out (an interrupted sweep stops promptly).

- One worker: tasks run here, in order (no processes; simplest to debug).
- Local: a ``concurrent.futures`` process pool, one process per core. On Linux the workers are
  forked after this process has loaded the compiled replay kernels, so they start warm (when
  this process runs other threads, a fork server starts them instead).
- Dask (``--cluster tcp://host:8786``): a ``distributed.Client`` on an existing scheduler.
  We chose Dask over Ray because it is a pure-Python install (no separate object store or
  raylet binaries), its ``LocalCluster`` makes the same path testable on one machine, and it
  deploys on the HPC batch systems simulation users have (dask-jobqueue for SLURM/PBS,
  dask-kubernetes). Workers need moesim installed and the traces at the same paths (a shared
  filesystem); results come back to this process, which alone writes the output folder.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import sys
import threading

from traces.errors import ConfigError


class InlineExecutor:
    """Runs tasks in this process, one at a time, when they are waited for."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def submit(self, fn, arg):
        fut: cf.Future = cf.Future()
        fut.call = (fn, arg)
        return fut

    def wait_first(self, futures):
        fut = next(iter(futures))
        fn, arg = fut.call
        try:
            fut.set_result(fn(arg))
        except Exception as exc:  # re-raised by result(), as a pool does
            fut.set_exception(exc)
        return [fut]


class LocalExecutor:
    """A pool of ``workers`` processes on this machine."""

    def __init__(self, workers: int):
        # fork only from a single-threaded process (forking while another thread holds a lock
        # can hang the child); otherwise a fork server, whose workers load the kernels anew
        if sys.platform.startswith("linux") and threading.active_count() == 1:
            _warm_parent()
            method = "fork"
        else:
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)
        return None

    def submit(self, fn, arg):
        return self.pool.submit(fn, arg)

    def wait_first(self, futures):
        done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
        return done


def _warm_parent() -> None:
    """Load the compiled kernels here, so forked workers inherit them instead of each loading
    (or, on a fresh checkout, compiling) them."""
    from simulator.warmup import warm_up

    warm_up("count")
    warm_up("timed")


#: Seconds to wait for the Dask scheduler to answer.
CONNECT_TIMEOUT_S = 15


class DaskExecutor:
    """Tasks on the Dask cluster whose scheduler listens at ``address``."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError(
                "sweep.cluster: running on a Dask cluster needs the 'cluster' extra "
                "(pip install 'moesim[cluster]')"
            ) from None
        try:
            self.client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"sweep.cluster: cannot reach the Dask scheduler at {address!r} "
                              f"({why})") from None  # fmt: skip

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close()
        return None

    def submit(self, fn, arg):
        return self.client.submit(fn, arg, pure=False)

    def wait_first(self, futures):
        from distributed import wait

        done, _ = wait(list(futures), return_when="FIRST_COMPLETED")
        return done


def executor_for(cluster: str, workers: int):
    """The executor a sweep uses: Dask at ``cluster`` if set, else ``workers`` local ones."""
    if cluster:
        return DaskExecutor(cluster)
    if workers <= 1:
        return InlineExecutor()
    return LocalExecutor(workers)
