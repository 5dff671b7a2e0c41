"""Converter tests that need no torch: compression primitives against the formats, grammar,
recipes, the MLP template end to end (safetensors written by hand), reports, atomic output."""
import json
import os
import struct

import numpy as np
import pytest

from sparsedge.errors import ConversionError, InputError
from sparsedge.formats.base import FORMATS
from sparsedge.loaders import compress as C
from sparsedge.loaders.recipe import check_recipe, load_recipe, resolve_plans


def write_safetensors(path, tensors: dict):
    """A minimal safetensors writer (F32/I64), so these tests need neither torch nor safetensors."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[k] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _formats():
    from sparsedge.loaders.convert import _import_formats

    _import_formats()
    return FORMATS


# ----------------------------------------------------------------------------------------------
# pruning


def test_prune_unstructured_exact_and_keeps_zeros(rng):
    w = rng.standard_normal((37, 53)).astype(np.float32)
    w[:, :5] = 0.0  # already pruned
    p = C.prune_unstructured(w, 0.9)
    assert np.count_nonzero(p) == w.size - round(0.9 * w.size)
    assert not p[:, :5].any()
    kept = p != 0
    assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()  # magnitude order
    assert np.array_equal(p[kept], w[kept])
    # a target below the existing sparsity changes nothing
    w2 = np.where(rng.random(w.shape) < 0.95, 0, w).astype(np.float32)
    assert np.array_equal(C.prune_unstructured(w2, 0.5), w2)


def test_prune_global_one_threshold(rng):
    a = rng.standard_normal((20, 30)).astype(np.float32)
    b = 10 * rng.standard_normal((16, 8)).astype(np.float32)
    pa, pb = C.prune_global([a, b], 0.8)
    assert np.count_nonzero(pa) + np.count_nonzero(pb) == round(0.2 * (a.size + b.size))
    assert np.count_nonzero(pb) / b.size > np.count_nonzero(pa) / a.size  # large weights survive
    thr = max(np.abs(a[pa == 0]).max(), np.abs(b[pb == 0]).max())
    assert min(np.abs(pa[pa != 0]).min(), np.abs(pb[pb != 0]).min()) >= thr


@pytest.mark.parametrize("block", [(4, 1), (8, 1), (1, 4), (4, 4)])
def test_prune_block(rng, block):
    w = rng.standard_normal((30, 22)).astype(np.float32)  # not divisible: edge blocks
    p = C.prune_block(w, block, 0.75)
    r, c = block
    pad = np.pad(p, ((0, -30 % r), (0, -22 % c)))
    blocks = pad.reshape(pad.shape[0] // r, r, pad.shape[1] // c, c)
    nz = (blocks != 0).any(axis=(1, 3))
    assert nz.sum() == nz.size - round(0.75 * nz.size)
    assert np.array_equal(p[p != 0], w[p != 0])
    assert C.block_density(p, block) == pytest.approx(nz.mean())


@pytest.mark.parametrize("n,m,cols", [(2, 4, 16), (2, 4, 18), (4, 8, 20), (1, 4, 9)])
def test_prune_nm(rng, n, m, cols):
    w = rng.standard_normal((7, cols)).astype(np.float32)
    p = C.prune_nm(w, n, m)
    assert C.is_nm(p, n, m)
    g = -(-cols // m)
    pad = np.pad(p != 0, ((0, 0), (0, g * m - cols))).reshape(7, g, m)
    full = np.minimum(n, np.array([min(m, cols - i * m) for i in range(g)]))
    assert (pad.sum(axis=2) == full[None]).all()


# ----------------------------------------------------------------------------------------------
# encoders agree with the formats (from_arrays -> validate -> to_dense)


@pytest.mark.parametrize("kind", ["dense", "csr", "csr_i8", "bsr", "bsr_i8", "nm", "dense_i8", "lowrank",
                                  "lowrank_i8"])
def test_encoders_match_formats(rng, kind):
    F = _formats()
    w = rng.standard_normal((19, 24)).astype(np.float32)
    w[3] = 0.0  # an empty row
    if kind == "nm":
        w = C.prune_nm(w, 2, 4)
        k, meta, arrays = C.enc_nm(w, 2, 4)
    elif kind in ("bsr", "bsr_i8"):
        w = C.prune_block(w, (4, 1), 0.7)
        k, meta, arrays = (C.enc_bsr if kind == "bsr" else C.enc_bsr_i8)(w, (4, 1))
    elif kind.startswith("lowrank"):
        u, v = C.lowrank_factors(w, C.LowRankSpec(rank=3))
        k, meta, arrays = C.enc_lowrank(u, v, kind == "lowrank_i8")
    else:
        if kind.startswith("csr"):
            w = C.prune_unstructured(w, 0.8)
        k, meta, arrays = {"dense": C.enc_dense, "csr": C.enc_csr, "csr_i8": C.enc_csr_i8,
                           "dense_i8": C.enc_dense_i8}[kind](w)
    wf = F[k].from_arrays(list(w.shape), meta, arrays, name="t")
    wf.validate(full=True)
    mine = C.decode(k, meta, arrays, w.shape)
    np.testing.assert_allclose(wf.to_dense(), mine, rtol=1e-6, atol=1e-6)
    if kind in ("dense", "csr", "bsr", "nm"):
        assert np.array_equal(mine, w)  # exact
    elif kind in ("csr_i8", "bsr_i8", "dense_i8"):
        step = np.abs(w).max(axis=1, keepdims=True) / 127
        assert (np.abs(mine - w) <= step / 2 + 1e-7).all()
        assert not mine[w == 0].any()  # pruned zeros stay zero


def test_lowrank_energy(rng):
    u = rng.standard_normal((40, 3))
    v = rng.standard_normal((3, 50))
    w = (u @ v + 1e-3 * rng.standard_normal((40, 50))).astype(np.float32)
    a, b = C.lowrank_factors(w, C.LowRankSpec(energy=0.99))
    assert a.shape[1] == 3
    assert np.linalg.norm(a @ b - w) / np.linalg.norm(w) < 1e-2
    assert C.lowrank_factors(w[:4, :4], C.LowRankSpec(rank=3)) is None  # would not shrink


def test_act_quant_params():
    x = np.linspace(-1, 3, 1000, dtype=np.float32)
    p = C.act_quant_params([x])
    q = np.clip(np.rint(x / p["scale"]) + p["zero_point"], -128, 127)
    assert np.abs((q - p["zero_point"]) * p["scale"] - x).max() <= p["scale"] / 2 + 1e-6
    pp = C.act_quant_params([np.concatenate([x, [1000.0]])], "percentile", 99.0)
    assert pp["scale"] < 1.0  # the outlier is clipped


def test_fold_torch_prune():
    sd = {"fc.weight_orig": np.ones((2, 3), np.float32), "fc.weight_mask": np.array([[1, 0, 1], [0, 0, 1]], np.float32),
          "fc.bias": np.zeros(2, np.float32)}
    out, folded = C.fold_torch_prune(sd)
    assert folded == ["fc.weight"] and sorted(out) == ["fc.bias", "fc.weight"]
    assert out["fc.weight"].tolist() == [[1, 0, 1], [0, 0, 1]]


def test_auto_format_choice(rng):
    plan = C.LayerPlan()
    w = rng.standard_normal((256, 256)).astype(np.float32)
    res = C.LayerResult("l", "linear", "l.weight", w.shape, w.shape)
    assert C.choose_format(w, plan, 1, res)[0] == "dense"
    assert C.choose_format(C.prune_unstructured(w, 0.9), plan, 1, res)[0] == "csr"
    assert C.choose_format(C.prune_unstructured(w, 0.4), plan, 1, res)[0] == "dense"  # does not pay
    assert C.choose_format(C.prune_block(w, (8, 1), 0.9), plan, 1, res)[:2] == ("bsr", (8, 1))
    assert C.choose_format(C.prune_unstructured(w, 0.9), plan, 4, res)[0] == "dense"  # grouped conv


# ----------------------------------------------------------------------------------------------
# grammar and recipes


@pytest.mark.parametrize("bad", ["1.5", "block:4:0.9", "nm:4:2", "global:x", "foo:1"])
def test_prune_grammar_errors(bad):
    with pytest.raises(InputError, match="--prune"):
        C.parse_prune(bad)


def test_grammar_ok():
    assert C.parse_prune("block:4x1:0.9") == C.PruneSpec("block", 0.9, block=(4, 1))
    assert str(C.parse_prune("nm:2:4")) == "nm:2:4"
    assert C.parse_quant("int8:static:p99.9") == C.QuantSpec(True, "percentile", 99.9)
    assert C.parse_lowrank("energy:0.95").energy == 0.95
    assert C.parse_format("bsr:8x1").block == (8, 1)
    for fn, bad in ((C.parse_quant, "int4"), (C.parse_lowrank, "rank:0"), (C.parse_format, "bsr:3x3")):
        with pytest.raises(InputError):
            fn(bad)


def test_recipe_toml_overrides(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('prune = "0.5"\nquant = "int8"\nskip = ["emb*"]\n'
                 '[[layers]]\nmatch = "enc.*.ffn"\nprune = "block:4x1:0.8"\nformat = "bsr:4x1"\n'
                 '[[layers]]\nmatch = ["head"]\nskip = true\n[[layers]]\nmatch = "nothing*"\nquant = "none"\n')
    rec = load_recipe(p)
    plans, notes = resolve_plans(["emb", "enc.0.ffn", "enc.0.attn", "head"], {"prune": "0.7"}, rec)
    assert plans["emb"].skip and plans["head"].skip
    assert plans["enc.0.ffn"].prune == C.PruneSpec("block", 0.8, block=(4, 1))
    assert plans["enc.0.ffn"].fmt == C.FormatSpec("bsr", (4, 1))
    assert plans["enc.0.attn"].prune.sparsity == 0.7  # the flag beats the recipe default
    assert plans["enc.0.attn"].quant is not None
    assert any("nothing*" in n for n in notes)


def test_recipe_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"prune": "0.9", "layerz": []}))
    with pytest.raises(ConversionError, match="layerz"):
        load_recipe(p)
    with pytest.raises(ConversionError, match=r"layers\[0\]"):
        check_recipe({"layers": [{"match": "a", "prune": "block:9"}]})
    p.write_text("{not json")
    with pytest.raises(ConversionError, match="invalid JSON"):
        load_recipe(p)


# ----------------------------------------------------------------------------------------------
# the MLP template end to end (no torch)


def _mlp_folder(tmp_path, rng, pruned=False):
    d = tmp_path / "mlp"
    d.mkdir()
    w1 = rng.standard_normal((128, 64)).astype(np.float32) / 8
    w2 = rng.standard_normal((96, 128)).astype(np.float32) / 11
    w3 = rng.standard_normal((10, 96)).astype(np.float32) / 10
    if pruned:
        w1, w2 = C.prune_unstructured(w1, 0.9), C.prune_unstructured(w2, 0.9)
    sd = {"fc1.weight": w1, "fc1.bias": rng.standard_normal(128).astype(np.float32) / 10,
          "fc2.weight": w2, "fc2.bias": np.zeros(96, np.float32), "fc3.weight": w3,
          "fc3.bias": rng.standard_normal(10).astype(np.float32)}
    write_safetensors(d / "model.safetensors", sd)
    (d / "config.json").write_text(json.dumps({"model_type": "mlp", "activation": "gelu"}))
    return d, sd


def _mlp_forward(sd, x):
    from scipy.special import erf

    def gelu(v):
        return 0.5 * v * (1 + erf(v / np.sqrt(2)))
    h = gelu(x @ sd["fc1.weight"].T + sd["fc1.bias"])
    h = gelu(h @ sd["fc2.weight"].T + sd["fc2.bias"])
    return h @ sd["fc3.weight"].T + sd["fc3.bias"]


def test_mlp_template_dense_and_pruned(tmp_path, rng):
    import sparsedge

    d, sd = _mlp_folder(tmp_path, rng)
    out = tmp_path / "m.sparsedge"
    res = sparsedge.convert(d, out, progress=False, report_dir=tmp_path / "rep")
    x = rng.standard_normal((5, 64)).astype(np.float32)
    s = sparsedge.Session(str(out))
    assert [i.name for i in s.get_inputs()] == ["x"] and [o.name for o in s.get_outputs()] == ["output"]
    y = s.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, _mlp_forward(sd, x), rtol=1e-4, atol=1e-5)
    assert [r["kind"] for r in res.layers] == ["dense"] * 3
    assert res.report["inputs"]["origin"].startswith("generated")
    assert {"report.json", "report.md"} <= set(os.listdir(tmp_path / "rep"))

    out2 = tmp_path / "p.sparsedge"
    res2 = sparsedge.convert(d, out2, prune="0.9", quant="int8", progress=False)
    meta = res2.report["layers"]
    assert all(r["density"] <= 0.1 + 1e-3 for r in meta)
    assert {r["kind"] for r in meta} <= {"csr_i8", "bsr_i8", "dense_i8"}
    from sparsedge.formats.modelfile import read_model

    mf = read_model(str(out2))
    try:
        assert mf.metadata["layers"]["fc1"]["sparsity"] >= 0.9 - 1e-9
        assert mf.metadata["recipe"]["prune"] == "0.9"
    finally:
        mf.close()


def test_existing_zeros_kept_without_flags(tmp_path, rng):
    import sparsedge

    d, sd = _mlp_folder(tmp_path, rng, pruned=True)
    res = sparsedge.convert(d, tmp_path / "m.sparsedge", progress=False)
    by = {r["name"]: r for r in res.layers}
    assert by["fc1"]["kind"] in ("csr", "bsr") and by["fc2"]["kind"] in ("csr", "bsr")
    assert by["fc1"]["density"] == pytest.approx(np.count_nonzero(sd["fc1.weight"]) / sd["fc1.weight"].size)
    assert by["fc3"]["kind"] == "dense"
    assert res.report["end_to_end"]["outputs"]["output"]["max_abs_err"] < 1e-4


def test_calibration_npz_static(tmp_path, rng):
    import sparsedge
    from sparsedge.formats.modelfile import read_model

    d, _ = _mlp_folder(tmp_path, rng)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((40, 64)).astype(np.float32))
    res = sparsedge.convert(d, tmp_path / "m.sparsedge", quant="int8:static", calib=tmp_path / "calib.npz",
                            progress=False)
    assert res.report["inputs"]["origin"].startswith("calibration file")
    mf = read_model(str(tmp_path / "m.sparsedge"))
    try:
        assert "x" in mf.graph.act_quant and len(mf.graph.act_quant) == 3
    finally:
        mf.close()
    assert res.report["end_to_end"]["outputs"]["output"]["cosine"] > 0.99
    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 64), np.float32))
    with pytest.raises(InputError, match="lacks input 'x'"):
        sparsedge.convert(d, tmp_path / "m2.sparsedge", calib=tmp_path / "bad.npz", progress=False)
    assert not (tmp_path / "m2.sparsedge").exists()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_leaves_no_output(tmp_path, rng, monkeypatch, exc):
    import sparsedge
    import importlib

    conv_mod = importlib.import_module("sparsedge.loaders.convert")

    d, _ = _mlp_folder(tmp_path, rng)
    out = tmp_path / "out" / "m.sparsedge"
    out.parent.mkdir()

    def boom(*a, **k):
        raise exc("stop")
    monkeypatch.setattr(conv_mod, "build_report_dict", boom)  # after the model file was written
    with pytest.raises(exc):
        sparsedge.convert(d, out, prune="0.9", progress=False, report_dir=tmp_path / "out" / "rep")
    assert os.listdir(out.parent) == []  # no output, no temp file, no report


def test_cli_errors_and_run(tmp_path, rng, capsys):
    from sparsedge.cli import main

    d, _ = _mlp_folder(tmp_path, rng)
    assert main(["convert", str(d)]) == 2  # -o missing: usage error
    assert main(["convert", str(d), "-o", str(tmp_path / "a.sparsedge"), "--prune", "block:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or err[-1].startswith("sparsedge convert: error:")
    assert err[-1].startswith("sparsedge convert: error:") and "--prune" in err[-1]
    assert main(["convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "a.sparsedge")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["convert", str(d), "-o", str(tmp_path / "a.sparsedge"), "--prune", "0.8", "--no-progress",
                 "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "cosine" in out
    assert (tmp_path / "a.sparsedge").exists()
    assert main(["convert", "--help"]) == 0
    assert "block:4x1:0.9" in capsys.readouterr().out


def test_progress_bar_tty():
    import io

    from sparsedge.loaders.report import Progress

    class TTY(io.StringIO):
        def isatty(self):
            return True
    s = TTY()
    with Progress("calibrating", 4, stream=s) as p:
        for i in range(4):
            p.update(i + 1)
    assert "calibrating" in s.getvalue() and "4/4" in s.getvalue() and s.getvalue().endswith("\n")
    s2 = io.StringIO()
    with Progress("x", 2, enabled=False, stream=s2) as p:
        p.update(2)
    assert s2.getvalue() == ""


def test_global_lowrank_and_recipe_api(tmp_path, rng):
    import sparsedge

    d, sd = _mlp_folder(tmp_path, rng)
    res = sparsedge.convert(d, tmp_path / "g.sparsedge", prune="global:0.8", progress=False)
    nnz = sum(r["density"] * r["shape"][0] * r["shape"][1] for r in res.layers)
    tot = sum(r["shape"][0] * r["shape"][1] for r in res.layers)
    assert nnz / tot == pytest.approx(0.2, abs=2e-3)
    assert len({round(r["density"], 3) for r in res.layers}) > 1  # one threshold, different densities

    res = sparsedge.convert(d, tmp_path / "l.sparsedge", lowrank="rank:10", progress=False)
    by = {r["name"]: r for r in res.layers}
    assert by["fc1"]["kind"] == "lowrank" and by["fc1"]["meta"]["rank"] == 10
    assert by["fc3"]["kind"] == "dense" and by["fc3"]["notes"]  # rank 10 would not shrink 10x96
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y = sparsedge.Session(str(tmp_path / "l.sparsedge")).run(None, {"x": x})[0]
    from sparsedge.formats.modelfile import read_model
    from sparsedge.runtime.reference import run_reference

    mf = read_model(str(tmp_path / "l.sparsedge"))
    try:
        np.testing.assert_allclose(y, run_reference(mf, {"x": x})["output"], rtol=1e-4, atol=1e-5)
    finally:
        mf.close()

    recipe = {"prune": "0.5", "skip": ["fc3"], "layers": [{"match": "fc2", "prune": "nm:2:4", "format": "nm"}]}
    res = sparsedge.convert(d, tmp_path / "r.sparsedge", recipe=recipe, quant="int8", progress=False)
    by = {r["name"]: r for r in res.layers}
    assert by["fc3"]["skipped"] and by["fc3"]["kind"] == "dense"
    assert by["fc2"]["kind"] == "nm" and by["fc2"]["meta"] == {"n": 2, "m": 4}
    assert by["fc1"]["quant"] == "int8" and by["fc1"]["density"] == pytest.approx(0.5, abs=1e-3)


def test_sigint_subprocess_never_leaves_partial_output(tmp_path, rng):
    """Real Ctrl-C at several moments: either the conversion finished (a valid file) or the
    output path and folder hold nothing (no temp file left behind)."""
    import signal
    import subprocess
    import sys
    import time

    from sparsedge.formats.modelfile import read_model

    d, _ = _mlp_folder(tmp_path, rng)
    for i, delay in enumerate((0.3, 1.0, 2.0, 3.5)):
        od = tmp_path / f"o{i}"
        od.mkdir()
        out = od / "m.sparsedge"
        p = subprocess.Popen([sys.executable, "-m", "sparsedge", "convert", str(d), "-o", str(out), "--prune",
                              "0.9", "--report", str(od / "rep"), "-q"], stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        names = sorted(os.listdir(od))
        if out.exists():
            read_model(str(out)).close()  # complete and valid
            # finished; a Ctrl-C that lands during interpreter shutdown kills it by the signal
            assert p.returncode in (0, 130, -signal.SIGINT), (p.returncode, err[-500:])
        else:
            assert p.returncode != 0
            assert [n for n in names if n != "rep"] == [], names
        assert not [n for n in names if n.startswith(".")], names  # no temp files


def test_report_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from sparsedge.loaders.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rep = {"layers": [], "inputs": {"origin": "generated", "shapes": {}}, "size": {"dense_fp32_bytes": 8,
           "stored_bytes": 4, "file_bytes": 100, "ratio": 2.0}, "end_to_end": {"outputs": {}}, "notes": []}
    files = write_report(rep, tmp_path / "r")
    assert sorted(os.listdir(tmp_path / "r")) == ["report.json", "report.md"]
    assert any("matplotlib" in n for n in json.loads((tmp_path / "r" / "report.json").read_text())["notes"])
    assert len(files) == 2
