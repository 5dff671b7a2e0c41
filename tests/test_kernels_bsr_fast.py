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


# ---------------------------------------------------------------------------------------
# the generic kernel ``bsr_spmm`` (every block that is not r x 1): 4-row x 4 / 2 / 1-vector tiles
# for rows in groups of 4, 1-row x 8 / 4 / 2 / 1-vector tiles for the others, scalar column tail

VW = bsr.VW
# N: below one vector (tail only), one vector, 2 vectors + tail, 4 vectors, every tile width of
# the 1-row path (8 + 4 + 2 + 1 vectors) plus a tail, several 8-vector tiles
GEN_NS = [1, VW - 3, VW, 2 * VW + 5, 4 * VW, 15 * VW + 7, 16 * VW]
# blocks of the table's generic rows plus shapes that mix 4-row groups with single rows (6x2,
# 5x3), 8-row and 16-row blocks with c > 1, and 2x2; out / in not multiples of the block
GEN_BLOCKS = [(1, 4), (1, 16), (4, 4), (2, 2), (6, 2), (5, 3), (8, 4), (16, 16)]


def _gen_run(p, x, y, bias, res, act, nt, lo=0.0, hi=0.0):
    r, c = p[3], p[4]
    bsr.bsr_spmm(p[0], p[1], p[2], r, c, x, y, bsr.none1(bias), bsr.none2(res), act, lo, hi, nt)


# epilogues: in the register tiles (bias / residual / relu / relu6 / clamp) and in a second pass (gelu)
GEN_EPILOGUES = [("bias+res", table.ACT_RELU, -1.0, -1.0), ("bias", table.ACT_RELU6, 0.0, 0.0),
                 ("res", table.ACT_CLAMP, -0.5, 0.7), ("bias+res", table.ACT_GELU, 0.0, 0.0),
                 ("", table.ACT_RELU, 0.0, 0.0)]


@pytest.mark.parametrize("block", GEN_BLOCKS, ids=[f"{r}x{c}" for r, c in GEN_BLOCKS])
@pytest.mark.parametrize("threads", [1, 2])
def test_generic_edges(block, threads, rng):
    """Edge shapes of the generic kernel against w @ x: out / in not multiples of the block, N below /
    above / not a multiple of every tile, empty block rows, all-zero and fully dense weights, every
    epilogue variant (a different one per N); 1 and 2 threads, and a thread count above the pool size."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        r, c = block
        out = 4 * r + 3 if r > 1 else 37
        # in not a multiple of c (edge blocks), and for 1 x c a multiple (the 1x4 whole-block step)
        shapes = [(kind, 5 * c + 3) for kind in ("sparse", "zero", "dense")]
        if r == 1:
            shapes += [("sparse", 6 * c), ("dense", 6 * c)]
        for kind, inn in shapes:
            density = {"sparse": 0.35, "zero": 0.0, "dense": 1.0}[kind]
            w, fmt = _weight(rng, block, out, inn, density=density)
            if kind == "dense":  # _weight empties every third block row: fill them too
                w = rng.standard_normal((out, inn)).astype(np.float32)
                fmt = BSR.from_dense(w, block=block)
            p = bsr._prepare(fmt)
            for n in GEN_NS:
                x = rng.standard_normal((inn, n)).astype(np.float32)
                ref = w.astype(np.float64) @ x
                y = np.full((out, n), np.nan, np.float32)
                _gen_run(p, x, y, None, None, 0, numba.get_num_threads())
                np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))
                which, act, lo, hi = GEN_EPILOGUES[GEN_NS.index(n) % len(GEN_EPILOGUES)]
                bias = rng.standard_normal(out).astype(np.float32) if "bias" in which else None
                res = rng.standard_normal((out, n)).astype(np.float32) if "res" in which else None
                y[:] = np.nan
                _gen_run(p, x, y, bias, res, act, 7 if n == GEN_NS[-2] else numba.get_num_threads(), lo, hi)
                want = bsr.reference(fmt, x, bias, act, lo, hi, res)
                np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("block", [(1, 4), (4, 4)], ids=["1x4", "4x4"])
def test_generic_table_row_strided_and_n1(block, rng):
    """The table rows of the generic kernel: strided X / Y / residual (copied to contiguous), and
    N = 1 through both the gemm row and the spmv row."""
    gemm = next(k for k in ROWS if k.block == block)
    gemv = next(k for k in bsr.KERNELS if k.op == "gemv" and k.block == block)
    w, fmt = _weight(rng, block, 23, 45, density=0.4)
    packed = gemm.prepare(fmt)
    xb = rng.standard_normal((45, 2 * 70)).astype(np.float32)
    rb = rng.standard_normal((23, 2 * 70)).astype(np.float32)
    x, res = xb[:, ::2], rb[:, ::2]
    yb = np.full((23, 2 * 70), np.nan, np.float32)
    y = yb[:, ::2]
    gemm.run(packed, x, y, None, 0, 0.0, 0.0, res)
    np.testing.assert_allclose(y, w.astype(np.float64) @ x + res, rtol=1e-4, atol=1e-3)
    assert np.isnan(yb[:, 1::2]).all()
    x1 = rng.standard_normal((45, 1)).astype(np.float32)
    for row in (gemm, gemv):
        y1 = np.full((23, 1), np.nan, np.float32)
        row.run(row.prepare(fmt), x1, y1, None, 0, 0.0, 0.0, None)
        np.testing.assert_allclose(y1, w.astype(np.float64) @ x1, rtol=1e-4, atol=1e-3)
