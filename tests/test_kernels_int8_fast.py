"""int8 VNNI "groups" layout (kernels/int8.py ``_groups`` / ``_groups_vnni``, kernels/_vnni.py
``vnni_pairs`` / ``vnni_gather4``): bit-exact against the integer reference where the generic
row tests do not reach -- column counts past one 128-column tile (remainder chunks of 64),
rows whose non-zero count is not a multiple of 4, empty row groups, the float64 dequantize taken
when K is too large for int32 corrections, the permuted activation layouts and the vectorized
per-tensor parameters."""
import numba
import numpy as np
import pytest

from sparsedge.formats.quant import BSRI8, CSRI8
from sparsedge.kernels import int8 as K8
from sparsedge.kernels._vnni import _perm64

needs_vnni = pytest.mark.skipif(not K8.vnni_available(), reason="CPU lacks avx512_vnni")


def _sparse(rng, out, k, density, block=None):
    w = rng.standard_normal((out, k)).astype(np.float32)
    if block is None:
        w[rng.random((out, k)) >= density] = 0
        w[: min(out, 3)] = 0  # empty leading rows
        if out > 5:
            w[5, :] = 0
            w[5, : min(k, 7)] = 1.5  # 7 non-zeros: a padded group
        return CSRI8.from_dense(w)
    r, c = block
    m = rng.random(((out + r - 1) // r, (k + c - 1) // c)) < density
    m[0] = False  # an empty block row
    w *= np.kron(m, np.ones((r, c)))[:out, :k]
    return BSRI8.from_dense(w.astype(np.float32), block=block)


def _threads(t):
    return min(t, numba.config.NUMBA_NUM_THREADS)


def _check(wf, x, threads, **kw):
    numba.set_num_threads(_threads(threads))
    try:
        p = K8.prepare(wf, path="vnni")
        assert p["layout"] == "groups"
        y = np.full((wf.shape[0], x.shape[1]), np.nan, np.float32)
        K8.run_vnni(p, x, y, kw.get("bias"), kw.get("act", 0), 0.0, 0.0, kw.get("residual"))
        ref = K8.gemm_ref(wf, x, kw.get("bias"), kw.get("act", 0), 0.0, 0.0, kw.get("residual"))
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))  # bitwise, signed zeros too
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [None, (4, 1), (8, 1), (16, 1)])
def test_groups_column_tiles(rng, threads, block):
    """N across 64/128/256-column chunk boundaries (4-, 2- and 1-chunk passes and remainders)."""
    for out, k, n in [(37, 50, 130), (20, 9, 64), (16, 200, 193), (9, 33, 2), (21, 40, 400), (5, 70, 300)]:
        wf = _sparse(rng, out, k, 0.3, block)
        x = (rng.standard_normal((k, n)) * 2).astype(np.float32)
        _check(wf, x, threads)


@needs_vnni
@pytest.mark.parametrize("block", [None, (4, 1), (8, 1)])
def test_groups_epilogue_wide(rng, block):
    out, k, n = 21, 40, 150
    wf = _sparse(rng, out, k, 0.4, block)
    x = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    res = rng.standard_normal((out, n)).astype(np.float32)
    _check(wf, x, 2, bias=bias)  # dequantize + bias fused into the register epilogue
    _check(wf, x, 2, bias=bias, residual=res, act=1)
    _check(wf, x, 2, bias=bias, act=2)


@needs_vnni
def test_groups_large_k_float64_dequantize(rng):
    """K above the int32-exact bound uses the float64 correction path; still bit-exact."""
    k = K8._K_I32 + 40
    out, n = 3, 17
    w = np.zeros((out, k), np.float32)
    w[0, :: 97] = 1.0
    w[2, 5:: 301] = -2.0
    x = rng.standard_normal((k, n)).astype(np.float32)
    _check(CSRI8.from_dense(w), x, 2)


def test_groups_layout_matches_entries(rng):
    """_groups: every non-zero once, in its row group, padding slots weigh zero."""
    for R in (1, 4, 8):
        out, k = 19, 23
        w = rng.standard_normal((out, k)).astype(np.float32)
        w[rng.random((out, k)) > 0.3] = 0
        rows, cols = np.nonzero(w)
        vals = np.arange(1, rows.size + 1, dtype=np.int64) % 100 + 1
        gptr, gidx, gw = K8._groups(rows, cols, vals.astype(np.int8), out, k, R)
        dense = np.zeros((out, k), np.int64)
        for b in range(gptr.shape[0] - 1):
            for g in range(gptr[b], gptr[b + 1]):
                for r in range(R):
                    for j in range(4):
                        if b * R + r < out:
                            dense[b * R + r, gidx[g, j]] += gw[g, r, j]
                        else:
                            assert gw[g, r, j] == 0
        want = np.zeros((out, k), np.int64)
        want[rows, cols] = vals
        assert np.array_equal(dense, want)


@pytest.mark.parametrize("pairs", [False, True])
def test_quant_perm_layout(rng, pairs):
    k, n = 5, 70
    x = rng.standard_normal((k, n)).astype(np.float32)
    xq, sx, zx = K8.quantize_ref(x)
    inv = (np.float32(1) / sx).astype(np.float32)
    got = K8._aligned_u8(k, 128)
    assert got.ctypes.data % 64 == 0
    K8._quant_perm(x, inv, zx.astype(np.float32), got, pairs)
    full = np.zeros((k, 128), np.uint8)
    full[:, :n] = xq
    perm = np.asarray(_perm64(pairs))
    want = np.concatenate([full[:, c * 64 + perm] for c in range(2)], axis=1)
    assert np.array_equal(got, want)
    assert sorted(perm) == list(range(64))


def test_tensor_params_match_act_params(rng):
    for x in (rng.standard_normal((37, 19)).astype(np.float32) * 5, np.zeros((4, 3), np.float32),
              np.abs(rng.standard_normal((70, 1))).astype(np.float32) + 1,
              -np.abs(rng.standard_normal((1, 65))).astype(np.float32), np.zeros((0, 4), np.float32)):
        sx, zx, inv, zpf = K8._tensor_params(x)
        s2, z2 = K8.act_params(x)
        assert np.array_equal(sx, s2) and np.array_equal(zx, z2)
        assert np.array_equal(inv, (np.float32(1) / s2).astype(np.float32))
        assert np.array_equal(zpf, z2.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_quant_perm_dyn_blocked_minmax(rng, threads):
    """_quant_perm_dyn's min / max runs over row blocks in parallel (K*N >= 2 * 65536 gives several
    blocks, uneven ones at K = 257): the extremes placed in the first, a middle and the last block
    give the parameters of act_params and the same quantized bytes as _quant_perm with them."""
    numba.set_num_threads(_threads(threads))
    try:
        for K, N, where in [(257, 1024, (0, 128, 256)), (300, 512, (299, 1, 150)), (2, 70000, (1, 0, 1))]:
            x = rng.standard_normal((K, N)).astype(np.float32)
            x[where[0], 3] = -40.0
            x[where[1], N - 1] = 55.0
            x[where[2], N // 2] = 7.0
            npad = (N + 63) // 64 * 64
            xq = K8._aligned_u8(K, npad)
            sx, zx = K8._quant_perm_dyn(x, xq, True, np.zeros(0, np.float32))
            s2, z2 = K8.act_params(x)
            assert np.array_equal(sx, s2) and np.array_equal(zx, z2)
            xq2 = K8._aligned_u8(K, npad)
            K8._quant_perm(x, (np.float32(1) / s2).astype(np.float32), z2.astype(np.float32), xq2, True)
            assert np.array_equal(xq, xq2)
            # min / max given by the producer (its epilogue): the same parameters and bytes
            xq3 = K8._aligned_u8(K, npad)
            mm = np.array([min(x.min(), 0), max(x.max(), 0)], np.float32)
            s3, z3 = K8._quant_perm_dyn(x, xq3, True, mm)
            assert np.array_equal(s3, s2) and np.array_equal(z3, z2) and np.array_equal(xq3, xq2)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
@pytest.mark.parametrize("block", [(1, 4), (2, 2), (4, 4), (1, 16)])
def test_quads_column_tiles(rng, block):
    """Quad layout (blocks that are not r x 1): 128-column passes with 16-column remainders."""
    for out, k, n in [(19, 37, 200), (33, 64, 130), (8, 20, 97)]:
        wf = _sparse(rng, out, k, 0.3, block)
        x = rng.standard_normal((k, n)).astype(np.float32)
        p = K8.prepare(wf, path="vnni")
        assert p["layout"] == "quads"
        for threads in (1, 2):
            numba.set_num_threads(_threads(threads))
            try:
                y = np.full((out, n), np.nan, np.float32)
                K8.run_vnni(p, x, y, None, 0, 0.0, 0.0, None)
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            assert np.array_equal(y, K8.gemm_ref(wf, x)), (block, out, k, n, threads)


@needs_vnni
def test_groups_int32_feature_indices(rng):
    """in > 65536: group feature indices stay int32 (uint16 below)."""
    k, out, n = 65600, 4, 3
    w = np.zeros((out, k), np.float32)
    w[0, [1, 70000 % k, 65599, 65537]] = [1.0, -2.0, 3.0, 0.5]
    w[3, 65536:65541] = 1.25
    wf = CSRI8.from_dense(w)
    p = K8.prepare(wf, path="vnni")
    assert p["gidx"].dtype == np.int32
    x = rng.standard_normal((k, n)).astype(np.float32)
    _check(wf, x, 2)
    small = CSRI8.from_dense(w[:, :60000])
    assert K8.prepare(small, path="vnni")["gidx"].dtype == np.uint16


@needs_vnni
def test_groups_wide_per_column_static_and_tensor(rng):
    """N past one 256-column pass: the per-tensor register epilogue (scalar corrections) for
    dynamic per-tensor and static quantization, the per-column vectors for granularity column."""
    wf = _sparse(rng, 19, 40, 0.3)
    x = (rng.standard_normal((40, 300)) * 2).astype(np.float32)
    x[:, 7] *= 40  # an outlier token: per-column scales differ
    bias = rng.standard_normal(19).astype(np.float32)
    for kw, ref_kw in (({}, {}), ({"granularity": "column"}, {"granularity": "column"}),
                       ({"act_quant": (0.05, 120)}, {"act_quant": (np.float32(0.05), 120)})):
        p = K8.prepare(wf, path="vnni", **kw)
        y = np.full((19, 300), np.nan, np.float32)
        K8.run_vnni(p, x, y, bias, 0, 0.0, 0.0, None)
        assert np.array_equal(y, K8.gemm_ref(wf, x, bias, **ref_kw)), kw


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
def test_groups_epilogue_minmax(rng, threads):
    """want_minmax: the (min(min(y), 0), max(max(y), 0)) taken per task in the register-epilogue
    path equals the result's, with residual and activations (relu bit-exact, gelu near the
    float64 reference); None when not asked for."""
    numba.set_num_threads(_threads(threads))
    try:
        for out, k, n in [(37, 50, 300), (3, 9, 2), (40, 64, 130)]:
            wf = _sparse(rng, out, k, 0.3)
            p = K8.prepare(wf, path="vnni")
            x = (rng.standard_normal((k, n)) * 2).astype(np.float32)
            bias = rng.standard_normal(out).astype(np.float32)
            res = rng.standard_normal((out, n)).astype(np.float32)
            for act, r in ((0, None), (1, res), (3, None), (3, res)):
                y = np.full((out, n), np.nan, np.float32)
                mm = K8.run_vnni(p, x, y, bias, act, 0.0, 0.0, r, want_minmax=True)
                ref = K8.gemm_ref(wf, x, bias, act, 0.0, 0.0, r)
                if act == 3:
                    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-6)
                else:
                    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
                assert mm == (min(y.min(), 0), max(y.max(), 0))
            assert K8.run_vnni(p, x, y, bias, 0, 0.0, 0.0, None) is None  # not asked for
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
def test_run_vnni_given_minmax_all_layouts(rng):
    """run_vnni(minmax=...) (the producer's min / max of x) gives the same bytes as computing it,
    for the groups, quads and dense layouts."""
    from sparsedge.formats.quant import DenseI8

    x = (rng.standard_normal((40, 130)) * 3).astype(np.float32)
    mm = (np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0)))
    w = rng.standard_normal((12, 40)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    for wf in (CSRI8.from_dense(w), BSRI8.from_dense(w, block=(2, 2)), DenseI8.from_dense(w)):
        p = K8.prepare(wf, path="vnni")
        y0 = np.empty((12, 130), np.float32)
        y1 = np.full((12, 130), np.nan, np.float32)
        K8.run_vnni(p, x, y0, None, 0, 0.0, 0.0, None)
        K8.run_vnni(p, x, y1, None, 0, 0.0, 0.0, None, minmax=mm)
        assert np.array_equal(y0, y1) and np.array_equal(y0, K8.gemm_ref(wf, x)), wf.kind


@needs_vnni
@pytest.mark.parametrize("pairs", [False, True])
def test_quant_phase_redoes_unfinished_chunks(rng, pairs):
    """_quant_phase (the quantization phase of the fused groups call) never waits unboundedly:
    chunks claimed by a worker that never finishes them (simulated: claim counters advanced, done
    flags never set) are redone after _SPIN pauses -- the same parameters and bytes as
    _quant_perm. Edge columns: N = 1, one below / above 64, 130."""
    for K, N in [(70, 1), (33, 63), (9, 65), (40, 130)]:
        x = (rng.standard_normal((K, N)) * 3).astype(np.float32)
        npad = (N + 63) // 64 * 64
        rb = max(4096 // N, 1) if N < 64 else 4  # several chunks
        nch = (K + rb - 1) // rb
        for have_mm in (False, True):
            st = np.zeros(16 + 2 * nch, np.int64)
            st[0] = 2  # chunks 0 and 1 taken by a vanished worker: their min / max never arrive
            qc = np.zeros(nch, np.int64)
            qc[nch - 1] = 1  # the last chunk's quantization claimed and never done
            owner = np.full(nch, -1, np.int64)
            mm = np.array([min(x.min(), 0), max(x.max(), 0)], np.float32) if have_mm else np.zeros(0, np.float32)
            xq = np.full((K, npad), 77, np.uint8)
            have, lo0, hi0 = K8._given_minmax(mm)  # float32 in the kernels (Python floats here)
            sc, zi = K8._quant_phase(0, x, xq, have, np.float32(lo0), np.float32(hi0), pairs, st, qc, owner, np.zeros(nch, np.float32),
                                     np.zeros(nch, np.float32), rb)
            s2, z2 = K8.act_params(x)
            assert sc == s2[0] and zi == z2[0]
            want = np.empty((K, npad), np.uint8)
            K8._quant_perm(x, (np.float32(1) / s2).astype(np.float32), z2.astype(np.float32), want, pairs)
            assert np.array_equal(xq, want), (K, N, have_mm)
            assert np.all(st[16 + nch:] >= 1)  # every chunk marked quantized


@needs_vnni
@pytest.mark.parametrize("block", [None, (8, 1)])
def test_groups_fused_quant_matches_two_calls(rng, monkeypatch, block):
    """The fused call (quantization inside the GEMM's parallel region) and the two-call form
    (``FUSED_QUANT`` off) give the same bytes, with a given min / max too; 1 and 2 threads, N = 2,
    64 and 200 (one and several column passes)."""
    orig = K8._quant_perm_dyn
    for out, k, n in [(37, 50, 200), (16, 9, 64), (5, 70, 2)]:
        wf = _sparse(rng, out, k, 0.3, block)
        p = K8.prepare(wf, path="vnni")
        x = (rng.standard_normal((k, n)) * 2).astype(np.float32)
        mm = (np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0)))
        ref = K8.gemm_ref(wf, x)
        for threads in (1, 2):
            numba.set_num_threads(_threads(threads))
            try:
                for given in (None, mm):
                    calls = []
                    monkeypatch.setattr(K8, "_quant_perm_dyn", lambda *a: calls.append(1) or orig(*a))
                    monkeypatch.setattr(K8, "FUSED_QUANT", True)
                    y0 = np.full((out, n), np.nan, np.float32)
                    K8.run_vnni(p, x, y0, None, 0, 0.0, 0.0, None, minmax=given)
                    assert calls == []  # one call: quantization inside the GEMM's parallel region
                    monkeypatch.setattr(K8, "FUSED_QUANT", False)
                    y1 = np.full((out, n), np.nan, np.float32)
                    K8.run_vnni(p, x, y1, None, 0, 0.0, 0.0, None, minmax=given)
                    assert calls == [1]  # the two-call form ran
                    assert np.array_equal(y0, ref) and np.array_equal(y1, ref), (out, k, n, threads, given)
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
