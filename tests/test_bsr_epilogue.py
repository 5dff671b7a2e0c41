"""BSR float32 GEMM rows: the fused epilogue on every code path, and misaligned X.

``bsr_spmm_r1`` (4x1 / 8x1 / 16x1) applies bias, residual and relu / relu6 / clamp in registers
before the one store of each output tile, and other activations in a second pass; columns
beyond a multiple of VW take the in-memory tail path. When X rows are not 64-byte aligned (base
address or N not a multiple of VW) and every X row is used often enough, each worker reads its
own aligned copy of X. These cases check all of that against the numpy reference at 1 and 2
threads, on shapes with edge block rows (out not a multiple of r), empty block rows, N = 1 and
N not a multiple of VW.
"""
import numba
import numpy as np
import pytest

from sparsedge.formats.bsr import BSR
from sparsedge.kernels import bsr, table

ROWS = [r for r in bsr.KERNELS if r.op == "gemm"]
R1 = [r for r in ROWS if r.block[1] == 1 and (r.block[0] % 8 == 0 or r.block[0] == 4)]

# (code, lo, hi): the in-register ones, a clamp with both bounds inside the value range, and
# one activation that takes the second pass
ACTS = [(table.ACT_NONE, 0.0, 0.0), (table.ACT_RELU, 0.0, 0.0), (table.ACT_RELU6, 0.0, 0.0),
        (table.ACT_CLAMP, -0.5, 0.75), (table.ACT_SIGMOID, 0.0, 0.0)]


def _weight(rng, block, out, inn, density):
    r, c = block
    keep = rng.random((-(-out // r), -(-inn // c))) < density
    keep[1::4] = False  # empty block rows
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:out, :inn]
    w = (rng.standard_normal((out, inn)) * 0.5).astype(np.float32) * mask
    return w, BSR.from_dense(w, block=block)


def _misaligned(a, floats=1):
    """A C-contiguous copy of ``a`` whose data starts ``floats`` floats past a 64-byte boundary."""
    buf = np.empty(a.size + 32, np.float32)
    o = ((64 - buf.ctypes.data % 64) % 64) // 4 + floats
    v = buf[o:o + a.size].reshape(a.shape)
    v[...] = a
    return v


def _check(row, fmt, x, bias, res, act, lo, hi, inn):
    y = np.full((fmt.shape[0], x.shape[1]), np.nan, np.float32)
    row.run(row.prepare(fmt), x, y, bias, act, lo, hi, res)
    ref = row.reference(fmt, x, bias, act, lo, hi, res)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_epilogue_codes(row, threads, rng):
    """Every activation with bias / residual / both / neither; N = 1, a VW multiple, 2 vectors + 3
    columns, 3 tiles + 1 vector (8x1: 3 + 3 + 1 vectors)."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for out, inn, n in [(37, 50, 1), (45, 70, 2 * bsr.VW), (21, 40, 2 * bsr.VW + 3), (64, 33, 7 * bsr.VW)]:
            w, fmt = _weight(rng, row.block, out, inn, 0.4)
            x = rng.standard_normal((inn, n)).astype(np.float32)
            bias = rng.standard_normal(out).astype(np.float32)
            res = rng.standard_normal((out, n)).astype(np.float32)
            for act, lo, hi in ACTS:
                for b, rs in [(bias, res), (bias, None), (None, res), (None, None)]:
                    _check(row, fmt, x, b, rs, act, lo, hi, inn)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def _copy_case(r, nw):
    """(out, in, density) whose every X row is used >= COPY_MIN_USES times per worker."""
    out, inn, density = 60 * r, 24, 0.9
    nblk_min = (out // r) * inn * density * 0.7  # a quarter of the block rows are empty
    assert nblk_min >= bsr.COPY_MIN_USES * inn * nw
    return out, inn, density


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row", R1, ids=[r.name for r in R1])
def test_misaligned_x(row, threads, rng):
    """X not 64-byte aligned (base 4 / 32 bytes off; N not a multiple of VW): the aligned per-worker
    copies give the same result, with the in-register and second-pass epilogues."""
    nt = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(nt)
    try:
        out, inn, density = _copy_case(row.block[0], nt)
        w, fmt = _weight(rng, row.block, out, inn, density)
        bias = rng.standard_normal(out).astype(np.float32)
        for n, off in [(3 * bsr.VW, 1), (4 * bsr.VW, 8), (2 * bsr.VW + 5, 0), (bsr.VW + 1, 3)]:
            x = _misaligned(rng.standard_normal((inn, n)).astype(np.float32), off)
            res = _misaligned(rng.standard_normal((out, n)).astype(np.float32), 2)
            assert x.flags.c_contiguous and (x.ctypes.data % 64 != 0 or n % bsr.VW != 0)
            for act, lo, hi in [(table.ACT_NONE, 0.0, 0.0), (table.ACT_RELU6, 0.0, 0.0),
                                (table.ACT_GELU, 0.0, 0.0)]:
                _check(row, fmt, x, bias, res, act, lo, hi, inn)
            _check(row, fmt, x, None, None, table.ACT_NONE, 0.0, 0.0, inn)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_workers_beyond_pool(rng):
    """More workers requested (nt) than pool threads, with the X copies: every task still runs once."""
    out, inn, density = _copy_case(8, 7)
    w, fmt = _weight(rng, (8, 1), out, inn, density)
    p = bsr._prepare(fmt)
    n = 3 * bsr.VW
    x = _misaligned(rng.standard_normal((inn, n)).astype(np.float32), 1)
    for nt in (1, 3, 7):
        y = np.full((out, n), np.nan, np.float32)
        bsr.bsr_spmm_r1(p[0], p[1], p[2], 8, x, y, bsr.none1(None), bsr.none2(None), 0, 0.0, 0.0, nt)
        np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-3)
