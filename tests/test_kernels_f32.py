"""Every float32 GEMM/GEMV row of the kernel table against its numpy reference.

Edge shapes (below / above / not divisible by the N tile and the blocks), empty rows, all-zero
and fully dense weights, N = 1, 1 and 2 threads, every epilogue variant incl. residual.
"""
import numba
import numpy as np
import pytest

from sparsedge.formats.bsr import BSR
from sparsedge.formats.csr import CSR
from sparsedge.formats.dense import Dense
from sparsedge.formats.lowrank import LowRank
from sparsedge.formats.nm import NM
from sparsedge.kernels import table
from sparsedge.kernels.epilogue import act_ref, epilogue_ref

ROWS = [r for r in table.all_kernels() if r.dtype == "float32" and r.op in ("gemm", "gemv")]
IDS = [r.name for r in ROWS]


def make_weight(rng, row, out, inn, kind="random", density=0.3, index_dtype="int32"):
    """A float32 [out, in] matrix whose non-zeros fit the row's format, and the format object."""
    w = rng.standard_normal((out, inn)).astype(np.float32)
    if row.fmt == "bsr":
        r, c = row.block
        R, C = -(-out // r), -(-inn // c)
        keep = rng.random((R, C)) < density
        if kind == "dense":
            keep[:] = True
        elif kind == "zero":
            keep[:] = False
        elif kind == "empty_rows":
            keep[::2] = False
        mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:out, :inn]
        w = w * mask
        return w, BSR.from_dense(w, block=(r, c))
    if row.fmt == "nm":
        n, m = row.block
        G = -(-inn // m)
        p = np.zeros((out, G * m), np.float32)
        p[:, :inn] = w
        g = p.reshape(out, G, m)
        order = np.argsort(-np.abs(g), axis=2)
        keep = np.zeros_like(g, dtype=bool)
        np.put_along_axis(keep, order[:, :, :n], True, axis=2)
        if kind != "dense":
            keep &= rng.random(keep.shape) < max(density * 2, 0.5)
        if kind == "zero":
            keep[:] = False
        elif kind == "empty_rows":
            keep[::2] = False
        w = (g * keep).reshape(out, G * m)[:, :inn].copy()
        return w, NM.from_dense(w, n=n, m=m)
    mask = rng.random((out, inn)) < density
    if kind == "dense":
        mask[:] = True
    elif kind == "zero":
        mask[:] = False
    elif kind == "empty_rows":
        mask[::2] = False
        mask[1::5] = False
    w = w * mask
    if row.fmt == "csr":
        return w, CSR.from_dense(w, index_dtype=index_dtype)
    if row.fmt == "dense":
        return w, Dense.from_dense(w)
    if row.fmt == "lowrank":
        k = max(1, min(out, inn) // 2)
        lr = LowRank.from_dense(w, rank=k)
        return lr.to_dense(), lr
    raise AssertionError(row.fmt)


def run_row(row, fmt, x, bias=None, act=0, lo=0.0, hi=0.0, residual=None):
    packed = row.prepare(fmt)
    y = np.full((fmt.shape[0], x.shape[1]), np.nan, dtype=np.float32)
    row.run(packed, x, y, bias, act, lo, hi, residual)
    return y


def check(row, fmt, x, **kw):
    y = run_row(row, fmt, x, **kw)
    ref = row.reference(fmt, x, kw.get("bias"), kw.get("act", 0), kw.get("lo", 0.0), kw.get("hi", 0.0),
                        kw.get("residual"))
    assert y.dtype == np.float32 and ref.shape == y.shape
    inn = fmt.shape[1]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(inn)))


SHAPES = [(1, 1), (7, 5), (33, 29), (17, 70), (130, 67)]
NS = [1, 3, 129, 300]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_shapes(row, threads, rng):
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        ns = [1] if row.max_n == 1 else NS
        for out, inn in SHAPES:
            for kind in ("random", "empty_rows"):
                w, fmt = make_weight(rng, row, out, inn, kind)
                for n in ns:
                    x = rng.standard_normal((inn, n)).astype(np.float32)
                    check(row, fmt, x)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
@pytest.mark.parametrize("kind", ["zero", "dense"])
def test_zero_and_dense(row, kind, rng):
    n = 1 if row.max_n == 1 else 140
    w, fmt = make_weight(rng, row, 45, 38, kind)
    x = rng.standard_normal((38, n)).astype(np.float32)
    bias = rng.standard_normal(45).astype(np.float32)
    check(row, fmt, x)
    check(row, fmt, x, bias=bias, act=table.ACT_RELU)
    if kind == "zero" and row.fmt != "lowrank":
        y = run_row(row, fmt, x, bias=bias)
        np.testing.assert_array_equal(y, np.repeat(bias[:, None], n, 1))


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_epilogues(row, rng):
    n = 1 if row.max_n == 1 else 131
    out, inn = 40, 36
    w, fmt = make_weight(rng, row, out, inn, density=0.5)
    x = rng.standard_normal((inn, n)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    res = rng.standard_normal((out, n)).astype(np.float32)
    for name, code in table.ACTIVATIONS.items():
        lo, hi = (-0.5, 0.7) if name == "clamp" else (0.0, 0.0)
        check(row, fmt, x, bias=bias, act=code, lo=lo, hi=hi, residual=res)
        check(row, fmt, x, act=code, lo=lo, hi=hi)
    check(row, fmt, x, residual=res)


def test_csr_uint16_indices(rng):
    for row in [r for r in ROWS if r.fmt == "csr"]:
        for n in ([1] if row.max_n == 1 else [1, 200]):
            w, fmt = make_weight(rng, row, 50, 300, index_dtype="uint16")
            assert fmt.arrays()["indices"].dtype == np.uint16
            check(row, fmt, rng.standard_normal((300, n)).astype(np.float32), act=table.ACT_GELU)


def test_act_ref_values():
    """The reference activations themselves, at known points (so a wrong reference cannot pass)."""
    v = np.array([-4.0, -1.0, 0.0, 0.5, 3.0, 7.0])
    A = table.ACTIVATIONS
    np.testing.assert_allclose(act_ref(v, A["relu"]), [0, 0, 0, 0.5, 3, 7])
    np.testing.assert_allclose(act_ref(v, A["relu6"]), [0, 0, 0, 0.5, 3, 6])
    np.testing.assert_allclose(act_ref(v, A["clamp"], -1, 1), [-1, -1, 0, 0.5, 1, 1])
    np.testing.assert_allclose(act_ref(v, A["hardswish"]), [0, -1 / 3, 0, 0.5 * 3.5 / 6, 3, 7])
    np.testing.assert_allclose(act_ref(np.array([0.0]), A["sigmoid"]), [0.5])
    np.testing.assert_allclose(act_ref(np.array([1.0]), A["gelu"]), [0.8413447460685429])
    np.testing.assert_allclose(act_ref(np.array([1.0]), A["gelu_tanh"]), [0.8411919906082768])
    np.testing.assert_allclose(act_ref(np.array([1.0]), A["silu"]), [1 / (1 + np.exp(-1))])
    y = epilogue_ref(np.ones((2, 3)), bias=np.array([1.0, -5.0]), act=A["relu"], residual=np.ones((2, 3)))
    np.testing.assert_array_equal(y, [[3, 3, 3], [0, 0, 0]])


def test_fast_tanh_erf_accuracy():
    """The vectorizable tanh/erf used by the epilogues stay within 1e-6 of libm over the real line."""
    import math
    from sparsedge.kernels.epilogue import erf_f32, tanh_f32
    xs = np.concatenate([np.linspace(-12, 12, 2001), [0.0, 1e-8, -1e-8, 3.9999, 4.0001, 50.0, -50.0]])
    for v in xs:
        f = np.float32(v)
        assert abs(tanh_f32(f) - math.tanh(float(f))) <= 1e-6, v
        assert abs(erf_f32(f) - math.erf(float(f))) <= 1e-6, v


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_zero_sizes(row, rng):
    """out = 0, in = 0 and N = 0 neither crash nor write out of bounds."""
    for out, inn, n in [(0, 5, 3), (6, 0, 3), (6, 5, 0)]:
        if row.max_n == 1 and n != 1:
            n = 1
        if row.fmt in ("lowrank", "nm") and 0 in (out, inn):
            continue  # these formats cannot represent an empty dimension
        w, fmt = make_weight(rng, row, out, inn)
        x = rng.standard_normal((inn, n)).astype(np.float32)
        y = run_row(row, fmt, x)
        assert y.shape == (out, n) and not np.isnan(y).any()
        np.testing.assert_allclose(y, w.astype(np.float64) @ x, rtol=1e-4, atol=1e-4)
