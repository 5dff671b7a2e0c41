"""The transformer fast paths vs their numpy references: the fused attention kernel
(``kernels.nn.attention_heads``) on edge shapes, the Session's load-time fusions (attention core
into ``_attention``, residual add into the linear before it) against the unfused graph and the
reference interpreter, and the serial epilogue used per thread by the dense linear."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.kernels.nn import (attention_heads, attention_ref, bias_res_act_rows, bias_res_ln_rows,
                                  transpose2d, transpose_res_ln)
from sparsedge.runtime import Session
from sparsedge.runtime.reference import run_reference

F32 = np.float32
NO_MASK = np.zeros((0, 0), F32)


# --- attention_heads vs attention_ref -----------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,Sq,Sk,H,D", [
    (1, 1, 1, 1, 1),        # smallest
    (2, 5, 7, 3, 8),        # D below a vector: plain-loop P V
    (1, 13, 9, 2, 32),      # Sq % 4 != 0, Sk below one key block, Sq != Sk
    (3, 17, 33, 2, 16),     # key block remainder
    (2, 6, 6, 2, 48),       # D = 3 vectors on AVX-512 (2-vector tile + 1-vector tail)
    (2, 64, 64, 4, 32),     # several key blocks, tile-aligned
])
def test_attention_heads_matches_reference(B, Sq, Sk, H, D, threads, rng):
    q = rng.standard_normal((B, Sq, H * D)).astype(F32)
    k = rng.standard_normal((B, Sk, H * D)).astype(F32)
    v = rng.standard_normal((B, Sk, H * D)).astype(F32)
    mask = np.zeros((B, 1, 1, Sk), F32)
    mask[-1, ..., -max(1, Sk // 3):] = np.finfo(F32).min  # masked keys (finite, as HF BERT)
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for mk in (None, mask, mask[:1]):  # no mask, per-batch mask, one mask for all batches
            out = np.full((B, Sq, H * D), np.nan, F32)
            m2 = NO_MASK if mk is None else np.ascontiguousarray(mk).reshape(mk.shape[0], Sk)
            attention_heads(q.reshape(-1), k.reshape(-1), v.reshape(-1), m2, F32(0.3), out.reshape(-1),
                            B, Sq, Sk, H, D, H * D, H * D, 1, 1)
            ref = attention_ref(q, k, v, mk, 0.3, H)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    finally:
        numba.set_num_threads(old)


def test_attention_heads_row_strides(rng):
    """q, k, v as offset views of one [B, S, 3*H*D] array (the fused q|k|v linear output)."""
    B, S, H, D = 2, 11, 3, 16
    HD = H * D
    qkv = rng.standard_normal((B, S, 3 * HD)).astype(F32)
    mask = np.zeros((B, S), F32)
    mask[1, 7:] = -1e4
    out = np.empty((B, S, HD), F32)
    f = qkv.reshape(-1)
    attention_heads(f, f[HD:], f[2 * HD:], mask, F32(0.25), out.reshape(-1), B, S, S, H, D, 3 * HD, 3 * HD, 1, 1)
    q, k, v = (np.ascontiguousarray(qkv[..., i * HD:(i + 1) * HD]) for i in range(3))
    ref = attention_ref(q, k, v, mask[:, None, None, :], 0.25, H)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    # feature-major q|k|v [3*H*D, B*S] (a kernel-path fused linear's output)
    n = B * S
    g = np.ascontiguousarray(qkv.reshape(n, 3 * HD).T).reshape(-1)
    out2 = np.full_like(out, np.nan)
    attention_heads(g, g[HD * n:], g[2 * HD * n:], mask, F32(0.25), out2.reshape(-1), B, S, S, H, D, 1, 1, n, 1)
    np.testing.assert_allclose(out2, ref, rtol=1e-5, atol=2e-6)
    # feature-major output [H*D, B*S] (ocs = B*S), from both input layouts; D = 8 (not a vector
    # multiple: the plain loops) as well
    for Dx in (D, 8):
        HDx = H * Dx
        qkvx = qkv[..., :3 * HDx].copy() if Dx == D else rng.standard_normal((B, S, 3 * HDx)).astype(F32)
        qs, ks, vs = (np.ascontiguousarray(qkvx[..., i * HDx:(i + 1) * HDx]) for i in range(3))
        refx = attention_ref(qs, ks, vs, mask[:, None, None, :], 0.25, H)
        fx = qkvx.reshape(-1)
        gx = np.ascontiguousarray(qkvx.reshape(n, 3 * HDx).T).reshape(-1)
        for args in ((fx, fx[HDx:], fx[2 * HDx:], 3 * HDx, 3 * HDx, 1), (gx, gx[HDx * n:], gx[2 * HDx * n:], 1, 1, n)):
            o3 = np.full((HDx, n), np.nan, F32)
            attention_heads(args[0], args[1], args[2], mask, F32(0.25), o3.reshape(-1), B, S, S, H, Dx, args[3],
                            args[4], args[5], n)
            np.testing.assert_allclose(o3.T.reshape(B, S, HDx), refx, rtol=1e-5, atol=2e-6)


def test_attention_heads_special_rows(rng):
    B, S, H, D = 2, 6, 2, 16
    q = rng.standard_normal((B, S, H * D)).astype(F32)
    k = rng.standard_normal((B, S, H * D)).astype(F32)
    v = rng.standard_normal((B, S, H * D)).astype(F32)
    mask = np.zeros((B, S), F32)
    mask[0, :] = -np.inf          # batch 0: every key masked -> NaN rows (as torch)
    mask[1, 2] = -np.inf          # batch 1: one key -inf -> weight 0, rows finite
    out = np.empty((B, S, H * D), F32)
    attention_heads(q.reshape(-1), k.reshape(-1), v.reshape(-1), mask, F32(1.0), out.reshape(-1), B, S, S, H, D,
                    H * D, H * D, 1, 1)
    assert np.isnan(out[0]).all()
    ref = attention_ref(q, k, v, mask[:, None, None, :], 1.0, H)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=2e-6)
    q2 = q.copy()
    q2[1, 3, :D] = np.nan           # a NaN query of head 0 gives a NaN row there only
    attention_heads(q2.reshape(-1), k.reshape(-1), v.reshape(-1), mask, F32(1.0), out.reshape(-1), B, S, S, H, D,
                    H * D, H * D, 1, 1)
    assert np.isnan(out[1, 3, :D]).all() and np.isfinite(out[1, 3, D:]).all()
    assert np.isfinite(np.delete(out[1], 3, axis=0)).all()


def test_bias_res_act_rows(rng):
    from sparsedge.kernels.table import ACTIVATIONS

    y0 = rng.standard_normal((5, 7)).astype(F32)
    b = rng.standard_normal(7).astype(F32)
    r = rng.standard_normal((5, 7)).astype(F32)
    for act in ("none", "relu", "gelu"):
        for bb, rr in ((b, r), (b, None), (None, r), (None, None)):
            y = y0.copy()
            bias_res_act_rows(y, np.zeros(0, F32) if bb is None else bb, NO_MASK if rr is None else rr,
                              ACTIVATIONS[act], 0.0, 0.0)
            ref = y0 + (0 if bb is None else bb) + (0 if rr is None else rr)
            if act == "relu":
                ref = np.maximum(ref, 0)
            elif act == "gelu":
                from sparsedge.runtime.reference import gelu

                ref = gelu(ref.astype(F32))
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R,C", [(1, 1), (1, 40), (33, 1), (31, 65), (64, 96), (100, 37)])
def test_transpose2d(R, C, rng):
    x = rng.standard_normal((R, C)).astype(F32)
    a = rng.standard_normal((C, R)).astype(F32)
    y = np.full((C, R), np.nan, F32)
    transpose2d(x, y, NO_MASK)
    np.testing.assert_array_equal(y, x.T)
    transpose2d(x, y, a)
    np.testing.assert_array_equal(y, x.T + a)


def test_residual_layernorm_kernels(rng):
    from sparsedge.runtime.reference import layernorm

    for N, C in ((1, 1), (5, 7), (17, 48), (40, 33)):
        x = rng.standard_normal((C, N)).astype(F32) * 3 + 1
        a = rng.standard_normal((N, C)).astype(F32)
        w = rng.standard_normal(C).astype(F32)
        b = rng.standard_normal(C).astype(F32)
        bias = rng.standard_normal(C).astype(F32)
        e = np.zeros(0, F32)
        for ww, bb in ((w, b), (e, e)):
            ref = layernorm(x.T + a, ww if ww.size else None, bb if bb.size else None, 1e-5)
            y = np.full((N, C), np.nan, F32)
            transpose_res_ln(x, a, ww, bb, 1e-5, y)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5)
            y = np.ascontiguousarray(x.T)
            bias_res_ln_rows(y, bias, a, ww, bb, 1e-5)
            ref = layernorm(x.T + bias + a, ww if ww.size else None, bb if bb.size else None, 1e-5)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5)
        y = np.full((N, C), np.nan, F32)
        transpose_res_ln(x, NO_MASK, w, b, 1e-5, y)
        np.testing.assert_allclose(y, layernorm(x.T, w, b, 1e-5), rtol=1e-5, atol=2e-5)


# --- Session fusions on a small encoder layer ----------------------------------------------------
def _layer(nh, d, mask_shape="b11s", kinds=None, rng=None):
    """An encoder layer (q/k/v/o, masked softmax, FFN, residual adds) as (graph, tensors)."""
    H = nh * d
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(F32)  # noqa: E731
    w = {"wq": r(H, H), "bq": r(H), "wk": r(H, H), "bk": r(H), "wv": r(H, H), "bv": r(H), "wo": r(H, H),
         "bo": r(H), "lnw": 1 + r(H), "lnb": r(H), "wf1": r(2 * H, H), "bf1": r(2 * H), "wf2": r(H, 2 * H),
         "bf2": r(H), "scale": np.array([1 / np.sqrt(d)], F32), "one": np.array([1.0], F32),
         "neg": np.array([-1e4], F32)}
    n = Node
    mask_nodes = [n("cast", "mask_f", ["attention_mask"], ["m0"], {"dtype": "float32"}),
                  n("sub", "mask_inv", ["one", "m0"], ["m1"]),
                  n("mul", "mask_neg", ["m1", "neg"], ["m2"])]
    if mask_shape == "b11s":
        mask_nodes.append(n("unsqueeze", "mask_u", ["m2"], ["m3"], {"axes": [1, 2]}))
    else:  # [B, 1, S, 1]: a broadcast the fused kernel does not take (stays unfused)
        mask_nodes.append(n("unsqueeze", "mask_u", ["m2"], ["m3"], {"axes": [1, 3]}))
    nodes = mask_nodes + [
        n("linear", "q", ["x", "wq", "bq"], ["q0"]),
        n("linear", "k", ["x", "wk", "bk"], ["k0"]),
        n("linear", "v", ["x", "wv", "bv"], ["v0"]),
        n("reshape", "q_r", ["q0"], ["q1"], {"shape": ["batch", "seq", nh, d]}),
        n("reshape", "k_r", ["k0"], ["k1"], {"shape": ["batch", "seq", nh, d]}),
        n("reshape", "v_r", ["v0"], ["v1"], {"shape": ["batch", "seq", nh, d]}),
        n("transpose", "q_t", ["q1"], ["q2"], {"perm": [0, 2, 1, 3]}),
        n("transpose", "k_t", ["k1"], ["k2"], {"perm": [0, 2, 3, 1]}),
        n("transpose", "v_t", ["v1"], ["v2"], {"perm": [0, 2, 1, 3]}),
        n("matmul", "qk", ["q2", "k2"], ["s0"]),
        n("mul", "scale_s", ["s0", "scale"], ["s1"]),
        n("softmax", "softmax", ["s1", "m3"], ["pr"], {"axis": -1}),
        n("matmul", "pv", ["pr", "v2"], ["c0"]),
        n("transpose", "c_t", ["c0"], ["c1"], {"perm": [0, 2, 1, 3]}),
        n("reshape", "c_r", ["c1"], ["c2"], {"shape": ["batch", "seq", H]}),
        n("linear", "o", ["c2", "wo", "bo"], ["a0"]),
        n("add", "res1", ["x", "a0"], ["a1"]),
        n("layernorm", "ln1", ["a1", "lnw", "lnb"], ["x1"], {"eps": 1e-12}),
        n("linear", "ffn1", ["x1", "wf1", "bf1"], ["f0"], {"activation": "gelu"}),
        n("linear", "ffn2", ["f0", "wf2", "bf2"], ["f1"]),
        n("add", "res2", ["f1", "x1"], ["y"])]
    g = Graph([ValueInfo("x", "float32", ["batch", "seq", H]), ValueInfo("attention_mask", "int64", ["batch", "seq"])],
              [ValueInfo("y", "float32", ["batch", "seq", H])], nodes)
    t = {}
    for key, a in w.items():
        if kinds and key in kinds:
            from sparsedge.formats.base import FORMATS

            wd = a.copy()
            wd[rng.random(wd.shape) < 0.7] = 0
            t[key] = FORMATS[kinds[key]].from_dense(wd)
        else:
            t[key] = Dense.from_dense(a)
    return g, t


def _feeds(rng, B, S, H):
    mask = np.ones((B, S), np.int64)
    mask[-1, S // 2:] = 0
    return {"x": rng.standard_normal((B, S, H)).astype(F32), "attention_mask": mask}


@pytest.mark.parametrize("nh,d", [(2, 8), (2, 16), (3, 32)])
def test_session_fuses_attention_and_residuals(tmp_path, rng, monkeypatch, nh, d):
    g, t = _layer(nh, d, rng=rng)
    path = str(tmp_path / "l.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    ops = [n.op for n in s._exec.nodes]
    assert ops.count("_attention") == 1 and "softmax" not in ops and "matmul" not in ops
    assert "add" not in ops  # both residual adds folded into the linears before them
    assert "layernorm" not in ops  # ln1 folded into the o linear (after its residual)
    assert ops.count("linear") == 4  # q, k, v as one linear over stacked weights
    (att,) = [n for n in s._exec.nodes if n.op == "_attention"]
    assert att.attrs["qkv"] and att.inputs[1:3] == ["", ""]
    assert att.outputs[0] not in s._fm  # dense o-proj: BLAS in torch layout reads it
    monkeypatch.setenv("SPARSEDGE_NO_ATTENTION_FUSION", "1")
    s0 = Session(path, threads=2)
    assert "_attention" not in [n.op for n in s0._exec.nodes]
    for B, S in ((2, 9), (1, 4), (3, 16)):  # several shapes: Sq % 4 remainders, one batch
        f = _feeds(rng, B, S, nh * d)
        (y,) = s.run(None, f)
        (y0,) = s0.run(None, f)
        ref = run_reference(read_model(path), f)["y"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)


def test_session_attention_unfusable_mask_and_compressed(tmp_path, rng):
    g, t = _layer(2, 16, mask_shape="b1s1", rng=rng)
    path = str(tmp_path / "u.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    assert "_attention" not in [n.op for n in s._exec.nodes]  # [B, 1, S, 1] mask: left as it was
    f = _feeds(rng, 2, 8, 32)
    np.testing.assert_allclose(s.run(None, f)[0], run_reference(read_model(path), f)["y"], rtol=1e-4, atol=1e-4)
    # compressed q / o / ffn2 weights: residual fused on the kernel (feature-major) path too
    g, t = _layer(2, 16, rng=rng, kinds={"wq": "csr", "wo": "csr", "wf2": "csr"})
    path = str(tmp_path / "c.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2, profile=True)
    ops = [n.op for n in s._exec.nodes]
    assert "_attention" in ops and "add" not in ops
    for B, S in ((2, 8), (1, 5)):
        f = _feeds(rng, B, S, 32)
        np.testing.assert_allclose(s.run(None, f)[0], run_reference(read_model(path), f)["y"], rtol=1e-4, atol=1e-4)
    assert "_attention" in s.profile_report()
    assert not [n for n in s._exec.nodes if n.op == "_attention"][0].attrs.get("qkv")  # mixed kinds
    # the csr o-proj reads the attention output feature-major (written so, no transpose)
    assert [n for n in s._exec.nodes if n.op == "_attention"][0].outputs[0] in s._fm


@pytest.mark.parametrize("kind", ["csr", "csr_i8", "dense_i8"])
def test_session_qkv_fusion_compressed(tmp_path, rng, kind):
    """q, k, v of one compressed kind: stacked into one kernel-path linear; the result equals the
    unfused session's (same per-tensor activation quantization for int8: one input) and, for float
    kinds, the reference interpreter."""
    g, t = _layer(2, 16, rng=rng, kinds={"wq": kind, "wk": kind, "wv": kind})
    path = str(tmp_path / "k.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    (att,) = [n for n in s._exec.nodes if n.op == "_attention"]
    assert att.attrs.get("qkv") and att.inputs[0] in s._fm  # kernel path: q|k|v kept feature-major
    import os

    os.environ["SPARSEDGE_NO_ATTENTION_FUSION"] = "1"
    try:
        s0 = Session(path, threads=2)
    finally:
        del os.environ["SPARSEDGE_NO_ATTENTION_FUSION"]
    for B, S in ((2, 8), (1, 5)):
        f = _feeds(rng, B, S, 32)
        y, y0 = s.run(None, f)[0], s0.run(None, f)[0]
        np.testing.assert_allclose(y, y0, rtol=1e-4, atol=1e-4)
        if not kind.endswith("_i8"):
            np.testing.assert_allclose(y, run_reference(read_model(path), f)["y"], rtol=1e-4, atol=1e-4)
