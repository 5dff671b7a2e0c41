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
"""
from __future__ import annotations

import llvmlite.binding as _llb
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
