"""kernels/nn.py vs its numpy references, at 1 and 2 threads, on edge shapes."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from sparsedge.kernels import nn
from sparsedge.kernels.table import ACTIVATIONS

SHAPES = [(1, 1), (1, 7), (3, 16), (4, 48), (5, 33), (64, 768)]


@pytest.fixture(params=[1, 2])
def threads(request):
    k = min(request.param, numba.config.NUMBA_NUM_THREADS)
    old = numba.get_num_threads()
    numba.set_num_threads(k)
    yield k
    numba.set_num_threads(old)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm(rng, threads, shape, affine):
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32) if affine else nn.EMPTY_F32
    b = rng.standard_normal(shape[1]).astype(np.float32) if affine else nn.EMPTY_F32
    out = np.full_like(x, np.nan)
    nn.layernorm_rows(x, w, b, 1e-5, out)
    ref = nn.layernorm_ref(x, w if affine else None, b if affine else None, 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_layernorm_constant_row(threads):
    x = np.full((2, 8), 3.0, np.float32)
    out = np.empty_like(x)
    nn.layernorm_rows(x, nn.EMPTY_F32, nn.EMPTY_F32, 1e-5, out)
    assert np.all(out == 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_with_mask(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 5
    mask = np.where(rng.random(shape) < 0.3, -1e4, 0).astype(np.float32)
    y = x + mask
    nn.softmax_inplace(y)
    np.testing.assert_allclose(y, nn.softmax_ref(x, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-5)


def test_softmax_all_masked_row_is_nan_like_torch():
    y = np.full((1, 4), -np.inf, np.float32)
    with np.errstate(invalid="ignore"):
        nn.softmax_inplace(y)
    assert np.isnan(y).all()


@pytest.mark.parametrize("n", [1, 5, 4096, 4097, 10000])
@pytest.mark.parametrize("approx", [False, True])
def test_gelu(rng, threads, n, approx):
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    out = np.empty_like(x)
    nn.gelu(x, out, approx)
    np.testing.assert_allclose(out, nn.gelu_ref(x, "tanh" if approx else "none"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_epilogues(rng, threads, act):
    code = ACTIVATIONS[act]
    lo, hi = (-0.5, 0.7) if act == "clamp" else (0.0, 0.0)
    y0 = (rng.standard_normal((5, 9)) * 4).astype(np.float32)
    bias_r = rng.standard_normal(9).astype(np.float32)
    bias_c = rng.standard_normal(5).astype(np.float32)
    y = y0.copy()
    nn.bias_act_rows(y, bias_r, code, lo, hi)
    np.testing.assert_allclose(y, nn.act_ref(y0 + bias_r, code, lo, hi), rtol=1e-5, atol=1e-6)
    y = y0.copy()
    nn.bias_act_cols(y, bias_c, code, lo, hi)
    np.testing.assert_allclose(y, nn.act_ref(y0 + bias_c[:, None], code, lo, hi), rtol=1e-5, atol=1e-6)
    y = y0.copy()
    nn.bias_act_rows(y, nn.EMPTY_F32, code, lo, hi)
    np.testing.assert_allclose(y, nn.act_ref(y0, code, lo, hi), rtol=1e-5, atol=1e-6)
    y = y0.reshape(-1).copy()
    nn.act_inplace(y, code, lo, hi)
    np.testing.assert_allclose(y, nn.act_ref(y0.reshape(-1), code, lo, hi), rtol=1e-5, atol=1e-6)


def test_embedding(rng, threads):
    table = rng.standard_normal((11, 6)).astype(np.float32)
    ro = table.copy()
    ro.setflags(write=False)  # mapped weights are read-only
    for tab in (table, ro, table.astype(np.float64), np.arange(66, dtype=np.int64).reshape(11, 6)):
        for ids in (np.array([0], np.int64), np.array([10, 0, 3, 3], np.int64), np.array([2, 5], np.int32),
                    rng.integers(0, 11, 300), np.zeros(0, np.int64)):
            out = np.full((ids.size, 6), -1, tab.dtype)
            nn.embedding_into(ids, tab, out)
            np.testing.assert_array_equal(out, nn.embedding_ref(ids, tab))


@pytest.mark.parametrize("B,S,H", [(1, 1, 1), (3, 5, 17), (8, 128, 384), (2, 0, 4)])
def test_masked_mean_rows(B, S, H):
    from sparsedge.kernels.nn import masked_mean_rows

    rng = np.random.default_rng(B * 100 + S)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    m = (rng.random((B, S)) < 0.7).astype(np.float32)
    if B > 1:
        m[1] = 0.0  # all masked: denominator clamps to 1e-9, sum is 0
    y = np.full((B, H), np.nan, np.float32)
    masked_mean_rows(x, m, y)
    ref = np.einsum("bsh,bs->bh", x.astype(np.float64), m) / np.maximum(m.sum(1, keepdims=True), 1e-9)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-6)
    if S:
        x[0, 0, 0] = np.nan
        m[0, 0] = 0.0
        masked_mean_rows(x, m, y)
        assert np.isnan(y[0, 0])  # masked NaN still propagates, as torch's (x * m).sum() does


@pytest.mark.parametrize("R,H,P1,P2", [(1, 1, 1, 0), (7, 5, 7, 1), (12, 33, 4, 3), (0, 4, 1, 1), (256, 48, 128, 1)])
def test_add_rows_bcast(rng, threads, R, H, P1, P2):
    """(x + a1[r % P1]) + a2[r % P2], bit for bit as numpy's two broadcasting adds."""
    x = rng.standard_normal((R, H)).astype(np.float32)
    a1 = rng.standard_normal((P1, H)).astype(np.float32)
    a2 = rng.standard_normal((P2, H)).astype(np.float32) if P2 else np.zeros((0, 0), np.float32)
    out = np.full((R, H), np.nan, np.float32)
    nn.add_rows_bcast(x, a1, a2, out)
    ref = x + a1[np.arange(R) % P1]
    if P2:
        ref = ref + a2[np.arange(R) % P2]
    assert np.array_equal(out, ref)
