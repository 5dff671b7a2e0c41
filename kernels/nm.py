"""N:M float32 kernels (2:4, 4:8, any n <= m <= 256), used straight from the file layout.

W: ``values`` float32 [out, G*n], ``offsets`` uint8 [out, G*n] with G = ceil(in/m); slot s of
row i holds column ``(s // n) * m + offsets[i, s]`` (always < in; unused slots hold 0).
X float32 [in, N], Y float32 [out, N].

* ``nm_spmm``: the CSR register-blocked micro-kernels (kernels/csr.py) over each row's G*n
  slots; the row's absolute columns are expanded once per (row, N chunk) into a small int32
  buffer (one shift + one uint8 load per slot; n a power of two, other n use a division).
* ``nm_spmv`` (N = 1): per row a gather-dot over its G*n slots; 5 B per stored weight.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import jit, pjit
from .csr import L2_FLOATS, TN, _mkc1, _mkc4, _mkc8, _row_tile, reference
from .simd import VW
from .epilogue import act_scalar, epilogue_tile, none1, none2
from .table import KernelSpec


@jit
def _col(s, n, sh, mm, off):
    g = (s >> sh) if sh >= 0 else (s // n)
    return g * mm + off[s]


@pjit
def nm_spmm(values, offsets, n, mm, x, y, bias, res, act, lo, hi):
    """Y = act(W @ X + bias + res); n:mm pattern. bias [out] / res [out, N] or empty."""
    nout = y.shape[0]
    nin = x.shape[0]
    ncol = x.shape[1]
    slots = values.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    sh = -1
    for t in range(8):
        if (1 << t) == n:
            sh = t
    n4 = (ncol // (4 * VW)) * (4 * VW)
    n1 = (ncol // VW) * VW
    nc = max(4 * VW, (L2_FLOATS // max(nin, 1)) // (4 * VW) * (4 * VW))
    nch = max(1, (ncol + nc - 1) // nc)
    for t in prange(nch * nout):
        ch = t // nout
        i = t - ch * nout
        jlo = ch * nc
        jhi = min(ncol, jlo + nc)
        vr = values[i]
        off = offsets[i]
        cols = np.empty(slots, dtype=np.int32)  # this row's absolute columns (implicit in the format)
        for s in range(slots):
            cols[s] = _col(s, n, sh, mm, off)
        b = bias[i] if nb != 0 else np.float32(0.0)
        yrow = y[i]
        j = jlo
        je = min(jhi, n4)
        while j + 8 * VW <= je:
            _mkc8(cols, vr, 0, slots, x, yrow, j)
            j += 8 * VW
        while j < je:
            _mkc4(cols, vr, 0, slots, x, yrow, j)
            j += 4 * VW
        if jhi == ncol:
            for j in range(n4, n1, VW):
                _mkc1(cols, vr, 0, slots, x, yrow, j)
            if n1 < ncol:
                _row_tile(cols, vr, 0, slots, x, y[i, n1:ncol], n1, ncol - n1)
        yr = y[i, jlo:jhi]
        if nr != 0:
            epilogue_tile(yr, b, res[i, jlo:jhi], act, lo, hi)
        else:
            epilogue_tile(yr, b, yr[0:0], act, lo, hi)


@pjit
def nm_spmv(values, offsets, n, mm, x, y, bias, res, act, lo, hi):
    """y = act(W @ x + bias + res) for 1-D x [in], y [out]; bias/res [out] or len 0."""
    nout = y.shape[0]
    G = values.shape[1] // n if n > 0 else 0
    nb = bias.shape[0]
    nr = res.shape[0]
    for i in prange(nout):
        vr = values[i]
        off = offsets[i]
        s = np.float32(0.0)
        for g in range(G):
            base = g * mm
            for t in range(g * n, g * n + n):
                s += vr[t] * x[base + off[t]]
        if nb != 0:
            s += bias[i]
        if nr != 0:
            s += res[i]
        y[i] = act_scalar(s, act, lo, hi)


def _prepare(fmt):
    a = fmt.arrays()
    meta = fmt.meta()
    return (a["values"], a["offsets"], int(meta["n"]), int(meta["m"]))


def _run_gemm(p, x, y, bias, act, lo, hi, residual):
    nm_spmm(p[0], p[1], p[2], p[3], x, y, none1(bias), none2(residual), int(act), float(lo), float(hi))


def _run_gemv(p, x, y, bias, act, lo, hi, residual):
    r = none1(None if residual is None else residual.reshape(-1))
    nm_spmv(p[0], p[1], p[2], p[3], x.reshape(-1), y.reshape(-1), none1(bias), r, int(act), float(lo), float(hi))


KERNELS = []
for _n, _m in [(2, 4), (4, 8)]:
    KERNELS.append(KernelSpec(name=f"nm{_n}of{_m}_f32_spmm", op="gemm", fmt="nm", dtype="float32", block=(_n, _m),
                              prepare=_prepare, run=_run_gemm, reference=reference, min_n=1,
                              notes="any n:m (row block only names the pattern); columns expanded per row, CSR SIMD micro-kernels"))
    KERNELS.append(KernelSpec(name=f"nm{_n}of{_m}_f32_spmv", op="gemv", fmt="nm", dtype="float32", block=(_n, _m),
                              prepare=_prepare, run=_run_gemv, reference=reference, min_n=1, max_n=1,
                              notes="batch 1 gather-dot, 5 B per stored weight"))
