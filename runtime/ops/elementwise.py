"""Elementwise ops: unary activations and math, binary ops with broadcasting, clamp, cast, where.
All write into the planned output with numpy ``out=`` (no temporaries) or a numba kernel."""
from __future__ import annotations

import numpy as np

from . import Op, register
from ._common import split0


@register("relu")
class Relu(Op):
    def run(self, ins, outs, scratch, data):
        np.maximum(ins[0], ins[0].dtype.type(0), out=outs[0])


@register("gelu")
class Gelu(Op):
    def default_kernel(self):
        return "nn.gelu"

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import gelu

        gelu(ins[0].reshape(-1), outs[0].reshape(-1), self.attrs["approximate"] == "tanh")


class _ActOp(Op):
    code = 0

    def default_kernel(self):
        return "nn.act_inplace"

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import act_inplace

        np.copyto(outs[0], ins[0])
        act_inplace(outs[0].reshape(-1), self.code, 0.0, 0.0)


@register("silu")
class Silu(_ActOp):
    code = 5


@register("hardswish")
class Hardswish(_ActOp):
    code = 6


@register("sigmoid")
class Sigmoid(_ActOp):
    code = 7


@register("hardsigmoid")
class Hardsigmoid(Op):
    def run(self, ins, outs, scratch, data):
        y = outs[0]
        np.add(ins[0], np.float32(3), out=y)
        np.clip(y, 0, 6, out=y)
        np.divide(y, np.float32(6), out=y)


_UFUNC = {"tanh": np.tanh, "sqrt": np.sqrt, "exp": np.exp, "neg": np.negative}


@register(*_UFUNC)
class Ufunc(Op):
    def run(self, ins, outs, scratch, data):
        _UFUNC[self.node.op](ins[0], out=outs[0])


@register("rsqrt")
class Rsqrt(Op):
    def run(self, ins, outs, scratch, data):
        np.sqrt(ins[0], out=outs[0])
        np.reciprocal(outs[0], out=outs[0])


@register("erf")
class Erf(Op):
    def run(self, ins, outs, scratch, data):
        from scipy.special import erf

        erf(ins[0], out=outs[0])


_BIN = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power}


@register(*_BIN)
class Binary(Op):
    def run(self, ins, outs, scratch, data):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a, b, y = ins[0], ins[1], outs[0]
            if a.dtype != y.dtype:
                a = a.astype(y.dtype) if a.size < y.size else a
            if b.dtype != y.dtype:
                b = b.astype(y.dtype) if b.size < y.size else b
            f = _BIN[self.node.op]
            split0(y, [a, b], lambda yp, p: f(p[0], p[1], out=yp, casting="unsafe"))


@register("clamp")
class Clamp(Op):
    def run(self, ins, outs, scratch, data):
        lo, hi = self.attrs["min"], self.attrs["max"]
        x, y = ins[0], outs[0]
        if lo is None and hi is None:
            np.copyto(y, x)
        elif lo is None:
            np.minimum(x, x.dtype.type(hi), out=y)
        elif hi is None:
            np.maximum(x, x.dtype.type(lo), out=y)
        else:
            np.clip(x, x.dtype.type(lo), x.dtype.type(hi), out=y)


@register("cast")
class Cast(Op):
    def run(self, ins, outs, scratch, data):
        np.copyto(outs[0], ins[0], casting="unsafe")


@register("where")
class Where(Op):
    def run(self, ins, outs, scratch, data):
        c, a, b = ins
        y = outs[0]
        np.copyto(y, b, casting="unsafe")
        np.copyto(y, a, casting="unsafe", where=c.astype(bool, copy=False))
