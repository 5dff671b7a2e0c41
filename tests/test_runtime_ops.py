"""Every op of the table, one node at a time: Session (planned buffers, kernels) vs the numpy
reference interpreter, and the reference vs torch (when installed) for the ops with subtle
semantics (pooling ceil_mode / padding, dilation, depthwise multipliers, gelu, layernorm)."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedge.formats.dense import Dense
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model
from sparsedge.formats import optable
from sparsedge.runtime import Session
from sparsedge.runtime.reference import run_reference

F32 = np.float32


def run_one(tmp_path, op, feeds, consts=None, attrs=None, inputs=None, sym=False):
    """Build a one-node graph (inputs = feeds then consts, in order) and run it both ways."""
    consts = consts or {}
    names = inputs or (list(feeds) + list(consts))
    g_in = [ValueInfo(k, "bool" if v.dtype == np.bool_ else str(v.dtype),
                      ["n"] + list(v.shape[1:]) if sym else list(v.shape)) for k, v in feeds.items()]
    g = Graph(g_in, [ValueInfo("y", "float32", [])], [Node(op, "node", names, ["y"], attrs or {})])
    from sparsedge.runtime.shapes import infer

    t = {k: Dense.from_dense(v) for k, v in consts.items()}
    t.setdefault("_unused", Dense.from_dense(np.zeros(1, F32)))
    sh = infer(g, t, {k: v.shape for k, v in feeds.items()})
    g.outputs = [ValueInfo("y", sh.dtypes["y"], list(sh.shapes["y"]))]
    path = str(tmp_path / f"{op}.sparsedge")
    write_model(path, g, t, {})
    s = Session(path, threads=2)
    (y,) = s.run(None, feeds)
    ref = run_reference(read_model(path), feeds)["y"]
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert y.dtype == ref.dtype, (y.dtype, ref.dtype)
    return y, ref


def r(rng, *shape, lo=None):
    a = rng.standard_normal(shape).astype(F32)
    return np.abs(a) + lo if lo is not None else a


UNARY = ["relu", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "exp", "neg", "erf"]


@pytest.mark.parametrize("op", UNARY + ["sqrt", "rsqrt"])
def test_unary(tmp_path, rng, op):
    x = r(rng, 3, 5, 7, lo=0.1) if op in ("sqrt", "rsqrt") else r(rng, 3, 5, 7) * 3
    y, ref = run_one(tmp_path, op, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_gelu_tanh(tmp_path, rng):
    y, ref = run_one(tmp_path, "gelu", {"x": r(rng, 4, 9) * 3}, attrs={"approximate": "tanh"})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
@pytest.mark.parametrize("bshape", [(1,), (5,), (3, 1)])
def test_binary_broadcast(tmp_path, rng, op, bshape):
    a = r(rng, 3, 5, lo=0.5) if op == "pow" else r(rng, 3, 5)
    b = r(rng, *bshape, lo=0.5)
    y, ref = run_one(tmp_path, op, {"a": a}, {"b": b})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_mixed_dtype_binary(tmp_path, rng):
    a = rng.integers(0, 3, (2, 4)).astype(np.int64)
    y, ref = run_one(tmp_path, "mul", {"a": a}, {"b": np.array([-1e4], F32)})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, None), (None, 0.5)])
def test_clamp(tmp_path, rng, lo, hi):
    y, ref = run_one(tmp_path, "clamp", {"x": r(rng, 4, 6) * 4}, attrs={"min": lo, "max": hi})
    np.testing.assert_array_equal(y, ref)


def test_cast_where(tmp_path, rng):
    ids = rng.integers(0, 2, (3, 4)).astype(np.int64)
    y, ref = run_one(tmp_path, "cast", {"x": ids}, attrs={"dtype": "float32"})
    np.testing.assert_array_equal(y, ref)
    c = rng.random((3, 4)) < 0.5
    y, ref = run_one(tmp_path, "where", {"c": c, "a": r(rng, 3, 4)}, {"b": r(rng, 4)})
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("op,attrs,shape", [
    ("reshape", {"shape": [-1, 6]}, (2, 3, 4)),
    ("reshape", {"shape": ["n", 12]}, (2, 3, 4)),
    ("flatten", {"start": 1}, (2, 3, 4)),
    ("transpose", {"perm": [2, 0, 1]}, (2, 3, 4)),
    ("squeeze", {"axes": [1]}, (2, 1, 4)),
    ("unsqueeze", {"axes": [0, 3]}, (2, 3, 4)),
    ("slice", {"axis": 2, "start": 1, "end": None, "step": 2}, (2, 3, 5)),
    ("slice", {"axis": 1, "start": -2, "end": 3}, (2, 4, 5)),
    ("expand", {"shape": [2, -1, 3, 4]}, (1, 1, 4)),
    ("reduce_sum", {"axes": [1], "keepdim": True}, (2, 3, 4)),
    ("reduce_mean", {"axes": [0, 2]}, (2, 3, 4)),
    ("softmax", {"axis": 1}, (2, 3, 4)),
    ("layernorm", {"eps": 1e-5}, (2, 3, 4)),
    ("l2norm", {"axis": -1}, (2, 3, 4)),
    ("global_avgpool", {"keepdim": False}, (2, 3, 4, 5)),
])
def test_shape_and_reduction_ops(tmp_path, rng, op, attrs, shape):
    y, ref = run_one(tmp_path, op, {"x": r(rng, *shape)}, attrs=attrs, sym=op == "reshape")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_concat(tmp_path, rng):
    y, ref = run_one(tmp_path, "concat", {"a": r(rng, 2, 3), "b": r(rng, 2, 5)}, {"c": r(rng, 2, 1)}, {"axis": 1})
    np.testing.assert_array_equal(y, ref)


def test_matmul_batched_broadcast(tmp_path, rng):
    y, ref = run_one(tmp_path, "matmul", {"a": r(rng, 2, 3, 4, 5)}, {"b": r(rng, 5, 6)})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_masked_mean_all_zero_mask(tmp_path, rng):
    m = np.zeros((2, 4), np.int64)
    m[0, :2] = 1
    y, ref = run_one(tmp_path, "masked_mean", {"x": r(rng, 2, 4, 3), "m": m})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert np.all(y[1] == 0)


POOLS = [
    ("maxpool2d", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}),
    ("maxpool2d", {"kernel": [2, 2], "stride": [2, 2], "ceil_mode": True}),
    ("maxpool2d", {"kernel": [3, 2], "stride": [1, 2], "dilation": [2, 1], "padding": [1, 0]}),
    ("avgpool2d", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}),
    ("avgpool2d", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "count_include_pad": False}),
    ("avgpool2d", {"kernel": [2, 2], "stride": [2, 2], "ceil_mode": True}),
    ("avgpool2d", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True,
                   "count_include_pad": False}),
]


@pytest.mark.parametrize("op,attrs", POOLS)
def test_pooling(tmp_path, rng, op, attrs):
    x = r(rng, 2, 3, 7, 9)
    y, ref = run_one(tmp_path, op, {"x": x}, attrs=attrs)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a = optable.with_defaults(op, attrs)
    t = torch.from_numpy(x)
    if op == "maxpool2d":
        ty = F.max_pool2d(t, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    else:
        ty = F.avg_pool2d(t, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-5, atol=1e-6)


CONVS = [
    dict(w=(6, 3, 3, 3), attrs={"padding": [1, 1]}),
    dict(w=(6, 3, 3, 3), attrs={"stride": [2, 2], "dilation": [2, 2], "padding": [2, 1], "activation": "silu"}),
    dict(w=(6, 3, 1, 1), attrs={"activation": "hardswish"}),
    dict(w=(6, 3, 1, 1), attrs={"stride": [2, 2]}),
    dict(w=(6, 1, 3, 3), attrs={"groups": 3, "padding": [1, 1], "activation": "relu6"}),  # depthwise x2
    dict(w=(3, 1, 5, 5), attrs={"groups": 3, "padding": [2, 2], "stride": [2, 2]}),
    dict(w=(6, 1, 3, 3), attrs={"groups": 3, "padding": [1, 1]}, bias=False),
]


@pytest.mark.parametrize("case", CONVS)
def test_conv2d(tmp_path, rng, case):
    x = r(rng, 2, 3, 8, 7)
    w = r(rng, *case["w"])
    b = r(rng, case["w"][0])
    consts = {"w": w.reshape(w.shape[0], -1)}
    if case.get("bias", True):
        consts["b"] = b
    g_in = {"x": x}
    path_consts = {k: v for k, v in consts.items()}
    # the weight needs orig_shape: build it with as_2d
    from sparsedge.formats.dense import Dense as Dn

    t = {"w": Dn.from_dense(w, as_2d=True)}
    if "b" in consts:
        t["b"] = Dn.from_dense(b)
    inputs = ["x", "w"] + (["b"] if "b" in consts else [])
    g = Graph([ValueInfo("x", "float32", list(x.shape))], [ValueInfo("y", "float32", [])],
              [Node("conv2d", "node", inputs, ["y"], case["attrs"])])
    from sparsedge.runtime.shapes import infer

    g.outputs = [ValueInfo("y", "float32", infer(g, t, {"x": x.shape}).shapes["y"])]
    path = str(tmp_path / "conv.sparsedge")
    write_model(path, g, t, {})
    (y,) = Session(path, threads=2).run(None, g_in)
    ref = run_reference(read_model(path), g_in)["y"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a = optable.with_defaults("conv2d", case["attrs"])
    ty = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if "b" in consts else None,
                  a["stride"], a["padding"], a["dilation"], a["groups"])
    act = {"none": lambda v: v, "silu": F.silu, "hardswish": F.hardswish, "relu6": F.relu6}[a["activation"]]
    np.testing.assert_allclose(y, act(ty).numpy(), rtol=1e-4, atol=1e-5)
    del path_consts


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "gelu", "gelu_tanh", "silu", "hardswish", "sigmoid"])
def test_linear_activations(tmp_path, rng, act):
    y, ref = run_one(tmp_path, "linear", {"x": r(rng, 2, 3, 8)}, {"w": r(rng, 5, 8), "b": r(rng, 5)},
                     attrs={"activation": act})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_layernorm_and_gelu_match_torch(rng):
    torch = pytest.importorskip("torch")
    from sparsedge.runtime.reference import REF

    x = r(rng, 3, 10) * 3
    w, b = r(rng, 10), r(rng, 10)
    ln = REF["layernorm"]({"eps": 1e-5, "axis": -1}, x, w, b)
    tl = torch.nn.functional.layer_norm(torch.from_numpy(x), (10,), torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(ln, tl.numpy(), rtol=1e-5, atol=1e-5)
    for ap in ("none", "tanh"):
        g = REF["gelu"]({"approximate": ap}, x)
        np.testing.assert_allclose(g, torch.nn.functional.gelu(torch.from_numpy(x), approximate=ap).numpy(),
                                   rtol=1e-5, atol=1e-6)
