"""kernels.nn.attention_heads (transposed orientation: vectors over queries) vs attention_ref on the
edges of its tiling: query blocks of 2 vectors (Sq below / above / not a multiple, partial block in a
feature-major output), key tiles of 8 (padded keys must not enter the max or the sums), head-dim
tiles of 8 (D not a multiple), more (b, h) tasks than the 24 runs, every input / output layout, and
the special rows (NaN / +inf scores, all keys masked, huge score spreads: flushed, no denormals)."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from sparsedge.kernels.nn import attention_heads, attention_ref

F32 = np.float32


def _run(q, k, v, mask, scale, H, fm_in, fm_out):
    """attention_heads on q [B, Sq, H*D], k, v [B, Sk, H*D] passed torch-layout (separate arrays)
    or feature-major (one [3*H*D, B*S] q|k|v array, needs Sq == Sk); result as [B, Sq, H*D]."""
    B, Sq, HD = q.shape
    Sk = k.shape[1]
    D = HD // H
    m2 = np.zeros((0, 0), F32) if mask is None else np.ascontiguousarray(mask, F32)
    n = B * Sq
    out = np.full(n * HD, np.nan, F32)
    if fm_in:
        g = np.ascontiguousarray(np.concatenate([a.reshape(n, HD) for a in (q, k, v)], axis=1).T).reshape(-1)
        args = (g, g[HD * n:], g[2 * HD * n:], 1, 1, n)
    else:
        args = (q.reshape(-1), k.reshape(-1), v.reshape(-1), HD, HD, 1)
    attention_heads(args[0], args[1], args[2], m2, F32(scale), out, B, Sq, Sk, H, D, args[3], args[4],
                    args[5], n if fm_out else 1)
    return out.reshape(HD, n).T.reshape(B, Sq, HD) if fm_out else out.reshape(B, Sq, HD)


def _layouts(Sq, Sk):
    return [(fi, fo) for fi in (False, True) for fo in (False, True) if not (fi and Sq != Sk)]


@pytest.fixture(params=[1, 2])
def threads(request):
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    old = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(old)


@pytest.mark.parametrize("B,Sq,Sk,H,D", [
    (1, 2, 2, 1, 3),        # everything below a tile
    (2, 64, 64, 2, 11),     # full query blocks (direct feature-major stores), D not a multiple of 8
    (1, 33, 33, 2, 8),      # one query past a block: partial block
    (5, 16, 16, 7, 16),     # 35 tasks: more than the 24 runs, uneven
    (1, 40, 9, 2, 20),      # Sk one past a key tile, Sq != Sk
])
def test_attention_tiles_and_layouts(B, Sq, Sk, H, D, threads, rng):
    q = rng.standard_normal((B, Sq, H * D)).astype(F32)
    k = rng.standard_normal((B, Sk, H * D)).astype(F32)
    v = rng.standard_normal((B, Sk, H * D)).astype(F32)
    mask = np.zeros((B, Sk), F32)
    mask[0, -1] = -np.inf                       # the last (padding-adjacent) key masked
    mask[-1, : max(1, Sk // 2)] = np.finfo(F32).min
    for mk in (None, mask, mask[:1]):
        ref = attention_ref(q, k, v, None if mk is None else mk[:, None, None, :], 0.35, H)
        for fi, fo in _layouts(Sq, Sk):
            got = _run(q, k, v, mk, 0.35, H, fi, fo)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6, err_msg=f"fm_in={fi} fm_out={fo}")


def test_attention_special_scores(rng):
    B, S, H, D = 3, 20, 2, 8
    q = rng.standard_normal((B, S, H * D)).astype(F32)
    k = rng.standard_normal((B, S, H * D)).astype(F32)
    v = rng.standard_normal((B, S, H * D)).astype(F32)
    k[0, 5, :D] = np.nan        # batch 0, head 0: one NaN key -> every row NaN (torch)
    q[1, 3, D:] = np.inf        # batch 1, head 1: +inf / NaN scores in query row 3 only
    mask = np.zeros((B, S), F32)
    mask[2, :] = -np.inf        # batch 2: all keys masked -> NaN rows
    ref = attention_ref(q, k, v, mask[:, None, None, :], 1.0, H)
    for fi, fo in _layouts(S, S):
        got = _run(q, k, v, mask, 1.0, H, fi, fo)
        assert np.isnan(got[0, :, :D]).all() and np.isfinite(got[0, :, D:]).all()
        assert np.isnan(got[1, 3, D:]).all()
        assert np.isnan(got[2]).all()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)   # NaNs at the same places


def test_attention_huge_spread_flushes(rng):
    """Scores far apart: probabilities below FLT_MIN are 0 (no denormals), rows stay exact."""
    B, S, H, D = 1, 32, 1, 16
    q = (rng.standard_normal((B, S, H * D)) * 8).astype(F32)
    k = (rng.standard_normal((B, S, H * D)) * 8).astype(F32)
    v = rng.standard_normal((B, S, H * D)).astype(F32)
    ref = attention_ref(q, k, v, None, 1.0, H)
    for fi, fo in _layouts(S, S):
        got = _run(q, k, v, None, 1.0, H, fi, fo)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
        tiny = (got != 0) & (np.abs(got) < np.finfo(F32).tiny)
        assert not tiny.any()


def test_attention_no_keys_gives_zeros():
    """Sk = 0 (torch: softmax over an empty axis, times an empty V): zeros, in both output layouts."""
    B, Sq, H, D = 2, 3, 2, 8
    q = np.ones((B, Sq, H * D), F32)
    e = np.zeros((B, 0, H * D), F32)
    for fm_out in (False, True):
        got = _run(q, e, e, np.zeros((B, 0), F32), 1.0, H, False, fm_out)
        assert (got == 0).all()
