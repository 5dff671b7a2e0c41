"""Validate a graph (as parsed JSON, or a ``Graph``) against the op table (``formats/optable.py``).

Checks, in one pass over the nodes (which must be in topological order):
* structure and types of every field (inputs/outputs ``ValueInfo``, nodes, attrs, act_quant);
* node names unique; every op known (else ``UnsupportedOpInFileError``);
* input count per ``OpSpec`` (optional trailing inputs may be omitted or ""; variadic >= 1);
  every non-empty input defined before use: a graph input, a stored tensor, or an earlier node's
  output (so the graph is acyclic); every value defined once (SSA); ``n_outputs`` outputs;
* attrs: unknown ones rejected, required ones present, each of its declared type;
* compressed tensors (any kind but ``dense``) are consumed only at an op's ``weight_input``;
* graph outputs defined; ``act_quant`` valid and naming defined values.
Every failure raises ``ModelFileError`` (or ``UnsupportedOpInFileError``) naming file, node and field.
"""
from __future__ import annotations

import json
import math

import numpy as np

from ..errors import ModelFileError, UnsupportedOpInFileError
from . import optable
from .actquant import validate_act_quant
from .graph import VALUE_DTYPES, Graph, Node, ValueInfo

MAX_NAME = 4096  # characters in a value / node name
MAX_RANK = 16  # dims of a declared value
MAX_LIST = 4096  # elements of a list attribute


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, np.ndarray)):
        return list(o.tolist() if isinstance(o, np.ndarray) else o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _err(msg, file, node=None, field=None):
    raise ModelFileError(msg, file=file, node=node, field=field)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_num(v):
    """An int or float (not bool) that is a finite float64 (huge ints refused, no OverflowError)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        return abs(v) < 2 ** 1000
    return math.isfinite(v)


def _name_ok(v):
    return isinstance(v, str) and 0 < len(v) <= MAX_NAME


def _check_dims(dims, file, node, field, *, allow_neg=False):
    if not isinstance(dims, list) or len(dims) > MAX_RANK:
        _err(f"must be a list of at most {MAX_RANK} dims", file, node, field)
    for d in dims:
        if _is_int(d):
            if (d < -1 if allow_neg else d < 0) or d >= 2 ** 62:
                _err(f"bad dim {d}", file, node, field)
        elif not (isinstance(d, str) and 0 < len(d) <= 256):
            _err(f"dims must be ints or non-empty symbol strings, got {d!r}", file, node, field)


def _value_info(d, file, field):
    if not isinstance(d, dict) or set(d) != {"name", "dtype", "shape"}:
        _err("each entry must be an object with exactly name, dtype, shape", file, None, field)
    if not _name_ok(d["name"]):
        _err(f"bad value name {d['name']!r}", file, None, field)
    if d["dtype"] not in VALUE_DTYPES or not isinstance(d["dtype"], str):
        _err(f"dtype must be one of {list(VALUE_DTYPES)}, got {d['dtype']!r}", file, d["name"], field + ".dtype")
    _check_dims(d["shape"], file, d["name"], field + ".shape")
    return ValueInfo(d["name"], d["dtype"], list(d["shape"]))


def _check_attr(op, node, key, typ, default, v, file):
    f = f"attrs.{key}"
    if v is None:
        if default is None:
            return
        _err(f"{op}: attribute may not be null", file, node, f)
    ok = True
    if typ == "int":
        ok = _is_int(v) and abs(v) < 2 ** 63
    elif typ == "float":
        ok = _finite_num(v)
    elif typ == "bool":
        ok = isinstance(v, bool)
    elif typ == "str":
        ok = isinstance(v, str) and len(v) <= MAX_NAME
    elif typ == "dtype":
        ok = isinstance(v, str) and v in VALUE_DTYPES
    elif typ in ("ints", "floats", "dims"):
        ok = isinstance(v, list) and len(v) <= MAX_LIST
        if ok and typ == "ints":
            ok = all(_is_int(x) and abs(x) < 2 ** 63 for x in v)
        elif ok and typ == "floats":
            ok = all(_finite_num(x) for x in v)
        elif ok:
            ok = all((_is_int(x) and -1 <= x < 2 ** 62) or (isinstance(x, str) and 0 < len(x) <= 256) for x in v)
    else:  # a type this module does not know: the op table grew; refuse rather than guess
        _err(f"{op}: attribute type {typ!r} not understood by this reader", file, node, f)
    if not ok:
        _err(f"{op}: attribute must be of type {typ}, got {v!r:.80}", file, node, f)


def check_graph(g, *, tensors: dict | None = None, file=None) -> Graph:
    """Validate ``g`` (a ``Graph`` or its JSON dict) and return it as a ``Graph``.

    ``tensors``: stored tensors by name (WeightFormat objects, or anything with ``.kind``);
    names only need to be keys. Raises ModelFileError / UnsupportedOpInFileError."""
    if isinstance(g, Graph):
        g = {"inputs": [v.to_json() if isinstance(v, ValueInfo) else v for v in g.inputs],
             "outputs": [v.to_json() if isinstance(v, ValueInfo) else v for v in g.outputs],
             "nodes": [n.to_json() if isinstance(n, Node) else n for n in g.nodes],
             "act_quant": g.act_quant}
        try:  # normalise as the file will hold it: tuples -> lists, numpy scalars -> Python numbers
            g = json.loads(json.dumps(g, default=_json_default, allow_nan=False))
        except (TypeError, ValueError) as e:
            _err(f"graph is not JSON-serialisable: {e}", file, None, "graph")
    tensors = tensors or {}
    if not isinstance(g, dict):
        _err("graph must be an object", file, None, "graph")
    extra = sorted(set(g) - {"inputs", "outputs", "nodes", "act_quant"})
    if extra or not {"inputs", "outputs", "nodes"} <= set(g):
        _err(f"graph must hold inputs, outputs, nodes (and act_quant); got keys {sorted(g)}", file, None, "graph")
    for k in ("inputs", "outputs", "nodes"):
        if not isinstance(g[k], list):
            _err("must be a list", file, None, f"graph.{k}")

    defined: dict[str, str] = {n: "tensor" for n in tensors}  # value name -> who defines it
    inputs = []
    for d in g["inputs"]:
        vi = _value_info(d, file, "graph.inputs")
        if vi.name in defined:
            _err(f"graph input {vi.name!r} clashes with a {defined[vi.name]} of that name", file, vi.name,
                 "graph.inputs")
        defined[vi.name] = "graph input"
        inputs.append(vi)

    later_outputs = set()
    for n in g["nodes"]:
        if isinstance(n, dict) and isinstance(n.get("outputs"), list):
            later_outputs.update(o for o in n["outputs"] if isinstance(o, str))

    names = set()
    nodes = []
    for i, n in enumerate(g["nodes"]):
        if not isinstance(n, dict):
            _err(f"node {i} must be an object", file, None, "graph.nodes")
        nm = n.get("name")
        if not _name_ok(nm):
            _err(f"node {i}: bad or missing name {nm!r}", file, None, "name")
        extra = sorted(set(n) - {"op", "name", "inputs", "outputs", "attrs"})
        if extra or not {"op", "name", "inputs", "outputs"} <= set(n):
            _err(f"node keys must be op, name, inputs, outputs, attrs; got {sorted(n)}", file, nm, "node")
        if nm in names:
            _err("duplicate node name", file, nm, "name")
        names.add(nm)
        op = n["op"]
        if not isinstance(op, str):
            _err(f"op must be a string, got {op!r:.80}", file, nm, "op")
        spec = optable.OPS.get(op)
        if spec is None:
            raise UnsupportedOpInFileError(f"unknown op {op!r:.80} (this runtime knows {len(optable.OPS)} ops)",
                                           file=file, node=nm, field="op")
        ins, outs, attrs = n["inputs"], n["outputs"], n.get("attrs", {})
        if not isinstance(ins, list) or not all(isinstance(x, str) and len(x) <= MAX_NAME for x in ins):
            _err("inputs must be a list of value names", file, nm, "inputs")
        nreq = len(spec.inputs) - len(spec.optional)
        if spec.variadic:
            ok = len(ins) >= max(1, nreq)
        else:
            ok = nreq <= len(ins) <= len(spec.inputs)
        if not ok:
            _err(f"{op} takes {nreq if spec.variadic else f'{nreq}..{len(spec.inputs)}'}"
                 f"{'+' if spec.variadic else ''} inputs, got {len(ins)}", file, nm, "inputs")
        for j, x in enumerate(ins):
            slot = spec.inputs[min(j, len(spec.inputs) - 1)]
            if x == "":
                if slot not in spec.optional:
                    _err(f"input {j} ({slot}) of {op} is required", file, nm, "inputs")
                continue
            if x not in defined:
                why = (" (produced later: the graph is cyclic or not in topological order)"
                       if x in later_outputs else "")
                _err(f"input {j} ({slot}) {x!r:.80} is not defined before use{why}", file, nm, "inputs")
            t = tensors.get(x) if defined[x] == "tensor" else None
            kind = getattr(t, "kind", "dense")
            if kind != "dense" and slot != spec.weight_input:
                _err(f"input {j} ({slot}) of {op} is the compressed tensor {x!r} ({kind}); compressed "
                     f"tensors may only feed an op's weight input", file, nm, "inputs")
        if not isinstance(outs, list) or len(outs) != spec.n_outputs or not all(_name_ok(o) for o in outs):
            _err(f"{op} has {spec.n_outputs} output(s): outputs must list that many names", file, nm, "outputs")
        for o in outs:
            if o in defined:
                _err(f"output {o!r:.80} is already defined (by a {defined[o]})", file, nm, "outputs")
            defined[o] = f"node {nm!r}"
        if not isinstance(attrs, dict):
            _err("attrs must be an object", file, nm, "attrs")
        for k, v in attrs.items():
            if k not in spec.attrs:
                _err(f"{op} has no attribute {k!r:.80} (known: {sorted(spec.attrs)})", file, nm, f"attrs.{k:.80}")
            typ, default = spec.attrs[k]
            _check_attr(op, nm, k, typ, default, v, file)
        for k, (typ, default) in spec.attrs.items():
            if default is optable.REQUIRED and k not in attrs:
                _err(f"{op} requires attribute {k!r}", file, nm, f"attrs.{k}")
        nodes.append(Node(op, nm, list(ins), list(outs), dict(attrs)))

    outputs = []
    seen = set()
    for d in g["outputs"]:
        vi = _value_info(d, file, "graph.outputs")
        if vi.name not in defined:
            _err("graph output is never defined", file, vi.name, "graph.outputs")
        if vi.name in seen:
            _err("duplicate graph output", file, vi.name, "graph.outputs")
        seen.add(vi.name)
        outputs.append(vi)
    aq = validate_act_quant(g.get("act_quant", {}), file=file, values=set(defined))
    return Graph(inputs, outputs, nodes, aq)
