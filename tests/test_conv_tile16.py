"""csr_conv_kpanel / csr_conv_kpanel_ep on N chunks wide enough for the 16-vector register tile
(``_mkoffa16`` / ``_mkoffa_ep16``) plus the 8 / 4 / 2 / 1-vector remainders, several K panels,
the in-register epilogue (act none / relu, NaN kept by relu, masked positions exactly 0 even when NaN)
and the per-chunk fallback (relu6), vs a float64 numpy reference."""
import numba
import numpy as np
import pytest

from sparsedge.formats.csr import CSR
from sparsedge.kernels import conv, table
from sparsedge.kernels.epilogue import EMPTY1, EMPTY2
from sparsedge.kernels.simd import VW


def _spmm(w, cols):
    """W @ cols over W's non-zeros only (a NaN input reaches only the rows that have a weight on it)."""
    out = np.zeros((w.shape[0], cols.shape[1]))
    for i in range(w.shape[0]):
        nz = w[i] != 0
        out[i] = w[i, nz].astype(np.float64) @ cols[nz]
    return out


def _setup(rng, nan):
    B, C, H, W, O = 2, 5, 14, 14, 9
    w = rng.standard_normal((O, C * 9)).astype(np.float32)
    w *= rng.random(w.shape) < 0.4
    w[2] = 0  # an empty row
    packed = table.by_name("csr_f32_spmm").prepare(CSR.from_dense(w))
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    if nan:
        x[1, 3, 4, 5] = np.nan
    geo = conv.batch_geometry(B, C, H, W, 3, 3, 1, 1, 1, 1, 1, 1, conv.batch_tile("csr"))
    shared, P, RS, IS, L, Npad, size = geo[:7]
    assert Npad >= 16 * VW + 8 * VW
    xf = np.empty(size, np.float32)
    conv.batch_pack(x, geo, 3, 3, (1, 1), (1, 1), (1, 1), xf)
    roff = conv.batch_roff(C, 3, 3, 1, 1, 1, 1, shared, RS, L)
    cols = np.stack([xf[r:r + Npad] for r in roff]).astype(np.float64)
    sp = conv.kpanel_splits(packed[0], packed[1], 18, C * 9)  # 3 K panels
    assert sp.shape[1] - 1 == 3
    return w, packed, xf, roff[packed[1]].astype(np.int32), cols, sp, Npad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nc_vectors", [16 + 8 + 4 + 2 + 1, 16])
def test_kpanel_tile16_plain(threads, nc_vectors, rng):
    w, packed, xf, koff, cols, sp, Npad = _setup(rng, False)
    yw = np.full((w.shape[0], Npad), np.nan, np.float32)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    conv.csr_conv_kpanel(sp, koff, packed[2], xf, yw, nc_vectors * VW, 2, 1)
    np.testing.assert_allclose(yw, _spmm(w, cols), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,nan", [(1, True), (0, True), (2, False)])
@pytest.mark.parametrize("ngroups,cgroups", [(1, 1), (2, 1), (1, 2)])
def test_kpanel_ep_tile16(act, nan, ngroups, cgroups, rng):
    w, packed, xf, koff, cols, sp, Npad = _setup(rng, nan)
    O = w.shape[0]
    nc = (16 + 8 + 2 + 1) * VW
    bias = rng.standard_normal(O).astype(np.float32)
    res = rng.standard_normal((O, Npad + 3)).astype(np.float32)
    mask = (rng.random(Npad) < 0.7).astype(np.float32)
    ref = _spmm(w, cols) + bias[:, None] + res[:, :Npad]
    if act == 1:
        ref = np.where(ref < 0, 0, ref)  # NaN kept
    elif act == 2:
        ref = np.clip(ref, 0, 6)
    ref = np.where(mask[None, :] != 0, ref, 0)
    if nan:
        assert np.isnan(ref).any()
    rb = conv.row_bounds(packed[0], ngroups)
    yw = np.full((O, Npad + 21), np.nan, np.float32)
    conv.csr_conv_kpanel_ep(sp, koff, packed[2], xf, yw, EMPTY2, Npad, nc, rb, cgroups, bias, res, mask, act, 0,
                            0.0, 0.0, conv.EMPTYI2, conv.EMPTYI, conv.EMPTYI, EMPTY1, 0)
    np.testing.assert_allclose(yw[:, :Npad], ref, rtol=1e-4, atol=1e-4)
    assert not yw[:, Npad:].any()
    # 6 rows into yw (residual, mask, act) + 3 rows into yw2 (bias + act2 = relu, no mask)
    O1 = 6
    yw = np.full((O1, Npad), np.nan, np.float32)
    yw2 = np.full((O - O1, Npad), np.nan, np.float32)
    conv.csr_conv_kpanel_ep(sp, koff, packed[2], xf, yw, yw2, Npad, nc, rb, cgroups, bias, res[:O1], mask, act, 1,
                            0.0, 0.0, conv.EMPTYI2, conv.EMPTYI, conv.EMPTYI, EMPTY1, 0)
    np.testing.assert_allclose(yw, ref[:O1], rtol=1e-4, atol=1e-4)
    ref2 = _spmm(w[O1:], cols) + bias[O1:, None]
    np.testing.assert_allclose(yw2, np.where(ref2 < 0, 0, ref2), rtol=1e-4, atol=1e-4)
