"""The runtime's fast paths vs the numpy reference: fused softmax (mask broadcasts, scale folded
from div/mul, all-masked / NaN / inf rows), work split over threads (runtime.par), dense BLAS
split paths, vectorizable exp."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.runtime import Session, par
from sparsedge.runtime.reference import run_reference

F32 = np.float32


def _run(tmp_path, nodes, feeds, consts, out="y", threads=2):
    g_in = [ValueInfo(k, str(v.dtype), list(v.shape)) for k, v in feeds.items()]
    g = Graph(g_in, [ValueInfo(out, "float32", [])], nodes)
    from sparsedge.runtime.shapes import infer

    t = {k: Dense.from_dense(v) for k, v in consts.items()}
    t.setdefault("_unused", Dense.from_dense(np.zeros(1, F32)))
    sh = infer(g, t, {k: v.shape for k, v in feeds.items()})
    g.outputs = [ValueInfo(out, "float32", list(sh.shapes[out]))]
    path = str(tmp_path / "m.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=threads)
    (y,) = s.run(None, feeds)
    ref = run_reference(read_model(path), feeds)[out]
    return s, y, ref


@pytest.mark.parametrize("mshape", [None, (4, 1, 1, 9), (1, 1, 1, 9), (9,), (1, 3, 5, 9), (4, 3, 1, 9),
                                    (4, 1, 5, 9), (5, 9), (4, 3, 5, 9), (1, 1, 5, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_softmax_masks(tmp_path, rng, mshape, threads):
    x = (rng.standard_normal((4, 3, 5, 9)) * 3).astype(F32)
    feeds = {"x": x}
    ins = ["x"]
    if mshape is not None:
        m = np.where(rng.random(mshape) < 0.3, -1e4, 0.0).astype(F32)
        feeds["m"] = m
        ins.append("m")
    _, y, ref = _run(tmp_path, [Node("softmax", "sm", ins, ["y"], {"axis": -1})], feeds, {}, threads=threads)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,c", [("div", 5.656854), ("mul", 0.125)])
def test_softmax_scale_folded(tmp_path, rng, op, c):
    a = rng.standard_normal((2, 4, 7, 3)).astype(F32)
    b = rng.standard_normal((2, 4, 3, 7)).astype(F32)
    m = np.zeros((2, 1, 1, 7), F32)
    m[1, ..., -2:] = -1e4
    nodes = [Node("matmul", "mm", ["a", "b"], ["s"], {}), Node(op, "sc", ["s", "c"], ["t"], {}),
             Node("softmax", "sm", ["t", "m"], ["y"], {"axis": 3})]
    s, y, ref = _run(tmp_path, nodes, {"a": a, "b": b, "m": m}, {"c": np.array(c, F32)})
    assert [n.op for n in s._exec.nodes] == ["matmul", "softmax"]  # the scaling pass is gone
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_softmax_scale_not_folded_when_shared(tmp_path, rng):
    x = rng.standard_normal((3, 6)).astype(F32)
    nodes = [Node("div", "sc", ["x", "c"], ["t"], {}), Node("softmax", "sm", ["t"], ["u"], {"axis": -1}),
             Node("add", "ad", ["u", "t"], ["y"], {})]
    s, y, ref = _run(tmp_path, nodes, {"x": x}, {"c": np.array(2.0, F32)})
    assert [n.op for n in s._exec.nodes] == ["div", "softmax", "add"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_softmax_rows_special_values():
    from sparsedge.kernels.nn import softmax_rows

    x = np.array([[1, 2, 3, 4], [-np.inf] * 4, [0, np.nan, 1, 2], [0, np.inf, 1, 2], [-np.inf, 0, 1, -np.inf],
                  [-3.4e38, 0, 1, 2]], F32)
    y = np.empty_like(x)
    softmax_rows(x, np.zeros((0, 0), F32), 1, F32(1.0), y)
    assert np.all(np.isnan(y[1])) and np.all(np.isnan(y[2])) and np.all(np.isnan(y[3]))
    for r in (0, 4, 5):
        e = np.exp(x[r].astype(np.float64) - x[r].max())
        np.testing.assert_allclose(y[r], e / e.sum(), rtol=1e-6, atol=1e-7)


def test_exp_f32_accuracy():
    import numba

    from sparsedge.kernels.nn import exp_f32

    @numba.njit
    def ex(a, out):
        for i in range(a.shape[0]):
            out[i] = exp_f32(a[i])

    a = np.linspace(-87.0, 88.0, 200001).astype(F32)
    o = np.empty_like(a)
    ex(a, o)
    ref = np.exp(a.astype(np.float64))
    assert np.max(np.abs(o - ref) / ref) < 5e-7
    z = np.array([-87.5, -1e4, -np.inf, -3.4e38], F32)
    oz = np.empty_like(z)
    ex(z, oz)
    assert np.all(oz == 0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_par_split_covers_range(n, k):
    seen = []
    par.split(n, lambda a, b: seen.append((a, b)), work=float("inf"), k=k)
    cov = sorted(i for a, b in seen for i in range(a, b))
    assert cov == list(range(n))


def test_par_split_propagates_errors():
    def f(a, b):
        if a > 0:
            raise ValueError("boom")

    with pytest.raises(ValueError):
        par.split(10, f, work=float("inf"), k=2)
    par.split(4, lambda a, b: None, work=float("inf"), k=2)  # the pool still works afterwards


@pytest.mark.parametrize("N", [1, 5, 31, 64])
@pytest.mark.parametrize("act", [0, 1, 3])
def test_dense_builtin_split(rng, N, act):
    from sparsedge.runtime.select import _dense_run, _dense_run_tl

    W = rng.standard_normal((300, 40)).astype(F32)
    b = rng.standard_normal(300).astype(F32)
    x = rng.standard_normal((N, 40)).astype(F32)
    par.set_threads(2)
    old = par.MIN_WORK
    par.MIN_WORK = 0
    try:
        y = np.empty((N, 300), F32)
        _dense_run_tl(W, x, y, b, act)
        yc = np.empty((300, N), F32)
        res = rng.standard_normal((300, N)).astype(F32)
        _dense_run(W, np.ascontiguousarray(x.T), yc, b, act, 0.0, 0.0, res)
    finally:
        par.MIN_WORK = old
        par.set_threads(1)
    from sparsedge.kernels.epilogue import act_ref

    ref = act_ref(x.astype(np.float64) @ W.T.astype(np.float64) + b, act)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    refc = act_ref(W.astype(np.float64) @ x.T.astype(np.float64) + b[:, None] + res, act)
    np.testing.assert_allclose(yc, refc, rtol=1e-4, atol=1e-4)


def test_split_ops_through_session(tmp_path, rng, monkeypatch):
    """matmul (batched and 2-D), broadcast binary ops, transpose, softmax with every op split."""
    monkeypatch.setattr(par, "MIN_WORK", 0)
    a = rng.standard_normal((3, 2, 5, 4)).astype(F32)
    b = rng.standard_normal((3, 2, 4, 6)).astype(F32)
    c = rng.standard_normal((1, 2, 1, 6)).astype(F32)
    w = rng.standard_normal((6, 6)).astype(F32)
    nodes = [Node("matmul", "mm", ["a", "b"], ["s"], {}), Node("add", "ad", ["s", "c"], ["t"], {}),
             Node("transpose", "tr", ["t"], ["u"], {"perm": [2, 0, 1, 3]}),
             Node("reshape", "rs", ["u"], ["v"], {"shape": [30, 6]}), Node("matmul", "m2", ["v", "w"], ["z"], {}),
             Node("mul", "mu", ["z", "z"], ["q"], {}), Node("softmax", "sm", ["q"], ["y"], {"axis": 0})]
    _, y, ref = _run(tmp_path, nodes, {"a": a, "b": b, "c": c}, {"w": w})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,stride,res", [(3, 1, True), (3, 2, False), (1, 1, True), (1, 2, False)])
def test_conv_batched_blas(tmp_path, rng, k, stride, res):
    """Dense convs on small images run the whole batch as one GEMM ("bgemm"), fused residual too."""
    x = rng.standard_normal((3, 4, 6, 5)).astype(F32)
    w = rng.standard_normal((8, 4, k, k)).astype(F32)
    b = rng.standard_normal(8).astype(F32)
    attrs = {"stride": [stride, stride], "padding": [k // 2, k // 2]}
    nodes = [Node("conv2d", "cv", ["x", "w", "b"], ["c" if res else "y"], attrs)]
    feeds = {"x": x}
    if res:
        Ho = (6 + 2 * (k // 2) - k) // stride + 1
        Wo = (5 + 2 * (k // 2) - k) // stride + 1
        feeds["r"] = rng.standard_normal((3, 8, Ho, Wo)).astype(F32)
        nodes += [Node("add", "ad", ["c", "r"], ["s"], {}), Node("relu", "rl", ["s"], ["y"], {})]
    s, y, ref = _run(tmp_path, nodes, feeds, {"w": w, "b": b})
    p = s._plan({kk: v.shape for kk, v in feeds.items()})
    assert p.node_plans[0].data[0] == "bgemm"
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_every_op_has_a_reference():
    from sparsedge.runtime.reference import missing_references

    assert missing_references() == []


def test_op_module_can_register_its_reference(monkeypatch):
    from sparsedge.formats import optable
    from sparsedge.runtime import ops as rops
    from sparsedge.runtime.reference import REF, eval_node

    spec = optable.OPS["neg"]
    monkeypatch.setitem(optable.OPS, "p1_test_neg", spec)
    monkeypatch.setitem(rops.IMPLS, "p1_test_neg", None)

    @rops.register("p1_test_neg", reference=lambda attrs, x, env=None: -x)
    class _Neg(rops.Op):
        pass

    try:
        out = eval_node(Node("p1_test_neg", "n", ["x"], ["y"], {}), [np.ones(3, F32)])
        np.testing.assert_array_equal(out[0], -np.ones(3, F32))
    finally:
        REF.pop("p1_test_neg", None)
        rops.IMPLS.pop("p1_test_neg", None)


def test_cold_start_skips_scipy_linalg_but_numba_blas_works(tmp_path):
    """A new process running a sparse kernel does not import scipy.linalg; numba's np.dot still
    compiles afterwards (its real ensure_blas is restored)."""
    import subprocess
    import sys

    code = r"""
import sys
import numpy as np
import sparsedge.runtime
from sparsedge.kernels.nn import softmax_rows
x = np.zeros((2, 3), np.float32)
softmax_rows(x, np.zeros((0, 0), np.float32), 1, np.float32(1.0), x)
assert "scipy.linalg" not in sys.modules, "scipy.linalg imported"
import numba
import numba.np.arraymath as am, numba.np.linalg as la
assert am._HAVE_BLAS and am.ensure_blas is la.ensure_blas
f = numba.njit(lambda a, b: np.dot(a, b))
assert f(np.ones((2, 2)), np.ones((2, 2)))[0, 0] == 2.0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_arena_values_are_cache_line_aligned(tmp_path, rng):
    """Every arena value starts on a 64-byte boundary (kernels copy misaligned activations)."""
    x = rng.standard_normal((3, 5)).astype(F32)
    nodes = [Node("relu", "r1", ["x"], ["a"], {}), Node("sigmoid", "s1", ["a"], ["b"], {}),
             Node("add", "ad", ["a", "b"], ["y"], {})]
    s, y, ref = _run(tmp_path, nodes, {"x": x}, {})
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    p = s._plan({"x": x.shape})
    for _ in range(3):  # several fresh arenas (numpy's allocator is only 16-byte aligned)
        arena, bufs, _scratch = s._get_arena(p)
        assert arena.ctypes.data % 64 == 0
        assert bufs and all(v.ctypes.data % 64 == 0 for v in bufs.values())
