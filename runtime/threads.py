"""numba threading layer choice and per-call thread counts.

numba's ``workqueue`` layer aborts the process when two Python threads launch parallel
kernels at once, so a Session shared between threads needs ``tbb`` or ``omp``. ``configure()``
(called when ``sparsedge.runtime`` is imported, before any parallel kernel runs) picks, unless the
user set ``NUMBA_THREADING_LAYER``: tbb (pip wheel ``tbb`` on x86-64; its libtbb sits in
``<venv>/lib``, which is not on the loader path, so it is preloaded here), else omp (the system
libgomp, as on aarch64 boards), else workqueue; with workqueue the runtime serialises calls with a
process-wide lock (``needs_lock()``) instead of crashing. ``layer()`` reports the layer in use.

Thread counts: ``numba.set_num_threads`` is thread-local, so ``use_threads(k)`` is called in the
thread that runs the kernels, at the start of every ``Session.run``.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import numba

_configured: str | None = None
_lock = threading.Lock()
RUN_LOCK = threading.Lock()  # serialises runs when only workqueue is available


def _try_tbb() -> bool:
    try:
        import numba.np.ufunc.tbbpool  # noqa: F401
        return True
    except ImportError:
        pass
    for d in {os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")}:
        for lib in sorted(glob.glob(os.path.join(d, "libtbb.so.1[2-9]*")) + glob.glob(os.path.join(d, "libtbb.so"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                import numba.np.ufunc.tbbpool  # noqa: F401,F811
                return True
            except (OSError, ImportError):
                continue
    return False


def _try_omp() -> bool:
    try:
        import numba.np.ufunc.omppool  # noqa: F401
        return True
    except ImportError:
        return False


def configure() -> str:
    """Choose the threading layer (once per process); returns the configured name."""
    global _configured
    with _lock:
        if _configured is not None:
            return _configured
        requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
        if requested and requested != "default":
            _configured = requested
        elif _try_tbb():
            numba.config.THREADING_LAYER = "tbb"
            _configured = "tbb"
        elif _try_omp():
            numba.config.THREADING_LAYER = "omp"
            _configured = "omp"
        else:
            numba.config.THREADING_LAYER = "workqueue"
            _configured = "workqueue"
        return _configured


def layer() -> str:
    """The threading layer in use: numba's answer once a parallel kernel has run, else the configured one."""
    try:
        return numba.threading_layer()
    except ValueError:
        return configure()


def needs_lock() -> bool:
    """True when parallel launches from several threads at once would be unsafe (workqueue)."""
    return layer() == "workqueue"


def max_threads() -> int:
    return int(numba.config.NUMBA_NUM_THREADS)


def resolve(threads: int | None) -> int:
    """A requested thread count (None = all numba threads) clipped to [1, NUMBA_NUM_THREADS]."""
    if threads is None:
        return max_threads()
    return max(1, min(int(threads), max_threads()))


def use_threads(k: int) -> None:
    """Set the calling thread's numba thread count (thread-local)."""
    if numba.get_num_threads() != k:
        numba.set_num_threads(k)
