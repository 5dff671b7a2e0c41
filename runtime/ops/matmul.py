"""matmul: numpy.matmul semantics (batched, broadcast) into the planned output (BLAS)."""
from __future__ import annotations

import numpy as np

from . import Op, register


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
        np.matmul(a, b, out=y)
