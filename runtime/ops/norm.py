"""Normalisations and softmax: layernorm (numba rows kernel), batchnorm (folded to a per-channel
scale and shift at load), l2norm, softmax with an additive mask (mask added into the output
buffer, then an in-place row softmax)."""
from __future__ import annotations

import numpy as np

from . import NodePlan, Op, register
from ._common import EMPTY_F32, split0


@register("layernorm")
class LayerNorm(Op):
    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        ins = list(node.inputs) + ["", ""]
        self.w_name, self.b_name = ins[1], ins[2]

    def default_kernel(self):
        return "nn.layernorm_rows"

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import layernorm_rows

        x, y = ins[0], outs[0]
        w = ins[1] if len(ins) > 1 and ins[1] is not None else EMPTY_F32
        b = ins[2] if len(ins) > 2 and ins[2] is not None else EMPTY_F32
        ax = self.attrs["axis"] % x.ndim
        if ax != x.ndim - 1:  # rare: normalise over a middle axis
            from ..reference import eval_node

            np.copyto(y, eval_node(self.node, ins)[0])
            return
        H = x.shape[-1]
        layernorm_rows(x.reshape(-1, H), w.astype(np.float32, copy=False), b.astype(np.float32, copy=False),
                       float(self.attrs["eps"]), y.reshape(-1, H))


@register("batchnorm")
class BatchNorm(Op):
    """Inference batchnorm over axis 1; scale/shift precomputed once at load."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        s, b, m, v = (np.asarray(ctx.constant(n), dtype=np.float64) for n in node.inputs[1:5])
        inv = s / np.sqrt(v + self.attrs["eps"])
        self.mul = inv.astype(np.float32)
        self.add = (b - m * inv).astype(np.float32)

    def run(self, ins, outs, scratch, data):
        x, y = ins[0], outs[0]
        sh = (1, -1) + (1,) * (x.ndim - 2)
        np.multiply(x, self.mul.reshape(sh), out=y)
        np.add(y, self.add.reshape(sh), out=y)


@register("l2norm")
class L2Norm(Op):
    def plan(self, ins, outs, env):
        shp = list(ins[0][0])
        ax = self.attrs["axis"] % len(shp)
        shp[ax] = 1
        return NodePlan(scratch=[(tuple(shp), "float32")], kernel="numpy")

    def run(self, ins, outs, scratch, data):
        x, y, n = ins[0], outs[0], scratch[0]
        np.multiply(x, x, out=y)
        np.sum(y, axis=self.attrs["axis"], keepdims=True, out=n)
        np.sqrt(n, out=n)
        np.maximum(n, np.float32(self.attrs["eps"]), out=n)
        np.divide(x, n, out=y)


@register("softmax")
class Softmax(Op):
    def default_kernel(self):
        return "nn.softmax_inplace"

    def plan(self, ins, outs, env):
        shp = ins[0][0]
        ax = self.attrs["axis"] % len(shp)
        scratch = []
        if ax != len(shp) - 1:
            scratch = [(tuple(shp), "float32")]
        return NodePlan(scratch=scratch, data=ax, kernel=self.default_kernel())

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import softmax_inplace

        x, y = ins[0], outs[0]
        mask = ins[1] if len(ins) > 1 else None
        if data == x.ndim - 1 and x.ndim >= 2:
            L = x.shape[-1]

            def part(yp, p):  # a range of the first axis, on one of the call's threads
                if p[1] is not None:
                    np.add(p[0], p[1], out=yp, casting="unsafe")
                else:
                    np.copyto(yp, p[0])
                softmax_inplace(yp.reshape(-1, L))

            split0(y, [x, mask], part)
            return
        if mask is not None:
            np.add(x, mask, out=y, casting="unsafe")
        else:
            np.copyto(y, x)
        if data == x.ndim - 1:
            softmax_inplace(y.reshape(-1, x.shape[-1]))
        else:  # move the axis last in scratch, softmax, move back
            t = scratch[0].reshape(np.moveaxis(y, data, -1).shape)
            np.copyto(t, np.moveaxis(y, data, -1))
            softmax_inplace(t.reshape(-1, t.shape[-1]))
            np.copyto(y, np.moveaxis(t, -1, data))
