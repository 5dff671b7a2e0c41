"""int8 GEMM kernels: ``Y[out, N] float32 = dequant(Wq[out, in] int8 @ Xq[in, N])`` + fused epilogue.

Weights: ``dense_i8`` (symmetric or affine, per channel or per tensor), ``csr_i8``, ``bsr_i8``
(any block shape). Activations X ``[in, N]`` float32 are quantized on the fly to **uint8**
with a zero point, per call:

* dynamic per tensor (default, = ONNX DynamicQuantizeLinear):
  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``sx = (hi - lo) / 255`` (1 if 0),
  ``zx = clip(rint(-lo / sx), 0, 255)``;
* dynamic per column (per token; ``granularity="column"``): the same per column n;
* static: a given ``scale`` / ``zero_point`` (``set_act_quant``; an int8 zero point z of
  ``Graph.act_quant`` is the uint8 zero point z + 128 -- the same numbers).

``xq = clip(rint(x * float32(1 / sx)) + zx, 0, 255)`` (float32 arithmetic; the numpy
reference ``quantize_ref`` does exactly the same). All integer work is exact (int32
accumulators, int64 corrections):

    acc[o, n]  = sum_k xq[k, n] * wq[o, k]
    corr[o, n] = acc - zx[n] * rowsum(wq)[o] - zw[o] * (colsum(xq)[n] - in * zx[n])
    y[o, n]    = act(float32(corr) * float32(sx[n] * sw[o]) + bias[o] + residual[o, n])

The corrections are exact integers; the fast paths carry them in float64 (exact below 2**53,
one rounding to float32 like the int64 reference) so the dequantize loop vectorizes.

Paths (one row each in ``KERNELS``; every path gives bit-identical ``y``; ``default_path()``
picks amx > vnni > portable, ``extra["priority"]`` says the same to the runtime):

* ``dense_i8_amx`` (x86 with AMX-INT8, e.g. Sapphire Rapids; Linux must grant tile-data
  permission, asked once by ``amx_available()`` -- without it prepare() falls back to VNNI):
  ``tdpbsud`` (s8 weights x u8 activations) through the ``amx_block`` intrinsic, 2x2 tiles of
  16x16 int32 per 32 rows x 32 columns. Weights repacked at load into contiguous 16 x 64-byte A
  tiles (``[ceil(out/32)*2, ceil(in/64), 16, 64]``, zero padded: same bytes as the file when
  aligned); activations packed ``[Npad32/16, ceil(in/64)*16, 16, 4]`` while quantizing.
  Tasks of 32 rows x all columns, dequantized + epilogue while hot.
* ``*_vnni`` (x86 with ``avx512_vnni``): ``vpdpbusd`` (u8 x s8) through the ``vnni_tile``
  intrinsic (``_vnni.py``). Activations packed ``[ceil(in/4), Npad16, 4]`` uint8 while
  quantizing. dense: register tiles 8 rows x 48 columns (24 zmm accumulators, measured best of
  8x4/8x3/6x4/4x4/8x2), weights used straight from the file when ``in % 4 == 0`` (else padded
  once). csr and bsr r x 1 (r % 4 == 0): "groups" -- for every group of R output rows (R = 1
  for csr, 8 or 4 for bsr) the distinct input features holding a non-zero, taken 4 at a time in
  any order (``_groups``; the last group padded with zero weights), weights int8 [ng, R, 4].
  Activations quantized to uint8 ``[in, Npad64]`` (64-byte aligned rows, columns permuted inside
  each 64 so the register interleaves come out in natural order); dynamic per-tensor
  quantization runs inside the GEMM's own parallel call (``_quant_phase``: chunked min / max and
  quantization claimed by the threads that arrive first, bounded waits), then the workers take
  GEMM tasks from an atomic counter (one parallel region per call; a pool thread that wakes late
  or is preempted takes less work instead of holding up a static half). Per group the 4 activation
  rows are byte-interleaved in registers: bsr (``vnni_gather4``) punpck bw + wd into 16 columns x
  4 features per zmm, shared by the R rows; csr (``vnni_pairs``) as 2 pairs, punpck bw only and
  2 vpdpbusd per pair ("even"/"odd" weight dwords) -- vpdpbusd issues on ports 0 and 5, shuffles
  on 5 only, so this balances the ports (measured 5% faster than bw + wd for R = 1). The
  dequantize (+ bias) is fused into the register epilogue when int32 corrections are exact
  (K < 33156; ``*_deq`` intrinsics, y stored from zmm, masked last vector), then residual and
  activation run on the task's hot rows (one loop per activation code). Other blocks (1 x c,
  4 x 4, 2 x 2): "quads" -- the input groups of 4 aligned features holding a non-zero, with
  the R x 4 int8 weights (zeros filled). Tasks of R rows (16 for R = 1) x all columns, fused
  dequantize.
* portable (any CPU, plain loops): activations shifted to int8 (``xq - 128``, corrected by
  ``128 * rowsum``). Dense uses the dot form (``x`` transposed to ``[N, in]``, a contiguous
  int8 dot product per output) which LLVM turns into ``sdot`` on aarch64 cores with the
  dot-product extension (cortex-a76, neoverse-n1) and ``vpmaddwd`` on x86; csr/bsr loop over
  non-zeros with contiguous int32 accumulators over N.
* ``*_gemv`` (N = 1, memory-bound decoding): dot form (dense) / gather over row-wise non-zeros
  (csr; bsr repacked row-wise at load), no activation packing.

``prepare(wf, act_quant=None, granularity="tensor", path=None)`` returns a dict ``packed``
(``packed["repack_bytes"]``, ``packed["repack_s"]`` report the load-time repack cost);
``run(packed, x, y, bias, act, lo, hi, residual)`` as in ``kernels/table.py``.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
from numba import prange

from . import cpu as _cpu
from ._jit import jit, pjit
from ._vnni import (amx_block, amx_config, minmax_f32, permute_chunks, vnni_dot4, vnni_gather4,
                    vnni_gather4_deq, vnni_pairs, vnni_pairs_deq, vnni_tile, num_threads, quant_chunks, spin_until)
from .epilogue import _act_inplace, act_ref, act_scalar, epilogue_tile
from .simd import fetch_add
from .table import (ACT_CLAMP, ACT_GELU, ACT_GELU_TANH, ACT_HARDSWISH, ACT_NONE, ACT_RELU, ACT_RELU6, ACT_SIGMOID,
                    ACT_SILU, KernelSpec)

__all__ = ["KERNELS", "prepare", "set_act_quant", "quantize_activations", "quantize_ref", "act_params",
           "gemm_ref", "vnni_available", "amx_available", "default_path", "run_amx", "run_vnni", "run_portable",
           "run_gemv"]

_F32 = np.float32
_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_F32_2D = np.empty((0, 0), np.float32)
_EMPTY_I32 = np.empty(0, np.int32)
_EMPTY_F64 = np.empty(0, np.float64)
_TILE_R = 8  # dense VNNI tile rows
_K_I32 = (2 ** 31 - 1) // (2 * 255 * 127)  # up to this many input features corrections fit int32
_TILE_C = 48  # dense VNNI column tile (3 zmm of 16 int32): 24 accumulators, measured best of 8x4/8x3/6x4/4x4/8x2


def vnni_available() -> bool:
    """x86 with avx512_vnni (vpdpbusd on zmm)."""
    return _cpu.cpu_info()["arch"] == "x86_64" and _cpu.has("avx512_vnni")


def amx_available() -> bool:
    """x86 with AMX-INT8 and the OS granted tile-data permission (asked once, here)."""
    if not (_cpu.cpu_info()["arch"] == "x86_64" and _cpu.has("amx_int8") and _cpu.has("amx_tile")):
        return False
    from ._vnni import amx_enable
    return amx_enable()


def default_path() -> str:
    """Best int8 GEMM path for this CPU: "amx", "vnni" or "portable"."""
    return "amx" if amx_available() else "vnni" if vnni_available() else "portable"


# ----------------------------------------------------------------------------------------------
# epilogue: kernels/epilogue.py (shared with the float32 kernels); y = act(v + bias + residual)
@jit(inline="always")
def _epi(corr, s, o, n, bias, residual, act, lo, hi):
    """One output of the portable paths: the same float32 operations as ``_deq_row``."""
    v = _F32(corr) * s
    if residual.shape[0] > 0:
        v = v + (bias[o] if bias.shape[0] > 0 else _F32(0.0)) + residual[o, n]
    elif bias.shape[0] > 0:
        v = v + bias[o]
    return act_scalar(v, act, lo, hi)


def _act_ref(v, act, lo, hi):
    return act_ref(v, act, lo, hi).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# activation quantization
@jit(inline="always")
def _q(v, inv, zpf):
    t = np.rint(v * inv) + zpf
    t = min(max(t, _F32(0.0)), _F32(255.0))
    return np.int32(t)


@jit(inline="always")
def _q4(x, k0, K, n, inv, zpf):
    """4 quantized features k0..k0+3 (zeros past K) of column n packed little-endian in a uint32."""
    v = np.uint32(0)
    for j in range(4):
        if k0 + j < K:
            v |= np.uint32(_q(x[k0 + j, n], inv[n], zpf[n])) << np.uint32(8 * j)
    return v


@pjit
def _quant_x4(x, inv, zpf, x4w, npad, G):
    """x float32 [K, N] -> x4w uint32 flat [G, npad] = uint8 [G, npad, 4] (x4[g, n, j] = xq[4g+j, n]),
    G >= ceil(K/4); zeros in the padding."""
    K, N = x.shape
    for g in prange(G):
        base = g * npad
        k0 = 4 * g
        if k0 + 4 <= K:
            r0 = x[k0]
            r1 = x[k0 + 1]
            r2 = x[k0 + 2]
            r3 = x[k0 + 3]
            for n in range(N):
                x4w[base + n] = (np.uint32(_q(r0[n], inv[n], zpf[n]))
                                 | (np.uint32(_q(r1[n], inv[n], zpf[n])) << np.uint32(8))
                                 | (np.uint32(_q(r2[n], inv[n], zpf[n])) << np.uint32(16))
                                 | (np.uint32(_q(r3[n], inv[n], zpf[n])) << np.uint32(24)))
        else:
            for n in range(N):
                x4w[base + n] = _q4(x, k0, K, n, inv, zpf)
        for n in range(N, npad):
            x4w[base + n] = 0


@pjit
def _quant_x4t(x, inv, zpf, xw, npad, G):
    """AMX layout: x float32 [K, N] -> xw uint32 flat [npad/16, G, 16] (16-column blocks, each a
    run of G rows of 64 bytes = one contiguous AMX B tile per 16 groups)."""
    K, N = x.shape
    for g in prange(G):
        k0 = 4 * g
        full = k0 + 4 <= K
        for cb in range(npad // 16):
            base = (cb * G + g) * 16 - cb * 16
            n0 = cb * 16
            n1 = min(n0 + 16, N)
            if full:
                r0 = x[k0]
                r1 = x[k0 + 1]
                r2 = x[k0 + 2]
                r3 = x[k0 + 3]
                for n in range(n0, n1):
                    xw[base + n] = (np.uint32(_q(r0[n], inv[n], zpf[n]))
                                    | (np.uint32(_q(r1[n], inv[n], zpf[n])) << np.uint32(8))
                                    | (np.uint32(_q(r2[n], inv[n], zpf[n])) << np.uint32(16))
                                    | (np.uint32(_q(r3[n], inv[n], zpf[n])) << np.uint32(24)))
            else:
                for n in range(n0, n1):
                    xw[base + n] = _q4(x, k0, K, n, inv, zpf)
            for n in range(n1, n0 + 16):
                xw[base + n] = 0


@pjit
def _quant_kn(x, inv, zpf, xs):
    """x float32 [K, N] -> xs int8 [K, N] = xq - 128."""
    K, N = x.shape
    for k in prange(K):
        r = x[k]
        o = xs[k]
        for n in range(N):
            o[n] = np.int8(_q(r[n], inv[n], zpf[n]) - 128)


@pjit
def _quant_nk(x, inv, zpf, xt):
    """x float32 [K, N] -> xt int8 [N, K] = (xq - 128) transposed."""
    K, N = x.shape
    nb = (K + 255) // 256
    for b in prange(nb):
        k0 = b * 256
        k1 = min(k0 + 256, K)
        for n in range(N):
            o = xt[n]
            for k in range(k0, k1):
                o[k] = np.int8(_q(x[k, n], inv[n], zpf[n]) - 128)


def act_params(x, granularity="tensor"):
    """Dynamic quantization parameters of x float32 [K, N]: (scale f32 [N], zero_point i32 [N]),
    per tensor (the same value repeated) or per column. Float32 arithmetic as ONNX."""
    K, N = x.shape
    if granularity == "tensor":
        if K == 0 or N == 0:
            lo = hi = _F32(0)
        else:  # numpy's SIMD reductions: measured faster than a numba prange (9 vs 63 us at 768x128)
            lo, hi = x.min(), x.max()
        lo, hi = np.asarray([lo], _F32), np.asarray([hi], _F32)
    elif granularity == "column":
        lo = x.min(axis=0) if K else np.zeros(N, _F32)
        hi = x.max(axis=0) if K else np.zeros(N, _F32)
    else:
        raise ValueError(f"granularity must be 'tensor' or 'column', got {granularity!r}")
    lo = np.minimum(lo, _F32(0))
    hi = np.maximum(hi, _F32(0))
    scale = ((hi - lo) / _F32(255)).astype(_F32)
    scale[~(scale > 0) | ~np.isfinite(scale)] = 1
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(np.int32)
    if granularity == "tensor":
        scale, zp = np.full(N, scale[0], _F32), np.full(N, zp[0], np.int32)
    return scale, zp


@jit(fastmath=False)  # IEEE float32 division and rounding, as act_params
def _tensor_params(x):
    """Dynamic per-tensor parameters of x float32 [K, N] (C-contiguous) in one call: (sx f32 [N],
    zx i32 [N], inv = 1/sx f32 [N], zx as f32 [N]); the same float32 operations as ``act_params``
    (which costs about 10 small numpy calls)."""
    return _params_from_minmax(minmax_f32(x), x.shape[1])


@jit(fastmath=False)  # IEEE float32 division and rounding, as act_params
def _scalar_params(lo, hi):
    """(sx, zx int32, 1 / sx, zx as float32) from lo = min(min(x), 0), hi = max(max(x), 0)."""
    sc = (hi - lo) / np.float32(255.0)
    if not (sc > np.float32(0.0)) or not np.isfinite(sc):
        sc = np.float32(1.0)
    z = np.rint(-lo / sc)
    z = min(max(z, np.float32(0.0)), np.float32(255.0))
    zi = np.int32(z)
    return sc, zi, np.float32(1.0) / sc, np.float32(zi)


@jit(fastmath=False)  # IEEE float32 division and rounding, as act_params
def _params_from_minmax(lohi, N):
    """(sx, zx, inv, zx as f32), each [N], from lohi = (min(min(x), 0), max(max(x), 0))."""
    sc, zi, iv, zf = _scalar_params(lohi[0], lohi[1])
    return (np.full(N, sc, np.float32), np.full(N, zi, np.int32), np.full(N, iv, np.float32),
            np.full(N, zf, np.float32))


def _params(packed, x, minmax=None):
    """(sx, zx, inv, zx as f32), each [N]; minmax: (min(min(x), 0), max(max(x), 0)) when known
    (dynamic per-tensor only: the same parameters without the min / max pass)."""
    aq = packed["act_quant"]
    N = x.shape[1]
    if aq is None and packed["granularity"] == "tensor" and minmax is not None:
        return _params_from_minmax((_F32(min(minmax[0], 0)), _F32(max(minmax[1], 0))), N)
    if aq is None and packed["granularity"] == "tensor" and x.flags.c_contiguous:
        return _tensor_params(x)
    if aq is None:
        sx, zx = act_params(x, packed["granularity"])
    else:
        sx = np.full(N, aq[0], _F32)
        zx = np.full(N, aq[1], np.int32)
    inv = (_F32(1) / sx).astype(_F32)
    return sx, zx, inv, zx.astype(_F32)


def quantize_activations(x, scale=None, zero_point=None, granularity="tensor"):
    """x float32 [K, N] -> (xq uint8 [K, N], scale f32 [N], zero_point i32 [N]) with the kernels'
    own quantizer (static when scale / zero_point are given)."""
    x = np.ascontiguousarray(x, dtype=_F32)
    p = {"act_quant": None if scale is None else (float(scale), int(zero_point)), "granularity": granularity}
    sx, zx, inv, zpf = _params(p, x)
    xs = np.empty(x.shape, np.int8)
    _quant_kn(x, inv, zpf, xs)
    return (xs.view(np.uint8) ^ np.uint8(128)), sx, zx


def quantize_ref(x, scale=None, zero_point=None, granularity="tensor"):
    """numpy reference of ``quantize_activations`` (same float32 operations)."""
    x = np.asarray(x, dtype=_F32)
    K, N = x.shape
    if scale is None:
        if granularity == "tensor":
            lo = np.full(N, min(x.min(), 0) if x.size else 0, _F32)
            hi = np.full(N, max(x.max(), 0) if x.size else 0, _F32)
        else:
            lo = np.minimum(x.min(axis=0), 0).astype(_F32) if K else np.zeros(N, _F32)
            hi = np.maximum(x.max(axis=0), 0).astype(_F32) if K else np.zeros(N, _F32)
        sx = ((hi - lo) / _F32(255)).astype(_F32)
        sx[~(sx > 0) | ~np.isfinite(sx)] = 1
        zx = np.clip(np.rint(-lo / sx), 0, 255).astype(np.int32)
    else:
        sx = np.full(N, scale, _F32)
        zx = np.full(N, zero_point, np.int32)
    inv = (_F32(1) / sx).astype(_F32)
    t = np.rint(x * inv[None, :]) + zx.astype(_F32)[None, :]
    xq = np.clip(t, 0, 255).astype(np.uint8)
    return xq, sx, zx


# ----------------------------------------------------------------------------------------------
# VNNI kernels (compiled only when called, i.e. on CPUs with avx512_vnni)


@jit(inline="always")
def _deq_row(a, yo, o, rowsum, zw, affine, czx, cz, sx, sw, bias, residual, act, lo, hi):
    """yo[n] = act(float32(corr) * float32(sx[n] * sw[o]) + bias[o] + residual[o, n]) for n < len(yo),
    from int32 sums a[n]. corr = a + czx[n] * rowsum[o] - zw[o] * cz[n] (cz = 0 unless affine) is an
    exact integer carried in float64 (|values| < 2**53; one rounding to float32, the same as the
    int64 reference's), which vectorizes."""
    N = yo.shape[0]
    rs = np.float64(rowsum[o])
    swo = sw[o]
    zwo = np.float64(zw[o]) if affine else 0.0
    for n in range(N):
        yo[n] = _F32(np.float64(a[n]) + czx[n] * rs - zwo * cz[n]) * (sx[n] * swo)
    b = bias[o] if bias.shape[0] > 0 else _F32(0.0)
    ro = residual[o] if residual.shape[0] > 0 else sx[:0]
    epilogue_tile(yo, b, ro, act, lo, hi)


@jit(inline="always")
def _act_rows(y, r0, r1, act, lo, hi):
    """y[r0:r1, :] = act(y) in place, one loop per activation with the code as a constant (the
    per-element switch of ``act_scalar(v, act, ...)`` with a variable code does not vectorize:
    measured ~6 cycles per element for relu)."""
    N = y.shape[1]
    if act == ACT_RELU:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_RELU, lo, hi)
    elif act == ACT_RELU6:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_RELU6, lo, hi)
    elif act == ACT_CLAMP:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_CLAMP, lo, hi)
    elif act == ACT_GELU:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_GELU, lo, hi)
    elif act == ACT_GELU_TANH:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_GELU_TANH, lo, hi)
    elif act == ACT_SILU:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_SILU, lo, hi)
    elif act == ACT_HARDSWISH:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_HARDSWISH, lo, hi)
    elif act == ACT_SIGMOID:
        for o in range(r0, r1):
            for n in range(N):
                y[o, n] = act_scalar(y[o, n], ACT_SIGMOID, lo, hi)


@jit(inline="always")
def _deq_rows_i32(acc, r0, nr, o0, rowsum, czx32, sx, sw, bias, residual, act, lo, hi, y):
    """y[o0 + r, :] for r < nr from int32 sums acc[r0 + r, :], symmetric weights, when every
    correction fits int32 (K * 255 * 127 * 2 < 2**31): corr = acc + czx32[n] * rowsum[o] exactly,
    one rounding to float32 (the value of the int64 reference), then the epilogue with the
    reference's float32 order ((v + bias) + residual, then act). 2-D indexing, no row views and
    no calls: per-row views / calls increment shared reference counts (atomics that two threads
    fight over, measured ~40 us per 3072 rows)."""
    N = y.shape[1]
    hb = bias.shape[0] > 0
    hr = residual.shape[0] > 0
    for r in range(nr):
        o = o0 + r
        ra = r0 + r
        rs = rowsum[o]
        swo = sw[o]
        b = bias[o] if hb else _F32(0.0)
        if hr:
            for n in range(N):
                y[o, n] = _F32(np.int32(acc[ra, n] + czx32[n] * rs)) * (sx[n] * swo) + b + residual[o, n]
        elif hb:
            for n in range(N):
                y[o, n] = _F32(np.int32(acc[ra, n] + czx32[n] * rs)) * (sx[n] * swo) + b
        else:
            for n in range(N):
                y[o, n] = _F32(np.int32(acc[ra, n] + czx32[n] * rs)) * (sx[n] * swo)
    _act_rows(y, o0, o0 + nr, act, lo, hi)


@pjit(fastmath=False)  # no FMA contraction in the fused dequantize
def _dense_vnni(w, K4, out, x4, npad, rowsum, zw, affine, czx, cz, czx32, sx, sw, bias, residual, act, lo, hi, y):
    """y [out, N] = dequant(w x x4) + epilogue. w int8 flat [out, K4] (K4 % 4 == 0), x4 uint8 flat
    [K4/4, npad, 4]. Task: 8 rows x all columns (register tiles of 8 x 48), then the 8 rows are
    dequantized while hot."""
    G = K4 // 4
    xgs = npad * 4
    nrb = (out + _TILE_R - 1) // _TILE_R
    dummy = np.empty(0, np.int32)
    for rb in prange(nrb):
        r0 = rb * _TILE_R
        acc = np.empty((_TILE_R, npad), np.int32)
        for c0 in range(0, npad, _TILE_C):
            nt = min(_TILE_C // 16, (npad - c0) // 16)
            if r0 + _TILE_R <= out:
                wo = r0 * K4
                if nt == 3:
                    vnni_tile(8, 3, False, acc, c0, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
                elif nt == 2:
                    vnni_tile(8, 2, False, acc, c0, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
                else:
                    vnni_tile(8, 1, False, acc, c0, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
            else:
                for o in range(r0, out):
                    wo = o * K4
                    ao = (o - r0) * npad + c0
                    if nt == 3:
                        vnni_tile(1, 3, False, acc, ao, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
                    elif nt == 2:
                        vnni_tile(1, 2, False, acc, ao, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
                    else:
                        vnni_tile(1, 1, False, acc, ao, npad, x4, c0 * 4, xgs, dummy, w, wo, K4, 4, 0, G)
        nr = min(_TILE_R, out - r0)
        if czx32.shape[0] > 0:  # symmetric weights, int32-exact corrections
            _deq_rows_i32(acc, 0, nr, r0, rowsum, czx32, sx, sw, bias, residual, act, lo, hi, y)
        else:
            for r in range(nr):
                o = r0 + r
                _deq_row(acc[r], y[o], o, rowsum, zw, affine, czx, cz, sx, sw, bias, residual, act, lo, hi)


@pjit(fastmath=False)  # no FMA contraction in the fused dequantize
def _dense_amx(cfg, w, nk, out, xw, npad, rowsum, zw, affine, czx, cz, czx32, sx, sw, bias, residual, act, lo, hi,
               y):
    """y [out, N] = dequant(w x xw) + epilogue. w int8 tiled [ceil(out/32)*2, nk, 16, 64] (16-row x
    64-feature AMX A tiles, contiguous), xw uint8 [npad/16, 16*nk, 16, 4] (contiguous B tiles),
    npad % 32 == 0. Task: 32 rows x all columns (the W block stays in L1 across the column tiles),
    then the 32 rows are dequantized while their int32 sums are hot (no [out, N] int32 pass)."""
    nrb = (out + 31) // 32
    nct = npad // 32
    G = 16 * nk
    for rb in prange(nrb):
        acc = np.empty((32, npad), np.int32)
        for ct in range(nct):
            amx_block(cfg, acc, ct * 128, npad * 4, w, 2 * rb * nk * 1024, nk * 1024, 1024, 64,
                      xw, 2 * ct * G * 64, G * 64, 1024, 64, nk, 0)
        nr = min(32, out - rb * 32)
        if czx32.shape[0] > 0:  # symmetric weights, int32-exact corrections
            _deq_rows_i32(acc, 0, nr, rb * 32, rowsum, czx32, sx, sw, bias, residual, act, lo, hi, y)
        else:
            for r in range(nr):
                o = rb * 32 + r
                _deq_row(acc[r], y[o], o, rowsum, zw, affine, czx, cz, sx, sw, bias, residual, act, lo, hi)


@pjit(fastmath=False)  # no FMA contraction in the fused dequantize
def _quads_vnni(R, qptr, qidx, qw, out, x4, npad, rowsum, czx, cz, czx32, sx, sw, bias, residual, act, lo, hi, y):
    """y [out, N] from quad-sparse weights: block row b (rows b*R..) has quads qptr[b]..qptr[b+1];
    quad q covers input features 4*qidx[q]..+3 with weights qw flat [nq, R, 4]. R in (1, 4, 8).
    Task: TB block rows (16 for R = 1, else 1) x all columns, dequantized while hot (int32 when
    czx32 is not empty, see ``_deq_rows_i32``). R = 1 uses 8 accumulators (128 columns) per pass:
    4 left vpdpbusd latency-bound (5 cycles, 2 per cycle)."""
    nrb = qptr.shape[0] - 1
    xgs = npad * 4
    tc = 48 if R == 8 else 64 if R == 4 else 128  # 24, 16 or 8 accumulators
    zw = np.empty(0, np.int32)
    TB = 16 if R == 1 else 1
    ntask = (nrb + TB - 1) // TB
    for t in prange(ntask):
        b0 = t * TB
        b1 = min(b0 + TB, nrb)
        acc = np.empty((R * TB, npad), np.int32)
        af = acc.reshape(-1)
        for rb in range(b0, b1):
            q0 = qptr[rb]
            q1 = qptr[rb + 1]
            ao = (rb - b0) * R * npad
            for c0 in range(0, npad, tc):
                nt = min(tc // 16, (npad - c0) // 16)
                if R == 8:
                    if nt == 3:
                        vnni_tile(8, 3, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 32, q0, q1)
                    elif nt == 2:
                        vnni_tile(8, 2, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 32, q0, q1)
                    else:
                        vnni_tile(8, 1, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 32, q0, q1)
                elif R == 4:
                    if nt == 4:
                        vnni_tile(4, 4, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 16, q0, q1)
                    elif nt == 3:
                        vnni_tile(4, 3, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 16, q0, q1)
                    elif nt == 2:
                        vnni_tile(4, 2, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 16, q0, q1)
                    else:
                        vnni_tile(4, 1, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 16, q0, q1)
                else:
                    if nt == 8:
                        vnni_tile(1, 8, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
                    elif nt >= 4:
                        vnni_tile(1, 4, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
                        for c1 in range(c0 + 64, c0 + nt * 16, 16):
                            vnni_tile(1, 1, True, af, ao + c1, npad, x4, c1 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
                    elif nt == 3:
                        vnni_tile(1, 3, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
                    elif nt == 2:
                        vnni_tile(1, 2, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
                    else:
                        vnni_tile(1, 1, True, af, ao + c0, npad, x4, c0 * 4, xgs, qidx, qw, 0, 4, 4, q0, q1)
        nr = min((b1 - b0) * R, out - b0 * R)
        if czx32.shape[0] > 0:
            _deq_rows_i32(acc, 0, nr, b0 * R, rowsum, czx32, sx, sw, bias, residual, act, lo, hi, y)
        else:
            for rr in range(nr):
                o = b0 * R + rr
                _deq_row(acc[rr], y[o], o, rowsum, zw, False, czx, cz, sx, sw, bias, residual, act, lo, hi)


@pjit
def _quant_perm(x, inv, zpf, xq, pairs):
    """x float32 [K, N] -> xq uint8 [K, npad] (npad % 64 == 0, zeros past N), columns permuted
    inside every chunk of 64 so that the in-register byte interleaves give natural column order:
    ``vnni_gather4`` (pairs False): position 16L + 4q + i holds column 16q + 4L + i (a 4x4
    transpose of dwords); ``vnni_pairs`` (pairs True): position 16L + 8h + 2m + e holds column
    16(2h+e) + 4L + m."""
    K, N = x.shape
    npad = xq.shape[1]
    nb = (K + 31) // 32
    xf = xq.reshape(-1)
    for b in prange(nb):
        tmp = np.empty(npad, np.uint8)
        for k in range(b * 32, min(b * 32 + 32, K)):
            r = x[k]
            for n in range(N):
                tmp[n] = np.uint8(_q(r[n], inv[n], zpf[n]))
            for n in range(N, npad):
                tmp[n] = 0
            if pairs:
                permute_chunks(True, xf, k * npad, tmp, 0, npad // 64)
            else:
                permute_chunks(False, xf, k * npad, tmp, 0, npad // 64)


_QW = 16  # workers of ``_quant_perm_dyn`` (>= threads; idle ones find no chunk to claim)


@jit(inline="always")
def _quant_rows(xf, N, qf, npad, k0, k1, iv, zf, pairs):
    """Rows k0..k1-1 of flat x [K, N] quantized (scalar 1/scale, zero point) into flat
    xq [K, npad] (``quant_chunks``: column-permuted per 64, zeros past N)."""
    for k in range(k0, k1):
        if pairs:
            quant_chunks(True, qf, k * npad, xf, k * N, N, iv, zf, npad // 64)
        else:
            quant_chunks(False, qf, k * npad, xf, k * N, N, iv, zf, npad // 64)


@jit(inline="always")
def _given_minmax(mm):
    """(given, min(mm[0], 0), max(mm[1], 0)) of an optional min / max array (empty: not given)."""
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    have = mm.shape[0] >= 2
    if have:
        lo = min(lo, mm[0])
        hi = max(hi, mm[1])
    return have, lo, hi


_SPIN = 256  # pauses (~15 us) a worker waits for a chunk another worker claimed, then does it itself


@jit(inline="always")
def _quant_phase(w, x, xq, have, lo0, hi0, pairs, st, qc, owner, mlo, mhi, rb):
    """Dynamic per-tensor quantization of x into xq (``_quant_perm_dyn``'s layout and parameters) as
    the first phase of a parallel call, worker w; when it returns, every chunk is quantized.
    Row chunks of rb rows are claimed from st[0]; the worker takes their min / max (mlo, mhi;
    done flags st[16 + c]), collects every chunk's (redoing a chunk whose claimer has not
    finished after ``_SPIN`` pauses: preempted or not started), derives the parameters, quantizes
    its own chunks first (in its cache), takes chunks nobody started (claims qc[c]), then makes
    sure of the rest the same way (done flags st[16 + nch + c]). Redone work writes the same
    values. have: (lo0, hi0) = (min(min(x), 0), max(max(x), 0)) are given (no min / max pass);
    else both 0. (The caller reads its mm array outside the parallel loop: numba's parfor hoists
    a guarded ``mm[0]`` out of its branch, an out-of-bounds read of an empty array.) Returns
    the scalar (sx, zx), the same in every worker."""
    K, N = x.shape
    npad = xq.shape[1]
    xf = x.reshape(-1)
    qf = xq.reshape(-1)
    nch = qc.shape[0]
    md = 16
    qd = 16 + nch
    c = fetch_add(st, 0, 1)
    while c < nch:
        owner[c] = w
        if not have:
            mlo[c], mhi[c] = minmax_f32(xf[c * rb * N:min(c * rb + rb, K) * N])
            fetch_add(st, md + c, 1)
        c = fetch_add(st, 0, 1)
    lo = lo0
    hi = hi0
    if not have:
        for i in range(nch):
            if not spin_until(st, md + i, 1, _SPIN):
                mlo[i], mhi[i] = minmax_f32(xf[i * rb * N:min(i * rb + rb, K) * N])
                fetch_add(st, md + i, 1)
            lo = min(lo, mlo[i])
            hi = max(hi, mhi[i])
    sc, zi, iv, zf = _scalar_params(lo, hi)
    for sweep in range(2):  # own chunks first (in this core's cache), then anyone's not started
        for j in range(nch):
            i = j if sweep == 0 else nch - 1 - j  # steal from the end, away from the owner's order
            if (sweep == 1 or owner[i] == w) and qc[i] == 0 and fetch_add(qc, i, 1) == 0:
                _quant_rows(xf, N, qf, npad, i * rb, min(i * rb + rb, K), iv, zf, pairs)
                fetch_add(st, qd + i, 1)
    for i in range(nch):
        if not spin_until(st, qd + i, 1, _SPIN):
            _quant_rows(xf, N, qf, npad, i * rb, min(i * rb + rb, K), iv, zf, pairs)
            fetch_add(st, qd + i, 1)
    return sc, zi


@pjit
def _quant_perm_dyn(x, xq, pairs, mm):
    """Dynamic per-tensor quantization of x float32 [K, N] (C-contiguous) into xq uint8 [K, npad]
    (``_quant_perm``'s permuted layout) in one parallel call (``_quant_phase``). mm float32: empty,
    or [2] = (min(min(x), 0), max(max(x), 0)) already known (computed by the producer of x in its
    epilogue: the min / max pass is skipped; the same parameters, min / max being exact). Returns
    (sx f32 [N], zx i32 [N]), the parameters of ``_tensor_params``. (``_groups_vnni`` runs the
    same phase itself, before its GEMM tasks.)"""
    K, N = x.shape
    rb = max(4096 // max(N, 1), 1)
    nch = (K + rb - 1) // rb
    have, lo0, hi0 = _given_minmax(mm)
    st = np.zeros(16 + 2 * nch, np.int64)
    qc = np.zeros(nch, np.int64)
    owner = np.full(nch, -1, np.int64)
    mlo = np.zeros(nch, np.float32)
    mhi = np.zeros(nch, np.float32)
    scs = np.zeros(_QW, np.float32)
    zis = np.zeros(_QW, np.int32)
    for w in prange(_QW):
        scs[w], zis[w] = _quant_phase(w, x, xq, have, lo0, hi0, pairs, st, qc, owner, mlo, mhi, rb)
    return np.full(N, scs[0], np.float32), np.full(N, zis[0], np.int32)


# dynamic per-tensor quantization inside the groups GEMM's parallel call (``_groups_vnni`` with
# dyn); False: ``_quant_perm_dyn`` then the GEMM, two calls with the same bytes (for A/B and tests)
FUSED_QUANT = True


@pjit(fastmath=False)  # no FMA contraction in the fused dequantize
def _groups_vnni(R, gptr, gidx, gw, out, x, mm, dyn, xq, rowsum, czx, cz, czx32, sxp, czp, sx, sw, bias, residual,
                 act, lo, hi, y, pt, tmm):
    """y [out, N] from groups-of-4 sparse weights (``_groups``): row group b (rows b*R..) has
    groups gptr[b]..gptr[b+1], group g = 4 input features gidx[4g..4g+3] (uint16 or int32) with int8 weights
    gw flat [ng, R, 4] ([ng, 4, 4] pair weights for R = 1); xq uint8 [K, npad] column-permuted
    (``_quant_perm``). R in (1, 4, 8). czx32 int32 [N] (= -zx) selects the int32 dequantize (when
    it is exact), empty: the float64 one. With the int32 dequantize y = v + bias is stored
    straight from the registers (``vnni_pairs_deq`` / ``vnni_gather4_deq``; sxp, czp: sx, czx32
    zero-padded to npad; bias or -0.0 per row), then residual and activation are applied to
    the task's rows while hot (the reference's order); otherwise int32 sums and ``_deq_row``.
    pt: per-tensor activation parameters (sx, czx32 the same for every column): R = 1 passes the
    scalars to ``vnni_pairs_deq`` (no per-column correction loads). tmm float32 [2 * ntask] or
    empty: with the int32 dequantize, task t writes (min(min, 0), max(max, 0)) of its final rows to
    tmm[2t], tmm[2t + 1], reduced at the end into tmm[0], tmm[1] (y's min / max for the next
    linear's dynamic quantization, taken hot).
    dyn: dynamic per-tensor quantization of x float32 [K, N] (C-contiguous, K <= _K_I32) into xq
    inside this call (``_quant_phase``; mm as in ``_quant_perm_dyn``; sxp, czp, sx, czx32 are then
    built per worker, the arguments ignored), so the call is one parallel region: the threads
    that arrive first quantize, and every worker goes on to the GEMM tasks as soon as the last
    chunk is quantized. Otherwise xq is already quantized and x, mm are not read.
    Work split: one worker per thread (the caller's count) takes tasks -- TR rows (16 rows for R = 1, one row
    group otherwise) x all columns, dequantized hot -- from an atomic counter: a worker that
    starts late (a sleeping pool thread) or is preempted takes fewer tasks."""
    nrb = gptr.shape[0] - 1
    npad = xq.shape[1]
    xf = xq.reshape(-1)
    zw = np.empty(0, np.int32)
    nw = num_threads()
    TB = 16 if R == 1 else 1  # row groups per task
    ntask = (nrb + TB - 1) // TB
    N = y.shape[1]
    yf = y.reshape(-1)
    rf = residual.reshape(-1)
    fuse = dyn or czx32.shape[0] > 0
    hb = bias.shape[0] > 0
    hr = residual.shape[0] > 0
    bpad = bias
    if not hb and R > 1:  # x + (-0.0) == x for every x: no bias is an exact no-op add
        bpad = np.full(out, -0.0, np.float32)
    K = x.shape[0] if dyn else 0
    rb = max(4096 // max(N, 1), 1)
    nch = (K + rb - 1) // rb
    have, lo0, hi0 = _given_minmax(mm)
    st = np.zeros(16 + 2 * nch, np.int64)  # [0] chunk claims, [8] task counter, [16:] chunk done flags
    qc = np.zeros(nch, np.int64)
    owner = np.full(nch, -1, np.int64)
    mlo = np.zeros(nch, np.float32)
    mhi = np.zeros(nch, np.float32)
    for w in prange(nw):
        sxl = sxp
        czl = czp
        if dyn:
            sc, zi = _quant_phase(w, x, xq, have, lo0, hi0, R == 1, st, qc, owner, mlo, mhi, rb)
            sxl = np.zeros(npad, np.float32)
            czl = np.zeros(npad, np.int32)
            for n in range(N):
                sxl[n] = sc
                czl[n] = -zi
        acc = np.empty((0 if fuse else R * TB, npad), np.int32)  # (an allocation per task costs)
        af = acc.reshape(-1)
        t = fetch_add(st, 8, 1)
        while t < ntask:
            b0 = t * TB
            b1 = min(b0 + TB, nrb)
            for b in range(b0, b1):
                g0 = gptr[b]
                g1 = gptr[b + 1]
                ao = (b - b0) * R * npad
                if fuse and R == 1:
                    rs = rowsum[b]
                    swo = sw[b]
                    bb = bias[b] if hb else _F32(-0.0)
                    c0 = 0
                    if pt:
                        sx0 = sxl[0]
                        cz0 = czl[0]
                        while c0 + 256 <= npad:
                            vnni_pairs_deq(4, yf, b * N + c0, N - c0, sx0, cz0, c0, rs, swo, bb, xf, npad, c0, gidx,
                                           gw, g0, g1)
                            c0 += 256
                    while c0 + 256 <= npad:  # 16 accumulators: measured 5-10% faster than 8 (BERT shapes)
                        vnni_pairs_deq(4, yf, b * N + c0, N - c0, sxl, czl, c0, rs, swo, bb, xf, npad, c0, gidx, gw,
                                       g0, g1)
                        c0 += 256
                    if c0 + 128 <= npad:
                        vnni_pairs_deq(2, yf, b * N + c0, N - c0, sxl, czl, c0, rs, swo, bb, xf, npad, c0, gidx, gw,
                                       g0, g1)
                        c0 += 128
                    if c0 < npad:
                        vnni_pairs_deq(1, yf, b * N + c0, N - c0, sxl, czl, c0, rs, swo, bb, xf, npad, c0, gidx, gw,
                                       g0, g1)
                elif R == 1:  # gw holds the pair weights [ng, 4, 4] (vnni_pairs)
                    c0 = 0
                    while c0 + 128 <= npad:
                        vnni_pairs(2, af, ao + c0, xf, npad, c0, gidx, gw, g0, g1)
                        c0 += 128
                    if c0 < npad:
                        vnni_pairs(1, af, ao + c0, xf, npad, c0, gidx, gw, g0, g1)
                elif fuse:
                    o0 = b * R
                    nrow = min(R, out - o0)
                    for c0 in range(0, npad, 64):
                        if R == 4:
                            vnni_gather4_deq(4, 1, 0, 4, yf, o0 * N + c0, N, nrow, N - c0, sxl, czl, c0, rowsum, sw,
                                             bpad, o0, xf, npad, c0, gidx, gw, g0, g1)
                        else:
                            vnni_gather4_deq(8, 1, 0, 2, yf, o0 * N + c0, N, nrow, N - c0, sxl, czl, c0, rowsum, sw,
                                             bpad, o0, xf, npad, c0, gidx, gw, g0, g1)
                            vnni_gather4_deq(8, 1, 2, 4, yf, o0 * N + c0, N, nrow, N - c0, sxl, czl, c0, rowsum, sw,
                                             bpad, o0, xf, npad, c0, gidx, gw, g0, g1)
                elif R == 4:
                    for c0 in range(0, npad, 64):
                        vnni_gather4(4, 1, 0, 4, af, ao + c0, npad, xf, npad, c0, gidx, gw, g0, g1)
                else:
                    for c0 in range(0, npad, 64):
                        vnni_gather4(8, 1, 0, 2, af, ao + c0, npad, xf, npad, c0, gidx, gw, g0, g1)
                        vnni_gather4(8, 1, 2, 4, af, ao + c0, npad, xf, npad, c0, gidx, gw, g0, g1)
            nr = min((b1 - b0) * R, out - b0 * R)
            if fuse:  # (v + bias) was stored; + residual, then the activation, on the task's hot rows
                # (contiguous in y: one flat segment; the vectorized 1-D activation loops)
                seg = yf[b0 * R * N:(b0 * R + nr) * N]
                if hr:
                    rseg = rf[b0 * R * N:(b0 * R + nr) * N]
                    for j in range(nr * N):
                        seg[j] = seg[j] + rseg[j]
                if act != ACT_NONE:
                    _act_inplace(seg, act, lo, hi)
                if tmm.shape[0] > 0:
                    tmm[2 * t], tmm[2 * t + 1] = minmax_f32(seg)
            elif czx32.shape[0] > 0:
                _deq_rows_i32(acc, 0, nr, b0 * R, rowsum, czx32, sx, sw, bias, residual, act, lo, hi, y)
            else:
                for rr in range(nr):
                    o = b0 * R + rr
                    _deq_row(acc[rr], y[o], o, rowsum, zw, False, czx, cz, sx, sw, bias, residual, act, lo, hi)
            t = fetch_add(st, 8, 1)
    if tmm.shape[0] > 0:  # reduced into tmm[0], tmm[1]
        mlo_ = np.float32(0.0)
        mhi_ = np.float32(0.0)
        for i in range(ntask):
            mlo_ = min(mlo_, tmm[2 * i])
            mhi_ = max(mhi_, tmm[2 * i + 1])
        tmm[0] = mlo_
        tmm[1] = mhi_


@pjit(fastmath=False)  # no FMA contraction: bit-identical to the reference
def _gemv_vnni(w, K64, out, xq, rowsum, zw, affine, csum, sx, sw, zx0, K, bias, residual, act, lo, hi, y):
    """N = 1 on VNNI: w int8 flat [ceil(out/4)*4, K64] (zero padded), xq uint8 [K64] (zero padded);
    4 rows per vpdpbusd pass over x (memory-bound: weight bytes stream once)."""
    nrb = (out + 3) // 4
    nvec = K64 // 64
    for rb in prange(nrb):
        acc = np.empty(4, np.int32)
        vnni_dot4(acc, xq, w, rb * 4 * K64, K64, nvec)
        for r in range(min(4, out - rb * 4)):
            o = rb * 4 + r
            corr = np.int64(acc[r]) - np.int64(zx0) * np.int64(rowsum[o])
            if affine:
                corr -= np.int64(zw[o]) * (np.int64(csum) - K * np.int64(zx0))
            y[o, 0] = _epi(corr, sx * sw[o], o, 0, bias, residual, act, lo, hi)


# ----------------------------------------------------------------------------------------------
# portable kernels (plain loops; exact on every CPU)
@jit
def dot_i8(a, b):
    """sum(int32(a[k]) * int32(b[k])), a, b int8 1-D of equal length -> int32 (exact for
    len <= 2**17). The inner kernel of the portable dense path; becomes ``sdot`` on aarch64
    dot-product cores (tests/test_arm_codegen.py)."""
    s = np.int32(0)
    for k in range(a.shape[0]):
        s += np.int32(a[k]) * np.int32(b[k])
    return np.int32(s)


@pjit(fastmath=False)  # no FMA contraction: bit-identical to the reference
def _dense_dot(wq, xt, K, rowsum, zw, affine, colsum, sx, zx, sw, bias, residual, act, lo, hi, y):
    """wq int8 [out, K]; xt int8 [N, K] (= xq - 128); y [out, N]."""
    out = wq.shape[0]
    N = xt.shape[0]
    for o in prange(out):
        wr = wq[o]
        rs = np.int64(rowsum[o])
        swo = sw[o]
        for n in range(N):
            z = np.int64(zx[n])
            corr = np.int64(dot_i8(wr, xt[n])) + (128 - z) * rs
            if affine:
                corr -= np.int64(zw[o]) * (np.int64(colsum[n]) - K * z)
            y[o, n] = _epi(corr, sx[n] * swo, o, n, bias, residual, act, lo, hi)


@jit(inline="always")
def _row_epi(acc, o, N, rs, swo, sx, zx, bias, residual, act, lo, hi, y):
    yo = y[o]
    for n in range(N):
        corr = np.int64(acc[n]) + (128 - np.int64(zx[n])) * rs
        yo[n] = _epi(corr, sx[n] * swo, o, n, bias, residual, act, lo, hi)


@pjit(fastmath=False)  # no FMA contraction: bit-identical to the reference
def _csr_kn(indptr, indices, q, xs, rowsum, sx, zx, sw, bias, residual, act, lo, hi, y):
    """CSR int8 rows x xs int8 [K, N] (= xq - 128), contiguous int32 accumulation over N."""
    out = indptr.shape[0] - 1
    N = xs.shape[1]
    nchunk = (out + 15) // 16
    for c in prange(nchunk):
        acc = np.empty(N, np.int32)
        for o in range(c * 16, min(c * 16 + 16, out)):
            acc[:] = 0
            j0 = indptr[o]
            j1 = indptr[o + 1]
            qq = q[j0:j1]
            ii = indices[j0:j1]
            for j in range(j1 - j0):
                wv = np.int32(qq[j])
                xr = xs[np.uint32(ii[j])]
                for n in range(N):
                    acc[n] += wv * np.int32(xr[n])
            _row_epi(acc, o, N, np.int64(rowsum[o]), sw[o], sx, zx, bias, residual, act, lo, hi, y)


@pjit(fastmath=False)  # no FMA contraction: bit-identical to the reference
def _bsr_kn(r, c, indptr, indices, q, xs, out, rowsum, sx, zx, sw, bias, residual, act, lo, hi, y):
    """BSR int8 (q [nblk, r, c]) x xs int8 [K, N]; never reads X rows >= K nor writes rows >= out."""
    K, N = xs.shape
    nbr = indptr.shape[0] - 1
    for b in prange(nbr):
        acc = np.zeros((r, N), np.int32)
        for j in range(indptr[b], indptr[b + 1]):
            k0 = np.int64(indices[j]) * c
            blk = q[j]
            for cc in range(c):
                k = k0 + cc
                if k >= K:
                    break
                xr = xs[k]
                for rr in range(r):
                    wv = np.int32(blk[rr, cc])
                    if wv != 0:
                        a = acc[rr]
                        for n in range(N):
                            a[n] += wv * np.int32(xr[n])
        for rr in range(r):
            o = b * r + rr
            if o >= out:
                break
            _row_epi(acc[rr], o, N, np.int64(rowsum[o]), sw[o], sx, zx, bias, residual, act, lo, hi, y)


@pjit(fastmath=False)  # no FMA contraction: bit-identical to the reference
def _csr_gemv(indptr, indices, q, xv, rowsum, s, zx0, bias, residual, act, lo, hi, y):
    """N = 1: y[o, 0] from CSR int8 rows and xv int64 [K] (= xq - 128, widened once per call: the
    gather then needs no sign extension; 0-based slices and unsigned indices: 4.6x faster than
    indexing by indptr ranges); s = sx * sw [out]."""
    out = indptr.shape[0] - 1
    for o in prange(out):
        j0 = indptr[o]
        j1 = indptr[o + 1]
        qq = q[j0:j1]
        ii = indices[j0:j1]
        acc = np.int64(0)
        for j in range(j1 - j0):
            acc += np.int64(qq[j]) * xv[np.uint32(ii[j])]
        corr = acc + (128 - np.int64(zx0)) * np.int64(rowsum[o])
        y[o, 0] = _epi(corr, s[o], o, 0, bias, residual, act, lo, hi)


# ----------------------------------------------------------------------------------------------
# prepare (load-time repack) and run
def _f32_per_row(a, out, pad_to=None):
    a = np.asarray(a, np.float32)
    a = np.full(out, a[0], np.float32) if a.shape[0] == 1 and out != 1 else a[:out]
    return np.ascontiguousarray(a)


def _quads(rows, cols, vals, out, K, R):
    """Entries (row, col, int8 val) -> quad-sparse arrays for row groups of R:
    qptr int32 [ceil(out/R)+1], qidx int32 [nq], qw int8 [nq, R, 4]."""
    G = max((K + 3) // 4, 1)
    nrb = (out + R - 1) // R
    keep = vals != 0
    rows, cols, vals = rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep]
    key = (rows // R) * G + cols // 4
    uq, inv = np.unique(key, return_inverse=True)
    qw = np.zeros((uq.shape[0], R, 4), np.int8)
    qw[inv, rows % R, cols % 4] = vals
    qptr = np.searchsorted(uq // G, np.arange(nrb + 1)).astype(np.int32)
    return qptr, (uq % G).astype(np.int32), qw


def _groups(rows, cols, vals, out, K, R):
    """Entries (row, col, int8 val) -> groups-of-4 sparse arrays for row groups of R: the distinct
    columns holding a non-zero in a row group, in order, taken 4 at a time (the last group padded
    with zero weights on a repeated column): gptr int32 [ceil(out/R)+1], gidx int32 [ng, 4] (input
    feature), gw int8 [ng, R, 4]."""
    nrb = (out + R - 1) // R
    keep = vals != 0
    rows, cols, vals = rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep]
    key = (rows // R) * max(K, 1) + cols
    uq, inv = np.unique(key, return_inverse=True)
    rg = uq // max(K, 1)
    cnt = np.bincount(rg, minlength=nrb)[:nrb]
    ngr = (cnt + 3) // 4
    gptr = np.zeros(nrb + 1, np.int64)
    np.cumsum(ngr, out=gptr[1:])
    cstart = np.zeros(nrb + 1, np.int64)
    np.cumsum(cnt, out=cstart[1:])
    pos = np.arange(uq.shape[0], dtype=np.int64) - cstart[rg]
    slot = gptr[rg] * 4 + pos  # flat slot of each distinct column
    ng = int(gptr[-1])
    gidx = np.full(ng * 4, -1, np.int64)
    gidx[slot] = uq % max(K, 1)
    gidx = gidx.reshape(ng, 4)
    for j in range(1, 4):  # padding slots: the group's first column (already in cache), weight 0
        m = gidx[:, j] < 0
        gidx[m, j] = gidx[m, 0]
    gw = np.zeros((ng * 4, R), np.int8)
    gw[slot[inv], rows % R] = vals
    gw = np.ascontiguousarray(gw.reshape(ng, 4, R).transpose(0, 2, 1))
    return gptr.astype(np.int32), gidx.astype(np.int32), gw


def _entries(wf):
    a = wf.arrays()
    out, K = wf.shape
    if wf.kind == "csr_i8":
        indptr = np.asarray(a["indptr"])
        rows = np.repeat(np.arange(out, dtype=np.int64), np.diff(indptr))
        return rows, np.asarray(a["indices"], np.int64), np.asarray(a["q"], np.int8).ravel()
    r, c = (int(v) for v in wf.meta()["block"])
    indptr = np.asarray(a["indptr"])
    q = np.asarray(a["q"], np.int8)
    brow = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))
    bcol = np.asarray(a["indices"], np.int64)
    rr, cc = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    rows = (brow[:, None, None] * r + rr[None]).ravel()
    cols = (bcol[:, None, None] * c + cc[None]).ravel()
    vals = q.ravel()
    ok = (rows < out) & (cols < K)
    return rows[ok], cols[ok], vals[ok]


def set_act_quant(packed, scale, zero_point, dtype="uint8"):
    """Switch ``packed`` to static activation quantization (``Graph.act_quant`` entry values;
    an int8 zero point z is used as the uint8 zero point z + 128). Returns ``packed``."""
    zp = int(zero_point) + (128 if dtype == "int8" else 0)
    if not (0 <= zp <= 255) or not (float(scale) > 0 and math.isfinite(float(scale))):
        raise ValueError(f"bad static activation quantization scale={scale!r} zero_point={zero_point!r}")
    packed["act_quant"] = (float(np.float32(scale)), zp)
    return packed


def prepare(wf, act_quant=None, granularity="tensor", path=None):
    """Load-time preparation of an int8 weight format object -> packed dict.

    path: "vnni" | "portable" | "gemv" (default: "vnni" when the CPU has avx512_vnni, else
    "portable"). act_quant: None (dynamic, ``granularity`` "tensor" or "column") or
    (scale, uint8 zero_point) for static quantization (see ``set_act_quant``)."""
    t0 = time.perf_counter()
    if path is None:
        path = default_path()
    if path == "amx" and not amx_available():
        path = "vnni" if vnni_available() else "portable"
    if path in ("vnni", "gemv_vnni") and not vnni_available():
        path = "portable" if path == "vnni" else "gemv"
    kind = wf.kind
    out, K = (int(v) for v in wf.shape)
    a = wf.arrays()
    p = {"kind": kind, "path": path, "out": out, "K": K, "granularity": granularity, "act_quant": None,
         "repack_bytes": 0}
    if act_quant is not None:
        set_act_quant(p, *act_quant)
    if kind == "dense_i8":
        q = np.ascontiguousarray(a["q"], dtype=np.int8)
        p["sw"] = _f32_per_row(a["scale"], out)
        zw = np.asarray(a["zero_point"], np.int32)
        zw = np.full(out, zw[0], np.int32) if zw.shape[0] == 1 and out != 1 else np.ascontiguousarray(zw[:out])
        p["zw"] = zw
        p["affine"] = bool(np.any(zw != 0))
        p["rowsum"] = q.sum(axis=1, dtype=np.int64).astype(np.int32)
        p["q"] = q
        if path == "vnni":
            K4 = (K + 3) // 4 * 4
            if K4 == K:
                p["w4"] = q.reshape(-1)
            else:
                w4 = np.zeros((out, K4), np.int8)
                w4[:, :K] = q
                p["w4"] = w4.reshape(-1)
                p["repack_bytes"] = w4.nbytes
            p["K4"] = K4
        elif path == "amx":
            # AMX A tiles (16 rows x 64 features) made contiguous: [o32/16, K64/64, 16, 64]
            nk = max((K + 63) // 64, 1)
            o32 = max((out + 31) // 32 * 32, 32)
            w64 = np.zeros((o32, nk * 64), np.int8)
            w64[:out, :K] = q
            w64 = np.ascontiguousarray(w64.reshape(o32 // 16, 16, nk, 64).transpose(0, 2, 1, 3))
            p["w64"] = w64.reshape(-1)
            p["repack_bytes"] = w64.nbytes
            p["nk"] = nk
            p["cfg"] = amx_config()
        elif path == "gemv_vnni":
            K64 = max((K + 63) // 64 * 64, 64)
            o4 = (out + 3) // 4 * 4
            if K64 == K and o4 == out:
                p["w64"] = q.reshape(-1)
            else:
                w64 = np.zeros((o4, K64), np.int8)
                w64[:out, :K] = q
                p["w64"] = w64.reshape(-1)
                p["repack_bytes"] = w64.nbytes
            p["K64"] = K64
    elif kind in ("csr_i8", "bsr_i8"):
        p["sw"] = _f32_per_row(a["scale"], out)
        rows, cols, vals = _entries(wf)
        p["rowsum"] = np.bincount(rows, weights=vals.astype(np.float64), minlength=out)[:out].astype(np.int32)
        if kind == "csr_i8":
            p.update(indptr=np.asarray(a["indptr"], np.int32), indices=a["indices"],
                     qv=np.asarray(a["q"], np.int8))
        else:
            r, c = (int(v) for v in wf.meta()["block"])
            p.update(block=(r, c), indptr=np.asarray(a["indptr"], np.int32),
                     indices=np.asarray(a["indices"], np.int32), qv=np.asarray(a["q"], np.int8))
        if path == "amx":  # sparse formats have no AMX kernel: use VNNI
            path = p["path"] = "vnni"
        if path == "gemv_vnni":  # sparse batch-1 uses the gather kernel
            path = p["path"] = "gemv"
        if path == "vnni" and (kind == "csr_i8" or (p["block"][1] == 1 and p["block"][0] % 4 == 0)):
            # unstructured / r x 1 blocks: groups of 4 arbitrary non-zero columns per row group
            R = 1 if kind == "csr_i8" else (8 if p["block"][0] % 8 == 0 else 4)
            gptr, gidx, gw = _groups(rows, cols, vals, out, K, R)
            if R == 1:  # pair weights for vnni_pairs: (w_a, w_b, 0, 0), (0, 0, w_a, w_b), (w_c, w_d, 0, 0), ...
                g2 = np.zeros((gw.shape[0], 4, 4), np.int8)
                g2[:, 0, 0:2] = gw[:, 0, 0:2]
                g2[:, 1, 2:4] = gw[:, 0, 0:2]
                g2[:, 2, 0:2] = gw[:, 0, 2:4]
                g2[:, 3, 2:4] = gw[:, 0, 2:4]
                gw = g2
            # feature indices as uint16 when they fit (half the index bytes; one dtype per K range)
            gidx = gidx.astype(np.uint16) if K <= 65536 else gidx
            p.update(layout="groups", R=R, gptr=gptr, gidx=gidx.reshape(-1), gw=gw.reshape(-1))
            p["repack_bytes"] = gptr.nbytes + gidx.nbytes + gw.nbytes
        elif path == "vnni":
            R = 1 if kind == "csr_i8" else (8 if p["block"][0] % 8 == 0 else 4 if p["block"][0] % 4 == 0 else 1)
            qptr, qidx, qw = _quads(rows, cols, vals, out, K, R)
            p.update(layout="quads", R=R, qptr=qptr, qidx=qidx, qw=qw.reshape(-1))
            p["repack_bytes"] = qptr.nbytes + qidx.nbytes + qw.nbytes
        elif path == "gemv" and kind == "bsr_i8":
            # batch-1 on BSR: row-wise CSR entries (a repack; exact)
            order = np.lexsort((cols, rows))
            rows, cols, vals = rows[order], cols[order], vals[order]
            p.update(indptr=np.searchsorted(rows, np.arange(out + 1)).astype(np.int32),
                     indices=cols.astype(np.int32), qv=vals.astype(np.int8))
            p["repack_bytes"] = p["indptr"].nbytes + p["indices"].nbytes + p["qv"].nbytes
    else:
        raise ValueError(f"int8 kernels take dense_i8 / csr_i8 / bsr_i8 weights, got {kind!r}")
    p["repack_s"] = time.perf_counter() - t0
    return p


def _aligned_u8(rows, cols):
    """uint8 [rows, cols] whose data starts on a 64-byte boundary (cols % 64 == 0: every 64-byte
    row chunk is one cache line; numpy only guarantees 16 bytes, and split loads cost ~2x)."""
    buf = np.empty(rows * cols + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    return buf[o:o + rows * cols].reshape(rows, cols)


_TLS = threading.local()


def _scratch_u8(rows, cols):
    """``_aligned_u8`` over a per-thread buffer kept between calls (grown to the largest request):
    the quantized activations of one call, dead when it returns. A fresh 1.5 MB array costs its
    page faults on every call (~0.2 ms of BERT's 1536 x 1024 ff2 input, 2 threads)."""
    need = rows * cols
    buf = getattr(_TLS, "buf", None)
    if buf is None or buf.shape[0] < need:
        raw = np.empty(need + 64, np.uint8)
        o = (-raw.ctypes.data) % 64
        buf = _TLS.buf = raw[o:o + need]
    return buf[:need].reshape(rows, cols)


def _opt(bias, residual):
    return (_EMPTY_F32 if bias is None else bias), (_EMPTY_F32_2D if residual is None else residual)


def _corr_terms(p, sx, zx, K, colsum_fn):
    """Per-column exact correction terms as float64: czx = -zx, cz = colsum - K*zx (affine only)."""
    czx = -zx.astype(np.float64)
    if p.get("affine", False):
        cz = colsum_fn().astype(np.float64) - float(K) * zx
    else:
        cz = np.zeros(zx.shape[0], np.float64)
    return czx, cz


def run_vnni(p, x, y, bias, act, lo, hi, residual, minmax=None, want_minmax=False):
    """VNNI path (dense_i8, csr_i8, bsr_i8); falls back to the portable run for other paths.
    minmax: optional (min(min(x), 0), max(max(x), 0)) known by the caller (dynamic per-tensor
    quantization then skips its min / max pass; the result is the same). want_minmax: return
    (min(min(y), 0), max(max(y), 0)) of the result as float32 when the kernel took it in its
    epilogue (groups layout, int32 dequantize), else None."""
    if p["path"] not in ("vnni", "amx"):
        return run_portable(p, x, y, bias, act, lo, hi, residual)
    K, N = x.shape
    out = p["out"]
    if out == 0 or N == 0:
        return
    bias, residual = _opt(bias, residual)
    if p.get("layout") == "groups":
        R = p["R"]
        xq = _scratch_u8(K, (N + 63) // 64 * 64)
        if residual.shape[0] > 0 and not residual.flags.c_contiguous:
            residual = np.ascontiguousarray(residual)
        tmm = _EMPTY_F32
        if want_minmax and K <= _K_I32:
            tb = 16 if R == 1 else 1
            tmm = np.zeros(2 * ((p["gptr"].shape[0] - 1 + tb - 1) // tb), _F32)
        if (FUSED_QUANT and p["act_quant"] is None and p["granularity"] == "tensor" and x.flags.c_contiguous
                and K <= _K_I32):
            # the common case in one parallel call: quantization, then the GEMM tasks
            mm = _EMPTY_F32 if minmax is None else np.asarray(minmax, _F32)
            _groups_vnni(R, p["gptr"], p["gidx"], p["gw"], out, x, mm, True, xq, p["rowsum"], _EMPTY_F64, _EMPTY_F64,
                         _EMPTY_I32, _EMPTY_F32, _EMPTY_I32, _EMPTY_F32, p["sw"], bias, residual, act, _F32(lo),
                         _F32(hi), y, True, tmm)
        else:
            if p["act_quant"] is None and p["granularity"] == "tensor" and x.flags.c_contiguous:
                mm = _EMPTY_F32 if minmax is None else np.asarray(minmax, _F32)
                sx, zx = _quant_perm_dyn(x, xq, R == 1, mm)
            else:
                sx, zx, inv, zpf = _params(p, x)
                _quant_perm(x, inv, zpf, xq, R == 1)
            npad = xq.shape[1]
            czp = np.zeros(npad, np.int32)
            np.negative(zx, out=czp[:N])
            sxp = np.zeros(npad, _F32)
            sxp[:N] = sx
            if K <= _K_I32:  # int32 register dequantize: the float64 correction arrays are not read
                czx32, czx, cz = czp[:N], _EMPTY_F64, _EMPTY_F64
            else:
                czx32, czx, cz = _EMPTY_I32, -zx.astype(np.float64), np.zeros(N, np.float64)
            _groups_vnni(R, p["gptr"], p["gidx"], p["gw"], out, _EMPTY_F32_2D, _EMPTY_F32, False, xq, p["rowsum"],
                         czx, cz, czx32, sxp, czp, sx, p["sw"], bias, residual, act, _F32(lo), _F32(hi), y,
                         p["granularity"] == "tensor" or p["act_quant"] is not None, tmm)
        if tmm.shape[0] == 0:
            return None
        return tmm[0], tmm[1]  # reduced by the kernel
    sx, zx, inv, zpf = _params(p, x, minmax)
    npad = (N + 15) // 16 * 16
    G = max((K + 3) // 4, 1)
    x4 = _scratch_u8(G, npad * 4).reshape(-1)
    _quant_x4(x, inv, zpf, x4.view(np.uint32), npad, G)
    lo, hi = _F32(lo), _F32(hi)
    czx, cz = _corr_terms(p, sx, zx, K, lambda: x4.reshape(G, npad, 4)[:, :N].sum(axis=(0, 2), dtype=np.int64))
    if p["kind"] == "dense_i8":
        czx32 = (-zx).astype(np.int32) if (K <= _K_I32 and not p["affine"]) else _EMPTY_I32
        _dense_vnni(p["w4"], p["K4"], out, x4, npad, p["rowsum"], p["zw"], p["affine"], czx, cz, czx32, sx, p["sw"],
                    bias, residual, act, lo, hi, y)
    else:
        czx32 = (-zx).astype(np.int32) if K <= _K_I32 else _EMPTY_I32
        _quads_vnni(p["R"], p["qptr"], p["qidx"], p["qw"], out, x4, npad, p["rowsum"], czx, cz, czx32, sx, p["sw"],
                    bias, residual, act, lo, hi, y)


def run_amx(p, x, y, bias, act, lo, hi, residual):
    """dense_i8 on AMX (tdpbsud); other kinds / paths go to ``run_vnni`` / ``run_portable``."""
    if p["kind"] != "dense_i8" or p["path"] != "amx":
        run = run_vnni if p["path"] == "vnni" else run_portable
        return run(p, x, y, bias, act, lo, hi, residual)
    K, N = x.shape
    out = p["out"]
    if out == 0 or N == 0:
        return
    bias, residual = _opt(bias, residual)
    sx, zx, inv, zpf = _params(p, x)
    npad = (N + 31) // 32 * 32
    nk = p["nk"]
    G = 16 * nk
    xw = _scratch_u8(1, npad * G * 4).reshape(-1)  # AMX B tiles: 64-byte rows on cache lines
    _quant_x4t(x, inv, zpf, xw.view(np.uint32), npad, G)
    czx, cz = _corr_terms(p, sx, zx, K, lambda: xw.reshape(npad // 16, G, 16, 4).sum(
        axis=(1, 3), dtype=np.int64).reshape(-1)[:N])
    czx32 = (-zx).astype(np.int32) if (K <= _K_I32 and not p["affine"]) else _EMPTY_I32
    _dense_amx(p["cfg"], p["w64"], nk, out, xw, npad, p["rowsum"], p["zw"], p["affine"], czx, cz, czx32, sx, p["sw"],
               bias, residual, act, _F32(lo), _F32(hi), y)


def run_portable(p, x, y, bias, act, lo, hi, residual):
    K, N = x.shape
    out = p["out"]
    if out == 0 or N == 0:
        return
    bias, residual = _opt(bias, residual)
    sx, zx, inv, zpf = _params(p, x)
    lo, hi = _F32(lo), _F32(hi)
    if p["kind"] == "dense_i8":
        xt = np.empty((N, K), np.int8)
        _quant_nk(x, inv, zpf, xt)
        colsum = ((xt.sum(axis=1, dtype=np.int64) + 128 * K).astype(np.int32) if p["affine"] else _EMPTY_I32)
        _dense_dot(p["q"], xt, K, p["rowsum"], p["zw"], p["affine"], colsum, sx, zx, p["sw"],
                   bias, residual, act, lo, hi, y)
        return
    xs = np.empty((K, N), np.int8)
    _quant_kn(x, inv, zpf, xs)
    if p["kind"] == "csr_i8":
        _csr_kn(p["indptr"], p["indices"], p["qv"], xs, p["rowsum"], sx, zx, p["sw"], bias, residual, act,
                lo, hi, y)
    else:
        r, c = p["block"]
        _bsr_kn(r, c, p["indptr"], p["indices"], p["qv"], xs, out, p["rowsum"], sx, zx, p["sw"], bias,
                residual, act, lo, hi, y)


def run_gemv(p, x, y, bias, act, lo, hi, residual):
    """N = 1 (batch-1 decoding): dense dot form (VNNI when prepared with path "gemv_vnni") or CSR
    gather; no activation packing."""
    K, N = x.shape
    if p["path"] == "gemv_vnni" and N == 1:
        if p["out"] == 0:
            return
        bias, residual = _opt(bias, residual)
        sx, zx, inv, zpf = _params(p, x)
        xq = np.zeros(p["K64"], np.uint8)
        xs = np.empty((K, 1), np.int8)
        _quant_kn(x, inv, zpf, xs)
        xq[:K] = xs.reshape(-1).view(np.uint8) ^ np.uint8(128)
        csum = int(xq.sum(dtype=np.int64)) if p["affine"] else 0
        _gemv_vnni(p["w64"], p["K64"], p["out"], xq, p["rowsum"], p["zw"], p["affine"], csum, sx[0], p["sw"],
                   zx[0], K, bias, residual, act, _F32(lo), _F32(hi), y)
        return
    if N != 1 and p["path"] == "gemv_vnni":
        return run_portable(p, x, y, bias, act, lo, hi, residual)
    if N != 1 or p["kind"] == "dense_i8":
        return run_portable(p, x, y, bias, act, lo, hi, residual)
    if p["out"] == 0:
        return
    bias, residual = _opt(bias, residual)
    sx, zx, inv, zpf = _params(p, x)
    xs = np.empty((K, 1), np.int8)
    _quant_kn(x, inv, zpf, xs)
    s = (p["sw"] * sx[0]).astype(_F32)
    _csr_gemv(p["indptr"], p["indices"], p["qv"], xs.reshape(-1).astype(np.int64), p["rowsum"], s, zx[0], bias,
              residual, act,
              _F32(lo), _F32(hi), y)


# ----------------------------------------------------------------------------------------------
# exact numpy references
def gemm_ref(wf, x, bias=None, act=ACT_NONE, lo=0.0, hi=0.0, residual=None, act_quant=None,
             granularity="tensor", return_int=False):
    """numpy reference: quantize x (``quantize_ref``), exact integer GEMM (int64), dequantize and
    epilogue with the kernels' float32 operation order. return_int: also return corr int64."""
    out, K = (int(v) for v in wf.shape)
    a = wf.arrays()
    if act_quant is None:
        xq, sx, zx = quantize_ref(x, granularity=granularity)
    else:
        xq, sx, zx = quantize_ref(x, act_quant[0], act_quant[1])
    if wf.kind == "dense_i8":
        wq = np.asarray(a["q"], np.int64)
        zw = np.asarray(a["zero_point"], np.int64)
        zw = np.broadcast_to(zw, (out,)) if zw.shape[0] == 1 else zw[:out]
    else:
        rows, cols, vals = _entries(wf)
        wq = np.zeros((out, K), np.int64)
        wq[rows, cols] = vals
        zw = np.zeros(out, np.int64)
    sw = _f32_per_row(a["scale"], out)
    xi = xq.astype(np.int64) - zx.astype(np.int64)[None, :]
    # exact: |values| < 2**53 in float64 for any realistic K
    corr = np.rint((wq - zw[:, None]).astype(np.float64) @ xi.astype(np.float64)).astype(np.int64)
    s = (sx[None, :] * sw[:, None]).astype(_F32)
    v = corr.astype(_F32) * s
    if bias is not None:
        v = (v + np.asarray(bias, _F32)[:, None]).astype(_F32)
    if residual is not None:
        v = (v + residual).astype(_F32)
    yref = _act_ref(v, act, _F32(lo), _F32(hi))
    return (yref, corr) if return_int else yref


def _reference(wf, x, bias, act, lo, hi, residual):
    return gemm_ref(wf, x, bias, act, lo, hi, residual)


def _prep(path):
    return lambda wf: prepare(wf, path=path)


_BLOCKS = ((1, 4), (4, 1), (8, 1), (16, 1), (1, 16), (4, 4), (2, 2))
KERNELS = [
    KernelSpec("dense_i8_amx", "gemm", "dense_i8", "int8", None, ("amx_int8", "amx_tile"), _prep("amx"), run_amx,
               _reference, min_n=2, notes="AMX tdpbsud s8xu8, 2x2 16x16 tiles; needs amx_available() (OS permission)",
               extra={"priority": 3}),
    KernelSpec("dense_i8_vnni", "gemm", "dense_i8", "int8", None, ("avx512_vnni",), _prep("vnni"), run_vnni,
               _reference, min_n=2, notes="vpdpbusd u8xs8, tile 8 rows x 48 cols", extra={"priority": 2}),
    KernelSpec("dense_i8", "gemm", "dense_i8", "int8", None, (), _prep("portable"), run_portable, _reference,
               notes="portable dot form (sdot on aarch64 dotprod cores)"),
    KernelSpec("dense_i8_gemv_vnni", "gemv", "dense_i8", "int8", None, ("avx512_vnni",), _prep("gemv_vnni"),
               run_gemv, _reference, max_n=1, notes="batch-1: 4 rows per vpdpbusd pass", extra={"priority": 2}),
    KernelSpec("dense_i8_gemv", "gemv", "dense_i8", "int8", None, (), _prep("gemv"), run_gemv, _reference,
               max_n=1, notes="batch-1 dot form"),
    KernelSpec("csr_i8_vnni", "gemm", "csr_i8", "int8", None, ("avx512_vnni",), _prep("vnni"), run_vnni,
               _reference, min_n=2, notes="groups of 4 non-zeros as 2 pairs, activation rows byte-interleaved in "
               "registers, vpdpbusd", extra={"priority": 2}),
    KernelSpec("csr_i8", "gemm", "csr_i8", "int8", None, (), _prep("portable"), run_portable, _reference),
    KernelSpec("csr_i8_gemv", "gemv", "csr_i8", "int8", None, (), _prep("gemv"), run_gemv, _reference,
               max_n=1),
]
for _b in _BLOCKS:
    _s = f"{_b[0]}x{_b[1]}"
    KERNELS += [
        KernelSpec(f"bsr_i8_{_s}_vnni", "gemm", "bsr_i8", "int8", _b, ("avx512_vnni",), _prep("vnni"), run_vnni,
                   _reference, min_n=2, notes=("groups of 4 non-zero block columns, interleaved in registers"
                                               if _b[1] == 1 and _b[0] % 4 == 0 else
                                               "repacked to quads (4/1 rows x 4 inputs) at load"),
                   extra={"priority": 2}),
        KernelSpec(f"bsr_i8_{_s}", "gemm", "bsr_i8", "int8", _b, (), _prep("portable"), run_portable, _reference),
        KernelSpec(f"bsr_i8_{_s}_gemv", "gemv", "bsr_i8", "int8", _b, (), _prep("gemv"), run_gemv, _reference,
                   max_n=1, notes="row-wise CSR repack, gather"),
    ]
