"""Transformer / elementwise pieces: layernorm, softmax (rows, after an additive mask), gelu,
embedding gather, and the generic in-place activation epilogue used by the runtime's BLAS path.

All kernels take C-contiguous float32 arrays, write preallocated outputs and run in parallel
over rows (``pjit``); the thread count is the caller's ``numba.set_num_threads``. Each has a
plain-numpy reference (``*_ref``). Measured on the 2-core dev machine (``python -m
sparsedge.kernels.nn``, numba's default 2 threads, loaded host): layernorm 1024x768 numba
0.11 ms vs numpy 7.1 ms; gelu 393k elements 0.16 ms vs numpy+scipy.special.erf 4.4 ms;
attention 8 x 128 tokens, 12 heads x 32 (BERT-small, feature-major) 1.04 ms vs the numpy
reference 15.3 ms. Embedding gather: numba rows in parallel (``gather_rows``; np.take(out=) was
12x slower on BERT's 1024 x 384 lookup).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir as _ir
from numba import prange
from numba.core import types as _nt
from numba.extending import intrinsic as _intrinsic

from ._jit import jit, pjit
from .epilogue import _act_inplace as _epi_act
from .epilogue import tanh_f32
from .simd import VW as _VW
from .simd import vadd as _vadd
from .simd import vbcast as _vbcast
from .simd import vexp, vhsum, vmaxo, vrcp, vsub
from .simd import vfma as _vfma
from .simd import vload as _vload
from .simd import vmul as _vmul
from .simd import vprefetch as _vprefetch
from .simd import vstore as _vstore
from .simd import vzero as _vzero
from .table import (ACT_CLAMP, ACT_GELU, ACT_GELU_TANH, ACT_HARDSWISH, ACT_RELU, ACT_RELU6, ACT_SIGMOID,
                    ACT_SILU)

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


_GC = np.float32(0.7978845608028654)
_GK = np.float32(0.044715)
_TSAT = np.float32(7.90531110763549805)


@jit
def _act_inplace(yr, act, lo, hi):
    """act over a 1-D float32 segment with the vectorizable activations of kernels.epilogue;
    gelu_tanh saturates tanh to exactly +-1 beyond its clamp (torch's float32 tanh does)."""
    if act == ACT_GELU_TANH:
        for j in range(yr.shape[0]):
            v = yr[j]
            z = _GC * (v + _GK * v * v * v)
            t = tanh_f32(z)
            t = np.float32(1.0) if z >= _TSAT else t
            t = np.float32(-1.0) if z <= -_TSAT else t
            yr[j] = np.float32(0.5) * v * (np.float32(1.0) + t)
    else:
        _epi_act(yr, act, lo, hi)



@jit(inline="always")
def _act(v, act, lo, hi):
    if act == ACT_RELU:
        return v if v > 0.0 else 0.0
    if act == ACT_RELU6:
        return min(max(v, 0.0), 6.0)
    if act == ACT_GELU:
        return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
    if act == ACT_GELU_TANH:
        return 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    if act == ACT_SILU:
        return v / (1.0 + math.exp(-v))
    if act == ACT_HARDSWISH:
        return v * min(max(v + 3.0, 0.0), 6.0) / 6.0
    if act == ACT_SIGMOID:
        return 1.0 / (1.0 + math.exp(-v))
    if act == ACT_CLAMP:
        return min(max(v, lo), hi)
    return v


@pjit
def act_inplace(y, act, lo, hi):
    """y: 1-D float32 (a flat view); y = act(y) in place. act: kernels.table.ACT_* code.
    Uses the vectorizable activations of ``kernels.epilogue`` (one branch per chunk): the scalar
    libm erf took 4.5 ms for BERT's 1024x1536 gelu on 2 threads."""
    n = y.shape[0]
    chunk = 4096
    nchunks = (n + chunk - 1) // chunk
    for c in prange(nchunks):
        s = c * chunk
        e = min(n, s + chunk)
        _act_inplace(y[s:e], act, lo, hi)


@pjit
def bias_act_rows(y, bias, act, lo, hi):
    """y [R, C] float32 (torch layout: bias along the last dim); y = act(y + bias[None, :]).
    bias: float32 [C] or empty (no bias)."""
    R, C = y.shape
    hb = bias.shape[0] > 0
    for r in prange(R):
        row = y[r]
        if hb:
            for j in range(C):
                row[j] = row[j] + bias[j]
        _act_inplace(row, act, lo, hi)


@jit
def bias_res_act_rows(y, bias, res, act, lo, hi):
    """Serial (for one thread's share of rows): y [R, C] float32 (torch layout),
    y = act(y + bias[None, :] + res). bias float32 [C] or empty; res float32 [R, C] or [0, 0]."""
    R, C = y.shape
    hb = bias.shape[0] > 0
    hr = res.shape[0] > 0
    for r in range(R):
        row = y[r]
        if hb and hr:
            rr = res[r]
            for j in range(C):
                row[j] = row[j] + bias[j] + rr[j]
        elif hb:
            for j in range(C):
                row[j] = row[j] + bias[j]
        elif hr:
            rr = res[r]
            for j in range(C):
                row[j] = row[j] + rr[j]
        if act != 0:
            _act_inplace(row, act, lo, hi)


@pjit
def bias_act_cols(y, bias, act, lo, hi):
    """y [C, N] float32 (feature-major: bias along the first dim); y = act(y + bias[:, None])."""
    C, N = y.shape
    hb = bias.shape[0] > 0
    for r in prange(C):
        row = y[r]
        if hb:
            b = bias[r]
            for j in range(N):
                row[j] = row[j] + b
        _act_inplace(row, act, lo, hi)


@jit(inline="always")
def _ln_row_inplace(row, w, b, eps):
    """row (1-D float32) = layernorm(row) * w + b in place (two-pass, float64 stats as
    ``layernorm_rows``); w, b float32 [H] or empty."""
    H = row.shape[0]
    hw = w.shape[0] > 0
    hb = b.shape[0] > 0
    s = 0.0
    for j in range(H):
        s += row[j]
    mu = s / H
    v = 0.0
    for j in range(H):
        d = row[j] - mu
        v += d * d
    inv = 1.0 / math.sqrt(v / H + eps)
    for j in range(H):
        t = (row[j] - mu) * inv
        if hw:
            t = t * w[j]
        if hb:
            t = t + b[j]
        row[j] = t


@jit
def bias_res_ln_rows(y, bias, res, w, b, eps):
    """Serial (one thread's share of rows): y [R, C] float32 (torch layout),
    y = layernorm(y + bias[None, :] + res) * w + b per row (a linear's epilogue with the residual
    add and the layernorm after it). bias, w, b float32 [C] or empty; res float32 [R, C] or [0, 0]."""
    R, C = y.shape
    hb = bias.shape[0] > 0
    hr = res.shape[0] > 0
    for r in range(R):
        row = y[r]
        if hb and hr:
            rr = res[r]
            for j in range(C):
                row[j] = row[j] + bias[j] + rr[j]
        elif hb:
            for j in range(C):
                row[j] = row[j] + bias[j]
        elif hr:
            rr = res[r]
            for j in range(C):
                row[j] = row[j] + rr[j]
        _ln_row_inplace(row, w, b, eps)


@pjit
def transpose_res_ln(x, add, w, b, eps, y):
    """y [N, C] = layernorm(x [C, N].T + add [N, C]) * w + b per row (a feature-major kernel
    output brought back to torch layout with its residual and the layernorm after it, in blocks
    of 16 rows in parallel). add [N, C] or [0, 0]; w, b float32 [C] or empty."""
    C, N = x.shape
    TB = 16
    ha = add.shape[0] > 0
    for t in prange((N + TB - 1) // TB):
        r0 = t * TB
        r1 = min(N, r0 + TB)
        for c in range(C):
            xr = x[c]
            for r in range(r0, r1):
                y[r, c] = xr[r]
        for r in range(r0, r1):
            row = y[r]
            if ha:
                ar = add[r]
                for j in range(C):
                    row[j] = row[j] + ar[j]
            _ln_row_inplace(row, w, b, eps)


@pjit
def transpose2d(x, y, add):
    """y [C, R] = x [R, C].T (+ add [C, R] when add is not [0, 0]), float32, in 32 x 32 tiles in
    parallel (both sides stay in L1).
    numpy's strided copy took 0.45 ms for 1024 x 384 and 13 ms for 1024 x 1536 (the 6 KB row
    stride maps a column walk onto a few cache sets); this 0.13 / 0.54 ms at 2 threads."""
    R, C = x.shape
    TB = 32
    nrb = (R + TB - 1) // TB
    ncb = (C + TB - 1) // TB
    for t in prange(nrb * ncb):
        rb = t // ncb
        cb = t - rb * ncb
        r0 = rb * TB
        r1 = min(R, r0 + TB)
        c0 = cb * TB
        c1 = min(C, c0 + TB)
        if add.shape[0] > 0:
            for c in range(c0, c1):
                yr = y[c]
                ar = add[c]
                for r in range(r0, r1):
                    yr[r] = x[r, c] + ar[r]
        else:
            for c in range(c0, c1):
                yr = y[c]
                for r in range(r0, r1):
                    yr[r] = x[r, c]


@pjit
def layernorm_rows(x, w, b, eps, out):
    """x, out [R, H] float32; w, b float32 [H] or empty; normalise each row (two-pass).
    With w and b and H a multiple of the vector width (BERT's 384): statistics in float32 vector
    lanes (``simd``, horizontal sums by shuffles), one fused (x - mu) * inv * w + b pass; 1024 x 384
    at 2 threads 0.10 -> 0.03 ms. Otherwise plain loops with float64 statistics."""
    R, H = x.shape
    hw = w.shape[0] > 0
    hb = b.shape[0] > 0
    vec = hw and hb and H % _VW == 0 and H > 0
    for r in prange(R):
        row = x[r]
        o = out[r]
        if vec:
            a0 = _vzero()
            a1 = _vzero()
            j = 0
            while j + 2 * _VW <= H:
                a0 = _vadd(a0, _vload(row, j))
                a1 = _vadd(a1, _vload(row, j + _VW))
                j += 2 * _VW
            if j < H:
                a0 = _vadd(a0, _vload(row, j))
            mu = vhsum(_vadd(a0, a1)) / np.float32(H)
            vmu = _vbcast(mu)
            a0 = _vzero()
            a1 = _vzero()
            j = 0
            while j + 2 * _VW <= H:
                d0 = vsub(_vload(row, j), vmu)
                d1 = vsub(_vload(row, j + _VW), vmu)
                a0 = _vfma(d0, d0, a0)
                a1 = _vfma(d1, d1, a1)
                j += 2 * _VW
            if j < H:
                d0 = vsub(_vload(row, j), vmu)
                a0 = _vfma(d0, d0, a0)
            inv = np.float32(1.0 / math.sqrt(np.float64(vhsum(_vadd(a0, a1))) / H + eps))
            vin = _vbcast(inv)
            for j in range(0, H, _VW):
                t = _vmul(vsub(_vload(row, j), vmu), vin)
                _vstore(o, j, _vfma(t, _vload(w, j), _vload(b, j)))
            continue
        s = 0.0
        for j in range(H):
            s += row[j]
        mu = s / H
        v = 0.0
        for j in range(H):
            d = row[j] - mu
            v += d * d
        inv = 1.0 / math.sqrt(v / H + eps)
        for j in range(H):
            t = (row[j] - mu) * inv
            if hw:
                t = t * w[j]
            if hb:
                t = t + b[j]
            o[j] = t


@pjit(fastmath=False)  # (x + a1) + a2 in this order, each add rounded: numpy's chained adds
def add_rows_bcast(x, a1, a2, out):
    """out[r] = (x[r] + a1[r % P1]) + a2[r % P2] for x, out float32 [R, H], a1 [P1, H], a2 [P2, H]
    or [0, H] / [0, 0] (absent); P1, P2 >= 1 (an addend broadcast over leading axes, as BERT's
    position [1, S, H] and token-type [H] embeddings added to the word embeddings [B, S, H]).
    Rows in parallel (numpy's broadcasting adds run on one thread)."""
    R, H = x.shape
    P1 = a1.shape[0]
    P2 = a2.shape[0]
    for r in prange(R):
        xr = x[r]
        o = out[r]
        b1 = a1[r % P1]
        if P2 > 0:
            b2 = a2[r % P2]
            for j in range(H):
                o[j] = (xr[j] + b1[j]) + b2[j]
        else:
            for j in range(H):
                o[j] = xr[j] + b1[j]


def softmax_inplace(y):
    """y [R, L] float32; softmax over each row in place (numpy: its vectorised exp beat a numba
    loop 0.5 ms vs 1.2 ms on 1536x128). Temporaries: two [R, 1] arrays. An all -inf row -> NaN, as torch."""
    m = np.max(y, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        np.subtract(y, m, out=y)
    np.exp(y, out=y)
    s = np.sum(y, axis=-1, keepdims=True)
    np.divide(y, s, out=y)


@pjit
def gelu(x, out, tanh_approx):
    """x, out 1-D float32 (flat views); erf gelu, or the tanh approximation when tanh_approx."""
    n = x.shape[0]
    chunk = 4096
    act = ACT_GELU_TANH if tanh_approx else ACT_GELU
    for c in prange((n + chunk - 1) // chunk):
        s = c * chunk
        e = min(n, s + chunk)
        for i in range(e - s):
            out[s + i] = x[s + i]
        _act_inplace(out[s:e], act, 0.0, 0.0)


@pjit
def gather_rows(ids, table, out):
    """out[i, :] = table[ids[i], :]; ids int64 [n] in range (not checked), table float32 [V, H]
    (read-only: one specialization for mapped and in-memory tables), out float32 [n, H]."""
    H = table.shape[1]
    for i in prange(ids.shape[0]):
        r = table[ids[i]]
        o = out[i]
        for j in range(H):
            o[j] = r[j]


@pjit
def masked_mean_rows(x, m, y):
    """y[b, h] = sum_s x[b, s, h] * m[b, s] / max(sum_s m[b, s], 1e-9); x float32 [B, S, H], m float32
    [B, S], y float32 [B, H] (every s is summed, masked ones too: NaN * 0 stays NaN, as in torch)."""
    B, S, H = x.shape
    for b in prange(B):
        yb = y[b]
        for j in range(H):
            yb[j] = 0.0
        den = np.float32(0.0)
        for s in range(S):
            w = m[b, s]
            den += w
            xs = x[b, s]
            for j in range(H):
                yb[j] += xs[j] * w
        inv = np.float32(1.0) / max(den, np.float32(1e-9))
        for j in range(H):
            yb[j] *= inv


def embedding_into(ids, table, out):
    """ids int [n] (validated in range by the caller), table [V, H], out [n, H]. float32 C-contiguous
    tables: ``gather_rows`` (1024 rows of a 30522 x 384 table, 2 threads: 0.026 ms; np.take with
    out= took 0.32 ms, equal at <= 64 rows); other dtypes / layouts: np.take."""
    if (table.dtype == np.float32 and out.dtype == np.float32 and table.ndim == 2 and out.ndim == 2
            and table.flags.c_contiguous and out.flags.c_contiguous):
        t = table.view()
        t.setflags(write=False)
        gather_rows(np.asarray(ids).astype(np.int64, copy=False).reshape(-1), t, out)
    else:
        np.take(table, ids, axis=0, out=out)


# --- numpy references --------------------------------------------------------------------------
def layernorm_ref(x, w=None, b=None, eps=1e-5):
    from .ref import layernorm
    return layernorm(x, w, b, eps)


def softmax_ref(x, mask=None, axis=-1):
    from .ref import softmax
    return softmax(x, mask, axis)


def gelu_ref(x, approximate="none"):
    from .ref import gelu as g
    return g(x, approximate)


def act_ref(y, act_code, lo=0.0, hi=0.0):
    from .ref import activation
    from .table import ACTIVATIONS
    name = {v: k for k, v in ACTIVATIONS.items()}[act_code]
    return activation(np.asarray(y, np.float32), name, lo, hi)


def embedding_ref(ids, table):
    return table[np.asarray(ids, dtype=np.int64)]


EMPTY_F32 = np.zeros(0, dtype=np.float32)
EMPTY_F32.setflags(write=False)  # read-only like mapped weights: one numba specialization for both


def _bench():  # pragma: no cover - manual measurement helper
    import time

    def t(f, r=20):
        f()
        best = 1e9
        for _ in range(r):
            s = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - s)
        return best * 1e3

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 768)).astype(np.float32)
    w = rng.standard_normal(768).astype(np.float32)
    out = np.empty_like(x)
    print(f"layernorm 1024x768: numba {t(lambda: layernorm_rows(x, w, w, 1e-5, out)):.3f} ms, "
          f"numpy {t(lambda: layernorm_ref(x, w, w)):.3f} ms")
    s = rng.standard_normal((12 * 128, 128)).astype(np.float32)
    s2 = s.copy()
    print(f"softmax 1536x128: in place {t(lambda: (np.copyto(s2, s), softmax_inplace(s2))):.3f} ms, "
          f"reference {t(lambda: softmax_ref(s)):.3f} ms")
    g = rng.standard_normal(128 * 3072).astype(np.float32)
    go = np.empty_like(g)
    print(f"gelu 393k: numba {t(lambda: gelu(g, go, False)):.3f} ms, numpy {t(lambda: gelu_ref(g)):.3f} ms")
    ids = rng.integers(0, 30000, 256).astype(np.int64)
    tab = rng.standard_normal((30000, 256)).astype(np.float32)
    eo = np.empty((256, 256), np.float32)
    print(f"embedding 256x256: take {t(lambda: embedding_into(ids, tab, eo)):.3f} ms, "
          f"reference {t(lambda: embedding_ref(ids, tab)):.3f} ms")
    B, S, H, D = 8, 128, 12, 32  # BERT-small attention, feature-major q|k|v in and output out
    HD, n = H * D, B * S
    g = rng.standard_normal(3 * HD * n).astype(np.float32)
    am = np.zeros((B, S), np.float32)
    ao = np.empty(HD * n, np.float32)
    qkv = g.reshape(3 * HD, n).T.reshape(B, S, 3 * HD)
    q, k, v = (np.ascontiguousarray(qkv[..., i * HD:(i + 1) * HD]) for i in range(3))
    def att():
        attention_heads(g, g[HD * n:], g[2 * HD * n:], am, np.float32(0.17), ao, B, S, S, H, D, 1, 1, n, n)

    print(f"attention 8x128, 12 heads x 32: numba {t(att):.3f} ms, "
          f"reference {t(lambda: attention_ref(q, k, v, am[:, None, None, :], 0.17, H), 3):.3f} ms")


# --- softmax: one fused, parallel, vectorizable pass per row ----------------------------------


@_intrinsic
def _bits_to_f32(typingctx, v):
    """Low 32 bits of an integer as a float32 bit pattern (trunc + bitcast; vectorizes)."""
    if not isinstance(v, _nt.Integer):
        return None

    def codegen(context, builder, sig, args):
        a = args[0]
        if a.type.width > 32:
            a = builder.trunc(a, _ir.IntType(32))
        return builder.bitcast(a, _ir.FloatType())

    return _nt.float32(v), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.33654)
_EXP_HI = np.float32(88.37626)
_FLT_MIN = np.float32(1.1754944e-38)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@jit(inline="always")
def exp_f32(v):
    """exp for float32 (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^k by bitcast);
    only arithmetic, so loops over it vectorize (libm expf calls do not). Relative error <= 2e-7
    on [-87.3, 88.4]; 0 below -87.3 (no denormals: a denormal softmax output made the attention
    GEMM that reads it 20x slower), exp(88.4) above."""
    x = min(max(v, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    r2 = r * r
    p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * r2 + r + np.float32(1.0)
    e = p * _bits_to_f32((np.int32(k) + 127) << 23)
    return e if v >= _EXP_LO else np.float32(0.0)


@jit(inline="always")
def _rowmax_nonan(a):
    """max of a 1-D float32 row assumed NaN-free (the caller checks): eight independent
    accumulators (the select-based max reduction does not vectorize; one dependency chain ran
    4x slower). -inf entries are fine."""
    L = a.shape[0]
    ninf = np.float32(-np.inf)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = ninf
    L8 = L - L % 8
    for j in range(0, L8, 8):
        v = a[j]
        m0 = v if v > m0 else m0
        v = a[j + 1]
        m1 = v if v > m1 else m1
        v = a[j + 2]
        m2 = v if v > m2 else m2
        v = a[j + 3]
        m3 = v if v > m3 else m3
        v = a[j + 4]
        m4 = v if v > m4 else m4
        v = a[j + 5]
        m5 = v if v > m5 else m5
        v = a[j + 6]
        m6 = v if v > m6 else m6
        v = a[j + 7]
        m7 = v if v > m7 else m7
    for j in range(L8, L):
        v = a[j]
        m0 = v if v > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@pjit
def softmax_rows(x, mask, rows_per_mask, scale, y):
    """y[r] = softmax(x[r] * scale + mask[(r // rows_per_mask) % len(mask)]) for x, y [R, L]
    float32 (y may be x); mask float32 [Rm, L] or [0, 0] (none). Rows with max -inf (all masked)
    or NaN give NaN, as torch. Parallel over rows; each row stays in L1 (one read of x, one write)."""
    R, L = x.shape
    hm = mask.shape[0] > 0
    Rm = max(mask.shape[0], 1)
    for r in prange(R):
        xr = x[r]
        yr = y[r]
        z = np.float32(0.0)  # becomes NaN when the row holds a NaN or an inf
        if hm:
            mr = mask[(r // rows_per_mask) % Rm]
            for j in range(L):
                v = xr[j] * scale + mr[j]
                yr[j] = v
                z += v * np.float32(0.0)
        else:
            for j in range(L):
                v = xr[j] * scale
                yr[j] = v
                z += v * np.float32(0.0)
        m = _rowmax_nonan(yr) if z == z else np.float32(np.nan)
        if z != z:
            m = np.float32(-np.inf)
            for j in range(L):
                m = max(m, yr[j])
            bad = not (m > -np.inf)
            for j in range(L):
                if yr[j] != yr[j] or yr[j] == np.inf:
                    bad = True
            if bad:
                for j in range(L):
                    yr[j] = np.nan
                continue
        s = np.float32(0.0)
        for j in range(L):
            e = exp_f32(yr[j] - m)
            yr[j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(L):
            q = yr[j] * inv
            yr[j] = q if q >= _FLT_MIN else np.float32(0.0)  # flush denormals (slow in the next GEMM)


# --- attention: softmax(q k^T * scale + mask) v per (batch, head), no transposed copies ---------


@jit(inline="always")
def _softmax_inplace_row(yr, L, mask, mi, hm, scale):
    """yr[:L] = softmax(yr[:L] * scale + mask[mi, :L]) (mask only when hm), the semantics of
    ``softmax_rows`` (NaN row when the row holds a NaN / +inf or is all -inf; denormals flushed)."""
    z = np.float32(0.0)
    if hm:
        for j in range(L):
            v = yr[j] * scale + mask[mi, j]
            yr[j] = v
            z += v * np.float32(0.0)
    else:
        for j in range(L):
            v = yr[j] * scale
            yr[j] = v
            z += v * np.float32(0.0)
    if z != z:
        m = np.float32(-np.inf)
        bad = False
        for j in range(L):
            if yr[j] != yr[j] or yr[j] == np.inf:
                bad = True
            elif yr[j] > m:
                m = yr[j]
        if bad or not (m > -np.inf):
            for j in range(L):
                yr[j] = np.nan
            return
    else:
        m = _rowmax_nonan(yr[:L])
    s = np.float32(0.0)
    for j in range(L):
        e = exp_f32(yr[j] - m)
        yr[j] = e
        s += e
    inv = np.float32(1.0) / s
    for j in range(L):
        q = yr[j] * inv
        yr[j] = q if q >= _FLT_MIN else np.float32(0.0)


# --- attention in the transposed orientation: scores S^T [keys, queries], vectors over queries ---



_NINF32 = np.float32(-np.inf)


@jit(inline="always")
def _copy_f32(dst, do, src, so, n):
    """dst[do:do+n] = src[so:so+n] (1-D float32), a vector at a time."""
    nv = n - n % _VW
    for i in range(0, nv, _VW):
        _vstore(dst, do + i, _vload(src, so + i))
    for i in range(nv, n):
        dst[do + i] = src[so + i]


@pjit
def attention_heads(q, k, v, mask, scale, out, B, Sq, Sk, H, D, ldq, ldkv, cs, ocs):
    """Multi-head attention core in one parallel pass (no [B, H, Sq, Sk] score buffer):
    for every batch b and head h, ``O = softmax(Q K^T * scale + mask[b % Bm]) V`` with
    ``Q[i, d] = q[(b*Sq + i)*ldq + (h*D + d)*cs]`` (K, V alike from k, v with row stride ``ldkv``,
    b*Sk + j). q: [B, Sq, H*D] torch layout (ldq = H*D or 3*H*D for offset views of a fused
    q|k|v output, cs = 1) or feature-major [*, B*Sq] (ldq = ldkv = 1, cs = B*S); k, v alike.
    mask: float32 [Bm, Sk] additive (Bm 1 or B) or [0, 0] (none); scale float32.
    out: ocs == 1: [B, Sq, H*D] torch layout; otherwise feature-major [H*D, B*Sq] (ocs = B*Sq).
    Parallel over (b, h). Per task Q^T, K^T [D, S] and V^T [D, Sk] are copied contiguous (L1;
    feature-major inputs: vector row copies; torch layout: scalar transposes, ~0.4 ms slower at
    BERT-small). Everything runs transposed, vectors over queries: S^T
    tiles of 8 keys x 2 vectors of queries in registers (``simd``), scaled and masked (mask is
    per key: a broadcast), the softmax over keys is lane-wise (running max, vector exp, sums: no
    horizontal reductions), O^T tiles of 8 head dims x 2 query vectors over the keys, scaled by
    1 / sum in registers and stored straight into a feature-major output. Rows that hold a NaN,
    a +inf or only -inf scores give NaN, as torch; probabilities below FLT_MIN are flushed.
    BERT-small (8 x 128 tokens, 12 heads x 32, feature-major in and out), 2 threads, loaded
    2-core host, interleaved: 2.43 -> 1.24 ms median vs the previous row-vector kernel (1 thread
    4.58 -> 2.30); in the 90% + int8 model 13.4 -> 7.0 ms for the 6 layers."""
    HD = H * D
    QB = 2 * _VW
    Sqp = max((Sq + QB - 1) // QB * QB, QB)
    Skp = max((Sk + 7) // 8 * 8, 8)
    Dp = max((D + 7) // 8 * 8, 8)
    D1 = max(D, 1)
    hm = mask.shape[0] > 0
    Bm = max(mask.shape[0], 1)
    fmo = ocs != 1
    ntask = B * H
    # 24 contiguous runs of (b, h) tasks (even shares for 1, 2, 3, 4, 6, 8 threads), buffers
    # allocated once per run (numba.get_num_threads() here would make the function uncacheable)
    nch = max(min(24, ntask), 1)
    for c in prange(nch):
        t0 = c * ntask // nch
        t1 = (c + 1) * ntask // nch
        Qt = np.empty(D1 * Sqp, np.float32)
        Kt = np.empty(D1 * Skp, np.float32)
        Vt = np.empty(Dp * Skp, np.float32)
        P = np.empty(Skp * QB, np.float32)
        Ob = np.empty(Dp * QB, np.float32)
        Mr = np.zeros(Skp, np.float32)
        for t in range(t0, t1):
            b = t // H
            c0 = (t - b * H) * D
            qb = b * Sq
            kb = b * Sk
            if hm:
                mi = b % Bm
                for j in range(Sk):
                    Mr[j] = mask[mi, j]
            else:
                Mr[:Sk] = np.float32(0.0)
            for j in range(Sk, Skp):
                Mr[j] = _NINF32  # padded keys: out of the running max
            if ldq == 1:  # feature-major: a head's column d is contiguous over tokens
                for d in range(D):
                    _copy_f32(Qt, d * Sqp, q, qb + (c0 + d) * cs, Sq)
            else:
                for i in range(Sq):
                    src = (qb + i) * ldq + c0 * cs
                    for d in range(D):
                        Qt[d * Sqp + i] = q[src + d * cs]
            if ldkv == 1:
                for d in range(D):
                    _copy_f32(Kt, d * Skp, k, kb + (c0 + d) * cs, Sk)
                    _copy_f32(Vt, d * Skp, v, kb + (c0 + d) * cs, Sk)
            else:
                for j in range(Sk):
                    src = (kb + j) * ldkv + c0 * cs
                    for d in range(D):
                        Kt[d * Skp + j] = k[src + d * cs]
                        Vt[d * Skp + j] = v[src + d * cs]
            for d in range(D):
                for i in range(Sq, Sqp):
                    Qt[d * Sqp + i] = np.float32(0.0)
                for j in range(Sk, Skp):
                    Kt[d * Skp + j] = np.float32(0.0)
            for d in range(D, Dp):
                for j in range(Skp):
                    Vt[d * Skp + j] = np.float32(0.0)
            vs = _vbcast(scale)
            # prefetch the next task's q, k, v (this thread's next head when runs are contiguous
            # per thread), spread over the QK tiles, so that its copies read L2 rather than L3 /
            # DRAM: contiguous runs are a head dim over tokens (feature-major) or a token's head
            # slice (torch layout). A hint only.
            pf = t + 1 < ntask
            nb = (t + 1) // H
            nc0 = (t + 1 - nb * H) * D
            if ldq == 1:
                qR, qL, qS, qo0 = D, Sq, cs, nb * Sq + nc0 * cs
            else:
                qR, qL, qS, qo0 = Sq, D, ldq, nb * Sq * ldq + nc0 * cs
            if ldkv == 1:
                kR, kL, kS, ko0 = D, Sk, cs, nb * Sk + nc0 * cs
            else:
                kR, kL, kS, ko0 = Sk, D, ldkv, nb * Sk * ldkv + nc0 * cs
            ntile = (Sqp // QB) * (Skp // 8)
            qper = (qR + ntile - 1) // ntile
            kper = (kR + ntile - 1) // ntile
            pq = 0
            pk = 0
            for i0 in range(0, Sqp, QB):
                # S^T = K Q^T * scale + mask, 8 keys x 2 query vectors per register tile; running max
                m0 = _vbcast(_NINF32)
                m1 = m0
                m2 = m0
                m3 = m0
                for j0 in range(0, Skp, 8):
                    if pf:
                        for _ in range(qper):
                            if pq < qR:
                                for i in range(0, qL, 16):
                                    _vprefetch(q, qo0 + pq * qS + i)
                                pq += 1
                        for _ in range(kper):
                            if pk < kR:
                                for j in range(0, kL, 16):
                                    _vprefetch(k, ko0 + pk * kS + j)
                                    _vprefetch(v, ko0 + pk * kS + j)
                                pk += 1
                    a00 = _vzero()
                    a01 = _vzero()
                    a10 = _vzero()
                    a11 = _vzero()
                    a20 = _vzero()
                    a21 = _vzero()
                    a30 = _vzero()
                    a31 = _vzero()
                    a40 = _vzero()
                    a41 = _vzero()
                    a50 = _vzero()
                    a51 = _vzero()
                    a60 = _vzero()
                    a61 = _vzero()
                    a70 = _vzero()
                    a71 = _vzero()
                    for d in range(D):
                        qo = d * Sqp + i0
                        x0 = _vload(Qt, qo)
                        x1 = _vload(Qt, qo + _VW)
                        ko = d * Skp + j0
                        w = _vbcast(Kt[ko])
                        a00 = _vfma(w, x0, a00)
                        a01 = _vfma(w, x1, a01)
                        w = _vbcast(Kt[ko + 1])
                        a10 = _vfma(w, x0, a10)
                        a11 = _vfma(w, x1, a11)
                        w = _vbcast(Kt[ko + 2])
                        a20 = _vfma(w, x0, a20)
                        a21 = _vfma(w, x1, a21)
                        w = _vbcast(Kt[ko + 3])
                        a30 = _vfma(w, x0, a30)
                        a31 = _vfma(w, x1, a31)
                        w = _vbcast(Kt[ko + 4])
                        a40 = _vfma(w, x0, a40)
                        a41 = _vfma(w, x1, a41)
                        w = _vbcast(Kt[ko + 5])
                        a50 = _vfma(w, x0, a50)
                        a51 = _vfma(w, x1, a51)
                        w = _vbcast(Kt[ko + 6])
                        a60 = _vfma(w, x0, a60)
                        a61 = _vfma(w, x1, a61)
                        w = _vbcast(Kt[ko + 7])
                        a70 = _vfma(w, x0, a70)
                        a71 = _vfma(w, x1, a71)
                    po = j0 * QB
                    w = _vbcast(Mr[j0])
                    x0 = _vfma(a00, vs, w)
                    x1 = _vfma(a01, vs, w)
                    _vstore(P, po, x0)
                    _vstore(P, po + _VW, x1)
                    m0 = vmaxo(x0, m0)
                    m1 = vmaxo(x1, m1)
                    w = _vbcast(Mr[j0 + 1])
                    x0 = _vfma(a10, vs, w)
                    x1 = _vfma(a11, vs, w)
                    _vstore(P, po + QB, x0)
                    _vstore(P, po + QB + _VW, x1)
                    m2 = vmaxo(x0, m2)
                    m3 = vmaxo(x1, m3)
                    w = _vbcast(Mr[j0 + 2])
                    x0 = _vfma(a20, vs, w)
                    x1 = _vfma(a21, vs, w)
                    _vstore(P, po + 2 * QB, x0)
                    _vstore(P, po + 2 * QB + _VW, x1)
                    m0 = vmaxo(x0, m0)
                    m1 = vmaxo(x1, m1)
                    w = _vbcast(Mr[j0 + 3])
                    x0 = _vfma(a30, vs, w)
                    x1 = _vfma(a31, vs, w)
                    _vstore(P, po + 3 * QB, x0)
                    _vstore(P, po + 3 * QB + _VW, x1)
                    m2 = vmaxo(x0, m2)
                    m3 = vmaxo(x1, m3)
                    w = _vbcast(Mr[j0 + 4])
                    x0 = _vfma(a40, vs, w)
                    x1 = _vfma(a41, vs, w)
                    _vstore(P, po + 4 * QB, x0)
                    _vstore(P, po + 4 * QB + _VW, x1)
                    m0 = vmaxo(x0, m0)
                    m1 = vmaxo(x1, m1)
                    w = _vbcast(Mr[j0 + 5])
                    x0 = _vfma(a50, vs, w)
                    x1 = _vfma(a51, vs, w)
                    _vstore(P, po + 5 * QB, x0)
                    _vstore(P, po + 5 * QB + _VW, x1)
                    m2 = vmaxo(x0, m2)
                    m3 = vmaxo(x1, m3)
                    w = _vbcast(Mr[j0 + 6])
                    x0 = _vfma(a60, vs, w)
                    x1 = _vfma(a61, vs, w)
                    _vstore(P, po + 6 * QB, x0)
                    _vstore(P, po + 6 * QB + _VW, x1)
                    m0 = vmaxo(x0, m0)
                    m1 = vmaxo(x1, m1)
                    w = _vbcast(Mr[j0 + 7])
                    x0 = _vfma(a70, vs, w)
                    x1 = _vfma(a71, vs, w)
                    _vstore(P, po + 7 * QB, x0)
                    _vstore(P, po + 7 * QB + _VW, x1)
                    m2 = vmaxo(x0, m2)
                    m3 = vmaxo(x1, m3)
                # softmax over keys, lane-wise (each lane is one query); normalised after P V
                m0 = vmaxo(m2, m0)
                m1 = vmaxo(m3, m1)
                s0 = _vzero()
                s1 = _vzero()
                for j in range(Sk):
                    e0 = vexp(vsub(_vload(P, j * QB), m0))
                    e1 = vexp(vsub(_vload(P, j * QB + _VW), m1))
                    _vstore(P, j * QB, e0)
                    _vstore(P, j * QB + _VW, e1)
                    s0 = _vadd(s0, e0)
                    s1 = _vadd(s1, e1)
                r0 = vrcp(s0)
                r1 = vrcp(s1)
                if Sk == 0:  # no keys: zeros (an empty softmax times an empty V), not 0 * inf
                    r0 = _vzero()
                    r1 = r0
                direct = fmo and i0 + QB <= Sq
                # O^T = V^T P^T, 8 head dims x 2 query vectors per register tile
                for d0 in range(0, Dp, 8):
                    a00 = _vzero()
                    a01 = _vzero()
                    a10 = _vzero()
                    a11 = _vzero()
                    a20 = _vzero()
                    a21 = _vzero()
                    a30 = _vzero()
                    a31 = _vzero()
                    a40 = _vzero()
                    a41 = _vzero()
                    a50 = _vzero()
                    a51 = _vzero()
                    a60 = _vzero()
                    a61 = _vzero()
                    a70 = _vzero()
                    a71 = _vzero()
                    vo = d0 * Skp
                    v0 = Vt[vo:vo + Skp]
                    v1 = Vt[vo + Skp:vo + 2 * Skp]
                    v2 = Vt[vo + 2 * Skp:vo + 3 * Skp]
                    v3 = Vt[vo + 3 * Skp:vo + 4 * Skp]
                    v4 = Vt[vo + 4 * Skp:vo + 5 * Skp]
                    v5 = Vt[vo + 5 * Skp:vo + 6 * Skp]
                    v6 = Vt[vo + 6 * Skp:vo + 7 * Skp]
                    v7 = Vt[vo + 7 * Skp:vo + 8 * Skp]
                    for j in range(Sk):
                        po = j * QB
                        x0 = _vload(P, po)
                        x1 = _vload(P, po + _VW)
                        w = _vbcast(v0[j])
                        a00 = _vfma(w, x0, a00)
                        a01 = _vfma(w, x1, a01)
                        w = _vbcast(v1[j])
                        a10 = _vfma(w, x0, a10)
                        a11 = _vfma(w, x1, a11)
                        w = _vbcast(v2[j])
                        a20 = _vfma(w, x0, a20)
                        a21 = _vfma(w, x1, a21)
                        w = _vbcast(v3[j])
                        a30 = _vfma(w, x0, a30)
                        a31 = _vfma(w, x1, a31)
                        w = _vbcast(v4[j])
                        a40 = _vfma(w, x0, a40)
                        a41 = _vfma(w, x1, a41)
                        w = _vbcast(v5[j])
                        a50 = _vfma(w, x0, a50)
                        a51 = _vfma(w, x1, a51)
                        w = _vbcast(v6[j])
                        a60 = _vfma(w, x0, a60)
                        a61 = _vfma(w, x1, a61)
                        w = _vbcast(v7[j])
                        a70 = _vfma(w, x0, a70)
                        a71 = _vfma(w, x1, a71)
                    if direct:
                        ob = (c0 + d0) * ocs + qb + i0
                        _vstore(out, ob, _vmul(a00, r0))
                        _vstore(out, ob + _VW, _vmul(a01, r1))
                        if d0 + 1 < D:
                            _vstore(out, ob + ocs, _vmul(a10, r0))
                            _vstore(out, ob + ocs + _VW, _vmul(a11, r1))
                        if d0 + 2 < D:
                            _vstore(out, ob + 2 * ocs, _vmul(a20, r0))
                            _vstore(out, ob + 2 * ocs + _VW, _vmul(a21, r1))
                        if d0 + 3 < D:
                            _vstore(out, ob + 3 * ocs, _vmul(a30, r0))
                            _vstore(out, ob + 3 * ocs + _VW, _vmul(a31, r1))
                        if d0 + 4 < D:
                            _vstore(out, ob + 4 * ocs, _vmul(a40, r0))
                            _vstore(out, ob + 4 * ocs + _VW, _vmul(a41, r1))
                        if d0 + 5 < D:
                            _vstore(out, ob + 5 * ocs, _vmul(a50, r0))
                            _vstore(out, ob + 5 * ocs + _VW, _vmul(a51, r1))
                        if d0 + 6 < D:
                            _vstore(out, ob + 6 * ocs, _vmul(a60, r0))
                            _vstore(out, ob + 6 * ocs + _VW, _vmul(a61, r1))
                        if d0 + 7 < D:
                            _vstore(out, ob + 7 * ocs, _vmul(a70, r0))
                            _vstore(out, ob + 7 * ocs + _VW, _vmul(a71, r1))
                    else:
                        ob = d0 * QB
                        _vstore(Ob, ob, _vmul(a00, r0))
                        _vstore(Ob, ob + _VW, _vmul(a01, r1))
                        _vstore(Ob, ob + QB, _vmul(a10, r0))
                        _vstore(Ob, ob + QB + _VW, _vmul(a11, r1))
                        _vstore(Ob, ob + 2 * QB, _vmul(a20, r0))
                        _vstore(Ob, ob + 2 * QB + _VW, _vmul(a21, r1))
                        _vstore(Ob, ob + 3 * QB, _vmul(a30, r0))
                        _vstore(Ob, ob + 3 * QB + _VW, _vmul(a31, r1))
                        _vstore(Ob, ob + 4 * QB, _vmul(a40, r0))
                        _vstore(Ob, ob + 4 * QB + _VW, _vmul(a41, r1))
                        _vstore(Ob, ob + 5 * QB, _vmul(a50, r0))
                        _vstore(Ob, ob + 5 * QB + _VW, _vmul(a51, r1))
                        _vstore(Ob, ob + 6 * QB, _vmul(a60, r0))
                        _vstore(Ob, ob + 6 * QB + _VW, _vmul(a61, r1))
                        _vstore(Ob, ob + 7 * QB, _vmul(a70, r0))
                        _vstore(Ob, ob + 7 * QB + _VW, _vmul(a71, r1))
                if not direct:
                    ni = min(QB, Sq - i0)
                    if fmo:
                        for d in range(D):
                            ob = (c0 + d) * ocs + qb + i0
                            for i in range(ni):
                                out[ob + i] = Ob[d * QB + i]
                    else:
                        for i in range(ni):
                            ob = (qb + i0 + i) * HD + c0
                            for d in range(D):
                                out[ob + d] = Ob[d * QB + i]


def attention_ref(q, k, v, mask, scale, H):
    """numpy reference of ``attention_heads``: q [B, Sq, H*D], k, v [B, Sk, H*D], mask None or
    broadcastable to [B, 1, 1, Sk]; returns [B, Sq, H*D] float32."""
    from .ref import softmax

    B, Sq, HD = q.shape
    Sk, D = k.shape[1], HD // H
    qh = q.reshape(B, Sq, H, D).transpose(0, 2, 1, 3).astype(np.float32)
    kh = k.reshape(B, Sk, H, D).transpose(0, 2, 3, 1).astype(np.float32)
    vh = v.reshape(B, Sk, H, D).transpose(0, 2, 1, 3).astype(np.float32)
    s = (qh @ kh) * np.float32(scale)
    p = softmax(s, None if mask is None else np.asarray(mask, np.float32), -1)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(B, Sq, HD).astype(np.float32)


if __name__ == "__main__":  # pragma: no cover
    _bench()
