"""Explicit float32 SIMD vectors for numba kernels (portable LLVM vector IR, no target intrinsics).

LLVM only vectorizes innermost loops, and it must assume numba arrays may alias, so a
register-blocked micro-kernel (accumulators held in registers across the loop over
non-zeros) cannot be written as plain loops. These intrinsics expose an LLVM
``<VW x float>`` value as the numba type ``f32vec``; LLVM legalizes it for the target
(one zmm on AVX-512, two ymm on AVX2, four q registers on NEON), so the same kernel source
runs everywhere.

``VW`` is 16 floats when the host has AVX-512F, else 8 (register files of AVX2 and NEON hold
half as many floats). It is frozen into compiled code; numba's cache is keyed on the CPU, so
this is consistent per machine.

* ``vload(a, i)`` / ``vstore(a, i, v)``: VW floats at ``a[i:i+VW]`` (1-D float32 array,
  contiguous; unaligned access; no bounds check: callers guarantee ``i + VW <= len(a)``).
* ``vbcastl(a, i)``: ``a[i]`` (1-D float32 array) in all lanes, loaded through a plain pointer
  offset: unlike ``vbcast(a[i])`` with a signed run-time ``i``, no negative-index fix-up per
  element, so ``a[o + 0]``, ``a[o + 1]``, ... share one address register (no bounds check).
* ``vzero()``, ``vbcast(s)`` (float32 scalar to all lanes), ``vfma(a, b, c)`` = a*b + c
  (``llvm.fmuladd``: fused where the CPU has FMA, mul+add otherwise).
* ``vadd(a, b)``, ``vmul(a, b)``; ``vmax(a, b)`` / ``vmin(a, b)`` (``llvm.maxnum`` /
  ``llvm.minnum``: IEEE maxNum, a NaN operand yields the other one, like ``np.fmax``), for
  in-register epilogues (bias, relu, clamp) before the one store of an output tile.
* ``vsub``, ``vrcp`` (1 / a), ``vmaxo`` (x86 ``maxps``: a > b ? a : b), ``vhsum`` (sum of the
  lanes as a float32), ``vexp`` (exp for arguments <= 0, degree-5 polynomial, rel. error <= 4.1e-7):
  the attention / softmax / layernorm kernels of kernels/nn.py.
* ``vrelu_mask(a, m)`` / ``vmask(a, m)``: relu that keeps NaN, and zero where the mask lane is 0
  (the padded-layout epilogues of kernels/conv.py).
* ``fetch_add(arr, i, v)``: atomic (seq_cst) add on an int64 array returning the old value, for
  the task counters through which a parallel call's workers take work.
"""
from __future__ import annotations

import llvmlite.binding as _llb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


def _host_has_avx512() -> bool:
    try:
        return "+avx512f" in _llb.get_host_cpu_features().flatten().split(",")
    except Exception:  # pragma: no cover - non-x86 or llvmlite without feature query
        return False


VW = 16 if _host_has_avx512() else 8

_F = ir.FloatType()
_V = ir.VectorType(_F, VW)


class F32Vec(types.Type):
    """An LLVM <VW x float> SSA value (lives in registers)."""

    def __init__(self):
        super().__init__(name=f"f32x{VW}")


f32vec = F32Vec()


@register_model(F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V)


def _elem_ptr(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.gep(a.data, [idx])


@intrinsic
def vload(typingctx, arr, idx):
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None
    sig = f32vec(arr, types.intp)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _V.as_pointer()), align=4)
    return sig, codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None
    sig = types.void(arr, types.intp, f32vec)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _V.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def vzero(typingctx):
    sig = f32vec()

    def codegen(context, builder, signature, args):
        return ir.Constant(_V, [0.0] * VW)
    return sig, codegen


@intrinsic
def vbcast(typingctx, s):
    sig = f32vec(types.float32)

    def codegen(context, builder, signature, args):
        v = builder.insert_element(ir.Constant(_V, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), VW), [0] * VW)
        return builder.shuffle_vector(v, ir.Constant(_V, ir.Undefined), mask)
    return sig, codegen


@intrinsic
def vbcastl(typingctx, arr, idx):
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None
    sig = f32vec(arr, types.intp)

    def codegen(context, builder, signature, args):
        s = builder.load(_elem_ptr(context, builder, signature.args[0], args[0], args[1]), align=4)
        v = builder.insert_element(ir.Constant(_V, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), VW), [0] * VW)
        return builder.shuffle_vector(v, ir.Constant(_V, ir.Undefined), mask)
    return sig, codegen


@intrinsic
def vfma(typingctx, a, b, c):
    sig = f32vec(f32vec, f32vec, f32vec)

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V, _V, _V]),
                                            f"llvm.fmuladd.v{VW}f32")
        return builder.call(fn, list(args))
    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])
    return sig, codegen


@intrinsic
def vprefetch(typingctx, arr, idx):
    """Software prefetch (read, keep in all cache levels) of ``arr[idx]``; 1-D array of any dtype.
    A hint only: no fault, no effect on results, safe on an address past the end."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1):
        return None
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def vmul(typingctx, a, b):
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])
    return sig, codegen


def _minmax(name):
    def impl(typingctx, a, b):
        sig = f32vec(f32vec, f32vec)

        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V, _V]),
                                                f"llvm.{name}.v{VW}f32")
            return builder.call(fn, list(args))
        return sig, codegen
    impl.__name__ = "v" + name[:3]
    return intrinsic(impl)


vmax = _minmax("maxnum")
vmin = _minmax("minnum")


# --- lane-wise helpers of the attention / softmax kernels (kernels/nn.py) and the conv epilogues ---
_EXP_LOG2E = np.float32(1.4426950408889634)
_EXP_MIN = np.float32(-87.33654)  # exp below this is 0 in vexp (no denormals)


def _vconst(x):
    return ir.Constant(_V, [float(np.float32(x))] * VW)


def _vfn(builder, name, nargs):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V] * nargs),
                                           f"llvm.{name}.v{VW}f32")


# exp(r) ~ 1 + r + r^2 (Q2 + Q3 r + Q4 r^2 + Q5 r^3) on [-ln2/2, ln2/2]: a degree-5 minimax fit
# (relative error 1.1e-7; 1.7e-7 evaluated in float32), two FMAs fewer than Cephes' degree 7
_Q2, _Q3 = np.float32(0.499992311000824), np.float32(0.16667114198207855)
_Q4, _Q5 = np.float32(0.041890114545822144), np.float32(0.008312525227665901)
_EXP_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
_LN2_F32 = np.float32(0.6931471805599453)


@intrinsic
def vexp(typingctx, v):
    """exp of every lane of an f32vec for arguments <= 0 (softmax feeds x - max), in vector IR:
    k = round(x / ln 2) by the 1.5 * 2**23 trick (the low bits of the sum are k: no floor /
    convert), r = x - k ln2 in one FMA step, exp(r) - 1 by a degree-5 polynomial, result
    (exp(r) - 1) 2^k + 2^k. Relative error <= 2e-7 for x >= -10, <= 4.1e-7 down to -87.3
    (measured against float64). 0 below -87.3 and for -inf (no denormals), NaN for NaN (no
    clamp: a NaN flows through the arithmetic)."""
    if not isinstance(v, F32Vec):
        return None

    def codegen(context, builder, signature, args):
        x = args[0]
        fma = _vfn(builder, "fmuladd", 3)
        t = builder.call(fma, [x, _vconst(_EXP_LOG2E), _vconst(_EXP_MAGIC)])
        kf = builder.fsub(t, _vconst(_EXP_MAGIC))
        r = builder.call(fma, [kf, _vconst(-_LN2_F32), x])  # one step: k ln2 error <= |k| 2e-9
        r2 = builder.fmul(r, r)
        p = builder.call(fma, [_vconst(_Q5), r, _vconst(_Q4)])
        p = builder.call(fma, [p, r, _vconst(_Q3)])
        p = builder.call(fma, [p, r, _vconst(_Q2)])
        p = builder.call(fma, [p, r2, r])  # exp(r) - 1
        vi = ir.VectorType(ir.IntType(32), VW)
        # bits(t) = bits(magic) + k; bits(magic) << 23 vanishes mod 2**32, so 2**k = (bits(t) + 127) << 23
        ki = builder.shl(builder.add(builder.bitcast(t, vi), ir.Constant(vi, [127] * VW)),
                         ir.Constant(vi, [23] * VW))
        pw = builder.bitcast(ki, _V)
        e = builder.call(fma, [p, pw, pw])  # (exp(r) - 1) 2^k + 2^k
        return builder.select(builder.fcmp_ordered("<", x, _vconst(_EXP_MIN)), _vconst(0.0), e)

    return f32vec(v), codegen


@intrinsic
def vmaxo(typingctx, a, b):
    """a > b ? a : b lane-wise (x86 ``maxps`` semantics, one instruction: a NaN in a is ignored)."""
    if not (isinstance(a, F32Vec) and isinstance(b, F32Vec)):
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return f32vec(a, b), codegen


@intrinsic
def vsub(typingctx, a, b):
    """a - b lane-wise."""
    if not (isinstance(a, F32Vec) and isinstance(b, F32Vec)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1])

    return f32vec(a, b), codegen


@intrinsic
def vrcp(typingctx, a):
    """1 / a lane-wise (a true division)."""
    if not isinstance(a, F32Vec):
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(_vconst(1.0), args[0])

    return f32vec(a), codegen


@intrinsic
def vhsum(typingctx, a):
    """Sum of the lanes of an f32vec (a shuffle tree) as a float32 scalar."""
    if not isinstance(a, F32Vec):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        vi = ir.VectorType(ir.IntType(32), VW)
        h = VW // 2
        while h >= 1:
            hi = builder.shuffle_vector(v, ir.Constant(_V, ir.Undefined),
                                        ir.Constant(vi, [i + h if i < h else i for i in range(VW)]))
            v = builder.fadd(v, hi)
            h //= 2
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(a), codegen


@intrinsic
def vrelu_mask(typingctx, a, m):
    """select(m != 0, select(a < 0, 0, a), 0) on f32vec values: relu that keeps NaN (like the scalar
    ``max(y, 0)`` of epilogue_tile) and exact zeros where the mask lane is 0 (NaN / inf included)."""
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, signature, args):
        a, m = args
        z = ir.Constant(a.type, None)
        r = builder.select(builder.fcmp_ordered("<", a, z), z, a)
        return builder.select(builder.fcmp_unordered("!=", m, z), r, z)
    return sig, codegen


@intrinsic
def vmask(typingctx, a, m):
    """select(m != 0, a, 0) on f32vec values."""
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, signature, args):
        a, m = args
        z = ir.Constant(a.type, None)
        return builder.select(builder.fcmp_unordered("!=", m, z), a, z)
    return sig, codegen


# --- work hand-out between the workers of one parallel call (bsr, int8) ---
@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomic ``old = arr[idx]; arr[idx] += val; return old`` on a 1-D int64 array (seq_cst)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    if not (isinstance(idx, types.Integer) and isinstance(val, types.Integer)):
        return None
    sig = types.int64(arr, idx, val)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.int64)
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(a.data, [i]), v, "seq_cst")
    return sig, codegen
