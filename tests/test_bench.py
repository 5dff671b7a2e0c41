"""Bench: schema validator, compare / report, the quick suite (the CI check) and the demo.

The quick suite runs once per session (``sparsedge bench --quick --json``, in-process); each of
its cases is then asserted once: schema-valid, finite positive times and ratios, kernel outputs
matching ``W @ X``. No timing thresholds: speed belongs in the bench output, not in tests.
"""
import copy
import json
import math
import os

import numpy as np
import pytest

from sparsedge.bench import schema
from sparsedge.bench.compare import compare_docs
from sparsedge.bench.report import text_summary

QUICK = {}


def _minimal_doc():
    return {
        "schema": "sparsedge-bench/1", "created_utc": "2026-01-01T00:00:00+00:00", "mode": "quick",
        "suites": ["kernels"],
        "machine": {"cores": 2, "cpu": {"model": "x", "arch": "x86_64", "features": ["avx2"]},
                    "versions": {"numpy": "2", "numba": "0.6"}, "numba": {"version": "0.6", "threads": 2},
                    "blas": {}},
        "cases": [
            {"suite": "kernels", "id": "kernels/s/u90/numpy_dense", "group": "s/u90", "impl": "numpy_dense",
             "kind": "peer", "median_s": 2e-3, "ratio_numpy_dense": 1.0, "shape_id": "s", "pattern": "u90",
             "structure": "unstructured", "sparsity": 0.9, "fmt": "dense", "dtype": "float32",
             "shape": {"out": 8, "in": 8, "n": 4}},
            {"suite": "kernels", "id": "kernels/s/u90/csr_x", "group": "s/u90", "impl": "csr_x", "kind": "sparsedge",
             "median_s": 1e-3, "ratio_numpy_dense": 2.0, "ratio_best_peer": 2.0, "best_peer": "numpy_dense",
             "shape_id": "s", "pattern": "u90", "structure": "unstructured", "sparsity": 0.9, "fmt": "csr",
             "dtype": "float32", "ok": True, "useful_gflops": 1.0, "shape": {"out": 8, "in": 8, "n": 4}},
        ],
    }


def test_schema_accepts_minimal_and_rejects_bad():
    doc = _minimal_doc()
    assert schema.errors(doc) == []
    bad = copy.deepcopy(doc)
    del bad["machine"]
    assert any("machine" in e for e in schema.errors(bad))
    bad = copy.deepcopy(doc)
    bad["cases"][1]["median_s"] = float("nan")
    assert any("finite" in e for e in schema.errors(bad))
    bad = copy.deepcopy(doc)
    bad["cases"][1]["median_s"] = -1.0
    assert any("exclusiveMinimum" in e for e in schema.errors(bad))
    bad = copy.deepcopy(doc)
    bad["cases"][1]["kind"] = "other"
    assert any("not one of" in e for e in schema.errors(bad))
    bad = copy.deepcopy(doc)
    bad["cases"][1]["id"] = bad["cases"][0]["id"]
    assert any("duplicate" in e for e in schema.errors(bad))
    bad = copy.deepcopy(doc)
    bad["machine"]["numba"]["threads"] = True  # a bool is not an integer
    assert schema.errors(bad)
    bad = copy.deepcopy(doc)
    bad["schema"] = "sparsedge-bench/2"
    assert schema.errors(bad)


def test_schema_file_is_valid_json_schema_subset():
    s = schema.load_schema()
    assert s["properties"]["schema"]["enum"] == [schema.SCHEMA_ID]
    # every $ref resolves
    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)
    for r in refs(s):
        schema._resolve(s, r)


def test_load_result_names_file(tmp_path):
    from sparsedge.errors import InputError

    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        schema.load_result(p)
    p.write_text(json.dumps({"schema": "sparsedge-bench/1"}))
    with pytest.raises(InputError, match="missing required"):
        schema.load_result(p)


def test_compare_two_runs_and_report(tmp_path):
    a = _minimal_doc()
    b = copy.deepcopy(a)
    b["cases"][1]["median_s"] = 0.5e-3
    b["cases"].append(dict(b["cases"][1], id="kernels/s/u90/only_b"))
    rows, text = compare_docs(a, b)
    assert len(rows) == 1 and rows[0]["id"] == "kernels/s/u90/csr_x"
    assert rows[0]["a_over_b"] == pytest.approx(2.0)
    assert "geometric mean A/B over 1 cases: 2.000x" in text
    assert "1 only in B" in text
    s = text_summary(a)
    assert "csr_x" in s and "2.00x" in s


def test_compare_cli_and_plot(tmp_path, capsys):
    from sparsedge.cli import main

    a = _minimal_doc()
    b = copy.deepcopy(a)
    b["cases"][1]["median_s"] = 4e-3
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert main(["bench", "compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "0.25x" in out
    assert main(["bench", "compare", str(pa)]) == 1  # usage error as a user error
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    assert main(["bench", "report", str(pa), "--plot", str(png), "--markdown", str(tmp_path / "r.md")]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "csr_x" in (tmp_path / "r.md").read_text()


def test_unknown_suite_is_user_error(capsys):
    from sparsedge.cli import main

    assert main(["bench", "nonsense", "--quick"]) == 1
    assert "unknown suite or model" in capsys.readouterr().err


def test_weight_patterns_exact():
    from sparsedge.bench.kernels import make_weight

    rng = np.random.default_rng(0)
    w = make_weight(rng, 30, 20, {"structure": "unstructured", "sparsity": 0.9})
    assert np.count_nonzero(w) == 60
    w = make_weight(rng, 30, 21, {"structure": "block", "block": [4, 1], "sparsity": 0.5})
    blocks = (np.abs(np.pad(w, ((0, 2), (0, 0)))).reshape(8, 4, 21).sum(1) > 0)
    assert blocks.sum() == round(0.5 * 8 * 21)
    w = make_weight(rng, 5, 10, {"structure": "nm", "nm": [2, 4], "sparsity": 0.5})
    g = np.pad(w, ((0, 0), (0, 2))).reshape(5, 3, 4)
    assert ((g != 0).sum(2) <= 2).all() and np.count_nonzero(w[:, 8:]) <= 10


# --- the quick suite: run once, assert every case ---------------------------------------------------
@pytest.fixture(scope="module")
def quick_doc(tmp_path_factory):
    if "doc" not in QUICK:
        from sparsedge.cli import main

        out = tmp_path_factory.mktemp("bench") / "quick.json"
        rc = main(["bench", "--quick", "--json", str(out), "--threads", "2"])
        doc = json.loads(out.read_text())
        QUICK.update(doc=doc, rc=rc)
    return QUICK["doc"]


def test_quick_suite_valid(quick_doc):
    assert QUICK["rc"] == 0
    assert schema.errors(quick_doc) == []
    assert quick_doc["mode"] == "quick"
    suites = {c["suite"] for c in quick_doc["cases"]}
    assert {"kernels", "coldstart", "models"} <= suites
    assert quick_doc["machine"]["numba"]["threads"] >= 1


def test_quick_kernel_cases(quick_doc):
    bad = []
    kcases = [c for c in quick_doc["cases"] if c["suite"] == "kernels"]
    assert kcases
    families = {(c.get("op"), c.get("fmt"), c.get("dtype")) for c in kcases if c["kind"] == "sparsedge"}
    from sparsedge.bench.kernels import select_rows

    rows, _ = select_rows(True)
    assert families == {(r.op, r.fmt, r.dtype) for r in rows}  # one case per kernel family, all ran
    for c in kcases:
        if "error" in c:
            bad.append((c["id"], c["error"]))
            continue
        t = c["median_s"]
        if not (math.isfinite(t) and t > 0):
            bad.append((c["id"], f"median {t}"))
        for k in ("ratio_numpy_dense", "ratio_best_peer"):
            if c.get(k) is None or not (math.isfinite(c[k]) and c[k] > 0):
                bad.append((c["id"], f"{k}={c.get(k)}"))
        if c["kind"] == "sparsedge":
            if not c.get("ok"):
                bad.append((c["id"], f"output mismatch, max rel err {c.get('max_rel_err')}"))
            if not (c.get("useful_gflops", 0) > 0):
                bad.append((c["id"], "useful_gflops"))
    assert not bad, bad


def test_quick_coldstart_cases(quick_doc):
    cs = [c for c in quick_doc["cases"] if c["suite"] == "coldstart"]
    assert {c["phase"] for c in cs} == {"compile", "load"}
    for c in cs:
        assert "error" not in c, c
        assert math.isfinite(c["median_s"]) and c["median_s"] > 0, c


def test_quick_model_cases(quick_doc):
    ms = [c for c in quick_doc["cases"] if c["suite"] == "models"]
    have_torch = True
    try:
        import torch  # noqa: F401
    except Exception:
        have_torch = False
    models = {c["model"] for c in ms}
    assert "demo" in models
    if have_torch:
        assert {"bert", "resnet"} <= models
    for c in ms:
        assert "error" not in c, c
        assert math.isfinite(c["median_s"]) and c["median_s"] > 0, c
        if c["kind"] == "sparsedge":
            assert c["file_bytes"] > 0 and c["arena_bytes"] > 0, c
        if c["model"] == "demo":
            assert c["accuracy"] > 0.85, c  # the shipped model, pruned 90%: ~95%
        elif c["kind"] == "peer":
            assert c["max_abs_err"] < 1e-3, c  # onnxruntime on the dense weights matches torch
        else:
            assert math.isfinite(c["max_abs_err"]), c
        if c.get("ratio_ort_f32") is not None:
            assert math.isfinite(c["ratio_ort_f32"]) and c["ratio_ort_f32"] > 0


def test_quick_compare_self(quick_doc, tmp_path, capsys):
    from sparsedge.cli import main

    p = tmp_path / "q.json"
    p.write_text(json.dumps(quick_doc))
    assert main(["bench", "compare", str(p), str(p), "--all"]) == 0
    assert "geometric mean A/B" in capsys.readouterr().out


# --- the demo ----------------------------------------------------------------------------------------
def test_demo_data_shipped():
    from sparsedge.bench.demo import DATA_DIR
    from sparsedge.bench.train_demo import read_safetensors

    w = read_safetensors(DATA_DIR / "digits_mlp.safetensors")
    assert [w[f"layers.{i}.weight"].shape for i in range(4)] == [(1024, 64), (1024, 1024), (1024, 1024), (10, 1024)]
    assert all(v.dtype == np.float16 for v in w.values())
    x = np.load(DATA_DIR / "digits_test_x.npy", allow_pickle=False)
    y = np.load(DATA_DIR / "digits_test_y.npy", allow_pickle=False)
    assert x.shape == (360, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (360,) and set(np.unique(y)) == set(range(10))
    cfg = json.loads((DATA_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mlp" and cfg["layers"] == [f"layers.{i}" for i in range(4)]
    # the float16 weights classify the held-out set (plain numpy forward pass)
    from sparsedge.bench.train_demo import numpy_forward

    assert (numpy_forward(w, x, 4).argmax(1) == y).mean() > 0.95
    assert (numpy_forward(w, x, 4, 0.9).argmax(1) == y).mean() > 0.9


def test_safetensors_writer_roundtrip(tmp_path):
    from sparsedge.bench.train_demo import read_safetensors, write_safetensors

    t = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array(7, np.int64),
         "c": np.ones((3, 2), np.float32).T}
    write_safetensors(tmp_path / "m.safetensors", t, {"k": "v"})
    r = read_safetensors(tmp_path / "m.safetensors")
    for k in t:
        assert r[k].shape == t[k].shape and r[k].dtype == t[k].dtype and np.array_equal(r[k], t[k])
    from sparsedge.loaders.checkpoint import load_state_dict

    sd = load_state_dict(str(tmp_path / "m.safetensors"))
    assert np.array_equal(np.asarray(sd["a"], np.float32), t["a"].astype(np.float32))
    assert np.asarray(sd["b"]).shape == ()


def test_demo_runs(tmp_path, capsys):
    from sparsedge.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--budget", "0.5", "--json", str(out), "--out", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    for level in ("dense", "sparse90", "sparse90_int8"):
        assert level in text
        assert (tmp_path / "m" / f"digits_{level}.sparsedge").is_file()
    doc = json.loads(out.read_text())
    assert schema.errors(doc) == []
    acc = {c["level"]: c["accuracy"] for c in doc["cases"]}
    assert acc["dense"] > 0.95 and acc["sparse90"] > 0.9 and acc["sparse90_int8"] > 0.9
    size = {c["level"]: c["file_bytes"] for c in doc["cases"]}
    assert size["sparse90"] < size["dense"] / 4 and size["sparse90_int8"] < size["sparse90"]


def test_demo_missing_data_is_user_error(tmp_path, capsys):
    from sparsedge.cli import main

    assert main(["demo", "--data", str(tmp_path)]) == 1
    assert "demo data missing" in capsys.readouterr().err


def test_schema_main(tmp_path, capsys):
    good, bad = tmp_path / "g.json", tmp_path / "b.json"
    good.write_text(json.dumps(_minimal_doc()))
    bad.write_text(json.dumps({"schema": "x"}))
    assert schema.main([str(good)]) == 0
    assert schema.main([str(good), str(bad)]) == 1
    assert "INVALID" in capsys.readouterr().err
