"""Reductions: reduce_sum / reduce_mean, global average pooling, masked mean pooling."""
from __future__ import annotations

import numpy as np

from . import NodePlan, Op, register
from ._common import prod


@register("reduce_sum", "reduce_mean")
class Reduce(Op):
    def run(self, ins, outs, scratch, data):
        f = np.sum if self.node.op == "reduce_sum" else np.mean
        f(ins[0], axis=tuple(self.attrs["axes"]), keepdims=self.attrs["keepdim"], out=outs[0])


@register("global_avgpool")
class GlobalAvgPool(Op):
    """y[N, C, 1, 1] = mean over the spatial axes of x [N, C, ...]; float32 through the parallel numba
    kernel (kernels.conv.global_avgpool, float32 sums), other dtypes through numpy."""

    def run(self, ins, outs, scratch, data):
        x = ins[0]
        N, C = x.shape[:2]
        y = outs[0].reshape(N, C)
        x3 = x.reshape(N, C, prod(x.shape[2:]))
        if x.dtype == np.float32 and y.dtype == np.float32 and x3.flags.c_contiguous and y.flags.c_contiguous:
            from ...kernels.conv import global_avgpool

            global_avgpool(x3, y)
        else:
            np.mean(x3, axis=2, out=y)


@register("masked_mean")
class MaskedMean(Op):
    """y[B, H'] = sum_s x[B, s, H'] * m[B, s] / max(sum_s m[B, s], 1e-9) with B, H' the dims
    before / after the pooled axis. Scratch: the mask as float32 [B, S] and the denominators [B, 1]."""

    def plan(self, ins, outs, env):
        xs = ins[0][0]
        ax = self.attrs["axis"] % len(xs)
        B, S = prod(xs[:ax]), int(xs[ax])
        return NodePlan(scratch=[((B, S), "float32"), ((B, 1), "float32")], data=(ax, B, S, prod(xs[ax + 1:])),
                        kernel="nn.masked_mean_rows" if ins[0][1] == "float32" else "numpy.einsum")

    def run(self, ins, outs, scratch, data):
        x, mask = ins
        ax, B, S, H = data
        m, den = scratch
        np.copyto(m.reshape(x.shape[:ax + 1]), np.broadcast_to(mask, x.shape[:ax + 1]), casting="unsafe")
        y = outs[0].reshape(B, H)
        if x.dtype == np.float32 and y.dtype == np.float32 and x.flags.c_contiguous and y.flags.c_contiguous:
            from ...kernels.nn import masked_mean_rows  # parallel, one pass (einsum: 0.32 ms, 8x128x384)

            masked_mean_rows(x.reshape(B, S, H), m, y)
            return
        np.einsum("bsh,bs->bh", x.reshape(B, S, H), m, out=y)
        np.sum(m, axis=1, keepdims=True, out=den)
        np.maximum(den, np.float32(1e-9), out=den)
        np.divide(y, den, out=y)
