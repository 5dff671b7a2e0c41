"""Atomic file writes: the one implementation every writer in sparsedge uses.

``with atomic_write(path) as f: f.write(...)`` writes into a temp file beside ``path``; on
success the file is flushed, fsynced and renamed over ``path`` (then the folder is fsynced),
so readers see the old file or the complete new one, never a part. On any exception,
KeyboardInterrupt included, the temp file is removed and ``path`` is left untouched.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """Yield a file object (``mode`` "wb" or "w") whose contents replace ``path`` atomically."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
