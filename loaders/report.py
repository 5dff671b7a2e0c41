"""The accuracy report of a conversion, calibration inputs, and a tiny stderr progress bar.

``build_report(...)`` -> a JSON-able dict:

* ``inputs``: where the evaluation inputs came from (the calibration file, or generated ones,
  which the report says) and their shapes;
* ``layers``: per weight layer its format, sparsity, bytes before/after, the relative error of the
  weights ``||W' - W|| / ||W||`` and of the layer's output on the evaluation inputs (the layer run
  alone on the original model's activations, with static activation quantization emulated), and
  the predicted speed-up against dense float32;
* ``end_to_end``: per model output the max abs error and cosine similarity of the converted model
  against the original (torch when the model came from torch, else the numpy reference on the
  original weights), and top-1 agreement for classifiers;
* ``size``: dense float32 bytes, stored bytes, file bytes, compression ratio.

``write_report(report, dir)`` writes ``report.json``, ``report.md`` and ``report.png`` (accuracy
cost against compression per layer; skipped with a note when matplotlib is missing), each
atomically (temp file + fsync + rename).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from ..errors import InputError, SparsedgeError
from ..formats.atomic import atomic_write

# ------------------------------------------------------------------------------------------
# progress


class Progress:
    """``with Progress("calibrating", total) as p: p.update(i)``; a one-line bar on stderr.

    On a terminal the line is redrawn in place; otherwise one line is printed when the phase ends."""

    def __init__(self, desc: str, total: int, enabled: bool = True, stream=None):
        self.desc, self.total, self.enabled = desc, max(int(total), 1), enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.n = 0
        self._last = 0.0

    def update(self, n: int | None = None):
        self.n = self.n + 1 if n is None else n
        if self.enabled and self.tty:
            now = time.perf_counter()
            if now - self._last > 0.05 or self.n >= self.total:
                self._last = now
                self._draw()

    def _draw(self, end=""):
        frac = min(self.n / self.total, 1.0)
        w = 24
        bar = "#" * int(frac * w) + "-" * (w - int(frac * w))
        self.stream.write(f"\r{self.desc:<14} [{bar}] {self.n}/{self.total} {time.perf_counter() - self.t0:5.1f}s{end}")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled:
            if self.tty:
                self._draw("\n")
            elif exc[0] is None:
                self.stream.write(f"{self.desc}: {self.n}/{self.total} done in {time.perf_counter() - self.t0:.1f}s\n")
                self.stream.flush()
        return False


# ------------------------------------------------------------------------------------------
# evaluation inputs


def load_calib(path, graph) -> dict:
    """Calibration inputs from ``.npz`` (one array per graph input, by name) or ``.npy`` (models
    with one input). Validated against the graph's inputs; never unpickles."""
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError("calibration file not found", file=path) from None
    except (ValueError, OSError) as e:
        raise InputError(f"not a readable .npy/.npz without pickles: {e}", file=path) from None
    if isinstance(data, np.ndarray):
        if len(graph.inputs) != 1:
            raise InputError(f"a .npy file serves single-input models; give a .npz with arrays named "
                             f"{[v.name for v in graph.inputs]}", file=path)
        feeds = {graph.inputs[0].name: data}
    else:
        with data:
            feeds = {k: data[k] for k in data.files}
    out = {}
    for vi in graph.inputs:
        if vi.name not in feeds:
            raise InputError(f"calibration data lacks input {vi.name!r} (has {sorted(feeds)})", file=path)
        a = np.asarray(feeds[vi.name])
        if a.ndim != len(vi.shape):
            raise InputError(f"rank {a.ndim}, expected {len(vi.shape)} ({vi.shape})", file=path, tensor=vi.name)
        for d, n in zip(vi.shape, a.shape):
            if isinstance(d, int) and d != n:
                raise InputError(f"shape {a.shape} does not fit {vi.shape}", file=path, tensor=vi.name)
        if vi.dtype == "float32":
            if a.dtype.kind not in "fiu":
                raise InputError(f"dtype {a.dtype}, expected float32", file=path, tensor=vi.name)
            a = a.astype(np.float32)
        elif vi.dtype in ("int64", "int32"):
            if a.dtype.kind not in "iub":
                raise InputError(f"dtype {a.dtype}, expected {vi.dtype}", file=path, tensor=vi.name)
            a = a.astype(vi.dtype)
        else:
            a = a.astype(vi.dtype)
        out[vi.name] = np.ascontiguousarray(a)
    return out


def generate_inputs(graph, tensors, seed: int = 0, batch: int = 4) -> dict:
    """Inputs for models without calibration data: symbols get small sizes (first axis ``batch``,
    8 otherwise, 32 for spatial dims of 4-D inputs); floats ~ N(0, 1); ids within the embedding
    tables they index; masks are ones with a padded tail; token types zeros."""
    rng = np.random.default_rng(seed)
    sizes: dict = {}
    rows = {}
    for nd in graph.nodes:
        if nd.op == "embedding" and nd.inputs[1] in tensors:
            rows[nd.inputs[0]] = min(rows.get(nd.inputs[0], 1 << 30), int(np.shape(tensors[nd.inputs[1]])[0]))
    feeds = {}
    for vi in graph.inputs:
        shape = []
        for ax, d in enumerate(vi.shape):
            if isinstance(d, int):
                shape.append(d)
                continue
            if d not in sizes:
                v = batch if ax == 0 else (32 if len(vi.shape) == 4 else 8)
                cap = sizes.get(("cap", vi.name, ax))
                sizes[d] = min(v, cap) if cap else v
            shape.append(sizes[d])
        name = vi.name.lower()
        if vi.dtype == "float32":
            a = rng.standard_normal(shape).astype(np.float32)
        elif vi.dtype == "bool":
            a = np.ones(shape, dtype=bool)
        elif "mask" in name:
            a = np.ones(shape, dtype=vi.dtype)
            if len(shape) == 2 and shape[1] > 2:
                for i in range(1, shape[0]):
                    a[i, shape[1] - (i % (shape[1] - 1)):] = 0
        elif "type" in name:
            a = np.zeros(shape, dtype=vi.dtype)
        else:
            hi = rows.get(vi.name, 2)
            a = rng.integers(0, hi, size=shape).astype(vi.dtype)
        feeds[vi.name] = a
    return feeds


def batches(feeds: dict, size: int = 16) -> list:
    """Split feeds along axis 0 into chunks of ``size`` (all inputs share the batch axis)."""
    n = min((a.shape[0] for a in feeds.values() if a.ndim), default=1)
    if n <= size or any(a.ndim == 0 or a.shape[0] != n for a in feeds.values()):
        return [feeds]
    return [{k: a[i:i + size] for k, a in feeds.items()} for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------
# evaluation (numpy reference interpreter of runtime/reference.py, plus fake activation quant)


class _Model:
    def __init__(self, graph, tensors):
        self.graph, self.tensors = graph, tensors


def fake_quant(x: np.ndarray, p: dict) -> np.ndarray:
    lo, hi = (-128, 127) if p.get("dtype", "int8") == "int8" else (0, 255)
    s, z = float(p["scale"]), int(p["zero_point"])
    q = np.clip(np.rint(x / s) + z, lo, hi)
    return ((q - z) * s).astype(np.float32)


def run_graph(graph, tensors, feeds, keep_all=False, act_quant=None) -> dict:
    """Run ``graph`` on ``feeds`` with the numpy reference (weights: arrays or WeightFormats).
    ``act_quant``: {value: params} emulated as quantize-dequantize where a node reads the value."""
    from ..runtime import reference as R

    if not act_quant:
        return R.run_reference(_Model(graph, tensors), feeds, keep_all=keep_all)
    vals = dict(feeds)
    env: dict = {}
    for vi in graph.inputs:
        for d, n in zip(vi.shape, np.shape(feeds[vi.name])):
            if isinstance(d, str):
                env.setdefault(d, int(n))
    cache = {}

    def get(name):
        if name == "":
            return None
        if name in vals:
            return vals[name]
        if name not in cache:
            cache[name] = R.weight_dense(tensors[name])
        return cache[name]

    for nd in graph.nodes:
        ins = []
        for i, name in enumerate(nd.inputs):
            v = get(name)
            if i == 0 and name in act_quant and nd.op in ("linear", "conv2d"):
                v = fake_quant(v, act_quant[name])
            ins.append(v)
        for name, v in zip(nd.outputs, R.eval_node(nd, ins, env)):
            vals[name] = v
    return vals if keep_all else {v.name: vals[v.name] for v in graph.outputs}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def compare_outputs(ref: dict, got: dict, classifier: set) -> dict:
    out = {}
    for k, r in ref.items():
        g = got[k]
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        d = {"shape": list(np.shape(r)), "max_abs_err": float(np.abs(r64 - g64).max(initial=0.0)),
             "max_abs_ref": float(np.abs(r64).max(initial=0.0)), "cosine": cosine(r64, g64)}
        if k in classifier and r64.ndim == 2 and r64.shape[1] > 1:
            d["top1_agreement"] = float((r64.argmax(1) == g64.argmax(1)).mean())
        out[k] = d
    return out


def classifier_outputs(graph) -> set:
    """Outputs that look like class scores: 2-D, produced by linear (or softmax)."""
    prod = {o: nd for nd in graph.nodes for o in nd.outputs}
    out = set()
    for vi in graph.outputs:
        nd = prod.get(vi.name)
        if nd is not None and nd.op in ("linear", "softmax") and len(vi.shape) == 2:
            out.add(vi.name)
    return out


def layer_output_errors(graph, dense_tensors, hat_tensors, results, dense_vals, act_quant, evals=1):
    """Fill ``results[i].output_rel_err``: each layer alone, original activations in, the
    compressed weight (and activation quantization) against the original weight."""
    from ..runtime import reference as R

    by_name = {nd.name: nd for nd in graph.nodes}
    for res in results:
        nd = by_name.get(res.name)
        if nd is None:
            continue
        errs_num, errs_den = 0.0, 0.0
        for vals in dense_vals:
            x = vals.get(nd.inputs[0])
            if x is None:
                continue

            def ins(tensors, xq):
                return [xq] + [R.weight_dense(tensors[i]) if i in tensors else (vals.get(i) if i else None)
                               for i in nd.inputs[1:]]

            y = vals.get(nd.outputs[0])  # the original model's output of this layer
            if y is None:
                y = R.eval_node(nd, ins(dense_tensors, x))[0]
            xq = fake_quant(x, act_quant[nd.inputs[0]]) if nd.inputs[0] in act_quant else x
            yh = R.eval_node(nd, ins(hat_tensors, xq))[0]
            errs_num += float(np.sum((np.asarray(yh, np.float64) - y) ** 2))
            errs_den += float(np.sum(np.asarray(y, np.float64) ** 2))
        if errs_den > 0:
            res.output_rel_err = math.sqrt(errs_num / errs_den)
        elif errs_num == 0:
            res.output_rel_err = 0.0


# ------------------------------------------------------------------------------------------
# writing


def _atomic_write(path: str, data: bytes):
    with atomic_write(path) as f:
        f.write(data)


def _fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_err(e) -> str:
    return "n/a" if e is None else f"{e:.2e}"


def to_markdown(rep: dict) -> str:
    L = [f"# sparsedge conversion report", "",
         f"- source: `{rep.get('source')}`", f"- output: `{rep.get('output')}`",
         f"- graph from: {rep.get('graph_from')}",
         f"- evaluation inputs: {rep['inputs']['origin']} ({', '.join(f'{k} {v}' for k, v in rep['inputs']['shapes'].items())})",
         f"- converted model run by: {rep['end_to_end'].get('converted_engine')}; compared against: "
         f"{rep['end_to_end'].get('reference')}", ""]
    s = rep["size"]
    L += ["## Size", "", f"dense float32 {_fmt_bytes(s['dense_fp32_bytes'])} -> stored {_fmt_bytes(s['stored_bytes'])}"
          f" (file {_fmt_bytes(s['file_bytes'])}); compression {s['ratio']:.2f}x", ""]
    L += ["## End to end", "", "| output | max abs error | max abs value | cosine | top-1 agreement |",
          "|---|---|---|---|---|"]
    for k, d in rep["end_to_end"]["outputs"].items():
        t1 = f"{100 * d['top1_agreement']:.1f}%" if "top1_agreement" in d else "-"
        L.append(f"| {k} | {d['max_abs_err']:.3e} | {d['max_abs_ref']:.3e} | {d['cosine']:.6f} | {t1} |")
    if rep["end_to_end"].get("runtime_vs_reference") is not None:
        L += ["", f"runtime vs numpy reference on the compressed weights: max abs difference "
                  f"{rep['end_to_end']['runtime_vs_reference']:.3e}"]
    L += ["", "## Layers", "",
          "| layer | op | shape | format | density in -> out | quant | bytes before -> after | weight rel err | "
          "output rel err | predicted speed-up | runtime kernel |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["layers"]:
        fmt = r["kind"] + (f" {r['meta'].get('block')}" if r["meta"].get("block") else "") + \
            (f" {r['meta']['n']}:{r['meta']['m']}" if "n" in r["meta"] else "") + \
            (f" rank {r['meta']['rank']}" if "rank" in r["meta"] else "") + (" (skipped)" if r["skipped"] else "")
        L.append(f"| {r['name']} | {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {fmt} | "
                 f"{r['density_in']:.2f} -> {r['density']:.2f} | {r['quant'] or '-'} | "
                 f"{_fmt_bytes(r['bytes_before'])} -> {_fmt_bytes(r['bytes_after'])} | {_fmt_err(r['weight_rel_err'])} | "
                 f"{_fmt_err(r['output_rel_err'])} | {r['predicted_speedup']}x | {r.get('runtime_kernel') or '-'} |")
    L += ["", "Predicted speed-ups come from a simple model of the development machine's measured kernel "
              "speeds (relative to dense float32 BLAS); `sparsedge tune MODEL` measures them on the board.", ""]
    if rep.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    t = rep.get("timing", {})
    if t:
        L += ["## Timing", "", ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), ""]
    return "\n".join(L)


def plot(rep: dict, path: str) -> str | None:
    """Accuracy cost (output rel err) against compression (bytes ratio) per layer. Returns a note
    when the plot is skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not installed: report.png skipped (pip install sparsedge[plot])"
    rows = [r for r in rep["layers"] if r["bytes_after"] > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    xs = [r["bytes_before"] / r["bytes_after"] for r in rows]
    ys = [max(r["output_rel_err"] if r["output_rel_err"] is not None else r["weight_rel_err"], 1e-9) for r in rows]
    kinds = sorted({r["kind"] for r in rows})
    for k in kinds:
        pts = [(x, y) for x, y, r in zip(xs, ys, rows) if r["kind"] == k]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=k, s=24)
    for x, y, r in zip(xs, ys, rows):
        if len(rows) <= 40:
            ax.annotate(r["name"], (x, y), fontsize=6, alpha=0.7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("compression per layer (dense fp32 bytes / stored bytes)")
    ax.set_ylabel("relative output error of the layer")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy cost vs compression per layer")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return None


def write_report(rep: dict, out_dir) -> list:
    """Write report.json, report.md and report.png into ``out_dir`` (atomically each). Returns paths."""
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the report folder: {e.strerror}", file=out_dir) from None
    paths = []
    note = plot(rep, os.path.join(out_dir, "report.png"))
    if note:
        rep.setdefault("notes", []).append(note)
    else:
        paths.append(os.path.join(out_dir, "report.png"))
    _atomic_write(os.path.join(out_dir, "report.json"),
                  json.dumps(rep, indent=1, default=_json_default, allow_nan=False).encode())
    _atomic_write(os.path.join(out_dir, "report.md"), to_markdown(rep).encode())
    return [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")] + paths


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


# ------------------------------------------------------------------------------------------
# the report


def _sanitize(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def _torch_outputs(model, graph, feeds) -> dict:
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feeds[v.name])) for v in graph.inputs]
    with torch.no_grad():
        out = model(*args)
    names = [v.name for v in graph.outputs]
    if isinstance(out, dict):
        vals = [out[k] for k in names]
    elif isinstance(out, (tuple, list)):
        vals = list(out)
    else:
        vals = [out]
    return {n: v.detach().float().numpy() for n, v in zip(names, vals)}


def _concat(parts: list) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def build_report_dict(*, graph, tensors, encoded, results, feeds_chunks, dense_vals, act_quant, torch_model,
                      model_path, wfs, file_bytes, origin, progress=True) -> dict:
    """Everything the report says (see the module docstring); ``results`` get their output errors."""
    notes = []
    hat = dict(tensors)
    for name, (_k, _m, _a, _s2, orig, h) in encoded.items():
        hat[name] = h.reshape(orig)
    layer_output_errors(graph, tensors, hat, results, dense_vals, act_quant)
    out_names = [v.name for v in graph.outputs]
    ref_parts, conv_parts, rt_parts = [], [], []
    session = None
    engine = "numpy reference interpreter (runtime/reference.py) on the compressed weights"
    try:
        from ..runtime import Session

        session = Session(model_path)
        engine = "sparsedge runtime Session"
    except ImportError:
        notes.append("the runtime is not available: the converted model was evaluated with the numpy reference")
    except SparsedgeError as e:
        notes.append(f"the runtime could not load the converted model ({e}); evaluated with the numpy reference")
    with Progress("evaluating", len(feeds_chunks), progress) as pb:
        for i, (feeds, dv) in enumerate(zip(feeds_chunks, dense_vals)):
            if torch_model is not None:
                ref_parts.append(_torch_outputs(torch_model, graph, feeds))
            else:
                ref_parts.append({k: dv[k] for k in out_names})
            conv = run_graph(graph, hat, feeds, act_quant=act_quant)
            conv_parts.append(conv)
            if session is not None:
                outs = session.run(None, feeds)
                rt_parts.append(dict(zip(out_names, outs)))
            pb.update(i + 1)
    ref = _concat(ref_parts)
    conv = _concat(conv_parts)
    rt_vs_ref = None
    if rt_parts:
        rt = _concat(rt_parts)
        rt_vs_ref = max(float(np.abs(np.asarray(rt[k], np.float64) - conv[k]).max(initial=0.0)) for k in out_names)
        conv = rt
    kernels = {}
    if session is not None:
        try:
            for row in session.selection_report():
                kernels.setdefault(row.get("node"), f"{row.get('kernel')} ({row.get('why')})")
        except Exception as e:  # the report must not fail on a runtime reporting problem
            notes.append(f"runtime selection report unavailable: {e}")
    cls = classifier_outputs(graph)
    dense_bytes = int(sum(np.asarray(t).size * 4 if np.asarray(t).dtype.kind == "f" else np.asarray(t).nbytes
                          for t in tensors.values()))
    stored = int(sum(w.nbytes for w in wfs.values()))
    shapes = {k: list(np.shape(v)) for k, v in _concat(feeds_chunks).items()}
    rep = {
        "inputs": {"origin": origin, "shapes": shapes},
        "layers": [dict(r.to_json(), runtime_kernel=kernels.get(r.name)) for r in results],
        "end_to_end": {"reference": "torch (the original module)" if torch_model is not None
                       else "numpy reference interpreter on the original weights",
                       "converted_engine": engine, "outputs": compare_outputs(ref, conv, cls),
                       "runtime_vs_reference": rt_vs_ref},
        "size": {"dense_fp32_bytes": dense_bytes, "stored_bytes": stored, "file_bytes": int(file_bytes),
                 "ratio": dense_bytes / stored if stored else 0.0},
        "act_quant": {k: v for k, v in act_quant.items()},
        "notes": notes,
    }
    return _sanitize(rep)
