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

``vnni_tile(R, T, SPARSE, acc, aoff, ars, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1)`` with
R, T, SPARSE compile-time literals writes the int32 sums
``acc[aoff + r*ars + t*16 + l] = sum_q sum_j u8(x4[xoff + g(q)*xgs + (t*16 + l)*4 + j]) * s8(w[...+j])``.
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
def vnni_tile(typingctx, R, T, SPARSE, acc, aoff, ars, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1):
    r_, t_, s_ = _literal_int(R), _literal_int(T), _literal_int(SPARSE)
    if r_ is None or t_ is None or s_ is None:
        return None
    ints = (aoff, ars, xoff, xgs, woff, wrs, wqs, q0, q1)
    if not all(isinstance(v, types.Integer) for v in ints):
        return None
    sig = types.void(R, T, SPARSE, acc, aoff, ars, x4, xoff, xgs, idx, w, woff, wrs, wqs, q0, q1)

    def codegen(context, builder, signature, args):
        (_, _, _, acc_v, aoff_v, ars_v, x4_v, xoff_v, xgs_v, idx_v, w_v, woff_v, wrs_v, wqs_v, q0_v, q1_v) = args
        st = tuple(signature.args[:4]) + tuple(signature.args[6:])
        aoff_, ars_ = (context.cast(builder, aoff_v, signature.args[4], types.int64),
                       context.cast(builder, ars_v, signature.args[5], types.int64))

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
            r, t = divmod(k, t_)
            off = builder.add(aoff_, builder.add(builder.mul(ars_, ir.Constant(_I64, r)), ir.Constant(_I64, t * 16)))
            p = builder.gep(accp, [off])
            builder.store(a, builder.bitcast(p, _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# AMX (Sapphire Rapids and later): tdpbsud on 16 x 64-byte tiles
def amx_config() -> "np.ndarray":
    """64-byte tile configuration (palette 1): all 8 tiles 16 rows x 64 bytes."""
    import numpy as np
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    return cfg


_AMX_OK = None


def amx_enable() -> bool:
    """Ask Linux for AMX tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM, once per process).
    False when the kernel or the CPU refuses (then the AMX path must not run: SIGILL)."""
    global _AMX_OK
    if _AMX_OK is None:
        _AMX_OK = False
        try:
            import ctypes
            import platform
            if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                # SYS_arch_prctl = 158, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18
                _AMX_OK = libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0
        except Exception:
            _AMX_OK = False
    return _AMX_OK


@intrinsic
def amx_block(typingctx, cfg, acc, aoff, astride, w, woff, wdelta, wstep, wstride, x4, xoff, xdelta, xstep,
              xstride, nk, accum):
    """acc int32 [32, 32] (from byte aoff, row stride astride bytes) = A x B over nk steps of 64 input features
    (tdpbsud: A int8 weights x B uint8 activations; 2x2 accumulator tiles of 16x16 int32).
    A tile 0 at byte ``woff + kk*wstep`` of w (16 rows of 64 B, row stride wstride), A tile 1
    ``wdelta`` bytes further; B tile 0 at ``xoff + kk*xstep`` of x4 (16 rows = groups of 4 features,
    64 B = 16 columns x 4, row stride xstride), B tile 1 ``xdelta`` further. cfg: ``amx_config()``.
    accum != 0: add to the sums already in acc (K-blocking) instead of starting from zero."""
    ints = (aoff, astride, woff, wdelta, wstep, wstride, xoff, xdelta, xstep, xstride, nk, accum)
    if not all(isinstance(v, types.Integer) for v in ints):
        return None
    sig = types.void(cfg, acc, aoff, astride, w, woff, wdelta, wstep, wstride, x4, xoff, xdelta, xstep, xstride, nk,
                     accum)

    def codegen(context, builder, signature, args):
        st = signature.args
        ptr = ir.IntType(8).as_pointer()

        def data(i):
            return builder.bitcast(context.make_array(st[i])(context, builder, args[i]).data, ptr)

        def i64(i):
            return context.cast(builder, args[i], st[i], types.int64)

        cfgp, accp, wp, xp = data(0), data(1), data(4), data(9)
        aoff_, ast = i64(2), i64(3)
        woff_, wdel, wstep_, wst = i64(5), i64(6), i64(7), i64(8)
        xoff_, xdel, xstep_, xst, nk_ = i64(10), i64(11), i64(12), i64(13), i64(14)
        mod = builder.module
        void = ir.VoidType()
        f_cfg = cgutils.get_or_insert_function(mod, ir.FunctionType(void, [ptr]), "llvm.x86.ldtilecfg")
        f_zero = cgutils.get_or_insert_function(mod, ir.FunctionType(void, [_I8]), "llvm.x86.tilezero")
        f_load = cgutils.get_or_insert_function(mod, ir.FunctionType(void, [_I8, ptr, _I64]), "llvm.x86.tileloadd64")
        f_dp = cgutils.get_or_insert_function(mod, ir.FunctionType(void, [_I8, _I8, _I8]), "llvm.x86.tdpbsud")
        f_st = cgutils.get_or_insert_function(mod, ir.FunctionType(void, [_I8, ptr, _I64]), "llvm.x86.tilestored64")
        f_rel = cgutils.get_or_insert_function(mod, ir.FunctionType(void, []), "llvm.x86.tilerelease")

        def t(n):
            return ir.Constant(_I8, n)

        def c64(n):
            return ir.Constant(_I64, n)

        accum_ = i64(15)
        row16 = builder.mul(ast, c64(16))
        coffs = (aoff_, builder.add(aoff_, c64(64)), builder.add(aoff_, row16),
                 builder.add(builder.add(aoff_, row16), c64(64)))
        builder.call(f_cfg, [cfgp])
        with builder.if_else(builder.icmp_signed("!=", accum_, c64(0))) as (then, otherwise):
            with then:
                for k, off in enumerate(coffs):
                    builder.call(f_load, [t(k), builder.gep(accp, [off]), ast])
            with otherwise:
                for k in range(4):
                    builder.call(f_zero, [t(k)])
        a0 = builder.gep(wp, [woff_])
        a1 = builder.gep(wp, [builder.add(woff_, wdel)])
        b0 = builder.gep(xp, [xoff_])
        b1 = builder.gep(xp, [builder.add(xoff_, xdel)])
        pre = builder.basic_block
        hdr = builder.append_basic_block("amx.hdr")
        body = builder.append_basic_block("amx.body")
        done = builder.append_basic_block("amx.done")
        builder.branch(hdr)
        builder.position_at_end(hdr)
        kk = builder.phi(_I64, "kk")
        kk.add_incoming(c64(0), pre)
        builder.cbranch(builder.icmp_signed("<", kk, nk_), body, done)
        builder.position_at_end(body)
        ao = builder.mul(kk, wstep_)
        bo = builder.mul(kk, xstep_)
        builder.call(f_load, [t(4), builder.gep(a0, [ao]), wst])
        builder.call(f_load, [t(6), builder.gep(b0, [bo]), xst])
        builder.call(f_load, [t(7), builder.gep(b1, [bo]), xst])
        builder.call(f_dp, [t(0), t(4), t(6)])
        builder.call(f_dp, [t(1), t(4), t(7)])
        builder.call(f_load, [t(5), builder.gep(a1, [ao]), wst])
        builder.call(f_dp, [t(2), t(5), t(6)])
        builder.call(f_dp, [t(3), t(5), t(7)])
        kk.add_incoming(builder.add(kk, c64(1)), builder.basic_block)
        builder.branch(hdr)
        builder.position_at_end(done)
        for k, off in enumerate(coffs):
            builder.call(f_st, [t(k), builder.gep(accp, [off]), ast])
        builder.call(f_rel, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vnni_dot4(typingctx, acc, x, w, woff, wstride, nvec):
    """acc[r] = sum_k u8(x[k]) * s8(w[woff + r*wstride + k]) for r < 4 and k < 64*nvec: four
    weight rows against one uint8 activation vector (batch-1), vpdpbusd on 64 bytes per step,
    then a horizontal add. Rows and x must hold 64*nvec bytes (zero padded)."""
    if not all(isinstance(v, types.Integer) for v in (woff, wstride, nvec)):
        return None
    sig = types.void(acc, x, w, woff, wstride, nvec)

    def codegen(context, builder, signature, args):
        st = signature.args
        ptr = _I8.as_pointer()
        accp = builder.bitcast(context.make_array(st[0])(context, builder, args[0]).data, _I32.as_pointer())
        xp = builder.bitcast(context.make_array(st[1])(context, builder, args[1]).data, ptr)
        wp = builder.bitcast(context.make_array(st[2])(context, builder, args[2]).data, ptr)
        woff_, wst, nv = (context.cast(builder, args[i], st[i], types.int64) for i in (3, 4, 5))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512")
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_V16]),
                                             "llvm.vector.reduce.add.v16i32")
        pre = builder.basic_block
        hdr = builder.append_basic_block("dot.hdr")
        body = builder.append_basic_block("dot.body")
        done = builder.append_basic_block("dot.done")
        builder.branch(hdr)
        builder.position_at_end(hdr)
        i = builder.phi(_I64, "i")
        i.add_incoming(ir.Constant(_I64, 0), pre)
        accs = []
        for r in range(4):
            p = builder.phi(_V16, f"a{r}")
            p.add_incoming(ir.Constant(_V16, None), pre)
            accs.append(p)
        builder.cbranch(builder.icmp_signed("<", i, nv), body, done)
        builder.position_at_end(body)
        off = builder.mul(i, ir.Constant(_I64, 64))
        xv = builder.load(builder.bitcast(builder.gep(xp, [off]), _V16.as_pointer()), align=1)
        new = []
        for r in range(4):
            wo = builder.add(builder.add(woff_, builder.mul(wst, ir.Constant(_I64, r))), off)
            wv = builder.load(builder.bitcast(builder.gep(wp, [wo]), _V16.as_pointer()), align=1)
            new.append(builder.call(fn, [accs[r], xv, wv]))
        end = builder.basic_block
        i.add_incoming(builder.add(i, ir.Constant(_I64, 1)), end)
        for a, v in zip(accs, new):
            a.add_incoming(v, end)
        builder.branch(hdr)
        builder.position_at_end(done)
        for r in range(4):
            builder.store(builder.call(red, [accs[r]]), builder.gep(accp, [ir.Constant(_I64, r)]))
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# unstructured groups of 4: byte-interleave 4 activation rows in registers, then vpdpbusd
def _unpack(builder, a, b, width, hi):
    """x86 punpck{l,h}{bw,wd} on 512-bit vectors (within each 128-bit lane) as a shufflevector of
    two <n x iW> vectors: lo takes elements 0..h-1 of every lane, hi h..2h-1 (h = lane elements / 2)."""
    n = 512 // width
    per = 128 // width
    h = per // 2
    vt = ir.VectorType(ir.IntType(width), n)
    a = builder.bitcast(a, vt)
    b = builder.bitcast(b, vt)
    mask = []
    for lane in range(4):
        for j in range(h):
            src = lane * per + j + (h if hi else 0)
            mask += [src, n + src]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, n), mask))


def _idx_t(aty):
    """LLVM element type of a feature-index array: uint16 (in <= 65536) or int32."""
    return ir.IntType(16) if aty.dtype == types.uint16 else _I32


def _load_idx(builder, ip, i):
    v = builder.load(builder.gep(ip, [i]))
    return builder.zext(v, _I64) if v.type.width == 16 else builder.sext(v, _I64)


def _gather4_loop(builder, r_, nc_, qs, xp, ip, wp, xrs_, xoff_, g0_, g1_):
    """The group loop of ``vnni_gather4``; returns {(r, c, q): <16 x i32> sums} (builder in the
    exit block)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512")
    v64 = ir.VectorType(_I8, 64)
    zero = ir.Constant(_V16, None)
    bmask = ir.Constant(_V16, [0] * 16)
    need_lo = any(q < 2 for q in qs)
    need_hi = any(q >= 2 for q in qs)
    pre = builder.basic_block
    hdr = builder.append_basic_block("g4.hdr")
    body = builder.append_basic_block("g4.body")
    done = builder.append_basic_block("g4.done")
    builder.branch(hdr)
    builder.position_at_end(hdr)
    g = builder.phi(_I64, "g")
    g.add_incoming(g0_, pre)
    keys = [(r, c, q) for r in range(r_) for c in range(nc_) for q in qs]
    accs = {}
    for key in keys:
        p = builder.phi(_V16)
        p.add_incoming(zero, pre)
        accs[key] = p
    builder.cbranch(builder.icmp_signed("<", g, g1_), body, done)
    builder.position_at_end(body)
    g4 = builder.mul(g, ir.Constant(_I64, 4))
    rows = []
    for j in range(4):
        k = _load_idx(builder, ip, builder.add(g4, ir.Constant(_I64, j)))
        rows.append(builder.add(builder.mul(k, xrs_), xoff_))
    wb = []
    for r in range(r_):
        off = builder.add(builder.mul(g, ir.Constant(_I64, 4 * r_)), ir.Constant(_I64, 4 * r))
        wv = builder.load(builder.bitcast(builder.gep(wp, [off]), _I32.as_pointer()), align=1)
        wb.append(builder.shuffle_vector(builder.insert_element(ir.Constant(_V16, ir.Undefined), wv,
                                                                ir.Constant(_I32, 0)),
                                         ir.Constant(_V16, ir.Undefined), bmask))
    new = {}
    for c in range(nc_):
        xs = []
        for j in range(4):
            p = builder.gep(xp, [builder.add(rows[j], ir.Constant(_I64, 64 * c))])
            xs.append(builder.load(builder.bitcast(p, v64.as_pointer()), align=1))
        quarters = {}
        for hi in ([0] if need_lo else []) + ([1] if need_hi else []):
            ab = _unpack(builder, xs[0], xs[1], 8, hi)
            cd = _unpack(builder, xs[2], xs[3], 8, hi)
            for h2 in (0, 1):
                q = 2 * hi + h2
                if q in qs:
                    quarters[q] = builder.bitcast(_unpack(builder, ab, cd, 16, h2), _V16)
        for r in range(r_):
            for q in qs:
                new[(r, c, q)] = builder.call(fn, [accs[(r, c, q)], quarters[q], wb[r]])
    end = builder.basic_block
    g.add_incoming(builder.add(g, ir.Constant(_I64, 1)), end)
    for key in keys:
        accs[key].add_incoming(new[key], end)
    builder.branch(hdr)
    builder.position_at_end(done)
    return accs


def _splat(builder, v, vt):
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(_I32, 0)),
                                  ir.Constant(vt, ir.Undefined), ir.Constant(_V16, [0] * 16))


def _deq_store(builder, v, j0, yrow, ncol_, sxp, czp, coff_, rs_, swo_, b_):
    """Register epilogue of one 16-column accumulator at column j0 of a row:
    ``yrow[j0 + l] = float32(v + czp[coff + j0 + l] * rs) * (sxp[coff + j0 + l] * swo) + b`` for
    ``j0 + l < ncol`` (int32 corrections, float32 multiply then add, no contraction)."""
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, 16)
    co = builder.add(coff_, ir.Constant(_I64, j0))
    cz = builder.load(builder.bitcast(builder.gep(czp, [co]), _V16.as_pointer()), align=4)
    sxl = builder.load(builder.bitcast(builder.gep(sxp, [co]), vf.as_pointer()), align=4)
    corr = builder.add(v, builder.mul(cz, _splat(builder, rs_, _V16)))
    out = builder.fadd(builder.fmul(builder.sitofp(corr, vf), builder.fmul(sxl, _splat(builder, swo_, vf))),
                       _splat(builder, b_, vf))
    dst = builder.bitcast(builder.gep(yrow, [ir.Constant(_I64, j0)]), vf.as_pointer())
    left = builder.sub(ncol_, ir.Constant(_I64, j0))
    mst = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vf, vf.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16)]),
        "llvm.masked.store.v16f32.p0v16f32")
    with builder.if_else(builder.icmp_signed(">=", left, ir.Constant(_I64, 16))) as (full, part):
        with full:
            builder.store(out, dst, align=4)
        with part:
            with builder.if_then(builder.icmp_signed(">", left, ir.Constant(_I64, 0))):
                m = builder.icmp_signed("<", ir.Constant(_V16, list(range(16))),
                                        _splat(builder, builder.trunc(left, _I32), _V16))
                builder.call(mst, [out, dst, ir.Constant(_I32, 4), m])


@intrinsic
def vnni_gather4(typingctx, R, NC, QLO, QHI, acc, aoff, ars, xq, xrs, xoff, gidx, gw, g0, g1):
    """Sparse groups of 4 arbitrary input features: for g in [g0, g1) the features
    ``k = gidx[4g + j]`` (j < 4), weights ``gw[(g*R + r)*4 + j]`` (int8) for the R rows of the tile.
    Activation rows are uint8 ``xq[k*xrs + xoff + 64c + p]`` (c < NC chunks of 64 columns, stored
    column-permuted: position ``16L + 4q + i`` holds column ``16q + 4L + i``); per group and chunk
    the 4 rows are byte-interleaved in registers (punpcklbw/hbw then punpcklwd/hwd: 8 shuffles) into
    4 zmm of 16 columns x 4 features and fed to vpdpbusd with the broadcast weight dword of each row.
    Only the column quarters q in [QLO, QHI) are computed (R * NC * (QHI-QLO) accumulators).
    Writes int32 ``acc[aoff + r*ars + 64c + 16q + l]`` (natural column order)."""
    r_, nc_, qlo_, qhi_ = (_literal_int(v) for v in (R, NC, QLO, QHI))
    if None in (r_, nc_, qlo_, qhi_):
        return None
    ints = (aoff, ars, xrs, xoff, g0, g1)
    if not all(isinstance(v, types.Integer) for v in ints):
        return None
    sig = types.void(R, NC, QLO, QHI, acc, aoff, ars, xq, xrs, xoff, gidx, gw, g0, g1)

    def codegen(context, builder, signature, args):
        st = signature.args

        def ptr(i, t):
            return builder.bitcast(context.make_array(st[i])(context, builder, args[i]).data, t.as_pointer())

        def i64(i):
            return context.cast(builder, args[i], st[i], types.int64)

        accp, xp, ip, wp = ptr(4, _I32), ptr(7, _I8), ptr(10, _idx_t(st[10])), ptr(11, _I8)
        aoff_, ars_, xrs_, xoff_, g0_, g1_ = (i64(i) for i in (5, 6, 8, 9, 12, 13))
        accs = _gather4_loop(builder, r_, nc_, list(range(qlo_, qhi_)), xp, ip, wp, xrs_, xoff_, g0_, g1_)
        for (r, c, q), v in accs.items():
            off = builder.add(aoff_, builder.add(builder.mul(ars_, ir.Constant(_I64, r)),
                                                 ir.Constant(_I64, 64 * c + 16 * q)))
            builder.store(v, builder.bitcast(builder.gep(accp, [off]), _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vnni_gather4_deq(typingctx, R, NC, QLO, QHI, y, yoff, ystride, nrow, ncol, sxv, czv, coff, rowsum, sw, bpad, o0,
                     xq, xrs, xoff, gidx, gw, g0, g1):
    """``vnni_gather4`` with the dequantize fused into the register epilogue: for rows r < nrow
    (o = o0 + r) and columns j = 64c + 16q + l < ncol,
    ``y[yoff + r*ystride + j] = float32(acc + czv[coff + j] * rowsum[o]) * (sxv[coff + j] * sw[o]) + bpad[o]``
    (bpad: the bias, or -0.0 -- an exact no-op add). sxv / czv padded to ``coff + 64 * NC``."""
    r_, nc_, qlo_, qhi_ = (_literal_int(v) for v in (R, NC, QLO, QHI))
    if None in (r_, nc_, qlo_, qhi_):
        return None
    ints = (yoff, ystride, nrow, ncol, coff, o0, xrs, xoff, g0, g1)
    if not all(isinstance(v, types.Integer) for v in ints):
        return None
    sig = types.void(R, NC, QLO, QHI, y, yoff, ystride, nrow, ncol, sxv, czv, coff, rowsum, sw, bpad, o0,
                     xq, xrs, xoff, gidx, gw, g0, g1)

    def codegen(context, builder, signature, args):
        st = signature.args
        f32 = ir.FloatType()

        def ptr(i, t):
            return builder.bitcast(context.make_array(st[i])(context, builder, args[i]).data, t.as_pointer())

        def i64(i):
            return context.cast(builder, args[i], st[i], types.int64)

        yp, sxp, czp, rsp, swp, bp = (ptr(4, f32), ptr(9, f32), ptr(10, _I32), ptr(12, _I32), ptr(13, f32),
                                      ptr(14, f32))
        xp, ip, wp = ptr(16, _I8), ptr(19, _idx_t(st[19])), ptr(20, _I8)
        yoff_, ystr_, nrow_, ncol_, coff_, o0_, xrs_, xoff_, g0_, g1_ = (
            i64(i) for i in (5, 6, 7, 8, 11, 15, 17, 18, 21, 22))
        accs = _gather4_loop(builder, r_, nc_, list(range(qlo_, qhi_)), xp, ip, wp, xrs_, xoff_, g0_, g1_)
        for r in range(r_):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, r), nrow_)):
                o = builder.add(o0_, ir.Constant(_I64, r))
                rs_ = builder.load(builder.gep(rsp, [o]))
                swo_ = builder.load(builder.gep(swp, [o]))
                b_ = builder.load(builder.gep(bp, [o]))
                yrow = builder.gep(yp, [builder.add(yoff_, builder.mul(ystr_, ir.Constant(_I64, r)))])
                for c in range(nc_):
                    for q in range(qlo_, qhi_):
                        _deq_store(builder, accs[(r, c, q)], 64 * c + 16 * q, yrow, ncol_, sxp, czp, coff_, rs_,
                                   swo_, b_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def minmax_f32(typingctx, x):
    """(min(min(x), 0), max(max(x), 0)) of a contiguous float32 array as float32, in 16-lane
    vectors (plain numba loops do not vectorize this reduction without fastmath nnan). NaNs are
    not propagated (garbage in, garbage quantization, no crash)."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"):
        return None
    ret = types.UniTuple(types.float32, 2)
    sig = ret(x)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, 16)
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        p = builder.bitcast(ary.data, f32.as_pointer())
        n = ary.nitems
        U = 4  # independent accumulator pairs (the compare + select chain is the bound)
        nv = builder.sdiv(n, ir.Constant(_I64, 16 * U))
        zero = ir.Constant(vf, None)
        pre = builder.basic_block
        hdr = builder.append_basic_block("mm.hdr")
        body = builder.append_basic_block("mm.body")
        tail = builder.append_basic_block("mm.tail")
        thdr = builder.append_basic_block("mm.thdr")
        tbody = builder.append_basic_block("mm.tbody")
        done = builder.append_basic_block("mm.done")
        builder.branch(hdr)
        builder.position_at_end(hdr)
        i = builder.phi(_I64)
        i.add_incoming(ir.Constant(_I64, 0), pre)
        los, his = [], []
        for u in range(U):
            lo = builder.phi(vf)
            hi = builder.phi(vf)
            lo.add_incoming(zero, pre)
            hi.add_incoming(zero, pre)
            los.append(lo)
            his.append(hi)
        builder.cbranch(builder.icmp_signed("<", i, nv), body, tail)
        builder.position_at_end(body)
        base = builder.mul(i, ir.Constant(_I64, 16 * U))
        for u in range(U):
            v = builder.load(builder.bitcast(builder.gep(p, [builder.add(base, ir.Constant(_I64, 16 * u))]),
                                             vf.as_pointer()), align=4)
            los[u].add_incoming(builder.select(builder.fcmp_ordered("<", v, los[u]), v, los[u]), body)
            his[u].add_incoming(builder.select(builder.fcmp_ordered(">", v, his[u]), v, his[u]), body)
        i.add_incoming(builder.add(i, ir.Constant(_I64, 1)), body)
        builder.branch(hdr)
        builder.position_at_end(tail)
        lo, hi = los[0], his[0]
        for u in range(1, U):
            lo = builder.select(builder.fcmp_ordered("<", los[u], lo), los[u], lo)
            hi = builder.select(builder.fcmp_ordered(">", his[u], hi), his[u], hi)
        slo = builder.extract_element(lo, ir.Constant(_I32, 0))
        shi = builder.extract_element(hi, ir.Constant(_I32, 0))
        for k in range(1, 16):
            a = builder.extract_element(lo, ir.Constant(_I32, k))
            b = builder.extract_element(hi, ir.Constant(_I32, k))
            slo = builder.select(builder.fcmp_ordered("<", a, slo), a, slo)
            shi = builder.select(builder.fcmp_ordered(">", b, shi), b, shi)
        j0 = builder.mul(nv, ir.Constant(_I64, 16 * U))
        builder.branch(thdr)
        builder.position_at_end(thdr)
        j = builder.phi(_I64)
        j.add_incoming(j0, tail)
        tlo = builder.phi(f32)
        thi = builder.phi(f32)
        tlo.add_incoming(slo, tail)
        thi.add_incoming(shi, tail)
        builder.cbranch(builder.icmp_signed("<", j, n), tbody, done)
        builder.position_at_end(tbody)
        s = builder.load(builder.gep(p, [j]))
        tlo.add_incoming(builder.select(builder.fcmp_ordered("<", s, tlo), s, tlo), tbody)
        thi.add_incoming(builder.select(builder.fcmp_ordered(">", s, thi), s, thi), tbody)
        j.add_incoming(builder.add(j, ir.Constant(_I64, 1)), tbody)
        builder.branch(thdr)
        builder.position_at_end(done)
        return context.make_tuple(builder, ret, (tlo, thi))

    return sig, codegen


def _pairs_loop(builder, nc_, xp, ip, wp, xrs_, xoff_, g0_, g1_):
    """The group loop of ``vnni_pairs``; returns {(chunk, a): <16 x i32> sums} after the loop
    (the builder positioned in the exit block). With X in L1 it runs at its port bound (16
    vpdpbusd + 8 shuffles per group x 128 columns: 12 cycles); taking every other chunk with the
    4-row interleave of ``vnni_gather4`` instead (8 + 16) measured the same."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512")
    v64 = ir.VectorType(_I8, 64)
    zero = ir.Constant(_V16, None)
    bmask = ir.Constant(_V16, [0] * 16)
    pre = builder.basic_block
    hdr = builder.append_basic_block("pr.hdr")
    body = builder.append_basic_block("pr.body")
    done = builder.append_basic_block("pr.done")
    builder.branch(hdr)
    builder.position_at_end(hdr)
    g = builder.phi(_I64, "g")
    g.add_incoming(g0_, pre)
    keys = [(c, a) for c in range(nc_) for a in range(4)]
    accs = {}
    for key in keys:
        p = builder.phi(_V16)
        p.add_incoming(zero, pre)
        accs[key] = p
    builder.cbranch(builder.icmp_signed("<", g, g1_), body, done)
    builder.position_at_end(body)
    g4 = builder.mul(g, ir.Constant(_I64, 4))
    rows, wb = [], []
    for j in range(4):
        k = _load_idx(builder, ip, builder.add(g4, ir.Constant(_I64, j)))
        rows.append(builder.add(builder.mul(k, xrs_), xoff_))
        wv = builder.load(builder.gep(wp, [builder.add(g4, ir.Constant(_I64, j))]), align=4)
        wb.append(builder.shuffle_vector(builder.insert_element(ir.Constant(_V16, ir.Undefined), wv,
                                                                ir.Constant(_I32, 0)),
                                         ir.Constant(_V16, ir.Undefined), bmask))
    cur = dict(accs)
    for pr in range(2):
        for c in range(nc_):
            xa, xb = (builder.load(builder.bitcast(builder.gep(xp, [builder.add(rows[2 * pr + j],
                                                                                 ir.Constant(_I64, 64 * c))]),
                                                   v64.as_pointer()), align=1) for j in range(2))
            for h in range(2):
                u = builder.bitcast(_unpack(builder, xa, xb, 8, h), _V16)
                for e in range(2):
                    key = (c, 2 * h + e)
                    cur[key] = builder.call(fn, [cur[key], u, wb[2 * pr + e]])
    end = builder.basic_block
    g.add_incoming(builder.add(g, ir.Constant(_I64, 1)), end)
    for key in keys:
        accs[key].add_incoming(cur[key], end)
    builder.branch(hdr)
    builder.position_at_end(done)
    return accs


@intrinsic
def vnni_pairs(typingctx, NC, acc, aoff, xq, xrs, xoff, gidx, gw2, g0, g1):
    """One output row from groups of 4 features taken as 2 pairs (a, b), (c, d): per pair and chunk
    of 64 columns, 2 byte interleaves (punpcklbw / punpckhbw: dwords [x_a[j], x_b[j], x_a[j+1],
    x_b[j+1]]) and 4 vpdpbusd with the "even" weight dword (w_a, w_b, 0, 0) and the "odd" one
    (0, 0, w_a, w_b) -- 2 shuffles + 4 dot products per 2 non-zeros x 64 columns instead of 4 + 2:
    vpdpbusd issues on 2 ports, shuffles on 1, so this balances the ports.
    gidx int32 [ng, 4] (features), gw2 int8 [ng, 4, 4] = (even ab, odd ab, even cd, odd cd);
    xq uint8 rows ``xq[k*xrs + xoff + 64c + p]`` with position ``16L + 8h + 2m + e`` holding column
    ``16(2h+e) + 4L + m`` of the chunk. Writes int32 ``acc[aoff + 64c + l]`` (natural order)."""
    nc_ = _literal_int(NC)
    if nc_ is None:
        return None
    if not all(isinstance(v, types.Integer) for v in (aoff, xrs, xoff, g0, g1)):
        return None
    sig = types.void(NC, acc, aoff, xq, xrs, xoff, gidx, gw2, g0, g1)

    def codegen(context, builder, signature, args):
        st = signature.args

        def ptr(i, t):
            return builder.bitcast(context.make_array(st[i])(context, builder, args[i]).data, t.as_pointer())

        def i64(i):
            return context.cast(builder, args[i], st[i], types.int64)

        accp, xp, ip, wp = ptr(1, _I32), ptr(3, _I8), ptr(6, _idx_t(st[6])), ptr(7, _I32)
        aoff_, xrs_, xoff_, g0_, g1_ = (i64(i) for i in (2, 4, 5, 8, 9))
        accs = _pairs_loop(builder, nc_, xp, ip, wp, xrs_, xoff_, g0_, g1_)
        for (c, a), v in accs.items():
            off = builder.add(aoff_, ir.Constant(_I64, 64 * c + 16 * a))
            builder.store(v, builder.bitcast(builder.gep(accp, [off]), _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vnni_pairs_deq(typingctx, NC, y, yoff, ncol, sxv, czv, coff, rs, swo, b, xq, xrs, xoff, gidx, gw2, g0, g1):
    """``vnni_pairs`` with the dequantize fused into the register epilogue (the y stores then
    overlap the next row's dot products instead of a separate pass over int32 sums):
    ``y[yoff + j] = float32(acc[j] + czv[coff + j] * rs) * (sxv[coff + j] * swo) + b`` for the
    columns ``j = 64c + l < ncol`` (masked store on the last vector). int32 arithmetic (exact when
    K * 255 * 127 * 2 < 2**31), float32 multiply then add, no contraction: bit-identical to
    ``_deq_rows_i32`` without residual / activation. sxv float32, czv int32 must hold
    ``coff + 64 * NC`` entries (padded). Per-tensor activation quantization: sxv a float32 and czv
    an int32 scalar (the same value for every column): the correction is one broadcast add
    (``czv * rs`` computed once) and the scale one scalar product, no per-column loads or
    vpmulld -- the same integers and float32 products, bit-identical."""
    nc_ = _literal_int(NC)
    if nc_ is None:
        return None
    if not all(isinstance(v, types.Integer) for v in (yoff, ncol, coff, rs, xrs, xoff, g0, g1)):
        return None
    if not all(isinstance(v, types.Float) for v in (swo, b)):
        return None
    scalar = isinstance(sxv, types.Float) and isinstance(czv, types.Integer)
    if not scalar and not (isinstance(sxv, types.Array) and isinstance(czv, types.Array)):
        return None
    sig = types.void(NC, y, yoff, ncol, sxv, czv, coff, rs, swo, b, xq, xrs, xoff, gidx, gw2, g0, g1)

    def codegen(context, builder, signature, args):
        st = signature.args
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, 16)

        def ptr(i, t):
            return builder.bitcast(context.make_array(st[i])(context, builder, args[i]).data, t.as_pointer())

        def i64(i):
            return context.cast(builder, args[i], st[i], types.int64)

        if scalar:
            yp, xp, ip, wp = ptr(1, f32), ptr(10, _I8), ptr(13, _idx_t(st[13])), ptr(14, _I32)
            sxp = czp = None
        else:
            yp, sxp, czp, xp, ip, wp = (ptr(1, f32), ptr(4, f32), ptr(5, _I32), ptr(10, _I8),
                                        ptr(13, _idx_t(st[13])), ptr(14, _I32))
        yoff_, ncol_, coff_, xrs_, xoff_, g0_, g1_ = (i64(i) for i in (2, 3, 6, 11, 12, 15, 16))
        rs_ = builder.trunc(i64(7), _I32)
        swo_ = context.cast(builder, args[8], st[8], types.float32)
        b_ = context.cast(builder, args[9], st[9], types.float32)
        accs = _pairs_loop(builder, nc_, xp, ip, wp, xrs_, xoff_, g0_, g1_)

        def splat(v, vt):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, ir.Undefined), v,
                                                                 ir.Constant(_I32, 0)),
                                          ir.Constant(vt, ir.Undefined), ir.Constant(_V16, [0] * 16))

        rsv, swv, bv = splat(rs_, _V16), splat(swo_, vf), splat(b_, vf)
        if scalar:  # per-tensor: corr = acc + (cz * rs), scale = sx * swo (int32 / float32, as the vector form)
            cz_ = builder.trunc(context.cast(builder, args[5], st[5], types.int64), _I32)
            sx_ = context.cast(builder, args[4], st[4], types.float32)
            czrs = splat(builder.mul(cz_, rs_), _V16)
            scl = splat(builder.fmul(sx_, swo_), vf)
        iota = ir.Constant(_V16, list(range(16)))
        mst = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vf, vf.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16)]),
            "llvm.masked.store.v16f32.p0v16f32")
        for (c, a), v in accs.items():
            j0 = 64 * c + 16 * a
            if scalar:
                out = builder.fadd(builder.fmul(builder.sitofp(builder.add(v, czrs), vf), scl), bv)
            else:
                co = builder.add(coff_, ir.Constant(_I64, j0))
                cz = builder.load(builder.bitcast(builder.gep(czp, [co]), _V16.as_pointer()), align=4)
                sxl = builder.load(builder.bitcast(builder.gep(sxp, [co]), vf.as_pointer()), align=4)
                corr = builder.add(v, builder.mul(cz, rsv))
                out = builder.fadd(builder.fmul(builder.sitofp(corr, vf), builder.fmul(sxl, swv)), bv)
            dst = builder.bitcast(builder.gep(yp, [builder.add(yoff_, ir.Constant(_I64, j0))]), vf.as_pointer())
            left = builder.sub(ncol_, ir.Constant(_I64, j0))
            with builder.if_else(builder.icmp_signed(">=", left, ir.Constant(_I64, 16))) as (full, part):
                with full:
                    builder.store(out, dst, align=4)
                with part:
                    with builder.if_then(builder.icmp_signed(">", left, ir.Constant(_I64, 0))):
                        m = builder.icmp_signed("<", iota, splat(builder.trunc(left, _I32), _V16))
                        builder.call(mst, [out, dst, ir.Constant(_I32, 4), m])
        return context.get_dummy_value()

    return sig, codegen

def _perm64(pairs):
    """Byte permutation of a 64-column chunk (destination position -> source column) that the
    in-register interleaves of ``vnni_pairs`` (pairs) / ``vnni_gather4`` undo."""
    m = [0] * 64
    for L in range(4):
        if pairs:
            for h in range(2):
                for mm in range(4):
                    for e in range(2):
                        m[16 * L + 8 * h + 2 * mm + e] = 16 * (2 * h + e) + 4 * L + mm
        else:
            for q in range(4):
                for i in range(4):
                    m[16 * L + 4 * q + i] = 16 * q + 4 * L + i
    return m


@intrinsic
def permute_chunks(typingctx, PAIRS, dst, doff, src, soff, nchunk):
    """dst[doff + 64c + p] = src[soff + 64c + perm(p)] for c < nchunk (uint8 arrays; perm = ``_perm64``):
    one constant <64 x i8> shufflevector per chunk (vpermb where the CPU has VBMI)."""
    pr = _literal_int(PAIRS)
    if pr is None or not all(isinstance(v, types.Integer) for v in (doff, soff, nchunk)):
        return None
    sig = types.void(PAIRS, dst, doff, src, soff, nchunk)

    def codegen(context, builder, signature, args):
        st = signature.args
        dp = builder.bitcast(context.make_array(st[1])(context, builder, args[1]).data, _I8.as_pointer())
        sp = builder.bitcast(context.make_array(st[3])(context, builder, args[3]).data, _I8.as_pointer())
        doff_, soff_, nc = (context.cast(builder, args[i], st[i], types.int64) for i in (2, 4, 5))
        v64 = ir.VectorType(_I8, 64)
        mask = ir.Constant(ir.VectorType(_I32, 64), _perm64(bool(pr)))
        with cgutils.for_range(builder, nc) as loop:
            o = builder.mul(loop.index, ir.Constant(_I64, 64))
            v = builder.load(builder.bitcast(builder.gep(sp, [builder.add(soff_, o)]), v64.as_pointer()), align=1)
            v = builder.shuffle_vector(v, ir.Constant(v64, ir.Undefined), mask)
            builder.store(v, builder.bitcast(builder.gep(dp, [builder.add(doff_, o)]), v64.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# work hand-out between the workers of one parallel call
@intrinsic
def spin_until(typingctx, arr, idx, val, maxspin):
    """Spin (atomic seq_cst loads + ``pause``) until ``arr[idx] >= val`` (1-D int64 array) or
    ``maxspin`` pauses have passed; returns whether the value was reached. Waiting is bounded:
    the worker that claimed the awaited work may be preempted or not started (a thread pool may
    run all workers of a call on one thread, one after the other), so callers redo idempotent
    work themselves when this returns False."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    if not all(isinstance(v, types.Integer) for v in (idx, val, maxspin)):
        return None
    sig = types.boolean(arr, idx, val, maxspin)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        i, v, m = (context.cast(builder, args[k], signature.args[k], types.int64) for k in (1, 2, 3))
        p = builder.gep(a.data, [i])
        pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                               "llvm.x86.sse2.pause")
        pre = builder.basic_block
        hdr = builder.append_basic_block("spin.hdr")
        body = builder.append_basic_block("spin.body")
        done = builder.append_basic_block("spin.done")
        builder.branch(hdr)
        builder.position_at_end(hdr)
        n = builder.phi(_I64)
        n.add_incoming(ir.Constant(_I64, 0), pre)
        cur = builder.load_atomic(p, "seq_cst", 8)
        ok = builder.icmp_signed(">=", cur, v)
        builder.cbranch(builder.or_(ok, builder.icmp_signed(">=", n, m)), done, body)
        builder.position_at_end(body)
        builder.call(pause, [])
        n.add_incoming(builder.add(n, ir.Constant(_I64, 1)), body)
        builder.branch(hdr)
        builder.position_at_end(done)
        return ok
    return sig, codegen


def _pack_perm(pairs):
    """``_perm64`` composed with the byte order of packssdw(a, b), packssdw(c, d) then packuswb
    (within 128-bit lanes) of the column quarters a, b, c, d (16 int32 each): destination byte p
    of a chunk -> byte of the packed vector."""
    where = {}
    for y in range(64):
        L, j = divmod(y, 16)
        pw, wj = (0, 8 * L + j) if j < 8 else (1, 8 * L + j - 8)  # word of pack(a, b) / pack(c, d)
        WL, k = divmod(wj, 8)
        q = 2 * pw + (0 if k < 4 else 1)
        where[16 * q + 4 * WL + (k % 4)] = y
    return [where[c] for c in _perm64(pairs)]


@intrinsic
def quant_chunks(typingctx, PAIRS, dst, doff, src, soff, n, inv, zf, nchunk):
    """Quantize one activation row into the permuted uint8 layout in registers:
    ``dst[doff + 64c + p] = q(src[soff + 64c + perm(p)])`` for c < nchunk (perm = ``_perm64``),
    ``q(v) = int(min(max(rint(v * inv) + zf, 0), 255))`` (float32, the operations of
    ``int8._q``) for columns 64c + l < n, and 0 past n (masked loads on the last chunks only:
    src is never read there). Per 64 columns: 4 loads, 4 x (mul, round, add, max, min,
    convert), 3 packs (exact: values in 0..255), one byte permutation, one 64-byte store (no
    store-to-load forwarding stall of a byte buffer read back by ``permute_chunks``).
    src float32, dst uint8 (1-D); inv, zf float32 scalars."""
    pr = _literal_int(PAIRS)
    if pr is None or not all(isinstance(v, types.Integer) for v in (doff, soff, n, nchunk)):
        return None
    if not all(isinstance(v, types.Float) for v in (inv, zf)):
        return None
    sig = types.void(PAIRS, dst, doff, src, soff, n, inv, zf, nchunk)

    def codegen(context, builder, signature, args):
        st = signature.args
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, 16)
        v1 = ir.VectorType(ir.IntType(1), 16)
        v64 = ir.VectorType(_I8, 64)
        v32w = ir.VectorType(ir.IntType(16), 32)
        dp = builder.bitcast(context.make_array(st[1])(context, builder, args[1]).data, _I8.as_pointer())
        sp = builder.bitcast(context.make_array(st[3])(context, builder, args[3]).data, f32.as_pointer())
        doff_, soff_, n_, nc = (context.cast(builder, args[i], st[i], types.int64) for i in (2, 4, 5, 8))
        inv_ = context.cast(builder, args[6], st[6], types.float32)
        zf_ = context.cast(builder, args[7], st[7], types.float32)
        mod = builder.module
        rint = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf]), "llvm.rint.v16f32")
        mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(vf, [vf.as_pointer(), _I32, v1, vf]), "llvm.masked.load.v16f32.p0v16f32")
        packdw = cgutils.get_or_insert_function(mod, ir.FunctionType(v32w, [_V16, _V16]),
                                                "llvm.x86.avx512.packssdw.512")
        packwb = cgutils.get_or_insert_function(mod, ir.FunctionType(v64, [v32w, v32w]),
                                                "llvm.x86.avx512.packuswb.512")
        invv, zfv = _splat(builder, inv_, vf), _splat(builder, zf_, vf)
        zero, f255 = ir.Constant(vf, None), ir.Constant(vf, [255.0] * 16)
        iota = ir.Constant(_V16, list(range(16)))
        mask = ir.Constant(ir.VectorType(_I32, 64), _pack_perm(bool(pr)))
        # chunks entirely below n: plain loads; the rest: masked loads (zeros past n)
        nfull = builder.sdiv(n_, ir.Constant(_I64, 64))
        nfull = builder.select(builder.icmp_signed("<", nfull, nc), nfull, nc)

        def chunk(c, masked):
            c64 = builder.mul(c, ir.Constant(_I64, 64))
            qs = []
            for q in range(4):
                j0 = builder.add(c64, ir.Constant(_I64, 16 * q))
                p = builder.bitcast(builder.gep(sp, [builder.add(soff_, j0)]), vf.as_pointer())
                if masked:
                    left = builder.sub(n_, j0)
                    cl = builder.select(builder.icmp_signed(">", left, ir.Constant(_I64, 0)), left,
                                        ir.Constant(_I64, 0))
                    cl = builder.select(builder.icmp_signed(">=", left, ir.Constant(_I64, 16)),
                                        ir.Constant(_I64, 16), cl)
                    m = builder.icmp_signed("<", iota, _splat(builder, builder.trunc(cl, _I32), _V16))
                    v = builder.call(mload, [p, ir.Constant(_I32, 4), m, zero])
                else:
                    v = builder.load(p, align=4)
                t = builder.fadd(builder.call(rint, [builder.fmul(v, invv)]), zfv)
                t = builder.select(builder.fcmp_ordered(">", t, zero), t, zero)
                t = builder.select(builder.fcmp_ordered("<", t, f255), t, f255)
                t = builder.fptosi(t, _V16)
                if masked:
                    t = builder.select(m, t, ir.Constant(_V16, None))
                qs.append(t)
            pk = builder.call(packwb, [builder.call(packdw, [qs[0], qs[1]]), builder.call(packdw, [qs[2], qs[3]])])
            out = builder.shuffle_vector(pk, ir.Constant(v64, ir.Undefined), mask)
            dst = builder.bitcast(builder.gep(dp, [builder.add(doff_, c64)]), v64.as_pointer())
            builder.store(out, dst, align=1)

        with cgutils.for_range(builder, nfull) as loop:
            chunk(loop.index, False)
        with cgutils.for_range(builder, builder.sub(nc, nfull)) as loop:
            chunk(builder.add(loop.index, nfull), True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def num_threads(typingctx):
    """``numba.get_num_threads()`` inside jitted code through the threading layer's symbol
    (numba's own overload goes through a ctypes pointer, which makes the function uncacheable;
    from Python the call cost ~8 us right after a kernel had the caches)."""
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []), "get_num_threads")
        return builder.call(fn, [])
    return types.intp(), codegen
