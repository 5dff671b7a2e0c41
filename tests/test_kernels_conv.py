"""Conv / pool leaves (kernels/conv.py) vs numpy references, and vs torch.nn.functional when installed."""
import numba
import numpy as np
import pytest
from conftest import has_torch

from sparsedge.formats.bsr import BSR
from sparsedge.formats.csr import CSR
from sparsedge.formats.dense import Dense
from sparsedge.kernels import conv, table

CONV_CASES = [  # (C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (3, 9, 7, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (4, 10, 11, 6, 3, 3, (2, 2), (1, 1), (1, 1), 2),
    (2, 8, 8, 4, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (3, 12, 9, 4, 5, 3, (2, 1), (2, 0), (1, 2), 1),
    (2, 5, 6, 3, 3, 3, (3, 2), (2, 2), (2, 1), 1),
    (1, 3, 3, 2, 3, 3, (1, 1), (0, 0), (1, 1), 1),
]


def _torch():
    import torch
    return torch


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col(case, rng):
    C, H, W, O, kh, kw, s, p, d, g = case
    x = rng.standard_normal((C, H, W)).astype(np.float32)
    ref = conv.im2col_ref(x, kh, kw, *s, *p, *d)
    cols = np.full((ref.shape[0], ref.shape[1] + 5), np.nan, np.float32)
    conv.im2col(x, kh, kw, *s, *p, *d, cols, 3)
    np.testing.assert_array_equal(cols[:, 3:3 + ref.shape[1]], ref)
    assert np.isnan(cols[:, :3]).all() and np.isnan(cols[:, 3 + ref.shape[1]:]).all()


def _conv_via_gemm(row, x, w4, bias, stride, padding, dilation, groups, act=0, residual=None, make=None):
    """What the runtime does: per image and group, im2col then the GEMM row with fused epilogue."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w4.shape
    Og = O // groups
    Ho = conv.conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv.conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    y = np.full((B, O, Ho, Wo), np.nan, np.float32)
    for gi in range(groups):
        wg = w4[gi * Og:(gi + 1) * Og].reshape(Og, -1)
        packed = row.prepare(make(wg))
        for b in range(B):
            cols = np.empty((Cg * kh * kw, Ho * Wo), np.float32)
            conv.im2col(x[b, gi * Cg:(gi + 1) * Cg], kh, kw, *stride, *padding, *dilation, cols, 0)
            r = None if residual is None else residual[b, gi * Og:(gi + 1) * Og].reshape(Og, -1)
            bb = None if bias is None else bias[gi * Og:(gi + 1) * Og]
            row.run(packed, cols, y[b, gi * Og:(gi + 1) * Og].reshape(Og, -1), bb, act, 0.0, 0.0, r)
    return y


GEMMS = [("dense_f32_blas", Dense.from_dense), ("csr_f32_spmm", CSR.from_dense),
         ("bsr4x1_f32_spmm", lambda w: BSR.from_dense(w, block=(4, 1)))]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("gemm", GEMMS, ids=[g[0] for g in GEMMS])
def test_conv_via_im2col_gemm(case, gemm, rng):
    C, H, W, O, kh, kw, s, p, d, g = case
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    w4 = (rng.standard_normal((O, C // g, kh, kw)) * (rng.random((O, C // g, kh, kw)) < 0.6)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    row = table.by_name(gemm[0])
    ref = conv.conv2d_ref(x, w4, bias, s, p, d, g, act=table.ACT_RELU)
    res = rng.standard_normal(ref.shape).astype(np.float32)
    ref_res = conv.conv2d_ref(x, w4, bias, s, p, d, g, act=table.ACT_RELU, residual=res)
    y = _conv_via_gemm(row, x, w4, bias, s, p, d, g, act=table.ACT_RELU, make=gemm[1])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    y = _conv_via_gemm(row, x, w4, bias, s, p, d, g, act=table.ACT_RELU, residual=res, make=gemm[1])
    np.testing.assert_allclose(y, ref_res, rtol=1e-4, atol=1e-4)
    if has_torch():
        torch = _torch()
        t = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w4), torch.from_numpy(bias),
                                       stride=s, padding=p, dilation=d, groups=g).relu().numpy()
        np.testing.assert_allclose(ref, t, rtol=1e-4, atol=1e-4)


DW_CASES = [  # (C, mult, H, W, k, stride, padding, dilation)
    (4, 1, 9, 8, 3, (1, 1), (1, 1), (1, 1)),
    (3, 2, 11, 7, 3, (2, 2), (1, 1), (1, 1)),
    (5, 1, 6, 13, 5, (1, 2), (2, 2), (1, 1)),
    (2, 1, 10, 10, 3, (1, 1), (2, 2), (2, 2)),
    (3, 1, 4, 4, 3, (1, 1), (0, 0), (1, 1)),
    (64, 1, 17, 19, 3, (2, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_dwconv(case, threads, rng):
    C, mult, H, W, k, s, p, d = case
    O = C * mult
    row = table.by_name("dwconv_f32_direct")
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    w4 = rng.standard_normal((O, 1, k, k)).astype(np.float32)
    fmt = Dense.from_dense(w4, as_2d=True)
    bias = rng.standard_normal(O).astype(np.float32)
    Ho, Wo = conv.conv_out_size(H, k, s[0], p[0], d[0]), conv.conv_out_size(W, k, s[1], p[1], d[1])
    res = rng.standard_normal((2, O, Ho, Wo)).astype(np.float32)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for kw_ in [dict(), dict(bias=bias, act=table.ACT_RELU6, residual=res), dict(act=table.ACT_HARDSWISH)]:
            y = np.full((2, O, Ho, Wo), np.nan, np.float32)
            row.run(row.prepare(fmt), x, y, kw_.get("bias"), kw_.get("act", 0), 0.0, 0.0, kw_.get("residual"),
                    stride=s, padding=p, dilation=d)
            ref = row.reference(fmt, x, kw_.get("bias"), kw_.get("act", 0), 0.0, 0.0, kw_.get("residual"),
                                stride=s, padding=p, dilation=d)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    if has_torch():
        torch = _torch()
        t = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w4), torch.from_numpy(bias),
                                       stride=s, padding=p, dilation=d, groups=C).numpy()
        ref = row.reference(fmt, x, bias, 0, 0.0, 0.0, None, stride=s, padding=p, dilation=d)
        np.testing.assert_allclose(ref, t, rtol=1e-4, atol=1e-4)


POOL_CASES = [  # (H, W, k, stride, padding, dilation, ceil_mode)
    (8, 8, (2, 2), (2, 2), (0, 0), (1, 1), False),
    (7, 9, (3, 3), (2, 2), (1, 1), (1, 1), False),
    (7, 9, (3, 3), (2, 2), (1, 1), (1, 1), True),
    (10, 6, (3, 2), (3, 2), (1, 0), (1, 1), True),
    (11, 11, (3, 3), (2, 2), (0, 0), (2, 1), False),
    (5, 5, (5, 5), (1, 1), (2, 2), (1, 1), False),
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_pools(case, rng):
    H, W, k, s, p, d, ceil = case
    x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
    Ho, Wo = conv.pool_out_size(H, k[0], s[0], p[0], d[0], ceil), conv.pool_out_size(W, k[1], s[1], p[1], d[1], ceil)
    y = np.full((2, 3, Ho, Wo), np.nan, np.float32)
    conv.maxpool2d(x, y, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1])
    ref = conv.maxpool2d_ref(x, *k, *s, *p, *d, ceil_mode=ceil)
    np.testing.assert_array_equal(y, ref)
    if has_torch():
        torch = _torch()
        t = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, d, ceil_mode=ceil).numpy()
        np.testing.assert_array_equal(ref, t)
    if d != (1, 1):
        return
    for cip in (True, False):
        for div in (0, 7):
            y = np.full((2, 3, Ho, Wo), np.nan, np.float32)
            conv.avgpool2d(x, y, k[0], k[1], s[0], s[1], p[0], p[1], cip, div)
            ref = conv.avgpool2d_ref(x, *k, *s, *p, ceil_mode=ceil, count_include_pad=cip, divisor=div)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
            if has_torch():
                torch = _torch()
                t = torch.nn.functional.avg_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil,
                                                   count_include_pad=cip, divisor_override=div or None).numpy()
                np.testing.assert_allclose(ref, t, rtol=1e-5, atol=1e-6)


def test_maxpool_nan_propagates():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    y = np.empty((1, 1, 2, 2), np.float32)
    conv.maxpool2d(x, y, 2, 2, 2, 2, 0, 0, 1, 1)
    assert np.isnan(y[0, 0, 0, 0]) and (y.ravel()[1:] == 0).all()


def test_global_avgpool(rng):
    x = rng.standard_normal((3, 5, 49)).astype(np.float32)
    y = np.empty((3, 5), np.float32)
    conv.global_avgpool(x, y)
    np.testing.assert_allclose(y, x.mean(axis=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k,s,p,d,ceil", [(7, 3, 2, 1, 1, True), (8, 2, 2, 0, 1, True), (6, 3, 3, 1, 1, True),
                                            (112, 3, 2, 1, 1, False), (5, 5, 1, 2, 1, True)])
def test_pool_out_size_known(n, k, s, p, d, ceil):
    expect = {(7, 3, 2, 1, 1, True): 4, (8, 2, 2, 0, 1, True): 4, (6, 3, 3, 1, 1, True): 3,
              (112, 3, 2, 1, 1, False): 56, (5, 5, 1, 2, 1, True): 5}[(n, k, s, p, d, ceil)]
    assert conv.pool_out_size(n, k, s, p, d, ceil) == expect


S1_CASES = [  # (C, H, W, O, kh, kw, padding, dilation)
    (3, 9, 7, 5, 3, 3, (1, 1), (1, 1)),
    (4, 12, 11, 16, 3, 3, (0, 0), (1, 1)),
    (2, 8, 8, 9, 1, 1, (0, 0), (1, 1)),
    (3, 12, 9, 8, 5, 3, (2, 0), (1, 2)),
    (16, 10, 13, 24, 3, 3, (2, 2), (2, 2)),
]


@pytest.mark.parametrize("case", S1_CASES)
@pytest.mark.parametrize("kind", ["csr", "bsr8x1", "bsr16x1"])
def test_sparse_conv_s1(case, kind, rng):
    C, H, W, O, kh, kw, p, d = case
    w4 = rng.standard_normal((O, C, kh, kw)).astype(np.float32)
    if kind == "csr":
        w4 *= rng.random(w4.shape) < 0.5
        fmt, row = CSR.from_dense(w4.reshape(O, -1)), table.by_name("csr_f32_spmm")
    else:
        r = int(kind[3:-2])
        keep = np.repeat(rng.random((-(-O // r), C * kh * kw)) < 0.5, r, 0)[:O]
        w4 = (w4.reshape(O, -1) * keep).reshape(w4.shape)
        fmt, row = BSR.from_dense(w4.reshape(O, -1), block=(r, 1)), table.by_name(f"bsr{r}x1_f32_spmm")
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    ref = conv.conv2d_ref(x, w4, bias, (1, 1), p, d, 1, act=table.ACT_SILU)
    res = rng.standard_normal(ref.shape).astype(np.float32)
    ref_res = conv.conv2d_ref(x, w4, bias, (1, 1), p, d, 1, act=table.ACT_SILU, residual=res)
    y = np.full(ref.shape[1:], np.nan, np.float32)
    packed = row.prepare(fmt)
    conv.sparse_conv_s1(kind[:3], packed, x[0], y, kh, kw, p, d, bias=bias, act=table.ACT_SILU)
    np.testing.assert_allclose(y, ref[0], rtol=1e-4, atol=1e-4)
    conv.sparse_conv_s1(kind[:3], packed, x[0], y, kh, kw, p, d, bias=bias, act=table.ACT_SILU, residual=res[0])
    np.testing.assert_allclose(y, ref_res[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [(3, 1, 11, 9, (2, 2), (1, 1), (1, 1)), (2, 2, 12, 13, (1, 2), (0, 2), (2, 1)),
                                  (4, 1, 8, 8, (3, 2), (1, 0), (1, 2)), (2, 1, 5, 6, (2, 2), (0, 0), (1, 1))])
def test_dwconv_stride2_polyphase(case, rng):
    """The 3x3 horizontal-stride-2 path (parity split of the padded input) on odd/even sizes and paddings."""
    C, mult, H, W, s, p, d = case
    O = C * mult
    row = table.by_name("dwconv_f32_direct")
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    fmt = Dense.from_dense(rng.standard_normal((O, 1, 3, 3)).astype(np.float32), as_2d=True)
    Ho, Wo = conv.conv_out_size(H, 3, s[0], p[0], d[0]), conv.conv_out_size(W, 3, s[1], p[1], d[1])
    res = rng.standard_normal((1, O, Ho, Wo)).astype(np.float32)
    y = np.full((1, O, Ho, Wo), np.nan, np.float32)
    row.run(row.prepare(fmt), x, y, None, table.ACT_RELU, 0.0, 0.0, res, stride=s, padding=p, dilation=d)
    ref = row.reference(fmt, x, None, table.ACT_RELU, 0.0, 0.0, res, stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
