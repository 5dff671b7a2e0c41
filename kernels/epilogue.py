"""Fused epilogue: ``y = act(acc + bias + residual)``, applied inside every GEMM / conv kernel
while the output tile is still in L1 (same pass over the output).

Activation codes are ``table.ACTIVATIONS`` (ints). ``clamp`` uses ``lo``/``hi``; every other
code ignores them. ``relu6`` is ``clamp(0, 6)``; ``hardswish`` is ``y * relu6(y + 3) / 6``;
``gelu`` is the exact (erf) form, ``gelu_tanh`` the tanh approximation (as torch's
``approximate="tanh"``).

Jitted pieces (``epilogue_tile`` / ``epilogue_vec`` are called once per output row and N chunk,
not per tile, so they are ordinary jitted functions; the scalar helpers are inlined):

* ``epilogue_tile(yr, b, res, act, lo, hi)``: one output row segment ``yr`` (1-D float32 view),
  scalar bias ``b`` (float32, 0 when there is none), residual segment ``res`` (1-D float32 view
  of the same length, or length 0 for none).
* ``epilogue_vec(y, bias, res, act, lo, hi)``: a whole output vector (gemv / batch 1):
  ``bias`` float32 [out] or length 0, ``res`` float32 [out] or length 0.
* ``act_scalar(v, act, lo, hi)``: one value.

``epilogue_ref`` is the plain-numpy reference (float64 math, float32 result).
"""
from __future__ import annotations

import math

import numpy as np

from numba import prange

from ._jit import jit, pjit
from ._vnni import minmax_f32
from .table import (ACT_CLAMP, ACT_GELU, ACT_GELU_TANH, ACT_HARDSWISH, ACT_NONE, ACT_RELU, ACT_RELU6,
                    ACT_SIGMOID, ACT_SILU)

_SQRT1_2 = np.float32(0.7071067811865476)
_GELU_C = np.float32(0.7978845608028654)  # sqrt(2/pi)
_GELU_K = np.float32(0.044715)
_SIXTH = np.float32(1.0 / 6.0)


# Vectorizable float32 tanh / erf (rational approximations, as Eigen's fast float versions):
# only mul/add/div/min/max, so LLVM vectorizes the epilogue loops (libm erf/tanh/exp calls do
# not vectorize and cost 5x a 90%-sparse GEMM). Max abs error: tanh 3.3e-7, erf 3.8e-7,
# sigmoid/silu (via tanh) 2e-7 relative to the value scale, gelu 7e-7.
_TC = np.float32(7.90531110763549805)
_TA1, _TA3, _TA5, _TA7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                          np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_TA9, _TA11, _TA13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                      np.float32(-2.76076847742355e-16))
_TB0, _TB2, _TB4, _TB6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                          np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))
_EA1, _EA3, _EA5, _EA7 = (np.float32(-1.60960333262415e-02), np.float32(-2.95459980854025e-03),
                          np.float32(-7.34990630326855e-04), np.float32(-5.69250639462346e-05))
_EA9, _EA11, _EA13 = (np.float32(-2.10102402082508e-06), np.float32(2.77068142495902e-08),
                      np.float32(-2.72614225801306e-10))
_EB0, _EB2, _EB4, _EB6, _EB8 = (np.float32(-1.42647390514189e-02), np.float32(-7.37332916720468e-03),
                                np.float32(-1.68282697438203e-03), np.float32(-2.13374055278905e-04),
                                np.float32(-1.45660718464996e-05))


@jit(inline="always")
def tanh_f32(v):
    """tanh for float32, vectorizable (abs error <= 3.3e-7)."""
    x = min(max(v, -_TC), _TC)
    x2 = x * x
    p = ((((((x2 * _TA13 + _TA11) * x2 + _TA9) * x2 + _TA7) * x2 + _TA5) * x2 + _TA3) * x2 + _TA1) * x
    q = ((x2 * _TB6 + _TB4) * x2 + _TB2) * x2 + _TB0
    return p / q


@jit(inline="always")
def erf_f32(v):
    """erf for float32, vectorizable (abs error <= 3.8e-7)."""
    x = min(max(v, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = ((((((x2 * _EA13 + _EA11) * x2 + _EA9) * x2 + _EA7) * x2 + _EA5) * x2 + _EA3) * x2 + _EA1) * x
    q = (((x2 * _EB8 + _EB6) * x2 + _EB4) * x2 + _EB2) * x2 + _EB0
    return p / q


# Empty placeholders for "no bias" / "no residual" (kernels test ``.shape[0] == 0``).
EMPTY1 = np.zeros(0, dtype=np.float32)
EMPTY2 = np.zeros((0, 0), dtype=np.float32)


def none1(a):
    """None -> empty float32 1-D array (the jitted kernels' convention)."""
    return EMPTY1 if a is None else a


def none2(a):
    """None -> empty float32 2-D array."""
    return EMPTY2 if a is None else a


@jit
def act_scalar(v, act, lo, hi):
    """One float32 value through activation ``act``."""
    if act == ACT_NONE:
        return v
    if act == ACT_RELU:
        return max(v, np.float32(0.0))
    if act == ACT_RELU6:
        return min(max(v, np.float32(0.0)), np.float32(6.0))
    if act == ACT_CLAMP:
        return min(max(v, np.float32(lo)), np.float32(hi))
    if act == ACT_GELU:
        return np.float32(0.5) * v * (np.float32(1.0) + erf_f32(v * _SQRT1_2))
    if act == ACT_GELU_TANH:
        return np.float32(0.5) * v * (np.float32(1.0) + tanh_f32(_GELU_C * (v + _GELU_K * v * v * v)))
    if act == ACT_SILU:
        return v * (np.float32(0.5) + np.float32(0.5) * tanh_f32(np.float32(0.5) * v))
    if act == ACT_HARDSWISH:
        return v * min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) * _SIXTH
    if act == ACT_SIGMOID:
        return np.float32(0.5) + np.float32(0.5) * tanh_f32(np.float32(0.5) * v)
    return v


@jit
def _act_inplace(yr, act, lo, hi):
    """Activation over a 1-D float32 segment; one branch per segment so each loop vectorizes."""
    m = yr.shape[0]
    if act == ACT_NONE:
        return
    if act == ACT_RELU:
        for j in range(m):
            yr[j] = max(yr[j], np.float32(0.0))
    elif act == ACT_RELU6:
        for j in range(m):
            yr[j] = min(max(yr[j], np.float32(0.0)), np.float32(6.0))
    elif act == ACT_CLAMP:
        flo = np.float32(lo)
        fhi = np.float32(hi)
        for j in range(m):
            yr[j] = min(max(yr[j], flo), fhi)
    elif act == ACT_HARDSWISH:
        for j in range(m):
            v = yr[j]
            yr[j] = v * min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) * _SIXTH
    elif act == ACT_SIGMOID:
        for j in range(m):
            yr[j] = np.float32(0.5) + np.float32(0.5) * tanh_f32(np.float32(0.5) * yr[j])
    elif act == ACT_SILU:
        for j in range(m):
            v = yr[j]
            yr[j] = v * (np.float32(0.5) + np.float32(0.5) * tanh_f32(np.float32(0.5) * v))
    elif act == ACT_GELU:
        for j in range(m):
            v = yr[j]
            yr[j] = np.float32(0.5) * v * (np.float32(1.0) + erf_f32(v * _SQRT1_2))
    elif act == ACT_GELU_TANH:
        for j in range(m):
            v = yr[j]
            yr[j] = np.float32(0.5) * v * (np.float32(1.0) + tanh_f32(_GELU_C * (v + _GELU_K * v * v * v)))


@jit
def epilogue_tile(yr, b, res, act, lo, hi):
    """yr[:] = act(yr + b + res) for a 1-D row segment; ``res`` has len(yr) or 0."""
    m = yr.shape[0]
    if res.shape[0] != 0:
        for j in range(m):
            yr[j] = yr[j] + b + res[j]
    elif b != 0:
        for j in range(m):
            yr[j] = yr[j] + b
    _act_inplace(yr, act, lo, hi)


@jit
def epilogue_vec(y, bias, res, act, lo, hi):
    """y[:] = act(y + bias + res) for a whole 1-D output (bias/res of len(y) or 0)."""
    m = y.shape[0]
    if bias.shape[0] != 0:
        for j in range(m):
            y[j] = y[j] + bias[j]
    if res.shape[0] != 0:
        for j in range(m):
            y[j] = y[j] + res[j]
    _act_inplace(y, act, lo, hi)


@jit
def _ln_fm_block(yf, N, C, n0, m, w, b, eps, hw, hb):
    """Columns n0..n0+m-1 (m <= 64) of a flat feature-major y [C, N] (unsigned offsets: no negative-index
    wrap-around, the loops vectorize; signed 2-D indexing measured 4x slower)."""
    s = np.zeros(64, np.float64)
    v = np.zeros(64, np.float64)
    for c in range(C):
        o = np.uint64(c * N + n0)
        for j in range(m):
            s[j] += yf[o + np.uint64(j)]
    for j in range(m):
        s[j] = s[j] / C
    for c in range(C):
        o = np.uint64(c * N + n0)
        for j in range(m):
            d = yf[o + np.uint64(j)] - s[j]
            v[j] += d * d
    for j in range(m):
        v[j] = 1.0 / math.sqrt(v[j] / C + eps)
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for c in range(C):
        o = np.uint64(c * N + n0)
        wc = w[c] if hw else np.float32(1.0)
        bc = b[c] if hb else np.float32(0.0)
        for j in range(m):
            t = np.float32((yf[o + np.uint64(j)] - s[j]) * v[j] * wc + bc)
            yf[o + np.uint64(j)] = t
            lo = min(lo, t)
            hi = max(hi, t)
    return lo, hi


@pjit
def layernorm_fm(y, w, b, eps):
    """In place over the feature axis of a feature-major y [C, N] float32: every column n (a token)
    ``y[:, n] = (y[:, n] - mean) / sqrt(var + eps) * w + b`` (two-pass, float64 statistics, the
    same operations per element as the row layernorm of ``kernels.nn``); w, b float32 [C] or
    empty. Column blocks of 64 in parallel (a block's rows stay in L2 over the three passes):
    BERT's 384 x 1024 in 0.12 ms on 2 threads. Returns (min(min(y), 0), max(max(y), 0)) of the
    result as float32 (taken in the last pass: a dynamic per-tensor int8 quantization of y by
    the next linear needs no min / max pass of its own)."""
    C, N = y.shape
    hw = w.shape[0] > 0
    hb = b.shape[0] > 0
    yf = y.reshape(-1)
    nfull = N // 64
    mlo = np.zeros(nfull + 1, np.float32)
    mhi = np.zeros(nfull + 1, np.float32)
    for t in prange(nfull):  # the body written out with a constant 64: the sums stay in
        n0 = t * 64          # registers (a shared helper with a variable width measured 2x slower)
        s = np.zeros(64, np.float64)
        v = np.zeros(64, np.float64)
        mn = np.zeros(64, np.float32)
        mx = np.zeros(64, np.float32)
        for c in range(C):
            o = np.uint64(c * N + n0)
            for j in range(64):
                s[j] += yf[o + np.uint64(j)]
        for j in range(64):
            s[j] = s[j] / C
        for c in range(C):
            o = np.uint64(c * N + n0)
            for j in range(64):
                d = yf[o + np.uint64(j)] - s[j]
                v[j] += d * d
        for j in range(64):
            v[j] = 1.0 / math.sqrt(v[j] / C + eps)
        for c in range(C):
            o = np.uint64(c * N + n0)
            wc = w[c] if hw else np.float32(1.0)
            bc = b[c] if hb else np.float32(0.0)
            for j in range(64):
                r = np.float32((yf[o + np.uint64(j)] - s[j]) * v[j] * wc + bc)
                yf[o + np.uint64(j)] = r
                mn[j] = min(mn[j], r)
                mx[j] = max(mx[j], r)
        mlo[t] = mn.min()
        mhi[t] = mx.max()
    if N % 64:
        mlo[nfull], mhi[nfull] = _ln_fm_block(yf, N, C, nfull * 64, N % 64, w, b, eps, hw, hb)
    return mlo.min(), mhi.max()


@pjit
def act_minmax(y, act, lo, hi):
    """y 1-D float32 (a flat view) = act(y) in place, in chunks of 4096 in parallel; returns
    (min(min(y), 0), max(max(y), 0)) of the result as float32, taken per chunk while in L1 (for the
    dynamic per-tensor int8 quantization of y by the next linear)."""
    n = y.shape[0]
    chunk = 4096
    nch = (n + chunk - 1) // chunk
    mlo = np.zeros(nch + 1, np.float32)
    mhi = np.zeros(nch + 1, np.float32)
    for c in prange(nch):
        s = c * chunk
        e = min(n, s + chunk)
        seg = y[s:e]
        _act_inplace(seg, act, lo, hi)
        mlo[c], mhi[c] = minmax_f32(seg)
    return mlo.min(), mhi.max()


def layernorm_fm_ref(y, w=None, b=None, eps=1e-5):
    """numpy reference of ``layernorm_fm`` (float64), returns a new float32 [C, N]."""
    y = np.asarray(y, np.float64)
    mu = y.mean(axis=0)
    var = ((y - mu) ** 2).mean(axis=0)
    t = (y - mu) / np.sqrt(var + eps)
    if w is not None and len(w):
        t = t * np.asarray(w, np.float64)[:, None]
    if b is not None and len(b):
        t = t + np.asarray(b, np.float64)[:, None]
    return t.astype(np.float32)


def _erf(a):
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(a)


def act_ref(y: np.ndarray, act: int, lo: float = 0.0, hi: float = 0.0) -> np.ndarray:
    """Numpy reference of the activation codes (float64 math)."""
    y = np.asarray(y, dtype=np.float64)
    if act == ACT_NONE:
        return y
    if act == ACT_RELU:
        return np.maximum(y, 0)
    if act == ACT_RELU6:
        return np.clip(y, 0, 6)
    if act == ACT_CLAMP:
        return np.minimum(np.maximum(y, lo), hi)
    if act == ACT_GELU:
        return 0.5 * y * (1 + _erf(y / np.sqrt(2)))
    if act == ACT_GELU_TANH:
        return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    if act == ACT_SILU:
        return y / (1 + np.exp(-y))
    if act == ACT_HARDSWISH:
        return y * np.clip(y + 3, 0, 6) / 6
    if act == ACT_SIGMOID:
        return 1 / (1 + np.exp(-y))
    raise ValueError(f"unknown activation code {act}")


def epilogue_ref(acc, bias=None, act=ACT_NONE, lo=0.0, hi=0.0, residual=None) -> np.ndarray:
    """act(acc + bias[:, None] + residual) in float64, returned as float32. acc [out, N] or [out]."""
    y = np.asarray(acc, dtype=np.float64)
    if bias is not None and len(bias):
        b = np.asarray(bias, dtype=np.float64)
        y = y + (b[:, None] if y.ndim == 2 else b)
    if residual is not None and np.size(residual):
        y = y + np.asarray(residual, dtype=np.float64).reshape(y.shape)
    return act_ref(y, act, lo, hi).astype(np.float32)
