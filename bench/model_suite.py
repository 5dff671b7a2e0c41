"""The model suite: whole models converted through ``sparsedge.convert`` at several compression
levels, run with ``sparsedge.runtime.Session``, side by side with onnxruntime on the same weights.

Models (``MODELS``):
  demo    the shipped digits MLP 64-1024-1024-1024-10 (``bench/data``), batch 360; torch-free
          (converter template path; the ONNX peer model is built with onnx.helper); accuracy on
          the held-out labels.
  bert    BERT-style encoder, 6 layers, hidden 384, 12 heads, FFN 1536, vocab 8192, sequence 128,
          batch 8, masked mean pooling (``bert_bench`` below, from ``bench.models.bert_small``);
          random init (seed 0); inputs: random token ids, the last 16 tokens of every other
          sequence masked out.
  resnet  ResNet-style CNN (ResNet-18 layout: width 64, stages 2-2-2-2, 10 classes; from
          ``bench.models.resnet_small``), batch 8, 3x64x64 inputs; random init (seed 0).
Levels: ``dense`` (``--format dense``), ``sparse90`` (``--prune 0.9``), ``sparse90_int8``
(``--prune 0.9 --quant int8``), formats chosen by the converter (``--format auto``) and
recorded. bert and resnet need torch (checkpoint -> ``--arch`` torch.export path; ONNX by
``torch.onnx.export(..., dynamo=False)``); without torch they are skipped.
Peers: ``ort_f32`` (onnxruntime float32 on the dense weights) and ``ort_int8`` (its
``quantize_dynamic`` QInt8 model), timed interleaved with the sparsedge levels.
Ratios: ``ratio_ort_f32`` = t(ort_f32)/t(case), ``ratio_ort_int8``, ``ratio_sparsedge_dense``
(= ``ratio_numpy_dense`` here: the dense level runs numpy BLAS) and ``ratio_best_peer``.
Memory: model file bytes, the planned activation arena (``Session.plan_info``), and in full mode
the peak RSS of a fresh process that loads the model and runs it once (sparsedge and onnxruntime).
Quick mode: small configs (bert 2x64, resnet width 16 on 32x32), the ``sparse90`` level and
``ort_f32`` only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import peers as P
from .timing import interleaved

MODEL_NAMES = ("demo", "bert", "resnet")
LEVELS = {"dense": dict(fmt="dense"), "sparse90": dict(prune="0.9"), "sparse90_int8": dict(prune="0.9", quant="int8")}
QUICK_LEVELS = ("sparse90",)

BERT = dict(vocab=8192, hidden=384, layers=6, heads=12, ffn=1536, max_pos=128, pooling="mean")
BERT_QUICK = dict(vocab=512, hidden=64, layers=2, heads=4, ffn=128, max_pos=32, pooling="mean")
RESNET = dict(num_classes=10, width=64, blocks=(2, 2, 2, 2))
RESNET_QUICK = dict(num_classes=10, width=16, blocks=(1, 1))


# --- factories for `sparsedge convert --arch sparsedge.bench.model_suite:NAME` ---------------------
def bert_bench():
    from .models import bert_small

    return bert_small(**BERT)


def bert_quick():
    from .models import bert_small

    return bert_small(**BERT_QUICK)


def resnet_bench():
    from .models import resnet_small

    return resnet_small(**RESNET)


def resnet_quick():
    from .models import resnet_small

    return resnet_small(**RESNET_QUICK)


SHAPES = {
    "bert_bench": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
    "bert_quick": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
    "resnet_bench": ["x:batch,3,64,64"],
    "resnet_quick": ["x:batch,3,32,32"],
}


def _feeds(name: str, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    if name == "bert":
        cfg = BERT_QUICK if quick else BERT
        b, s = (2, 32) if quick else (8, 128)
        ids = rng.integers(0, cfg["vocab"], size=(b, s), dtype=np.int64)
        mask = np.ones((b, s), np.int64)
        mask[1::2, -s // 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if name == "resnet":
        b, hw = (2, 32) if quick else (8, 64)
        return {"x": rng.standard_normal((b, 3, hw, hw)).astype(np.float32)}
    raise KeyError(name)


# --- helpers ------------------------------------------------------------------------------------------
def _mlp_onnx(weights: dict, n_layers: int, path: str) -> None:
    """The digits MLP as an ONNX graph (MatMul + Add + Relu), float32, batch dim symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    cur = "x"
    for i in range(n_layers):
        w = np.asarray(weights[f"layers.{i}.weight"], np.float32)
        bvec = np.asarray(weights[f"layers.{i}.bias"], np.float32)
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"), numpy_helper.from_array(bvec, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]))
        out = "output" if i == n_layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out if i == n_layers - 1 else f"a{i}"]))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        cur = out
    din = weights["layers.0.weight"].shape[1]
    dout = weights[f"layers.{n_layers - 1}.weight"].shape[0]
    g = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", din])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dout])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 9)
    onnx.save(m, path)


def _torch_export_onnx(model, feeds: dict, path: str) -> None:
    import torch

    args = tuple(torch.from_numpy(v) for v in feeds.values())
    dyn = {k: ({0: "batch", 1: "seq"} if v.ndim == 2 and v.dtype == np.int64 else {0: "batch"}) for k, v in feeds.items()}
    dyn["output"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=False, input_names=list(feeds), output_names=["output"],
                          dynamic_axes=dyn, opset_version=17)


_RSS_SCRIPT = r"""
import json, resource, sys
import numpy as np
kind, model, feeds_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
z = np.load(feeds_path, allow_pickle=False)
feeds = {k: z[k] for k in z.files}
if kind == "sparsedge":
    from sparsedge.runtime import Session
    s = Session(model, threads=threads)
    s.run(None, feeds); s.run(None, feeds)
else:
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    s.run(None, feeds); s.run(None, feeds)
# VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over fork+exec)
hwm = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
except OSError:
    pass
print("@@RSS@@" + json.dumps({"peak_rss_bytes": hwm if hwm is not None else
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def peak_rss(kind: str, model_path: str, feeds_path: str, threads: int) -> int | None:
    """Peak RSS (bytes) of a fresh process that loads ``model_path`` and runs it twice."""
    try:
        r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, kind, model_path, feeds_path, str(threads)],
                           capture_output=True, text=True, timeout=600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("@@RSS@@")]
        return int(json.loads(line[0][7:])["peak_rss_bytes"]) if line else None
    except Exception:
        return None


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


# --- the suite --------------------------------------------------------------------------------------
def run_models(names=None, *, quick=False, threads=None, budget=None, peers_filter=None, log=print) -> dict:
    """Run the model suite; returns ``{"cases", "skipped", "settings"}``."""
    names = list(names or MODEL_NAMES)
    budget = budget if budget is not None else (1.0 if quick else 8.0)
    cases, skipped = [], []
    for name in names:
        if name != "demo" and not _have_torch():
            skipped.append({"model": name, "reason": "needs torch (extra: convert) for the --arch path and ONNX export"})
            log(f"  {name}: skipped (no torch)")
            continue
        t0 = time.perf_counter()
        try:
            cases += _run_model(name, quick, threads, budget, peers_filter, log)
        except Exception as e:  # keep the other models; the error is in the JSON
            import traceback

            log(f"  {name}: failed: {type(e).__name__}: {e}")
            log(traceback.format_exc(limit=4))
            cases.append({"suite": "models", "id": f"models/{name}/error", "impl": "error", "kind": "sparsedge",
                          "model": name, "error": f"{type(e).__name__}: {e}"})
        log(f"  {name}: {time.perf_counter() - t0:.1f}s")
    return {"cases": cases, "skipped": skipped,
            "settings": {"models": names, "quick": quick, "budget_s": budget,
                         "levels": list(QUICK_LEVELS if quick else LEVELS), "bert": BERT_QUICK if quick else BERT,
                         "resnet": {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in (RESNET_QUICK if quick else RESNET).items()}}}


def _run_model(name, quick, threads, budget, peers_filter, log):
    from ..loaders import convert
    from ..runtime import Session

    levels = QUICK_LEVELS if quick else tuple(LEVELS)
    want_peers = [p for p in (("ort_f32",) if quick else ("ort_f32", "ort_int8"))
                  if peers_filter is None or p in peers_filter]
    if not P.installed().get("ort_f32"):
        want_peers = []
    with tempfile.TemporaryDirectory(prefix=f"sparsedge-bench-{name}-") as wd:
        labels = None
        ref = None
        if name == "demo":
            from .demo import DATA_DIR
            from .train_demo import read_safetensors

            src = str(DATA_DIR / "digits_mlp.safetensors")
            x = np.load(DATA_DIR / "digits_test_x.npy", allow_pickle=False)
            labels = np.load(DATA_DIR / "digits_test_y.npy", allow_pickle=False)
            feeds = {"x": x}
            conv_kw = {}
            calib = os.path.join(wd, "calib.npy")
            np.save(calib, x[:96], allow_pickle=False)
            conv_kw["calib"] = calib
            if want_peers:
                w = read_safetensors(src)
                _mlp_onnx(w, 4, os.path.join(wd, "model.onnx"))
        else:
            import torch

            from .train_demo import write_safetensors

            fac = f"{name}_{'quick' if quick else 'bench'}"
            torch.manual_seed(0)
            model = globals()[fac]()
            sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            src = os.path.join(wd, f"{name}.safetensors")
            write_safetensors(src, {k: v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int64)
                                    for k, v in sd.items()})
            feeds = _feeds(name, quick)
            with torch.no_grad():
                ref = model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
            conv_kw = {"arch": f"sparsedge.bench.model_suite:{fac}", "shapes": SHAPES[fac]}
            if want_peers:
                log(f"  {name}: torch.onnx.export")
                _torch_export_onnx(model, feeds, os.path.join(wd, "model.onnx"))
        fns, meta = {}, {}
        dense_out = None
        for lv in levels:
            path = os.path.join(wd, f"{name}_{lv}.sparsedge")
            tc = time.perf_counter()
            res = convert(src, path, progress=False, **conv_kw, **LEVELS[lv])
            conv_s = time.perf_counter() - tc
            tl = time.perf_counter()
            sess = Session(path, threads=threads)
            out = sess.run(None, feeds)[0]
            first_s = time.perf_counter() - tl
            if lv == "dense":
                dense_out = out
            fmts: dict = {}
            for ly in res.layers:
                fmts[ly.get("kind", "?")] = fmts.get(ly.get("kind", "?"), 0) + 1
            kern: dict = {}
            for r in sess.selection_report():
                kern[r.get("kernel", "?")] = kern.get(r.get("kernel", "?"), 0) + 1
            m = {"kind": "sparsedge", "level": lv, "file_bytes": os.path.getsize(path),
                 "arena_bytes": int(sess.plan_info({k: v.shape for k, v in feeds.items()})["arena_bytes"]),
                 "convert_s": conv_s, "first_run_s": first_s, "formats": fmts, "selection": kern, "path": path}
            if labels is not None:
                m["accuracy"] = float((out.argmax(-1) == labels).mean())
            if ref is not None:
                m["max_abs_err"] = float(np.max(np.abs(out - ref)))
                m["cosine_vs_torch"] = float(np.sum(out * ref) / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-30))
            meta[lv] = m
            fns[lv] = (lambda s=sess: s.run(None, feeds))
            log(f"  {name}/{lv}: {', '.join(f'{k} x{v}' for k, v in fmts.items())}; "
                f"{m['file_bytes'] / 2 ** 20:.2f} MB; converted {conv_s:.1f}s, first run {first_s:.2f}s")
        onnx_path = os.path.join(wd, "model.onnx")
        if want_peers:
            if "ort_int8" in want_peers:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import logging

                    logging.getLogger().setLevel(logging.ERROR)
                    P.quantize_dynamic_file(onnx_path, os.path.join(wd, "model.int8.onnx"))
            for p in want_peers:
                mp = onnx_path if p == "ort_f32" else os.path.join(wd, "model.int8.onnx")
                s = P.ort_session(mp, threads)
                o = s.run(None, feeds)[0]
                m = {"kind": "peer", "level": "dense", "file_bytes": os.path.getsize(mp), "path": mp}
                if labels is not None:
                    m["accuracy"] = float((o.argmax(-1) == labels).mean())
                if ref is not None:
                    m["max_abs_err"] = float(np.max(np.abs(o - ref)))
                meta[p] = m
                fns[p] = (lambda s=s: s.run(None, feeds))
        log(f"  {name}: timing {len(fns)} implementations interleaved (~{budget:.0f}s)")
        timed = interleaved(fns, budget=budget, min_rounds=3 if quick else 7, rounds=30, round_time=0.05)
        if not quick:
            fpath = os.path.join(wd, "feeds.npz")
            np.savez(fpath, **feeds)
            for k, m in meta.items():
                m["peak_rss_bytes"] = peak_rss("sparsedge" if m["kind"] == "sparsedge" else "ort", m["path"], fpath,
                                               threads or os.cpu_count() or 1)
        t = {k: v["median"] for k, v in timed.items()}
        peer_t = {k: t[k] for k in t if meta[k]["kind"] == "peer"}
        best = min(peer_t, key=peer_t.get) if peer_t else None
        cases = []
        import numba

        for k, m in meta.items():
            c = {"suite": "models", "id": f"models/{name}/{k}", "group": f"models/{name}", "impl": k,
                 "kind": m["kind"], "model": name, "level": m["level"], "median_s": t[k], "time_s": timed[k],
                 "threads": int(threads or numba.get_num_threads()),
                 "ratio_ort_f32": (t["ort_f32"] / t[k]) if "ort_f32" in t else None,
                 "ratio_ort_int8": (t["ort_int8"] / t[k]) if "ort_int8" in t else None,
                 "ratio_sparsedge_dense": (t["dense"] / t[k]) if "dense" in t else None,
                 "ratio_numpy_dense": (t["dense"] / t[k]) if "dense" in t else None,
                 "best_peer": best, "ratio_best_peer": (peer_t[best] / t[k]) if best else None,
                 "shape": {"feeds": {f: list(v.shape) for f, v in feeds.items()}}}
            for key in ("file_bytes", "arena_bytes", "peak_rss_bytes", "accuracy", "max_abs_err", "cosine_vs_torch",
                        "convert_s", "first_run_s", "formats", "selection"):
                if key in m:
                    c[key] = m[key]
            cases.append(c)
        if dense_out is not None and ref is not None:
            log(f"  {name}: dense vs torch max abs err {np.max(np.abs(dense_out - ref)):.2e}")
        return cases
