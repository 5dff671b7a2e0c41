"""matmul: numpy.matmul semantics (batched, broadcast) into the planned output (BLAS; batches or
rows split over the call's threads, see ``runtime.par``)."""
from __future__ import annotations

import numpy as np

from . import Op, register
from ._common import split0


@register("matmul")
class MatMul(Op):
    def default_kernel(self):
        return "numpy.matmul"

    def run(self, ins, outs, scratch, data):
        a, b = ins
        y = outs[0]
        if a.dtype != y.dtype:
            a = a.astype(y.dtype)
        if b.dtype != y.dtype:
            b = b.astype(y.dtype)
        if y.ndim >= 3 and a.shape[:-2] == y.shape[:-2] and b.shape[:-2] == y.shape[:-2]:
            # batched (attention): split the flattened batch over the call's threads
            a3 = a.reshape((-1,) + a.shape[-2:])
            b3 = b.reshape((-1,) + b.shape[-2:])
            y3 = y.reshape((-1,) + y.shape[-2:])
            split0(y3, [a3, b3], lambda yp, p: np.matmul(p[0], p[1], out=yp), y.size * a.shape[-1])
        elif y.ndim == 2 and a.ndim == 2 and b.ndim == 2:
            split0(y, [a], lambda yp, p: np.matmul(p[0], b, out=yp), y.size * a.shape[-1])
        else:
            np.matmul(a, b, out=y)
