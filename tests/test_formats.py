"""Conformance battery for every weight format: round trips, nbytes, validation of corrupt arrays."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _formats_util import nm_matrix, sparse_matrix
from sparsedge.errors import FormatError, ModelFileError
from sparsedge.formats import (BSR, BSRI8, CSR, CSRI8, FORMATS, NM, Dense, DenseI8, LowRank, act_quant_from_range,
                               from_arrays, validate_act_quant)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCKS = [(1, 4), (4, 1), (8, 1), (16, 1), (1, 16), (4, 4), (2, 3)]

shapes = st.tuples(st.integers(1, 37), st.integers(1, 41))
densities = st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])


@st.composite
def matrices(draw):
    out, inn = draw(shapes)
    if draw(st.booleans()):  # favour the edge shapes 1xN and Nx1
        out, inn = draw(st.sampled_from([(1, inn), (out, 1), (1, 1), (out, inn)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return sparse_matrix(rng, out, inn, draw(densities), empty_rows=draw(st.booleans()))


def rebuilt(f):
    """Rebuild from meta + arrays the way the reader does, and validate."""
    g = from_arrays(f.kind, f.shape, f.meta(), f.arrays(), name="t", orig_shape=f.orig_shape)
    g.validate(full=True)
    return g


def check_exact(f, w):
    f.validate(full=True)
    d = f.to_dense()
    assert d.dtype == np.float32 and d.shape == w.shape
    np.testing.assert_array_equal(d, w)
    np.testing.assert_array_equal(rebuilt(f).to_dense(), w)
    assert f.nbytes == sum(a.nbytes for a in f.arrays().values())
    for a in f.arrays().values():
        assert a.flags.c_contiguous


def half_step_ok(deq, w, step):
    """|deq - w| <= step/2 (plus float32 rounding of the product)."""
    err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
    tol = 0.5 * np.asarray(step, dtype=np.float64) * (1 + 1e-5) + 1e-6 * np.abs(w)
    assert np.all(err <= tol), float((err - tol).max())


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(matrices(), st.sampled_from(["int32", "uint16", "auto"]))
def test_csr_roundtrip(w, idx):
    f = CSR.from_dense(w, index_dtype=idx)
    check_exact(f, w)
    nnz = int(np.count_nonzero(w))
    assert f.nnz == nnz
    assert f.indices.dtype == (np.int32 if idx == "int32" else np.uint16)
    assert f.nbytes == 4 * (w.shape[0] + 1) + f.indices.itemsize * nnz + 4 * nnz


@SETTINGS
@given(matrices(), st.sampled_from(BLOCKS))
def test_bsr_roundtrip(w, block):
    r, c = block
    f = BSR.from_dense(w, block=block)
    check_exact(f, w)
    R, C = -(-w.shape[0] // r), -(-w.shape[1] // c)
    p = np.zeros((R * r, C * c), np.float32)
    p[:w.shape[0], :w.shape[1]] = w
    nblk = int((p.reshape(R, r, C, c) != 0).any(axis=(1, 3)).sum())
    assert f.nblocks == nblk and f.data.shape == (nblk, r, c)
    assert f.nbytes == 4 * (R + 1) + 4 * nblk + 4 * nblk * r * c
    assert f.nnz >= np.count_nonzero(w) and f.nnz <= w.size


@SETTINGS
@given(shapes, st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 5), (4, 4)]), st.integers(0, 2 ** 32 - 1),
       st.sampled_from([1.0, 0.5, 0.0]))
def test_nm_roundtrip(shape, nm, seed, fill):
    n, m = nm
    w = nm_matrix(np.random.default_rng(seed), shape[0], shape[1], n, m, fill)
    f = NM.from_dense(w, n=n, m=m)
    check_exact(f, w)
    G = -(-shape[1] // m)
    assert f.values.shape == (shape[0], G * n) and f.offsets.dtype == np.uint8
    assert f.nbytes == shape[0] * G * n * 5
    assert f.nnz == np.count_nonzero(w)


def test_nm_rejects_noncompliant():
    w = np.zeros((2, 8), np.float32)
    w[1, 4:7] = 1.0  # 3 non-zeros in one group of 4
    with pytest.raises(FormatError, match="more than N=2"):
        NM.from_dense(w, n=2, m=4)
    NM.from_dense(w, n=4, m=8).validate()


def test_nm_narrow_last_group():
    w = np.zeros((2, 5), np.float32)  # last group of 2:4 has one column
    w[0, 4] = 3.0
    f = NM.from_dense(w, n=2, m=4)
    check_exact(f, w)
    assert f.offsets[0].tolist() == [0, 1, 0, 0]


@SETTINGS
@given(matrices(), st.sampled_from(["symmetric", "affine"]), st.sampled_from(["channel", "tensor"]))
def test_dense_i8_half_step(w, mode, gran):
    f = DenseI8.from_dense(w, mode=mode, granularity=gran)
    f.validate(full=True)
    k = w.shape[0] if gran == "channel" else 1
    assert f.scale.shape == (k,) and f.zero_point.shape == (k,)
    step = f.scale[:, None] if gran == "channel" else f.scale
    half_step_ok(f.to_dense(), w, step)
    if mode == "symmetric":
        assert np.all(f.zero_point == 0) and int(np.abs(f.q.astype(np.int32)).max(initial=0)) <= 127
        assert np.all(f.to_dense()[w == 0] == 0)
    np.testing.assert_array_equal(rebuilt(f).to_dense(), f.to_dense())
    assert f.nbytes == w.size + 8 * k


@SETTINGS
@given(matrices(), st.sampled_from(["int32", "auto"]))
def test_csr_i8_half_step(w, idx):
    f = CSRI8.from_dense(w, index_dtype=idx)
    f.validate(full=True)
    d = f.to_dense()
    half_step_ok(d, w, f.scale[:, None])
    assert np.all(d[w == 0] == 0) and f.nnz == np.count_nonzero(w)
    np.testing.assert_array_equal(rebuilt(f).to_dense(), d)


@SETTINGS
@given(matrices(), st.sampled_from(BLOCKS))
def test_bsr_i8_half_step(w, block):
    f = BSRI8.from_dense(w, block=block)
    f.validate(full=True)
    d = f.to_dense()
    R = -(-w.shape[0] // block[0])
    assert f.scale.shape == (R * block[0],)
    half_step_ok(d, w, f.scale[:w.shape[0], None])
    assert np.all(d[w == 0] == 0)
    np.testing.assert_array_equal(rebuilt(f).to_dense(), d)


@SETTINGS
@given(matrices(), st.sampled_from(["float32", "int8"]))
def test_lowrank(w, dtype):
    k = min(w.shape)
    f = LowRank.from_dense(w, dtype=dtype)  # full rank
    f.validate(full=True)
    assert f.rank == k and f.u.shape == (w.shape[0], k) and f.v.shape == (k, w.shape[1])
    if dtype == "float32":
        np.testing.assert_allclose(f.to_dense(), w, atol=1e-4 * (1 + np.abs(w).max()))
    else:
        u, v = LowRank.from_dense(w).factors()
        uq, vq = f.factors()
        half_step_ok(uq, u, f.u_scale[:, None])
        half_step_ok(vq, v, f.v_scale[:, None])
    np.testing.assert_array_equal(rebuilt(f).to_dense(), f.to_dense())


def test_lowrank_energy_and_factors(rng):
    w = (rng.standard_normal((30, 4)) @ rng.standard_normal((4, 20))).astype(np.float32)
    f = LowRank.from_dense(w, energy=0.999999)
    assert f.rank == 4
    np.testing.assert_allclose(f.to_dense(), w, atol=1e-3)
    g = LowRank.from_factors(rng.standard_normal((5, 2)), rng.standard_normal((2, 7)))
    assert g.shape == (5, 7) and g.meta() == {"rank": 2, "dtype": "float32"}
    with pytest.raises(FormatError):
        LowRank.from_factors(np.ones((5, 2)), np.ones((3, 7)))


@SETTINGS
@given(matrices(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_dense(w, dtype):
    f = Dense.from_dense(w, dtype=dtype)
    f.validate(full=True)
    g = rebuilt(f)
    if dtype == "float32":
        check_exact(f, w)
    else:
        tol = 2.0 ** -11 if dtype == "float16" else 2.0 ** -8
        np.testing.assert_allclose(f.to_dense(), w, rtol=tol, atol=1e-4)
        wid = g.widened()
        assert wid.values.dtype == np.float32 and wid.stored_dtype == dtype
        np.testing.assert_array_equal(wid.values, f.to_dense())
    assert f.nnz == np.count_nonzero(w)


def test_dense_constants_keep_dtype():
    for a in (np.arange(6, dtype=np.int64), np.array([[1, 0]], np.int32), np.array([True, False]),
              np.array(3.5, np.float32), np.zeros((2, 0, 3), np.uint8)):
        f = Dense.from_dense(a)
        f.validate()
        assert f.values.dtype == a.dtype and f.shape == a.shape
        np.testing.assert_array_equal(rebuilt(f).to_dense(), a)
    assert Dense.from_dense(np.ones(3, np.float64)).values.dtype == np.float32
    with pytest.raises(FormatError):
        Dense.from_dense(np.array(["a"]))


def test_bfloat16_rounding():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, -np.inf, np.nan, 0.0], np.float32)
    f = Dense.from_dense(x, dtype="bfloat16")
    y = f.to_dense()
    np.testing.assert_array_equal(y[[0, 3, 5, 6, 8]], x[[0, 3, 5, 6, 8]])
    assert y[1] == 1.0  # tie -> even
    assert y[2] == 1.015625  # rounds up
    assert np.isnan(y[7])


# conv weights: 4-D accepted, stored 2-D with orig_shape
@pytest.mark.parametrize("kind,opts", [("csr", {}), ("bsr", {"block": (4, 1)}), ("nm", {"n": 2, "m": 4}),
                                       ("dense_i8", {}), ("csr_i8", {}), ("bsr_i8", {"block": (1, 4)}),
                                       ("lowrank", {"rank": 3}), ("dense", {"as_2d": True})])
def test_conv_weight_4d(kind, opts, rng):
    w = sparse_matrix(rng, 8, 4 * 3 * 3, 0.4).reshape(8, 4, 3, 3)
    if kind == "nm":
        w = nm_matrix(rng, 8, 36, 2, 4).reshape(8, 4, 3, 3)
    f = FORMATS[kind].from_dense(w, **opts)
    f.validate()
    assert f.shape == (8, 36) and f.orig_shape == (8, 4, 3, 3)
    assert rebuilt(f).orig_shape == (8, 4, 3, 3)
    if kind in ("csr", "bsr", "nm", "dense"):
        np.testing.assert_array_equal(f.to_dense(), w.reshape(8, 36))
    f.orig_shape = (8, 4, 3, 4)
    with pytest.raises(FormatError, match="orig_shape"):
        f.validate()


def test_zero_size_matrices():
    for w in (np.zeros((0, 5), np.float32), np.zeros((4, 0), np.float32)):
        for kind, opts in [("csr", {}), ("bsr", {"block": (4, 4)}), ("nm", {}), ("csr_i8", {}), ("dense_i8", {}),
                           ("bsr_i8", {"block": (2, 2)})]:
            f = FORMATS[kind].from_dense(w, **opts)
            f.validate()
            assert f.to_dense().shape == w.shape
            rebuilt(f)


def test_option_errors():
    w = np.ones((3, 70000), np.float32)
    with pytest.raises(FormatError, match="uint16"):
        CSR.from_dense(w, index_dtype="uint16")
    assert CSR.from_dense(w, index_dtype="auto").indices.dtype == np.int32
    with pytest.raises(FormatError):
        CSR.from_dense(w[:, :5], index_dtype="int64")
    with pytest.raises(FormatError, match="block"):
        BSR.from_dense(w[:, :5], block=(0, 4))
    with pytest.raises(FormatError):
        DenseI8.from_dense(w[:, :5], mode="weird")
    with pytest.raises(FormatError, match="non-finite"):
        DenseI8.from_dense(np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(FormatError):
        CSR.from_dense(np.ones(5, np.float32))  # 1-D is not a weight


# ---------------------------------------------------------------------------------------------
# validate rejects every kind of corrupt array
# ---------------------------------------------------------------------------------------------
def _mut(f, field, new):
    field = field[0] if isinstance(field, tuple) else field
    a = dict(f.arrays())
    a[field] = new
    return from_arrays(f.kind, f.shape, f.meta(), a, name="w", orig_shape=f.orig_shape)


def _rejects(g, field):
    with pytest.raises(FormatError) as ei:
        g.validate(full=True)
    fields = field if isinstance(field, tuple) else (field,)
    assert ei.value.field in fields and ei.value.tensor == "w", str(ei.value)
    assert isinstance(ei.value, ModelFileError)


def _index_corruptions(f, rng, ncols):
    """(field, corrupted array) pairs for a CSR/BSR structure (each must be rejected)."""
    ip, ix = f.indptr, f.indices
    nnz = ix.shape[0]
    out = []
    a = ip.copy(); a[0] = 1; out.append(("indptr", a))  # noqa: E702
    a = ip.copy(); a[-1] += 1; out.append(("indptr", a))  # noqa: E702
    out.append(("indptr", ip.astype(np.int64)))
    out.append(("indptr", ip[:-1].copy()))
    out.append(("indptr", np.repeat(ip, 2)[::2]))  # non-contiguous view
    out.append(("indptr", ip.astype(">i4")))  # wrong byte order
    if len(ip) > 2:  # an interior entry decreasing, or jumping past nnz
        a = ip.copy()
        k = int(rng.integers(1, len(ip) - 1))
        a[k] = a[k - 1] - 1 if a[k - 1] > 0 else nnz + 1
        out.append(("indptr", a))
    if nnz:
        a = ix.copy(); a[int(rng.integers(nnz))] = ncols if ncols < np.iinfo(ix.dtype).max + 1 else 0  # noqa
        if int(a.max()) >= ncols:
            out.append(("indices", a))
        if ix.dtype == np.int32:
            a = ix.copy(); a[int(rng.integers(nnz))] = -1; out.append(("indices", a))  # noqa: E702
        out.append((("indices", "indptr"), ix[:-1].copy()))  # length no longer matches indptr[-1]
        out.append(("indices", ix.astype(np.int64)))
    multi = np.nonzero(np.diff(ip) >= 2)[0]
    if len(multi):
        r = int(multi[0])
        a = ix.copy(); a[ip[r] + 1] = a[ip[r]]; out.append(("indices", a))  # duplicate  # noqa: E702
        a = ix.copy(); a[ip[r]], a[ip[r] + 1] = ix[ip[r] + 1], ix[ip[r]]; out.append(("indices", a))  # unsorted  # noqa
    return out


@SETTINGS
@given(matrices(), st.sampled_from(["csr", "csr_i8", "bsr", "bsr_i8"]), st.sampled_from(BLOCKS),
       st.integers(0, 2 ** 32 - 1))
def test_validate_rejects_corrupt_indices(w, kind, block, seed):
    rng = np.random.default_rng(seed)
    opts = {"block": block} if kind.startswith("bsr") else {}
    f = FORMATS[kind].from_dense(w, **opts)
    ncols = w.shape[1] if kind.startswith("csr") else -(-w.shape[1] // block[1])
    for field, bad in _index_corruptions(f, rng, ncols):
        _rejects(_mut(f, field, bad), field)
    vf = "data" if kind in ("csr", "bsr") else "q"
    v = f.arrays()[vf]
    _rejects(_mut(f, vf, v.astype(np.float64) if kind in ("csr", "bsr") else v.astype(np.int16)), vf)
    _rejects(_mut(f, vf, np.concatenate([v, v[:1]]) if v.shape[0] else np.zeros((1,) + v.shape[1:], v.dtype)), vf)
    _rejects(_mut(f, "indptr", f.indptr[::-1].copy()) if f.nnz else _mut(f, "indptr", f.indptr + 1), "indptr")


def test_bsr_padding_must_be_zero():
    w = np.ones((5, 6), np.float32)
    for kind in ("bsr", "bsr_i8"):
        f = FORMATS[kind].from_dense(w, block=(4, 4))
        vf = "data" if kind == "bsr" else "q"
        a = f.arrays()[vf].copy()
        a[-1, -1, 0] = 1  # a padding row of the last block row
        _rejects(_mut(f, vf, a), vf)
        a = f.arrays()[vf].copy()
        a[f.indices.tolist().index(1), 0, 3] = 1  # a padding column of the last block column
        _rejects(_mut(f, vf, a), vf)


@pytest.mark.parametrize("bad", [np.nan, -1.0, 0.0, np.inf])
def test_scales_rejected(bad, rng):
    w = sparse_matrix(rng, 9, 10, 0.5)
    cases = [(DenseI8.from_dense(w), "scale"), (DenseI8.from_dense(w, granularity="tensor"), "scale"),
             (CSRI8.from_dense(w), "scale"), (BSRI8.from_dense(w, block=(4, 1)), "scale"),
             (LowRank.from_dense(w, rank=3, dtype="int8"), "u_scale"),
             (LowRank.from_dense(w, rank=3, dtype="int8"), "v_scale")]
    for f, field in cases:
        s = f.arrays()[field].copy()
        s[int(rng.integers(len(s)))] = bad
        _rejects(_mut(f, field, s), field)


def test_zero_points_rejected(rng):
    w = sparse_matrix(rng, 6, 10, 0.5)
    f = DenseI8.from_dense(w, mode="affine")
    for bad in (128, -129, 2 ** 30):
        z = f.zero_point.copy()
        z[2] = bad
        _rejects(_mut(f, "zero_point", z), "zero_point")
    g = DenseI8.from_dense(w)
    z = g.zero_point.copy()
    z[0] = 1
    _rejects(_mut(g, "zero_point", z), "zero_point")  # symmetric means zero_point 0
    _rejects(_mut(g, "zero_point", g.zero_point.astype(np.int8)), "zero_point")
    _rejects(_mut(g, "scale", g.scale[:1].copy()), "scale")


def test_nm_offsets_rejected(rng):
    w = nm_matrix(rng, 5, 10, 2, 4)  # G = 3, last group width 2
    f = NM.from_dense(w, n=2, m=4)
    o = f.offsets.copy(); o[1, 0] = 4  # >= M  # noqa: E702
    _rejects(_mut(f, "offsets", o), "offsets")
    o = f.offsets.copy(); o[1, 1] = o[1, 0]  # not strictly increasing  # noqa: E702
    _rejects(_mut(f, "offsets", o), "offsets")
    o = f.offsets.copy(); o[2, 4], o[2, 5] = 1, 2  # column 8+2 = 10 >= in  # noqa: E702
    _rejects(_mut(f, "offsets", o), "offsets")
    _rejects(_mut(f, "offsets", f.offsets.astype(np.int8)), "offsets")
    _rejects(_mut(f, "values", f.values[:, :-1].copy()), "values")
    w2 = np.zeros((2, 5), np.float32)
    g = NM.from_dense(w2, n=2, m=4)
    v = g.values.copy(); v[0, 3] = 1.0  # padding slot of a 1-wide last group must hold 0  # noqa: E702
    _rejects(_mut(g, "values", v), "values")
    with pytest.raises(FormatError, match="meta.n"):
        from_arrays("nm", f.shape, {"n": 5, "m": 4}, f.arrays(), name="w")
    with pytest.raises(FormatError, match="meta.m"):
        from_arrays("nm", f.shape, {"n": 2, "m": 300}, f.arrays(), name="w")


def test_from_arrays_rejects_bad_meta_and_arrays():
    f = CSR.from_dense(np.eye(4, dtype=np.float32))
    with pytest.raises(FormatError, match="missing"):
        from_arrays("csr", (4, 4), {}, {"indptr": f.indptr, "indices": f.indices}, name="w")
    with pytest.raises(FormatError, match="unexpected"):
        from_arrays("csr", (4, 4), {}, dict(f.arrays(), extra=f.indptr), name="w")
    with pytest.raises(FormatError, match="meta"):
        from_arrays("csr", (4, 4), {"block": [1, 1]}, f.arrays(), name="w")
    with pytest.raises(FormatError, match="shape"):
        from_arrays("csr", (4, -4), {}, f.arrays(), name="w")
    with pytest.raises(FormatError, match="shape"):
        from_arrays("csr", (4, 4, 1), {}, f.arrays(), name="w")
    with pytest.raises(FormatError, match="int32"):  # a huge logical width with no stored entries
        from_arrays("csr", (4, 2 ** 40), {}, f.arrays(), name="w")
    with pytest.raises(FormatError, match="kind"):
        from_arrays("coo", (4, 4), {}, f.arrays(), name="w")
    b = BSR.from_dense(np.eye(4, dtype=np.float32), block=(2, 2))
    for meta in ({"block": [0, 2]}, {"block": [2]}, {"block": "2x2"}, {"block": [True, 2]}, {}):
        with pytest.raises(FormatError, match="block"):
            from_arrays("bsr", (4, 4), meta, b.arrays(), name="w")
    g = from_arrays("bsr", (4, 4), {"block": [4, 1]}, b.arrays(), name="w")  # wrong block for the data
    with pytest.raises(FormatError):
        g.validate()
    d = Dense.from_dense(np.ones(3, np.float32))
    with pytest.raises(FormatError, match="dtype"):
        from_arrays("dense", (3,), {"dtype": "float8"}, d.arrays(), name="w")
    with pytest.raises(FormatError, match="values"):
        from_arrays("dense", (3,), {}, {"values": np.ones(3, np.complex64)}, name="w")
    with pytest.raises(FormatError, match="values"):
        from_arrays("dense", (4,), {}, d.arrays(), name="w").validate()
    with pytest.raises(FormatError, match="values"):  # bfloat16 meta needs uint16 storage
        from_arrays("dense", (3,), {"dtype": "bfloat16"}, d.arrays(), name="w").validate()
    lr = LowRank.from_dense(np.eye(4, dtype=np.float32), rank=2)
    with pytest.raises(FormatError, match="shape must be"):
        from_arrays("lowrank", (4, 4), {"rank": 3, "dtype": "float32"}, lr.arrays(), name="w").validate()
    with pytest.raises(FormatError, match="u_scale"):
        from_arrays("lowrank", (4, 4), {"rank": 2, "dtype": "int8"}, lr.arrays(), name="w")


def test_act_quant():
    ok = validate_act_quant({"x": {"scale": 0.5, "zero_point": -3}, "y": {"scale": 1, "zero_point": 200,
                                                                          "dtype": "uint8"}})
    assert ok["x"] == {"scale": 0.5, "zero_point": -3, "dtype": "int8"}
    for bad in ({"x": {"scale": 0.0, "zero_point": 0}}, {"x": {"scale": -1.0}}, {"x": {"scale": float("nan")}},
                {"x": {"scale": 1.0, "zero_point": 128}}, {"x": {"scale": 1.0, "zero_point": 1.5}},
                {"x": {"scale": 1.0, "zero_point": -1, "dtype": "uint8"}}, {"x": {"scale": 1.0, "bits": 8}},
                {"x": {"scale": 10 ** 400}}, {"x": 1.0}, [1]):
        with pytest.raises(ModelFileError):
            validate_act_quant(bad)
    with pytest.raises(ModelFileError, match="does not define"):
        validate_act_quant({"z": {"scale": 1.0}}, values={"x"})
    p = act_quant_from_range(-1.0, 3.0)
    validate_act_quant({"x": p})
    x = np.linspace(-1, 3, 101)
    q = np.clip(np.rint(x / p["scale"]) + p["zero_point"], -128, 127)
    assert np.abs(p["scale"] * (q - p["zero_point"]) - x).max() <= p["scale"] / 2 + 1e-6
