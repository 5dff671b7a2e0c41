"""x86 VNNI micro-kernel: a numba ``@intrinsic`` emitting ``llvm.x86.avx512.vpdpbusd.512``.

LLVM does not form vpdpbusd from plain loops, so the whole register-tiled inner loop is
written here in LLVM IR (llvmlite's IR builder): R x T accumulators of <16 x i32> live in
registers across the loop over K-groups ("quads" of 4 input features).

Layouts (all flat 1-D arrays, byte offsets):
* activations ``x4`` uint8 ``[G, Npad, 4]``: ``x4[g, n, j] = xq[4g + j, n]`` (Npad % 16 == 0);
  one zmm load = 16 columns x 4 features.
* weights int8, 4 consecutive input features per output row read as one int32 and
  broadcast to 16 lanes; the byte address of (row r, quad q) is
  ``woff + r * wrs + q * wqs``.
* quads ``q0 <= q < q1``; the K-group of quad q is ``q`` (dense) or ``idx[q]`` (sparse).

``vnni_tile(R, T, SPARSE, acc, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1)`` with
R, T, SPARSE compile-time literals writes the int32 sums
``acc[(r*T + t)*16 + l] = sum_q sum_j u8(x4[xoff + g(q)*xgs + (t*16 + l)*4 + j]) * s8(w[...+j])``.
Only call it from a function compiled on a CPU with avx512_vnni (kernels/cpu.py ``has``).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)


def _literal_int(t):
    if isinstance(t, (types.IntegerLiteral, types.BooleanLiteral)):
        return int(t.literal_value)
    return None


@intrinsic
def vnni_tile(typingctx, R, T, SPARSE, acc, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1):
    r_, t_, s_ = _literal_int(R), _literal_int(T), _literal_int(SPARSE)
    if r_ is None or t_ is None or s_ is None:
        return None
    ints = (xoff, xgs, woff, wrs, wqs, q0, q1)
    if not all(isinstance(v, types.Integer) for v in ints):
        return None
    sig = types.void(R, T, SPARSE, acc, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1)

    def codegen(context, builder, signature, args):
        (_, _, _, acc_v, x4_v, xoff_v, xgs_v, idx_v, w_v, woff_v, wrs_v, wqs_v, q0_v, q1_v) = args
        st = signature.args

        def data(i, v):
            return builder.bitcast(context.make_array(st[i])(context, builder, v).data, _I8.as_pointer())

        def i64(i, v):
            return context.cast(builder, v, st[i], types.int64)

        accp = builder.bitcast(context.make_array(st[3])(context, builder, acc_v).data, _I32.as_pointer())
        x4p, wp = data(4, x4_v), data(8, w_v)
        idxp = builder.bitcast(context.make_array(st[7])(context, builder, idx_v).data, _I32.as_pointer())
        xoff_, xgs_, woff_, wrs_, wqs_ = (i64(5, xoff_v), i64(6, xgs_v), i64(9, woff_v),
                                          i64(10, wrs_v), i64(11, wqs_v))
        q0_, q1_ = i64(12, q0_v), i64(13, q1_v)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512")
        zero = ir.Constant(_V16, None)
        bmask = ir.Constant(_V16, [0] * 16)

        pre = builder.basic_block
        hdr = builder.append_basic_block("vnni.hdr")
        body = builder.append_basic_block("vnni.body")
        done = builder.append_basic_block("vnni.done")
        builder.branch(hdr)

        builder.position_at_end(hdr)
        q = builder.phi(_I64, "q")
        q.add_incoming(q0_, pre)
        accs = []
        for k in range(r_ * t_):
            p = builder.phi(_V16, f"acc{k}")
            p.add_incoming(zero, pre)
            accs.append(p)
        builder.cbranch(builder.icmp_signed("<", q, q1_), body, done)

        builder.position_at_end(body)
        if s_:
            g = builder.sext(builder.load(builder.gep(idxp, [q]), align=4), _I64)
        else:
            g = q
        xbase = builder.add(xoff_, builder.mul(g, xgs_))
        xs = []
        for t in range(t_):
            p = builder.gep(x4p, [builder.add(xbase, ir.Constant(_I64, t * 64))])
            xs.append(builder.load(builder.bitcast(p, _V16.as_pointer()), align=1))
        wq = builder.add(woff_, builder.mul(q, wqs_))
        new = []
        for r in range(r_):
            p = builder.gep(wp, [builder.add(wq, builder.mul(wrs_, ir.Constant(_I64, r)))])
            wv = builder.load(builder.bitcast(p, _I32.as_pointer()), align=1)
            wb = builder.shuffle_vector(builder.insert_element(ir.Constant(_V16, ir.Undefined), wv,
                                                               ir.Constant(_I32, 0)),
                                        ir.Constant(_V16, ir.Undefined), bmask)
            for t in range(t_):
                new.append(builder.call(fn, [accs[r * t_ + t], xs[t], wb]))
        qn = builder.add(q, ir.Constant(_I64, 1))
        end = builder.basic_block
        q.add_incoming(qn, end)
        for a, v in zip(accs, new):
            a.add_incoming(v, end)
        builder.branch(hdr)

        builder.position_at_end(done)
        for k, a in enumerate(accs):
            p = builder.gep(accp, [ir.Constant(_I64, k * 16)])
            builder.store(a, builder.bitcast(p, _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen
