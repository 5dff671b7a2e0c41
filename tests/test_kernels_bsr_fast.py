"""BSR float32 GEMM rows on the work splits that small shapes never reach.

``bsr_spmm_r1`` (4x1 / 8x1 / 16x1) splits N into chunks only when X is larger than
``X_CHUNK_FLOATS`` and prefetches X only when X is larger than ``L2_FLOATS``; the generic
``bsr_spmm`` cuts N into several L2-sized chunks when ``in`` is large. These cases check those
paths (with the vector / scalar column tails, edge block rows, bias + residual + activation,
empty block rows) against the numpy reference at 1 and 2 threads.
"""
import numba
import numpy as np
import pytest

from sparsedge.formats.bsr import BSR
from sparsedge.kernels import bsr, table

ROWS = [r for r in bsr.KERNELS if r.op == "gemm"]


def _weight(rng, block, out, inn, density=0.15):
    r, c = block
    keep = rng.random((-(-out // r), -(-inn // c))) < density
    keep[1::3] = False  # empty block rows
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:out, :inn]
    w = rng.standard_normal((out, inn)).astype(np.float32) * mask
    return w, BSR.from_dense(w, block=block)


# (out, in, N): X above L2_FLOATS (prefetch), X above X_CHUNK_FLOATS (N chunks), tails of
# 7 columns (scalar) and 2 vectors + 7 columns, out not a multiple of the block rows
CASES = [(37, 300, 1007), (45, 700, 1607), (21, 1100, 1000)]


def test_cases_reach_the_split_paths():
    """The shapes above really exceed the thresholds the kernel switches on."""
    assert any(i * n > bsr.L2_FLOATS for _, i, n in CASES)
    assert any(i * n > bsr.X_CHUNK_FLOATS for _, i, n in CASES)
    assert any(n % bsr.VW for _, _, n in CASES)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_n_paths(row, threads, rng):
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for out, inn, n in CASES:
            w, fmt = _weight(rng, row.block, out, inn)
            x = rng.standard_normal((inn, n)).astype(np.float32)
            bias = rng.standard_normal(out).astype(np.float32)
            res = rng.standard_normal((out, n)).astype(np.float32)
            packed = row.prepare(fmt)
            y = np.full((out, n), np.nan, np.float32)
            # the inline epilogue cases (bias / residual / relu) and one that calls epilogue_tile
            for b, act, rs in [(bias, table.ACT_RELU, res), (bias, 0, None), (None, 0, res),
                               (bias, table.ACT_GELU, res)]:
                y[:] = np.nan
                row.run(packed, x, y, b, act, 0.0, 0.0, rs)
                ref = row.reference(fmt, x, b, act, 0.0, 0.0, rs)
                np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))
            y[:] = np.nan
            row.run(packed, x, y, None, 0, 0.0, 0.0, None)
            np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_more_threads_than_block_rows(rng):
    """Fewer block rows than threads, and the thread count passed explicitly above the pool size."""
    w, fmt = _weight(rng, (16, 1), 20, 64, density=0.5)
    p = bsr._prepare(fmt)
    x = rng.standard_normal((64, 100)).astype(np.float32)
    for nt in (1, 2, 7):
        y = np.full((20, 100), np.nan, np.float32)
        bsr.bsr_spmm_r1(p[0], p[1], p[2], 16, x, y, bsr.none1(None), bsr.none2(None), 0, 0.0, 0.0, nt)
        np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-3)


def test_non_contiguous_arrays(rng):
    """The r x 1 rows view X / Y / residual flat: strided inputs and outputs still give the right result."""
    row = next(r for r in ROWS if r.block == (8, 1))
    w, fmt = _weight(rng, (8, 1), 30, 40, density=0.4)
    xb = rng.standard_normal((40, 2 * 70)).astype(np.float32)
    rb = rng.standard_normal((30, 2 * 70)).astype(np.float32)
    x, res = xb[:, ::2], rb[:, ::2]
    yb = np.full((30, 2 * 70), np.nan, np.float32)
    y = yb[:, ::2]
    row.run(row.prepare(fmt), x, y, None, 0, 0.0, 0.0, res)
    np.testing.assert_allclose(y, w.astype(np.float64) @ x + res, rtol=1e-4, atol=1e-3)
    assert np.isnan(yb[:, 1::2]).all()
