"""Normalisations and softmax: layernorm (numba rows kernel), batchnorm (folded to a per-channel
scale and shift at load), l2norm, softmax with an additive mask (mask added into the output
buffer, then an in-place row softmax)."""
from __future__ import annotations

import numpy as np

from . import NodePlan, Op, register, register_internal
from ._common import EMPTY_F32, split0


@register("layernorm")
class LayerNorm(Op):
    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        ins = list(node.inputs) + ["", ""]
        self.w_name, self.b_name = ins[1], ins[2]
        # output feature-major [C, N] when only kernel-path linears read it (x or fused residual,
        # ``rewrite_bert._feature_major_values``): no transposes in the linears reading it
        fmv = getattr(ctx, "fm_values", None) or ()
        self.fm_out = node.outputs[0] in fmv and int(self.attrs.get("axis", -1)) == -1
        # runtime-internal: attr ``_adds`` = k, inputs 3 .. 3+k-1 are addends: the op normalises
        # ((x + a1) + a2) (``rewrite_bert._fuse_residual_layernorm``: BERT's embedding sum)
        self.nadd = int(self.attrs.get("_adds", 0))

    def default_kernel(self):
        return "nn.layernorm_rows"

    def plan(self, ins, outs, env):
        k = "nn.add_rows_bcast+" if self.nadd else ""
        if not self.fm_out:
            return NodePlan(kernel=k + "nn.layernorm_rows")
        shp = tuple(ins[0][0])
        H = shp[-1] if shp else 1
        N = int(np.prod(shp[:-1], dtype=np.int64)) if len(shp) > 1 else 1
        return NodePlan(scratch=[((N, H), "float32")], kernel=k + "nn.layernorm_rows+transpose2d")

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import layernorm_rows

        x, y = ins[0], outs[0]
        w = ins[1] if len(ins) > 1 and ins[1] is not None else EMPTY_F32
        b = ins[2] if len(ins) > 2 and ins[2] is not None else EMPTY_F32
        if self.nadd:  # the fused adds first: into the row layernorm's buffer, normalised in place
            from ...kernels.nn import add_rows_bcast

            H = x.shape[-1]
            N = x.size // H if H else 0
            if N == 0 or H == 0:
                return
            t = scratch[0] if self.fm_out else y.reshape(N, H)
            adds = ins[3:3 + self.nadd]
            rows = _row_periods(x, adds)
            if rows is not None and x.dtype == np.float32:
                a1 = np.ascontiguousarray(adds[0]).reshape(rows[0], H)
                a2 = np.ascontiguousarray(adds[1]).reshape(rows[1], H) if self.nadd > 1 else _NO_MASK
                add_rows_bcast(np.ascontiguousarray(x).reshape(N, H), a1, a2, t)
            else:  # other broadcasts / dtypes: numpy's adds, as the unfused graph
                acc = x
                for a in adds:
                    acc = acc + a
                np.copyto(t, np.asarray(acc).reshape(N, H), casting="unsafe")
            x = t.reshape(x.shape)
        ax = self.attrs["axis"] % x.ndim
        if ax != x.ndim - 1:  # rare: normalise over a middle axis
            from ..reference import eval_node

            np.copyto(y, eval_node(self.node, ins)[0])
            return
        H = x.shape[-1]
        if self.fm_out:  # the row layernorm into scratch (the same values as torch layout), then
            # one tiled transpose into y [C, N] (BERT's 1024 x 384 embedding layernorm 0.15 ->
            # 0.33 ms, layer 0's q|k|v and o-proj -0.35 and -0.45 ms: no transposes there; 0.44 ms
            # for transpose + in-place feature-axis layernorm instead); the q|k|v linear's
            # quantization takes its own min / max (~0.02 ms)
            from ...kernels.nn import transpose2d

            N = x.size // H if H else 0
            if N == 0 or H == 0:
                return
            t = scratch[0]
            layernorm_rows(np.ascontiguousarray(x, dtype=np.float32).reshape(N, H), w.astype(np.float32, copy=False),
                           b.astype(np.float32, copy=False), float(self.attrs["eps"]), t)
            transpose2d(t, y.reshape(H, N), _NO_MASK)
            return
        layernorm_rows(x.reshape(-1, H), w.astype(np.float32, copy=False), b.astype(np.float32, copy=False),
                       float(self.attrs["eps"]), y.reshape(-1, H))


@register_internal("_layernorm_add")
class LayerNormAdd(LayerNorm):
    """_layernorm_add(x, weight?, bias?, a1, a2?): layernorm((x + a1) + a2) over the last axis
    (``rewrite_bert._fuse_residual_layernorm``: BERT's embedding sum and layernorm in one op; the
    adds in one parallel pass, ``kernels.nn.add_rows_bcast``, into the layernorm's buffer)."""


def _row_periods(x, adds):
    """Per addend the row period P (x's row r adds addend row r % P: an addend broadcast over
    leading axes only, float32), or None (numpy's adds)."""
    shp = x.shape
    rows = []
    for a in adds:
        s = tuple(a.shape)
        while len(s) > 1 and s[0] == 1:
            s = s[1:]
        if a.dtype != np.float32 or not s or len(s) > len(shp) or s != shp[len(shp) - len(s):]:
            return None
        rows.append(int(np.prod(s[:-1], dtype=np.int64)) if len(s) > 1 else 1)
    return rows


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


_NO_MASK = np.zeros((0, 0), dtype=np.float32)


def _mask_rows(xs, ms):
    """(mask rows Rm, rows per mask row) when an additive mask of shape ``ms`` broadcast against x of
    shape ``xs`` (softmax over the last axis) picks, for flat row r of x, mask row (r // rpm) % Rm;
    None for other broadcasts (numpy path)."""
    nd = len(xs)
    if len(ms) > nd or ms[-1] != xs[-1]:
        return None
    ms = (1,) * (nd - len(ms)) + tuple(ms)
    idx = [i for i in range(nd - 1) if ms[i] != 1]
    a, b = (idx[0], idx[-1] + 1) if idx else (0, 0)
    if any(ms[i] != xs[i] for i in range(a, b)):
        return None
    rm = int(np.prod(xs[a:b], dtype=np.int64)) if b > a else 1
    rpm = int(np.prod(xs[b:nd - 1], dtype=np.int64)) if nd - 1 > b else 1
    return rm, max(rpm, 1)


@register("softmax")
class Softmax(Op):
    """softmax(x * scale + mask) over ``axis``. ``scale`` is the runtime-internal attr ``_scale``
    (a ``div``/``mul`` by a scalar constant folded in by the Session, as attention's 1/sqrt(d)).
    Last axis, float32, mask broadcast along whole leading axes (attention masks): one fused
    parallel numba pass (``kernels.nn.softmax_rows``); otherwise numpy."""

    def default_kernel(self):
        return "nn.softmax_rows"

    def plan(self, ins, outs, env):
        shp = ins[0][0]
        ax = self.attrs["axis"] % len(shp)
        scale = float(self.attrs.get("_scale", 1.0))
        mask = ins[1] if len(ins) > 1 else None
        fused = None
        if ax == len(shp) - 1 and ins[0][1] == "float32" and len(shp) >= 1 and shp[-1] > 0:
            if mask is None:
                fused = (1, 1)
            elif mask[1] == "float32":
                fused = _mask_rows(tuple(shp), tuple(mask[0]))
        scratch = []
        if ax != len(shp) - 1:
            scratch = [(tuple(shp), "float32")]
        kern = "nn.softmax_rows" if fused is not None else "nn.softmax_inplace"
        return NodePlan(scratch=scratch, data=(ax, fused, scale), kernel=kern)

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import softmax_inplace, softmax_rows

        ax, fused, scale = data
        x, y = ins[0], outs[0]
        mask = ins[1] if len(ins) > 1 else None
        if fused is not None:
            L = x.shape[-1]
            m2 = _NO_MASK if mask is None else np.ascontiguousarray(mask).reshape(fused[0], L)
            softmax_rows(np.ascontiguousarray(x).reshape(-1, L), m2, fused[1], np.float32(scale), y.reshape(-1, L))
            return
        if scale != 1.0:
            x = x * np.float32(scale)
        data = ax
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
