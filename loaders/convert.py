"""``sparsedge.convert``: a PyTorch checkpoint or Hugging Face folder -> a compressed model file.

Pipeline: read the checkpoint safely (``loaders.checkpoint``, never torch.load); fold
``torch.nn.utils.prune`` pairs; get the graph (``--arch`` with torch.export, or a torch-free
template from ``config.json``); resolve per-layer plans (flags + recipe); prune / low-rank /
quantize and choose formats; calibrate static activation scales; write the model file; build
the accuracy report. The model is written to a hidden temp file beside OUT and renamed only when
everything (report included) succeeded: an interrupted or failed conversion never leaves a file
at OUT.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConversionError, InputError, SparsedgeError
from . import compress as C
from .recipe import check_recipe, describe, load_recipe, resolve_plans
from .report import (Progress, batches, build_report_dict, generate_inputs, load_calib, run_graph, write_report)

CONVERTER_VERSION = "0.1.0"


@dataclass
class ConversionResult:
    path: str
    report: dict
    layers: list = field(default_factory=list)  # per-layer dicts (as in the report)
    report_files: list = field(default_factory=list)

    def __repr__(self):
        s = self.report.get("size", {})
        return (f"<ConversionResult {self.path} layers={len(self.layers)} "
                f"ratio={s.get('ratio', 0):.2f}x>")


def _shapes_list(shapes) -> list:
    from .export import parse_shape

    if shapes is None:
        return []
    if isinstance(shapes, str):
        shapes = [shapes]
    if isinstance(shapes, dict):
        out = []
        for name, spec in shapes.items():
            if isinstance(spec, str):
                out.append(parse_shape(f"{name}:{spec}"))
            else:
                dims, dtype = (spec[0], spec[1]) if len(spec) == 2 and isinstance(spec[1], str) \
                    and not isinstance(spec[0], (int, str)) else (spec, "float32")
                out.append(parse_shape(f"{name}:{','.join(str(d) for d in dims)}:{dtype}"))
        return out
    return [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]


def _source_kind(source: str):
    """("folder", folder) | ("file", folder-with-config-or-None)."""
    if os.path.isdir(source):
        return "folder", source
    if not os.path.exists(source):
        raise InputError("source not found", file=source)
    d = os.path.dirname(os.path.abspath(source))
    return "file", d if os.path.isfile(os.path.join(d, "config.json")) else None


def _weight_formats(graph, tensors, encoded):
    """{name: WeightFormat} for the model file: encoded layer weights and dense everything else."""
    from ..formats.base import FORMATS
    from ..formats import dense as _dense  # noqa: F401  (registers "dense")

    out = {}
    for name, arr in tensors.items():
        if name in encoded:
            kind, meta, arrays, shape2d, orig, _hat = encoded[name]
            cls = FORMATS.get(kind)
            if cls is None:
                raise ConversionError(f"format {kind!r} is not available in this build", tensor=name)
            wf = cls.from_arrays(list(shape2d), meta, arrays, name=name,
                                 orig_shape=list(orig) if len(orig) != 2 else None)
        else:
            a = np.asarray(arr)
            if a.ndim == 0:  # scalars stored as [1] (broadcasts the same against any tensor of rank >= 1)
                a = a.reshape(1)
            if a.dtype.kind == "f" and a.dtype != np.float32:
                a = a.astype(np.float32)
            wf = FORMATS["dense"].from_arrays(list(a.shape), {}, {"values": np.array(a, order="C", copy=True)},
                                              name=name)
        out[name] = wf
    return out


def _fuse(graph, tensors) -> dict:
    """Fusion passes that need concrete shapes (from generated example inputs)."""
    from ..runtime.shapes import infer
    from .aten_map import compose_transposes, fuse_masked_mean, fuse_softmax_mask

    stats = {"transposes_composed": compose_transposes(graph), "masked_mean_fused": fuse_masked_mean(graph, tensors)}
    feeds = generate_inputs(graph, tensors, batch=2)
    try:
        sh = infer(graph, tensors, {k: v.shape for k, v in feeds.items()}).shapes
    except SparsedgeError:
        sh = {}
    stats["softmax_masks_fused"] = fuse_softmax_mask(graph, sh)
    return stats


def _import_formats():
    import importlib
    import pkgutil

    from .. import formats

    for m in pkgutil.iter_modules(formats.__path__):
        if m.name not in ("cli",):
            importlib.import_module(f"{formats.__name__}.{m.name}")


def convert(source, output, *, arch=None, shapes=None, state_dict_key=None, prune=None, quant=None,
            lowrank=None, fmt="auto", recipe=None, calib=None, report_dir=None, trusted=False,
            progress=True) -> ConversionResult:
    """Convert ``source`` (checkpoint file or HF folder) to the model file ``output``.

    ``arch``: "package.module:factory" (needs torch); ``shapes``: ["x:batch,3,224,224", ...] or
    {"x": "batch,3,224,224"}; ``prune``/``quant``/``lowrank``/``fmt``: the flag grammar (see
    ``loaders.compress``); ``recipe``: a TOML/JSON path or a dict; ``calib``: .npy/.npz path;
    ``report_dir``: where report.md/json/png go (the report dict is always returned).
    Returns a ``ConversionResult`` (.path, .report, .layers). Raises ``SparsedgeError`` subclasses.
    """
    t_start = time.perf_counter()
    timing = {}
    source = os.fspath(source)
    output = os.fspath(output)
    # validate every flag before any slow work
    flags = {"prune": prune, "quant": quant, "lowrank": lowrank, "format": fmt}
    C.parse_prune(prune), C.parse_quant(quant), C.parse_lowrank(lowrank), C.parse_format(fmt)
    rec = None
    if recipe is not None:
        rec = check_recipe(recipe, "<recipe>") if isinstance(recipe, dict) else load_recipe(recipe)
    shape_list = _shapes_list(shapes)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise InputError("output folder does not exist", file=out_dir)
    if os.path.isdir(output):
        raise InputError("output is a folder; give a file path", file=output)
    kind, cfg_dir = _source_kind(source)
    _import_formats()
    if arch is not None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConversionError("--arch needs torch (pip install sparsedge[convert]); without torch use a "
                                  "Hugging Face folder with config.json") from None
        from .export import load_factory

        load_factory(arch)  # import errors now, before the slow work

    # ---- weights --------------------------------------------------------------------------
    from .checkpoint import Pt2ArchiveError, load_state_dict

    t0 = time.perf_counter()
    pt2 = None
    try:
        sd = load_state_dict(source, key=state_dict_key, trusted=trusted)
    except Pt2ArchiveError as e:  # only raised with trusted=True
        pt2, sd = e.path, {}
    sd, folded = C.fold_torch_prune(sd)
    timing["read_checkpoint"] = time.perf_counter() - t0
    notes = []
    if folded:
        notes.append(f"folded torch.nn.utils.prune masks into {len(folded)} weight(s)")

    # ---- graph ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    torch_model = None
    if pt2 is not None:
        from .export import capture_pt2

        graph, tensors, info, torch_model = capture_pt2(pt2, shape_list)
        graph_from = f"torch.export archive {os.path.basename(pt2)} (trusted)"
    elif arch is not None:
        from .export import build_module, capture, default_shapes, parse_shape

        if not shape_list:
            ds = default_shapes(arch)
            if not ds:
                raise InputError("--shape is required with --arch (e.g. --shape x:batch,3,224,224)")
            shape_list = [parse_shape(s) for s in ds]
        torch_model = build_module(arch, sd)
        graph, tensors, info = capture(torch_model, shape_list, arch=arch)
        graph_from = f"torch.export of {arch}"
    else:
        from . import templates

        if cfg_dir is None:
            raise InputError("give --arch module:factory (with torch), or a folder with config.json "
                             "(Hugging Face BERT or the MLP template)", file=source)
        cfg = templates.read_config(cfg_dir)
        graph, tensors, info = templates.build(cfg_dir, sd, cfg)
        graph_from = f"template {info.get('template')} from {os.path.join(cfg_dir, 'config.json')}"
    info.update(_fuse(graph, tensors))
    timing["graph"] = time.perf_counter() - t0
    if info.get("unused_tensors"):
        notes.append(f"checkpoint tensors not used by the graph: {', '.join(info['unused_tensors'][:5])}"
                     + (" ..." if len(info["unused_tensors"]) > 5 else ""))

    # ---- plans and compression -----------------------------------------------------------------
    t0 = time.perf_counter()
    layers = C.weight_layers(graph, tensors)
    plans, pnotes = resolve_plans([nd.name for nd in layers], flags, rec)
    notes += pnotes
    with Progress("compressing", len(layers), progress) as pb:
        encoded, results = C.compress(graph, tensors, plans, progress=pb)
    timing["compress"] = time.perf_counter() - t0

    # ---- evaluation inputs, calibration ----------------------------------------------------------
    t0 = time.perf_counter()
    if calib is not None:
        feeds = load_calib(calib, graph)
        origin = f"calibration file {os.path.basename(os.fspath(calib))}"
    else:
        feeds = generate_inputs(graph, tensors)
        origin = "generated (random; no --calib given)"
    chunks = batches(feeds)
    dense_vals = []
    with Progress("calibrating", len(chunks), progress) as pb:
        for i, ch in enumerate(chunks):
            dense_vals.append(run_graph(graph, tensors, ch, keep_all=True))
            pb.update(i + 1)
    static = {nd.name: plans[nd.name].quant for nd in layers
              if plans[nd.name].quant is not None and plans[nd.name].quant.static and not plans[nd.name].skip}
    act_quant = {}
    if static:
        by_name = {nd.name: nd for nd in layers}
        if calib is None:
            notes.append("static activation scales calibrated on generated inputs: give --calib with real data")
        for lname, q in static.items():
            v = by_name[lname].inputs[0]
            if v in act_quant:
                continue
            samples = [vals[v] for vals in dense_vals if v in vals]
            act_quant[v] = C.act_quant_params(samples, q.method, q.percentile)
        graph.act_quant = dict(act_quant)
    timing["calibrate"] = time.perf_counter() - t0

    # ---- write (temp file), report, then rename -------------------------------------------------
    wfs = _weight_formats(graph, tensors, encoded)
    metadata = {
        "source": os.path.basename(os.path.abspath(source)),
        "converter": f"sparsedge {CONVERTER_VERSION}",
        "graph_from": graph_from,
        "recipe": describe(flags, rec),
        "layers": {r.name: {"format": r.kind, "meta": r.meta, "sparsity": round(1.0 - r.density, 6),
                            "sparsity_in": round(1.0 - r.density_in, 6), "quant": r.quant or None,
                            "lowrank": r.lowrank or None, "skipped": r.skipped} for r in results},
        "graph_info": info,
    }
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.{os.getpid()}.partial")
    from ..formats.modelfile import write_model

    try:
        t0 = time.perf_counter()
        file_bytes = write_model(tmp, graph, wfs, metadata)
        timing["write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = build_report_dict(graph=graph, tensors=tensors, encoded=encoded, results=results,
                                feeds_chunks=chunks, dense_vals=dense_vals, act_quant=act_quant,
                                torch_model=torch_model, model_path=tmp, wfs=wfs, file_bytes=file_bytes,
                                origin=origin, progress=progress)
        timing["report"] = time.perf_counter() - t0
        timing["total"] = time.perf_counter() - t_start
        rep.update({"source": os.path.abspath(source), "output": os.path.abspath(output), "graph_from": graph_from,
                    "converter": f"sparsedge {CONVERTER_VERSION}", "recipe": describe(flags, rec),
                    "graph_info": info, "timing": {k: round(v, 3) for k, v in timing.items()}})
        rep["notes"] = notes + rep.get("notes", [])
        files = write_report(rep, report_dir) if report_dir is not None else []
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return ConversionResult(os.path.abspath(output), rep, rep["layers"], files)
