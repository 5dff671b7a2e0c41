"""sparsedge.runtime: load a model file and run it (numpy + numba + scipy + cffi; never torch).

``Session(path, threads=None, tune=False, profile=False, kernel_overrides=None,
verify_checksums=True)``; see ``runtime/session.py``.
"""
from __future__ import annotations

from . import threads as _threads

_threads.configure()  # before any parallel kernel can run: tbb / omp, never a crashing workqueue

from .session import NodeArg, Session  # noqa: E402

__all__ = ["Session", "NodeArg"]
