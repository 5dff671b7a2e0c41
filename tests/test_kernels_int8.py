"""int8 GEMM kernels (kernels/int8.py): bit-exact against the integer numpy reference.

Every int8 row of the kernel table is checked on edge shapes (remainders of the VNNI groups of
4 input features, of the 8-row / 48- and 64-column tiles and of the BSR blocks, empty rows,
all-zero and fully dense weights, N = 1) at 1 and 2 threads; the VNNI path must equal the
portable path bit for bit; the activation quantizer must equal numpy's.
"""
import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsedge.formats.quant import BSRI8, CSRI8, DenseI8
from sparsedge.kernels import int8 as K8
from sparsedge.kernels.cpu import has
from sparsedge.kernels.table import ACTIVATIONS

ROWS = [r for r in K8.KERNELS if all(has(f) for f in r.cpu)]
VNNI = K8.vnni_available()
AMX = K8.amx_available()
needs_vnni = pytest.mark.skipif(not VNNI, reason="CPU lacks avx512_vnni")
FAST = (["amx"] if AMX else []) + (["vnni"] if VNNI else [])
RUN = {"amx": K8.run_amx, "vnni": K8.run_vnni, "portable": K8.run_portable}


def _weight(rng, out, k, density, kind, block=None, **kw):
    w = rng.standard_normal((out, k)).astype(np.float32)
    if kind == "bsr_i8":
        r, c = block
        m = rng.random(((out + r - 1) // r, (k + c - 1) // c)) < density
        w *= np.kron(m, np.ones((r, c)))[:out, :k]
    else:
        w[rng.random((out, k)) >= density] = 0
    if out > 2:
        w[1] = 0  # an empty row
    w = w.astype(np.float32)
    if kind == "dense_i8":
        return DenseI8.from_dense(w, **kw)
    if kind == "csr_i8":
        return CSRI8.from_dense(w, **kw)
    return BSRI8.from_dense(w, block=block)


def _run(row, wf, x, bias=None, act=0, lo=0.0, hi=0.0, residual=None):
    p = row.prepare(wf)
    y = np.full((wf.shape[0], x.shape[1]), np.nan, np.float32)
    row.run(p, x, y, bias, act, lo, hi, residual)
    return y


def _rows(fmt, block=None):
    return [r for r in ROWS if r.fmt == fmt and (block is None or r.block == block)]


SHAPES = [(1, 1), (7, 3), (9, 5), (17, 67), (24, 64)]
NS = [1, 2, 17, 49, 65]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,block,kw", [
    ("dense_i8", None, {}),
    ("dense_i8", None, {"mode": "affine", "granularity": "tensor"}),
    ("dense_i8", None, {"mode": "affine", "granularity": "channel"}),
    ("csr_i8", None, {}),
    ("csr_i8", None, {"index_dtype": "uint16"}),
    ("bsr_i8", (4, 1), {}), ("bsr_i8", (8, 1), {}), ("bsr_i8", (16, 1), {}),
    ("bsr_i8", (1, 4), {}), ("bsr_i8", (1, 16), {}), ("bsr_i8", (4, 4), {}),
])
def test_rows_bit_exact(rng, threads, fmt, block, kw):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    numba.set_num_threads(threads)
    try:
        for out, k in SHAPES:
            for density in (0.0, 0.3, 1.0):
                wf = _weight(rng, out, k, density, fmt, block, **kw)
                for n in NS:
                    x = (rng.standard_normal((k, n)) * 3).astype(np.float32)
                    ref = K8.gemm_ref(wf, x)
                    for row in _rows(fmt, block):
                        if n < row.min_n or (row.max_n is not None and n > row.max_n):
                            continue
                        y = _run(row, wf, x)
                        assert np.array_equal(y, ref), (row.name, out, k, n, density)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("fmt,block", [("dense_i8", None), ("csr_i8", None), ("bsr_i8", (8, 1))])
def test_epilogue(rng, fmt, block):
    out, k, n = 19, 37, 21
    wf = _weight(rng, out, k, 0.5, fmt, block)
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    res = rng.standard_normal((out, n)).astype(np.float32)
    for name, code in ACTIVATIONS.items():
        lo, hi = (-0.5, 0.7) if name == "clamp" else (0.0, 0.0)
        ref = K8.gemm_ref(wf, x, bias, code, lo, hi, res)
        for row in _rows(fmt, block):
            if row.max_n is not None:
                continue
            y = _run(row, wf, x, bias, code, lo, hi, res)
            if name in ("none", "relu", "relu6", "clamp"):
                assert np.array_equal(y, ref), (row.name, name)
            else:  # transcendental: numba libm vs scipy
                np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6, err_msg=f"{row.name} {name}")
    # batch-1 rows with the epilogue
    x1 = x[:, :1].copy()
    ref = K8.gemm_ref(wf, x1, bias, ACTIVATIONS["relu"], 0, 0, res[:, :1].copy())
    for row in _rows(fmt, block):
        y = _run(row, wf, x1, bias, ACTIVATIONS["relu"], 0, 0, res[:, :1].copy())
        assert np.array_equal(y, ref), row.name


def test_integer_sums_exact_large_values(rng):
    """Static quantization with scale 1: y is the exact integer sum (extreme int8/uint8 values)."""
    out, k, n = 33, 515, 40
    q = rng.choice(np.array([-127, 127, 0, 1], np.int8), size=(out, k))
    wf = DenseI8((out, k), "symmetric", "channel", q, np.ones(out, np.float32), np.zeros(out, np.int32))
    xq = rng.choice(np.array([0, 255, 3], np.uint8), size=(k, n))
    zp = 7
    x = (xq.astype(np.float32) - zp)
    want = q.astype(np.int64) @ (xq.astype(np.int64) - zp)
    assert np.abs(want).max() < 2 ** 24  # exactly representable in float32
    for path in FAST + ["portable"]:
        p = K8.prepare(wf, act_quant=(1.0, zp), path=path)
        y = np.empty((out, n), np.float32)
        RUN[path](p, x, y, None, 0, 0.0, 0.0, None)
        assert np.array_equal(y, want.astype(np.float32)), path


@needs_vnni
@pytest.mark.parametrize("fmt,block", [("dense_i8", None), ("csr_i8", None), ("bsr_i8", (8, 1)),
                                       ("bsr_i8", (4, 1)), ("bsr_i8", (1, 4))])
def test_vnni_equals_portable(rng, fmt, block):
    for out, k, n in [(40, 130, 50), (9, 8, 16), (64, 256, 97), (33, 64, 33)]:
        wf = _weight(rng, out, k, 0.2, fmt, block)
        x = rng.standard_normal((k, n)).astype(np.float32)
        ys = []
        for path in FAST + ["portable"]:
            p = K8.prepare(wf, path=path)
            y = np.empty((out, n), np.float32)
            RUN[path](p, x, y, None, 0, 0.0, 0.0, None)
            ys.append(y)
        assert all(np.array_equal(ys[0], v) for v in ys[1:])


@pytest.mark.parametrize("gran", ["tensor", "column"])
def test_quantize_matches_numpy(rng, gran):
    cases = [rng.standard_normal((37, 19)).astype(np.float32) * 5,
             np.zeros((4, 3), np.float32),
             np.abs(rng.standard_normal((5, 1))).astype(np.float32),  # all positive, N = 1
             -np.abs(rng.standard_normal((1, 6))).astype(np.float32),  # all negative, K = 1
             np.array([[0.5, 1.5, -2.5, 2.5]], np.float32) / np.float32(1 / 3)]  # near ties
    for x in cases:
        got = K8.quantize_activations(x, granularity=gran)
        want = K8.quantize_ref(x, granularity=gran)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)
    x = cases[0]
    for zp in (0, 128, 255):
        got = K8.quantize_activations(x, 0.05, zp)
        want = K8.quantize_ref(x, 0.05, zp)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_quantize_vnni_layout(rng):
    k, n = 11, 21
    x = rng.standard_normal((k, n)).astype(np.float32)
    xq, sx, zx = K8.quantize_ref(x)
    inv = (np.float32(1) / sx).astype(np.float32)
    npad = 32
    x4 = np.full(3 * npad * 4, 99, np.uint8)
    K8._quant_x4(x, inv, zx.astype(np.float32), x4.view(np.uint32), npad, 3)
    want = np.zeros((12, npad), np.uint8)
    want[:k, :n] = xq
    assert np.array_equal(x4.reshape(3, npad, 4), want.reshape(3, 4, npad).transpose(0, 2, 1))


def test_per_column_and_static_rows(rng):
    out, k, n = 21, 45, 33
    for fmt, block in (("dense_i8", None), ("csr_i8", None), ("bsr_i8", (4, 1))):
        wf = _weight(rng, out, k, 0.4, fmt, block)
        x = rng.standard_normal((k, n)).astype(np.float32)
        x[:, 3] *= 50  # an outlier token: per-column scales differ
        for path in FAST + ["portable"]:
            run = RUN[path]
            p = K8.prepare(wf, granularity="column", path=path)
            y = np.empty((out, n), np.float32)
            run(p, x, y, None, 0, 0.0, 0.0, None)
            assert np.array_equal(y, K8.gemm_ref(wf, x, granularity="column")), (fmt, path)
            p = K8.set_act_quant(K8.prepare(wf, path=path), 0.02, -3, dtype="int8")
            run(p, x, y, None, 0, 0.0, 0.0, None)
            assert np.array_equal(y, K8.gemm_ref(wf, x, act_quant=(np.float32(0.02), 125))), (fmt, path)


def test_close_to_float(rng):
    """Sanity of the dequantization: int8 result near the float32 product."""
    out, k, n = 64, 256, 32
    w = rng.standard_normal((out, k)).astype(np.float32)
    x = rng.standard_normal((k, n)).astype(np.float32)
    yf = w @ x
    for row in _rows("dense_i8"):
        if row.max_n is None:
            y = _run(row, DenseI8.from_dense(w), x)
            assert np.abs(y - yf).max() < 0.05 * np.abs(yf).max(), row.name


def test_prepare_reports_repack(rng):
    wf = _weight(rng, 16, 10, 0.5, "bsr_i8", (8, 1))
    for row in _rows("bsr_i8", (8, 1)):
        p = row.prepare(wf)
        assert p["repack_bytes"] >= 0 and p["repack_s"] >= 0
    with pytest.raises(ValueError):
        K8.set_act_quant({}, 0.0, 0)


@settings(max_examples=12, deadline=None)
@given(out=st.integers(1, 20), k=st.integers(1, 40), n=st.integers(1, 40), dens=st.sampled_from([0.0, 0.1, 0.6, 1.0]),
       seed=st.integers(0, 2 ** 16))
def test_hypothesis_dense_csr(out, k, n, dens, seed):
    rng = np.random.default_rng(seed)
    for fmt in ("dense_i8", "csr_i8"):
        wf = _weight(rng, out, k, dens, fmt)
        x = rng.standard_normal((k, n)).astype(np.float32)
        ref = K8.gemm_ref(wf, x)
        for row in _rows(fmt):
            if n < row.min_n or (row.max_n is not None and n > row.max_n):
                continue
            assert np.array_equal(_run(row, wf, x), ref), row.name
