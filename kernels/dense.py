"""Dense and low-rank float32 rows: numpy's BLAS (``np.matmul`` into ``out=``), then the fused
epilogue in one jitted parallel pass over Y.

* dense: W float32 [out, in] (``Dense`` values; float16/bfloat16 are widened once in
  ``prepare``), ``Y = act(W @ X + bias + residual)``. N = 1 goes through the same call (numpy
  dispatches it to BLAS gemv).
* lowrank: ``W ~ U @ V`` with U [out, k], V [k, in] (float32 factors; int8 factors are
  dequantized once in ``prepare``): ``T = V @ X`` ([k, N] temporary), ``Y = U @ T``. Pays when
  k*(out+in) < out*in.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import pjit
from .csr import reference
from .epilogue import epilogue_tile, none1, none2
from .table import KernelSpec


@pjit
def epilogue_rows(y, bias, res, act, lo, hi):
    """In place: y = act(y + bias[:, None] + res) over [out, N] (rows in parallel).
    bias float32 [out] or len 0; res float32 [out, N] or shape (0, 0)."""
    nb = bias.shape[0]
    nr = res.shape[0]
    for i in prange(y.shape[0]):
        b = bias[i] if nb != 0 else np.float32(0.0)
        yr = y[i]
        if nr != 0:
            epilogue_tile(yr, b, res[i], act, lo, hi)
        else:
            epilogue_tile(yr, b, yr[0:0], act, lo, hi)


def apply_epilogue(y, bias, act, lo, hi, residual):
    """Python entry: skip the pass entirely when there is nothing to do."""
    if bias is None and residual is None and int(act) == 0:
        return
    y2 = y if y.ndim == 2 else y.reshape(y.shape[0], -1)
    r = None if residual is None else residual.reshape(y2.shape)
    epilogue_rows(y2, none1(bias), none2(r), int(act), float(lo), float(hi))


def _prepare_dense(fmt):
    w = fmt.to_dense()
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        w = w.reshape(w.shape[0], -1)
    return w


def _run_dense(w, x, y, bias, act, lo, hi, residual):
    np.matmul(w, x, out=y)
    apply_epilogue(y, bias, act, lo, hi, residual)


def _prepare_lowrank(fmt):
    u, v = fmt.factors()
    return (np.ascontiguousarray(u, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32))


def _run_lowrank(p, x, y, bias, act, lo, hi, residual):
    u, v = p
    t = np.matmul(v, x)
    np.matmul(u, t, out=y)
    apply_epilogue(y, bias, act, lo, hi, residual)


def _reference_lowrank(fmt, x, bias=None, act=0, lo=0.0, hi=0.0, residual=None):
    return reference(fmt, x, bias, act, lo, hi, residual)


KERNELS = [
    KernelSpec(name="dense_f32_blas", op="gemm", fmt="dense", dtype="float32", prepare=_prepare_dense,
               run=_run_dense, reference=reference, min_n=1,
               notes="numpy matmul (OpenBLAS) + one parallel jitted epilogue pass"),
    KernelSpec(name="lowrank_f32_blas", op="gemm", fmt="lowrank", dtype="float32", prepare=_prepare_lowrank,
               run=_run_lowrank, reference=_reference_lowrank, min_n=1,
               notes="two BLAS GEMMs (V @ X then U @ T) + epilogue pass; temporary [k, N]"),
]
