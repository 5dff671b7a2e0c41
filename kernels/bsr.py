"""BSR float32 kernels: ``Y[out, N] = act(W @ X + bias + residual)`` with W in r x c blocks.

W: ``indptr`` int32 [R+1] (R = ceil(out/r)), ``indices`` int32 [nblk] (block column),
``data`` float32 [nblk, r, c] (edge blocks zero-padded). ``prepare`` only reshapes ``data`` to a
[nblk, r*c] view (no copy). One generic kernel serves every block shape (r, c are run-time
ints, so a single compiled specialization covers 1x4, 4x1, 8x1, 16x1, 1x16, 4x4, ...):

* ``bsr_spmm``: parallel over block rows; N in tiles of ``TB`` floats. Within a block row
  and N tile, each of the r output rows accumulates its tile over the row's blocks; the X
  tiles of the block row (nblk_row * c rows x TB floats) are read from L2 once for the first
  output row and then hit L1 for the r-1 others, which is where r x 1 blocks beat CSR.
  c == 1: blocks unrolled by 8; c > 1: the c consecutive X rows of a block unrolled by 4.
  Edge blocks: rows >= out are skipped, X rows >= in are never read.
* ``bsr_spmv`` (N = 1): per block row an r-vector accumulator; bytes per weight are
  (4 + 4*r*c) / (r*c) per stored block entry, i.e. close to 4 B for tall blocks.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import jit, pjit
from .csr import reference
from .epilogue import act_scalar, epilogue_tile, none1, none2
from .table import KernelSpec

TB = 64  # N tile (floats) for the block kernels


@jit(inline="always")
def _tile_c1(indices, d2, k0, k1, ii, x, yr, j0, m):
    """c == 1: yr[:m] += sum_k d2[k, ii] * x[indices[k], j0:j0+m]."""
    k = k0
    while k + 8 <= k1:
        v0 = d2[k, ii]
        v1 = d2[k + 1, ii]
        v2 = d2[k + 2, ii]
        v3 = d2[k + 3, ii]
        v4 = d2[k + 4, ii]
        v5 = d2[k + 5, ii]
        v6 = d2[k + 6, ii]
        v7 = d2[k + 7, ii]
        x0 = x[indices[k], j0:j0 + m]
        x1 = x[indices[k + 1], j0:j0 + m]
        x2 = x[indices[k + 2], j0:j0 + m]
        x3 = x[indices[k + 3], j0:j0 + m]
        x4 = x[indices[k + 4], j0:j0 + m]
        x5 = x[indices[k + 5], j0:j0 + m]
        x6 = x[indices[k + 6], j0:j0 + m]
        x7 = x[indices[k + 7], j0:j0 + m]
        for j in range(m):
            yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j]) + \
                     ((v4 * x4[j] + v5 * x5[j]) + (v6 * x6[j] + v7 * x7[j]))
        k += 8
    while k < k1:
        v0 = d2[k, ii]
        x0 = x[indices[k], j0:j0 + m]
        for j in range(m):
            yr[j] += v0 * x0[j]
        k += 1


@jit(inline="always")
def _tile_cn(indices, d2, k0, k1, ii, c, nin, x, yr, j0, m):
    """c > 1: block k covers X rows indices[k]*c .. +c (clipped to nin)."""
    base = ii * c
    for k in range(k0, k1):
        col0 = indices[k] * c
        cw = min(c, nin - col0)
        cc = 0
        while cc + 4 <= cw:
            v0 = d2[k, base + cc]
            v1 = d2[k, base + cc + 1]
            v2 = d2[k, base + cc + 2]
            v3 = d2[k, base + cc + 3]
            x0 = x[col0 + cc, j0:j0 + m]
            x1 = x[col0 + cc + 1, j0:j0 + m]
            x2 = x[col0 + cc + 2, j0:j0 + m]
            x3 = x[col0 + cc + 3, j0:j0 + m]
            for j in range(m):
                yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j])
            cc += 4
        while cc < cw:
            v0 = d2[k, base + cc]
            x0 = x[col0 + cc, j0:j0 + m]
            for j in range(m):
                yr[j] += v0 * x0[j]
            cc += 1


@pjit
def bsr_spmm(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi):
    """Y = act(W @ X + bias + res); d2 = data.reshape(nblk, r*c). bias [out] / res [out, N] or empty."""
    nout = y.shape[0]
    nin = x.shape[0]
    n = x.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    nbr = indptr.shape[0] - 1
    for br in prange(nbr):
        k0 = indptr[br]
        k1 = indptr[br + 1]
        rows = min(r, nout - br * r)
        for j0 in range(0, n, TB):
            m = min(TB, n - j0)
            for ii in range(rows):
                i = br * r + ii
                yr = y[i, j0:j0 + m]
                for j in range(m):
                    yr[j] = np.float32(0.0)
                if c == 1:
                    _tile_c1(indices, d2, k0, k1, ii, x, yr, j0, m)
                else:
                    _tile_cn(indices, d2, k0, k1, ii, c, nin, x, yr, j0, m)
                b = bias[i] if nb != 0 else np.float32(0.0)
                if nr != 0:
                    epilogue_tile(yr, b, res[i, j0:j0 + m], act, lo, hi)
                else:
                    epilogue_tile(yr, b, yr[0:0], act, lo, hi)


@pjit
def bsr_spmv(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi):
    """y = act(W @ x + bias + res) for 1-D x [in], y [out]; bias/res [out] or len 0."""
    nout = y.shape[0]
    nin = x.shape[0]
    nb = bias.shape[0]
    nr = res.shape[0]
    nbr = indptr.shape[0] - 1
    acc = np.zeros((nbr, r), dtype=np.float32)
    for br in prange(nbr):
        a = acc[br]
        if c == 1:
            for k in range(indptr[br], indptr[br + 1]):
                xv = x[indices[k]]
                dk = d2[k]
                for ii in range(r):
                    a[ii] += dk[ii] * xv
        else:
            for k in range(indptr[br], indptr[br + 1]):
                col0 = indices[k] * c
                cw = min(c, nin - col0)
                xs = x[col0:col0 + cw]
                dk = d2[k]
                for ii in range(r):
                    dr = dk[ii * c:ii * c + cw]
                    s = np.float32(0.0)
                    for cc in range(cw):
                        s += dr[cc] * xs[cc]
                    a[ii] += s
        rows = min(r, nout - br * r)
        for ii in range(rows):
            i = br * r + ii
            s = a[ii]
            if nb != 0:
                s += bias[i]
            if nr != 0:
                s += res[i]
            y[i] = act_scalar(s, act, lo, hi)


# ---------------------------------------------------------------------------------------
# table glue

def _prepare(fmt):
    a = fmt.arrays()
    d = a["data"]
    r, c = int(d.shape[1]), int(d.shape[2])
    return (a["indptr"], a["indices"], d.reshape(d.shape[0], r * c), r, c)


def _run_gemm(p, x, y, bias, act, lo, hi, residual):
    bsr_spmm(p[0], p[1], p[2], p[3], p[4], x, y, none1(bias), none2(residual), int(act), float(lo), float(hi))


def _run_gemv(p, x, y, bias, act, lo, hi, residual):
    r = none1(None if residual is None else residual.reshape(-1))
    bsr_spmv(p[0], p[1], p[2], p[3], p[4], x.reshape(-1), y.reshape(-1), none1(bias), r, int(act),
             float(lo), float(hi))


BLOCKS = [(1, 4), (4, 1), (8, 1), (16, 1), (1, 16), (4, 4)]

KERNELS = []
for _r, _c in BLOCKS:
    KERNELS.append(KernelSpec(name=f"bsr{_r}x{_c}_f32_spmm", op="gemm", fmt="bsr", dtype="float32",
                              block=(_r, _c), prepare=_prepare, run=_run_gemm, reference=reference, min_n=1,
                              notes="generic r x c kernel, N tiles of 64, X tile reused across the r rows"))
    KERNELS.append(KernelSpec(name=f"bsr{_r}x{_c}_f32_spmv", op="gemv", fmt="bsr", dtype="float32",
                              block=(_r, _c), prepare=_prepare, run=_run_gemv, reference=reference, min_n=1,
                              max_n=1, notes="batch 1, r-vector accumulator per block row"))
