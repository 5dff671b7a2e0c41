"""Shape and dtype inference over a graph, symbolic (at load) or concrete (per input shape).

``infer(graph, tensors, input_shapes=None)``: with ``input_shapes=None`` the graph inputs'
declared shapes are used (symbolic dims stay strings, arithmetic on them gives expression
strings such as ``"batch*seq"``); with concrete input shapes every dim is an int and the
symbol bindings (``env``) resolve symbols used in ``reshape`` / ``expand`` targets.
Returns ``Shapes(shapes={value: list}, dtypes={value: str}, env={symbol: int})``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ModelFileError, UnsupportedOpError
from ..formats import optable

_FLOAT_OUT = {"linear", "conv2d", "batchnorm", "layernorm", "softmax", "masked_mean", "l2norm",
              "global_avgpool", "avgpool2d", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid",
              "tanh", "sqrt", "rsqrt", "exp", "erf"}


@dataclass
class Shapes:
    shapes: dict
    dtypes: dict
    env: dict


def tensor_shape(t, for_conv: bool = False) -> list:
    """Logical shape of a stored tensor (a conv weight's 4-D orig_shape when ``for_conv``)."""
    if isinstance(t, np.ndarray):
        return list(t.shape)
    orig = getattr(t, "orig_shape", None)
    if for_conv and orig is not None:
        return list(orig)
    return list(t.shape)


def tensor_dtype(t) -> str:
    """Value dtype a stored tensor takes in the graph (compressed/float formats -> float32)."""
    if isinstance(t, np.ndarray):
        return "bool" if t.dtype == np.bool_ else str(t.dtype)
    if getattr(t, "kind", None) == "dense":
        d = t.dtype
        return "float32" if d in ("float16", "bfloat16") else d
    return "float32"


def _np_name(dt) -> str:
    dt = np.dtype(dt)
    return "bool" if dt == np.bool_ else str(dt)


def out_dtypes(op: str, attrs: dict, in_dtypes: list) -> list:
    if op == "cast":
        return [attrs["dtype"]]
    if op == "embedding":
        return [in_dtypes[1]]
    if op in _FLOAT_OUT:
        return ["float32"]
    if op in ("add", "sub", "mul", "div", "pow"):
        from .reference import result_dtype
        return [_np_name(result_dtype(op, in_dtypes[0], in_dtypes[1]))]
    if op == "where":
        from .reference import result_dtype
        return [_np_name(result_dtype(op, in_dtypes[1], in_dtypes[2]))]
    if op == "matmul":
        return ["float32" if "float32" in in_dtypes else in_dtypes[0]]
    return [in_dtypes[0]]


def bind_symbols(graph, input_shapes: dict) -> dict:
    """Bind the symbolic dims of the graph inputs to the concrete ``input_shapes``; raise
    ``InputError`` naming the input and field on rank / fixed-dim / inconsistent-symbol errors."""
    env: dict = {}
    origin: dict = {}
    for vi in graph.inputs:
        if vi.name not in input_shapes:
            raise InputError("missing input", tensor=vi.name)
        shp = tuple(input_shapes[vi.name])
        if len(shp) != len(vi.shape):
            raise InputError(f"expected rank {len(vi.shape)} (shape {list(vi.shape)}), got shape {list(shp)}",
                             tensor=vi.name, field="rank")
        for i, (d, n) in enumerate(zip(vi.shape, shp)):
            if isinstance(d, str):
                if d in env and env[d] != n:
                    raise InputError(f"dim {i} is symbol {d!r} = {n}, but input {origin[d]!r} bound it to {env[d]}",
                                     tensor=vi.name, field=f"shape[{i}]")
                env[d] = int(n)
                origin.setdefault(d, vi.name)
            elif d != n:
                raise InputError(f"dim {i} must be {d}, got {n} (expected shape {list(vi.shape)})",
                                 tensor=vi.name, field=f"shape[{i}]")
    return env


def infer(graph, tensors, input_shapes: dict | None = None, file=None) -> Shapes:
    """Infer every value's shape and dtype. Symbolic when ``input_shapes`` is None."""
    concrete = input_shapes is not None
    env = bind_symbols(graph, input_shapes) if concrete else {}
    shapes: dict = {}
    dtypes: dict = {}
    for vi in graph.inputs:
        shapes[vi.name] = list(input_shapes[vi.name]) if concrete else list(vi.shape)
        dtypes[vi.name] = vi.dtype
    for node in graph.nodes:
        if node.op in INTERNAL:
            _infer_internal(node, shapes, dtypes, concrete, file)
            continue
        if node.op not in optable.OPS:
            raise UnsupportedOpError(f"op {node.op!r} is not in the op table", node=node.name, file=file)
        spec = optable.spec(node.op)
        try:
            attrs = optable.with_defaults(node.op, node.attrs)
        except KeyError as e:
            raise ModelFileError(f"required attribute {e.args[0]!r} missing", node=node.name, file=file)
        ins, ids = [], []
        for k, name in enumerate(node.inputs):
            if name == "":
                ins.append(None)
                ids.append(None)
            elif name in shapes:
                ins.append(shapes[name])
                ids.append(dtypes[name])
            elif name in tensors:
                t = tensors[name]
                ins.append(tensor_shape(t, for_conv=(node.op == "conv2d" and k == 1)))
                ids.append(tensor_dtype(t))
            else:
                raise ModelFileError(f"input {name!r} is not defined before use", node=node.name, file=file)
        attrs["_env"] = env
        try:
            outs = spec.shape(ins, attrs)
        except (ValueError, IndexError, TypeError) as e:
            if concrete:
                raise InputError(f"shapes {ins} do not fit the op {node.op!r}: {e}", node=node.name,
                                 field="shape") from None
            raise ModelFileError(f"inconsistent shapes for op {node.op!r}: {e}", node=node.name,
                                 file=file) from None
        ods = out_dtypes(node.op, attrs, ids)
        for k, name in enumerate(node.outputs):
            shapes[name] = [int(d) for d in outs[k]] if concrete else list(outs[k])
            dtypes[name] = ods[min(k, len(ods) - 1)]
    return Shapes(shapes, dtypes, env)


# --- runtime-internal ops (created by the Session's load-time fusions, never in a model file) ---
def _attention_shape(ins, attrs):
    """_attention(q [B, Sq, H*D], k, v [B, Sk, H*D], mask?) -> [B, Sq, H, D] (the heads-last
    layout the fused transpose produced)."""
    q = ins[0]
    return [list(q[:2]) + [int(attrs["heads"]), int(attrs["head_dim"])]]


def _layernorm_add_shape(ins, attrs):
    """_layernorm_add(x, weight?, bias?, a1, a2?) -> x's shape (the addends broadcast into x)."""
    return [list(ins[0])]


INTERNAL = {"_attention": (_attention_shape, "float32"), "_layernorm_add": (_layernorm_add_shape, "float32")}


def _infer_internal(node, shapes, dtypes, concrete, file):
    rule, dt = INTERNAL[node.op]
    ins = [shapes.get(n) if n else None for n in node.inputs]
    if any(n and n not in shapes for n in node.inputs[:1]):
        raise ModelFileError(f"input {node.inputs[0]!r} is not defined before use", node=node.name, file=file)
    outs = rule(ins, node.attrs)
    for k, name in enumerate(node.outputs):
        shapes[name] = [int(d) for d in outs[k]] if concrete else list(outs[k])
        dtypes[name] = dt
