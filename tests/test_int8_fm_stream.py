"""A transformer's residual stream kept feature-major between layers (``rewrite_bert.
_feature_major_values`` residual-stream values; ``runtime/ops/linear.py`` reading the fused
residual feature-major and running the fused layernorm over the feature axis,
``kernels.epilogue.layernorm_fm``): the feature-major layernorm against its numpy reference on
edge shapes, and two stacked encoder layers with compressed weights against the reference
interpreter (float csr) and against the same session with the residual stream in torch layout
(int8: the same quantized integers up to float rounding of the layernorm)."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from sparsedge.formats.base import FORMATS
from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.kernels.epilogue import act_minmax, act_ref, layernorm_fm, layernorm_fm_ref
from sparsedge.runtime import Session
from sparsedge.runtime import session as _session
from sparsedge.runtime.reference import run_reference

F32 = np.float32


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C,N", [(1, 1), (7, 63), (32, 64), (48, 130), (384, 200)])
def test_layernorm_fm(C, N, threads, rng):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    numba.set_num_threads(threads)
    try:
        y0 = (rng.standard_normal((C, N)) * 3 + 1).astype(F32)
        w = (1 + rng.standard_normal(C)).astype(F32)
        b = rng.standard_normal(C).astype(F32)
        e = np.zeros(0, F32)
        for ww, bb in ((w, b), (w, e), (e, b), (e, e)):
            y = y0.copy()
            lo, hi = layernorm_fm(y, ww, bb, 1e-5)
            np.testing.assert_allclose(y, layernorm_fm_ref(y0, ww, bb, 1e-5), rtol=1e-5, atol=2e-5)
            assert (np.float32(lo), np.float32(hi)) == (min(y.min(), 0), max(y.max(), 0))  # exact
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("threads", [1, 2])
def test_act_minmax(threads, rng):
    """act_minmax: the activation in place and the exact (min(min, 0), max(max, 0)) of the result,
    over chunk remainders, an all-positive and an all-negative input."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    numba.set_num_threads(threads)
    try:
        for n, shift in ((1, 0.0), (4095, 0.0), (4097, 3.0), (3 * 4096 + 17, -5.0), (20000, 0.0)):
            x = (rng.standard_normal(n) * 2 + shift).astype(F32)
            x[n // 2] = 9.5
            for act in (0, 1, 3):
                y = x.copy()
                lo, hi = act_minmax(y, act, F32(0), F32(0))
                np.testing.assert_allclose(y, act_ref(x, act), rtol=1e-5, atol=2e-6)
                assert (np.float32(lo), np.float32(hi)) == (min(y.min(), 0), max(y.max(), 0))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def _encoder(nh, d, layers, kind, rng, ln0=False):
    """`layers` post-LN encoder layers (q/k/v/o, masked softmax, gelu FFN, residual + layernorm
    after attention and after the FFN) with `kind` weights, as (graph, tensors); ln0: a layernorm
    on the input first (BERT's embedding layernorm)."""
    H = nh * d
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(F32)  # noqa: E731
    t = {"scale": Dense.from_dense(np.array([1 / np.sqrt(d)], F32)), "one": Dense.from_dense(np.array([1.0], F32)),
         "neg": Dense.from_dense(np.array([-1e4], F32))}
    n = Node
    nodes = [n("cast", "mask_f", ["attention_mask"], ["m0"], {"dtype": "float32"}),
             n("sub", "mask_inv", ["one", "m0"], ["m1"]),
             n("mul", "mask_neg", ["m1", "neg"], ["m2"]),
             n("unsqueeze", "mask_u", ["m2"], ["m3"], {"axes": [1, 2]})]
    x = "x"
    extra = []
    if ln0:
        t["ln0w"] = Dense.from_dense(1 + r(H))
        t["ln0b"] = Dense.from_dense(r(H))
        x0 = "x"
        if ln0 in ("adds", "adds_mid"):  # BERT's embedding sum: x + pos (input) + type (constant)
            pshape = [1, "seq", H] if ln0 == "adds" else ["batch", 1, H]  # adds_mid: numpy's adds
            extra = [ValueInfo("pos", "float32", pshape)]
            t["typ"] = Dense.from_dense(r(H))
            nodes += [n("add", "add_pos", ["x", "pos"], ["s1"]), n("add", "add_typ", ["s1", "typ"], ["s2"])]
            x0 = "s2"
        nodes.append(n("layernorm", "ln0", [x0, "ln0w", "ln0b"], ["x_ln"], {"eps": 1e-12}))
        x = "x_ln"
    for i in range(layers):
        p = f"l{i}."
        for wn, shp in (("wq", (H, H)), ("wk", (H, H)), ("wv", (H, H)), ("wo", (H, H)), ("wf1", (2 * H, H)),
                        ("wf2", (H, 2 * H))):
            wd = r(*shp)
            wd[rng.random(shp) < 0.7] = 0
            t[p + wn] = FORMATS[kind].from_dense(wd)
        for bn, m in (("bq", H), ("bk", H), ("bv", H), ("bo", H), ("bf1", 2 * H), ("bf2", H), ("lnb1", H),
                      ("lnb2", H)):
            t[p + bn] = Dense.from_dense(r(m))
        t[p + "lnw1"] = Dense.from_dense(1 + r(H))
        t[p + "lnw2"] = Dense.from_dense(1 + r(H))
        v = lambda s: p + s  # noqa: E731
        nodes += [
            n("linear", v("q"), [x, v("wq"), v("bq")], [v("q0")]),
            n("linear", v("k"), [x, v("wk"), v("bk")], [v("k0")]),
            n("linear", v("v"), [x, v("wv"), v("bv")], [v("v0")]),
            n("reshape", v("q_r"), [v("q0")], [v("q1")], {"shape": ["batch", "seq", nh, d]}),
            n("reshape", v("k_r"), [v("k0")], [v("k1")], {"shape": ["batch", "seq", nh, d]}),
            n("reshape", v("v_r"), [v("v0")], [v("v1")], {"shape": ["batch", "seq", nh, d]}),
            n("transpose", v("q_t"), [v("q1")], [v("q2")], {"perm": [0, 2, 1, 3]}),
            n("transpose", v("k_t"), [v("k1")], [v("k2")], {"perm": [0, 2, 3, 1]}),
            n("transpose", v("v_t"), [v("v1")], [v("v2")], {"perm": [0, 2, 1, 3]}),
            n("matmul", v("qk"), [v("q2"), v("k2")], [v("s0")]),
            n("mul", v("scale_s"), [v("s0"), "scale"], [v("s1")]),
            n("softmax", v("softmax"), [v("s1"), "m3"], [v("pr")], {"axis": -1}),
            n("matmul", v("pv"), [v("pr"), v("v2")], [v("c0")]),
            n("transpose", v("c_t"), [v("c0")], [v("c1")], {"perm": [0, 2, 1, 3]}),
            n("reshape", v("c_r"), [v("c1")], [v("c2")], {"shape": ["batch", "seq", H]}),
            n("linear", v("o"), [v("c2"), v("wo"), v("bo")], [v("a0")]),
            n("add", v("res1"), [x, v("a0")], [v("a1")]),
            n("layernorm", v("ln1"), [v("a1"), v("lnw1"), v("lnb1")], [v("x1")], {"eps": 1e-12}),
            n("linear", v("ffn1"), [v("x1"), v("wf1"), v("bf1")], [v("f0")], {"activation": "gelu"}),
            n("linear", v("ffn2"), [v("f0"), v("wf2"), v("bf2")], [v("f1")]),
            n("add", v("res2"), [v("f1"), v("x1")], [v("f2")]),
            n("layernorm", v("ln2"), [v("f2"), v("lnw2"), v("lnb2")], [v("y")], {"eps": 1e-12})]
        x = v("y")
    g = Graph([ValueInfo("x", "float32", ["batch", "seq", H]), ValueInfo("attention_mask", "int64", ["batch", "seq"])]
              + extra,
              [ValueInfo(x, "float32", ["batch", "seq", H])], nodes)
    return g, t


def _torch_layout_stream(monkeypatch):
    """Session._feature_major_values without the residual-stream values (the previous layout)."""
    orig = _session._feature_major_values

    def fmv(graph, tensors=None):
        fm = orig(graph, tensors)
        res = {n.outputs[0] for n in graph.nodes if n.op == "linear" and n.attrs.get("_residual")}
        return fm - res

    monkeypatch.setattr(_session, "_feature_major_values", fmv)


@pytest.mark.parametrize("kind", ["csr", "csr_i8"])
def test_residual_stream_feature_major(tmp_path, rng, monkeypatch, kind):
    g, t = _encoder(2, 16, 2, kind, rng)
    path = str(tmp_path / "e.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    lins = {n.name: n for n in s._exec.nodes if n.op == "linear"}
    assert "layernorm" not in [n.op for n in s._exec.nodes]  # both layernorms folded into linears
    # inside the stack: o-proj / ffn2 outputs feature-major; the last one (graph output) not
    assert lins["l0.o"].outputs[0] in s._fm and lins["l1.o"].outputs[0] in s._fm
    assert lins["l0.ffn2"].outputs[0] in s._fm and lins["l1.ffn2"].outputs[0] not in s._fm
    s1 = Session(path, threads=2)  # int8: the min / max hand-off off (each quantization its own pass)
    for op in s1._ops:
        if hasattr(op, "mm_in"):
            op.mm_in = False
    _torch_layout_stream(monkeypatch)
    s0 = Session(path, threads=2)
    assert lins["l0.o"].outputs[0] not in s0._fm
    model = read_model(path)
    given = []
    if kind == "csr_i8":  # which quantizations got their min / max from the producer's epilogue
        from sparsedge.kernels import int8 as K8

        orig = K8._groups_vnni

        def gv(*a):  # the fused call: a[6] = the given (min, max) or empty, a[7] = dynamic quantization
            if a[7]:
                given.append(a[6].shape[0] == 2)
            return orig(*a)

        monkeypatch.setattr(K8, "_groups_vnni", gv)
    for B, S in ((2, 8), (1, 5), (3, 33)):
        mask = np.ones((B, S), np.int64)
        mask[-1, S // 2:] = 0
        f = {"x": rng.standard_normal((B, S, 32)).astype(F32), "attention_mask": mask}
        given.clear()
        y = s.run(None, f)[0]
        # l0.ffn1 (after the layernorm), l0.ffn2 (after gelu), l1 q|k|v, l1.ffn1, l1.ffn2; not the
        # first q|k|v (graph input) nor the o-projs (attention output: its min / max pass is ~0.02 ms
        # at BERT-small; taken inside the attention kernel it cost 0.07 ms)
        assert given == ([] if kind == "csr" else [False, False, True, True, True, False, True, True])
        y0 = s0.run(None, f)[0]
        assert np.array_equal(y, s1.run(None, f)[0])  # the handed-over min / max are exact
        if kind == "csr":
            np.testing.assert_allclose(y, run_reference(model, f)[g.outputs[0].name], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
        else:  # the layernorm's float order differs: a rare quantization step may flip downstream
            np.testing.assert_allclose(y, y0, rtol=2e-3, atol=2e-3)
            assert np.mean(np.abs(y - y0) < 1e-5) > 0.99


@pytest.mark.parametrize("kind,ln0", [("csr", True), ("csr_i8", True), ("csr", "adds"), ("csr_i8", "adds"),
                                       ("csr", "adds_mid")])
def test_input_layernorm_feature_major(tmp_path, rng, monkeypatch, kind, ln0):
    """A layernorm read only by kernel-path linears (x of the first q|k|v, fused residual of the
    first o-proj) writes [C, N] (row layernorm, then a transpose): the same output, bit for bit,
    as the layernorm in torch layout (the linears transposing it), and as the reference. With
    adds before it (BERT's embedding sum) they fold into it (``_layernorm_add``; position added per
    token: the parallel kernel, bit for bit numpy's adds (test_add_rows_bcast); per batch: numpy's
    adds), against the session without the layernorm fusions."""
    g, t = _encoder(2, 16, 1, kind, rng, ln0=ln0)
    path = str(tmp_path / "e.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    ops = [n.op for n in s._exec.nodes]
    assert "x_ln" in s._fm and ("layernorm" if ln0 is True else "_layernorm_add") in ops
    assert "add" not in ops
    orig_fus = _session._fuse_residual_layernorm
    monkeypatch.setattr(_session, "_fuse_residual_layernorm", lambda nodes, *a: nodes)
    su = Session(path, threads=2)  # no layernorm fusions at all: the adds and layernorm as stored
    assert "add" in [n.op for n in su._exec.nodes] or ln0 is True
    monkeypatch.setattr(_session, "_fuse_residual_layernorm", orig_fus)
    orig_fmv = _session._feature_major_values
    monkeypatch.setattr(_session, "_feature_major_values", lambda gr, tn=None: orig_fmv(gr, tn) - {"x_ln"})
    s0 = Session(path, threads=2)
    assert "x_ln" not in s0._fm
    model = read_model(path)
    from sparsedge.kernels import nn as _nn

    used = []
    orig_arb = _nn.add_rows_bcast
    monkeypatch.setattr(_nn, "add_rows_bcast", lambda *a: (used.append(1), orig_arb(*a)))
    for B, S in ((2, 8), (1, 1), (3, 33)):
        mask = np.ones((B, S), np.int64)
        mask[-1, (S + 1) // 2:] = 0
        f = {"x": rng.standard_normal((B, S, 32)).astype(F32), "attention_mask": mask}
        if ln0 == "adds":
            f["pos"] = rng.standard_normal((1, S, 32)).astype(F32)
        elif ln0 == "adds_mid":
            f["pos"] = rng.standard_normal((B, 1, 32)).astype(F32)
        y = s.run(None, f)[0]
        assert np.array_equal(y, s0.run(None, f)[0])
        # the parallel adds (s and s0) when the position addend broadcasts over leading axes only
        kern = ln0 == "adds" or (ln0 == "adds_mid" and B == 1)
        assert len(used) == (2 if kern else 0), (B, S)
        used.clear()
        if ln0 is not True and kind == "csr":  # (int8: the unfused residual layernorms differ in float order)
            ref_unfused = su.run(None, f)[0]
            np.testing.assert_allclose(y, ref_unfused, rtol=1e-5, atol=1e-5)
        if kind == "csr":
            np.testing.assert_allclose(y, run_reference(model, f)[g.outputs[0].name], rtol=1e-4, atol=1e-4)
