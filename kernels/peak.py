"""Measured float32 FMA peak of this machine (GFLOP/s) at a given thread count.

``fma_peak(threads=None, seconds=0.2)`` runs, on every thread, 16 independent chains of
vector FMAs held in registers (``simd.f32vec``: 512-bit on AVX-512, as the kernels use) and
returns the best GFLOP/s over a few repeats. With one thread it times the calling thread's
CPU time (robust to other processes); with more it is wall time (run it on an idle machine). Used by bench to report kernels as a fraction of peak.
Not a kernel row (nothing to compare against).
"""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import prange

from ._jit import pjit
from .simd import VW, vbcast, vfma, vload, vstore

_CHAINS = 16  # independent accumulator vectors: covers FMA latency x 2 ports


@pjit
def _fma_loop(acc, iters, a, b):
    """acc [threads, 16*VW] float32; per thread 16 vector chains of iters FMAs each."""
    for t in prange(acc.shape[0]):
        r = acc[t]
        va = vbcast(a)
        vb = vbcast(b)
        c0 = vload(r, 0); c1 = vload(r, VW); c2 = vload(r, 2 * VW); c3 = vload(r, 3 * VW)
        c4 = vload(r, 4 * VW); c5 = vload(r, 5 * VW); c6 = vload(r, 6 * VW); c7 = vload(r, 7 * VW)
        c8 = vload(r, 8 * VW); c9 = vload(r, 9 * VW); c10 = vload(r, 10 * VW); c11 = vload(r, 11 * VW)
        c12 = vload(r, 12 * VW); c13 = vload(r, 13 * VW); c14 = vload(r, 14 * VW); c15 = vload(r, 15 * VW)
        for _ in range(iters):
            c0 = vfma(c0, va, vb); c1 = vfma(c1, va, vb); c2 = vfma(c2, va, vb); c3 = vfma(c3, va, vb)
            c4 = vfma(c4, va, vb); c5 = vfma(c5, va, vb); c6 = vfma(c6, va, vb); c7 = vfma(c7, va, vb)
            c8 = vfma(c8, va, vb); c9 = vfma(c9, va, vb); c10 = vfma(c10, va, vb); c11 = vfma(c11, va, vb)
            c12 = vfma(c12, va, vb); c13 = vfma(c13, va, vb); c14 = vfma(c14, va, vb); c15 = vfma(c15, va, vb)
        vstore(r, 0, c0); vstore(r, VW, c1); vstore(r, 2 * VW, c2); vstore(r, 3 * VW, c3)
        vstore(r, 4 * VW, c4); vstore(r, 5 * VW, c5); vstore(r, 6 * VW, c6); vstore(r, 7 * VW, c7)
        vstore(r, 8 * VW, c8); vstore(r, 9 * VW, c9); vstore(r, 10 * VW, c10); vstore(r, 11 * VW, c11)
        vstore(r, 12 * VW, c12); vstore(r, 13 * VW, c13); vstore(r, 14 * VW, c14); vstore(r, 15 * VW, c15)


def fma_peak(threads: int | None = None, seconds: float = 0.2, repeats: int = 5) -> float:
    """Best measured float32 GFLOP/s (2 flops per FMA) using ``threads`` numba threads."""
    old = numba.get_num_threads()
    nt = old if threads is None else max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(nt)
    try:
        acc = np.ones((nt, _CHAINS * VW), dtype=np.float32)
        a, b = np.float32(0.999999), np.float32(1e-7)
        _fma_loop(acc, 10, a, b)  # compile / warm
        iters = 1000
        while True:
            t0 = time.perf_counter()
            _fma_loop(acc, iters, a, b)
            dt = time.perf_counter() - t0
            if dt > seconds / repeats or iters > 1 << 30:
                break
            iters *= 4
        # one thread runs in the caller (its CPU time ignores preemption by other processes)
        clock = time.thread_time if nt == 1 else time.perf_counter
        best = 0.0
        for _ in range(repeats):
            t0 = clock()
            _fma_loop(acc, iters, a, b)
            dt = clock() - t0
            best = max(best, 2.0 * _CHAINS * VW * iters * nt / dt / 1e9)
        return best
    finally:
        numba.set_num_threads(old)


if __name__ == "__main__":  # python -m sparsedge.kernels.peak
    for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        print(f"threads={t}: {fma_peak(t):.1f} GFLOP/s float32 FMA")
