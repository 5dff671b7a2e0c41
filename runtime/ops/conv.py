"""conv2d on NCHW: per image, ``Y[out, Ho*Wo] = W[out, C*kh*kw] @ cols[C*kh*kw, Ho*Wo]``.

An NCHW image is already feature-major ``[C, H*W]``, so a 1x1 / stride 1 / no-padding conv feeds
the image straight to the selected GEMM kernel (no copy). Other convs build im2col columns in an
arena scratch buffer (rows ordered c, i, j = the torch weight order). Depthwise convs (groups ==
channels, one filter per group) use a direct numpy stencil; other grouped convs run per group on
densified weights.

im2col and the depthwise stencil are the numba leaves of ``kernels/conv.py`` (measured faster than
numpy slicing: im2col 64ch 56x56 3x3 0.47 vs 0.65 ms); the numpy versions below remain as fallback.

Residual fusion: the Session rewrites ``relu(add(conv2d(x), r))`` (and ``add(conv2d(x), r)``) into
one conv2d node with a 4th input ``r`` and attr ``_residual`` (runtime-internal), passed to the
kernels' fused epilogue: y = act(W @ x + bias + r) in the same pass over the output.

Batched direct sparse convs (``_plan_bdirect``, kernels/conv.py ``batch_geometry``) work on a packed,
zero-padded copy of the input and compute a wide [O, Npad] grid of positions. Between such convs the
activations are handed over packed (arena buffers shared by producer and readers, ``packed_value``):

* a conv whose readers all run the CSR kpanel path on one stride-1 layout writes its output straight
  into their packed input (``csr_conv_kpanel_ep``: epilogue + padding mask per N chunk, in cache): no
  crop to NCHW, no pack; residuals are read packed at the same positions (others unpack them);
* a conv read by a strided conv scatters its output into that conv's phase planes (``scatter_runs``);
* a 1x1 stride-s conv on the same input as a k x k stride-s conv (ResNet's downsample) is computed in
  the latter's kernel call as extra rows (its weights at the center tap, ``_sibling``), its output left
  in the position layout the block's second conv reads as its residual;
* a stem conv (fused per-plane kernel) read by one maxpool pools each plane itself into the packed
  input of the next conv (``csr_conv_plane_pool``); the maxpool op becomes a no-op.

Decisions are per input shape, taken by the producer at plan time (it plans first) from its readers'
own plans (``in_layout`` / ``out_posmap``); values read by anything else (other ops, graph outputs)
stay NCHW. ``HANDOFF = False`` (module flag) turns it all off (A/B measurements). Measured, ResNet-18
layout at 90% CSR, batch 8, 64x64, 2 threads (this 2-core host, loaded): 18.9 -> ~13.4 ms per run.
"""
from __future__ import annotations

import weakref

import numba
import numpy as np

from . import NodePlan, Op, register
from ._common import act_code, epilogue_cols
from .pool import _valid


def im2col_into(x, cols, kh, kw, stride, padding, dilation, Ho, Wo):
    """x [C, H, W] -> cols [C*kh*kw, Ho*Wo] (preallocated), zero where the window hits padding."""
    C, H, W = x.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    c5 = cols.reshape(C, kh, kw, Ho, Wo)
    for i in range(kh):
        h0, h1, ih = _valid(Ho, H, sh, ph, i * dh)
        for j in range(kw):
            w0, w1, iw = _valid(Wo, W, sw, pw, j * dw)
            dst = c5[:, i, j]
            if h1 <= h0 or w1 <= w0:
                dst.fill(0)
                continue
            if h0 > 0 or h1 < Ho or w0 > 0 or w1 < Wo:
                dst.fill(0)
            dst[:, h0:h1, w0:w1] = x[:, ih:ih + (h1 - h0 - 1) * sh + 1:sh, iw:iw + (w1 - w0 - 1) * sw + 1:sw]


# per LoadContext: {node name: op} of the ops that take part in the packed hand-off (conv2d, maxpool2d),
# and the per-shape decisions about which values travel packed (see ``packed_value``)
_REG: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
HANDOFF = True  # packed hand-off between ops on (False: every value NCHW; for A/B measurements and tests)
SIBLING = True  # 1x1 stride-s sibling convs computed with the k x k conv on the same input (``Conv2d._sibling``)
SCATTER = True  # producers scatter their output into a strided conv's phase planes (``kernels.conv.scatter_runs``)


def _registry(ctx):
    try:
        return _REG.setdefault(ctx, {"ops": {}, "values": {}, "fused": {}})
    except TypeError:  # a context that cannot be weakly referenced: no hand-off
        return None


def _ro(a):
    """A read-only view: weights / biases reach the kernels read-only whether they come from the model's
    memory map or were built at load (one compiled specialization)."""
    v = a.view()
    v.flags.writeable = False
    return v


def position_mask(B, IS, RS, cs, Ho, Wo, n):
    """float32 [n]: 1 at the positions b*IS + oy*RS + ox*cs of real outputs (b < B, oy < Ho, ox < Wo)."""
    m = np.zeros(n, np.float32)
    idx = (np.arange(B)[:, None, None] * IS + np.arange(Ho)[None, :, None] * RS
           + np.arange(Wo)[None, None, :] * cs).ravel()
    m[idx[idx < n]] = 1.0
    return m


def packed_value(ctx, value, shape, posmap=None):
    """Layout dict when ``value`` (of ``shape``) is handed over in the packed layout of its conv consumers
    (the producer writes it straight into their input buffer, zero padding included), else None.

    The producer decides (it plans first) and passes ``posmap`` = (IS, RS, cs, n): its output positions
    b*IS + oy*RS + ox*cs, n of them computed; consumers ask later without ``posmap`` and get that decision.
    Conditions: the value is no graph output; every consumer is a registered conv2d reading it as input 0
    or 3 (fused residual); the readers of input 0 all run the batched direct path on one shared-padding
    geometry whose position map is the producer's. Residual readers take it packed when their own output
    positions match, else unpack it (``unpack``)."""
    reg = _registry(ctx)
    if reg is None or ctx.graph is None or not HANDOFF:
        return None
    key = (value, tuple(shape))
    if posmap is None:
        return reg["values"].get(key)
    res = _packed_value(ctx, reg, value, tuple(shape), posmap)
    reg["values"][key] = res
    return res


def _packed_value(ctx, reg, value, shape, pm):
    if value in {v.name for v in ctx.graph.outputs} or len(shape) != 4:
        return None
    cons = ctx.consumers(value)
    lay = None
    for node, k in cons:
        op = reg["ops"].get(node.name)
        if op is None or not isinstance(op, Conv2d) or k not in (0, 3):
            return None
        if k == 0:
            if op._absorber(shape) is not None:
                continue  # computed by another reader from that reader's packed input
            il = op.in_layout(shape)
            if il is None or (lay is not None and il != lay):
                return None
            lay = il
    if lay is None:
        return None
    if lay[0] == "phase":
        # the producer scatters its output into the reader's phase planes (csr_conv_kpanel_ep runs)
        # measured (2 threads, batch 8): scattering beats crop + pack_phase from a batch-innermost source
        # (8x8x256 -> phase planes, ~0.1 ms) but loses from images one after the other (32x32x64: +0.15 to
        # +0.4 ms: the phase planes of all channels are written piecewise, chunk by chunk, out of cache)
        if (not SCATTER or pm[0] == "any" or len(pm) < 6 or not pm[4] or pm[2] == 1
                or any(k != 0 for _, k in cons)):
            return None
        _, geo, kh, kw, (sh, sw), (ph, pw), (dh, dw) = lay
        B, O, Ho, Wo = (int(d) for d in shape)
        sc = _conv_k().scatter_runs(B, Ho, Wo, pm[0], pm[1], pm[2], pm[3], pm[5], geo, kh, kw, sh, sw, ph, pw, dh, dw)
        if O * sc[3] > geo[6]:
            return None
        return {"key": ("packed", value), "scatter": sc, "size": geo[6], "C": O, "in_layout": lay}
    IS, RS, cs, shift, L, size = lay[:6]
    O = int(shape[1])
    if pm[0] == "any":  # a producer that writes any shared-padding layout (images one after the other)
        if cs != 1 or shift + O * L > size:
            return None
    elif (pm[0], pm[1], pm[2]) != (IS, RS, cs) or pm[3] > L or shift + O * L > size:
        return None
    return {"key": ("packed", value), "IS": IS, "RS": RS, "cs": cs, "shift": shift, "L": L, "size": size,
            "C": O, "in_layout": lay}


def _conv_k():
    from ...kernels import conv as kconv

    return kconv


def fused_pool(ctx, pool_name, in_shape) -> bool:
    """Did the conv producing this maxpool's input fuse the pooling (``csr_conv_plane_pool``)?"""
    reg = _registry(ctx)
    return bool(reg is not None and reg["fused"].get((pool_name, tuple(in_shape))))


def packed_view(buf, lay):
    """[C, L] view of a packed buffer at the layout's padding shift: element [c, p] holds position p of
    channel c (C-contiguous 2-D, as the kernels take it)."""
    sh, L, C = lay["shift"], lay["L"], lay["C"]
    return buf[sh:sh + C * L].reshape(C, L)


@register("conv2d")
class Conv2d(Op):
    weight = True

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        self.wf = ctx.weight(node.inputs[1], node.name)
        orig = getattr(self.wf, "orig_shape", None) or tuple(self.wf.shape)
        self.O, self.Cg, self.kh, self.kw = (int(d) for d in orig)
        bname = node.inputs[2] if len(node.inputs) > 2 else ""
        self.bias = ctx.constant(bname).astype(np.float32, copy=False) if bname else None
        self.act = act_code(self.attrs["activation"], node.name)
        a = self.attrs
        self.g = int(a["groups"])
        self.stride, self.padding, self.dilation = tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"])
        self.pointwise = (self.kh == 1 and self.kw == 1 and self.stride == (1, 1) and self.padding == (0, 0))
        self.depthwise = self.g > 1 and self.Cg == 1
        self._wd = None
        self.has_res = bool(self.attrs.get("_residual"))
        try:
            from ...kernels import conv as kconv

            self.k = kconv
        except Exception:  # the numba leaves are optional: numpy fallbacks below
            self.k = None
        self._bdc: dict = {}
        reg = _registry(ctx)
        if reg is not None:
            reg["ops"][node.name] = self

    def _dense_w(self):
        if self._wd is None:
            from ..select import _dense2d

            self._wd = _dense2d(self.wf)  # [O, Cg*kh*kw]; a view for dense float32 weights
        return self._wd

    def plan(self, ins, outs, env):
        main = self._absorber(ins[0][0])
        if main is not None:
            return NodePlan(data=("absorbed", main.name), kernel=f"computed with {main.name} (1x1 as its center tap)",
                            unwritten=(0,))  # main writes it packed only
        np_ = self._plan(ins, outs, env)
        if self.has_res and not isinstance(np_.data, dict):
            lres = packed_value(self.ctx, self.node.inputs[3], outs[0][0])
            if lres is not None:
                # a path without packed residual reads: unpack the residual into an NCHW scratch first
                data = ("unpackres", np_.data, len(np_.scratch), len(np_.shared), lres)
                return NodePlan(scratch=list(np_.scratch) + [(tuple(outs[0][0]), "float32")],
                                shared=list(np_.shared) + [(lres["key"], (lres["size"],), "float32")], data=data,
                                kernel=np_.kernel + "+unpack residual")
        return np_

    def _plan(self, ins, outs, env):
        _, C, H, W = ins[0][0]
        _, O, Ho, Wo = outs[0][0]
        npix = Ho * Wo
        if self.depthwise:
            self._dense_w()
            kern = "dwconv_f32_direct" if self.k is not None else "numpy_depthwise"
            self.ctx.selector.record(self.name, "conv2d", self.wf, npix, kern,
                                     "depthwise conv: direct stencil (weights densified if stored compressed)")
            if self.k is not None:
                return NodePlan(data=("dwk", None, Ho, Wo), kernel=kern)
            return NodePlan(scratch=[((C, Ho, Wo), "float32")], data=("dw", None, Ho, Wo), kernel=kern)
        if self.g > 1:
            self._dense_w()
            self.ctx.selector.record(self.name, "conv2d", self.wf, npix, "numpy_grouped",
                                     f"grouped conv (groups={self.g}): per-group BLAS on densified weights")
            return NodePlan(scratch=[((self.Cg * self.kh * self.kw, npix), "float32")], data=("grouped", None, Ho, Wo),
                            kernel="numpy_grouped")
        Nb = ins[0][0][0]
        if Nb >= 2 and npix < self.BATCH_PIX and self._blas_choice(npix):
            # small images (late stages) through BLAS: one GEMM over the whole batch, N = Nb*Ho*Wo,
            # so the dense weights stream from memory once per batch, not once per image (ResNet's
            # 512x4608 layer at 4x4 pixels: weights 9.4 MB, N = 16 per image). Columns, output (and
            # the residual) in [O, Nb*npix] scratch, scattered back to NCHW once. Sparse kernels
            # stay per image: their random reads of X fit the cache better at small N (measured
            # 2x slower batched for csr_f32_spmm at 8x8 pixels, batch 8).
            M = Nb * npix
            choice = self.ctx.selector.choose(self.name, "conv2d", self.wf, M)
            scratch = [((C * self.kh * self.kw, M), "float32"), ((O, M), "float32")]
            if self.has_res:
                scratch.append(((O, M), "float32"))
            return NodePlan(scratch=scratch, data=("bgemm", choice, Ho, Wo), kernel=choice.name)
        choice = self.ctx.selector.choose(self.name, "conv2d", self.wf, npix)
        kind = self._direct_kind(choice)
        bd = self._bd(ins[0][0])
        if bd is not None:
            if self.DIRECT_NOTE not in choice.why:
                choice.why = f"{choice.why}; {self.DIRECT_NOTE}"
            return self._plan_bdirect(bd, outs[0][0])
        if kind is not None and self.stride == (1, 1):
            # per image (sparse_conv_s1) where the batched layout computes too many padding positions
            # (valid convs on short images, batch 1 on tiny grids)
            geo = self.k.shifted_geometry(C, H, W, self.kh, self.kw, self.padding[0], self.padding[1],
                                          self.dilation[0], self.dilation[1])
            _, Wp, L, Ho2, Wo2, Nw = geo
            if (Ho2, Wo2) == (Ho, Wo) and self._direct_pays_s1(choice, kind, O, Nw):
                if self.DIRECT_NOTE not in choice.why:
                    choice.why = f"{choice.why}; {self.DIRECT_NOTE}"
                return NodePlan(scratch=[((C * L,), "float32"), ((O, Nw), "float32")],
                                data=("direct", choice, Ho, Wo, kind), kernel=f"{choice.name}+{self.DIRECT_NOTE}")
        scratch = [] if self.pointwise else [((C * self.kh * self.kw, npix), "float32")]
        return NodePlan(scratch=scratch, data=("gemm", choice, Ho, Wo), kernel=choice.name)

    def _bd(self, in_shape):
        """The batched direct path's decision for input shape [B, C, H, W] (cached): dict with kind,
        choice, geo, roff, koff, plane, kp, inner, Ho, Wo; None when another path runs the layer."""
        key = tuple(int(d) for d in in_shape)
        if key in self._bdc:
            return self._bdc[key]
        self._bdc[key] = r = self._bd_compute(key)
        return r

    def _bd_compute(self, in_shape):
        if self.k is None or self.depthwise or self.g > 1 or len(in_shape) != 4:
            return None
        Nb, C, H, W = in_shape
        k = self.k
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        Ho, Wo = k.conv_out_size(H, self.kh, sh, ph, dh), k.conv_out_size(W, self.kw, sw, pw, dw)
        O, npix = self.O, Ho * Wo
        if Ho <= 0 or Wo <= 0:
            return None
        if Nb >= 2 and npix < self.BATCH_PIX and self._blas_choice(npix):
            return None
        choice = self.ctx.selector.choose(self.name, "conv2d", self.wf, npix)
        kind = self._direct_kind(choice)
        if kind is None:
            return None
        geo = k.batch_geometry(Nb, C, H, W, self.kh, self.kw, sh, sw, ph, pw, dh, dw, k.batch_tile(kind))
        shared, P, RS, IS, L, Npad, size, Ho2, Wo2 = geo
        plane = kind == "csr" and choice.packed[2].shape[0] < self.PLANE_MAX_NNZ_ROW * O
        inner = False
        if not plane and Nb >= 2 and npix >= self.INNER_MIN_PIX:
            geo_in = k.batch_geometry(Nb, C, H, W, self.kh, self.kw, sh, sw, ph, pw, dh, dw, k.batch_tile(kind), True)
            if geo_in[5] <= self.INNER_MAX_FRAC * Npad or (npix <= self.INNER_SMALL_PIX and geo_in[5] <= Npad):
                inner, geo = True, geo_in
                shared, P, RS, IS, L, Npad, size, Ho2, Wo2 = geo
        if (Ho2, Wo2) != (Ho, Wo) or not self._direct_pays(kind, plane, Npad, Nb, (Ho - 1) * RS + Wo, npix):
            return None
        cs = k.geo_cs(geo, Nb)
        roff = k.batch_roff(C, self.kh, self.kw, sh, sw, dh, dw, shared, RS, L, cs)
        koff = roff[choice.packed[1]].astype(np.int32) if kind == "csr" else None
        kp = (k.kpanel_plan(choice.packed, geo, C, self.kh, self.kw, dh, dw, sh, sw, cs)
              if kind == "csr" and not plane else None)
        return {"kind": kind, "choice": choice, "geo": geo, "roff": roff, "koff": koff, "plane": plane, "kp": kp,
                "inner": inner, "Ho": Ho, "Wo": Wo, "cs": cs, "B": Nb, "in_shape": tuple(in_shape)}

    def in_layout(self, in_shape):
        """(IS, RS, cs, shift, L, size, shared, ph, pw) of the packed input this conv reads when it runs the
        batched CSR kpanel path on a shared-padding layout (stride 1): input pixel (b, c, iy, ix) sits at
        c*L + shift + b*IS + iy*RS + ix*cs, everything else of the buffer is zero; ("phase", geo, kh, kw,
        stride, padding, dilation) on a phase layout; else None."""
        bd = self._bd(in_shape)
        if bd is None or bd["kind"] != "csr" or bd["plane"]:
            return None
        shared, P, RS, IS, L, Npad, size = bd["geo"][:7]
        if not (shared is True or shared == 2) or P != 1:
            # phase planes (strided convs): a producer can scatter into them (``scatter_runs``)
            return ("phase", tuple(bd["geo"]), self.kh, self.kw, self.stride, self.padding, self.dilation)
        cs = bd["cs"]
        ph, pw = self.padding
        return (IS, RS, cs, ph * RS + pw * cs, L, size, shared, ph, pw)

    def out_posmap(self, in_shape):
        """(IS, RS, cs, n): output (b, o, oy, ox) computed at position b*IS + oy*RS + ox*cs of row o, n
        positions per row, when this conv runs the batched CSR kpanel path, else None."""
        bd = self._bd(in_shape)
        if bd is None or bd["kind"] != "csr" or bd["plane"]:
            return None
        geo = bd["geo"]
        return (geo[3], geo[2], bd["cs"], geo[5])

    def _absorber(self, in_shape):
        """The conv that computes this one along with itself (``_sibling``), or None."""
        reg = _registry(self.ctx)
        if reg is None or self.ctx.graph is None or not HANDOFF:
            return None
        for node, k in self.ctx.consumers(self.node.inputs[0]):
            op = reg["ops"].get(node.name)
            if k == 0 and op is not None and op is not self and isinstance(op, Conv2d):
                sib = op._sibling(in_shape)
                if sib is not None and sib["op"] is self:
                    return op
        return None

    def _sibling(self, in_shape):
        """A 1x1 conv S reading the same input with this conv's stride, no padding, no residual, whose
        output is read only as a fused residual by convs after this one: S is computed in this conv's
        kernel call as extra output rows (its weights at the tap (ph/dh, pw/dw), which reads exactly
        S's pixels), its output left in this conv's position layout. Cached dict or None."""
        key = tuple(int(d) for d in in_shape)
        if not hasattr(self, "_sibc"):
            self._sibc = {}
        if key not in self._sibc:
            self._sibc[key] = self._sibling_compute(key)
        return self._sibc[key]

    def _sibling_compute(self, in_shape):
        reg = _registry(self.ctx)
        if reg is None or self.ctx.graph is None or not (HANDOFF and SIBLING) or self.has_res:
            return None
        bd = self._bd(in_shape)
        if bd is None or bd["kind"] != "csr" or bd["plane"]:
            return None
        (ph, pw), (dh, dw) = self.padding, self.dilation
        if ph % dh or pw % dw or ph // dh >= self.kh or pw // dw >= self.kw:
            return None
        ky, kx = ph // dh, pw // dw
        order = {id(n): i for i, n in enumerate(self.ctx.graph.nodes)}
        me = order.get(id(self.node))
        outs = {v.name for v in self.ctx.graph.outputs}
        for node, k in self.ctx.consumers(self.node.inputs[0]):
            op = reg["ops"].get(node.name)
            if k != 0 or op is None or op is self or not isinstance(op, Conv2d) or op.has_res:
                continue
            if (op.kh, op.kw, op.g, op.stride, op.padding, op.dilation) != (1, 1, 1, self.stride, (0, 0), (1, 1)):
                continue
            if op.depthwise or op.Cg != in_shape[1] or op.node.outputs[0] in outs:
                continue
            H, W = in_shape[2:]
            if (self.k.conv_out_size(H, 1, self.stride[0], 0, 1), self.k.conv_out_size(W, 1, self.stride[1], 0, 1)) != (
                    bd["Ho"], bd["Wo"]):
                continue
            cons = self.ctx.consumers(op.node.outputs[0])
            if not cons or any(kk != 3 or not isinstance(reg["ops"].get(n.name), Conv2d)
                               or order.get(id(n), -1) <= me for n, kk in cons):
                continue
            ch = self.ctx.selector.choose(op.name, "conv2d", op.wf, bd["Ho"] * bd["Wo"])
            if op._direct_kind(ch) != "csr":
                continue
            return self._combine(bd, op, ch, ky, kx)
        return None

    def _combine(self, bd, op, ch, ky, kx):
        """Combined CSR (this conv's rows, then op's with column c -> (c*kh + ky)*kw + kx), its koff / panel
        plan on this conv's layout, the concatenated bias."""
        k = self.k
        p1, p2 = bd["choice"].packed, ch.packed
        ind1, ind2 = np.asarray(p1[0], np.int64), np.asarray(p2[0], np.int64)
        indptr = np.concatenate([ind1, ind1[-1] + ind2[1:] - ind2[0]]).astype(np.int32)
        cols2 = (np.asarray(p2[1], np.int64)[ind2[0]:ind2[-1]] * self.kh + ky) * self.kw + kx
        indices = np.concatenate([np.asarray(p1[1], np.int64)[ind1[0]:ind1[-1]], cols2])
        data = np.ascontiguousarray(np.concatenate([p1[2][ind1[0]:ind1[-1]], p2[2][ind2[0]:ind2[-1]]]), np.float32)
        indptr = indptr - indptr[0]
        koff = bd["roff"][indices].astype(np.int32)
        C = bd["in_shape"][1]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        kp = k.kpanel_plan((indptr, indices, data), bd["geo"], C, self.kh, self.kw, dh, dw, sh, sw, bd["cs"])
        b1 = self.bias if self.bias is not None else np.zeros(self.O, np.float32)
        b2 = op.bias if op.bias is not None else np.zeros(op.O, np.float32)
        bias = np.concatenate([b1, b2]).astype(np.float32)
        return {"op": op, "koff": koff, "kp": kp, "data": _ro(data), "bias": _ro(bias)}

    def ctx_reg(self):
        return _registry(self.ctx)

    def _fusable_pool(self, out_shape):
        """(maxpool op, its output shape, packed layout of that output) when this conv's output is read by
        one float32 maxpool2d only, whose output travels packed: the conv pools each plane itself."""
        reg = _registry(self.ctx)
        if reg is None or self.ctx.graph is None or not HANDOFF:
            return None
        v = self.node.outputs[0]
        if v in {o.name for o in self.ctx.graph.outputs}:
            return None
        cons = self.ctx.consumers(v)
        if len(cons) != 1 or cons[0][1] != 0 or cons[0][0].op != "maxpool2d":
            return None
        pool = reg["ops"].get(cons[0][0].name)
        if pool is None or not hasattr(pool, "pool_args"):
            return None
        reg["fused"][(pool.name, tuple(out_shape))] = False
        qshape = pool.out_shape(out_shape)
        lq = packed_value(self.ctx, pool.node.outputs[0], qshape, posmap=("any",))
        if lq is None:
            return None
        return pool, qshape, lq

    def _plan_bdirect(self, bd, out_shape):
        """NodePlan of the batched direct path; CSR kpanel layers take part in the packed hand-off
        (``packed_value``): input read from the producer's packed buffer (no pack), output written
        into the consumers' packed buffer (no crop), residual read packed."""
        k = self.k
        geo, kind, choice, plane = bd["geo"], bd["kind"], bd["choice"], bd["plane"]
        shared, P, RS, IS, L, Npad, size = geo[:7]
        O, cs, B = self.O, bd["cs"], bd["B"]
        x_name = self.node.inputs[0]
        data = {"mode": "bdirect", "bd": bd, "in": None, "out": None, "res": None, "res_mode": None}
        scratch, shared_l = [], []

        def add_shared(lay):
            shared_l.append((lay["key"], (lay["size"],), "float32"))
            return len(shared_l) - 1

        if kind == "csr" and not plane:
            in_shape = bd["in_shape"]
            lin = packed_value(self.ctx, x_name, in_shape)
            if lin is not None and self.in_layout(in_shape) == lin["in_layout"]:
                data["in"] = (add_shared(lin), lin)
            pm = self.out_posmap(in_shape)
            can_scatter = True
            if self.has_res:  # a scattered output needs the residual read packed in the kernel
                lr = packed_value(self.ctx, self.node.inputs[3], out_shape)
                can_scatter = lr is not None and (lr["IS"], lr["RS"], lr["cs"]) == (IS, RS, cs) and Npad <= lr["L"]
            lout = packed_value(self.ctx, self.node.outputs[0], out_shape,
                                posmap=tuple(pm) + (can_scatter, int(bd["kp"][1])))
            if lout is not None:
                data["out"] = (add_shared(lout), lout)
            sib = self._sibling(in_shape)
            if sib is not None:
                sop = sib["op"]
                lsib = {"key": ("packed", sop.node.outputs[0]), "IS": IS, "RS": RS, "cs": cs, "shift": 0, "L": Npad,
                        "size": sop.O * Npad, "C": sop.O, "in_layout": None}
                sshape = (B, sop.O, bd["Ho"], bd["Wo"])
                _registry(self.ctx)["values"][(sop.node.outputs[0], sshape)] = lsib
                data["sib"] = (add_shared(lsib), lsib, sib)
        if self.has_res:
            lres = packed_value(self.ctx, self.node.inputs[3], out_shape)
            if lres is not None:
                ri = add_shared(lres)
                if (kind == "csr" and not plane and (lres["IS"], lres["RS"], lres["cs"]) == (IS, RS, cs)
                        and Npad <= lres["L"]):
                    data["res"], data["res_mode"] = (ri, lres), "packed"
                else:  # positions differ (or a kernel without packed residual reads): unpack into NCHW
                    data["res"], data["res_mode"] = (ri, lres), "unpack"
        if kind == "csr" and plane and not self.has_res:
            fp = self._fusable_pool(out_shape)
            if fp is not None:
                pool, qshape, lq = fp
                self.ctx_reg()["fused"][(pool.name, tuple(out_shape))] = True
                data["pool"] = (pool.pool_args(), qshape, add_shared(lq), lq)
        if data["in"] is None:
            data["xf"] = len(scratch)
            scratch.append(((size,), "float32"))
        if data["res_mode"] == "unpack":
            data["res_nchw"] = len(scratch)
            scratch.append((tuple(out_shape), "float32"))
        elif self.has_res and data["res_mode"] is None and data["out"] is not None:
            # NCHW residual, packed output: the residual is packed into the output's layout first
            data["res_mode"] = "pack"
            data["res_pk"] = len(scratch)
            scratch.append(((data["out"][1]["size"],), "float32"))
        if (data["out"] is None or "scatter" in data["out"][1]) and not plane:
            data["yw"] = len(scratch)
            scratch.append(((O, Npad), "float32"))
        if kind == "csr" and not plane:
            if data["out"] is not None and "scatter" not in data["out"][1]:
                data["mask"] = position_mask(B, IS, RS, cs, bd["Ho"], bd["Wo"], Npad)
        data["nscratch"] = len(scratch)
        data["bias"] = _ro(k.EMPTY1 if self.bias is None else self.bias)
        data["wdata"] = _ro(choice.packed[2])
        data["rb"] = {}  # row groups of csr_conv_kpanel_ep per thread count (filled on first run)
        parts = [self.DIRECT_NOTE]
        if data["in"] is not None:
            parts.append("packed in")
        if data["out"] is not None:
            parts.append("scattered out" if "scatter" in data["out"][1] else "packed out")
        if data["res_mode"] == "unpack":
            parts.append("unpack residual")
        if "sib" in data:
            parts.append(f"with {data['sib'][2]['op'].name}")
        if "pool" in data:
            parts.append("maxpool fused, packed out")
        # a packed output, or a conv that pools each plane itself, never writes its NCHW output
        unwritten = (0,) if data["out"] is not None or "pool" in data else ()
        return NodePlan(scratch=scratch, shared=shared_l, data=data,
                        kernel=f"{choice.name}+{'+'.join(parts)}", unwritten=unwritten)

    DIRECT_NOTE = "direct shifted conv"

    def _direct_kind(self, choice):
        """"csr" / "bsr" when this layer can run ``sparse_conv_s1`` (stride 1, groups 1, kh*kw > 1,
        float32 CSR spmm row or BSR r x 1 spmm row with r % 8 == 0, packed as those rows' prepare
        returns it), else None."""
        if self.k is None or not hasattr(self.k, "sparse_conv_batch") or self.g != 1 or self.pointwise:
            return None
        spec = getattr(choice.cand, "spec", None)
        if choice.cand.kind != "table" or spec is None or spec.op != "gemm" or spec.dtype != "float32":
            return None
        p = choice.packed
        if not isinstance(p, tuple) or not all(isinstance(a, np.ndarray) for a in p[:3]):
            return None
        if spec.fmt == "csr" and choice.name == "csr_f32_spmm" and len(p) >= 3:
            # (indptr, indices, data[, extra the GEMM kernel precomputes]): the direct convs use the first three
            if (p[2].dtype == np.float32 and p[2].ndim == 1 and p[1].ndim == 1 and p[1].shape == p[2].shape
                    and p[1].dtype.kind in "iu"):
                return "csr"
            return None
        if spec.fmt == "bsr" and len(p) == 5:
            r, c = int(p[3]), int(p[4])
            if (c == 1 and r % 8 == 0 and tuple(spec.block or ()) == (r, 1) and p[2].dtype == np.float32
                    and p[2].ndim == 2 and p[2].shape[1] == r):
                return "bsr"
        return None

    DIRECT_MIN_NNZ_ROW = 8  # per-image sparse_conv_s1: mean weights per output row below which im2col stays
    DIRECT_MIN_K = 64  # reduction depth C*kh*kw below which (stems) the [O, Npad] batched path loses
    DIRECT_MAX_WASTE = 2.0  # largest computed / real output positions (padding columns, rows, round-up)
    # batch-innermost layout (positions (oy*RS + ox)*B + b: no padding rows between images) when it computes at
    # most INNER_MAX_FRAC of the other layout's positions (or no more, on output grids <= INNER_SMALL_PIX), on
    # grids of >= INNER_MIN_PIX outputs. Measured, batch 8, 2 threads, 90%, whole conv: 3x3 s1 4x4x512
    # 1.00 -> 0.76 ms, 8x8x256 0.77 -> 0.70; 3x3 s2 8x8x256 -> 4x4 0.89 -> 0.69-0.74 (its phase pack 0.19 ->
    # 0.09), 16x16x128 -> 8x8 0.78 -> 0.71-0.77; 1x1 s2 8x8x256 0.244 -> 0.203 (same positions, faster pack), but
    # 16x16x128 0.24 -> 0.27; lost at 32x32 inputs (3x3 s1 0.75 -> 1.06, s2 0.82 -> 1.06: strided crop / pack), which the rules exclude.
    INNER_MAX_FRAC = 0.9
    INNER_MIN_PIX = 16
    INNER_SMALL_PIX = 16
    PLANE_MAX_NNZ_ROW = 16  # csr: mean weights per output row below which the fused per-plane kernel runs

    def _direct_pays(self, kind, plane, Npad, Nb, nimg, npix) -> bool:
        """Measured (2 threads, batch 8, this 2-core host; 3x3 convs at 90%): the batched direct conv
        beats per-image im2col + the same GEMM from 32x32 (2.5-4x) down to 4x4 outputs (1.4x, 208
        positions computed for 128 real), strided too, and 4-5x with 5-12 weights per output row. On a
        3-channel stem (K = 27) the [O, Npad] form lost (pack + crop passes: 0.70 vs 0.56 ms) but the fused
        per-plane form (``csr_conv_plane``, rows with < 16 weights) won (0.47 ms)."""
        if plane:
            vw = int(getattr(self.k, "VW", 8))
            return Nb * (-(-nimg // vw) * vw) <= self.DIRECT_MAX_WASTE * Nb * npix
        return Npad <= self.DIRECT_MAX_WASTE * Nb * npix and self.Cg * self.kh * self.kw >= self.DIRECT_MIN_K

    DIRECT_MAX_TAIL = 1 / 64  # largest share of the wide grid left to the kernels' scalar tail

    def _direct_pays_s1(self, choice, kind, O, Nw) -> bool:
        """Per-image sparse_conv_s1 (measured, ResNet-style model at 90%, 2 threads, batch 8, VW=16): ~2x
        faster than im2col + GEMM where the wide grid Nw = Ho*Wp is (nearly) whole vector tiles, 5-11x
        slower where the kernels' scalar tail (Nw % VW for CSR, Nw % 2VW for BSR) is a visible share."""
        vw = int(getattr(self.k, "VW", 8))
        tile, step = (4 * vw, vw) if kind == "csr" else (2 * vw, 2 * vw)
        if Nw < tile or (Nw % step) > self.DIRECT_MAX_TAIL * Nw or self.Cg * self.kh * self.kw < self.DIRECT_MIN_K:
            return False
        p = choice.packed
        nnz = p[2].shape[0]
        rows = O if kind == "csr" else max(1, p[0].shape[0] - 1)
        return nnz >= self.DIRECT_MIN_NNZ_ROW * rows

    def _run_bd(self, ins, outs, scratch, data):
        """The batched direct path (see ``_plan_bdirect``)."""
        k = self.k
        bd = data["bd"]
        kind, choice, geo = bd["kind"], bd["choice"], bd["geo"]
        shared, P, RS, IS, L, Npad, size = geo[:7]
        cs = bd["cs"]
        y = outs[0]
        nsc = data["nscratch"]
        res_nchw = None
        bias = data["bias"]
        if data["in"] is not None:
            xf = scratch[nsc + data["in"][0]]
        else:
            x = ins[0] if ins[0].flags.c_contiguous else np.ascontiguousarray(ins[0])
            xf = scratch[data["xf"]]
            k.batch_pack(x, geo, self.kh, self.kw, self.stride, self.padding, self.dilation, xf)
        rm = data["res_mode"]
        if rm == "unpack":
            lr = data["res"][1]
            res_nchw = scratch[data["res_nchw"]]
            k.crop_batch(packed_view(scratch[nsc + data["res"][0]], lr), lr["IS"], lr["RS"], lr["cs"], res_nchw,
                         k.EMPTY1, k.EMPTY4, 0, 0.0, 0.0)
        if kind != "csr" or bd["plane"]:
            res = (res_nchw if rm == "unpack" else ins[3]) if self.has_res else None
            if res is not None and not res.flags.c_contiguous:
                res = np.ascontiguousarray(res)
            if kind == "csr" and "pool" in data:
                (pkh, pkw, psh, psw, pph, ppw, pdh, pdw), qshape, qi, lq = data["pool"]
                k.csr_conv_plane_pool(choice.packed[0], bd["koff"], data["wdata"], xf, IS, RS, bd["B"], bd["Ho"],
                                      bd["Wo"], bias, self.act, 0.0, 0.0, pkh, pkw, psh, psw, pph, ppw, pdh, pdw,
                                      qshape[2], qshape[3], scratch[nsc + qi], lq["L"], lq["shift"], lq["IS"],
                                      lq["RS"])
                return
            if kind == "csr":
                k.csr_conv_plane(choice.packed[0], bd["koff"], data["wdata"], xf, IS, RS, y, bias,
                                 k.EMPTY4 if res is None else res, self.act, 0.0, 0.0)
                return
            yw = scratch[data["yw"]]
            k.bsr_conv_s1(choice.packed[0], choice.packed[1], choice.packed[2], choice.packed[3], xf, bd["roff"], yw)
            k.crop_batch(yw, IS, RS, cs, y, bias, k.EMPTY4 if res is None else res, self.act, 0.0, 0.0)
            return
        res2d = None
        if self.has_res:
            if rm == "packed":
                res2d = packed_view(scratch[nsc + data["res"][0]], data["res"][1])
            elif rm == "unpack":
                pass  # res_nchw unpacked above
            else:
                res_nchw = ins[3] if ins[3].flags.c_contiguous else np.ascontiguousarray(ins[3])
                if rm == "pack":
                    lo = data["out"][1]
                    buf = scratch[data["res_pk"]]
                    self._pack_like(res_nchw, lo, buf)
                    res2d = packed_view(buf, lo)
                    res_nchw = None
        sp, nc = bd["kp"]
        koff, wdata, yw2, act2 = bd["koff"], data["wdata"], k.EMPTY2, 0
        if "sib" in data:
            si, lsib, sib = data["sib"]
            sp, nc = sib["kp"]
            koff, wdata, bias, act2 = sib["koff"], sib["data"], sib["bias"], sib["op"].act
            yw2 = packed_view(scratch[nsc + si], lsib)
        nt = numba.get_num_threads()
        ng, cg = (1, nt) if -(-Npad // nc) >= k.KPANEL_CHUNK_SPLIT * nt else (nt, 1)
        rb = data["rb"].get(ng)
        if rb is None:
            rb = data["rb"][ng] = k.row_bounds(np.append(sp[:, 0], sp[-1:, -1]), ng)
        if data["out"] is not None and "scatter" in data["out"][1]:
            runs, rptr, zmap, dstride = data["out"][1]["scatter"]
            k.csr_conv_kpanel_ep(sp, koff, wdata, xf, scratch[data["yw"]], yw2, Npad, nc, rb, cg, bias,
                                 k.EMPTY2 if res2d is None else res2d, k.EMPTY1, self.act, act2, 0.0, 0.0, runs, rptr,
                                 zmap, scratch[nsc + data["out"][0]], dstride)
            return
        if data["out"] is not None:
            lo = data["out"][1]
            buf = scratch[nsc + data["out"][0]]
            yw = packed_view(buf, lo)
            k.csr_conv_kpanel_ep(sp, koff, wdata, xf, yw, yw2, Npad, nc, rb, cg, bias,
                                 k.EMPTY2 if res2d is None else res2d, data["mask"], self.act, act2, 0.0, 0.0,
                                 k.EMPTYI2, k.EMPTYI, k.EMPTYI, k.EMPTY1, 0)
            sh = lo["shift"]
            buf[:sh] = 0.0
            buf[sh + lo["C"] * lo["L"]:] = 0.0
            return
        yw = scratch[data["yw"]]
        if "sib" in data:
            k.csr_conv_kpanel_ep(sp, koff, wdata, xf, yw, yw2, Npad, nc, rb, cg, bias, k.EMPTY2, k.EMPTY1, self.act,
                                 act2, 0.0, 0.0, k.EMPTYI2, k.EMPTYI, k.EMPTYI, k.EMPTY1, 0)
            k.crop_batch(yw, IS, RS, cs, y, k.EMPTY1, k.EMPTY4, 0, 0.0, 0.0)
            return
        if res2d is not None:
            k.csr_conv_kpanel_ep(sp, koff, wdata, xf, yw, yw2, Npad, nc, rb, cg, bias, res2d,
                                 k.EMPTY1, self.act, 0, 0.0, 0.0, k.EMPTYI2, k.EMPTYI, k.EMPTYI, k.EMPTY1, 0)
            k.crop_batch(yw, IS, RS, cs, y, k.EMPTY1, k.EMPTY4, 0, 0.0, 0.0)
            return
        k.csr_conv_kpanel(sp, bd["koff"], data["wdata"], xf, yw, nc, ng, cg)
        k.crop_batch(yw, IS, RS, cs, y, bias, k.EMPTY4 if res_nchw is None else res_nchw, self.act, 0.0, 0.0)

    def _pack_like(self, x, lay, buf):
        """Pack x [B, C, H, W] into ``buf`` in the shared-padding layout ``lay`` (a ``packed_value`` dict)."""
        k = self.k
        _, _, _, _, _, _, shared, ph, pw = lay["in_layout"]
        if shared == 2:
            k.pack_inner(x, int(ph), int(pw), lay["L"], buf)
        else:
            k.pack_shared(x, int(ph), int(pw), lay["L"], buf)

    def _run_direct(self, x, y, res, choice, kind, scratch):
        """Per image: sparse_conv_s1 with the fused epilogue; work buffers from the plan's scratch."""
        work = (scratch[0], scratch[1])
        for n in range(x.shape[0]):
            xn = x[n] if x[n].flags.c_contiguous else np.ascontiguousarray(x[n])
            rn = None
            if res is not None:
                rn = res[n] if res[n].flags.c_contiguous else np.ascontiguousarray(res[n])
            self.k.sparse_conv_s1(kind, choice.packed, xn, y[n], self.kh, self.kw, self.padding, self.dilation,
                                  bias=self.bias, act=self.act, lo=0.0, hi=0.0, residual=rn, work=work)

    BATCH_PIX = 256  # output pixels per image below which a BLAS conv runs the batch as one GEMM
    _BLAS = ("numpy_dense", "numpy_densified", "dense_f32_blas", "lowrank_f32_blas")

    def _blas_choice(self, npix) -> bool:
        """Would the selector run this layer through BLAS (the dense paths)? Asked without
        recording a choice (``peek``) when the selector supports it."""
        peek = getattr(self.ctx.selector, "peek", None)
        name = peek(self.name, "conv2d", self.wf, npix) if peek is not None else None
        return name in self._BLAS

    def _run_batched(self, x, y, res, choice, scratch, npix):
        Nb, C = x.shape[:2]
        cols, yb = scratch[0], scratch[1]
        for n in range(Nb):
            if self.pointwise:
                np.copyto(cols[:, n * npix:(n + 1) * npix], x[n].reshape(C, npix))
            else:
                self._im2col(x[n], cols, None, None, n * npix)
        rb = None
        if res is not None:
            rb = scratch[2]
            np.copyto(rb.reshape(self.O, Nb, npix), res.reshape(Nb, self.O, npix).transpose(1, 0, 2))
        choice.cand.run(choice.packed, cols, yb, self.bias, self.act, 0.0, 0.0, rb)
        np.copyto(y.reshape(Nb, self.O, npix), yb.reshape(self.O, Nb, npix).transpose(1, 0, 2))

    def run(self, ins, outs, scratch, data):
        if isinstance(data, dict):
            return self._run_bd(ins, outs, scratch, data)
        if data[0] == "absorbed":
            return  # computed by the sibling conv into the packed buffer its consumers read
        if data[0] == "unpackres":
            _, inner, ns, nh, lr = data
            r = scratch[ns]
            self.k.crop_batch(packed_view(scratch[ns + 1 + nh], lr), lr["IS"], lr["RS"], lr["cs"], r,
                              self.k.EMPTY1, self.k.EMPTY4, 0, 0.0, 0.0)
            return self.run(list(ins[:3]) + [r], outs, list(scratch[:ns]) + list(scratch[ns + 1:ns + 1 + nh]), inner)
        mode, choice, Ho, Wo = data[:4]
        x, y = ins[0], outs[0]
        res = ins[3] if self.has_res else None
        Nb, C = x.shape[:2]
        npix = Ho * Wo
        if mode == "dwk":
            k = self.k
            W = self._dense_w()
            k.dwconv2d(x, W, self.kh, self.kw, self.stride[0], self.stride[1], self.padding[0], self.padding[1],
                       self.dilation[0], self.dilation[1], y, k.EMPTY1 if self.bias is None else self.bias,
                       k.EMPTY4 if res is None else res, self.act, 0.0, 0.0)
            return
        if mode == "dw":
            return self._run_dw(x, y, scratch[0], Ho, Wo, res)
        if mode == "bgemm":
            return self._run_batched(x, y, res, choice, scratch, npix)
        if mode == "direct":
            return self._run_direct(x, y, res, choice, data[4], scratch)
        for n in range(Nb):
            yn = y[n].reshape(self.O, npix)
            rn = None if res is None else res[n].reshape(self.O, npix)
            if mode == "grouped":
                Og = self.O // self.g
                W = self._dense_w()
                for gi in range(self.g):
                    self._im2col(x[n, gi * self.Cg:(gi + 1) * self.Cg], scratch[0], Ho, Wo)
                    np.matmul(W[gi * Og:(gi + 1) * Og], scratch[0], out=yn[gi * Og:(gi + 1) * Og])
                epilogue_cols(yn, self.bias, self.act, rn)
                continue
            if self.pointwise:
                X = x[n].reshape(C, npix)
            else:
                X = scratch[0]
                self._im2col(x[n], X, Ho, Wo)
            choice.cand.run(choice.packed, X, yn, self.bias, self.act, 0.0, 0.0, rn)

    def _im2col(self, xn, cols, Ho, Wo, col0=0):
        if self.k is not None and xn.flags.c_contiguous:
            self.k.im2col(xn, self.kh, self.kw, self.stride[0], self.stride[1], self.padding[0], self.padding[1],
                          self.dilation[0], self.dilation[1], cols, col0)
            return
        C, H, W = xn.shape
        Ho = (H + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        if col0 == 0 and cols.shape[1] == Ho * Wo:
            im2col_into(xn, cols, self.kh, self.kw, self.stride, self.padding, self.dilation, Ho, Wo)
        else:
            im2col_into(xn, cols[:, col0:col0 + Ho * Wo], self.kh, self.kw, self.stride, self.padding,
                        self.dilation, Ho, Wo)

    def _run_dw(self, x, y, t, Ho, Wo, res=None):
        """Depthwise: y[n, o] = sum_ij w[o, ij] * x[n, o // mult] shifted (mult = O / C)."""
        W = self._dense_w().reshape(self.O, self.kh, self.kw)
        Nb, C, H, Wd = x.shape
        mult = self.O // C
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        for n in range(Nb):
            for m in range(mult):
                yo = y[n, m::mult] if mult > 1 else y[n]
                yo.fill(0)
                wm = W[m::mult] if mult > 1 else W
                for i in range(self.kh):
                    h0, h1, ih = _valid(Ho, H, sh, ph, i * dh)
                    if h1 <= h0:
                        continue
                    for j in range(self.kw):
                        w0, w1, iw = _valid(Wo, Wd, sw, pw, j * dw)
                        if w1 <= w0:
                            continue
                        xs = x[n, :, ih:ih + (h1 - h0 - 1) * sh + 1:sh, iw:iw + (w1 - w0 - 1) * sw + 1:sw]
                        tt = t[:, h0:h1, w0:w1]
                        np.multiply(xs, wm[:, i, j, None, None], out=tt)
                        dst = yo[:, h0:h1, w0:w1]
                        np.add(dst, tt, out=dst)
            epilogue_cols(y[n].reshape(self.O, Ho * Wo), self.bias, self.act,
                          None if res is None else res[n].reshape(self.O, Ho * Wo))
