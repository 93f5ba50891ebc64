"""Where numba keeps moesim's compiled kernels: a folder named by a hash of moesim's sources.

numba's on-disk cache checks only the timestamp of the file that defines a kernel, not of the
files whose jitted functions it inlines (a policy's hooks are inlined into the replay kernels),
so an edited policy could silently run stale machine code. Keying the cache folder on the
source of every moesim module that holds jitted code (any file that mentions numba or this
module, and all of policies/, whose constants the kernels freeze in) makes that impossible,
while edits to plain-Python modules (CLI, plots, sweeps) keep the compiled kernels.
Set NUMBA_CACHE_DIR to override.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numba

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("traces", "simulator", "policies")


def source_hash() -> str:
    h = hashlib.sha1()
    for pkg in _PACKAGES:
        for f in sorted((_ROOT / pkg).rglob("*.py")):
            text = f.read_bytes()
            if pkg == "policies" or b"numba" in text or b"_jit" in text:
                h.update(f.name.encode())
                h.update(text)
    return h.hexdigest()[:16]


def configure() -> str:
    """Point numba's cache at the per-source folder (unless NUMBA_CACHE_DIR is set)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "moesim" / "numba" / source_hash()
    numba.config.CACHE_DIR = str(folder)
    return str(folder)


CACHE_DIR = configure()

#: Options of every jitted function on the replay path: cached on disk, and without numba's
#: reference counting (``_nrt=False``), which otherwise costs 20-40 ns per call of a helper that
#: takes arrays (measured). Such functions must not allocate: callers pass scratch arrays in.
HOT = {"cache": True, "_nrt": False}


def parallel_ok() -> bool:
    """Whether this thread may launch numba's parallel (``prange``) kernels: only the main
    thread. numba's fallback threading layer (workqueue) aborts the process when two threads
    launch parallel work at once (a Dask worker with several threads, say), so callers off the
    main thread run the serial version on the calling thread instead."""
    return threading.current_thread() is threading.main_thread()
