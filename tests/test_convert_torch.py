"""End-to-end converter tests with torch: torch.export path (ResNet-style, MobileNetV2-style and
BERT-style models from bench/models.py), dense against torch, compressed against the numpy
reference on the compressed weights, the HF template against the export path, pruned and
torch.nn.utils.prune checkpoints, unsupported ops, CLI.

Exported programs are cached in-process by the converter (one export per model for the module)."""
import json
import os
import struct
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparsedge  # noqa: E402
from sparsedge.bench import models  # noqa: E402
from sparsedge.errors import ConversionError, UnsupportedOpError  # noqa: E402
from sparsedge.formats.modelfile import read_model  # noqa: E402
from sparsedge.runtime.reference import run_reference  # noqa: E402

ARCH = "sparsedge.bench.models:"
IMG = ["x:batch,3,16,16"]
TXT = ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"]
MODELS = {"resnet": ("resnet_small", IMG), "mobilenet": ("mobilenetv2_small", IMG), "bert": ("bert_small", TXT)}


def feeds_for(key, seed=1):
    """Fresh inputs with sizes unlike the export examples (symbolic dims in use)."""
    rng = np.random.default_rng(seed)
    if key == "bert":
        ids = rng.integers(0, 100, (3, 6)).astype(np.int64)
        mask = np.ones((3, 6), np.int64)
        mask[1, 4:] = 0
        mask[2, 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"x": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)}


def torch_out(model, feeds):
    with torch.no_grad():
        return model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for key, (fac, _) in MODELS.items():
        m = getattr(models, fac)()
        torch.save(m.state_dict(), d / f"{key}.pt")
        out[key] = (d / f"{key}.pt", m)
    return out


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("out")


@pytest.mark.parametrize("key", list(MODELS))
def test_dense_matches_torch(ckpts, outdir, key):
    path, model = ckpts[key]
    fac, shapes = MODELS[key]
    out = outdir / f"{key}_dense.sparsedge"
    res = sparsedge.convert(path, out, arch=ARCH + fac, shapes=shapes, progress=False)
    s = sparsedge.Session(str(out))
    ins = s.get_inputs()
    assert [i.name for i in ins] == [x.split(":")[0] for x in shapes]
    assert ins[0].shape[0] == "batch"
    assert [o.name for o in s.get_outputs()] == ["output"]
    f = feeds_for(key)
    y = s.run(None, f)[0]
    ref = torch_out(model, f)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    assert all(r["kind"] == "dense" for r in res.layers)
    nodes = read_model(str(out)).graph.nodes
    ops = [n.op for n in nodes]
    if key != "bert":  # batchnorm folded, activations fused, no dropout left
        assert "batchnorm" not in ops and "clamp" not in ops
    else:  # mean pooling fused, masks fused into softmax, gelu fused into the FFN linear
        assert "masked_mean" in ops and "gelu" not in ops
        assert all(len(n.inputs) == 2 for n in nodes if n.op == "softmax")


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("quant", [None, "int8"])
def test_pruned_and_int8_match_reference(ckpts, outdir, key, quant):
    path, _ = ckpts[key]
    fac, shapes = MODELS[key]
    out = outdir / f"{key}_p90_{quant}.sparsedge"
    rep = outdir / f"rep_{key}_{quant}"
    res = sparsedge.convert(path, out, arch=ARCH + fac, shapes=shapes, prune="0.9", quant=quant,
                            report_dir=rep, progress=False)
    f = feeds_for(key, seed=2)
    y = sparsedge.Session(str(out)).run(None, f)[0]
    mf = read_model(str(out))
    try:
        ref = run_reference(mf, f)["output"]
        kinds = {t.kind for t in mf.tensors.values()}
        meta = mf.metadata
    finally:
        mf.close()
    # int8: the runtime quantizes activations on the fly, the reference does not
    tol = 1e-4 if quant is None else 3e-2
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
    assert kinds & ({"csr", "bsr"} if quant is None else {"csr_i8", "bsr_i8", "dense_i8"})
    for r in res.layers:
        if r["groups"] == 1 and not r["skipped"]:
            assert r["density"] <= 0.1 + 1.0 / (r["shape"][0] * r["shape"][1]), r["name"]
        assert r["output_rel_err"] is not None and r["weight_rel_err"] > 0
    assert meta["converter"].startswith("sparsedge") and meta["recipe"]["prune"] == "0.9"
    assert {"report.md", "report.json", "report.png"} <= set(os.listdir(rep))
    rj = json.loads((rep / "report.json").read_text())
    e2e = rj["end_to_end"]
    assert e2e["reference"].startswith("torch") and e2e["converted_engine"] == "sparsedge runtime Session"
    assert 0 < rj["size"]["stored_bytes"] < rj["size"]["dense_fp32_bytes"]
    if key != "bert":
        assert "top1_agreement" in e2e["outputs"]["output"]


def _write_safetensors(path, sd: dict):
    header, blobs, off = {}, [], 0
    for k, t in sd.items():
        a = np.ascontiguousarray(t.detach().numpy())
        code = {"float32": "F32", "int64": "I64"}[str(a.dtype)]
        header[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _hf_feeds():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 100, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    tt = np.zeros((2, 7), np.int64)
    tt[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def test_hf_template_equals_export_path(tmp_path):
    m = models.hf_bert()
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(m.config))
    _write_safetensors(d / "model.safetensors", m.state_dict())
    torch.save(m.state_dict(), tmp_path / "w.bin")
    a = sparsedge.convert(d, tmp_path / "t.sparsedge", progress=False)  # no torch needed on this path
    b = sparsedge.convert(tmp_path / "w.bin", tmp_path / "e.sparsedge", arch=ARCH + "hf_bert", progress=False)
    assert "template" in a.report["graph_from"] and "torch.export" in b.report["graph_from"]
    f = _hf_feeds()
    sa, sb = sparsedge.Session(str(tmp_path / "t.sparsedge")), sparsedge.Session(str(tmp_path / "e.sparsedge"))
    names = [o.name for o in sa.get_outputs()]
    assert names == ["last_hidden_state", "pooler_output"] == [o.name for o in sb.get_outputs()]
    assert [i.name for i in sa.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ya, yb = sa.run(None, f), sb.run(None, f)
    with torch.no_grad():
        ref = m(*[torch.from_numpy(v) for v in f.values()])
    for n, x, y in zip(names, ya, yb):
        r = ref[n].numpy()
        assert np.abs(x - y).max() <= 1e-5 * np.abs(r).max()
        assert np.abs(x - r).max() <= 1e-4 * np.abs(r).max()


def test_hf_sentence_layout(tmp_path):
    m = models.hf_bert(sentence=True, normalize=True)
    d = tmp_path / "st"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(m.config))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    res = sparsedge.convert(d, tmp_path / "s.sparsedge", prune="0.5", progress=False)
    assert res.report["graph_from"].startswith("template bert-sentence")
    s = sparsedge.Session(str(tmp_path / "s.sparsedge"))
    assert [o.name for o in s.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    res = sparsedge.convert(d, tmp_path / "s.sparsedge", progress=False)
    f = _hf_feeds()
    emb = sparsedge.Session(str(tmp_path / "s.sparsedge")).run(["sentence_embedding"], f)[0]
    with torch.no_grad():
        r = m(*[torch.from_numpy(v) for v in f.values()])["sentence_embedding"].numpy()
    assert np.abs(emb - r).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_already_pruned_checkpoint_keeps_zeros(ckpts, tmp_path):
    m = models.resnet_small()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 4 and p.shape[1] > 1:
                thr = p.abs().flatten().kthvalue(int(0.9 * p.numel())).values
                p[p.abs() <= thr] = 0.0
    torch.save(m.state_dict(), tmp_path / "pruned.pt")
    res = sparsedge.convert(tmp_path / "pruned.pt", tmp_path / "p.sparsedge", arch=ARCH + "resnet_small",
                            shapes=IMG, progress=False)
    convs = [r for r in res.layers if r["op"] == "conv2d"]
    assert convs and all(r["density_in"] <= 0.11 for r in convs)
    assert all(r["kind"] in ("csr", "bsr") and r["density"] == r["density_in"] for r in convs)
    f = feeds_for("resnet")
    y = sparsedge.Session(str(tmp_path / "p.sparsedge")).run(None, f)[0]
    ref = torch_out(m, f)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torch_nn_utils_prune_folds(tmp_path):
    from torch.nn.utils import prune

    m = models.resnet_small()
    prune.l1_unstructured(m.fc, "weight", amount=0.6)
    prune.l1_unstructured(m.layers[1].conv2, "weight", amount=0.8)
    sd = m.state_dict()
    assert "fc.weight_orig" in sd and "fc.weight_mask" in sd
    torch.save(sd, tmp_path / "tp.pt")
    res = sparsedge.convert(tmp_path / "tp.pt", tmp_path / "tp.sparsedge", arch=ARCH + "resnet_small",
                            shapes=IMG, progress=False)
    assert any("folded torch.nn.utils.prune" in n for n in res.report["notes"])
    by = {r["name"]: r for r in res.layers}
    assert by["layers.1.conv2"]["density_in"] == pytest.approx(0.2, abs=1e-3)
    f = feeds_for("resnet")
    y = sparsedge.Session(str(tmp_path / "tp.sparsedge")).run(None, f)[0]
    ref = torch_out(m, f)  # the pruned module (forward pre-hooks apply the masks)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_unsupported_ops_listed_together(tmp_path, monkeypatch):
    (tmp_path / "weird_models.py").write_text(textwrap.dedent("""
        import torch

        class Weird(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)

            def forward(self, x):
                y = torch.cumsum(self.fc(x), dim=1)
                return torch.flip(y, dims=[1]) + torch.sort(x, dim=1).values

        def weird():
            return Weird().eval()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(__import__("weird_models").weird().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "w.sparsedge"
    with pytest.raises(UnsupportedOpError) as ei:
        sparsedge.convert(tmp_path / "w.pt", out, arch="weird_models:weird", shapes=["x:batch,8"], progress=False)
    msg = str(ei.value)
    assert "aten.cumsum" in msg and "aten.flip" in msg and "aten.sort" in msg and "\n" not in msg
    assert not out.exists()


def test_specialised_dim_is_an_error(ckpts, tmp_path):
    path, _ = ckpts["resnet"]
    # the channel dim declared symbolic: its example size (3) fits the conv, and torch specialises it
    with pytest.raises(ConversionError, match="specialised"):
        sparsedge.convert(path, tmp_path / "m.sparsedge", arch=ARCH + "resnet_small",
                          shapes=["x:batch,chan,16,16"], progress=False)
    assert not (tmp_path / "m.sparsedge").exists()


def test_cli_arch(ckpts, tmp_path, capsys):
    from sparsedge.cli import main

    path, _ = ckpts["resnet"]
    out = tmp_path / "c.sparsedge"
    assert main(["convert", str(path), "-o", str(out), "--arch", ARCH + "resnet_small", "--shape",
                 "x:batch,3,16,16", "--prune", "block:4x1:0.8", "--quant", "int8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "top-1 agreement" in text
    assert out.exists()
    assert main(["convert", str(path), "-o", str(tmp_path / "d.sparsedge"), "--arch", "nosuchmod:f"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchmod" in err[0]
    assert main(["convert", str(path), "-o", str(tmp_path / "d.sparsedge"), "--arch", ARCH + "resnet_small",
                 "--shape", "x:batch;3"]) == 1
    assert "--shape" in capsys.readouterr().err
    assert not (tmp_path / "d.sparsedge").exists()


def test_composite_ops_decomposed():
    """scaled_dot_product_attention, split/chunk, leaky_relu, full mean map onto table ops."""
    import types

    import torch.nn.functional as F

    from sparsedge.loaders.export import capture

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 24)

        def forward(self, x, mask):
            q, k, v = self.lin(x).split(8, dim=-1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            c1, c2 = torch.chunk(x, 2, dim=-1)
            return F.leaky_relu(a, 0.1) + torch.cat([c2, c1], -1) + x.mean()

    mod = M().eval()
    g, t, _ = capture(mod, [("x", ["batch", "seq", 8], "float32"), ("mask", ["batch", "seq", "seq"], "float32")])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mk = rng.standard_normal((3, 5, 5)).astype(np.float32)
    out = run_reference(types.SimpleNamespace(graph=g, tensors=t), {"x": x, "mask": mk})["output"]
    with torch.no_grad():
        ref = mod(torch.from_numpy(x), torch.from_numpy(mk)).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert g.inputs[1].shape == ["batch", "seq", "seq"]


def test_pt2_only_when_trusted(ckpts, tmp_path):
    from sparsedge.errors import CheckpointError

    _, model = ckpts["bert"]
    ids = torch.ones(2, 3, dtype=torch.long)
    d = torch.export.Dim.AUTO
    ep = torch.export.export(model, (ids, torch.ones(2, 3, dtype=torch.long)), dynamic_shapes={"input_ids": {0: d, 1: d},
                                                                "attention_mask": {0: d, 1: d}})
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    with pytest.raises(CheckpointError, match="pt2|torch.export"):
        sparsedge.convert(tmp_path / "m.pt2", tmp_path / "a.sparsedge", progress=False)
    assert not (tmp_path / "a.sparsedge").exists()
    res = sparsedge.convert(tmp_path / "m.pt2", tmp_path / "b.sparsedge", trusted=True,
                            shapes=["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"], progress=False)
    assert "trusted" in res.report["graph_from"]
    s = sparsedge.Session(str(tmp_path / "b.sparsedge"))
    assert s.get_inputs()[0].shape == ["batch", "seq"]
    f = feeds_for("bert")
    y = s.run(None, f)[0]
    ref = torch_out(model, f)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_output_names_tuple_and_dict():
    from sparsedge.loaders.export import capture

    class T(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x), x * 2.0

    class D(torch.nn.Module):
        def forward(self, x):
            return {"logits": x + 1.0, "probs": torch.softmax(x, dim=-1)}

    g, _, _ = capture(T().eval(), [("x", ["batch", 4], "float32")])
    assert [o.name for o in g.outputs] == ["output_0", "output_1"]
    g, _, _ = capture(D().eval(), [("x", ["batch", 4], "float32")])
    assert [o.name for o in g.outputs] == ["logits", "probs"]
    assert all(o.shape == ["batch", 4] for o in g.outputs)
