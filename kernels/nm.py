"""N:M float32 kernels (2:4, 4:8, any n <= m <= 256), used straight from the file layout.

W: ``values`` float32 [out, G*n], ``offsets`` uint8 [out, G*n] with G = ceil(in/m); slot s of
row i holds column ``(s // n) * m + offsets[i, s]`` (always < in; unused slots hold 0).
X float32 [in, N], Y float32 [out, N].

* ``nm_spmm``: as the CSR kernel (rows in parallel, N tiles of 128, slots unrolled by 8) but
  with implicit column indices: every row has exactly G*n slots, so no indptr is read and the
  column costs one shift and one uint8 load (n a power of two; other n use a division).
* ``nm_spmv`` (N = 1): per row a gather-dot over its G*n slots; 5 B per stored weight.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import jit, pjit
from .csr import TN, reference
from .epilogue import act_scalar, epilogue_tile, none1, none2
from .table import KernelSpec


@jit(inline="always")
def _col(s, n, sh, mm, off):
    g = (s >> sh) if sh >= 0 else (s // n)
    return g * mm + off[s]


@pjit
def nm_spmm(values, offsets, n, mm, x, y, bias, res, act, lo, hi):
    """Y = act(W @ X + bias + res); n:mm pattern. bias [out] / res [out, N] or empty."""
    nout = y.shape[0]
    ncol = x.shape[1]
    slots = values.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    sh = -1
    for t in range(8):
        if (1 << t) == n:
            sh = t
    for i in prange(nout):
        vr = values[i]
        off = offsets[i]
        b = bias[i] if nb != 0 else np.float32(0.0)
        for j0 in range(0, ncol, TN):
            m = min(TN, ncol - j0)
            yr = y[i, j0:j0 + m]
            for j in range(m):
                yr[j] = np.float32(0.0)
            s = 0
            while s + 8 <= slots:
                v0 = vr[s]
                v1 = vr[s + 1]
                v2 = vr[s + 2]
                v3 = vr[s + 3]
                v4 = vr[s + 4]
                v5 = vr[s + 5]
                v6 = vr[s + 6]
                v7 = vr[s + 7]
                x0 = x[_col(s, n, sh, mm, off), j0:j0 + m]
                x1 = x[_col(s + 1, n, sh, mm, off), j0:j0 + m]
                x2 = x[_col(s + 2, n, sh, mm, off), j0:j0 + m]
                x3 = x[_col(s + 3, n, sh, mm, off), j0:j0 + m]
                x4 = x[_col(s + 4, n, sh, mm, off), j0:j0 + m]
                x5 = x[_col(s + 5, n, sh, mm, off), j0:j0 + m]
                x6 = x[_col(s + 6, n, sh, mm, off), j0:j0 + m]
                x7 = x[_col(s + 7, n, sh, mm, off), j0:j0 + m]
                for j in range(m):
                    yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j]) + \
                             ((v4 * x4[j] + v5 * x5[j]) + (v6 * x6[j] + v7 * x7[j]))
                s += 8
            while s < slots:
                v0 = vr[s]
                x0 = x[_col(s, n, sh, mm, off), j0:j0 + m]
                for j in range(m):
                    yr[j] += v0 * x0[j]
                s += 1
            if nr != 0:
                epilogue_tile(yr, b, res[i, j0:j0 + m], act, lo, hi)
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
                              notes="implicit columns, rows in parallel, N tiles of 128, slots unrolled x8"))
    KERNELS.append(KernelSpec(name=f"nm{_n}of{_m}_f32_spmv", op="gemv", fmt="nm", dtype="float32", block=(_n, _m),
                              prepare=_prepare, run=_run_gemv, reference=reference, min_n=1, max_n=1,
                              notes="batch 1 gather-dot, 5 B per stored weight"))
