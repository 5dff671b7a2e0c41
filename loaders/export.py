"""Capture a torch ``nn.Module`` with torch.export and map it onto a sparsedge ``Graph``.

torch is imported lazily here: the rest of sparsedge never needs it.

``parse_shape("x:batch,3,224,224")`` -> ``("x", ["batch", 3, 224, 224], "float32")``;
``capture(module, shapes)`` -> ``(Graph, tensors, info)`` where symbolic dims stay symbolic:
each distinct symbol gets a distinct example size (2, 3, 5, 7, ...; never 1, which torch
specialises) and ``Dim.AUTO``, and the symbols torch creates are named after the user's.
"""
from __future__ import annotations

import importlib
import inspect
import re
import time

import numpy as np

from ..errors import ConversionError, InputError
from ..formats.graph import VALUE_DTYPES

_EXAMPLE_SIZES = (2, 3, 5, 7, 11, 13, 17, 19)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_shape(spec: str) -> tuple[str, list, str]:
    """``NAME:D1,D2,...[:DTYPE]`` -> (name, dims, dtype); a dim is an int or a symbol name."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InputError(f"--shape {spec!r}: expected NAME:D1,D2,...[:DTYPE], e.g. x:batch,3,224,224")
    name, dims_s = parts[0], parts[1]
    dtype = parts[2] if len(parts) == 3 else "float32"
    if dtype not in VALUE_DTYPES:
        raise InputError(f"--shape {spec!r}: dtype {dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    dims: list = []
    for d in dims_s.split(","):
        d = d.strip()
        if re.fullmatch(r"\d+", d):
            if int(d) < 1:
                raise InputError(f"--shape {spec!r}: dims must be >= 1")
            dims.append(int(d))
        elif _NAME.match(d):
            dims.append(d)
        else:
            raise InputError(f"--shape {spec!r}: dim {d!r} is neither an integer nor a symbol name")
    return name, dims, dtype


def load_factory(arch: str):
    """``package.module:factory`` -> the callable (imports the module)."""
    if ":" not in arch:
        raise InputError(f"--arch {arch!r}: expected package.module:factory")
    mod_name, fn_name = arch.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise InputError(f"--arch {arch!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise InputError(f"--arch {arch!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def default_shapes(arch: str):
    """Shapes a factory module declares for its factory (``SHAPES = {"factory": [...]}``), or None."""
    load_factory(arch)
    mod_name, fn_name = arch.split(":", 1)
    mod = importlib.import_module(mod_name)
    return (getattr(mod, "SHAPES", {}) or {}).get(fn_name)


def build_module(arch: str, state_dict: dict | None):
    """Instantiate the factory and load ``state_dict`` (numpy arrays) strictly."""
    import torch

    model = load_factory(arch)()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    if state_dict is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
            raise ConversionError(f"checkpoint does not fit --arch {arch}: " + "; ".join(parts))
        sd = {}
        for k, v in state_dict.items():
            v = np.asarray(v)
            if tuple(v.shape) != tuple(own[k].shape):
                raise ConversionError(f"shape {tuple(v.shape)} does not fit the model's {tuple(own[k].shape)}",
                                      tensor=k)
            sd[k] = torch.from_numpy(np.array(v)).to(own[k].dtype)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def example_inputs(shapes: list, seed: int = 0) -> tuple[dict, dict]:
    """(example tensors by name, {(name, axis): symbol}) for export."""
    import torch

    sizes: dict = {}
    names = {}
    g = torch.Generator().manual_seed(seed)
    ex = {}
    for name, dims, dtype in shapes:
        concrete = []
        for ax, d in enumerate(dims):
            if isinstance(d, str):
                if d not in sizes:
                    sizes[d] = _EXAMPLE_SIZES[len(sizes) % len(_EXAMPLE_SIZES)]
                names[(name, ax)] = d
                concrete.append(sizes[d])
            else:
                concrete.append(d)
        if dtype == "float32":
            ex[name] = torch.randn(*concrete, generator=g)
        elif dtype == "bool":
            ex[name] = torch.ones(*concrete, dtype=torch.bool)
        else:
            ex[name] = torch.ones(*concrete, dtype=getattr(torch, dtype))
    return ex, names


def forward_arg_names(model) -> list[str]:
    sig = inspect.signature(model.forward)
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def export_program(model, shapes: list):
    """torch.export with ``Dim.AUTO`` on symbolic dims; returns (ExportedProgram, dim names, seconds)."""
    import torch
    from torch.export import Dim, export

    fwd = forward_arg_names(model)
    given = [s[0] for s in shapes]
    unknown = [n for n in given if n not in fwd]
    if unknown:
        raise InputError(f"--shape names {unknown} are not arguments of forward({', '.join(fwd)})")
    ordered = [n for n in fwd if n in given]
    # arguments must be given in order, without gaps (later ones may use their defaults)
    if ordered != fwd[: len(ordered)]:
        missing = [n for n in fwd[: fwd.index(ordered[-1]) + 1] if n not in given]
        raise InputError(f"--shape missing for forward argument(s) {missing}")
    by_name = {s[0]: s for s in shapes}
    ex, names = example_inputs([by_name[n] for n in ordered])
    dyn = {}
    for n in ordered:
        dyn[n] = {ax: Dim.AUTO for (nm, ax) in names if nm == n} or None
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ep = export(model, tuple(ex[n] for n in ordered), dynamic_shapes=dyn)
            ep = ep.run_decompositions({})
    except ConversionError:
        raise
    except Exception as e:  # torch's own errors: keep their first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"torch.export failed: {type(e).__name__}: {first}") from e
    # every symbolic dim must have stayed symbolic
    for n in ordered:
        ph = next(p for p in ep.graph.nodes if p.op == "placeholder" and p.name == n)
        for (nm, ax), sym in names.items():
            d = ph.meta["val"].shape[ax] if nm == n else None
            if d is not None and (isinstance(d, int) or getattr(getattr(d, "node", None), "expr", None) is not None
                                  and d.node.expr.is_number):
                raise ConversionError(
                    f"dim {ax} of input {n!r} ({sym!r}) was specialised to {int(d)} by "
                    f"torch.export: the model needs it fixed; give a number instead")
    return ep, names, time.perf_counter() - t0


_EP_CACHE: dict = {}


def _cache_key(arch, model, shapes):
    sd = model.state_dict()
    return (arch, type(model).__module__, type(model).__qualname__,
            tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()),
            tuple((n, tuple(d), t) for n, d, t in shapes))


def capture(model, shapes: list, arch: str | None = None):
    """Export ``model`` and map it: returns (Graph, tensors, info dict).

    With ``arch`` (the factory that built ``model``), exported programs are cached in-process by
    factory, state_dict layout and shapes (the graph does not depend on the weight values); the
    mapping always uses ``model``'s current parameters and buffers."""
    from .aten_map import map_exported

    key = _cache_key(arch, model, shapes) if arch else None
    if key is not None and key in _EP_CACHE:
        ep, names = _EP_CACHE[key]
        secs, cached = 0.0, True
    else:
        ep, names, secs = export_program(model, shapes)
        cached = False
        if key is not None:
            _EP_CACHE[key] = (ep, names)
    params = dict(model.state_dict())
    params.update({k: v for k, v in model.named_buffers()})
    graph, tensors, stats = map_exported(ep, names, params=params)
    info = {"export_seconds": round(secs, 3), "export_cached": cached, **stats}
    return graph, tensors, info


def capture_pt2(path, shapes: list):
    """A torch.export ``.pt2`` archive (``--trusted`` only: ``torch.export.load`` may run pickled
    code) -> (Graph, tensors, info, callable module). Symbolic dims take their names from
    ``shapes`` where given (by input and axis), else "batch" for axis 0 and ``NAME_dAXIS``."""
    import torch
    from torch.export import load

    from .aten_map import map_exported

    t0 = time.perf_counter()
    try:
        ep = load(str(path)).run_decompositions({})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"torch.export.load failed: {type(e).__name__}: {first}", file=str(path)) from e
    given = {n: dims for n, dims, _ in shapes}
    names = {}
    user = set(ep.graph_signature.user_inputs)
    for ph in ep.graph.nodes:
        if ph.op != "placeholder" or ph.name not in user or not hasattr(ph.meta.get("val"), "shape"):
            continue
        for ax, d in enumerate(ph.meta["val"].shape):
            if isinstance(d, torch.SymInt):
                g = given.get(ph.name)
                names[(ph.name, ax)] = g[ax] if g and ax < len(g) and isinstance(g[ax], str) else \
                    ("batch" if ax == 0 else f"{ph.name}_d{ax}")
    graph, tensors, stats = map_exported(ep, names)
    info = {"export_seconds": round(time.perf_counter() - t0, 3), **stats}
    return graph, tensors, info, ep.module()
