"""Packed hand-off between batched direct sparse convs (runtime/ops/conv.py ``packed_value``): a conv
writes its output straight into its consumers' packed input layout (zero padding included, fused
epilogue in ``csr_conv_kpanel_ep``), residuals are read packed. Session outputs vs the numpy reference
interpreter and vs the same session with the hand-off off; the profile names the packed nodes."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedge.formats.base import FORMATS
from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.runtime import Session
from sparsedge.runtime.ops import conv as rconv
from sparsedge.runtime.reference import run_reference


def _w(rng, O, C, k, density=0.3):
    w = (rng.standard_normal((O, C, k, k)) * (1.0 / np.sqrt(C * k * k * density))).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0
    return FORMATS["csr"].from_dense(w)


def _model(path, rng, C, H, W, pool):
    """[stem conv ->] [maxpool ->] a: conv relu -> b: conv + x (residual) relu -> c: conv + b relu -> d: conv s2
    relu -> e: conv + dn(c) relu -> f: conv + e relu -> output (and h: 1x1 s2 of x2 + e). ResNet's block
    pattern: packed chains a->b->c (in, out and residual), c scattered into d's phase planes, d->e->f
    across the stride-2 layer, an NCHW residual into a packed output (b), the downsample dn computed
    with d, a residual reader with other positions (h) unpacking e."""
    t = {}
    nodes = []

    def conv(name, x, out, O, Cin, stride=1, act="relu", res=None):
        t[name + ".w"] = _w(rng, O, Cin, 3)
        t[name + ".b"] = Dense.from_dense((rng.standard_normal(O) * 0.1).astype(np.float32))
        attrs = {"padding": [1, 1], "dilation": [1, 1], "stride": [stride, stride],
                 "activation": act if res is None else "none"}
        if res is None:
            nodes.append(Node("conv2d", name, ["x" if x == "x" else x, name + ".w", name + ".b"], [out], attrs))
            return
        nodes.append(Node("conv2d", name, [x, name + ".w", name + ".b"], [out + "_c"], attrs))
        nodes.append(Node("add", name + ".add", [out + "_c", res], [out + "_s"], {}))
        nodes.append(Node("relu", name + ".relu", [out + "_s"], [out], {}))

    src = "x"
    Hc, Wc = H, W
    Cx = C
    if pool == "stem":  # a 3-channel stem conv (fused per-plane kernel) + relu, pooled by the conv itself
        Cx = 3
        conv("s", "x", "sr", C, 3)
        src = "sr"
    if pool:
        nodes.append(Node("maxpool2d", "pool", [src], ["p"], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}))
        src = "p"
        Hc, Wc = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    conv("a", src, "a", C, C)
    conv("b", "a", "b", C, C, res=src)
    conv("c", "b", "c", C, C, res="b")
    conv("d", "c", "d", 2 * C, C, stride=2)
    # dn: ResNet's 1x1 stride-2 downsample of the block input, added to e: computed with d (its center tap)
    t["dn.w"] = _w(rng, 2 * C, C, 1, 0.5)
    t["dn.b"] = Dense.from_dense((rng.standard_normal(2 * C) * 0.1).astype(np.float32))
    nodes.append(Node("conv2d", "dn", ["c", "dn.w", "dn.b"], ["dn"], {"padding": [0, 0], "dilation": [1, 1],
                                                                     "stride": [2, 2], "activation": "none"}))
    conv("e", "d", "e", 2 * C, 2 * C, res="dn")
    conv("f", "e", "f", 2 * C, 2 * C, res="e")
    # h: 1x1 stride 2 (im2col + GEMM path) reading the packed e as its residual: unpacked first
    t["h.w"] = _w(rng, 2 * C, C, 1, 0.5)
    nodes.append(Node("conv2d", "h", ["x2", "h.w"], ["h_c"], {"padding": [0, 0], "dilation": [1, 1],
                                                            "stride": [2, 2], "activation": "none"}))
    nodes.append(Node("add", "h.add", ["h_c", "e"], ["h"], {}))
    Ho, Wo = (Hc - 1) // 2 + 1, (Wc - 1) // 2 + 1
    g = Graph([ValueInfo("x", "float32", ["batch", Cx, H, W]), ValueInfo("x2", "float32", ["batch", C, Hc, Wc])],
              [ValueInfo("f", "float32", ["batch", 2 * C, Ho, Wo]),
               ValueInfo("h", "float32", ["batch", 2 * C, Ho, Wo])],
              nodes)
    write_model(path, g, t, {})
    return path


def _run(path, x, threads, overrides=None):
    s = Session(path, threads=threads, profile=True, kernel_overrides=overrides)
    try:
        y = s.run(None, x)
        y2 = s.run(None, x)  # a reused arena: stale data must not leak into the padding
        kern = {name: k for name, _, k, _ in s.last_profile}
        info = s.plan_info({k: v.shape for k, v in x.items()})
    finally:
        s.close()
    for a, b in zip(y, y2):
        np.testing.assert_array_equal(a, b)
    _run.info = info
    return y, kern


@pytest.mark.parametrize("C,H,W,batch,pool,h_kernel", [
    (16, 12, 10, 3, None, None),   # shared-padding layout (images one after the other)
    (16, 8, 8, 4, None, None),     # 8x8 -> 4x4: batch-innermost layouts
    (16, 15, 13, 2, "pool", "numpy_densified"),  # a maxpool first (NCHW residual into a packed output); h on BLAS
    (16, 18, 17, 2, "stem", None),  # stem conv + relu + maxpool fused, pooled output packed
])
def test_handoff_matches_reference(tmp_path, C, H, W, batch, pool, h_kernel):
    rng = np.random.default_rng(C + H + W + batch)
    path = _model(str(tmp_path / "m.sparsedge"), rng, C, H, W, pool)
    Hc, Wc = ((H - 1) // 2 + 1, (W - 1) // 2 + 1) if pool else (H, W)
    x = {"x": rng.standard_normal((batch, 3 if pool == "stem" else C, H, W)).astype(np.float32),
         "x2": rng.standard_normal((batch, C, Hc, Wc)).astype(np.float32)}
    ref = run_reference(read_model(path), x)
    ref = [ref["f"], ref["h"]]
    for threads in (1, 2):
        y, kern = _run(path, x, threads, {"h": h_kernel} if h_kernel else None)
        for a, b in zip(y, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert "packed out" in kern["a"] and "packed in" in kern["b"], kern
        assert "packed out" in kern["b"] and "packed in" in kern["c"], kern
        assert "packed out" in kern["d"] and "packed in" in kern["e"], kern
        assert "packed out" in kern["e"] and "packed in" in kern["f"], kern
        assert "packed out" not in kern["f"], kern  # graph output: NCHW
        # into d's phase planes from a batch-innermost layout (small grids), else crop + pack
        assert ("scattered out" in kern["c"]) == ("packed in" in kern["d"]), kern
        assert "scattered out" in kern["c"] or (H, W) != (8, 8), kern
        assert "unpack residual" in kern["h"], kern
        assert "with dn" in kern["d"] and "computed with d" in kern["dn"], kern
        if pool == "stem":
            assert "maxpool fused" in kern["s"] and "fused" in kern["pool"], kern
            assert "packed in" in kern["a"], kern
        # values handed over packed (and the stem conv's unpooled output) take no arena memory
        handed = set(_run.info["values_handed_over"])
        assert {"a", "b", "d", "e", "dn"} <= handed and not handed & {"f", "h"}, handed
        assert ({"sr", "p"} <= handed) == (pool == "stem"), handed
    info = _run.info
    try:
        rconv.HANDOFF = False
        y0, kern0 = _run(path, x, 2)
    finally:
        rconv.HANDOFF = True
    assert _run.info["values_handed_over"] == [], _run.info
    assert info["values_in_arena"] < _run.info["values_in_arena"], (info, _run.info)
    assert not any(w in k for k in kern0.values() for w in ("packed", "unpack", "scattered", "with ")), kern0
    for a, b in zip(y, y0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_handoff_off_for_other_consumers(tmp_path):
    """A value also read by a non-conv op (here the graph output itself) stays NCHW."""
    rng = np.random.default_rng(3)
    C, H, W = 16, 10, 10
    t = {"w1": _w(rng, C, C, 3), "w2": _w(rng, C, C, 3)}
    attrs = {"padding": [1, 1], "dilation": [1, 1], "stride": [1, 1], "activation": "relu"}
    nodes = [Node("conv2d", "c1", ["x", "w1"], ["a"], attrs), Node("conv2d", "c2", ["a", "w2"], ["b"], attrs),
             Node("add", "add", ["a", "b"], ["y"], {})]
    g = Graph([ValueInfo("x", "float32", ["batch", C, H, W])], [ValueInfo("y", "float32", ["batch", C, H, W])],
              nodes)
    path = str(tmp_path / "m.sparsedge")
    write_model(path, g, t, {})
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    ref = list(run_reference(read_model(path), {"x": x}).values())[0]
    y, kern = _run(path, {"x": x}, 2)
    np.testing.assert_allclose(y[0], ref, rtol=1e-4, atol=1e-4)
    assert "packed out" not in kern["c1"], kern
