"""The one place numba decorator policy lives. Every jitted kernel uses ``jit`` / ``pjit``.

Policy:
* nopython always (``numba.njit``), ``cache=True`` (the on-disk cache is keyed by numba on
  the CPU name and features, so boards never share machine code), ``nogil=True`` so that
  several Python threads can run kernels at once.
* fastmath without ``nnan`` / ``ninf``: reassociation and contraction (FMA) are allowed,
  NaN/Inf semantics are kept.
* ``error_model="numpy"``: division by zero gives inf/nan instead of raising (no exception
  paths in hot loops).
* Bounds checking is off (the default) and follows ``NUMBA_BOUNDSCHECK=1`` when CI sets it;
  index arrays are validated by ``formats`` before they can reach a kernel.
* Keep specializations few: kernels take fixed dtypes (float32 values, int32 indices,
  int64 sizes) and callers cast at the boundary.
"""
from __future__ import annotations

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})


def jit(fn=None, **overrides):
    """Serial nopython kernel. Usage: ``@jit`` or ``@jit(inline="always")``."""
    opts = dict(cache=True, nogil=True, fastmath=set(FASTMATH), error_model="numpy")
    opts.update(overrides)
    if fn is None:
        return lambda f: numba.njit(**opts)(f)
    return numba.njit(**opts)(fn)


def pjit(fn=None, **overrides):
    """Parallel nopython kernel (``prange`` loops); the thread count is the caller's
    ``numba.set_num_threads`` in the calling thread."""
    overrides.setdefault("parallel", True)
    return jit(fn, **overrides)
