"""conv2d's direct shifted sparse conv paths (kernels/conv.py ``sparse_conv_batch``, the whole batch in
one call, any stride; ``sparse_conv_s1`` per image, stride 1): groups 1, k x k with a float32 CSR or
BSR r x 1 (r % 8 == 0) weight. Session outputs vs the numpy reference
interpreter, and the selection report / profile showing which path ran."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedge.formats.base import FORMATS
from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.runtime import Session
from sparsedge.runtime.reference import run_reference

NOTE = "direct shifted conv"
H, W = 7, 30  # default input; W + 2*pad = 32 keeps the wide grid whole vector tiles (the gate)


def _out(n, k, p, d, s=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _weight(kind, O, C, k, rng, sparsity=0.85):
    w = (rng.standard_normal((O, C, k, k)) * 0.3).astype(np.float32)
    if kind == "csr":
        w[rng.random(w.shape) < sparsity] = 0
        return FORMATS["csr"].from_dense(w)
    r, c = kind
    w2 = w.reshape(O, -1)
    mask = rng.random((-(-O // r), -(-w2.shape[1] // c))) < sparsity
    full = np.kron(mask, np.ones((r, c)))[:O, :w2.shape[1]].astype(bool)
    w2[full] = 0
    return FORMATS["bsr"].from_dense(w2.reshape(O, C, k, k), block=(r, c))


def build(path, kind, *, C=12, O=16, k=3, pad=1, dil=1, stride=1, bias=True, act="none", residual=None, rng,
          hw=None, sparsity=0.85):
    """One conv2d (x [batch, C, H, W]) -> optional add(r) [+ relu]; returns the model path."""
    h, w = hw if hw is not None else (H, 32 - 2 * pad)
    Ho, Wo = _out(h, k, pad, dil, stride), _out(w, k, pad, dil, stride)
    ins = [ValueInfo("x", "float32", ["batch", C, h, w])]
    attrs = {"padding": [pad, pad], "dilation": [dil, dil], "stride": [stride, stride], "activation": act}
    t = {"w": _weight(kind, O, C, k, rng, sparsity)}
    cin = ["x", "w"]
    if bias:
        t["b"] = Dense.from_dense((rng.standard_normal(O) * 0.3).astype(np.float32))
        cin.append("b")
    nodes = [Node("conv2d", "conv", cin, ["c"], attrs)]
    out = "c"
    if residual is not None:
        ins.append(ValueInfo("r", "float32", ["batch", O, Ho, Wo]))
        nodes.append(Node("add", "add", ["c", "r"], ["s"], {}))
        out = "s"
        if residual == "relu":
            nodes.append(Node("relu", "relu", ["s"], ["y"], {}))
            out = "y"
    g = Graph(ins, [ValueInfo(out, "float32", ["batch", O, Ho, Wo])], nodes)
    write_model(path, g, t, {})
    return path, (O, Ho, Wo)


def _feeds(model_path, batch, oshape, rng):
    m = read_model(model_path)
    f = {"x": rng.standard_normal([batch] + list(m.graph.inputs[0].shape[1:])).astype(np.float32)}
    if len(m.graph.inputs) > 1:
        f["r"] = rng.standard_normal((batch,) + oshape).astype(np.float32)
    return m, f


def _run(path, feeds, threads, override):
    s = Session(path, threads=threads, profile=True, kernel_overrides={"conv": override} if override else None)
    try:
        y = s.run(None, feeds)[0]
        rep = [r for r in s.selection_report() if r["node"] == "conv"]
        prof = getattr(s, "profile", None)
    finally:
        s.close()
    return y, rep, prof


CASES = [  # kind, override, k, pad, dil, act, residual, O[, (H, W)]
    ("csr", "csr_f32_spmm", 3, 1, 1, "none", "relu", 16),
    ((8, 1), "bsr8x1_f32_spmm", 3, 1, 1, "none", "relu", 16),
    ("csr", "csr_f32_spmm", 5, 2, 1, "none", "add", 16),
    ((8, 1), "bsr8x1_f32_spmm", 5, 0, 1, "relu", None, 20),  # O not a multiple of r: padded edge block
    ("csr", "csr_f32_spmm", 3, 0, 2, "none", None, 12),
    ((8, 1), "bsr8x1_f32_spmm", 3, 2, 2, "none", "relu", 24),
    ((16, 1), "bsr16x1_f32_spmm", 5, 1, 2, "relu", None, 20),
    ("csr", "csr_f32_spmm", 5, 2, 2, "relu", None, 16),
    ("csr", "csr_f32_spmm", 3, 1, 1, "none", "relu", 16, (3, 41)),  # Nw = 129: 1 column in the scalar tails
    ((8, 1), "bsr8x1_f32_spmm", 3, 1, 1, "relu", None, 16, (3, 41)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7] + c[8:])))
def test_direct_matches_reference(tmp_path, case):
    kind, override, k, pad, dil, act, residual, O = case[:8]
    rng = np.random.default_rng(CASES.index(case))
    path, osh = build(str(tmp_path / "m.sparsedge"), kind, O=O, k=k, pad=pad, dil=dil, act=act,
                      residual=residual, rng=rng, hw=case[8] if len(case) > 8 else None)
    for batch in (1, 3):
        m, feeds = _feeds(path, batch, osh, rng)
        ref = list(run_reference(m, feeds).values())[0]
        for threads in (1, 2):
            y, rep, _ = _run(path, feeds, threads, override)
            assert y.shape == ref.shape == (batch,) + osh
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
            assert rep and all(r["kernel"] == override for r in rep), rep
            assert all(NOTE in r["why"] for r in rep), rep


def test_default_selection_takes_direct_path(tmp_path):
    """No override: a 90% CSR 3x3 conv with a 64-channel shape gets the direct path when the
    selector picks the csr spmm row (else the report must not claim it)."""
    rng = np.random.default_rng(5)
    path, osh = build(str(tmp_path / "m.sparsedge"), "csr", C=16, O=16, k=3, pad=1, residual="relu", rng=rng)
    m, feeds = _feeds(path, 2, osh, rng)
    ref = list(run_reference(m, feeds).values())[0]
    y, rep, _ = _run(path, feeds, 2, None)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    for r in rep:
        assert (NOTE in r["why"]) == (r["kernel"] == "csr_f32_spmm"), r


@pytest.mark.parametrize("kind,override,k,stride,pad", [
    ((4, 1), "bsr4x1_f32_spmm", 3, 1, 1),         # r % 8 != 0
    ((1, 4), "bsr1x4_f32_spmm", 3, 1, 1),         # c != 1
    ("csr", "numpy_densified", 3, 1, 1),          # BLAS on densified weights
    ("csr", "scipy_csr", 3, 1, 1),                # builtin csr candidate
])
def test_other_cases_stay_on_im2col(tmp_path, kind, override, k, stride, pad):
    rng = np.random.default_rng(7)
    path, osh = build(str(tmp_path / "m.sparsedge"), kind, k=k, pad=pad, stride=stride, act="relu", rng=rng)
    m, feeds = _feeds(path, 3, osh, rng)
    ref = list(run_reference(m, feeds).values())[0]
    y, rep, _ = _run(path, feeds, 2, override)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert rep and all(NOTE not in r["why"] for r in rep), rep


def test_grouped_sparse_conv_not_direct(tmp_path):
    rng = np.random.default_rng(9)
    C, O, k = 8, 16, 3
    w = (rng.standard_normal((O, C // 2, k, k)) * 0.3).astype(np.float32)
    w[rng.random(w.shape) < 0.85] = 0
    g = Graph([ValueInfo("x", "float32", ["batch", C, H, W])], [ValueInfo("c", "float32", ["batch", O, H, W])],
              [Node("conv2d", "conv", ["x", "w"], ["c"], {"padding": [1, 1], "groups": 2})])
    path = str(tmp_path / "g.sparsedge")
    write_model(path, g, {"w": FORMATS["csr"].from_dense(w)}, {})
    m = read_model(path)
    feeds = {"x": rng.standard_normal((2, C, H, W)).astype(np.float32)}
    ref = list(run_reference(m, feeds).values())[0]
    y, rep, _ = _run(path, feeds, 1, None)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert all(NOTE not in r["why"] for r in rep), rep


@pytest.mark.parametrize("what", ["small_grid", "stem"])
def test_direct_gate_keeps_im2col(tmp_path, what):
    """Layers where the direct conv measured slower stay on im2col: 2x2 outputs (the batched layout
    computes 32 positions for 8 real ones, > 2x; the per-image grid is below one 4-vector tile) and
    a BSR weight with reduction depth C*kh*kw < 64 (3-channel stem; CSR stems run the per-plane kernel)."""
    rng = np.random.default_rng(11)
    kw = {"small_grid": dict(kind="csr", C=32, hw=(2, 2)),
          "stem": dict(kind=(8, 1), C=3, hw=(7, 30))}[what]
    kind = kw.pop("kind")
    path, osh = build(str(tmp_path / "m.sparsedge"), kind, pad=1, rng=rng, **kw)
    m, feeds = _feeds(path, 2, osh, rng)
    ref = list(run_reference(m, feeds).values())[0]
    y, rep, _ = _run(path, feeds, 1, "csr_f32_spmm" if kind == "csr" else "bsr8x1_f32_spmm")
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert rep and all(NOTE not in r["why"] for r in rep), rep


BATCHED = [  # kind, override, C, O, k, stride, pad, (H, W), residual[, sparsity]
    ("csr", "csr_f32_spmm", 16, 24, 3, 2, 1, (11, 12), None),          # strided (phase layout)
    ((8, 1), "bsr8x1_f32_spmm", 16, 16, 3, 1, 1, (8, 8), "relu"),       # small grid (old scalar tail)
    ((16, 1), "bsr16x1_f32_spmm", 64, 32, 1, 2, 0, (9, 9), None),       # 1x1 stride-2 downsample
    ("csr", "csr_f32_spmm", 32, 16, 3, 1, 1, (4, 4), "add"),            # 4x4 grid, residual
    ("csr", "csr_f32_spmm", 8, 16, 3, 1, 1, (7, 30), "relu", 0.95),     # < 16 weights per row: per-plane kernel
    ("csr", "csr_f32_spmm", 3, 16, 3, 1, 1, (12, 12), None, 0.8),       # CSR stem (K = 27): per-plane kernel
    ("csr", "csr_f32_spmm", 12, 16, 1, 1, 1, (7, 30), None),            # 1x1 padded: per-plane kernel
]


@pytest.mark.parametrize("case", BATCHED, ids=lambda c: "-".join(map(str, c)))
def test_batched_direct_path(tmp_path, case):
    """Batch 8: strided convs and small grids run the batched direct conv and match the reference."""
    kind, override, C, O, k, stride, pad, hw, residual = case[:9]
    rng = np.random.default_rng(13)
    path, osh = build(str(tmp_path / "m.sparsedge"), kind, C=C, O=O, k=k, pad=pad, stride=stride, act="relu",
                      residual=residual, rng=rng, hw=hw, sparsity=case[9] if len(case) > 9 else 0.85)
    m, feeds = _feeds(path, 8, osh, rng)
    ref = list(run_reference(m, feeds).values())[0]
    for threads in (1, 2):
        y, rep, _ = _run(path, feeds, threads, override)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        assert rep and all(r["kernel"] == override and NOTE in r["why"] for r in rep), rep
