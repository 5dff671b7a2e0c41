"""linear: y[..., out] = act(x[..., in] @ W.T + bias), W in any weight format.

Layout: the kernels compute ``Y[out, N] = W @ X[in, N]`` (feature-major). A value produced by a
linear and consumed only by linears (an MLP chain, a transformer FFN) stays feature-major
between them (``ctx.fm_values``), so the transposes happen once at the chain's ends. A dense
float32 weight through BLAS (``numpy_dense``) runs in torch layout (``x @ W.T``), needing no
transposes at all. Otherwise X is transposed into an arena buffer and Y back out of one (tiled
numba transposes, ``kernels.nn.transpose2d``; a fused residual is added in the same pass); linears
reading the same input (attention's q, k, v) share one transposed copy of it (``NodePlan.shared``):
the first of them writes it, the others reuse it.
"""
from __future__ import annotations

import threading

import numpy as np

from . import NodePlan, Op, register
from ._common import EMPTY_F32, act_code, prod


_NO_ADD = np.zeros((0, 0), dtype=np.float32)


@register("linear")
class Linear(Op):
    weight = True

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        self.wf = ctx.weight(node.inputs[1], node.name)
        bname = node.inputs[2] if len(node.inputs) > 2 else ""
        self.bias = ctx.constant(bname).astype(np.float32, copy=False) if bname else None
        self.act = act_code(self.attrs["activation"], node.name)
        self.out_f, self.in_f = self.wf.shape[0], int(np.prod(self.wf.shape[1:]))
        self.fm_in = node.inputs[0] in ctx.fm_values
        self.fm_out = node.outputs[0] in ctx.fm_values
        # runtime-internal: a following add(r, y) folded in by the Session (4th input r, torch
        # layout, y's shape; only with activation none, never on a feature-major output)
        self.res = bool(self.attrs.get("_residual")) and len(node.inputs) > 3
        # runtime-internal: the layernorm after that residual add folded in too (inputs 5, 6 its
        # weight and bias, attr ``_ln_eps``; last-axis layernorm, activation none)
        # the residual read feature-major [out, N] (the producer wrote it so: a residual stream
        # kept feature-major between transformer layers, ``rewrite_bert._feature_major_values``)
        self.res_fm = self.res and node.inputs[3] in ctx.fm_values
        self.ln = None
        if self.res and "_ln_eps" in self.attrs:
            ln_w = ctx.constant(node.inputs[4]).astype(np.float32, copy=False).reshape(-1) \
                if len(node.inputs) > 4 and node.inputs[4] else EMPTY_F32
            ln_b = ctx.constant(node.inputs[5]).astype(np.float32, copy=False).reshape(-1) \
                if len(node.inputs) > 5 and node.inputs[5] else EMPTY_F32
            self.ln = (ln_w, ln_b, float(self.attrs["_ln_eps"]))
        # (min(min(y), 0), max(max(y), 0)) of a feature-major output taken in its epilogue pass
        # (layernorm / activation) and handed to the int8 linears reading it (their dynamic
        # per-tensor quantization skips its min / max pass); per session and calling thread, keyed
        # by value name and buffer address; a producer clears its entry first, a consumer pops it
        mm = getattr(ctx, "_linear_minmax", None)
        if mm is None:
            mm = threading.local()
            ctx._linear_minmax = mm
        self._mm = mm
        self.mm_out = self.fm_out and (self.ln is not None or self.act not in (0, 1, 2))
        self.mm_in = self.fm_in and getattr(self.wf, "kind", "") in ("csr_i8", "bsr_i8", "dense_i8")

    def plan(self, ins, outs, env):
        N = prod(ins[0][0][:-1])
        choice = self.ctx.selector.choose(self.name, "linear", self.wf, N)
        tl = choice.cand.run_tl is not None and not self.fm_in and not self.fm_out and not self.res_fm
        scratch, shared = [], []
        key = ("xT", self.node.inputs[0], N)
        if not tl:
            if not self.fm_out or (self.res and not self.res_fm):
                # torch-layout output staged feature-major / torch-layout residual transposed
                scratch.append(((self.out_f, N), "float32"))
            if not self.fm_in:
                shared.append((key, (self.in_f, N), "float32"))
        return NodePlan(scratch=scratch, shared=shared, data={"choice": choice, "tl": tl, "N": N, "key": key},
                        kernel=choice.name)

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import transpose2d

        choice, N = data["choice"], data["N"]
        if N == 0:
            return
        x, y = ins[0], outs[0]
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        res = None
        if self.res:
            res = ins[3].reshape(self.out_f, N) if self.res_fm else ins[3].reshape(N, self.out_f)
            if res.dtype != np.float32:
                res = res.astype(np.float32)
            res = np.ascontiguousarray(res)
        if data["tl"]:
            if res is None:
                choice.cand.run_tl(choice.packed, x.reshape(N, self.in_f), y.reshape(N, self.out_f), self.bias,
                                   self.act)
            elif self.ln is None:
                choice.cand.run_tl(choice.packed, x.reshape(N, self.in_f), y.reshape(N, self.out_f), self.bias,
                                   self.act, res)
            else:
                choice.cand.run_tl(choice.packed, x.reshape(N, self.in_f), y.reshape(N, self.out_f), self.bias,
                                   self.act, res, self.ln)
            return
        if self.fm_in:
            xf = x.reshape(self.in_f, N)
        else:
            xf = scratch[-1]
            if data["key"] in data.get("_first_shared", ()):
                transpose2d(np.ascontiguousarray(x).reshape(N, self.in_f), xf, _NO_ADD)
        yf = y.reshape(self.out_f, N) if self.fm_out else scratch[0]
        mmd = getattr(self._mm, "d", None)
        if mmd is None:
            mmd = self._mm.d = {}
        if self.mm_out:
            mmd.pop(self.node.outputs[0], None)
        mm = None
        if self.mm_in:
            e = mmd.pop(self.node.inputs[0], None)
            if e is not None and e[0] == xf.ctypes.data and e[1] == xf.shape:
                mm = e[2]
        kres = None  # residual [out, N] added by the kernel
        if self.res_fm:
            kres = res
        elif res is not None and self.fm_out:  # torch-layout residual into a feature-major output
            kres = scratch[0]
            transpose2d(res, kres, _NO_ADD)
        if choice.cand.run is _int8().run_vnni:
            # int8 VNNI: any activation on the task's hot rows (vectorized), and the output's
            # min / max taken there for the int8 linear reading it
            act = self.act
            r = choice.cand.run(choice.packed, xf, yf, self.bias, act, 0.0, 0.0, kres, minmax=mm,
                                want_minmax=self.mm_out and self.ln is None)
            if r is not None and self.mm_out and self.ln is None:
                mmd[self.node.outputs[0]] = (yf.ctypes.data, yf.shape, r)
        else:
            act = self.act if self.act in (0, 1, 2) or kres is not None else 0
            choice.cand.run(choice.packed, xf, yf, self.bias, act, 0.0, 0.0, kres)
        if act != self.act:  # gelu etc. after a float kernel: one vectorized parallel pass (a
            # kernel's fused scalar gelu measured 6 ms instead of 1.1 ms for 1536x384 x 1024)
            if self.mm_out:
                from ...kernels.epilogue import act_minmax

                mmd[self.node.outputs[0]] = (yf.ctypes.data, yf.shape,
                                             act_minmax(yf.reshape(-1), self.act, np.float32(0.0), np.float32(0.0)))
            else:
                from ...kernels.nn import act_inplace

                act_inplace(yf.reshape(-1), self.act, 0.0, 0.0)
        if self.fm_out:
            if self.ln is not None:  # layernorm over the feature axis, in place
                from ...kernels.epilogue import layernorm_fm

                mmd[self.node.outputs[0]] = (yf.ctypes.data, yf.shape,
                                             layernorm_fm(yf, self.ln[0], self.ln[1], self.ln[2]))
            return
        tres = _NO_ADD if res is None or self.res_fm else res  # torch-layout residual still to add
        if self.ln is None:
            transpose2d(yf, y.reshape(N, self.out_f), tres)
        else:
            from ...kernels.nn import transpose_res_ln

            transpose_res_ln(yf, tres, self.ln[0], self.ln[1], self.ln[2], y.reshape(N, self.out_f))


def _int8():
    from ...kernels import int8

    return int8
