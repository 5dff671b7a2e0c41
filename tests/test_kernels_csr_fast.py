"""CSR float32 kernels: the paths the generic kernel-table tests do not force.

* X whose rows are not 64-byte aligned (base address offset, N not a multiple of the vector
  width) with enough non-zeros per X row to take the aligned-copy path, and too few to take it;
* N large enough to be split into L2 chunks;
* row counts below / above / not divisible by the number of row blocks;
* csr_spmv (N = 1) on long and uneven rows.
Every case against the dense numpy reference, with bias, residual and an activation.
"""
import numba
import numpy as np
import pytest

from sparsedge.formats.csr import CSR
from sparsedge.kernels import csr, table
from sparsedge.kernels.simd import VW


def _misaligned(rng, shape, off_floats):
    """A C-contiguous float32 array whose data starts off_floats floats past a 64-byte boundary."""
    n = int(np.prod(shape))
    buf = np.empty(n + 64, np.float32)
    a = ((-buf.ctypes.data) % 64) // 4 + off_floats
    x = buf[a:a + n].reshape(shape)
    x[...] = rng.standard_normal(shape).astype(np.float32)
    assert x.flags.c_contiguous and (x.ctypes.data % 64) == 4 * (off_floats % 16)
    return x


def _weight(rng, out, inn, density, index_dtype="auto"):
    w = rng.standard_normal((out, inn)).astype(np.float32) * (rng.random((out, inn)) < density)
    w[::7] = 0.0  # some empty rows
    return w, CSR.from_dense(w, index_dtype=index_dtype)


def _check_gemm(fmt, w, x, rng, act=table.ACT_GELU):
    out, n = w.shape[0], x.shape[1]
    bias = rng.standard_normal(out).astype(np.float32)
    res = rng.standard_normal((out, n)).astype(np.float32)
    row = table.by_name("csr_f32_spmm")
    packed = row.prepare(fmt)
    y = np.full((out, n), np.nan, np.float32)
    row.run(packed, x, y, bias, act, 0.0, 0.0, res)
    ref = csr.reference(fmt, x, bias, act, 0.0, 0.0, res)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(w.shape[1])))
    y2 = np.full((out, n), np.nan, np.float32)
    row.run(packed, x, y2, None, table.ACT_NONE, 0.0, 0.0, None)
    np.testing.assert_allclose(y2, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(w.shape[1])))


@pytest.mark.parametrize("threads", [1, 2])
def test_spmm_misaligned_x(threads, rng):
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        # (out, in, density): many uses per X row (copy path) and few (direct misaligned path)
        for out, inn, density in [(203, 37, 0.4), (9, 300, 0.05)]:
            w, fmt = _weight(rng, out, inn, density)
            assert (fmt.nnz >= csr.COPY_MIN_USES * inn) == (out > 100)
            for n in (VW, 8 * VW, 8 * VW + 4 * VW + 3, 2 * VW + 5):
                for off in (0, 1, 4, 12):
                    _check_gemm(fmt, w, _misaligned(rng, (inn, n), off), rng)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_spmv_index_dtypes(rng):
    """int32 indices are repacked to uint16 (in <= 65536) and kept 32-bit above that."""
    row = table.by_name("csr_f32_spmv")
    for inn, want in [(300, np.uint16), (70000, np.uint32)]:
        w = np.zeros((4, inn), np.float32)
        w[0, [0, 5, inn - 1]] = [1.0, -2.0, 3.0]
        w[2, inn // 2:inn // 2 + 40] = rng.standard_normal(40).astype(np.float32)
        fmt = CSR.from_dense(w, index_dtype="int32")
        packed = row.prepare(fmt)
        assert packed[1].dtype == want
        x = rng.standard_normal((inn, 1)).astype(np.float32)
        y = np.full((4, 1), np.nan, np.float32)
        row.run(packed, x, y, None, table.ACT_NONE, 0.0, 0.0, None)
        np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_spmm_n_chunks_and_row_blocks(rng):
    """in * N above the L2 chunk budget (several N chunks); rows not a multiple of ROW_BLOCKS."""
    inn = 130
    n = csr.L2_FLOATS // inn + 3 * VW + 7
    for out in (1, csr.ROW_BLOCKS - 1, 3 * csr.ROW_BLOCKS + 5):
        w, fmt = _weight(rng, out, inn, 0.1)
        for off in (0, 4):
            _check_gemm(fmt, w, _misaligned(rng, (inn, n), off), rng, act=table.ACT_RELU)


@pytest.mark.parametrize("threads", [1, 2])
def test_spmv_rows(threads, rng):
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for out, inn, density, idt in [(300, 1000, 0.3, "uint16"), (70, 5, 0.9, "int32"), (129, 64, 0.05, "auto")]:
            w, fmt = _weight(rng, out, inn, density, idt)
            w[3, :] = rng.standard_normal(inn).astype(np.float32)  # one full row
            fmt = CSR.from_dense(w, index_dtype=idt)
            x = rng.standard_normal((inn, 1)).astype(np.float32)
            bias = rng.standard_normal(out).astype(np.float32)
            res = rng.standard_normal((out, 1)).astype(np.float32)
            row = table.by_name("csr_f32_spmv")
            packed = row.prepare(fmt)
            y = np.full((out, 1), np.nan, np.float32)
            row.run(packed, x, y, bias, table.ACT_SILU, 0.0, 0.0, res)
            ref = csr.reference(fmt, x, bias, table.ACT_SILU, 0.0, 0.0, res)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
