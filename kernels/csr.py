"""CSR float32 kernels: ``Y[out, N] = act(W @ X + bias + residual)`` with W in CSR.

W: ``indptr`` int32 [out+1], ``indices`` int32 or uint16 [nnz] (sorted within a row),
``data`` float32 [nnz]. X float32 [in, N], Y float32 [out, N], both C-contiguous.

* ``csr_spmm``: (N chunk, row block) tasks in parallel, chunk-major; N chunks are sized so
  the chunk of X (in rows) stays in L2 (``L2_FLOATS``); a row block is a contiguous range of
  rows (``ROW_BLOCKS`` per chunk; measured faster than one task per row). Per row and chunk, a
  register-blocked micro-kernel (``simd.f32vec``) keeps 8 vectors (or 4 vectors x 2 chains)
  of accumulators in registers while the row's non-zeros stream by (one broadcast + 8 loads +
  8 FMAs per non-zero, loop 0-based over the row's slices, no output traffic); a 1-vector
  kernel and a scalar loop (nnz unrolled x8, output in L1) take the remaining columns. The
  fused epilogue runs once per row and chunk. X rows must be 64-byte aligned for the vector
  loads not to straddle cache lines (measured 2x slower at 90%, N=128): when X's base is not
  64-byte aligned or N is not a multiple of VW, and each X row is used by at least
  ``COPY_MIN_USES`` non-zeros on average, X is first copied (in parallel) to an aligned
  buffer with a padded row stride.
* ``csr_spmv`` (N = 1): row-block tasks (``ROW_BLOCKS`` contiguous row ranges), one
  gather-dot per row with the fused epilogue. Memory-bound when the weights stream from DRAM:
  bytes per non-zero are what count, so the table's prepare repacks int32 indices to uint16
  when in <= 65536 (6 B instead of 8 B per non-zero; 2 B per non-zero of new memory); the
  block's ``data`` / ``indices`` streams are software-prefetched ``SPMV_PREFETCH`` non-zeros
  ahead (3072x768 at 90%, 40 distinct matrices cycled, private pools: int32 0.139 -> 0.116 ms
  with the prefetch, uint16 0.099 -> 0.095 ms).
* Index dtypes: the kernels see uint16 or uint32 indices (int32 arrays are viewed as uint32 at
  prepare, no copy: validated non-negative, and unsigned indices spare the hot loops the
  negative-index fix-ups; spmm 3072x768 at 90%, N=128: 0.42 -> 0.39 ms).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import jit, pjit
from .epilogue import epilogue_ref, epilogue_tile, epilogue_vec, none1, none2, act_scalar
from .simd import VW, vadd, vbcast, vfma, vload, vprefetch, vstore, vzero
from .table import KernelSpec

TN = 128  # N tile (floats) of the scalar remainder / epilogue passes
L2_FLOATS = 1 << 18  # X chunk budget: 1 MB of floats kept L2-resident
ROW_BLOCKS = 64  # parallel tasks per N chunk (contiguous row ranges)
SPMV_PREFETCH = 4096  # spmv: software prefetch distance (non-zeros) of the data / indices streams
COPY_MIN_USES = 16  # copy a misaligned X when each X row is used by >= this many non-zeros on average
# (measured break-even about 13: 256x256 at 95%, N=3136)


@jit
def _row_tile(indices, data, k0, k1, x, yr, j0, m):
    """yr[:m] = sum_k data[k] * x[indices[k], j0:j0+m] over k in [k0, k1)."""
    ix = indices[k0:k1]
    dv = data[k0:k1]
    nk = k1 - k0
    for j in range(m):
        yr[j] = np.float32(0.0)
    k = 0
    while k + 8 <= nk:
        v0 = dv[k]
        v1 = dv[k + 1]
        v2 = dv[k + 2]
        v3 = dv[k + 3]
        v4 = dv[k + 4]
        v5 = dv[k + 5]
        v6 = dv[k + 6]
        v7 = dv[k + 7]
        x0 = x[ix[k], j0:j0 + m]
        x1 = x[ix[k + 1], j0:j0 + m]
        x2 = x[ix[k + 2], j0:j0 + m]
        x3 = x[ix[k + 3], j0:j0 + m]
        x4 = x[ix[k + 4], j0:j0 + m]
        x5 = x[ix[k + 5], j0:j0 + m]
        x6 = x[ix[k + 6], j0:j0 + m]
        x7 = x[ix[k + 7], j0:j0 + m]
        for j in range(m):
            yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j]) + \
                     ((v4 * x4[j] + v5 * x5[j]) + (v6 * x6[j] + v7 * x7[j]))
        k += 8
    if k + 4 <= nk:
        v0 = dv[k]
        v1 = dv[k + 1]
        v2 = dv[k + 2]
        v3 = dv[k + 3]
        x0 = x[ix[k], j0:j0 + m]
        x1 = x[ix[k + 1], j0:j0 + m]
        x2 = x[ix[k + 2], j0:j0 + m]
        x3 = x[ix[k + 3], j0:j0 + m]
        for j in range(m):
            yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j])
        k += 4
    while k < nk:
        v0 = dv[k]
        x0 = x[ix[k], j0:j0 + m]
        for j in range(m):
            yr[j] += v0 * x0[j]
        k += 1


@jit
def _mkc4(indices, data, k0, k1, x, yr, j):
    """yr[j:j+4*VW] = sum_k data[k] * x[indices[k], j:j+4*VW]; 4 vectors x 2 chains in registers."""
    ix = indices[k0:k1]
    dv = data[k0:k1]
    nk = k1 - k0
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    b0 = vzero(); b1 = vzero(); b2 = vzero(); b3 = vzero()
    k = 0
    while k + 2 <= nk:
        xr = x[ix[k]]
        w = vbcast(dv[k])
        a0 = vfma(w, vload(xr, j), a0)
        a1 = vfma(w, vload(xr, j + VW), a1)
        a2 = vfma(w, vload(xr, j + 2 * VW), a2)
        a3 = vfma(w, vload(xr, j + 3 * VW), a3)
        xr = x[ix[k + 1]]
        w = vbcast(dv[k + 1])
        b0 = vfma(w, vload(xr, j), b0)
        b1 = vfma(w, vload(xr, j + VW), b1)
        b2 = vfma(w, vload(xr, j + 2 * VW), b2)
        b3 = vfma(w, vload(xr, j + 3 * VW), b3)
        k += 2
    if k < nk:
        xr = x[ix[k]]
        w = vbcast(dv[k])
        a0 = vfma(w, vload(xr, j), a0)
        a1 = vfma(w, vload(xr, j + VW), a1)
        a2 = vfma(w, vload(xr, j + 2 * VW), a2)
        a3 = vfma(w, vload(xr, j + 3 * VW), a3)
    vstore(yr, j, vadd(a0, b0))
    vstore(yr, j + VW, vadd(a1, b1))
    vstore(yr, j + 2 * VW, vadd(a2, b2))
    vstore(yr, j + 3 * VW, vadd(a3, b3))


@jit
def _mkc8(indices, data, k0, k1, x, yr, j):
    """yr[j:j+8*VW] = sum_k data[k] * x[indices[k], j:j+8*VW]; 8 vector accumulators.
    The loop runs 0-based over the row's slices (no negative-index fix-ups in the hot loop)."""
    ix = indices[k0:k1]
    dv = data[k0:k1]
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    for k in range(k1 - k0):
        xr = x[ix[k]]
        w = vbcast(dv[k])
        a0 = vfma(w, vload(xr, j), a0)
        a1 = vfma(w, vload(xr, j + VW), a1)
        a2 = vfma(w, vload(xr, j + 2 * VW), a2)
        a3 = vfma(w, vload(xr, j + 3 * VW), a3)
        a4 = vfma(w, vload(xr, j + 4 * VW), a4)
        a5 = vfma(w, vload(xr, j + 5 * VW), a5)
        a6 = vfma(w, vload(xr, j + 6 * VW), a6)
        a7 = vfma(w, vload(xr, j + 7 * VW), a7)
    vstore(yr, j, a0)
    vstore(yr, j + VW, a1)
    vstore(yr, j + 2 * VW, a2)
    vstore(yr, j + 3 * VW, a3)
    vstore(yr, j + 4 * VW, a4)
    vstore(yr, j + 5 * VW, a5)
    vstore(yr, j + 6 * VW, a6)
    vstore(yr, j + 7 * VW, a7)


@jit
def _mkc1(indices, data, k0, k1, x, yr, j):
    """yr[j:j+VW] = sum_k data[k] * x[indices[k], j:j+VW]; 4 chains in registers."""
    ix = indices[k0:k1]
    dv = data[k0:k1]
    nk = k1 - k0
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    k = 0
    while k + 4 <= nk:
        a0 = vfma(vbcast(dv[k]), vload(x[ix[k]], j), a0)
        a1 = vfma(vbcast(dv[k + 1]), vload(x[ix[k + 1]], j), a1)
        a2 = vfma(vbcast(dv[k + 2]), vload(x[ix[k + 2]], j), a2)
        a3 = vfma(vbcast(dv[k + 3]), vload(x[ix[k + 3]], j), a3)
        k += 4
    while k < nk:
        a0 = vfma(vbcast(dv[k]), vload(x[ix[k]], j), a0)
        k += 1
    vstore(yr, j, vadd(vadd(a0, a1), vadd(a2, a3)))


@pjit
def _aligned_copy(x, npad):
    """A copy of x [in, N] with 64-byte aligned rows: float32 [in, npad] (npad >= N, a multiple
    of VW; columns N..npad uninitialized)."""
    nin = x.shape[0]
    n = x.shape[1]
    buf = np.empty(nin * npad + VW, np.float32)
    off = ((64 - buf.ctypes.data % 64) % 64) // 4
    xa = buf[off:off + nin * npad].reshape((nin, npad))
    for r in prange(nin):
        xa[r, :n] = x[r, :]
    return xa


@pjit
def _spmm_rows(indptr, indices, data, x, y, bias, res, act, lo, hi):
    """The GEMM proper; x float32 [in, >= N] (row stride may exceed N), N = y.shape[1]."""
    nout = y.shape[0]
    n = y.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    nin = x.shape[0]
    n4 = (n // (4 * VW)) * (4 * VW)
    n1 = (n // VW) * VW
    # N chunks so a chunk of X stays in L2 while all rows use it; chunk-major (chunk, row block)
    # tasks, each a contiguous range of rows (measured faster than one task per row)
    nc = max(4 * VW, (L2_FLOATS // max(nin, 1)) // (4 * VW) * (4 * VW))
    nch = max(1, (n + nc - 1) // nc)
    nblk = min(nout, ROW_BLOCKS)
    for t in prange(nch * nblk):
        ch = t // nblk
        blk = t - ch * nblk
        jlo = ch * nc
        jhi = min(n, jlo + nc)
        je = min(jhi, n4)
        for i in range(blk * nout // nblk, (blk + 1) * nout // nblk):
            k0 = indptr[i]
            k1 = indptr[i + 1]
            b = bias[i] if nb != 0 else np.float32(0.0)
            yrow = y[i]
            j = jlo
            while j + 8 * VW <= je:
                _mkc8(indices, data, k0, k1, x, yrow, j)
                j += 8 * VW
            while j < je:
                _mkc4(indices, data, k0, k1, x, yrow, j)
                j += 4 * VW
            if jhi == n:
                for j in range(n4, n1, VW):
                    _mkc1(indices, data, k0, k1, x, yrow, j)
                if n1 < n:
                    _row_tile(indices, data, k0, k1, x, y[i, n1:n], n1, n - n1)
            yr = y[i, jlo:jhi]
            if nr != 0:
                epilogue_tile(yr, b, res[i, jlo:jhi], act, lo, hi)
            else:
                epilogue_tile(yr, b, yr[0:0], act, lo, hi)


@jit
def csr_spmm(indptr, indices, data, x, y, bias, res, act, lo, hi):
    """Y = act(W @ X + bias + res). bias float32 [out] or len 0; res float32 [out, N] or (0, 0).
    X rows that are not 64-byte aligned (base address, or N not a multiple of VW) are first
    copied to an aligned buffer when each X row is used often enough (nnz >= COPY_MIN_USES * in)."""
    nin = x.shape[0]
    n = x.shape[1]
    nnz = indptr[y.shape[0]]
    if n >= VW and nin > 0 and nnz >= COPY_MIN_USES * nin and (x.ctypes.data % 64 != 0 or n % VW != 0):
        npad = (n + VW - 1) // VW * VW
        _spmm_rows(indptr, indices, data, _aligned_copy(x, npad), y, bias, res, act, lo, hi)
    else:
        _spmm_rows(indptr, indices, data, x, y, bias, res, act, lo, hi)


@pjit
def csr_spmv(indptr, indices, data, x, y, bias, res, act, lo, hi):
    """y = act(W @ x + bias + res) for 1-D x [in], y [out]; bias/res [out] or len 0.
    Row-block tasks (contiguous row ranges), one gather-dot per row; the block's ``data`` and
    ``indices`` streams are software-prefetched ``SPMV_PREFETCH`` non-zeros ahead (never past
    the block's last non-zero)."""
    nout = y.shape[0]
    nb = bias.shape[0]
    nr = res.shape[0]
    nblk = min(nout, ROW_BLOCKS)
    sd = 64 // data.itemsize
    si = 64 // indices.itemsize
    for blk in prange(nblk):
        i0 = blk * nout // nblk
        i1 = (blk + 1) * nout // nblk
        kend = indptr[i1]
        pd = indptr[i0]
        pi = pd
        for i in range(i0, i1):
            k0 = indptr[i]
            k1 = indptr[i + 1]
            lim = min(kend, k1 + SPMV_PREFETCH)
            while pd < lim:
                vprefetch(data, pd)
                pd += sd
            while pi < lim:
                vprefetch(indices, pi)
                pi += si
            d = data[k0:k1]
            ix = indices[k0:k1]
            s = np.float32(0.0)
            for k in range(k1 - k0):
                s += d[k] * x[ix[k]]
            if nb != 0:
                s += bias[i]
            if nr != 0:
                s += res[i]
            y[i] = act_scalar(s, act, lo, hi)


# ---------------------------------------------------------------------------------------
# table glue (plain Python)

def _prepare(fmt):
    """(indptr, indices, data); int32 indices are viewed (no copy) as uint32: they are
    validated non-negative, and unsigned indices spare the hot loops negative-index fix-ups."""
    a = fmt.arrays()
    ix = a["indices"]
    if ix.dtype == np.int32:
        ix = ix.view(np.uint32)
    return (a["indptr"], ix, a["data"])


def _prepare_gemv(fmt):
    """(indptr, indices, data) for the memory-bound batch-1 kernel: int32 indices are repacked
    to uint16 when in <= 65536 (6 instead of 8 bytes per non-zero streamed; 2 bytes per
    non-zero of new memory, made once at load)."""
    indptr, ix, data = _prepare(fmt)
    if ix.dtype == np.uint32 and fmt.shape[1] <= 65536:
        ix = ix.astype(np.uint16)
    return (indptr, ix, data)


def _run_gemm(p, x, y, bias, act, lo, hi, residual):
    csr_spmm(p[0], p[1], p[2], x, y, none1(bias), none2(residual), int(act), float(lo), float(hi))


def _run_gemv(p, x, y, bias, act, lo, hi, residual):
    r = none1(None if residual is None else residual.reshape(-1))
    csr_spmv(p[0], p[1], p[2], x.reshape(-1), y.reshape(-1), none1(bias), r, int(act), float(lo), float(hi))


def reference(fmt, x, bias=None, act=0, lo=0.0, hi=0.0, residual=None):
    """Plain numpy: dense W (float64) @ X, then the epilogue reference."""
    w = fmt.to_dense().astype(np.float64)
    return epilogue_ref(w @ np.asarray(x, np.float64), bias, act, lo, hi, residual)


KERNELS = [
    KernelSpec(name="csr_f32_spmm", op="gemm", fmt="csr", dtype="float32", prepare=_prepare, run=_run_gemm,
               reference=reference, min_n=1,
               notes="(N chunk, row block) in parallel; 8-vector SIMD register tile; misaligned X copied to 64-B aligned rows; "
                     "fused epilogue per row chunk"),
    KernelSpec(name="csr_f32_spmv", op="gemv", fmt="csr", dtype="float32", prepare=_prepare_gemv, run=_run_gemv,
               reference=reference, min_n=1, max_n=1,
               notes="batch 1: row blocks, one gather-dot per row, data/indices streams prefetched; int32 indices "
                     "repacked to uint16 (6 B per nnz)"),
]
