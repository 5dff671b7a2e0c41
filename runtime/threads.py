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

BLAS threads: numpy's OpenBLAS keeps its own worker threads, which busy-wait after each call.
Alternating OpenBLAS calls with numba parallel kernels then thrashes: measured on the 2-core dev
machine, a 256x256x256 matmul after a parallel layernorm took 56 ms (median) instead of 0.28 ms,
and a 2-layer BERT (hidden 256) ran in 766 ms instead of 35 ms. So the runtime sets OpenBLAS to
1 thread (``limit_blas``, through ctypes on numpy's bundled OpenBLAS; process-wide) when a
Session is created, and splits BLAS calls over the Session's own threads (``runtime.par``);
``SPARSEDGE_BLAS_THREADS=k`` overrides it.

omp: libgomp's idle workers spin for a while after each parallel region (its default wait
policy), stealing the cores from the Python, numpy and BLAS work between kernels. Measured on the
2-core dev machine (BERT 2x64, batch 2): 14.1 ms per run with the default policy, 1.30 ms with
``OMP_WAIT_POLICY=PASSIVE`` (tbb: 1.33 ms). So when the runtime picks omp (or the user forces it)
it sets ``OMP_WAIT_POLICY=PASSIVE`` before libgomp loads, unless ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` is already set.
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


def _tbb_ok() -> bool:
    import numba.np.ufunc.tbbpool  # noqa: F401  (ImportError when libtbb cannot be loaded)
    from numba.np.ufunc import parallel

    check = getattr(parallel, "_check_tbb_version_compatible", None)
    if check is not None:
        check()  # ImportError when the TBB version is too old for numba
    return True


def _try_tbb() -> bool:
    try:
        return _tbb_ok()
    except ImportError:
        pass
    for d in {os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")}:
        for lib in sorted(glob.glob(os.path.join(d, "libtbb.so.1[2-9]*")) + glob.glob(os.path.join(d, "libtbb.so"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return _tbb_ok()
            except (OSError, ImportError):
                continue
    return False


def _passive_omp() -> None:
    """Make libgomp's idle workers sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless
    the user chose a policy. Must run before libgomp is loaded (it reads the variable once)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _try_omp() -> bool:
    _passive_omp()
    try:
        import numba.np.ufunc.omppool  # noqa: F401
        return True
    except ImportError:
        return False


class _ArraymathHook:
    """A one-shot import hook: when numba imports ``numba.np.arraymath`` (its CPU target loading
    its registries at the first compile or cache load), run that module's import-time BLAS probe
    without importing ``scipy.linalg``. Models that never dispatch a numba kernel pay nothing."""

    def find_spec(self, name, path=None, target=None):
        if name != "numba.np.arraymath":
            return None
        import importlib.util
        import sys as _sys

        try:
            _sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            from numba.np import linalg as _la

            real = _la.ensure_blas
            _la.ensure_blas = lambda: None
            try:
                real_exec(module)
            finally:
                _la.ensure_blas = real
                if getattr(module, "ensure_blas", None) is not real:
                    module.ensure_blas = real

        spec.loader.exec_module = exec_module
        return spec


def _lazy_blas_check() -> None:
    """Skip ``import scipy.linalg`` in numba's first registry load (about 0.35 s of a 1.3 s cold
    start of the demo model; no sparsedge kernel calls BLAS from jitted code).

    ``numba.np.arraymath`` probes for BLAS at import by importing ``scipy.linalg.cython_blas``; the
    probe only sets ``arraymath._HAVE_BLAS``, and numba's BLAS-backed implementations call the real
    ``ensure_blas()`` again when they are compiled. So when scipy is installed (a dependency) the
    probe is answered True without importing it (``_ArraymathHook``) and the real function is
    restored right after.
    """
    import importlib.util
    import sys as _sys

    if "numba.np.arraymath" in _sys.modules or importlib.util.find_spec("scipy") is None:
        return
    if not any(isinstance(f, _ArraymathHook) for f in _sys.meta_path):
        _sys.meta_path.insert(0, _ArraymathHook())


def configure() -> str:
    """Choose the threading layer (once per process); returns the configured name."""
    global _configured
    with _lock:
        if _configured is not None:
            return _configured
        try:
            _lazy_blas_check()
        except Exception:  # pragma: no cover - best effort start-up saving
            pass
        requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
        if requested and requested != "default":
            if requested == "omp":
                _passive_omp()
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


_blas_fns = None


def _blas_setters():
    """[(set_fn, get_fn)] for every OpenBLAS numpy/scipy loaded (ctypes; empty if none found)."""
    global _blas_fns
    if _blas_fns is not None:
        return _blas_fns
    fns = []
    try:
        import numpy

        dirs = [os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs"),
                os.path.join(os.path.dirname(numpy.__file__), ".dylibs")]
        libs = [p for d in dirs for p in glob.glob(os.path.join(d, "*openblas*"))]
        for p in libs:
            try:
                lib = ctypes.CDLL(p)
            except OSError:
                continue
            for suffix in ("64_", ""):
                for pre in ("scipy_openblas", "openblas"):
                    setf = getattr(lib, f"{pre}_set_num_threads{suffix}", None)
                    getf = getattr(lib, f"{pre}_get_num_threads{suffix}", None)
                    if setf is not None and getf is not None:
                        getf.restype = ctypes.c_int
                        fns.append((setf, getf))
                        break
                else:
                    continue
                break
    except Exception:  # pragma: no cover - BLAS control is best effort
        fns = []
    _blas_fns = fns
    return fns


def blas_threads() -> int | None:
    """OpenBLAS's current thread count (None when it cannot be queried)."""
    fns = _blas_setters()
    return int(fns[0][1]()) if fns else None


def limit_blas(n: int) -> int | None:
    """Set numpy's OpenBLAS to ``n`` threads (process-wide); returns the new count or None."""
    for setf, _ in _blas_setters():
        setf(ctypes.c_int(int(n)))
    return blas_threads()


def blas_policy(numba_threads: int) -> int | None:
    """Apply the runtime's BLAS thread policy (see module doc); returns OpenBLAS's thread count.

    OpenBLAS is held at 1 thread whatever the Session's thread count: BLAS work is split over the
    Session's threads by ``runtime.par`` instead. (At ``threads=1`` OpenBLAS kept its default
    pool, so a "1-thread" Session used every core and its idle BLAS workers spun: dense BERT ran
    1258 ms vs onnxruntime's 342 ms at 1 thread on the loaded dev machine.)"""
    env = os.environ.get("SPARSEDGE_BLAS_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return limit_blas(int(env))
    cur = blas_threads()
    if cur is not None and cur > 1:
        return limit_blas(1)
    return cur
