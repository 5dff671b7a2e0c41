"""Convolution and pooling leaves the runtime's conv2d / pool ops compose. NCHW float32.

How a conv2d maps onto the GEMM kernels (Y[out, N] = W[out, in] @ X[in, N], see table.py):

* weight [O, C/g, kh, kw] is stored 2-D as [O, (C/g)*kh*kw] (torch order, row = output channel,
  column = (c*kh + ky)*kw + kx).
* 1x1, stride 1, no padding, g == 1: X is the image itself, ``x[b].reshape(C, H*W)`` (channel-major
  is the activation layout already): no copy; Y = ``y[b].reshape(O, H*W)``. N = H*W.
* k x k (or strided / padded / dilated 1x1): ``im2col(x[b], ...)`` fills cols [C*kh*kw, Ho*Wo]
  (rows in the weight's column order), then any GEMM row (dense BLAS, CSR, BSR, N:M) with the fused
  epilogue writes ``y[b].reshape(O, Ho*Wo)``. ``im2col`` takes a column offset, so a batch can be
  packed side by side into one [C*kh*kw, B*Ho*Wo] matrix when that pays (then Y is [O, B*Ho*Wo]
  and needs a transpose back to NCHW).
* groups g > 1 (not depthwise): for group gi, input channels gi*C/g .. and output rows
  gi*O/g ..: ``cols_gi = im2col(x[b, gi*Cg:(gi+1)*Cg])``, ``Y[gi*Og:(gi+1)*Og] = W[gi*Og:(gi+1)*Og] @ cols_gi``.
  Slicing W's rows is free for every format: CSR -> ``indptr[gi*Og : (gi+1)*Og + 1]`` with the
  same ``indices``/``data`` (kernels use absolute offsets); BSR -> block rows when Og % r == 0
  (else convert that layer to CSR); N:M / dense -> ``values[gi*Og:(gi+1)*Og]``. Output views
  ``y[b, gi*Og:(gi+1)*Og].reshape(Og, -1)`` are contiguous, so the GEMM writes in place.
* stride 1 (any kernel, padding, dilation) with a CSR or BSR r x 1 (r % 8 == 0) weight:
  ``sparse_conv_s1`` is a direct sparse conv without im2col (shifted rows of a zero-padded copy of
  the input, see the comment above ``shifted_geometry``); measured faster than im2col + the same
  GEMM (3x3 64->64 56x56 at 90%: CSR 1.08 vs 1.70 ms, BSR 8x1 0.55 vs 0.81 ms, 1 thread).
  Strided convs use im2col.
* depthwise (g == C, O = C*mult): ``dwconv2d`` (its own table row, op "dwconv"), with the fused
  epilogue. Output channel o reads input channel o // mult.

Functions (all outputs preallocated by the caller, float32, C-contiguous):

* ``conv_out_size(n, k, s, p, d)`` / ``pool_out_size(n, k, s, p, d, ceil_mode)``: torch's rules.
* ``im2col(x [C,H,W], kh, kw, sh, sw, ph, pw, dh, dw, cols [C*kh*kw, ncols], col0)``.
* ``dwconv2d(x [B,C,H,W], w [O, kh*kw], kh, kw, sh, sw, ph, pw, dh, dw, y [B,O,Ho,Wo], bias, res, act, lo, hi)``
  (bias float32 [O] or len 0; res [B,O,Ho,Wo] or shape (0,0,0,0)).
* ``maxpool2d(x, y, kh, kw, sh, sw, ph, pw, dh, dw)``: padding never wins (as -inf), NaN propagates;
  row-buffer form (vertical max contiguous, then horizontal taps): ResNet stem pool 64ch 64x64 batch 8
  0.28 ms vs 4.3 ms for the numpy slice loop (2 threads).
* ``avgpool2d(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)`` (divisor 0 = none),
  torch semantics incl. ceil_mode windows (Ho/Wo from ``pool_out_size``).
* ``global_avgpool(x [B, C, HW], y [B, C])``.
* ``sparse_conv_s1(kind, packed, x [C,H,W], y [O,Ho,Wo], kh, kw, padding, dilation, bias, act, lo, hi,
  residual [O,Ho,Wo] or None, work)``: one image; ``packed`` from the csr / bsr row's ``prepare``;
  ``work`` = (float32 [C*L], float32 [O, Ho*Wp]) scratch sized by ``shifted_geometry``.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import jit, pjit
from .epilogue import EMPTY1, EMPTY2, epilogue_ref, epilogue_tile
from .simd import VW, vadd, vbcast, vfma, vload, vmask, vrelu_mask, vstore, vzero
from .table import ACT_NONE, ACT_RELU, KernelSpec

EMPTY4 = np.zeros((0, 0, 0, 0), dtype=np.float32)
EMPTYI = np.zeros(0, dtype=np.int32)
EMPTYI2 = np.zeros((0, 5), dtype=np.int32)


@jit(inline="always")
def _epv(a, b, res, ri, mask, um, j, relu):
    """One vector of csr_conv_kpanel_ep's fused epilogue: relu?(a + b + res[ri, j:]) (ri < 0: no
    residual), masked by mask[j:] when ``um``."""
    a = vadd(a, b)
    if ri >= 0:
        a = vadd(a, vload(res[ri], j))
    m = vload(mask, j) if um else vbcast(np.float32(1.0))
    return vrelu_mask(a, m) if relu else vmask(a, m)


def conv_out_size(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Output length of a convolution (torch: floor((n + 2p - d(k-1) - 1) / s) + 1)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(n: int, k: int, s: int, p: int, d: int = 1, ceil_mode: bool = False) -> int:
    """Output length of max/avg pooling with torch's ceil_mode rule (the last window must
    start inside the input or the left padding)."""
    num = n + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


@jit
def _valid_range(nout, nin, s, off):
    """[a, b): output positions o with 0 <= o*s + off < nin."""
    a = 0
    if off < 0:
        a = (-off + s - 1) // s
    b = 0
    if nin - 1 - off >= 0:
        b = (nin - 1 - off) // s + 1
    b = min(b, nout)
    if a > b:
        a = b
    return a, b


@pjit
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, cols, col0):
    """cols[(c*kh+ky)*kw+kx, col0 + oy*Wo + ox] = x[c, oy*sh-ph+ky*dh, ox*sw-pw+kx*dw] (0 outside)."""
    C = x.shape[0]
    H = x.shape[1]
    W = x.shape[2]
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    for row in prange(C * kh * kw):
        c = row // (kh * kw)
        ky = (row // kw) % kh
        kx = row % kw
        dst = cols[row]
        xo = kx * dw - pw
        a, b = _valid_range(Wo, W, sw, xo)
        for oy in range(Ho):
            iy = oy * sh - ph + ky * dh
            d = dst[col0 + oy * Wo:col0 + oy * Wo + Wo]
            if iy < 0 or iy >= H:
                for ox in range(Wo):
                    d[ox] = np.float32(0.0)
                continue
            src = x[c, iy]
            for ox in range(a):
                d[ox] = np.float32(0.0)
            if sw == 1:
                s0 = a + xo
                seg = src[s0:s0 + (b - a)]
                dd = d[a:b]
                for t in range(b - a):
                    dd[t] = seg[t]
            else:
                for ox in range(a, b):
                    d[ox] = src[ox * sw + xo]
            for ox in range(b, Wo):
                d[ox] = np.float32(0.0)


@jit(inline="always")
def _dw_row(src, yr, wo, ky, kw, sw, pw, dw, W, Wo, ra, rb):
    """yr[:] += sum_kx wo[ky*kw+kx] * src[ox*sw + kx*dw - pw] over in-range taps (one input row).
    ra/rb [kw]: per tap, the output range [ra, rb) whose input column is in range (precomputed)."""
    if kw == 3:
        w0 = wo[ky * 3]
        w1 = wo[ky * 3 + 1]
        w2 = wo[ky * 3 + 2]
        xo0 = -pw
        a = ra[0]
        b = max(rb[2], a)
        # interior: all three taps in range, one fused pass
        if sw == 1:
            s0 = src[a + xo0:b + xo0]
            s1 = src[a + xo0 + dw:b + xo0 + dw]
            s2 = src[a + xo0 + 2 * dw:b + xo0 + 2 * dw]
            dd = yr[a:b]
            for q in range(b - a):
                dd[q] += w0 * s0[q] + w1 * s1[q] + w2 * s2[q]
        else:
            for ox in range(a, b):
                i0 = ox * sw + xo0
                yr[ox] += w0 * src[i0] + w1 * src[i0 + dw] + w2 * src[i0 + 2 * dw]
        # borders: per tap with range checks
        for ox in range(0, min(a, Wo)):
            for kx in range(3):
                ix = ox * sw + kx * dw - pw
                if ix >= 0 and ix < W:
                    yr[ox] += wo[ky * 3 + kx] * src[ix]
        for ox in range(b, Wo):
            if ox < a:
                continue
            for kx in range(3):
                ix = ox * sw + kx * dw - pw
                if ix >= 0 and ix < W:
                    yr[ox] += wo[ky * 3 + kx] * src[ix]
        return
    for kx in range(kw):
        wv = wo[ky * kw + kx]
        xo = kx * dw - pw
        a = ra[kx]
        b = rb[kx]
        if sw == 1:
            seg = src[a + xo:b + xo]
            dd = yr[a:b]
            for q in range(b - a):
                dd[q] += wv * seg[q]
        else:
            for ox in range(a, b):
                yr[ox] += wv * src[ox * sw + xo]


@pjit
def dwconv2d(x, w, kh, kw, sh, sw, ph, pw, dh, dw, y, bias, res, act, lo, hi):
    """Depthwise conv: y[b,o] = act(sum_taps w[o,tap] * x[b, o // mult] + bias[o] + res[b,o]).
    (batch, channel) planes in parallel. Stride 1: one flat loop over a zero-padded copy of the
    plane (9 taps fused for 3x3). 3x3 with horizontal stride 2: parity-split padded input, 3 taps
    fused per input row. Otherwise row by row, tap by tap. Epilogue once per plane."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    O = y.shape[1]
    Ho = y.shape[2]
    Wo = y.shape[3]
    mult = O // C
    nb = bias.shape[0]
    nr = res.shape[0]
    ra = np.empty(kw, dtype=np.int64)
    rb = np.empty(kw, dtype=np.int64)
    for kx in range(kw):
        ra[kx], rb[kx] = _valid_range(Wo, W, sw, kx * dw - pw)
    # stride 1: the whole plane as one flat loop over a zero-padded copy ("wide" output rows of
    # Wp, as sparse_conv_s1), so short rows cost no per-row overhead; strided: row by row
    flat = sh == 1 and sw == 1
    Hp = H + 2 * ph
    Wp = W + 2 * pw
    L = Hp * Wp + (kw - 1) * dw + 16
    nw = Ho * Wp
    offs = np.empty(kh * kw, dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            offs[ky * kw + kx] = ky * dh * Wp + kx * dw
    for t in prange(B * O):
        bi = t // O
        o = t - bi * O
        ci = o // mult
        wo = w[o]
        bv = bias[o] if nb != 0 else np.float32(0.0)
        if flat:
            xp = np.zeros(L, dtype=np.float32)
            for iy in range(H):
                dst = xp[(iy + ph) * Wp + pw:(iy + ph) * Wp + pw + W]
                src = x[bi, ci, iy]
                for ix in range(W):
                    dst[ix] = src[ix]
            yw = np.zeros(nw, dtype=np.float32)
            if kh == 3 and kw == 3:
                s0 = xp[offs[0]:offs[0] + nw]
                s1 = xp[offs[1]:offs[1] + nw]
                s2 = xp[offs[2]:offs[2] + nw]
                s3 = xp[offs[3]:offs[3] + nw]
                s4 = xp[offs[4]:offs[4] + nw]
                s5 = xp[offs[5]:offs[5] + nw]
                s6 = xp[offs[6]:offs[6] + nw]
                s7 = xp[offs[7]:offs[7] + nw]
                s8 = xp[offs[8]:offs[8] + nw]
                w0, w1, w2, w3, w4, w5, w6, w7, w8 = wo[0], wo[1], wo[2], wo[3], wo[4], wo[5], wo[6], wo[7], wo[8]
                for q in range(nw):
                    yw[q] = ((w0 * s0[q] + w1 * s1[q]) + (w2 * s2[q] + w3 * s3[q])) + \
                            ((w4 * s4[q] + w5 * s5[q]) + (w6 * s6[q] + w7 * s7[q])) + w8 * s8[q]
            else:
                for tap in range(kh * kw):
                    wv = wo[tap]
                    sg = xp[offs[tap]:offs[tap] + nw]
                    for q in range(nw):
                        yw[q] += wv * sg[q]
            for oy in range(Ho):
                dst = y[bi, o, oy]
                src = yw[oy * Wp:oy * Wp + Wo]
                for ox in range(Wo):
                    dst[ox] = src[ox]
            plane = y[bi, o].reshape(Ho * Wo)
            if nr != 0:
                epilogue_tile(plane, bv, res[bi, o].reshape(Ho * Wo), act, lo, hi)
            else:
                epilogue_tile(plane, bv, plane[0:0], act, lo, hi)
            continue
        if sw == 2 and kh == 3 and kw == 3:
            # stride 2 across: split the padded input columns by parity (polyphase) once, so every
            # tap of an output row is a contiguous slice; the 9 taps fuse into one vectorized loop
            Wq = (Wp + 1) // 2
            xe = np.zeros(Hp * Wq, dtype=np.float32)
            xd = np.zeros(Hp * Wq, dtype=np.float32)
            for iy in range(H):
                src = x[bi, ci, iy]
                rowq = (iy + ph) * Wq
                for ix in range(W):
                    cpos = ix + pw
                    if cpos % 2 == 0:
                        xe[rowq + cpos // 2] = src[ix]
                    else:
                        xd[rowq + cpos // 2] = src[ix]
            for oy in range(Ho):
                yr = y[bi, o, oy]
                for q in range(Wo):
                    yr[q] = np.float32(0.0)
                for ky in range(3):
                    rbase = (oy * sh + ky * dh) * Wq
                    c0 = 0
                    c1 = dw
                    c2 = 2 * dw
                    p0 = xe if c0 % 2 == 0 else xd
                    p1 = xe if c1 % 2 == 0 else xd
                    p2 = xe if c2 % 2 == 0 else xd
                    s0 = p0[rbase + c0 // 2:rbase + c0 // 2 + Wo]
                    s1 = p1[rbase + c1 // 2:rbase + c1 // 2 + Wo]
                    s2 = p2[rbase + c2 // 2:rbase + c2 // 2 + Wo]
                    w0 = wo[ky * 3]
                    w1 = wo[ky * 3 + 1]
                    w2 = wo[ky * 3 + 2]
                    for q in range(Wo):
                        yr[q] += w0 * s0[q] + w1 * s1[q] + w2 * s2[q]
            plane = y[bi, o].reshape(Ho * Wo)
            if nr != 0:
                epilogue_tile(plane, bv, res[bi, o].reshape(Ho * Wo), act, lo, hi)
            else:
                epilogue_tile(plane, bv, plane[0:0], act, lo, hi)
            continue
        for oy in range(Ho):
            yr = y[bi, o, oy]
            for ox in range(Wo):
                yr[ox] = np.float32(0.0)
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                if iy < 0 or iy >= H:
                    continue
                _dw_row(x[bi, ci, iy], yr, wo, ky, kw, sw, pw, dw, W, Wo, ra, rb)
        plane = y[bi, o].reshape(Ho * Wo)
        if nr != 0:
            epilogue_tile(plane, bv, res[bi, o].reshape(Ho * Wo), act, lo, hi)
        else:
            epilogue_tile(plane, bv, plane[0:0], act, lo, hi)


@jit(inline="always")
def _nanmax(a, b):
    """max that propagates NaN from either side (torch's max pooling); compare + select, vectorizes."""
    return a if (a >= b or a != a) else b


@pjit
def maxpool2d(x, y, kh, kw, sh, sw, ph, pw, dh, dw):
    """y[b,c,oy,ox] = max over the window's in-range taps (padding never wins; NaN propagates).
    Per (image, channel) plane, per output row: the max over the window's in-range input rows into a
    -inf-padded row buffer (contiguous, vectorized), then the kw horizontal taps (strided)."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    Ho = y.shape[2]
    Wo = y.shape[3]
    Wb = max((Wo - 1) * sw + (kw - 1) * dw + 1, W + pw)
    for t in prange(B * C):
        bi = t // C
        c = t - bi * C
        vb = np.full(Wb, -np.inf, dtype=np.float32)
        vm = vb[pw:pw + W]
        for oy in range(Ho):
            first = True
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                if iy < 0 or iy >= H:
                    continue
                src = x[bi, c, iy]
                if first:
                    for q in range(W):
                        vm[q] = src[q]
                    first = False
                else:
                    for q in range(W):
                        vm[q] = _nanmax(vm[q], src[q])
            yr = y[bi, c, oy]
            if first:  # no input row in the window (cannot happen with torch's shape rules)
                for ox in range(Wo):
                    yr[ox] = -np.inf
                continue
            if sw == 2 and kw == 3 and dw == 1:
                for ox in range(Wo):
                    q = ox * 2
                    yr[ox] = _nanmax(_nanmax(vb[q], vb[q + 1]), vb[q + 2])
            else:
                for ox in range(Wo):
                    m = vb[ox * sw]
                    for kx in range(1, kw):
                        m = _nanmax(m, vb[ox * sw + kx * dw])
                    yr[ox] = m


@pjit
def avgpool2d(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    """torch avg_pool2d semantics (ceil_mode handled by the caller's Ho/Wo); divisor 0 = none."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    Ho = y.shape[2]
    Wo = y.shape[3]
    for t in prange(B * C):
        bi = t // C
        c = t - bi * C
        for oy in range(Ho):
            h0 = oy * sh - ph
            h1 = min(h0 + kh, H + ph)
            hp = h1 - h0
            h0 = max(h0, 0)
            h1 = min(h1, H)
            for ox in range(Wo):
                w0 = ox * sw - pw
                w1 = min(w0 + kw, W + pw)
                pool = hp * (w1 - w0)
                w0 = max(w0, 0)
                w1 = min(w1, W)
                s = np.float32(0.0)
                for iy in range(h0, h1):
                    src = x[bi, c, iy]
                    for ix in range(w0, w1):
                        s += src[ix]
                if divisor > 0:
                    dv = divisor
                elif count_include_pad:
                    dv = pool
                else:
                    dv = (h1 - h0) * (w1 - w0)
                y[bi, c, oy, ox] = s / np.float32(dv) if dv > 0 else np.float32(0.0)


@pjit
def global_avgpool(x, y):
    """y[b, c] = mean(x[b, c, :]) for x [B, C, HW] (float64-free float32 sum, pairwise by 8)."""
    B = x.shape[0]
    C = x.shape[1]
    n = x.shape[2]
    for t in prange(B * C):
        bi = t // C
        c = t - bi * C
        src = x[bi, c]
        s = np.float32(0.0)
        for i in range(n):
            s += src[i]
        y[bi, c] = s / np.float32(n) if n > 0 else np.float32(0.0)


# ---------------------------------------------------------------------------------------
# Direct sparse convolution for stride 1 (any kernel size, padding, dilation), no im2col.
#
# The input is copied once into a zero-padded, flattened buffer ``xf`` [C * L] (one padded
# plane of Hp x Wp per channel, L >= Hp*Wp + (kw-1)*dw). On the "wide" output grid of
# Ho x Wp positions p = oy*Wp + ox', weight column (c, ky, kx) reads xf[roff[col] + p] with
# roff[col] = c*L + ky*dh*Wp + kx*dw: a contiguous row, exactly like a row of im2col's matrix,
# so the CSR / BSR register-blocked micro-kernels run on it unchanged (N = Ho*Wp, which is
# (W+2p)/W times the real N, +4% for 3x3 on 56x56). Columns ox' >= Wo are garbage and are
# dropped by ``crop_epilogue``, which also applies bias / residual / activation.
# Memory moved: the padded input (C*Hp*Wp) instead of im2col's C*kh*kw*Ho*Wo (9x for 3x3).


def shifted_geometry(C, H, W, kh, kw, ph, pw, dh, dw):
    """-> (Hp, Wp, L, Ho, Wo, Nw): padded plane, per-channel stride L (multiple of 16), output
    size, and wide-grid width Nw = Ho*Wp. Stride 1 only."""
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = Hp - dh * (kh - 1), Wp - dw * (kw - 1)
    L = Hp * Wp + (kw - 1) * dw + 64
    L = (L + 15) // 16 * 16
    return Hp, Wp, L, Ho, Wo, Ho * Wp


@pjit
def shift_pack(x, ph, pw, L, xf):
    """xf[c*L + (iy+ph)*Wp + ix+pw] = x[c, iy, ix], zeros elsewhere (x [C, H, W], xf [C*L])."""
    C = x.shape[0]
    H = x.shape[1]
    W = x.shape[2]
    Wp = W + 2 * pw
    for c in prange(C):
        plane = xf[c * L:(c + 1) * L]
        for t in range(L):
            plane[t] = np.float32(0.0)
        for iy in range(H):
            dst = plane[(iy + ph) * Wp + pw:(iy + ph) * Wp + pw + W]
            src = x[c, iy]
            for ix in range(W):
                dst[ix] = src[ix]


@jit
def row_offsets(C, kh, kw, dh, dw, Wp, L):
    """roff[(c*kh+ky)*kw+kx] = c*L + ky*dh*Wp + kx*dw (int64 [C*kh*kw])."""
    roff = np.empty(C * kh * kw, dtype=np.int64)
    for c in range(C):
        for ky in range(kh):
            for kx in range(kw):
                roff[(c * kh + ky) * kw + kx] = c * L + ky * dh * Wp + kx * dw
    return roff


@jit
def _mks4(indices, data, k0, k1, xf, roff, yr, j):
    """yr[j:j+4VW] = sum_k data[k] * xf[roff[indices[k]] + j : +4VW]; 4 vectors x 2 chains."""
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    b0 = vzero(); b1 = vzero(); b2 = vzero(); b3 = vzero()
    k = k0
    while k + 2 <= k1:
        o = roff[indices[k]] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        o = roff[indices[k + 1]] + j
        w = vbcast(data[k + 1])
        b0 = vfma(w, vload(xf, o), b0)
        b1 = vfma(w, vload(xf, o + VW), b1)
        b2 = vfma(w, vload(xf, o + 2 * VW), b2)
        b3 = vfma(w, vload(xf, o + 3 * VW), b3)
        k += 2
    if k < k1:
        o = roff[indices[k]] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
    vstore(yr, j, vadd(a0, b0))
    vstore(yr, j + VW, vadd(a1, b1))
    vstore(yr, j + 2 * VW, vadd(a2, b2))
    vstore(yr, j + 3 * VW, vadd(a3, b3))


@pjit
def csr_conv_s1(indptr, indices, data, xf, roff, yw):
    """Wide output yw [O, Nw] (Nw = Ho*Wp) of a stride-1 conv with CSR weight [O, C*kh*kw] on the
    shifted input; (N chunk, row) pairs in parallel so a chunk of the input stays in L2."""
    nout = yw.shape[0]
    n = yw.shape[1]
    n4 = (n // (4 * VW)) * (4 * VW)
    n1 = (n // VW) * VW
    nc = 512 if n > 1024 else n4 if n4 > 0 else 4 * VW
    nch = max(1, (n + nc - 1) // nc)
    for t in prange(nch * nout):
        ch = t // nout
        i = t - ch * nout
        jlo = ch * nc
        jhi = min(n, jlo + nc)
        k0 = indptr[i]
        k1 = indptr[i + 1]
        yr = yw[i]
        for j in range(jlo, min(jhi, n4), 4 * VW):
            _mks4(indices, data, k0, k1, xf, roff, yr, j)
        if jhi == n:
            for j in range(n4, n1, VW):
                a0 = vzero()
                a1 = vzero()
                k = k0
                while k + 2 <= k1:
                    a0 = vfma(vbcast(data[k]), vload(xf, roff[indices[k]] + j), a0)
                    a1 = vfma(vbcast(data[k + 1]), vload(xf, roff[indices[k + 1]] + j), a1)
                    k += 2
                if k < k1:
                    a0 = vfma(vbcast(data[k]), vload(xf, roff[indices[k]] + j), a0)
                vstore(yr, j, vadd(a0, a1))
            for j in range(n1, n):
                s = np.float32(0.0)
                for k in range(k0, k1):
                    s += data[k] * xf[roff[indices[k]] + j]
                yr[j] = s


@jit(inline="always")
def _mks8(indices, d2, k0, k1, base, xf, roff, yw, i0, rows, j):
    """8 rows (block rows base..base+7, r x 1 blocks) x 2 vectors at column j of the shifted input."""
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero(); a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    b0 = vzero(); b1 = vzero(); b2 = vzero(); b3 = vzero(); b4 = vzero(); b5 = vzero(); b6 = vzero(); b7 = vzero()
    for k in range(k0, k1):
        o = roff[indices[k]] + j
        x0 = vload(xf, o)
        x1 = vload(xf, o + VW)
        dk = d2[k, base:base + 8]
        w = vbcast(dk[0])
        a0 = vfma(w, x0, a0)
        b0 = vfma(w, x1, b0)
        w = vbcast(dk[1])
        a1 = vfma(w, x0, a1)
        b1 = vfma(w, x1, b1)
        w = vbcast(dk[2])
        a2 = vfma(w, x0, a2)
        b2 = vfma(w, x1, b2)
        w = vbcast(dk[3])
        a3 = vfma(w, x0, a3)
        b3 = vfma(w, x1, b3)
        w = vbcast(dk[4])
        a4 = vfma(w, x0, a4)
        b4 = vfma(w, x1, b4)
        w = vbcast(dk[5])
        a5 = vfma(w, x0, a5)
        b5 = vfma(w, x1, b5)
        w = vbcast(dk[6])
        a6 = vfma(w, x0, a6)
        b6 = vfma(w, x1, b6)
        w = vbcast(dk[7])
        a7 = vfma(w, x0, a7)
        b7 = vfma(w, x1, b7)
    if 0 < rows:
        yr = yw[i0 + 0]
        vstore(yr, j, a0)
        vstore(yr, j + VW, b0)
    if 1 < rows:
        yr = yw[i0 + 1]
        vstore(yr, j, a1)
        vstore(yr, j + VW, b1)
    if 2 < rows:
        yr = yw[i0 + 2]
        vstore(yr, j, a2)
        vstore(yr, j + VW, b2)
    if 3 < rows:
        yr = yw[i0 + 3]
        vstore(yr, j, a3)
        vstore(yr, j + VW, b3)
    if 4 < rows:
        yr = yw[i0 + 4]
        vstore(yr, j, a4)
        vstore(yr, j + VW, b4)
    if 5 < rows:
        yr = yw[i0 + 5]
        vstore(yr, j, a5)
        vstore(yr, j + VW, b5)
    if 6 < rows:
        yr = yw[i0 + 6]
        vstore(yr, j, a6)
        vstore(yr, j + VW, b6)
    if 7 < rows:
        yr = yw[i0 + 7]
        vstore(yr, j, a7)
        vstore(yr, j + VW, b7)


@pjit
def bsr_conv_s1(indptr, indices, d2, r, xf, roff, yw):
    """As csr_conv_s1 for BSR r x 1 blocks (r a multiple of 8), d2 = data.reshape(nblk, r)."""
    nout = yw.shape[0]
    n = yw.shape[1]
    JT = 2 * VW
    nv = (n // JT) * JT
    nbr = indptr.shape[0] - 1
    for br in prange(nbr):
        k0 = indptr[br]
        k1 = indptr[br + 1]
        i0 = br * r
        rows = min(r, nout - i0)
        for j in range(0, nv, JT):
            for g in range(0, rows, 8):
                _mks8(indices, d2, k0, k1, g, xf, roff, yw, i0 + g, rows - g, j)
        for ii in range(rows):
            yr = yw[i0 + ii]
            for j in range(nv, n):
                s = np.float32(0.0)
                for k in range(k0, k1):
                    s += d2[k, ii] * xf[roff[indices[k]] + j]
                yr[j] = s


@pjit
def crop_epilogue(yw, Wp, y, bias, res, act, lo, hi):
    """y[o, oy, :] = act(yw[o, oy*Wp : oy*Wp+Wo] + bias[o] + res[o, oy]); y [O, Ho, Wo], res same or (0,0,0)."""
    O = y.shape[0]
    Ho = y.shape[1]
    Wo = y.shape[2]
    nb = bias.shape[0]
    nr = res.shape[0]
    for o in prange(O):
        b = bias[o] if nb != 0 else np.float32(0.0)
        for oy in range(Ho):
            src = yw[o, oy * Wp:oy * Wp + Wo]
            dst = y[o, oy]
            for t in range(Wo):
                dst[t] = src[t]
            if nr != 0:
                epilogue_tile(dst, b, res[o, oy], act, lo, hi)
            else:
                epilogue_tile(dst, b, dst[0:0], act, lo, hi)


EMPTY3 = np.zeros((0, 0, 0), dtype=np.float32)


def sparse_conv_s1(kind, packed, x, y, kh, kw, padding=(0, 0), dilation=(1, 1), bias=None, act=0, lo=0.0,
                   hi=0.0, residual=None, work=None):
    """One image, stride 1: y [O, Ho, Wo] = act(conv(x [C, H, W]) + bias + residual) without im2col.
    kind "csr": packed = (indptr, indices, data) of the [O, C*kh*kw] weight (csr row's prepare);
    kind "bsr": packed = the bsr row's prepare output, blocks r x 1 with r % 8 == 0.
    ``work``: optional (xf float32 [C*L], yw float32 [O, Ho*Wp]) scratch from ``shifted_geometry``."""
    C, H, W = x.shape
    ph, pw = padding
    dh, dw = dilation
    Hp, Wp, L, Ho, Wo, Nw = shifted_geometry(C, H, W, kh, kw, ph, pw, dh, dw)
    O = y.shape[0]
    if work is None:
        work = (np.empty(C * L, np.float32), np.empty((O, Nw), np.float32))
    xf, yw = work
    shift_pack(x, ph, pw, L, xf)
    roff = row_offsets(C, kh, kw, dh, dw, Wp, L)
    if kind == "csr":
        csr_conv_s1(packed[0], packed[1], packed[2], xf, roff, yw)
    elif kind == "bsr" and packed[4] == 1 and packed[3] % 8 == 0:
        bsr_conv_s1(packed[0], packed[1], packed[2], packed[3], xf, roff, yw)
    else:
        raise ValueError(f"sparse_conv_s1: needs csr or bsr r x 1 with r % 8 == 0, got {kind}")
    crop_epilogue(yw, Wp, y, EMPTY1 if bias is None else bias, EMPTY3 if residual is None else residual,
                  int(act), float(lo), float(hi))



# ---------------------------------------------------------------------------------------
# Batched direct sparse convolution (any stride), the whole batch in one kernel call.
#
# The batch is packed channel-major into ``xf``: per input channel (and, for stride s > 1, per
# phase (ry, rx) of the padded input, i.e. the sub-grid of padded rows = ry mod sh and columns
# = rx mod sw), one flat plane of length L holding the B images one after the other. Output
# position p = b*IS + oy*RS + ox (IS: image stride, RS: row stride of the plane) and weight
# column (c, ky, kx) read ``xf[roff[col] + p]``, a contiguous row, so csr_conv_kpanel / bsr_conv_s1
# run on it with N = Npad (the position count rounded up to whole vector tiles: no
# scalar tails). ``crop_batch`` keeps the valid positions (oy < Ho, ox < Wo) and applies
# bias / residual / activation into NCHW.
#
# Layouts (``batch_geometry``):
# * "shared" (stride 1, ph <= dh*(kh-1), pw <= dw*(kw-1)): rows of RS = W + pw, images of S = H + ph
#   rows; the pw zero columns left of a row are also the right padding of the row before, the ph
#   zero rows above an image also the bottom padding of the image before (IS = S*RS). Computed
#   positions per image (H+ph)*(W+pw): 1.06x the real outputs at 32x32, 1.56x at 4x4 (3x3, pad 1).
# * "phase" (otherwise): each phase plane holds, per image, Hq x Wq = ceil(Hp/sh) x ceil(Wp/sw)
#   padded positions; tap (ky, kx) reads phase ((ky*dh) % sh, (kx*dw) % sw) shifted by
#   ((ky*dh)//sh, (kx*dw)//sw). RS = Wq, IS = Hq*Wq. Only phases some tap reads get a plane
#   (``phase_map``: a 1x1 stride-2 conv packs one of four).

def batch_geometry(B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, tile=2 * VW, inner=False):
    """-> (shared, P, RS, IS, L, Npad, size, Ho, Wo): P planes per channel, row / image strides,
    plane stride L, padded position count Npad (multiple of ``tile``: VW for csr_conv_kpanel, 2*VW for
    bsr_conv_s1), xf length ``size``. ``inner`` (where the shared layout applies): the batch-innermost
    layout: shared == 2 (shared padding columns, position (oy*(W+pw) + ox)*B + b) or 3 (phase planes,
    position (u*Wq + v)*B + b): no padding rows between images."""
    Ho = conv_out_size(H, kh, sh, ph, dh)
    Wo = conv_out_size(W, kw, sw, pw, dw)
    shared = sh == 1 and sw == 1 and ph <= dh * (kh - 1) and pw <= dw * (kw - 1)
    if shared and inner:
        RSc = W + pw
        Q = (H + 2 * ph + 1) * RSc + (kw - 1) * dw
        L = -(-(Q * B) // 16) * 16
        Npad = -(-(Ho * RSc * B) // tile) * tile
        shift = ((kh - 1) * dh * RSc + (kw - 1) * dw) * B
        return 2, 1, RSc * B, 1, L, Npad, C * L + shift + Npad + 16, Ho, Wo
    if inner:  # phase planes, batch innermost: position (u*Wq + v)*B + b
        P, Wq = len(phase_map(kh, kw, sh, sw, dh, dw)[1]), -(-(W + 2 * pw) // sw)
        Hq = -(-(H + 2 * ph) // sh)
        sx = (kw - 1) * dw // sw
        L = -(-(((Hq + 1) * Wq + sx + 1) * B) // 16) * 16
        Npad = -(-(Ho * Wq * B) // tile) * tile
        shift = (((kh - 1) * dh // sh) * Wq + sx) * B
        return 3, P, Wq * B, 1, L, Npad, C * P * L + shift + Npad + 16, Ho, Wo
    if shared:
        P, RS = 1, W + pw
        IS = (H + ph) * RS
        plane = (B * (H + ph) + ph + 1) * RS
        shift = (kh - 1) * dh * RS + (kw - 1) * dw
    else:
        P, RS = len(phase_map(kh, kw, sh, sw, dh, dw)[1]), -(-(W + 2 * pw) // sw)
        Hq = -(-(H + 2 * ph) // sh)
        IS = Hq * RS
        plane = B * IS
        shift = ((kh - 1) * dh // sh) * RS + (kw - 1) * dw // sw
    npos = B * IS
    Npad = -(-npos // tile) * tile
    L = -(-plane // 16) * 16
    size = C * P * L + shift + Npad + 16
    return shared, P, RS, IS, L, Npad, size, Ho, Wo


def phase_map(kh, kw, sh, sw, dh, dw):
    """-> (pidx int64 [sh*sw]: plane index of phase (ry, rx) at ry*sw + rx, or -1 when no tap reads it;
    list of the used phases in plane order). A 1x1 stride-2 conv reads one phase of four."""
    used = sorted({((ky * dh) % sh, (kx * dw) % sw) for ky in range(kh) for kx in range(kw)})
    pidx = np.full(sh * sw, -1, dtype=np.int64)
    for i, (ry, rx) in enumerate(used):
        pidx[ry * sw + rx] = i
    return pidx, used


def geo_cs(geo, B):
    """Column stride of the positions in a ``batch_geometry`` layout: B for the batch-innermost one, else 1."""
    return B if geo[0] >= 2 else 1


def batch_roff(C, kh, kw, sh, sw, dh, dw, shared, RS, L, cs=1):
    """roff[(c*kh+ky)*kw+kx] for the layout of ``batch_geometry`` (int64 [C*kh*kw]); ``cs`` = ``geo_cs``."""
    roff = np.empty(C * kh * kw, dtype=np.int64)
    pidx, used = phase_map(kh, kw, sh, sw, dh, dw)
    P = len(used)
    for c in range(C):
        for ky in range(kh):
            for kx in range(kw):
                if shared in (1, 2):
                    v = c * L + ky * dh * RS + kx * dw * cs
                else:
                    pl = int(pidx[((ky * dh) % sh) * sw + (kx * dw) % sw])
                    v = (c * P + pl) * L + (ky * dh // sh) * RS + ((kx * dw) // sw) * cs
                roff[(c * kh + ky) * kw + kx] = v
    return roff


@pjit
def pack_shared(x, ph, pw, L, xf):
    """Shared-padding layout: xf[c*L + (b*(H+ph) + ph + iy)*(W+pw) + pw + ix] = x[b, c, iy, ix], zeros
    elsewhere (x [B, C, H, W]; xf as sized by batch_geometry). (image, channel) pairs in parallel."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    RS = W + pw
    S = H + ph
    n = xf.shape[0]
    for t in prange(B * C):
        b = t // C
        c = t - b * C
        base = c * L + b * S * RS
        blk = xf[base:base + S * RS]
        for q in range(ph * RS):
            blk[q] = np.float32(0.0)
        for iy in range(H):
            r = blk[(ph + iy) * RS:(ph + iy + 1) * RS]
            for q in range(pw):
                r[q] = np.float32(0.0)
            d = r[pw:pw + W]
            src = x[b, c, iy]
            for q in range(W):
                d[q] = src[q]
        if b == B - 1:
            e = n if c == C - 1 else (c + 1) * L
            tail = xf[base + S * RS:e]
            for q in range(tail.shape[0]):
                tail[q] = np.float32(0.0)


@pjit
def pack_inner(x, ph, pw, L, xf):
    """Batch-innermost layout: xf[c*L + ((ph + iy)*(W+pw) + pw + ix)*B + b] = x[b, c, iy, ix], zeros
    elsewhere (x [B, C, H, W]; xf as sized by batch_geometry(..., inner=True)). Channels in parallel."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    RS = W + pw
    n = xf.shape[0]
    for c in prange(C):
        e = n if c == C - 1 else (c + 1) * L
        z = xf[c * L:e]
        for q in range(e - c * L):
            z[q] = np.float32(0.0)
        for iy in range(H):
            r = z[((ph + iy) * RS + pw) * B:((ph + iy) * RS + pw + W) * B]
            for b in range(B):
                src = x[b, c, iy]
                for ix in range(W):
                    r[ix * B + b] = src[ix]


@pjit
def pack_phase_inner(x, sh, sw, ph, pw, Wq, L, pidx, P, xf):
    """Phase layout, batch innermost: xf[(c*P + pidx[ry*sw+rx])*L + (u*Wq + v)*B + b] = xpad[b, c, u*sh+ry,
    v*sw+rx] for the used phases, zeros elsewhere (x [B, C, H, W]; xf as sized by batch_geometry(...,
    inner=True)). Channels in parallel."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    n = xf.shape[0]
    for c in prange(C):
        e = n if c == C - 1 else (c + 1) * P * L
        z = xf[c * P * L:e]
        for q in range(e - c * P * L):
            z[q] = np.float32(0.0)
        for iy in range(H):
            Y = iy + ph
            rbase = (Y // sh) * Wq
            for ix in range(W):
                X = ix + pw
                pl = pidx[(Y % sh) * sw + X % sw]
                if pl < 0:
                    continue
                d = z[pl * L + (rbase + X // sw) * B:]
                for b in range(B):
                    d[b] = x[b, c, iy, ix]


@pjit
def pack_phase(x, sh, sw, ph, pw, Hq, Wq, L, pidx, P, xf):
    """Phase layout: xf[(c*P + pidx[ry*sw+rx])*L + b*Hq*Wq + u*Wq + v] = xpad[b, c, u*sh+ry, v*sw+rx]
    (xpad: x zero-padded by ph / pw) for the used phases (pidx >= 0), zeros elsewhere in each plane.
    (image, channel) pairs in parallel: the image's part of each plane zeroed in one pass, then every
    input row scattered once into its row of each column phase (3x3 s2, 8x64x32x32: 0.24 ms, was
    0.30 row by row per phase)."""
    B = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    IS = Hq * Wq
    n = xf.shape[0]
    for t in prange(B * C):
        b = t // C
        c = t - b * C
        for pl in range(P):
            base = (c * P + pl) * L + b * IS
            e = base + IS
            if b == B - 1:
                e = n if (c == C - 1 and pl == P - 1) else (c * P + pl + 1) * L
            z = xf[base:e]
            for q in range(e - base):
                z[q] = np.float32(0.0)
        for iy in range(H):
            Y = iy + ph
            ry = Y % sh
            u = Y // sh
            src = x[b, c, iy]
            for rx in range(sw):
                pl = pidx[ry * sw + rx]
                if pl < 0:
                    continue
                xo = rx - pw
                va = 0 if xo >= 0 else (-xo + sw - 1) // sw
                vb = 0 if W - 1 - xo < 0 else (W - 1 - xo) // sw + 1
                vb = min(vb, Wq)
                va = min(va, vb)
                r0 = (c * P + pl) * L + b * IS + u * Wq
                d = xf[r0 + va:r0 + vb]
                if sw == 2:
                    s = src[2 * va + xo:]
                    for q in range(vb - va):
                        d[q] = s[2 * q]
                else:
                    for q in range(vb - va):
                        d[q] = src[(va + q) * sw + xo]


@jit(inline="always")
def _mkoff4(koff, data, k0, k1, xf, yr, j):
    """yr[j:j+4VW] = sum_k data[k] * xf[koff[k] + j : +4VW] (4 vectors x 2 chains)."""
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    b0 = vzero(); b1 = vzero(); b2 = vzero(); b3 = vzero()
    k = k0
    while k + 2 <= k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        o = koff[k + 1] + j
        w = vbcast(data[k + 1])
        b0 = vfma(w, vload(xf, o), b0)
        b1 = vfma(w, vload(xf, o + VW), b1)
        b2 = vfma(w, vload(xf, o + 2 * VW), b2)
        b3 = vfma(w, vload(xf, o + 3 * VW), b3)
        k += 2
    if k < k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
    vstore(yr, j, vadd(a0, b0))
    vstore(yr, j + VW, vadd(a1, b1))
    vstore(yr, j + 2 * VW, vadd(a2, b2))
    vstore(yr, j + 3 * VW, vadd(a3, b3))


@jit(inline="always")
def _mkoff1(koff, data, k0, k1, xf, yr, j):
    """yr[j:j+VW] = sum_k data[k] * xf[koff[k] + j : +VW] (4 chains)."""
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    k = k0
    while k + 4 <= k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
        a1 = vfma(vbcast(data[k + 1]), vload(xf, koff[k + 1] + j), a1)
        a2 = vfma(vbcast(data[k + 2]), vload(xf, koff[k + 2] + j), a2)
        a3 = vfma(vbcast(data[k + 3]), vload(xf, koff[k + 3] + j), a3)
        k += 4
    while k < k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
        k += 1
    vstore(yr, j, vadd(vadd(a0, a1), vadd(a2, a3)))


@jit(inline="always")
def _mkoffa16(koff, data, k0, k1, xf, yr, j, acc):
    """``_mkoffa16`` (nv = 16 vectors): yr[j:j+16*VW] (+)= sum_k data[k] * xf[koff[k] + j : ...]
    (accumulators started from yr when acc). One function per width, so a call site inlines one tile."""
    if acc:
        a0 = vload(yr, j + 0 * VW)
        a1 = vload(yr, j + 1 * VW)
        a2 = vload(yr, j + 2 * VW)
        a3 = vload(yr, j + 3 * VW)
        a4 = vload(yr, j + 4 * VW)
        a5 = vload(yr, j + 5 * VW)
        a6 = vload(yr, j + 6 * VW)
        a7 = vload(yr, j + 7 * VW)
        a8 = vload(yr, j + 8 * VW)
        a9 = vload(yr, j + 9 * VW)
        a10 = vload(yr, j + 10 * VW)
        a11 = vload(yr, j + 11 * VW)
        a12 = vload(yr, j + 12 * VW)
        a13 = vload(yr, j + 13 * VW)
        a14 = vload(yr, j + 14 * VW)
        a15 = vload(yr, j + 15 * VW)
    else:
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        a4 = vzero()
        a5 = vzero()
        a6 = vzero()
        a7 = vzero()
        a8 = vzero()
        a9 = vzero()
        a10 = vzero()
        a11 = vzero()
        a12 = vzero()
        a13 = vzero()
        a14 = vzero()
        a15 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o + 0 * VW), a0)
        a1 = vfma(w, vload(xf, o + 1 * VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        a4 = vfma(w, vload(xf, o + 4 * VW), a4)
        a5 = vfma(w, vload(xf, o + 5 * VW), a5)
        a6 = vfma(w, vload(xf, o + 6 * VW), a6)
        a7 = vfma(w, vload(xf, o + 7 * VW), a7)
        a8 = vfma(w, vload(xf, o + 8 * VW), a8)
        a9 = vfma(w, vload(xf, o + 9 * VW), a9)
        a10 = vfma(w, vload(xf, o + 10 * VW), a10)
        a11 = vfma(w, vload(xf, o + 11 * VW), a11)
        a12 = vfma(w, vload(xf, o + 12 * VW), a12)
        a13 = vfma(w, vload(xf, o + 13 * VW), a13)
        a14 = vfma(w, vload(xf, o + 14 * VW), a14)
        a15 = vfma(w, vload(xf, o + 15 * VW), a15)
    vstore(yr, j + 0 * VW, a0)
    vstore(yr, j + 1 * VW, a1)
    vstore(yr, j + 2 * VW, a2)
    vstore(yr, j + 3 * VW, a3)
    vstore(yr, j + 4 * VW, a4)
    vstore(yr, j + 5 * VW, a5)
    vstore(yr, j + 6 * VW, a6)
    vstore(yr, j + 7 * VW, a7)
    vstore(yr, j + 8 * VW, a8)
    vstore(yr, j + 9 * VW, a9)
    vstore(yr, j + 10 * VW, a10)
    vstore(yr, j + 11 * VW, a11)
    vstore(yr, j + 12 * VW, a12)
    vstore(yr, j + 13 * VW, a13)
    vstore(yr, j + 14 * VW, a14)
    vstore(yr, j + 15 * VW, a15)


@jit(inline="always")
def _mkoffa8(koff, data, k0, k1, xf, yr, j, acc):
    """``_mkoffa8`` (nv = 8 vectors): yr[j:j+8*VW] (+)= sum_k data[k] * xf[koff[k] + j : ...]
    (accumulators started from yr when acc). One function per width, so a call site inlines one tile."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW); a2 = vload(yr, j + 2 * VW); a3 = vload(yr, j + 3 * VW)
        a4 = vload(yr, j + 4 * VW); a5 = vload(yr, j + 5 * VW); a6 = vload(yr, j + 6 * VW)
        a7 = vload(yr, j + 7 * VW)
    else:
        a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
        a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        a4 = vfma(w, vload(xf, o + 4 * VW), a4)
        a5 = vfma(w, vload(xf, o + 5 * VW), a5)
        a6 = vfma(w, vload(xf, o + 6 * VW), a6)
        a7 = vfma(w, vload(xf, o + 7 * VW), a7)
    vstore(yr, j, a0)
    vstore(yr, j + VW, a1)
    vstore(yr, j + 2 * VW, a2)
    vstore(yr, j + 3 * VW, a3)
    vstore(yr, j + 4 * VW, a4)
    vstore(yr, j + 5 * VW, a5)
    vstore(yr, j + 6 * VW, a6)
    vstore(yr, j + 7 * VW, a7)


@jit(inline="always")
def _mkoffa4(koff, data, k0, k1, xf, yr, j, acc):
    """``_mkoffa4`` (nv = 4 vectors): yr[j:j+4*VW] (+)= sum_k data[k] * xf[koff[k] + j : ...]
    (accumulators started from yr when acc). One function per width, so a call site inlines one tile."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW); a2 = vload(yr, j + 2 * VW); a3 = vload(yr, j + 3 * VW)
    else:
        a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
    vstore(yr, j, a0)
    vstore(yr, j + VW, a1)
    vstore(yr, j + 2 * VW, a2)
    vstore(yr, j + 3 * VW, a3)


@jit(inline="always")
def _mkoffa2(koff, data, k0, k1, xf, yr, j, acc):
    """``_mkoffa2`` (nv = 2 vectors): yr[j:j+2*VW] (+)= sum_k data[k] * xf[koff[k] + j : ...]
    (accumulators started from yr when acc). One function per width, so a call site inlines one tile."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW)
    else:
        a0 = vzero(); a1 = vzero()
    b0 = vzero(); b1 = vzero()
    k = k0
    while k + 2 <= k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        o = koff[k + 1] + j
        w = vbcast(data[k + 1])
        b0 = vfma(w, vload(xf, o), b0)
        b1 = vfma(w, vload(xf, o + VW), b1)
        k += 2
    if k < k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
    vstore(yr, j, vadd(a0, b0))
    vstore(yr, j + VW, vadd(a1, b1))


@jit(inline="always")
def _mkoffa1(koff, data, k0, k1, xf, yr, j, acc):
    """``_mkoffa1`` (nv = 1 vectors): yr[j:j+1*VW] (+)= sum_k data[k] * xf[koff[k] + j : ...]
    (accumulators started from yr when acc). One function per width, so a call site inlines one tile."""
    a0 = vload(yr, j) if acc else vzero()
    a1 = vzero()
    k = k0
    while k + 2 <= k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
        a1 = vfma(vbcast(data[k + 1]), vload(xf, koff[k + 1] + j), a1)
        k += 2
    if k < k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
    vstore(yr, j, vadd(a0, a1))


@jit(inline="always")
def _mkoffa_ep16(koff, data, k0, k1, xf, yr, j, acc, b, res, ri, mask, um, relu):
    """``_mkoffa16`` for a row's last K panel with the epilogue in registers before the one
    store: relu?((yr if acc) + sum_k data[k] * xf[koff[k] + j : ...] + b + res[j:]) masked by mask[j:]
    when ``um`` (``_epv``)."""
    if acc:
        a0 = vload(yr, j + 0 * VW)
        a1 = vload(yr, j + 1 * VW)
        a2 = vload(yr, j + 2 * VW)
        a3 = vload(yr, j + 3 * VW)
        a4 = vload(yr, j + 4 * VW)
        a5 = vload(yr, j + 5 * VW)
        a6 = vload(yr, j + 6 * VW)
        a7 = vload(yr, j + 7 * VW)
        a8 = vload(yr, j + 8 * VW)
        a9 = vload(yr, j + 9 * VW)
        a10 = vload(yr, j + 10 * VW)
        a11 = vload(yr, j + 11 * VW)
        a12 = vload(yr, j + 12 * VW)
        a13 = vload(yr, j + 13 * VW)
        a14 = vload(yr, j + 14 * VW)
        a15 = vload(yr, j + 15 * VW)
    else:
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        a4 = vzero()
        a5 = vzero()
        a6 = vzero()
        a7 = vzero()
        a8 = vzero()
        a9 = vzero()
        a10 = vzero()
        a11 = vzero()
        a12 = vzero()
        a13 = vzero()
        a14 = vzero()
        a15 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o + 0 * VW), a0)
        a1 = vfma(w, vload(xf, o + 1 * VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        a4 = vfma(w, vload(xf, o + 4 * VW), a4)
        a5 = vfma(w, vload(xf, o + 5 * VW), a5)
        a6 = vfma(w, vload(xf, o + 6 * VW), a6)
        a7 = vfma(w, vload(xf, o + 7 * VW), a7)
        a8 = vfma(w, vload(xf, o + 8 * VW), a8)
        a9 = vfma(w, vload(xf, o + 9 * VW), a9)
        a10 = vfma(w, vload(xf, o + 10 * VW), a10)
        a11 = vfma(w, vload(xf, o + 11 * VW), a11)
        a12 = vfma(w, vload(xf, o + 12 * VW), a12)
        a13 = vfma(w, vload(xf, o + 13 * VW), a13)
        a14 = vfma(w, vload(xf, o + 14 * VW), a14)
        a15 = vfma(w, vload(xf, o + 15 * VW), a15)
    vstore(yr, j + 0 * VW, _epv(a0, b, res, ri, mask, um, j + 0 * VW, relu))
    vstore(yr, j + 1 * VW, _epv(a1, b, res, ri, mask, um, j + 1 * VW, relu))
    vstore(yr, j + 2 * VW, _epv(a2, b, res, ri, mask, um, j + 2 * VW, relu))
    vstore(yr, j + 3 * VW, _epv(a3, b, res, ri, mask, um, j + 3 * VW, relu))
    vstore(yr, j + 4 * VW, _epv(a4, b, res, ri, mask, um, j + 4 * VW, relu))
    vstore(yr, j + 5 * VW, _epv(a5, b, res, ri, mask, um, j + 5 * VW, relu))
    vstore(yr, j + 6 * VW, _epv(a6, b, res, ri, mask, um, j + 6 * VW, relu))
    vstore(yr, j + 7 * VW, _epv(a7, b, res, ri, mask, um, j + 7 * VW, relu))
    vstore(yr, j + 8 * VW, _epv(a8, b, res, ri, mask, um, j + 8 * VW, relu))
    vstore(yr, j + 9 * VW, _epv(a9, b, res, ri, mask, um, j + 9 * VW, relu))
    vstore(yr, j + 10 * VW, _epv(a10, b, res, ri, mask, um, j + 10 * VW, relu))
    vstore(yr, j + 11 * VW, _epv(a11, b, res, ri, mask, um, j + 11 * VW, relu))
    vstore(yr, j + 12 * VW, _epv(a12, b, res, ri, mask, um, j + 12 * VW, relu))
    vstore(yr, j + 13 * VW, _epv(a13, b, res, ri, mask, um, j + 13 * VW, relu))
    vstore(yr, j + 14 * VW, _epv(a14, b, res, ri, mask, um, j + 14 * VW, relu))
    vstore(yr, j + 15 * VW, _epv(a15, b, res, ri, mask, um, j + 15 * VW, relu))


@jit(inline="always")
def _mkoffa_ep8(koff, data, k0, k1, xf, yr, j, acc, b, res, ri, mask, um, relu):
    """``_mkoffa8`` for a row's last K panel with the epilogue in registers before the one
    store: relu?((yr if acc) + sum_k data[k] * xf[koff[k] + j : ...] + b + res[j:]) masked by mask[j:]
    when ``um`` (``_epv``)."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW); a2 = vload(yr, j + 2 * VW); a3 = vload(yr, j + 3 * VW)
        a4 = vload(yr, j + 4 * VW); a5 = vload(yr, j + 5 * VW); a6 = vload(yr, j + 6 * VW)
        a7 = vload(yr, j + 7 * VW)
    else:
        a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
        a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
        a4 = vfma(w, vload(xf, o + 4 * VW), a4)
        a5 = vfma(w, vload(xf, o + 5 * VW), a5)
        a6 = vfma(w, vload(xf, o + 6 * VW), a6)
        a7 = vfma(w, vload(xf, o + 7 * VW), a7)
    vstore(yr, j, _epv(a0, b, res, ri, mask, um, j, relu))
    vstore(yr, j + VW, _epv(a1, b, res, ri, mask, um, j + VW, relu))
    vstore(yr, j + 2 * VW, _epv(a2, b, res, ri, mask, um, j + 2 * VW, relu))
    vstore(yr, j + 3 * VW, _epv(a3, b, res, ri, mask, um, j + 3 * VW, relu))
    vstore(yr, j + 4 * VW, _epv(a4, b, res, ri, mask, um, j + 4 * VW, relu))
    vstore(yr, j + 5 * VW, _epv(a5, b, res, ri, mask, um, j + 5 * VW, relu))
    vstore(yr, j + 6 * VW, _epv(a6, b, res, ri, mask, um, j + 6 * VW, relu))
    vstore(yr, j + 7 * VW, _epv(a7, b, res, ri, mask, um, j + 7 * VW, relu))


@jit(inline="always")
def _mkoffa_ep4(koff, data, k0, k1, xf, yr, j, acc, b, res, ri, mask, um, relu):
    """``_mkoffa4`` for a row's last K panel with the epilogue in registers before the one
    store: relu?((yr if acc) + sum_k data[k] * xf[koff[k] + j : ...] + b + res[j:]) masked by mask[j:]
    when ``um`` (``_epv``)."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW); a2 = vload(yr, j + 2 * VW); a3 = vload(yr, j + 3 * VW)
    else:
        a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    kk = koff[k0:k1]
    dd = data[k0:k1]
    for q in range(k1 - k0):
        o = kk[q] + j
        w = vbcast(dd[q])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        a2 = vfma(w, vload(xf, o + 2 * VW), a2)
        a3 = vfma(w, vload(xf, o + 3 * VW), a3)
    vstore(yr, j, _epv(a0, b, res, ri, mask, um, j, relu))
    vstore(yr, j + VW, _epv(a1, b, res, ri, mask, um, j + VW, relu))
    vstore(yr, j + 2 * VW, _epv(a2, b, res, ri, mask, um, j + 2 * VW, relu))
    vstore(yr, j + 3 * VW, _epv(a3, b, res, ri, mask, um, j + 3 * VW, relu))


@jit(inline="always")
def _mkoffa_ep2(koff, data, k0, k1, xf, yr, j, acc, b, res, ri, mask, um, relu):
    """``_mkoffa2`` for a row's last K panel with the epilogue in registers before the one
    store: relu?((yr if acc) + sum_k data[k] * xf[koff[k] + j : ...] + b + res[j:]) masked by mask[j:]
    when ``um`` (``_epv``)."""
    if acc:
        a0 = vload(yr, j); a1 = vload(yr, j + VW)
    else:
        a0 = vzero(); a1 = vzero()
    b0 = vzero(); b1 = vzero()
    k = k0
    while k + 2 <= k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
        o = koff[k + 1] + j
        w = vbcast(data[k + 1])
        b0 = vfma(w, vload(xf, o), b0)
        b1 = vfma(w, vload(xf, o + VW), b1)
        k += 2
    if k < k1:
        o = koff[k] + j
        w = vbcast(data[k])
        a0 = vfma(w, vload(xf, o), a0)
        a1 = vfma(w, vload(xf, o + VW), a1)
    vstore(yr, j, _epv(vadd(a0, b0), b, res, ri, mask, um, j, relu))
    vstore(yr, j + VW, _epv(vadd(a1, b1), b, res, ri, mask, um, j + VW, relu))


@jit(inline="always")
def _mkoffa_ep1(koff, data, k0, k1, xf, yr, j, acc, b, res, ri, mask, um, relu):
    """``_mkoffa1`` for a row's last K panel with the epilogue in registers before the one
    store: relu?((yr if acc) + sum_k data[k] * xf[koff[k] + j : ...] + b + res[j:]) masked by mask[j:]
    when ``um`` (``_epv``)."""
    a0 = vload(yr, j) if acc else vzero()
    a1 = vzero()
    k = k0
    while k + 2 <= k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
        a1 = vfma(vbcast(data[k + 1]), vload(xf, koff[k + 1] + j), a1)
        k += 2
    if k < k1:
        a0 = vfma(vbcast(data[k]), vload(xf, koff[k] + j), a0)
    vstore(yr, j, _epv(vadd(a0, a1), b, res, ri, mask, um, j, relu))


@pjit
def csr_conv_kpanel(sp, koff, data, xf, yw, nc, ngroups, cgroups=1):
    """yw[i, j] = sum_k data[k] * xf[koff[k] + j] over row i's weights (koff = roff[indices], int32),
    yw [O, Npad] with Npad a multiple of VW (no scalar tail), the reduction split into K panels
    (input-channel blocks small enough that a panel's chunk of the input stays in L1): sp [O, nb+1]
    int64 holds, per row, the first weight of each panel (sp[i, nb] = row end). ``ngroups`` row groups
    x ``cgroups`` groups of N chunks in parallel (one task per thread: chunk groups on wide grids, so
    each thread reads only its part of the input); per task: for each N chunk of ``nc``, for each
    panel, every row of the group accumulates its weights of that panel into yw (the first panel
    stores). 16 / 8 / 4 / 2 / 1-vector tiles (the 16-vector one: 16 FMAs per loaded weight, with
    KPANEL_NC = 256 one tile per row and chunk); the weight loops run 0-based over slices of koff / data
    (no negative-index fix-ups in the hot loop). Measured against the unpanelled kernel (N chunks, rows in parallel), 2 threads, batch 8,
    90%: 32x32x64 0.51 -> 0.48 ms, 16x16x128 0.65 -> 0.50, 8x8x256 0.88 -> 0.54, 4x4x512 1.06 -> 0.66
    (that one was L2-bound: every row streamed the whole 460 KB input)."""
    nout = yw.shape[0]
    n = yw.shape[1]
    nb = sp.shape[1] - 1
    gs = (nout + ngroups - 1) // ngroups
    nch = (n + nc - 1) // nc
    cs = (nch + cgroups - 1) // cgroups
    for t in prange(ngroups * cgroups):
        g = t // cgroups
        cg = t - g * cgroups
        r0 = g * gs
        r1 = min(nout, r0 + gs)
        for jlo in range(cg * cs * nc, min(n, (cg + 1) * cs * nc), nc):
            jhi = min(n, jlo + nc)
            for cb in range(nb):
                acc = cb > 0
                for i in range(r0, r1):
                    k0 = sp[i, cb]
                    k1 = sp[i, cb + 1]
                    if acc and k0 == k1:
                        continue
                    yr = yw[i]
                    j = jlo
                    while j + 16 * VW <= jhi:
                        _mkoffa16(koff, data, k0, k1, xf, yr, j, acc)
                        j += 16 * VW
                    while j + 8 * VW <= jhi:
                        _mkoffa8(koff, data, k0, k1, xf, yr, j, acc)
                        j += 8 * VW
                    while j + 4 * VW <= jhi:
                        _mkoffa4(koff, data, k0, k1, xf, yr, j, acc)
                        j += 4 * VW
                    if j + 2 * VW <= jhi:
                        _mkoffa2(koff, data, k0, k1, xf, yr, j, acc)
                        j += 2 * VW
                    while j + VW <= jhi:
                        _mkoffa1(koff, data, k0, k1, xf, yr, j, acc)
                        j += VW


@pjit
def csr_conv_kpanel_ep(sp, koff, data, xf, yw, yw2, n, nc, rbounds, cgroups, bias, res, mask, act, act2, lo, hi,
                       runs, rptr, zmap, xd, dstride):
    """csr_conv_kpanel over positions [0, n) with the fused epilogue applied per N chunk while it is in
    cache. Rows i < O1 (yw [O1, Ly], n <= Ly, n a multiple of VW): yw[i, j] = act(sum_k data[k] *
    xf[koff[k] + j] + bias[i] + res[i, j]), then 0 where mask[j] == 0, and yw[i, n:] = 0. Rows O1 <= i <
    O1 + O2 (yw2 [O2, Ly2 >= n], or shape (0, 0)): yw2[i - O1, j] = act2(... + bias[i]) (no residual, no
    mask): a second conv on the same input computed in the same pass (a 1x1 stride-s downsample as the
    center tap of a k x k stride-s conv). bias [O1 + O2] or length 0; res [O1, Lr >= n] or (0, 0); mask
    float32 [n] (1 = a real output position) or length 0. With yw a [O1, L] view of the next conv's
    packed input (at its padding shift), the masked positions are that layout's padding: the output is
    handed over without a crop / pack pass. Row groups: rows rbounds[g] .. rbounds[g+1] (int64
    [ngroups + 1], e.g. balanced by weights per row, ``row_bounds``) x ``cgroups`` groups of N chunks.
    Scatter (``scatter_runs``; rptr of length 0: none): each finished chunk c of row i < O1 is also
    stored, while in cache, run by run (runs[r] = (j0, d0, count, j step, d step), r in rptr[c] ..
    rptr[c+1]): xd[i*dstride + d0 + t*dstep] = yw[i, j0 + t*jstep]; then xd[i*dstride + zmap[:]] = 0 and
    xd[O1*dstride:] = 0: the output handed over in any packed layout (e.g. the phase planes of a
    stride-2 conv) with its padding zeroed. With act (act2) none or relu the epilogue runs in registers
    on each row's last K panel before its one store (``_mkoffa_ep16`` ... ``_mkoffa_ep1``; 1 thread, batch 8, 90%, bias + mask
    [+ residual]: 64ch 32x32 1.63 -> 1.51 ms [1.76 -> 1.59], 128ch 16x16 1.16 -> 1.14 [1.25 -> 1.18]);
    other activations take the per-chunk epilogue_tile pass."""
    o1 = yw.shape[0]
    ly = yw.shape[1]
    nbk = sp.shape[1] - 1
    nbias = bias.shape[0]
    nr = res.shape[0]
    nm = mask.shape[0]
    nd = rptr.shape[0]
    ngroups = rbounds.shape[0] - 1
    nch = (n + nc - 1) // nc
    cs = (nch + cgroups - 1) // cgroups
    fuse1 = act == ACT_NONE or act == ACT_RELU  # epilogue in registers on the last K panel
    fuse2 = act2 == ACT_NONE or act2 == ACT_RELU
    for t in prange(ngroups * cgroups):
        g = t // cgroups
        cg = t - g * cgroups
        r0 = rbounds[g]
        r1 = rbounds[g + 1]
        for jlo in range(cg * cs * nc, min(n, (cg + 1) * cs * nc), nc):
            jhi = min(n, jlo + nc)
            for cb in range(nbk):
                acc = cb > 0
                last = cb == nbk - 1
                for i in range(r0, r1):
                    k0 = sp[i, cb]
                    k1 = sp[i, cb + 1]
                    fuse = last and (fuse1 if i < o1 else fuse2)
                    if acc and k0 == k1 and not fuse:
                        continue
                    yr = yw[i] if i < o1 else yw2[i - o1]
                    j = jlo
                    if fuse:
                        bvec = vbcast(bias[i] if nbias != 0 else np.float32(0.0))
                        ri = i if (i < o1 and nr != 0) else -1
                        um = i < o1 and nm != 0
                        relu = (act if i < o1 else act2) == ACT_RELU
                        while j + 16 * VW <= jhi:
                            _mkoffa_ep16(koff, data, k0, k1, xf, yr, j, acc, bvec, res, ri, mask, um, relu)
                            j += 16 * VW
                        while j + 8 * VW <= jhi:
                            _mkoffa_ep8(koff, data, k0, k1, xf, yr, j, acc, bvec, res, ri, mask, um, relu)
                            j += 8 * VW
                        while j + 4 * VW <= jhi:
                            _mkoffa_ep4(koff, data, k0, k1, xf, yr, j, acc, bvec, res, ri, mask, um, relu)
                            j += 4 * VW
                        if j + 2 * VW <= jhi:
                            _mkoffa_ep2(koff, data, k0, k1, xf, yr, j, acc, bvec, res, ri, mask, um, relu)
                            j += 2 * VW
                        while j + VW <= jhi:
                            _mkoffa_ep1(koff, data, k0, k1, xf, yr, j, acc, bvec, res, ri, mask, um, relu)
                            j += VW
                        continue
                    while j + 16 * VW <= jhi:
                        _mkoffa16(koff, data, k0, k1, xf, yr, j, acc)
                        j += 16 * VW
                    while j + 8 * VW <= jhi:
                        _mkoffa8(koff, data, k0, k1, xf, yr, j, acc)
                        j += 8 * VW
                    while j + 4 * VW <= jhi:
                        _mkoffa4(koff, data, k0, k1, xf, yr, j, acc)
                        j += 4 * VW
                    if j + 2 * VW <= jhi:
                        _mkoffa2(koff, data, k0, k1, xf, yr, j, acc)
                        j += 2 * VW
                    while j + VW <= jhi:
                        _mkoffa1(koff, data, k0, k1, xf, yr, j, acc)
                        j += VW
            for i in range(r0, r1):
                bv = bias[i] if nbias != 0 else np.float32(0.0)
                if i >= o1:
                    if not fuse2:
                        seg = yw2[i - o1, jlo:jhi]
                        epilogue_tile(seg, bv, seg[0:0], act2, lo, hi)
                    continue
                seg = yw[i, jlo:jhi]
                if not fuse1:
                    if nr != 0:
                        epilogue_tile(seg, bv, res[i, jlo:jhi], act, lo, hi)
                    else:
                        epilogue_tile(seg, bv, seg[0:0], act, lo, hi)
                    if nm != 0:
                        mk = mask[jlo:jhi]
                        for q in range(jhi - jlo):
                            seg[q] = seg[q] if mk[q] != 0 else np.float32(0.0)
                if nd != 0:
                    xo = xd[i * dstride:(i + 1) * dstride]
                    ch = jlo // nc
                    for r in range(rptr[ch], rptr[ch + 1]):
                        s0 = runs[r, 0] - jlo
                        d0 = runs[r, 1]
                        cnt = runs[r, 2]
                        ss = runs[r, 3]
                        ds = runs[r, 4]
                        for q in range(cnt):
                            xo[d0 + q * ds] = seg[s0 + q * ss]
        if cg == 0:
            for i in range(r0, min(r1, o1)):
                tail = yw[i, n:ly]
                for q in range(ly - n):
                    tail[q] = np.float32(0.0)
                if nd != 0:
                    xo = xd[i * dstride:(i + 1) * dstride]
                    for q in range(zmap.shape[0]):
                        xo[zmap[q]] = np.float32(0.0)
        if t == 0 and nd != 0:
            xt = xd[o1 * dstride:]
            for q in range(xt.shape[0]):
                xt[q] = np.float32(0.0)


def scatter_runs(B, Ho, Wo, IS, RS, cs, n, nc, geo, kh, kw, sh, sw, ph, pw, dh, dw):
    """(runs int32 [nr, 5], rptr int32 [ceil(n/nc) + 1], zmap int32, dstride) for csr_conv_kpanel_ep's
    scatter: the output (b, oy, ox) at position b*IS + oy*RS + ox*cs goes where ``batch_pack`` puts input
    pixel (b, iy=oy, ix=ox) of a conv with layout ``geo`` (``batch_geometry`` of that conv with kernel /
    stride / padding / dilation as given: shared or phase planes, batch innermost or not), within one
    channel's dstride = P*L floats. Runs (j0, d0, count, j step, d step) follow image rows (cs == 1, one per
    destination column phase) or the batch (cs > 1), split at the N chunks of ``nc``; zmap: the channel's
    other offsets (its padding, zeroed)."""
    shared, P, RSd, ISd, L = geo[:5]
    csd = B if shared >= 2 else 1
    phase = not (shared is True or shared == 1 or shared == 2)
    pidx = phase_map(kh, kw, sh, sw, dh, dw)[0] if phase else None
    parts = []
    if cs == 1:  # along image rows: one run per (image, row, destination column phase)
        b, oy = (a.ravel() for a in np.meshgrid(np.arange(B), np.arange(Ho), indexing="ij"))
        for c in range(sw if phase else 1):
            ox0 = (c - pw) % sw if phase else 0
            step = sw if phase else 1
            cnt = max(0, -(-(Wo - ox0) // step))
            parts.append((b, oy, np.full(b.shape, ox0), np.full(b.shape, cnt), step, 1))
        along_b = False
    else:  # batch innermost: one run per (row, column) over the images
        oy, ox = (a.ravel() for a in np.meshgrid(np.arange(Ho), np.arange(Wo), indexing="ij"))
        parts.append((np.zeros_like(oy), oy, ox, np.full(oy.shape, B), 1, 0))
        along_b = True
    runs = []
    for b, oy, ox, cnt, step, _ in parts:
        Y, X = oy + ph, ox + pw
        if phase:
            pl = pidx[(Y % sh) * sw + X % sw]
            d0 = pl * L + b * ISd + (Y // sh) * RSd + (X // sw) * csd
        else:
            pl = np.zeros_like(Y)
            d0 = b * ISd + Y * RSd + X * csd
        s0 = b * IS + oy * RS + ox * cs
        if along_b:
            ss, ds = np.ones_like(s0), np.full(s0.shape, ISd)
        else:
            ss, ds = np.full(s0.shape, step * cs), np.full(s0.shape, csd)
        keep = (pl >= 0) & (cnt > 0)
        runs.append(np.stack([s0, d0, cnt, ss, ds], 1)[keep])
    r = np.concatenate(runs).astype(np.int64) if runs else np.zeros((0, 5), np.int64)
    # clip to the n computed positions, then split the runs crossing a chunk boundary
    last = r[:, 0] + (r[:, 2] - 1) * r[:, 3]
    over = last >= n
    r[over, 2] = np.maximum(0, -(-(n - r[over, 0]) // r[over, 3]))
    r = r[r[:, 2] > 0]
    out = []
    while len(r):
        first_ch = r[:, 0] // nc
        last = r[:, 0] + (r[:, 2] - 1) * r[:, 3]
        cross = last // nc != first_ch
        out.append(r[~cross])
        c = r[cross]
        k1 = -(-((first_ch[cross] + 1) * nc - c[:, 0]) // c[:, 3])
        head, tail = c.copy(), c.copy()
        head[:, 2] = k1
        tail[:, 0] += k1 * c[:, 3]
        tail[:, 1] += k1 * c[:, 4]
        tail[:, 2] -= k1
        out.append(head)
        r = tail
    r = np.concatenate(out) if out else np.zeros((0, 5), np.int64)
    r = r[np.argsort(r[:, 0] // nc, kind="stable")]
    nch = max(1, -(-n // nc))
    rptr = np.searchsorted(r[:, 0] // nc, np.arange(nch + 1), side="left").astype(np.int32)
    dstride = P * L
    hit = np.zeros(dstride, bool)
    for s0, d0, cnt, ss, ds in r:
        hit[d0:d0 + cnt * ds:ds] = True
    return r.astype(np.int32), rptr, np.flatnonzero(~hit).astype(np.int32), dstride


def row_bounds(indptr, ngroups, overhead=8):
    """int64 [ngroups + 1]: contiguous row groups of about equal cost (weights per row + ``overhead``)."""
    indptr = np.asarray(indptr, np.int64)
    O = indptr.shape[0] - 1
    cost = np.cumsum(np.diff(indptr) + overhead)
    tot = cost[-1] if O else 0
    b = np.searchsorted(cost, tot * np.arange(1, ngroups) / ngroups, side="left") + 1 if O else np.zeros(ngroups - 1)
    return np.concatenate([[0], np.minimum(b, O), [O]]).astype(np.int64)


def kpanel_splits(indptr, indices, bcols, K):
    """sp [O, nb+1] int64 for csr_conv_kpanel: per row, the first weight whose column is >= cb*bcols
    (columns sorted within a row), nb = ceil(K / bcols)."""
    indptr = np.asarray(indptr, np.int64)
    O = indptr.shape[0] - 1
    nb = max(1, -(-K // bcols))
    rows = np.repeat(np.arange(O, dtype=np.int64), np.diff(indptr))
    blk = np.asarray(indices, np.int64) // bcols
    cnt = np.bincount(rows * nb + blk, minlength=O * nb).reshape(O, nb)
    sp = np.empty((O, nb + 1), np.int64)
    sp[:, 0] = indptr[:-1]
    np.cumsum(cnt, axis=1, out=sp[:, 1:])
    sp[:, 1:] += indptr[:-1, None]
    return sp


@pjit
def csr_conv_plane(indptr, koff, data, xf, IS, RS, y, bias, res, act, lo, hi):
    """Fused per (image, output channel) plane: y[b, o, oy, ox] = act(sum_k data[k] * xf[koff[k] + b*IS +
    oy*RS + ox] + bias[o] + res[b, o, oy, ox]), the plane's positions computed into an L1-sized buffer
    and cropped from there (no [O, Npad] round trip through memory). For layers with few weights per
    output row and large outputs (stems), where the separate crop pass cost as much as the kernel."""
    B = y.shape[0]
    O = y.shape[1]
    Ho = y.shape[2]
    Wo = y.shape[3]
    nb = bias.shape[0]
    nr = res.shape[0]
    npos = (Ho - 1) * RS + Wo
    nv = (npos + VW - 1) // VW * VW
    for t in prange(B * O):
        b = t // O
        o = t - b * O
        yl = np.empty(nv, dtype=np.float32)
        k0 = indptr[o]
        k1 = indptr[o + 1]
        xb = xf[b * IS:]
        j = 0
        while j + 4 * VW <= nv:
            _mkoff4(koff, data, k0, k1, xb, yl, j)
            j += 4 * VW
        while j < nv:
            _mkoff1(koff, data, k0, k1, xb, yl, j)
            j += VW
        bv = bias[o] if nb != 0 else np.float32(0.0)
        plane = y[b, o].reshape(Ho * Wo)
        for oy in range(Ho):
            src = yl[oy * RS:oy * RS + Wo]
            dst = plane[oy * Wo:(oy + 1) * Wo]
            for q in range(Wo):
                dst[q] = src[q]
        if nr != 0:
            epilogue_tile(plane, bv, res[b, o].reshape(Ho * Wo), act, lo, hi)
        else:
            epilogue_tile(plane, bv, plane[0:0], act, lo, hi)


@pjit
def csr_conv_plane_pool(indptr, koff, data, xf, IS, RS, B, Ho, Wo, bias, act, lo, hi, kh, kw, sh, sw, ph, pw, dh, dw,
                        Hq, Wq, out, L, shift, QIS, QRS):
    """csr_conv_plane followed by max pooling, per (image, output channel) plane in L1, written into a
    packed shared-padding layout: conv plane c[oy, ox] = act(sum_k data[k] * xf[koff[k] + b*IS + oy*RS + ox]
    + bias[o]) (Ho x Wo), pooled (kernel kh x kw, stride, padding, dilation; padding never wins, NaN
    propagates) to Hq x Wq and stored at out[o*L + shift + b*QIS + qy*QRS + qx]; every other element of
    ``out`` (the layout's padding, each plane's tail, the buffer's end) is zeroed. out float32 1-D with
    len >= O*L. (The ResNet stem: conv + relu + 3x3 s2 pool without the full-size activation in memory.)"""
    O = indptr.shape[0] - 1
    nb = bias.shape[0]
    npos = (Ho - 1) * RS + Wo
    nv = (npos + VW - 1) // VW * VW
    Wb = max((Wq - 1) * sw + (kw - 1) * dw + 1, Wo + pw)
    n = out.shape[0]
    for t in prange(B * O):
        b = t // O
        o = t - b * O
        yl = np.empty(nv, dtype=np.float32)
        k0 = indptr[o]
        k1 = indptr[o + 1]
        xb = xf[b * IS:]
        j = 0
        while j + 4 * VW <= nv:
            _mkoff4(koff, data, k0, k1, xb, yl, j)
            j += 4 * VW
        while j < nv:
            _mkoff1(koff, data, k0, k1, xb, yl, j)
            j += VW
        bv = bias[o] if nb != 0 else np.float32(0.0)
        seg = yl[0:npos]
        epilogue_tile(seg, bv, seg[0:0], act, lo, hi)
        # this image's block of plane o (its padding rows / columns included) zeroed, then the pooled rows
        blk = out[o * L + b * QIS:o * L + (b + 1) * QIS]
        for q in range(QIS):
            blk[q] = np.float32(0.0)
        if b == B - 1:
            e = n if o == O - 1 else (o + 1) * L
            tl = out[o * L + B * QIS:e]
            for q in range(tl.shape[0]):
                tl[q] = np.float32(0.0)
        vb = np.full(Wb, -np.inf, dtype=np.float32)
        vm = vb[pw:pw + Wo]
        for qy in range(Hq):
            first = True
            for ky in range(kh):
                iy = qy * sh - ph + ky * dh
                if iy < 0 or iy >= Ho:
                    continue
                src = yl[iy * RS:iy * RS + Wo]
                if first:
                    for q in range(Wo):
                        vm[q] = src[q]
                    first = False
                else:
                    for q in range(Wo):
                        vm[q] = _nanmax(vm[q], src[q])
            dst = out[o * L + shift + b * QIS + qy * QRS:o * L + shift + b * QIS + qy * QRS + Wq]
            if first:
                for qx in range(Wq):
                    dst[qx] = -np.inf
                continue
            if sw == 2 and kw == 3 and dw == 1:
                for qx in range(Wq):
                    q = qx * 2
                    dst[qx] = _nanmax(_nanmax(vb[q], vb[q + 1]), vb[q + 2])
            else:
                for qx in range(Wq):
                    m = vb[qx * sw]
                    for kx in range(1, kw):
                        m = _nanmax(m, vb[qx * sw + kx * dw])
                    dst[qx] = m


@pjit
def crop_batch(yw, IS, RS, CS, y, bias, res, act, lo, hi):
    """y[b, o, oy, ox] = act(yw[o, b*IS + oy*RS + ox*CS] + bias[o] + res[b, o, oy, ox]);
    y [B, O, Ho, Wo], res the same or shape (0,0,0,0), bias [O] or length 0."""
    B = y.shape[0]
    O = y.shape[1]
    Ho = y.shape[2]
    Wo = y.shape[3]
    nb = bias.shape[0]
    nr = res.shape[0]
    for t in prange(B * O):
        b = t // O
        o = t - b * O
        bv = bias[o] if nb != 0 else np.float32(0.0)
        plane = y[b, o].reshape(Ho * Wo)
        for oy in range(Ho):
            dst = plane[oy * Wo:(oy + 1) * Wo]
            if CS == 1:
                src = yw[o, b * IS + oy * RS:b * IS + oy * RS + Wo]
                for q in range(Wo):
                    dst[q] = src[q]
            else:
                src = yw[o, b * IS + oy * RS:]
                for q in range(Wo):
                    dst[q] = src[q * CS]
        if nr != 0:
            epilogue_tile(plane, bv, res[b, o].reshape(Ho * Wo), act, lo, hi)
        else:
            epilogue_tile(plane, bv, plane[0:0], act, lo, hi)


def batch_pack(x, geo, kh, kw, stride, padding, dilation, xf):
    """Fill ``xf`` from x [B, C, H, W] (C-contiguous float32) in the layout of ``geo`` (batch_geometry)."""
    shared, P, RS, IS, L = geo[:5]
    if shared == 2:
        pack_inner(x, int(padding[0]), int(padding[1]), L, xf)
    elif shared == 3:
        pidx = phase_map(kh, kw, int(stride[0]), int(stride[1]), int(dilation[0]), int(dilation[1]))[0]
        B = x.shape[0]
        pack_phase_inner(x, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), RS // B, L, pidx, P, xf)
    elif shared:
        pack_shared(x, int(padding[0]), int(padding[1]), L, xf)
    else:
        pidx = phase_map(kh, kw, int(stride[0]), int(stride[1]), int(dilation[0]), int(dilation[1]))[0]
        pack_phase(x, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), IS // RS, RS, L, pidx, P, xf)


def batch_tile(kind):
    """Position round-up of the batched layout for a kernel kind: csr VW, bsr 2*VW."""
    return VW if kind == "csr" else 2 * VW


KPANEL_NC = 256  # csr_conv_kpanel's N chunk (positions): one 16-vector register tile (128 before: 1 thread,
# batch 8, 90%, with the 16-vector tile (_mkoffa16), 64..512ch 32x32..4x4 together 4.32 -> 4.11 ms, same run)
KPANEL_FLOATS = 8192  # input floats of one K panel's chunk (32 KB: L1)
KPANEL_CHUNK_SPLIT = 16  # N chunks per thread from which threads split chunks instead of rows (4096 positions)


def kpanel_plan(packed, geo, C, kh, kw, dh, dw, sh, sw, cs=1):
    """-> (sp, nc) for csr_conv_kpanel on the layout ``geo`` (batch_geometry): channels per panel so
    that a panel's chunk of the packed input (P planes x (nc + the taps' largest shift)) is
    KPANEL_FLOATS, and the per-row panel split points."""
    P, RS, Npad = geo[1], geo[2], geo[5]
    nc = min(KPANEL_NC, Npad)
    shift = ((kh - 1) * dh // sh) * RS + ((kw - 1) * dw // sw) * cs
    cpb = max(1, KPANEL_FLOATS // max(1, P * (nc + shift)))  # (empty batch: Npad = shift = 0)
    return kpanel_splits(packed[0], packed[1], cpb * kh * kw, C * kh * kw), nc


def sparse_conv_batch(kind, packed, x, y, kh, kw, stride=(1, 1), padding=(0, 0), dilation=(1, 1), bias=None,
                      act=0, lo=0.0, hi=0.0, residual=None, work=None, roff=None, koff=None, plane=False,
                      kpanel=None, inner=False):
    """Whole batch: y [B, O, Ho, Wo] = act(conv(x [B, C, H, W]) + bias + residual), any stride /
    padding / dilation, groups 1, without im2col. kind "csr": packed = (indptr, indices, data)
    (csr row's prepare); "bsr": the bsr row's prepare output with r x 1 blocks, r % 8 == 0.
    ``work``: optional (xf float32 [size], yw float32 [O, Npad]) from ``batch_geometry(...,
    tile=batch_tile(kind))`` (yw unused with ``plane``); ``roff``: optional precomputed ``batch_roff``;
    ``koff`` (csr): optional precomputed ``roff[indices]`` int32; ``plane`` (csr): the fused per
    (image, output channel) kernel ``csr_conv_plane`` instead of csr_conv_kpanel + crop_batch;
    ``kpanel`` (csr): optional precomputed ``kpanel_plan``; ``inner``: the batch-innermost layout where
    the shared one applies and ``plane`` is off (``work`` / ``roff`` / ``kpanel`` then for that geometry)."""
    B, C, H, W = x.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    O = y.shape[1]
    if y.size == 0:  # empty batch (or no output channels): nothing to write
        return
    geo = batch_geometry(B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, batch_tile(kind), inner and not plane)
    shared, P, RS, IS, L, Npad, size, Ho, Wo = geo
    cs = geo_cs(geo, B)
    if work is None:
        work = (np.empty(size, np.float32), np.empty((0, 0) if plane else (O, Npad), np.float32))
    xf, yw = work
    if roff is None and (kind != "csr" or koff is None):
        roff = batch_roff(C, kh, kw, sh, sw, dh, dw, shared, RS, L, cs)
    batch_pack(x, geo, kh, kw, stride, padding, dilation, xf)
    if kind == "csr":
        if koff is None:
            koff = roff[packed[1]].astype(np.int32)
        if plane:
            csr_conv_plane(packed[0], koff, packed[2], xf, IS, RS, y, EMPTY1 if bias is None else bias,
                           EMPTY4 if residual is None else residual, int(act), float(lo), float(hi))
            return
        sp, nc = kpanel if kpanel is not None else kpanel_plan(packed, geo, C, kh, kw, dh, dw, sh, sw, cs)
        nt = numba.get_num_threads()
        if -(-Npad // nc) >= KPANEL_CHUNK_SPLIT * nt:  # wide grid: threads split the N chunks
            csr_conv_kpanel(sp, koff, packed[2], xf, yw, nc, 1, nt)
        else:
            csr_conv_kpanel(sp, koff, packed[2], xf, yw, nc, nt, 1)
    elif kind == "bsr" and packed[4] == 1 and packed[3] % 8 == 0:
        bsr_conv_s1(packed[0], packed[1], packed[2], packed[3], xf, roff, yw)
    else:
        raise ValueError(f"sparse_conv_batch: needs csr or bsr r x 1 with r % 8 == 0, got {kind}")
    crop_batch(yw, IS, RS, cs, y, EMPTY1 if bias is None else bias, EMPTY4 if residual is None else residual,
               int(act), float(lo), float(hi))

# ---------------------------------------------------------------------------------------
# numpy references

def _pad(x, ph, pw, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def im2col_ref(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """Reference im2col of one image [C, H, W] -> [C*kh*kw, Ho*Wo] (float32)."""
    C, H, W = x.shape
    Ho, Wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    xp = _pad(x[None], ph, pw)[0]
    out = np.zeros((C, kh, kw, Ho, Wo), np.float32)
    for ky in range(kh):
        for kx in range(kw):
            out[:, ky, kx] = xp[:, ky * dh:ky * dh + sh * (Ho - 1) + 1:sh, kx * dw:kx * dw + sw * (Wo - 1) + 1:sw]
    return out.reshape(C * kh * kw, Ho * Wo)


def conv2d_ref(x, w4, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
               act=0, lo=0.0, hi=0.0, residual=None):
    """Reference grouped conv2d, x [B, C, H, W], w4 [O, C/g, kh, kw] (float64 math)."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w4.shape
    Og = O // groups
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    y = np.zeros((B, O, Ho * Wo))
    for b in range(B):
        for g in range(groups):
            cols = im2col_ref(x[b, g * Cg:(g + 1) * Cg], kh, kw, *stride, *padding, *dilation).astype(np.float64)
            y[b, g * Og:(g + 1) * Og] = w4[g * Og:(g + 1) * Og].reshape(Og, -1).astype(np.float64) @ cols
    y = y.reshape(B, O, Ho, Wo)
    out = np.empty(y.shape, np.float32)
    for b in range(B):
        out[b] = epilogue_ref(y[b].reshape(O, -1), bias, act, lo, hi,
                              None if residual is None else residual[b].reshape(O, -1)).reshape(O, Ho, Wo)
    return out


def maxpool2d_ref(x, kh, kw, sh, sw, ph, pw, dh=1, dw=1, ceil_mode=False):
    B, C, H, W = x.shape
    Ho, Wo = pool_out_size(H, kh, sh, ph, dh, ceil_mode), pool_out_size(W, kw, sw, pw, dw, ceil_mode)
    big = (Ho - 1) * sh + (kh - 1) * dh + 1
    bigw = (Wo - 1) * sw + (kw - 1) * dw + 1
    xp = np.full((B, C, max(big, H + ph), max(bigw, W + pw)), -np.inf, np.float32)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    out = np.full((B, C, Ho, Wo), -np.inf, np.float32)
    for ky in range(kh):
        for kx in range(kw):
            out = np.maximum(out, xp[:, :, ky * dh:ky * dh + sh * (Ho - 1) + 1:sh, kx * dw:kx * dw + sw * (Wo - 1) + 1:sw])
    return out


def avgpool2d_ref(x, kh, kw, sh, sw, ph, pw, ceil_mode=False, count_include_pad=True, divisor=0):
    B, C, H, W = x.shape
    Ho, Wo = pool_out_size(H, kh, sh, ph, 1, ceil_mode), pool_out_size(W, kw, sw, pw, 1, ceil_mode)
    out = np.zeros((B, C, Ho, Wo), np.float32)
    for oy in range(Ho):
        for ox in range(Wo):
            h0, w0 = oy * sh - ph, ox * sw - pw
            h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
            pool = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            s = x[:, :, h0:h1, w0:w1].astype(np.float64).sum(axis=(2, 3))
            dv = divisor if divisor else (pool if count_include_pad else (h1 - h0) * (w1 - w0))
            out[:, :, oy, ox] = s / dv
    return out


# ---------------------------------------------------------------------------------------
# table row: depthwise conv (weight: Dense [O, kh*kw] with orig_shape [O, 1, kh, kw])

def _prepare_dw(fmt):
    """-> (w2 float32 [O, kh*kw], kh, kw)."""
    w = np.asarray(fmt.to_dense(), dtype=np.float32)
    shp = fmt.orig_shape if fmt.orig_shape is not None else w.shape
    if len(shp) == 4:
        kh, kw = int(shp[2]), int(shp[3])
    else:  # a 2-D [O, k*k] weight: square kernel
        kh = kw = int(round(np.sqrt(w.shape[1])))
    return (np.ascontiguousarray(w.reshape(w.shape[0], kh * kw)), kh, kw)


def _run_dw(p, x, y, bias, act, lo, hi, residual, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """x [B, C, H, W], y [B, O, Ho, Wo] (Ho/Wo from conv_out_size)."""
    w, kh, kw = p
    dwconv2d(x, w, kh, kw, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]),
             int(dilation[0]), int(dilation[1]), y, EMPTY1 if bias is None else bias,
             EMPTY4 if residual is None else residual, int(act), float(lo), float(hi))


def _reference_dw(fmt, x, bias=None, act=0, lo=0.0, hi=0.0, residual=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1)):
    w, kh, kw = _prepare_dw(fmt)
    O, C = w.shape[0], x.shape[1]
    mult = O // C
    # depthwise with multiplier == grouped conv with groups=C, weight [O, 1, kh, kw]
    return conv2d_ref(x, w.reshape(O, 1, kh, kw), bias, stride, padding, dilation, groups=C, act=act, lo=lo,
                      hi=hi, residual=residual) if mult >= 1 else None


KERNELS = [
    KernelSpec(name="dwconv_f32_direct", op="dwconv", fmt="dense", dtype="float32", prepare=_prepare_dw,
               run=_run_dw, reference=_reference_dw, min_n=1,
               notes="depthwise conv2d NCHW, (batch, channel) in parallel, fused epilogue; run/reference take "
                     "stride=, padding=, dilation= keywords; x [B,C,H,W], y [B,O,Ho,Wo]"),
]
