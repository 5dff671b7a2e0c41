"""Transformer / elementwise pieces: layernorm, softmax (rows, after an additive mask), gelu,
embedding gather, and the generic in-place activation epilogue used by the runtime's BLAS path.

All kernels take C-contiguous float32 arrays, write preallocated outputs and run in parallel
over rows (``pjit``); the thread count is the caller's ``numba.set_num_threads``. Each has a
plain-numpy reference (``*_ref``). Measured on the 2-core dev machine (``python -m
sparsedge.kernels.nn``, 1 thread): layernorm 1024x768 numba 0.38 ms vs numpy 7.6 ms; gelu
393k elements numba 3.2 ms vs numpy+scipy.special.erf 4.1 ms; softmax rows and embedding gather
stay numpy (vectorised exp; ``np.take(out=)``), which measured faster than numba loops.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import jit, pjit
from .epilogue import _act_inplace as _epi_act
from .epilogue import tanh_f32
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
    """x, out [R, H] float32; w, b float32 [H] or empty; normalise each row (two-pass, float64 stats)."""
    R, H = x.shape
    hw = w.shape[0] > 0
    hb = b.shape[0] > 0
    for r in prange(R):
        row = x[r]
        o = out[r]
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


def embedding_into(ids, table, out):
    """ids int [n] (validated in range by the caller), table [V, H], out [n, H]: np.take with out=
    (0.016 ms for 256x256; a numba gather loop was not faster)."""
    np.take(table, ids, axis=0, out=out)


# --- numpy references --------------------------------------------------------------------------
def layernorm_ref(x, w=None, b=None, eps=1e-5):
    from ..runtime.reference import layernorm
    return layernorm(x, w, b, eps)


def softmax_ref(x, mask=None, axis=-1):
    from ..runtime.reference import softmax
    return softmax(x, mask, axis)


def gelu_ref(x, approximate="none"):
    from ..runtime.reference import gelu as g
    return g(x, approximate)


def act_ref(y, act_code, lo=0.0, hi=0.0):
    from ..runtime.reference import activation
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


if __name__ == "__main__":  # pragma: no cover
    _bench()


# --- softmax: one fused, parallel, vectorizable pass per row ----------------------------------
from llvmlite import ir as _ir  # noqa: E402
from numba.core import types as _nt  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402


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
from .simd import VW as _VW  # noqa: E402
from .simd import vbcast as _vbcast  # noqa: E402
from .simd import vfma as _vfma  # noqa: E402
from .simd import vload as _vload  # noqa: E402
from .simd import vstore as _vstore  # noqa: E402
from .simd import vzero as _vzero  # noqa: E402


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


@pjit
def attention_heads(q, k, v, mask, scale, out, B, Sq, Sk, H, D, ldq, ldkv, cs, ocs):
    """Multi-head attention core, torch layouts, no transposed copies:
    for every batch b and head h, ``out[b, :, h*D:(h+1)*D] = softmax(Q K^T * scale + mask[b % Bm]) V``
    with ``Q = q[b, :, h*D:(h+1)*D]`` (K, V alike from k, v).
    q, out: flat float32 of [B, Sq, H*D]; k, v: flat float32 of [B, Sk, H*D]; mask: float32
    [Bm, Sk] additive (Bm 1 or B) or [0, 0] (none); scale float32. Rows of q are ``ldq`` floats
    apart, rows of k and v ``ldkv`` (H*D for separate arrays; 3*H*D when q, k, v are offset views
    of one fused q|k|v linear output); out rows are H*D apart. cs: the stride between columns
    of q, k, v (1 in torch layout; feature-major q|k|v [3*H*D, B*S]: cs = B*S with ldq = ldkv = 1).
    Parallel over (b, h); per task K_h is transposed once into a [D, Sk] buffer (L1), scores are
    computed 4 query rows x 2 vectors of keys at a time in registers (``simd``), softmaxed in
    place, and multiplied by V_h (copied contiguous per task; D % VW == 0: 4 rows x 2 (or 1)
    vector tiles, otherwise plain loops). ocs: 1 writes out in torch layout; otherwise out is
    feature-major [H*D, B*Sq] with ocs = B*Sq (the head's rows are gathered in a per-task [Sq, D]
    buffer and written out column-wise, contiguous over tokens: the o-proj linear after it then
    needs no transpose)."""
    HD = H * D
    W2 = 2 * _VW
    Sp = max((Sk + W2 - 1) // W2 * W2, W2)
    hm = mask.shape[0] > 0
    Bm = max(mask.shape[0], 1)
    fastd = D % _VW == 0
    fmo = ocs != 1
    ld = D if fmo else HD
    for t in prange(B * H):
        b = t // H
        c0 = (t - b * H) * D
        Ob = np.empty(Sq * D if fmo else 0, np.float32)
        dst = Ob if fmo else out
        ob0 = 0 if fmo else c0
        rb = 0 if fmo else b * Sq
        Kt = np.empty(max(D, 1) * Sp, np.float32)
        P = np.empty(4 * Sp, np.float32)
        Qc = np.empty(4 * max(D, 1), np.float32)
        kb = b * Sk
        if cs == 1:
            for j in range(Sk):
                src = (kb + j) * ldkv + c0
                for d in range(D):
                    Kt[d * Sp + j] = k[src + d]
        else:  # feature-major: a head's column d is contiguous over tokens
            for d in range(D):
                src = kb * ldkv + (c0 + d) * cs
                for j in range(Sk):
                    Kt[d * Sp + j] = k[src + j * ldkv]
        for d in range(D):
            for j in range(Sk, Sp):
                Kt[d * Sp + j] = np.float32(0.0)
        # V_h copied contiguous: its rows in v are H*D floats apart, which maps them onto a few
        # L1 sets (1536-byte stride: 8 of 64) and made the P V loop 3x slower than Q K^T
        Vc = np.empty(max(Sk * D, 1), np.float32)
        if cs == 1:
            for j in range(Sk):
                src = (kb + j) * ldkv + c0
                for d in range(D):
                    Vc[j * D + d] = v[src + d]
        else:
            for d in range(D):
                src = kb * ldkv + (c0 + d) * cs
                for j in range(Sk):
                    Vc[j * D + d] = v[src + j * ldkv]
        mi = b % Bm
        for i0 in range(0, Sq, 4):
            nr = min(4, Sq - i0)
            qb = b * Sq
            r0 = (qb + i0) * ldq + c0 * cs
            r1 = (qb + min(i0 + 1, Sq - 1)) * ldq + c0 * cs
            r2 = (qb + min(i0 + 2, Sq - 1)) * ldq + c0 * cs
            r3 = (qb + min(i0 + 3, Sq - 1)) * ldq + c0 * cs
            w0 = (rb + i0) * ld + ob0
            w1 = (rb + min(i0 + 1, Sq - 1)) * ld + ob0
            w2 = (rb + min(i0 + 2, Sq - 1)) * ld + ob0
            w3 = (rb + min(i0 + 3, Sq - 1)) * ld + ob0
            for d in range(D):  # the 4 query rows' head slices, contiguous (L1) for the tile loop
                dc = d * cs
                Qc[4 * d] = q[r0 + dc]
                Qc[4 * d + 1] = q[r1 + dc]
                Qc[4 * d + 2] = q[r2 + dc]
                Qc[4 * d + 3] = q[r3 + dc]
            for jb in range(0, Sp, W2):
                a00 = _vzero()
                a01 = _vzero()
                a10 = _vzero()
                a11 = _vzero()
                a20 = _vzero()
                a21 = _vzero()
                a30 = _vzero()
                a31 = _vzero()
                for d in range(D):
                    k0 = _vload(Kt, d * Sp + jb)
                    k1 = _vload(Kt, d * Sp + jb + _VW)
                    x = _vbcast(Qc[4 * d + 0])
                    a00 = _vfma(x, k0, a00)
                    a01 = _vfma(x, k1, a01)
                    x = _vbcast(Qc[4 * d + 1])
                    a10 = _vfma(x, k0, a10)
                    a11 = _vfma(x, k1, a11)
                    x = _vbcast(Qc[4 * d + 2])
                    a20 = _vfma(x, k0, a20)
                    a21 = _vfma(x, k1, a21)
                    x = _vbcast(Qc[4 * d + 3])
                    a30 = _vfma(x, k0, a30)
                    a31 = _vfma(x, k1, a31)
                _vstore(P, jb, a00)
                _vstore(P, jb + _VW, a01)
                _vstore(P, Sp + jb, a10)
                _vstore(P, Sp + jb + _VW, a11)
                _vstore(P, 2 * Sp + jb, a20)
                _vstore(P, 2 * Sp + jb + _VW, a21)
                _vstore(P, 3 * Sp + jb, a30)
                _vstore(P, 3 * Sp + jb + _VW, a31)
            for r in range(nr):
                _softmax_inplace_row(P[r * Sp:(r + 1) * Sp], Sk, mask, mi, hm, scale)
            if fastd:
                D2 = D - D % W2
                for db in range(0, D2, W2):
                    o0 = _vzero()
                    o1 = _vzero()
                    o2 = _vzero()
                    o3 = _vzero()
                    e0 = _vzero()
                    e1 = _vzero()
                    e2 = _vzero()
                    e3 = _vzero()
                    for j in range(Sk):
                        vr = j * D + db
                        vv = _vload(Vc, vr)
                        vw = _vload(Vc, vr + _VW)
                        x = _vbcast(P[j])
                        o0 = _vfma(x, vv, o0)
                        e0 = _vfma(x, vw, e0)
                        x = _vbcast(P[Sp + j])
                        o1 = _vfma(x, vv, o1)
                        e1 = _vfma(x, vw, e1)
                        x = _vbcast(P[2 * Sp + j])
                        o2 = _vfma(x, vv, o2)
                        e2 = _vfma(x, vw, e2)
                        x = _vbcast(P[3 * Sp + j])
                        o3 = _vfma(x, vv, o3)
                        e3 = _vfma(x, vw, e3)
                    _vstore(dst, w0 + db, o0)
                    _vstore(dst, w0 + db + _VW, e0)
                    if nr > 1:
                        _vstore(dst, w1 + db, o1)
                        _vstore(dst, w1 + db + _VW, e1)
                    if nr > 2:
                        _vstore(dst, w2 + db, o2)
                        _vstore(dst, w2 + db + _VW, e2)
                    if nr > 3:
                        _vstore(dst, w3 + db, o3)
                        _vstore(dst, w3 + db + _VW, e3)
                for db in range(D2, D, _VW):
                    o0 = _vzero()
                    o1 = _vzero()
                    o2 = _vzero()
                    o3 = _vzero()
                    for j in range(Sk):
                        vv = _vload(Vc, j * D + db)
                        o0 = _vfma(_vbcast(P[j]), vv, o0)
                        o1 = _vfma(_vbcast(P[Sp + j]), vv, o1)
                        o2 = _vfma(_vbcast(P[2 * Sp + j]), vv, o2)
                        o3 = _vfma(_vbcast(P[3 * Sp + j]), vv, o3)
                    _vstore(dst, w0 + db, o0)
                    if nr > 1:
                        _vstore(dst, w1 + db, o1)
                    if nr > 2:
                        _vstore(dst, w2 + db, o2)
                    if nr > 3:
                        _vstore(dst, w3 + db, o3)
            else:
                for r in range(nr):
                    orow = (rb + i0 + r) * ld + ob0
                    for d in range(D):
                        dst[orow + d] = np.float32(0.0)
                    for j in range(Sk):
                        p = P[r * Sp + j]
                        vr = j * D
                        for d in range(D):
                            dst[orow + d] += p * Vc[vr + d]
        if fmo:
            for d in range(D):
                ob = (c0 + d) * ocs + b * Sq
                for i in range(Sq):
                    out[ob + i] = Ob[i * D + d]


def attention_ref(q, k, v, mask, scale, H):
    """numpy reference of ``attention_heads``: q [B, Sq, H*D], k, v [B, Sk, H*D], mask None or
    broadcastable to [B, 1, 1, Sk]; returns [B, Sq, H*D] float32."""
    from ..runtime.reference import softmax

    B, Sq, HD = q.shape
    Sk, D = k.shape[1], HD // H
    qh = q.reshape(B, Sq, H, D).transpose(0, 2, 1, 3).astype(np.float32)
    kh = k.reshape(B, Sk, H, D).transpose(0, 2, 3, 1).astype(np.float32)
    vh = v.reshape(B, Sk, H, D).transpose(0, 2, 1, 3).astype(np.float32)
    s = (qh @ kh) * np.float32(scale)
    p = softmax(s, None if mask is None else np.asarray(mask, np.float32), -1)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(B, Sq, HD).astype(np.float32)
