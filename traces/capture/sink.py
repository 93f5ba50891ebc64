"""Where a capture's rows go: one trace file, or a folder with one part per batch.

- ``run.parquet``: one file, written through :class:`traces.io.TraceWriter` (each batch
  becomes row groups as soon as it finishes). The file appears when the capture ends or is
  stopped (Ctrl-C, an error): :meth:`TraceSink.stop` then finishes it with the batches written
  so far, validated, so a stopped capture leaves a readable trace.
- ``run/`` (a folder, or a path ending in ``/``): each batch is its own complete part
  ``part-00000.parquet``, ``part-00001.parquet``, ... renamed into place as it finishes, so
  even a capture that is killed outright (out of memory, power loss) keeps every finished batch.
  ``read_trace("run/")`` reads the parts as one trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from traces.errors import ConfigError
from traces.format import TraceMeta
from traces.io import TraceWriter


def is_folder_target(path: str | os.PathLike) -> bool:
    """True when ``path`` names a folder of parts (an existing folder or ends with a slash)."""
    text = os.fspath(path)
    return Path(text).is_dir() or text.endswith(("/", os.sep))


def check_target(path: str | os.PathLike) -> None:
    """ConfigError when ``path`` cannot take a capture (checked before a model is loaded)."""
    p = Path(path)
    if is_folder_target(path) and p.exists() and any(p.glob("*.parquet")):
        raise ConfigError(
            f"{p}: folder already holds *.parquet files (expected an empty or new folder for "
            "the parts of this capture)"
        )


class TraceSink:
    """Streams finished batches to a trace file or folder of parts (see the module doc).

    Attributes:
        path: the trace file or folder; rows: rows written; batches: batches written.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, optional: list[str]):
        self.path = Path(path)
        self.meta = meta
        self.optional = list(optional)
        self.folder = is_folder_target(path)
        self.rows = 0
        self.batches = 0
        self._writer: TraceWriter | None = None
        self._done = False
        check_target(path)
        if self.folder:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self._writer = TraceWriter(self.path, meta, self.optional)

    def write(self, table: pa.Table) -> None:
        """Append one finished batch (rows in trace order)."""
        if self.folder:
            part = self.path / f"part-{self.batches:05d}.parquet"
            with TraceWriter(part, self.meta, self.optional) as w:
                w.write(table)
        else:
            self._writer.write(table)
        self.rows += table.num_rows
        self.batches += 1

    def close(self) -> Path:
        """Finish the trace (validated) and return its path."""
        self._done = True
        if self._writer is not None:
            self._writer.close()
        return self.path

    def stop(self) -> Path | None:
        """After an interruption: keep the finished batches (None when there were none)."""
        if self._done:
            return self.path if self.rows else None
        self._done = True
        if self._writer is None:
            return self.path if self.batches else None
        if self.rows == 0:
            self._writer.abort()
            return None
        self._writer.close()
        return self.path
