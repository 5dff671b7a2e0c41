"""Model file: write/read round trips (bit-exact, zero-copy), versions, features, atomic writes, graph checks,
and ``sparsedge inspect``."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _formats_util import linear_graph, one_of_each, rebuild, split
from sparsedge.cli import main as cli_main
from sparsedge.errors import FormatError, ModelFileError, UnsupportedOpError, UnsupportedOpInFileError
from sparsedge.formats import CSR, Dense
from sparsedge.formats import modelfile as mfmod
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.graphcheck import check_graph
from sparsedge.formats.modelfile import read_model, write_model

META = {"source": "unit test", "recipe": {"prune": 0.7}, "layers": {"csr": {"sparsity": np.float64(0.7)}}}


def sample(tmp_path, name="m.sparsedge"):
    ts = one_of_each()
    g = linear_graph(ts)
    g.inputs.append(ValueInfo("img", "float32", ["batch", 3, 8, 8]))
    g.nodes.append(Node("conv2d", "conv", ["img", "conv_csr", ""], ["z"], {"padding": [1, 1], "groups": 1}))
    g.outputs.append(ValueInfo("z", "float32", ["batch", 8, 8, 8]))
    p = tmp_path / name
    size = write_model(p, g, ts, META)
    assert size == p.stat().st_size
    return p, g, ts


@pytest.mark.parametrize("use_mmap", [True, False])
def test_roundtrip_bit_exact_and_zero_copy(tmp_path, use_mmap):
    p, g, ts = sample(tmp_path)
    with read_model(p, mmap=use_mmap) as mf:
        assert mf.version == (mfmod.MAJOR, mfmod.MINOR)
        assert set(mf.tensors) == set(ts)
        assert mf.metadata == {"source": "unit test", "recipe": {"prune": 0.7}, "layers": {"csr": {"sparsity": 0.7}}}
        assert mf.graph.to_json() == check_graph(g, tensors=ts).to_json()
        assert mf.graph.act_quant == {"x": {"scale": 0.05, "zero_point": 3, "dtype": "int8"}}
        base = mf._buf
        if use_mmap:
            assert isinstance(base, np.memmap)
        for name, t in ts.items():
            r = mf.tensors[name]
            assert r.kind == t.kind and r.shape == t.shape and r.orig_shape == t.orig_shape and r.name == name
            if t.kind == "dense" and t.dtype in ("float16", "bfloat16"):
                # widened at load: the only copy the reader makes
                assert r.values.dtype == np.float32 and r.stored_dtype == t.dtype
                np.testing.assert_array_equal(r.values, t.to_dense())
                assert not np.shares_memory(r.values, base)
                continue
            assert r.meta() == t.meta()
            for an, a in t.arrays().items():
                b = r.arrays()[an]
                assert b.dtype == a.dtype and b.shape == a.shape
                assert a.tobytes() == b.tobytes()  # bit-exact
                assert not b.flags.writeable
                if b.nbytes:
                    assert np.shares_memory(b, base), (name, an)  # a view into the map, not a copy
                    assert (b.ctypes.data - base.ctypes.data) % 64 == 0
            np.testing.assert_array_equal(r.to_dense(), t.to_dense())
    assert mf.tensors == {}


def test_features_and_header(tmp_path):
    p, _, _ = sample(tmp_path)
    _, h, _ = split(p.read_bytes())
    assert h["required_features"] == sorted(
        ["act_quant", "dtype:bfloat16", "dtype:float16", "format:bsr", "format:bsr_i8", "format:csr",
         "format:csr_i8", "format:dense", "format:dense_i8", "format:lowrank", "format:nm"])
    assert all(a["offset"] % 64 == 0 for t in h["tensors"] for a in t["arrays"].values())


def test_checksums_detect_corruption_and_can_be_skipped(tmp_path):
    p, _, ts = sample(tmp_path)
    _, h, _ = split(p.read_bytes())
    ent = next(t for t in h["tensors"] if t["name"] == "dense_f32")
    blob = bytearray(p.read_bytes())
    _, _, data = split(bytes(blob))
    d0 = len(blob) - len(data)
    at = d0 + ent["arrays"]["values"]["offset"]
    blob[at] ^= 0x40  # flip a bit of a float value: still a valid file apart from its checksum
    p.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="checksum") as ei:
        read_model(p)
    assert ei.value.tensor == "dense_f32"
    mf = read_model(p, verify_checksums=False)
    assert not np.array_equal(mf.tensors["dense_f32"].values, ts["dense_f32"].values)
    mf.close()


def test_versions(tmp_path, monkeypatch):
    p, _, _ = sample(tmp_path)
    _, h, data = split(p.read_bytes())
    # an older minor of our major loads (pretend this reader is 1.3)
    monkeypatch.setattr(mfmod, "MINOR", 3)
    read_model(p).close()
    # a newer minor of our major loads too: minors only add what old readers may ignore;
    # anything a reader must understand is a required feature
    h2 = dict(h, version=[mfmod.MAJOR, 7], future_key={"x": 1})
    q = tmp_path / "minor.sparsedge"
    q.write_bytes(rebuild(h2, data, minor=7))
    assert read_model(q).version == (mfmod.MAJOR, 7)
    h3 = dict(h, version=[mfmod.MAJOR + 1, 0])
    q.write_bytes(rebuild(h3, data, major=mfmod.MAJOR + 1, minor=0))
    with pytest.raises(ModelFileError, match="newer than this reader") as ei:
        read_model(q)
    assert ei.value.field == "version" and str(q) in str(ei.value)
    q.write_bytes(rebuild(dict(h, version=[0, 9]), data, major=0, minor=9))
    with pytest.raises(ModelFileError, match="old major"):
        read_model(q)


def test_unknown_required_feature(tmp_path):
    p, _, _ = sample(tmp_path)
    _, h, data = split(p.read_bytes())
    h["required_features"].append("sparse_attention_v2")
    q = tmp_path / "feat.sparsedge"
    q.write_bytes(rebuild(h, data))
    with pytest.raises(ModelFileError, match="sparse_attention_v2"):
        read_model(q)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    ts = {"w": CSR.from_dense(np.eye(4, dtype=np.float32))}
    g = Graph([ValueInfo("x", "float32", [1, 4])], [ValueInfo("y", "float32", [1, 4])],
              [Node("linear", "l", ["x", "w"], ["y"])])
    p = tmp_path / "a.sparsedge"
    calls = []

    def boom(fd):
        calls.append(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(mfmod.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        write_model(p, g, ts)
    assert calls and list(tmp_path.iterdir()) == []  # neither the output nor a temp file
    monkeypatch.undo()
    write_model(p, g, ts)
    old = p.read_bytes()
    monkeypatch.setattr(mfmod.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        write_model(p, g, {"w": CSR.from_dense(2 * np.eye(4, dtype=np.float32))})
    assert p.read_bytes() == old and sorted(x.name for x in tmp_path.iterdir()) == ["a.sparsedge"]


def test_writer_validates(tmp_path):
    p = tmp_path / "bad.sparsedge"
    w = CSR.from_dense(np.eye(4, dtype=np.float32))
    g = Graph([ValueInfo("x", "float32", [1, 4])], [ValueInfo("y", "float32", [1, 4])],
              [Node("linear", "l", ["x", "w"], ["y"])])
    bad = CSR((4, 4), w.indptr, np.array([0, 1, 2, 9], np.int32), w.data)  # index 9 out of range
    with pytest.raises(FormatError) as ei:
        write_model(p, g, {"w": bad})
    assert ei.value.tensor == "w" and ei.value.field == "indices"
    with pytest.raises(ModelFileError, match="metadata|JSON"):
        write_model(p, g, {"w": w}, {"obj": object()})
    with pytest.raises(ModelFileError, match="nan|NaN|JSON"):
        write_model(p, g, {"w": w}, {"x": float("nan")})
    g2 = Graph(g.inputs, g.outputs, [Node("linear", "l", ["x", "w2"], ["y"])])
    with pytest.raises(ModelFileError, match="not defined"):
        write_model(p, g2, {"w": w})
    assert not p.exists()


# ---------------------------------------------------------------------------------------------
# graph validation against the op table
# ---------------------------------------------------------------------------------------------
def G(nodes, inputs=None, outputs=None, act_quant=None):
    inputs = inputs if inputs is not None else [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    outputs = outputs if outputs is not None else [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]
    return {"inputs": inputs, "outputs": outputs, "nodes": nodes, "act_quant": act_quant or {}}


def N(op, name, ins, outs, **attrs):
    return {"op": op, "name": name, "inputs": ins, "outputs": outs, "attrs": attrs}


TS = {"w": CSR.from_dense(np.eye(4, dtype=np.float32)), "b": Dense.from_dense(np.zeros(4, np.float32))}
GOOD = [N("linear", "l", ["x", "w", "b"], ["h"], activation="relu"), N("relu", "r", ["h"], ["y"])]


def test_graph_ok():
    g = check_graph(G(GOOD), tensors=TS, file="f")
    assert [n.op for n in g.nodes] == ["linear", "relu"]
    check_graph(G([N("linear", "l", ["x", "w", ""], ["y"])]), tensors=TS)  # omitted optional input
    check_graph(G([N("linear", "l", ["x", "w"], ["y"])]), tensors=TS)
    check_graph(G([N("concat", "c", ["x", "x", "x"], ["y"], axis=1)]), tensors=TS)
    check_graph(G([N("clamp", "c", ["x"], ["y"], min=None, max=6.0)]), tensors=TS)


@pytest.mark.parametrize("graph,match,field", [
    (G([N("linear", "l", ["x", "w", "b"], ["h"]), N("relu", "r", ["z"], ["y"])]), "not defined", "inputs"),
    (G([N("relu", "r", ["h"], ["y"]), N("linear", "l", ["x", "w", "b"], ["h"])]), "cyclic or not in topological",
     "inputs"),
    (G([N("relu", "a", ["h2"], ["h1"]), N("relu", "b", ["h1"], ["h2"]), N("relu", "c", ["h2"], ["y"])]), "cyclic",
     "inputs"),
    (G([N("relu", "r", ["x"], ["h"]), N("relu", "r", ["h"], ["y"])]), "duplicate node", "name"),
    (G([N("relu", "r", ["x"], ["y"]), N("relu", "s", ["x"], ["y"])]), "already defined", "outputs"),
    (G([N("relu", "r", ["x"], ["w"])]), "already defined", "outputs"),
    (G([N("linear", "l", ["x"], ["y"])]), "inputs", "inputs"),
    (G([N("linear", "l", ["x", "w", "b", "b"], ["y"])]), "inputs", "inputs"),
    (G([N("linear", "l", ["x", "", "b"], ["y"])]), "required", "inputs"),
    (G([N("concat", "c", [], ["y"], axis=1)]), "inputs", "inputs"),
    (G([N("relu", "r", ["x"], ["y", "y2"])]), "output", "outputs"),
    (G([N("relu", "r", ["x"], ["y"], alpha=1.0)]), "no attribute", "attrs.alpha"),
    (G([N("concat", "c", ["x"], ["y"])]), "requires attribute", "attrs.axis"),
    (G([N("concat", "c", ["x"], ["y"], axis="1")]), "type int", "attrs.axis"),
    (G([N("concat", "c", ["x"], ["y"], axis=True)]), "type int", "attrs.axis"),
    (G([N("concat", "c", ["x"], ["y"], axis=None)]), "null", "attrs.axis"),
    (G([N("transpose", "t", ["x"], ["y"], perm=[1, "0"])]), "type ints", "attrs.perm"),
    (G([N("cast", "t", ["x"], ["y"], dtype="float64")]), "type dtype", "attrs.dtype"),
    (G([N("linear", "l", ["x", "w", "b"], ["y"], activation=3)]), "type str", "attrs.activation"),
    (G([N("layernorm", "l", ["x"], ["y"], eps=10 ** 400)]), "type float", "attrs.eps"),
    (G([N("add", "a", ["x", "w"], ["y"])]), "compressed", "inputs"),
    (G(GOOD, outputs=[{"name": "q", "dtype": "float32", "shape": [1]}]), "never defined", "graph.outputs"),
    (G(GOOD, inputs=[{"name": "w", "dtype": "float32", "shape": [1]}]), "clashes", "graph.inputs"),
    (G(GOOD, inputs=[{"name": "x", "dtype": "float64", "shape": [1]}]), "dtype", "graph.inputs.dtype"),
    (G(GOOD, inputs=[{"name": "x", "dtype": "float32", "shape": [-1]}]), "dim", "graph.inputs.shape"),
    (G(GOOD, act_quant={"x": {"scale": -1.0, "zero_point": 0}}), "scale", "act_quant.scale"),
    (G(GOOD, act_quant={"nope": {"scale": 1.0, "zero_point": 0}}), "does not define", "act_quant"),
    ({"inputs": [], "outputs": []}, "graph must hold", "graph"),
    ([], "object", "graph"),
])
def test_graph_rejects(graph, match, field):
    with pytest.raises(ModelFileError, match=match) as ei:
        check_graph(graph, tensors=TS, file="f.sparsedge")
    assert ei.value.field == field and ei.value.file == "f.sparsedge"


def test_unknown_op_is_file_and_op_error(tmp_path):
    with pytest.raises(UnsupportedOpInFileError, match="frobnicate") as ei:
        check_graph(G([N("frobnicate", "fx", ["x"], ["y"])]), tensors=TS, file="f")
    assert isinstance(ei.value, ModelFileError) and isinstance(ei.value, UnsupportedOpError)
    assert ei.value.node == "fx" and ei.value.field == "op"
    # and through a file
    p, _, _ = sample(tmp_path)
    _, h, data = split(p.read_bytes())
    h["graph"]["nodes"][0]["op"] = "frobnicate"
    q = tmp_path / "op.sparsedge"
    q.write_bytes(rebuild(h, data))
    with pytest.raises(UnsupportedOpInFileError):
        read_model(q)


# ---------------------------------------------------------------------------------------------
# sparsedge inspect
# ---------------------------------------------------------------------------------------------
def test_inspect(tmp_path, capsys):
    p, _, _ = sample(tmp_path)
    assert cli_main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    for s in ("csr", "bsr", "4x4", "2:4", "nm", "dense_i8", "lowrank", "bfloat16", "compression", "linear x",
              "conv2d x1", "x: float32[batch, 22]", "img: float32[batch, 3, 8, 8]", "unit test", "8x3x3x3"):
        assert s in out, s
    assert cli_main(["inspect", str(p), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in s["tensors"]}
    assert rows["csr"]["nnz"] == one_of_each()["csr"].nnz
    assert rows["bsr_4x4"]["block"] == "4x4" and rows["nm_2_4"]["block"] == "2:4"
    assert s["totals"]["bytes"] == sum(r["bytes"] for r in s["tensors"])
    assert s["totals"]["compression"] > 1
    assert s["graph"]["ops"]["linear"] == 16 and s["graph"]["inputs"][0]["shape"] == ["batch", 22]
    bad = tmp_path / "bad.sparsedge"
    bad.write_bytes(b"PK\x03\x04 not a model")
    assert cli_main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.sparsedge" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main(["inspect", str(tmp_path / "missing.sparsedge")]) == 1


def test_graph_from_python_objects_is_normalised(tmp_path):
    """Tuples and numpy scalars in a Graph built by the converter are stored as JSON lists/numbers."""
    w = CSR.from_dense(np.ones((4, 2 * 3 * 3), np.float32))
    g = Graph([ValueInfo("x", "float32", ("batch", 2, 5, 5))], [ValueInfo("y", "float32", ["batch", 4, 5, 5])],
              [Node("conv2d", "c", ("x", "w"), ("y",), {"stride": (1, 1), "padding": (np.int64(1), 1),
                                                          "groups": np.int32(1)})],
              {"x": {"scale": np.float32(0.5), "zero_point": np.int64(0)}})
    p = tmp_path / "n.sparsedge"
    write_model(p, g, {"w": w})
    with read_model(p) as mf:
        n = mf.graph.nodes[0]
        assert n.attrs == {"stride": [1, 1], "padding": [1, 1], "groups": 1} and n.inputs == ["x", "w"]
        assert mf.graph.inputs[0].shape == ["batch", 2, 5, 5]


def test_zero_dim_constant_round_trips(tmp_path):
    """A 0-d dense constant (a scalar) keeps shape () through write and read."""
    g = Graph([ValueInfo("x", "float32", ["b", 2])], [ValueInfo("y", "float32", ["b", 2])],
              [Node("mul", "m", ["x", "c"], ["y"])])
    p = tmp_path / "scalar.sparsedge"
    write_model(p, g, {"c": Dense.from_dense(np.array(2.5, dtype=np.float32))}, {})
    with read_model(p) as m:
        c = m.tensors["c"]
        assert c.shape == () and c.to_dense().shape == () and float(c.to_dense()) == 2.5


def test_graph_without_tensors_round_trips(tmp_path):
    g = Graph([ValueInfo("x", "float32", ["b", 3])], [ValueInfo("y", "float32", ["b", 3])],
              [Node("relu", "r", ["x"], ["y"])])
    p = tmp_path / "notensors.sparsedge"
    write_model(p, g, {}, {})
    with read_model(p) as m:
        assert m.tensors == {} and [n.op for n in m.graph.nodes] == ["relu"]
