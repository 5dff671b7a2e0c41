"""Batched direct sparse conv (kernels/conv.py ``sparse_conv_batch``: batch packed channel-major,
one CSR / BSR r x 1 kernel call, crop + fused epilogue) vs the numpy reference ``conv2d_ref``."""
import numba
import numpy as np
import pytest

from sparsedge.formats.bsr import BSR
from sparsedge.formats.csr import CSR
from sparsedge.kernels import conv, table

CASES = [  # (B, C, H, W, O, kh, kw, stride, padding, dilation)
    (3, 5, 7, 9, 6, 3, 3, (1, 1), (1, 1), (1, 1)),     # shared-padding layout
    (1, 4, 4, 4, 9, 3, 3, (1, 1), (1, 1), (1, 1)),     # N=1 image, tiny grid (tile round-up)
    (2, 3, 9, 6, 4, 5, 3, (1, 1), (2, 0), (1, 2)),     # dilation, asymmetric padding
    (2, 3, 8, 8, 5, 3, 3, (1, 1), (3, 3), (1, 1)),     # over-padded: phase layout at stride 1
    (2, 6, 11, 10, 8, 3, 3, (2, 2), (1, 1), (1, 1)),   # stride 2, odd size
    (3, 4, 8, 8, 7, 1, 1, (2, 2), (0, 0), (1, 1)),     # 1x1 stride 2 (downsample)
    (2, 3, 12, 9, 16, 3, 5, (3, 2), (1, 2), (2, 1)),   # mixed stride / dilation
    (2, 2, 5, 5, 3, 1, 1, (1, 1), (1, 1), (1, 1)),     # 1x1 padded
    (2, 8, 5, 70, 17, 3, 3, (1, 1), (1, 1), (1, 1)),   # rows above a vector tile, O not a multiple of 8
    (2, 96, 6, 6, 12, 3, 3, (1, 1), (1, 1), (1, 1)),   # K = 864: several K panels in csr_conv_kpanel
]


def _weight(kind, O, K, rng, density):
    w = rng.standard_normal((O, K)).astype(np.float32)
    if kind == "csr":
        w *= rng.random(w.shape) < density
        return w, CSR.from_dense(w), table.by_name("csr_f32_spmm")
    r = int(kind[3:-2])
    keep = np.repeat(rng.random((-(-O // r), K)) < density, r, 0)[:O]
    w *= keep
    return w, BSR.from_dense(w, block=(r, 1)), table.by_name(f"bsr{r}x1_f32_spmm")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["csr", "csr_plane", "csr_inner", "bsr8x1", "bsr8x1_inner", "bsr16x1"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_conv_batch(case, kind, threads, rng):
    """``_inner``: the batch-innermost layout (where the shared one applies; else the same as without)."""
    B, C, H, W, O, kh, kw, s, p, d = case
    plane = kind == "csr_plane"
    inner = kind.endswith("_inner")
    kind = "csr" if plane else kind.replace("_inner", "")
    w, fmt, row = _weight(kind, O, C * kh * kw, rng, 0.5)
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    w4 = w.reshape(O, C, kh, kw)
    ref = conv.conv2d_ref(x, w4, bias, s, p, d, 1, act=table.ACT_RELU)
    res = rng.standard_normal(ref.shape).astype(np.float32)
    ref_res = conv.conv2d_ref(x, w4, None, s, p, d, 1, act=table.ACT_SILU, residual=res)
    packed = row.prepare(fmt)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        y = np.full(ref.shape, np.nan, np.float32)
        conv.sparse_conv_batch(kind[:3], packed, x, y, kh, kw, s, p, d, bias=bias, act=table.ACT_RELU, plane=plane,
                               inner=inner)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        # preallocated work buffers filled with garbage first: the pack must rewrite every pad position
        geo = conv.batch_geometry(B, C, H, W, kh, kw, *s, *p, *d, conv.batch_tile(kind[:3]), inner)
        work = (np.full(geo[6], np.nan, np.float32), np.full((O, geo[5]), np.nan, np.float32))
        y = np.full(ref.shape, np.nan, np.float32)
        conv.sparse_conv_batch(kind[:3], packed, x, y, kh, kw, s, p, d, act=table.ACT_SILU, residual=res, work=work,
                               plane=plane, inner=inner)
        np.testing.assert_allclose(y, ref_res, rtol=1e-4, atol=1e-4)
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("plane", [False, True])
def test_sparse_conv_batch_all_zero_and_dense(density, plane, rng):
    B, C, H, W, O = 2, 7, 6, 6, 5
    w, fmt, row = _weight("csr", O, C * 9, rng, density)
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    ref = conv.conv2d_ref(x, w.reshape(O, C, 3, 3), bias, (1, 1), (1, 1))
    y = np.full(ref.shape, np.nan, np.float32)
    conv.sparse_conv_batch("csr", row.prepare(fmt), x, y, 3, 3, (1, 1), (1, 1), (1, 1), bias=bias, plane=plane)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES[:6])
@pytest.mark.parametrize("inner", [False, True])
def test_batch_pack_matches_layout(case, inner, rng):
    """Every position of the packed buffer: data where the layout puts an input pixel, 0 elsewhere."""
    B, C, H, W, O, kh, kw, s, p, d = case
    x = rng.standard_normal((B, C, H, W)).astype(np.float32) + 10.0
    geo = conv.batch_geometry(B, C, H, W, kh, kw, *s, *p, *d, inner=inner)
    shared, P, RS, IS, L, Npad, size = geo[:7]
    xf = np.full(size, np.nan, np.float32)
    conv.batch_pack(x, geo, kh, kw, s, p, d, xf)
    want = np.zeros(size, np.float32)
    pidx = conv.phase_map(kh, kw, *s, *d)[0]
    assert P == (1 if shared in (1, 2) else int((pidx >= 0).sum()))
    assert (shared >= 2) == inner
    for b in range(B):
        for c in range(C):
            for iy in range(H):
                for ix in range(W):
                    if shared == 2:
                        pos = c * L + ((p[0] + iy) * (W + p[1]) + p[1] + ix) * B + b
                    elif shared == 3:
                        Y, X = iy + p[0], ix + p[1]
                        pl = pidx[(Y % s[0]) * s[1] + X % s[1]]
                        if pl < 0:
                            continue
                        pos = (c * P + pl) * L + ((Y // s[0]) * (RS // B) + X // s[1]) * B + b
                    elif shared:
                        pos = c * L + (b * (H + p[0]) + p[0] + iy) * RS + p[1] + ix
                    else:
                        Y, X = iy + p[0], ix + p[1]
                        pl = pidx[(Y % s[0]) * s[1] + X % s[1]]
                        if pl < 0:
                            continue
                        pos = (c * P + pl) * L + b * IS + (Y // s[0]) * RS + X // s[1]
                    want[pos] = x[b, c, iy, ix]
    np.testing.assert_array_equal(xf, want)


@pytest.mark.parametrize("bcols", [1, 7, 27, 10_000])
@pytest.mark.parametrize("ngroups,cgroups,nc", [(1, 1, 16), (3, 1, 48), (2, 1, 10_000), (1, 3, 16), (2, 2, 32)])
def test_kpanel_any_panel_width(bcols, ngroups, cgroups, nc, rng):
    """csr_conv_kpanel vs a dense numpy product on the packed input, for panels of 1 column (many
    empty), uneven widths, one panel; row groups not dividing O; chunks below / above a tile."""
    B, C, H, W, O = 2, 6, 5, 7, 11
    w, fmt, row = _weight("csr", O, C * 9, rng, 0.4)
    w[3] = 0  # an empty row
    packed = row.prepare(CSR.from_dense(w))
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    geo = conv.batch_geometry(B, C, H, W, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"))
    shared, P, RS, IS, L, Npad, size = geo[:7]
    xf = np.empty(size, np.float32)
    conv.batch_pack(x, geo, 3, 3, (1, 1), (1, 1), (1, 1), xf)
    roff = conv.batch_roff(C, 3, 3, 1, 1, 1, 1, shared, RS, L)
    cols = np.stack([xf[r:r + Npad] for r in roff]).astype(np.float64)
    ref = w.astype(np.float64) @ cols
    sp = conv.kpanel_splits(packed[0], packed[1], bcols, C * 9)
    assert sp.shape == (O, -(-C * 9 // bcols) + 1)
    yw = np.full((O, Npad), np.nan, np.float32)
    conv.csr_conv_kpanel(sp, roff[packed[1]].astype(np.int32), packed[2], xf, yw, nc, ngroups, cgroups)
    np.testing.assert_allclose(yw, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inner", [False, True])
def test_sparse_conv_batch_empty_batch(inner, rng):
    """Batch 0 (Npad = 0): no division by zero in the panel plan, nothing written."""
    w, fmt, row = _weight("csr", 5, 4 * 9, rng, 0.5)
    x = np.zeros((0, 4, 4, 4), np.float32)
    y = np.zeros((0, 5, 4, 4), np.float32)
    conv.sparse_conv_batch("csr", row.prepare(fmt), x, y, 3, 3, (1, 1), (1, 1), (1, 1), inner=inner)
    assert y.shape == (0, 5, 4, 4)


@pytest.mark.parametrize("act,with_res,with_mask", [(1, True, True), (0, False, True), (1, True, False)])
@pytest.mark.parametrize("ngroups,cgroups,nc", [(1, 1, 16), (3, 1, 48), (1, 3, 16)])
def test_kpanel_ep_epilogue_mask_tail(act, with_res, with_mask, ngroups, cgroups, nc, rng):
    """csr_conv_kpanel_ep: fused bias / residual / relu, masked positions 0, yw[:, n:] zeroed (a wider
    [O, Ly] destination, as a view of the next layer's packed input)."""
    from sparsedge.kernels.epilogue import EMPTY1, EMPTY2

    B, C, H, W, O = 2, 6, 5, 7, 11
    w, fmt, row = _weight("csr", O, C * 9, rng, 0.4)
    w[3] = 0  # an empty row
    packed = row.prepare(CSR.from_dense(w))
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    geo = conv.batch_geometry(B, C, H, W, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"))
    shared, P, RS, IS, L, Npad, size = geo[:7]
    xf = np.empty(size, np.float32)
    conv.batch_pack(x, geo, 3, 3, (1, 1), (1, 1), (1, 1), xf)
    roff = conv.batch_roff(C, 3, 3, 1, 1, 1, 1, shared, RS, L)
    cols = np.stack([xf[r:r + Npad] for r in roff]).astype(np.float64)
    bias = rng.standard_normal(O).astype(np.float32)
    res = rng.standard_normal((O, Npad + 5)).astype(np.float32) if with_res else EMPTY2
    mask = (rng.random(Npad) < 0.7).astype(np.float32) if with_mask else np.zeros(0, np.float32)
    ref = w.astype(np.float64) @ cols + bias[:, None]
    if with_res:
        ref += res[:, :Npad]
    if act == 1:
        ref = np.maximum(ref, 0)
    if with_mask:
        ref *= mask[None, :]
    sp = conv.kpanel_splits(packed[0], packed[1], 27, C * 9)
    rb = conv.row_bounds(packed[0], ngroups)
    assert rb[0] == 0 and rb[-1] == O and np.all(np.diff(rb) >= 0)
    yw = np.full((O, Npad + 21), np.nan, np.float32)
    conv.csr_conv_kpanel_ep(sp, roff[packed[1]].astype(np.int32), packed[2], xf, yw, EMPTY2, Npad, nc, rb,
                            cgroups, bias, res, mask, act, 0, 0.0, 0.0, conv.EMPTYI2, conv.EMPTYI, conv.EMPTYI, EMPTY1, 0)
    np.testing.assert_allclose(yw[:, :Npad], ref, rtol=1e-4, atol=1e-4)
    assert not yw[:, Npad:].any()
    # the same weights split as 7 rows into yw (residual, mask) + 4 rows into yw2 (bias + act2 = relu only)
    O1 = 7
    yw = np.full((O1, Npad + 21), np.nan, np.float32)
    yw2 = np.full((O - O1, Npad), np.nan, np.float32)
    conv.csr_conv_kpanel_ep(sp, roff[packed[1]].astype(np.int32), packed[2], xf, yw, yw2, Npad, nc, rb,
                            cgroups, bias, res[:O1] if with_res else res, mask, act, 1, 0.0, 0.0, conv.EMPTYI2,
                            conv.EMPTYI, conv.EMPTYI, EMPTY1, 0)
    np.testing.assert_allclose(yw[:, :Npad], ref[:O1], rtol=1e-4, atol=1e-4)
    assert not yw[:, Npad:].any()
    ref2 = np.maximum(w[O1:].astype(np.float64) @ cols + bias[O1:, None], 0)
    np.testing.assert_allclose(yw2, ref2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", [(3, 3, 2, 2, 1, 1, 1, 1), (2, 2, 2, 2, 0, 0, 1, 1), (3, 2, 1, 2, 1, 0, 2, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_plane_pool_packed(pool, threads, rng):
    """csr_conv_plane_pool: conv (3x3 pad 1) + bias + relu + max pool per plane, written into a packed
    shared-padding layout (pad 1 around each pooled image, tails zero) vs conv2d_ref + maxpool2d_ref."""
    kh, kw, sh, sw, ph, pw, dh, dw = pool
    B, C, H, W, O = 2, 3, 9, 11, 7
    w, fmt, row = _weight("csr", O, C * 9, rng, 0.4)
    packed = row.prepare(CSR.from_dense(w))
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    geo = conv.batch_geometry(B, C, H, W, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"))
    shared, P, RS, IS, L, Npad, size, Ho, Wo = geo
    xf = np.empty(size, np.float32)
    conv.batch_pack(x, geo, 3, 3, (1, 1), (1, 1), (1, 1), xf)
    roff = conv.batch_roff(C, 3, 3, 1, 1, 1, 1, shared, RS, L)
    koff = roff[packed[1]].astype(np.int32)
    c = conv.conv2d_ref(x, w.reshape(O, C, 3, 3), bias, padding=(1, 1), act=1)
    q = conv.maxpool2d_ref(c, kh, kw, sh, sw, ph, pw, dh, dw)
    Hq, Wq = q.shape[2:]
    # the packed layout of a following 3x3 pad-1 conv on the pooled maps
    qgeo = conv.batch_geometry(B, O, Hq, Wq, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"))
    _, _, QRS, QIS, QL, _, qsize = qgeo[:7]
    want = np.zeros(qsize, np.float32)
    conv.batch_pack(q, qgeo, 3, 3, (1, 1), (1, 1), (1, 1), want)
    out = np.full(qsize, np.nan, np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        conv.csr_conv_plane_pool(packed[0], koff, packed[2], xf, IS, RS, B, Ho, Wo, bias, 1, 0.0, 0.0,
                                 kh, kw, sh, sw, ph, pw, dh, dw, Hq, Wq, out, QL, QRS + 1, QIS, QRS)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner_src,inner_dst,k,s,p", [(False, False, 3, 2, 1), (False, True, 3, 2, 1),
                                                       (True, True, 3, 2, 1), (False, False, 1, 2, 0),
                                                       (True, False, 3, 1, 1)])
def test_kpanel_ep_scatter(inner_src, inner_dst, k, s, p, rng):
    """csr_conv_kpanel_ep with scatter runs (``scatter_runs``): the conv output lands in the packed layout
    of a following conv (phase planes of a strided one, batch innermost or not) exactly as ``batch_pack``
    puts the NCHW output there, padding zero, on a buffer full of garbage first."""
    from sparsedge.kernels.epilogue import EMPTY1, EMPTY2

    B, C, H, W, O = 3, 6, 8, 7, 10
    w, fmt, row = _weight("csr", O, C * 9, rng, 0.4)
    packed = row.prepare(CSR.from_dense(w))
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    geo = conv.batch_geometry(B, C, H, W, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"), inner_src)
    shared, P, RS, IS, L, Npad, size, Ho, Wo = geo
    cs = conv.geo_cs(geo, B)
    xf = np.empty(size, np.float32)
    conv.batch_pack(x, geo, 3, 3, (1, 1), (1, 1), (1, 1), xf)
    roff = conv.batch_roff(C, 3, 3, 1, 1, 1, 1, shared, RS, L, cs)
    y = conv.conv2d_ref(x, w.reshape(O, C, 3, 3), bias, padding=(1, 1), act=1)
    dgeo = conv.batch_geometry(B, O, Ho, Wo, k, k, s, s, p, p, 1, 1, conv.batch_tile("csr"), inner_dst)
    want = np.full(dgeo[6], np.nan, np.float32)
    conv.batch_pack(y, dgeo, k, k, (s, s), (p, p), (1, 1), want)
    sp = conv.kpanel_splits(packed[0], packed[1], 27, C * 9)
    for nc, ng, cg in ((16, 2, 1), (48, 1, 2), (10_000, 2, 1)):  # runs split at chunk boundaries
        runs, rptr, zmap, dstride = conv.scatter_runs(B, Ho, Wo, IS, RS, cs, Npad, nc, dgeo, k, k, s, s, p, p, 1, 1)
        assert rptr.shape == (-(-Npad // nc) + 1,) and rptr[-1] == len(runs)
        out = np.full(dgeo[6], np.nan, np.float32)
        yw = np.full((O, Npad), np.nan, np.float32)
        conv.csr_conv_kpanel_ep(sp, roff[packed[1]].astype(np.int32), packed[2], xf, yw, EMPTY2, Npad, nc,
                                conv.row_bounds(packed[0], ng), cg, bias, EMPTY2, EMPTY1, 1, 0, 0.0, 0.0, runs, rptr,
                                zmap, out, dstride)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
