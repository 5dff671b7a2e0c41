"""Map a torch.export program (core aten ops) onto the sparsedge op table.

``map_exported(ep, dim_names)`` walks the FX graph of an ``ExportedProgram`` (inference IR,
i.e. after ``run_decompositions({})``) and returns ``(Graph, tensors, layers)``:

* ``Graph``: ``formats.graph.Graph``; value and node names come from the FX graph, nodes that
  carry a weight (``linear``, ``conv2d``) are named after the layer (``"layers.0.conv1"``);
* ``tensors``: ``{name: np.ndarray}`` every stored tensor in its torch layout (conv weights
  4-D ``[out, in/groups, kh, kw]``; the compressor views them 2-D);
* constant subgraphs (everything that does not depend on a user input) are evaluated with
  torch at conversion time; dropout, clones, no-op casts and shape assertions are removed.

Then the graph passes (``optimize``): batchnorm folded into the preceding conv, activations
fused into conv/linear (``activation`` attr), dead code removed, unused tensors dropped.

Every aten op without a mapping is collected, and all are reported in one
``UnsupportedOpError`` naming each op and the first FX node that uses it.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from ..errors import ConversionError, UnsupportedOpError
from ..formats.graph import Graph, Node, ValueInfo

_BIG = 2 ** 62

# --------------------------------------------------------------------------------------
# environment values


@dataclass
class Val:
    """A runtime graph value."""
    name: str
    dtype: str
    shape: list


@dataclass
class Const:
    """A tensor known at conversion time (parameter, buffer, folded constant)."""
    arr: np.ndarray
    name: str | None = None  # state_dict name for parameters and buffers


@dataclass
class Sym:
    """A symbolic int: ``dim`` is a symbol name, or None when it is an expression we cannot name."""
    dim: object
    src: tuple | None = None  # (graph input name, axis) it comes from, when it is a plain input dim


class _Pending:
    """A value only meaningful inside a recognised pattern (the norm of an l2 normalisation)."""


_PENDING = _Pending()


@dataclass
class Filled:
    """``full_like(like, value)``: kept lazy so that ``embedding(table, zeros_like(ids))`` folds."""
    like: Val
    value: object
    dtype: str


_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float32", "torch.bfloat16": "float32",
                 "torch.float64": "float32", "torch.int64": "int64", "torch.int32": "int32",
                 "torch.int8": "int8", "torch.uint8": "uint8", "torch.bool": "bool",
                 "torch.int16": "int32"}


def dtype_str(tdtype) -> str:
    s = str(tdtype)
    if s not in _TORCH_DTYPES:
        raise ConversionError(f"unsupported tensor dtype {s}")
    return _TORCH_DTYPES[s]


def to_numpy(t) -> np.ndarray:
    """A torch tensor as a numpy array (floats widened/narrowed to float32)."""
    import torch

    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype == torch.int16:
        t = t.to(torch.int32)
    return np.ascontiguousarray(t.cpu().numpy())


class Builder:
    """Accumulates nodes and stored tensors with unique names."""

    def __init__(self, reserved=()):
        self.nodes: list[Node] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.taken: set[str] = set(reserved)
        self._const_ids: dict[int, str] = {}

    def fresh(self, base: str) -> str:
        base = base or "v"
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    def add(self, op, inputs, attrs=None, name=None, out=None, n_out=1) -> str:
        name = self.fresh(name or op)
        outs = [out or name] if n_out == 1 else [self.fresh(f"{name}_out{i}") for i in range(n_out)]
        if out is not None:
            self.taken.add(out)
        self.nodes.append(Node(op, name, list(inputs), outs, dict(attrs or {})))
        return outs[0]

    def const(self, c, hint="const") -> str:
        """Store a constant (Const or ndarray) once and return its tensor name."""
        if isinstance(c, Const):
            key = id(c.arr)
            if key in self._const_ids:
                return self._const_ids[key]
            name = c.name if (c.name and c.name not in self.taken) else self.fresh(hint)
            self.taken.add(name)
            self.tensors[name] = c.arr
            self._const_ids[key] = name
            return name
        name = self.fresh(hint)
        self.tensors[name] = np.asarray(c)
        return name


# --------------------------------------------------------------------------------------
# the mapper


class _Unsupported(Exception):
    pass


def _bind(node) -> dict:
    """FX call args/kwargs bound to the op schema's argument names (defaults filled)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {"args": node.args, **node.kwargs}
    out = {}
    args = list(node.args)
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


class Mapper:
    def __init__(self, ep, dim_names: dict, params: dict | None = None):
        self.ep = ep
        self.params_override = params or {}
        self.gm = ep.graph_module
        self.sig = ep.graph_signature
        self.dim_names = dict(dim_names)  # {(input name, axis): symbol name}
        self.sym_names: dict = {}  # sympy symbol -> (name, (input, axis))
        self.env: dict = {}
        fx_names = [n.name for n in self.gm.graph.nodes]
        self.b = Builder(reserved=fx_names)
        self.unsupported: dict[str, str] = {}
        self.bounds: dict = {}  # symbol name -> max size (from range constraints) or None
        self.inputs: list[ValueInfo] = []
        self.outputs: list[ValueInfo] = []
        self.users = {n: list(n.users) for n in self.gm.graph.nodes}

    # ---- helpers ------------------------------------------------------------------
    def dim(self, d):
        """A torch size entry -> int or symbol name (None for a compound expression)."""
        if isinstance(d, int):
            return d
        try:
            expr = d.node.expr
        except AttributeError:
            return int(d)
        if getattr(expr, "is_number", False):
            return int(expr)
        hit = self.sym_names.get(expr)
        return hit[0] if hit else None

    def shape_of(self, fxnode) -> list:
        val = fxnode.meta.get("val")
        return [self.dim(d) if self.dim(d) is not None else "?" for d in val.shape]

    def dtype_of(self, fxnode) -> str:
        return dtype_str(fxnode.meta["val"].dtype)

    def val_for(self, fxnode, op, inputs, attrs=None, name=None) -> Val:
        out = self.b.add(op, inputs, attrs, name=name or fxnode.name, out=fxnode.name)
        return Val(out, self.dtype_of(fxnode), self.shape_of(fxnode))

    def inp(self, v, hint="const", dtype=None) -> str:
        """The graph-value name for an environment value (stores constants)."""
        if isinstance(v, Val):
            return v.name
        if isinstance(v, Const):
            return self.b.const(v, hint=hint)
        if isinstance(v, Filled):
            return self.materialize_filled(v).name
        if isinstance(v, (bool, int, float)):
            dt = dtype or ("float32" if isinstance(v, float) else "int64")
            return self.b.const(np.array(v, dtype=dt), hint=hint)
        raise _Unsupported(f"value of type {type(v).__name__}")

    def materialize_filled(self, f: Filled) -> Val:
        like = f.like
        x = like.name
        if like.dtype != f.dtype:
            x = self.b.add("cast", [x], {"dtype": f.dtype}, name="cast")
        zero = self.b.const(np.array(0, dtype=f.dtype), "zero")
        z = self.b.add("mul", [x, zero], name="zeros_like")
        if f.value not in (0, False):
            c = self.b.const(np.array(f.value, dtype=f.dtype), "fill")
            z = self.b.add("add", [z, c], name="full_like")
        return Val(z, f.dtype, list(like.shape))

    def is_const_arg(self, v) -> bool:
        if isinstance(v, (Val, Filled, _Pending)):
            return False
        if isinstance(v, Sym):
            return isinstance(v.dim, int)
        if isinstance(v, (list, tuple)):
            return all(self.is_const_arg(x) for x in v)
        return True

    # ---- main walk ------------------------------------------------------------------
    def run(self):
        import torch

        ep = self.ep
        params = dict(ep.state_dict)
        constants = dict(getattr(ep, "constants", {}) or {})
        for k, v in self.params_override.items():
            if k in params:
                params[k] = v
            elif k in constants:
                constants[k] = v
        kinds = {}
        for spec in self.sig.input_specs:
            kinds[spec.arg.name] = (spec.kind.name, spec.target)
        user_inputs = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                kind, target = kinds.get(n.name, ("USER_INPUT", None))
                if kind == "USER_INPUT":
                    user_inputs.append(n)
        # name the symbols from the user inputs' shapes
        for n in user_inputs:
            val = n.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise ConversionError(f"forward argument {n.name!r} is not a tensor; only tensor inputs are supported")
            for ax, d in enumerate(val.shape):
                if isinstance(d, int):
                    continue
                expr = d.node.expr
                name = self.dim_names.get((n.name, ax)) or str(expr)
                if expr not in self.sym_names:
                    self.sym_names[expr] = (name, (n.name, ax))
        for expr, rng in (getattr(ep, "range_constraints", {}) or {}).items():
            if expr in self.sym_names:
                upper = rng.upper
                try:
                    upper = int(upper) if getattr(upper, "is_finite", True) else None
                except Exception:
                    upper = None
                self.bounds[self.sym_names[expr][0]] = upper if upper is not None and upper < _BIG else None
        for n in user_inputs:
            vi = ValueInfo(n.name, self.dtype_of(n), self.shape_of(n))
            if "?" in vi.shape:
                raise ConversionError(f"input {n.name!r}: unsupported symbolic shape {vi.shape}")
            self.inputs.append(vi)
            self.b.taken.add(n.name)

        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                kind, target = kinds.get(n.name, ("USER_INPUT", None))
                if kind == "USER_INPUT":
                    self.env[n] = Val(n.name, self.dtype_of(n), self.shape_of(n))
                elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                    t = params.get(target) if target in params else constants.get(target)
                    if t is None:
                        raise ConversionError(f"exported program lacks the tensor {target!r}")
                    self.env[n] = Const(to_numpy(t), target)
                else:
                    raise ConversionError(f"unsupported exported input kind {kind} ({n.name})")
            elif n.op == "call_function":
                try:
                    self.env[n] = self.call(n)
                except _Unsupported as e:
                    key = self.op_key(n)
                    self.unsupported.setdefault(key, f"{n.name}: {e}" if str(e) else n.name)
                    self.env[n] = None
            elif n.op == "output" and not self.unsupported:
                self.finish_outputs(n)
            elif n.op == "get_attr":
                t = getattr(self.gm, n.target)
                self.env[n] = Const(to_numpy(t), None) if isinstance(t, torch.Tensor) else None
                if self.env[n] is None:
                    self.unsupported.setdefault(f"get_attr:{n.target}", n.name)
        if self.unsupported:
            items = "; ".join(f"{k} (at {v})" for k, v in sorted(self.unsupported.items()))
            raise UnsupportedOpError(f"{len(self.unsupported)} unsupported op(s): {items}")
        graph = Graph(self.inputs, self.outputs, self.b.nodes)
        return graph, self.b.tensors

    @staticmethod
    def op_key(n) -> str:
        t = n.target
        return str(t) if hasattr(t, "_schema") else getattr(t, "__name__", str(t))

    def finish_outputs(self, n):
        import torch.utils._pytree as pytree

        outs = list(n.args[0])
        specs = [s for s in self.sig.output_specs]
        vals = []
        for s, o in zip(specs, outs):
            if s.kind.name != "USER_OUTPUT":
                raise ConversionError(f"the model mutates state ({s.kind.name}: {s.target}); export an inference model")
            vals.append(self.env.get(o) if o is not None else None)
        out_spec = self.ep.call_spec.out_spec
        names = None
        if out_spec is not None:
            if out_spec.type is dict:
                names = [str(k) for k in out_spec.context]
            elif out_spec.type in (tuple, list) and out_spec.num_leaves == len(vals) and len(vals) > 1:
                names = [f"output_{i}" for i in range(len(vals))]
        if names is None or len(names) != len(vals):
            names = ["output"] if len(vals) == 1 else [f"output_{i}" for i in range(len(vals))]
        del pytree
        renames = {}
        input_names = {v.name for v in self.inputs}
        for name, v, fxo in zip(names, vals, outs):
            if isinstance(v, Filled):
                v = self.materialize_filled(v)
            if not isinstance(v, Val):
                raise ConversionError(f"output {name!r} is a constant or not a tensor; nothing to compute")
            src = v.name
            if src in input_names or src in renames.values() or src in renames:
                src = self.b.add("cast", [src], {"dtype": v.dtype}, name=f"{name}_copy")
            renames[src] = name
            self.outputs.append(ValueInfo(name, v.dtype, self.shape_of(fxo) if fxo is not None else v.shape))
        _rename_values(self.b.nodes, renames)

    # ---- op dispatch ------------------------------------------------------------------
    def call(self, n):
        import torch

        t = n.target
        if t is operator.getitem:
            seq, idx = n.args
            v = self.env[seq]
            if isinstance(v, tuple):
                return v[idx]
            if isinstance(v, Const):
                return Const(np.asarray(v.arr)[idx])
            raise _Unsupported("getitem")
        if t in (operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv,
                 operator.neg, operator.mod) or getattr(t, "__module__", "") in ("math", "torch.sym_float"):
            return self.symbolic(n)
        key = self.op_key(n)
        a = _bind(n)
        args_env = {k: self.lookup(v) for k, v in a.items()}
        # constant folding: no argument depends on a user input
        if key not in _NO_FOLD and all(self.is_const_arg(v) for v in args_env.values()):
            return self.fold(n)
        h = _HANDLERS.get(key)
        if h is None:
            raise _Unsupported("")
        return h(self, n, args_env)

    def lookup(self, v):
        import torch.fx as fx

        if isinstance(v, fx.Node):
            return self.env[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.lookup(x) for x in v)
        return v

    def symbolic(self, n):
        val = n.meta.get("val")
        d = self.dim(val) if val is not None else None
        return Sym(d if d is not None else None)

    def fold(self, n):
        import torch
        import torch.fx as fx

        def conv(v):
            if isinstance(v, fx.Node):
                e = self.env[v]
                if isinstance(e, Const):
                    return torch.from_numpy(np.array(e.arr))
                if isinstance(e, Sym):
                    return e.dim
                if isinstance(e, tuple):
                    return tuple(torch.from_numpy(np.array(x.arr)) if isinstance(x, Const) else x for x in e)
                return e
            if isinstance(v, (list, tuple)):
                return type(v)(conv(x) for x in v)
            return v

        args = conv(tuple(n.args))
        kwargs = {k: conv(v) for k, v in n.kwargs.items()}
        try:
            res = n.target(*args, **kwargs)
        except Exception as e:  # pragma: no cover - torch refused to evaluate
            raise _Unsupported(f"constant folding failed: {e}")
        if isinstance(res, torch.Tensor):
            return Const(to_numpy(res))
        if isinstance(res, (tuple, list)):
            return tuple(Const(to_numpy(r)) if isinstance(r, torch.Tensor) else r for r in res)
        return res


def _rename_values(nodes, renames: dict):
    if not renames:
        return
    for nd in nodes:
        nd.inputs = [renames.get(x, x) for x in nd.inputs]
        nd.outputs = [renames.get(x, x) for x in nd.outputs]


# --------------------------------------------------------------------------------------
# handlers: (mapper, fx node, bound args with env values) -> env value

_HANDLERS: dict = {}
_NO_FOLD = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step"}


def _h(*keys):
    def deco(f):
        for k in keys:
            _HANDLERS[k] = f
        return f
    return deco


def _rank(v) -> int:
    return len(v.shape)


def _norm_axis(ax: int, rank: int) -> int:
    return ax + rank if ax < 0 else ax


def _identity(m, n, a):
    return a.get("self", a.get("input"))


for _k in ("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
           "aten.lift_fresh_copy.default", "aten.dropout.default", "aten.feature_dropout.default",
           "aten.alpha_dropout.default", "aten.native_dropout.default"):
    _HANDLERS[_k] = _identity


@_h("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default", "aten._assert_async.msg")
def _drop(m, n, a):
    return None


@_h("aten.sym_size.int")
def _sym_size(m, n, a):
    x = a["self"]
    d = m.dim(n.meta["val"])
    if isinstance(x, Val):
        dim = _norm_axis(a["dim"], _rank(x))
        return Sym(d, (x.name, dim) if isinstance(d, str) else None)
    return Sym(d)


@_h("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.type_as.default")
def _to_copy(m, n, a):
    x = a["self"]
    dt = m.dtype_of(n)
    if isinstance(x, Filled):
        return Filled(x.like, x.value, dt)
    if not isinstance(x, Val):
        raise _Unsupported("cast of a non-tensor")
    if dt == x.dtype:
        return x
    return m.val_for(n, "cast", [x.name], {"dtype": dt})


_UNARY = {"aten.relu.default": "relu", "aten.sigmoid.default": "sigmoid", "aten.tanh.default": "tanh",
          "aten.silu.default": "silu", "aten.hardswish.default": "hardswish",
          "aten.hardsigmoid.default": "hardsigmoid", "aten.sqrt.default": "sqrt", "aten.rsqrt.default": "rsqrt",
          "aten.exp.default": "exp", "aten.neg.default": "neg", "aten.erf.default": "erf"}


def _unary(m, n, a):
    x = a["self"]
    return m.val_for(n, _UNARY[m.op_key(n)], [m.inp(x)])


for _k in _UNARY:
    _HANDLERS[_k] = _unary


@_h("aten.gelu.default")
def _gelu(m, n, a):
    return m.val_for(n, "gelu", [m.inp(a["self"])], {"approximate": a.get("approximate") or "none"})


@_h("aten.hardtanh.default")
def _hardtanh(m, n, a):
    return m.val_for(n, "clamp", [m.inp(a["self"])], {"min": float(a["min_val"]), "max": float(a["max_val"])})


@_h("aten.relu6.default")
def _relu6(m, n, a):
    return m.val_for(n, "clamp", [m.inp(a["self"])], {"min": 0.0, "max": 6.0})


@_h("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(m, n, a):
    key = m.op_key(n)
    lo = a.get("min") if key != "aten.clamp_max.default" else None
    hi = a.get("max") if key != "aten.clamp_min.default" else None
    if key == "aten.clamp_max.default":
        hi = a.get("max")
    if isinstance(lo, (Val, Const)) or isinstance(hi, (Val, Const)):
        raise _Unsupported("tensor bounds")
    attrs = {}
    if lo is not None:
        attrs["min"] = float(lo)
    if hi is not None:
        attrs["max"] = float(hi)
    return m.val_for(n, "clamp", [m.inp(a["self"])], attrs)


def _scalar_dtype(m, n):
    return m.dtype_of(n)


def _binary(op):
    def h(m, n, a):
        x = a["self"]
        y = a.get("other")
        alpha = a.get("alpha", 1)
        dt = m.dtype_of(n)

        def prep(v, hint):
            if isinstance(v, Val) and v.dtype != dt:
                return m.b.add("cast", [v.name], {"dtype": dt}, name="cast")
            if isinstance(v, Const) and v.arr.dtype != np.dtype(dt) and v.name is None:
                return m.inp(Const(v.arr.astype(dt)), hint)
            if isinstance(v, Sym):
                raise _Unsupported("arithmetic with a symbolic size")
            return m.inp(v, hint, dtype=dt)

        if op == "rsub":
            x, y = y, x
        if alpha not in (1, None):
            if isinstance(y, Val):
                y = Val(m.b.add("mul", [prep(y, "y"), m.inp(alpha, "alpha", dtype=dt)], name="alpha"), dt, y.shape)
            elif isinstance(y, Const):
                y = Const((y.arr * alpha).astype(dt))
            else:
                y = y * alpha
        real = "sub" if op == "rsub" else op
        # l2 normalisation: div(x, expand(clamp_min(linalg_vector_norm(x, 2, [d], True), eps)))
        if real == "div":
            l2 = _match_l2norm(m, n)
            if l2 is not None:
                return l2
        return m.val_for(n, real, [prep(x, "a"), prep(y, f"{real}_c")])
    return h


for _k, _op in {"aten.add.Tensor": "add", "aten.add.Scalar": "add", "aten.sub.Tensor": "sub",
                "aten.sub.Scalar": "sub", "aten.mul.Tensor": "mul", "aten.mul.Scalar": "mul",
                "aten.div.Tensor": "div", "aten.div.Scalar": "div", "aten.rsub.Scalar": "rsub",
                "aten.rsub.Tensor": "rsub", "aten.pow.Tensor_Scalar": "pow", "aten.pow.Tensor_Tensor": "pow"}.items():
    _HANDLERS[_k] = _binary(_op)


def _match_l2norm(m, n):
    import torch.fx as fx

    x, d = n.args[0], n.args[1]
    if not isinstance(d, fx.Node):
        return None
    chain = d
    if m.op_key(chain) == "aten.expand.default":
        chain = chain.args[0]
    if not isinstance(chain, fx.Node) or m.op_key(chain) != "aten.clamp_min.default":
        return None
    eps = float(chain.args[1])
    nrm = chain.args[0]
    if not isinstance(nrm, fx.Node) or m.op_key(nrm) != "aten.linalg_vector_norm.default":
        return None
    b = _bind(nrm)
    if nrm.args[0] is not x or float(b["ord"]) != 2.0 or not b.get("keepdim") or len(b.get("dim") or []) != 1:
        return None
    xv = m.env[x]
    if not isinstance(xv, Val):
        return None
    return m.val_for(n, "l2norm", [xv.name], {"axis": _norm_axis(int(b["dim"][0]), _rank(xv)), "eps": eps})


@_h("aten.linalg_vector_norm.default", "aten.expand.default")
def _norm_or_expand(m, n, a):
    key = m.op_key(n)
    if key == "aten.linalg_vector_norm.default":
        # only supported inside the l2-normalisation pattern; evaluated lazily there
        if all(m.op_key(u) in ("aten.clamp_min.default",) for u in n.users):
            return _PENDING
        raise _Unsupported("")
    x = a["self"]
    if x is _PENDING:
        return _PENDING
    if isinstance(x, Filled):
        raise _Unsupported("expand of a filled tensor")
    sizes = [_dimval(m, s) for s in a["size"]]
    shape = m.shape_of(n)
    if list(x.shape) == shape:
        return x
    return m.val_for(n, "expand", [m.inp(x)], {"shape": _dims_attr(sizes)})


_orig_clamp = _HANDLERS["aten.clamp_min.default"]


def _clamp_min(m, n, a):
    if a["self"] is _PENDING:
        return _PENDING
    return _orig_clamp(m, n, a)


_HANDLERS["aten.clamp_min.default"] = _clamp_min


def _dimval(m, s):
    if isinstance(s, Sym):
        return s.dim if s.dim is not None else None
    if isinstance(s, int):
        return s
    raise _Unsupported("size argument")


def _dims_attr(dims):
    unknown = sum(1 for d in dims if d is None)
    if unknown > 1:
        raise _Unsupported("more than one compound symbolic dim in a shape")
    return [-1 if d is None else d for d in dims]


@_h("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def _reshape(m, n, a):
    x = a["self"]
    dims = [_dimval(m, s) for s in a["size"]]
    shape = m.shape_of(n)
    if list(x.shape) == shape and "?" not in shape:
        return x
    return m.val_for(n, "reshape", [m.inp(x)], {"shape": _dims_attr(dims)})


@_h("aten.flatten.using_ints")
def _flatten(m, n, a):
    x = a["self"]
    r = _rank(x)
    return m.val_for(n, "flatten", [m.inp(x)], {"start": _norm_axis(a["start_dim"], r), "end": _norm_axis(a["end_dim"], r)})


@_h("aten.permute.default")
def _permute(m, n, a):
    x = a["self"]
    r = _rank(x)
    perm = [_norm_axis(p, r) for p in a["dims"]]
    if perm == list(range(r)):
        return x
    return m.val_for(n, "transpose", [m.inp(x)], {"perm": perm})


@_h("aten.transpose.int", "aten.t.default")
def _transpose(m, n, a):
    x = a["self"]
    r = _rank(x)
    perm = list(range(r))
    if m.op_key(n) == "aten.t.default":
        if r < 2:
            return x
        d0, d1 = 0, 1
    else:
        d0, d1 = _norm_axis(a["dim0"], r), _norm_axis(a["dim1"], r)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    if perm == list(range(r)):
        return x
    return m.val_for(n, "transpose", [m.inp(x)], {"perm": perm})


@_h("aten.unsqueeze.default")
def _unsqueeze(m, n, a):
    x = a["self"]
    if isinstance(x, Filled):
        raise _Unsupported("unsqueeze of a filled tensor")
    ax = _norm_axis(a["dim"], _rank(x) + 1)
    return m.val_for(n, "unsqueeze", [m.inp(x)], {"axes": [ax]})


@_h("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(m, n, a):
    x = a["self"]
    r = _rank(x)
    key = m.op_key(n)
    if key == "aten.squeeze.dim":
        axes = [a["dim"]]
    elif key == "aten.squeeze.dims":
        axes = list(a["dim"])
    else:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = sorted({_norm_axis(ax, r) for ax in axes})
    axes = [ax for ax in axes if x.shape[ax] == 1]
    if not axes:
        return x
    return m.val_for(n, "squeeze", [m.inp(x)], {"axes": axes})


def arange_sym(b: Builder, like: str, like_axis: int, sym: str, bound: int, dtype="int64", name="positions") -> str:
    """Graph values computing ``arange(S)`` (1-D, ``dtype``) for ``S = like.shape[like_axis]``, S <= bound,
    with table ops only: expand ``arange(bound)`` to ``[S, bound]``, flatten, and take every
    ``(bound + 1)``-th element (the diagonal), which is ``0, 1, ..., S - 1``."""
    del like, like_axis
    v = b.const(np.arange(bound, dtype=dtype)[None, :], f"{name}_range")
    e = b.add("expand", [v], {"shape": [sym, bound]}, name=f"{name}_grid")
    f = b.add("reshape", [e], {"shape": [-1]}, name=f"{name}_flat")
    return b.add("slice", [f], {"axis": 0, "start": 0, "step": bound + 1}, name=name)


def _slice_sym(m, n, x, axis, start, sym: Sym):
    """``x[..., start:S, ...]`` for a constant ``x`` and a symbolic S (position ids / tables)."""
    if not (sym.src and isinstance(sym.dim, str)) or not isinstance(x, Const) or start not in (0, None):
        raise _Unsupported("slice of a computed tensor to a symbolic size")
    arr = np.asarray(x.arr)
    big = arr.shape[axis]
    ids = arange_sym(m.b, sym.src[0], sym.src[1], sym.dim, big, name=f"{n.name}_ids")
    moved = np.moveaxis(arr, axis, 0)
    rest = list(moved.shape[1:])
    is_range = moved.ndim >= 1 and all(d == 1 for d in rest) and \
        np.array_equal(moved.reshape(big), np.arange(big))
    if is_range:
        out = ids if arr.dtype == np.int64 else m.b.add("cast", [ids], {"dtype": dtype_str_np(arr.dtype)}, name="cast")
        have = [sym.dim]
    else:
        table = m.b.const(np.ascontiguousarray(moved.reshape(big, -1)), "table")
        out = m.b.add("embedding", [ids, table], name=f"{n.name}_rows")
        have = [sym.dim, int(np.prod(rest))]
    want = [sym.dim] + rest
    if have != want:
        out = m.b.add("reshape", [out], {"shape": want}, name=f"{n.name}_shape")
    if axis != 0:
        perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, arr.ndim))
        out = m.b.add("transpose", [out], {"perm": perm}, name=f"{n.name}_perm")
    return Val(out, m.dtype_of(n), m.shape_of(n))


def dtype_str_np(dt) -> str:
    return str(np.dtype(dt))


@_h("aten.slice.Tensor")
def _slice(m, n, a):
    x = a["self"]
    r = len(x.shape) if isinstance(x, Val) else x.arr.ndim
    axis = _norm_axis(a["dim"], r)
    start, end, step = a["start"], a["end"], a["step"] or 1
    if isinstance(start, Sym):
        if isinstance(start.dim, int):
            start = start.dim
        else:
            raise _Unsupported("symbolic slice start")
    if isinstance(end, Sym):
        if isinstance(end.dim, int):
            end = end.dim
        else:
            if step != 1:
                raise _Unsupported("symbolic slice end with a step")
            return _slice_sym(m, n, x, axis, start, end)
    start = 0 if start is None else int(start)
    end = None if (end is None or end >= _BIG) else int(end)
    if isinstance(x, Val):
        dimx = x.shape[axis]
        if start == 0 and step == 1 and (end is None or (isinstance(dimx, int) and end >= dimx)):
            return x
    attrs = {"axis": axis, "start": start, "step": int(step)}
    if end is not None:
        attrs["end"] = end
    return m.val_for(n, "slice", [m.inp(x)], attrs)


@_h("aten.select.int")
def _select(m, n, a):
    x = a["self"]
    r = _rank(x)
    axis = _norm_axis(a["dim"], r)
    idx = int(a["index"])
    attrs = {"axis": axis, "start": idx, "step": 1}
    if idx != -1:
        attrs["end"] = idx + 1
    s = m.b.add("slice", [m.inp(x)], attrs, name=f"{n.name}_slice")
    return m.val_for(n, "squeeze", [s], {"axes": [axis]})


@_h("aten.cat.default")
def _cat(m, n, a):
    xs = a["tensors"]
    r = len(m.shape_of(n))
    return m.val_for(n, "concat", [m.inp(x, "cat_c") for x in xs], {"axis": _norm_axis(a["dim"], r)})


@_h("aten.softmax.int", "aten._softmax.default")
def _softmax(m, n, a):
    x = a["self"]
    return m.val_for(n, "softmax", [m.inp(x)], {"axis": _norm_axis(a["dim"], _rank(x))})


@_h("aten.layer_norm.default", "aten.native_layer_norm.default")
def _layer_norm(m, n, a):
    x = a["input"]
    if len(a["normalized_shape"]) != 1:
        raise _Unsupported("layer_norm over more than the last dim")
    ins = [m.inp(x)]
    w, bb = a.get("weight"), a.get("bias")
    ins.append(m.inp(w) if w is not None else "")
    ins.append(m.inp(bb) if bb is not None else "")
    while ins and ins[-1] == "":
        ins.pop()
    out = m.b.add("layernorm", ins, {"eps": float(a["eps"]), "axis": -1}, name=n.name,
                  out=n.name if m.op_key(n) == "aten.layer_norm.default" else None)
    v = Val(out, x.dtype, list(x.shape))
    return v if m.op_key(n) == "aten.layer_norm.default" else (v, None, None)


@_h("aten.embedding.default")
def _embedding(m, n, a):
    table, ids = a["weight"], a["indices"]
    if not isinstance(table, Const):
        raise _Unsupported("embedding with a computed table")
    if isinstance(ids, Filled):
        # embedding(table, full_like(ids, c)): a constant row broadcast by its consumers
        if all(m.op_key(u) in ("aten.add.Tensor",) for u in n.users):
            row = table.arr[int(ids.value)]
            return Const(np.ascontiguousarray(row))
        ids = m.materialize_filled(ids)
    return m.val_for(n, "embedding", [m.inp(ids), m.b.const(table, "table")])


@_h("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(m, n, a):
    key = m.op_key(n)
    if key == "aten.arange.default":
        start, end, step = 0, a["end"], 1
    else:
        start, end, step = a["start"], a["end"], a.get("step", 1) or 1
    start = start.dim if isinstance(start, Sym) else start
    step = step.dim if isinstance(step, Sym) else step
    if not isinstance(end, Sym) or isinstance(end.dim, int):
        end = end.dim if isinstance(end, Sym) else end
        return Const(np.arange(start, end, step, dtype=m.dtype_of(n)))
    if step != 1 or not isinstance(start, int):
        raise _Unsupported("arange with a symbolic end and a step")
    bound = m.bounds.get(end.dim)
    if bound is None:
        bound = _embedding_rows(m, n)
    if bound is None:
        raise _Unsupported(f"arange to the unbounded size {end.dim!r} (give the dim a maximum)")
    ids = arange_sym(m.b, end.src[0], end.src[1], end.dim, bound, name=f"{n.name}_ids") if end.src else None
    if ids is None:
        raise _Unsupported("arange to a compound symbolic size")
    if start:
        ids = m.b.add("add", [ids, m.b.const(np.array(start, dtype="int64"), "start")], name="arange_start")
    if m.dtype_of(n) != "int64":
        ids = m.b.add("cast", [ids], {"dtype": m.dtype_of(n)}, name="cast")
    return Val(ids, m.dtype_of(n), m.shape_of(n))


def _embedding_rows(m, n):
    """Rows of the embedding tables an arange feeds (through unsqueeze/expand/view), or None."""
    seen, todo = [], list(n.users)
    while todo:
        u = todo.pop()
        k = m.op_key(u)
        if k == "aten.embedding.default" and u.args[1] is not None:
            w = m.env.get(u.args[0])
            if isinstance(w, Const):
                seen.append(w.arr.shape[0])
                continue
            return None
        if k in ("aten.unsqueeze.default", "aten.expand.default", "aten.view.default", "aten.slice.Tensor",
                 "aten.reshape.default", "aten._to_copy.default", "aten.add.Tensor"):
            todo.extend(u.users)
            continue
        return None
    return min(seen) if seen else None


@_h("aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default")
def _full_like(m, n, a):
    x = a["self"]
    key = m.op_key(n)
    value = 0 if key == "aten.zeros_like.default" else 1 if key == "aten.ones_like.default" else a["fill_value"]
    if not isinstance(x, Val):
        raise _Unsupported("full_like of a non-tensor")
    return Filled(x, value, m.dtype_of(n))


@_h("aten.where.self")
def _where(m, n, a):
    dt = m.dtype_of(n)
    return m.val_for(n, "where", [m.inp(a["condition"]), m.inp(a["self"], "a", dt), m.inp(a["other"], "b", dt)])


@_h("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(m, n, a):
    dt = m.dtype_of(n)
    v = a["value"]
    vv = m.inp(Const(np.array(v.arr, dtype=dt)) if isinstance(v, Const) else v, "fill", dt)
    return m.val_for(n, "where", [m.inp(a["mask"]), vv, m.inp(a["self"])])


def _linear_node(m, n, x, w: Const, bias):
    name = w.name[: -len(".weight")] if w.name and w.name.endswith(".weight") else (w.name or n.name)
    ins = [m.inp(x), m.b.const(w, "weight")]
    if bias is not None:
        ins.append(m.inp(bias, "bias"))
    return m.val_for(n, "linear", ins, {}, name=name)


@_h("aten.linear.default")
def _linear(m, n, a):
    x, w, b = a["input"], a["weight"], a.get("bias")
    if isinstance(w, Const):
        return _linear_node(m, n, x, w, b)
    wt = m.b.add("transpose", [m.inp(w)], {"perm": [1, 0]}, name="wT")
    y = m.b.add("matmul", [m.inp(x), wt], name=n.name, out=None if b is not None else n.name)
    if b is not None:
        y = m.b.add("add", [y, m.inp(b)], name=n.name + "_bias", out=n.name)
    return Val(y, m.dtype_of(n), m.shape_of(n))


@_h("aten.addmm.default")
def _addmm(m, n, a):
    bias, x, w = a["self"], a["mat1"], a["mat2"]
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or not isinstance(w, Const):
        raise _Unsupported("addmm with alpha/beta or a computed weight")
    return _linear_node(m, n, x, Const(np.ascontiguousarray(w.arr.T), w.name), bias)


@_h("aten.mm.default", "aten.matmul.default", "aten.bmm.default")
def _matmul(m, n, a):
    x, w = a["self"], a.get("mat2", a.get("other"))
    if isinstance(w, Const) and w.arr.ndim == 2 and isinstance(x, Val):
        return _linear_node(m, n, x, Const(np.ascontiguousarray(w.arr.T), w.name), None)
    return m.val_for(n, "matmul", [m.inp(x), m.inp(w)])


@_h("aten.conv2d.default", "aten.conv2d.padding", "aten.convolution.default")
def _conv2d(m, n, a):
    x, w, b = a["input"], a["weight"], a.get("bias")
    if not isinstance(w, Const) or w.arr.ndim != 4:
        raise _Unsupported("conv2d with a computed or non-4-D weight")
    if m.op_key(n) == "aten.convolution.default" and (a.get("transposed") or any(a.get("output_padding") or [])):
        raise _Unsupported("transposed convolution")
    pad = a.get("padding", [0, 0])
    if isinstance(pad, str):
        if pad == "valid":
            pad = [0, 0]
        else:  # same, stride 1
            kh, kw = w.arr.shape[2:]
            dil = list(a.get("dilation") or [1, 1])
            tot = [dil[0] * (kh - 1), dil[1] * (kw - 1)]
            if tot[0] % 2 or tot[1] % 2:
                raise _Unsupported("asymmetric 'same' padding")
            pad = [tot[0] // 2, tot[1] // 2]
    pad = list(pad) if len(pad) == 2 else [pad[0], pad[0]]
    stride = list(a.get("stride") or [1, 1])
    stride = stride if len(stride) == 2 else [stride[0]] * 2
    dil = list(a.get("dilation") or [1, 1])
    dil = dil if len(dil) == 2 else [dil[0]] * 2
    name = w.name[: -len(".weight")] if w.name and w.name.endswith(".weight") else (w.name or n.name)
    ins = [m.inp(x), m.b.const(w, "weight")]
    if b is not None:
        ins.append(m.inp(b, "bias"))
    return m.val_for(n, "conv2d", ins, {"stride": [int(s) for s in stride], "padding": [int(p) for p in pad],
                                         "dilation": [int(d) for d in dil], "groups": int(a["groups"])}, name=name)


@_h("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default",
    "aten._native_batch_norm_legit_functional.default")
def _batchnorm(m, n, a):
    x = a["input"]
    w, b, mean, var = a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var")
    if not all(isinstance(t, Const) or t is None for t in (w, b, mean, var)) or mean is None:
        raise _Unsupported("batchnorm without running statistics (training mode?)")
    c = mean.arr.shape[0]
    w = w if w is not None else Const(np.ones(c, np.float32))
    b = b if b is not None else Const(np.zeros(c, np.float32))
    eps = float(a["eps"])
    out = m.b.add("batchnorm", [m.inp(x), m.inp(w, "bn_scale"), m.inp(b, "bn_bias"), m.inp(mean, "bn_mean"),
                                m.inp(var, "bn_var")], {"eps": eps}, name=n.name,
                  out=n.name if m.op_key(n) == "aten.batch_norm.default" else None)
    v = Val(out, x.dtype, list(x.shape))
    return v if m.op_key(n) == "aten.batch_norm.default" else (v, None, None)


@_h("aten.max_pool2d.default", "aten.max_pool2d_with_indices.default")
def _maxpool(m, n, a):
    x = a["self"]
    k = list(a["kernel_size"])
    k = k if len(k) == 2 else k * 2
    s = list(a.get("stride") or k)
    s = s if len(s) == 2 else s * 2
    p = list(a.get("padding") or [0, 0])
    p = p if len(p) == 2 else p * 2
    d = list(a.get("dilation") or [1, 1])
    d = d if len(d) == 2 else d * 2
    out = m.b.add("maxpool2d", [m.inp(x)], {"kernel": k, "stride": s, "padding": p, "dilation": d,
                                            "ceil_mode": bool(a.get("ceil_mode"))}, name=n.name,
                  out=n.name if m.op_key(n) == "aten.max_pool2d.default" else None)
    if m.op_key(n) == "aten.max_pool2d.default":
        return Val(out, x.dtype, m.shape_of(n))
    return (Val(out, x.dtype, [m.dim(d) for d in n.meta["val"][0].shape]), None)


@_h("aten.avg_pool2d.default")
def _avgpool(m, n, a):
    x = a["self"]
    if a.get("divisor_override") is not None:
        raise _Unsupported("avg_pool2d divisor_override")
    k = list(a["kernel_size"])
    k = k if len(k) == 2 else k * 2
    s = list(a.get("stride") or k)
    s = s if len(s) == 2 else s * 2
    p = list(a.get("padding") or [0, 0])
    p = p if len(p) == 2 else p * 2
    return m.val_for(n, "avgpool2d", [m.inp(x)], {"kernel": k, "stride": s, "padding": p,
                                                  "ceil_mode": bool(a.get("ceil_mode")),
                                                  "count_include_pad": bool(a.get("count_include_pad", True))})


@_h("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default")
def _adaptive_avg(m, n, a):
    x = a["self"]
    osz = list(a["output_size"])
    if osz in ([1, 1], [1]):
        return m.val_for(n, "global_avgpool", [m.inp(x)], {"keepdim": True})
    h, w = x.shape[2], x.shape[3]
    if isinstance(h, int) and isinstance(w, int) and h % osz[0] == 0 and w % osz[1] == 0:
        k = [h // osz[0], w // osz[1]]
        return m.val_for(n, "avgpool2d", [m.inp(x)], {"kernel": k, "stride": k, "padding": [0, 0]})
    raise _Unsupported("adaptive_avg_pool2d to a size that does not divide the input")


def _reduce(op):
    def h(m, n, a):
        x = a["self"]
        if isinstance(x, Filled):
            x = m.materialize_filled(x)
        r = _rank(x)
        dims = a.get("dim")
        axes = list(range(r)) if not dims else sorted({_norm_axis(d, r) for d in dims})
        keep = bool(a.get("keepdim"))
        if op == "reduce_mean" and r == 4 and axes == [2, 3]:
            return m.val_for(n, "global_avgpool", [m.inp(x)], {"keepdim": keep})
        if x.dtype != m.dtype_of(n):
            x = Val(m.b.add("cast", [x.name], {"dtype": m.dtype_of(n)}, name="cast"), m.dtype_of(n), x.shape)
        return m.val_for(n, op, [m.inp(x)], {"axes": axes, "keepdim": keep})
    return h


_HANDLERS["aten.sum.dim_IntList"] = _reduce("reduce_sum")
_HANDLERS["aten.mean.dim"] = _reduce("reduce_mean")


# --------------------------------------------------------------------------------------
# graph passes


def _consumers(graph) -> dict:
    uses: dict = {}
    for nd in graph.nodes:
        for x in nd.inputs:
            if x:
                uses.setdefault(x, []).append(nd)
    for o in graph.outputs:
        uses.setdefault(o.name, []).append(None)
    return uses


def fold_batchnorm(graph: Graph, tensors: dict) -> int:
    """Fold ``batchnorm(conv2d(x))`` into the conv's weight and bias. Returns the count folded."""
    producers = {o: nd for nd in graph.nodes for o in nd.outputs}
    uses = _consumers(graph)
    drop, folded = set(), 0
    for bn in graph.nodes:
        if bn.op != "batchnorm":
            continue
        conv = producers.get(bn.inputs[0])
        if conv is None or conv.op != "conv2d" or len(uses.get(conv.outputs[0], [])) != 1:
            continue
        if conv.attrs.get("activation", "none") != "none" or conv.inputs[1] not in tensors:
            continue
        scale, beta, mean, var = (tensors[t] for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("eps", 1e-5))
        s = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        w = tensors[conv.inputs[1]].astype(np.float64)
        b = tensors[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
        tensors[conv.inputs[1]] = (w * s[:, None, None, None]).astype(np.float32)
        nb = ((b - mean) * s + beta).astype(np.float32)
        bname = conv.name + ".bias"
        if bname in tensors and (len(conv.inputs) < 3 or conv.inputs[2] != bname):
            bname = bn.inputs[2]
        tensors[bname] = nb
        conv.inputs = conv.inputs[:2] + [bname]
        # the conv now produces the batchnorm's output value
        conv.outputs = [bn.outputs[0]]
        drop.add(id(bn))
        folded += 1
    graph.nodes = [nd for nd in graph.nodes if id(nd) not in drop]
    return folded


_FUSABLE = {"relu": "relu", "gelu": None, "silu": "silu", "sigmoid": "sigmoid", "hardswish": "hardswish"}


def fuse_activations(graph: Graph) -> int:
    """Fuse ``act(conv2d|linear(...))`` into the layer's ``activation`` attr (single consumer only)."""
    producers = {o: nd for nd in graph.nodes for o in nd.outputs}
    uses = _consumers(graph)
    drop, fused = set(), 0
    for act in graph.nodes:
        if act.op == "gelu":
            code = "gelu_tanh" if act.attrs.get("approximate", "none") == "tanh" else "gelu"
        elif act.op == "clamp" and act.attrs.get("min") == 0.0 and act.attrs.get("max") == 6.0:
            code = "relu6"
        elif act.op == "clamp" and act.attrs.get("min") == 0.0 and act.attrs.get("max") is None:
            code = "relu"
        else:
            code = _FUSABLE.get(act.op)
        if not code:
            continue
        layer = producers.get(act.inputs[0])
        if layer is None or layer.op not in ("conv2d", "linear") or layer.attrs.get("activation", "none") != "none":
            continue
        if len(uses.get(layer.outputs[0], [])) != 1:
            continue
        layer.attrs["activation"] = code
        layer.outputs = [act.outputs[0]]
        drop.add(id(act))
        fused += 1
    graph.nodes = [nd for nd in graph.nodes if id(nd) not in drop]
    return fused


def eliminate_dead(graph: Graph, tensors: dict) -> int:
    """Remove nodes whose outputs are never used and tensors no node reads. Returns nodes removed."""
    live = {o.name for o in graph.outputs}
    keep = []
    for nd in reversed(graph.nodes):
        if any(o in live for o in nd.outputs):
            keep.append(nd)
            live.update(x for x in nd.inputs if x)
    removed = len(graph.nodes) - len(keep)
    graph.nodes = list(reversed(keep))
    for t in [t for t in tensors if t not in live]:
        del tensors[t]
    return removed


def optimize(graph: Graph, tensors: dict) -> dict:
    """Run the graph passes in order; returns counts for the report."""
    stats = {"batchnorm_folded": fold_batchnorm(graph, tensors)}
    stats["activations_fused"] = fuse_activations(graph)
    stats["dead_nodes_removed"] = eliminate_dead(graph, tensors)
    return stats


def map_exported(ep, dim_names: dict, params: dict | None = None):
    """``ExportedProgram`` (inference IR) -> ``(Graph, tensors, stats)``; see the module docstring.
    ``params``: {state_dict name: tensor} overriding the program's own parameters/buffers."""
    graph, tensors = Mapper(ep, dim_names, params).run()
    stats = optimize(graph, tensors)
    return graph, tensors, stats


# --------------------------------------------------------------------------------------
# decompositions of composite ops onto table ops


@_h("aten.scaled_dot_product_attention.default")
def _sdpa(m, n, a):
    """softmax(q @ k^T * scale + mask) @ v (no dropout, no causal mask, no GQA)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if float(a.get("dropout_p") or 0.0) != 0.0 or a.get("is_causal") or a.get("enable_gqa"):
        raise _Unsupported("dropout, is_causal or enable_gqa")
    r = _rank(q)
    e = q.shape[-1]
    if not isinstance(e, int):
        raise _Unsupported("symbolic head dim")
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    perm = list(range(r))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = m.b.add("transpose", [m.inp(k)], {"perm": perm}, name=f"{n.name}_kT")
    s = m.b.add("matmul", [m.inp(q), kt], name=f"{n.name}_scores")
    s = m.b.add("mul", [s, m.b.const(np.array([scale], np.float32), "scale")], name=f"{n.name}_scaled")
    ins = [s]
    if mask is not None:
        if isinstance(mask, Val) and mask.dtype == "bool":
            zero = m.b.const(np.array([0.0], np.float32), "zero")
            neg = m.b.const(np.array([np.finfo(np.float32).min], np.float32), "neg_inf")
            ins.append(m.b.add("where", [mask.name, zero, neg], name=f"{n.name}_mask"))
        else:
            ins.append(m.inp(mask, "mask"))
    p = m.b.add("softmax", ins, {"axis": -1}, name=f"{n.name}_probs")
    return m.val_for(n, "matmul", [p, m.inp(v)])


@_h("aten.leaky_relu.default")
def _leaky_relu(m, n, a):
    x = m.inp(a["self"])
    slope = float(a.get("negative_slope", 0.01))
    pos = m.b.add("relu", [x], name=f"{n.name}_pos")
    nx = m.b.add("neg", [x], name=f"{n.name}_negx")
    negpart = m.b.add("relu", [nx], name=f"{n.name}_negpart")
    scaled = m.b.add("mul", [negpart, m.b.const(np.array([-slope], np.float32), "slope")], name=f"{n.name}_scaled")
    return m.val_for(n, "add", [pos, scaled])


@_h("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(m, n, a):
    x = a["self"]
    r = _rank(x)
    axis = _norm_axis(a.get("dim", 0), r)
    total = x.shape[axis]
    if not isinstance(total, int):
        raise _Unsupported("split along a symbolic dim")
    key = m.op_key(n)
    if key == "aten.split_with_sizes.default":
        sizes = list(a["split_sizes"])
    elif key == "aten.chunk.default":
        c = -(-total // int(a["chunks"]))
        sizes = [min(c, total - i) for i in range(0, total, c)]
    else:
        c = int(a["split_size"])
        sizes = [min(c, total - i) for i in range(0, total, c)]
    outs, start = [], 0
    for i, sz in enumerate(sizes):
        shape = list(x.shape)
        shape[axis] = sz
        name = m.b.add("slice", [m.inp(x)], {"axis": axis, "start": start, "end": start + sz, "step": 1},
                       name=f"{n.name}_{i}")
        outs.append(Val(name, x.dtype, shape))
        start += sz
    return tuple(outs)


@_h("aten.mean.default", "aten.sum.default")
def _reduce_all(m, n, a):
    x = a["self"]
    op = "reduce_mean" if m.op_key(n) == "aten.mean.default" else "reduce_sum"
    return m.val_for(n, op, [m.inp(x)], {"axes": list(range(_rank(x))), "keepdim": False})


# --------------------------------------------------------------------------------------
# fusion passes for the runtime (fewer copies and passes over attention-sized tensors)


def compose_transposes(graph: Graph) -> int:
    """``transpose(transpose(x, p1), p2)`` -> ``transpose(x, p1[p2])`` when the inner one has one user."""
    producers = {o: nd for nd in graph.nodes for o in nd.outputs}
    uses = _consumers(graph)
    n = 0
    for nd in graph.nodes:
        if nd.op != "transpose":
            continue
        inner = producers.get(nd.inputs[0])
        if inner is None or inner.op != "transpose" or len(uses.get(inner.outputs[0], [])) != 1:
            continue
        p1, p2 = list(inner.attrs["perm"]), list(nd.attrs["perm"])
        nd.inputs = [inner.inputs[0]]
        nd.attrs = dict(nd.attrs, perm=[p1[i] for i in p2])
        n += 1
    if n:
        eliminate_dead(graph, {})
    return n


def fuse_softmax_mask(graph: Graph, shapes: dict) -> int:
    """``softmax(add(x, mask))`` -> ``softmax(x, mask)`` (x the operand with the output's shape)."""
    producers = {o: nd for nd in graph.nodes for o in nd.outputs}
    uses = _consumers(graph)
    drop, n = set(), 0
    for sm in graph.nodes:
        if sm.op != "softmax" or len(sm.inputs) > 1 and sm.inputs[1]:
            continue
        add = producers.get(sm.inputs[0])
        if add is None or add.op != "add" or len(uses.get(add.outputs[0], [])) != 1:
            continue
        a, b = add.inputs
        out = shapes.get(add.outputs[0])
        if out is None:
            continue
        if shapes.get(a) == out:
            x, mask = a, b
        elif shapes.get(b) == out:
            x, mask = b, a
        else:
            continue
        sm.inputs = [x, mask]
        drop.add(id(add))
        n += 1
    graph.nodes = [nd for nd in graph.nodes if id(nd) not in drop]
    return n


def fuse_masked_mean(graph: Graph, tensors: dict) -> int:
    """``sum(x * m, axis) / clamp(sum(m, axis), min=eps)`` with ``m = cast(unsqueeze(mask, -1))`` (either
    order) -> ``masked_mean(x, mask, axis)``: sentence-embedding mean pooling."""
    producers = {o: nd for nd in graph.nodes for o in nd.outputs}
    n = 0

    def prod(v, op):
        p = producers.get(v)
        return p if p is not None and p.op == op else None

    for d in graph.nodes:
        if d.op != "div":
            continue
        num, den = prod(d.inputs[0], "reduce_sum"), prod(d.inputs[1], "clamp")
        if num is None or den is None or den.attrs.get("max") is not None:
            continue
        eps = den.attrs.get("min")
        if eps is None or not 0 < eps <= 1e-6:
            continue
        dsum = prod(den.inputs[0], "reduce_sum")
        mul = prod(num.inputs[0], "mul")
        if dsum is None or mul is None or num.attrs.get("keepdim") or dsum.attrs.get("keepdim"):
            continue
        axes = list(num.attrs.get("axes", []))
        if len(axes) != 1 or list(dsum.attrs.get("axes", [])) != axes:
            continue
        m = dsum.inputs[0]
        if m not in mul.inputs:
            continue
        x = mul.inputs[1] if mul.inputs[0] == m else mul.inputs[0]
        # m = cast(unsqueeze(mask, [-1 or last])) or unsqueeze(cast(mask))
        p = producers.get(m)
        mask = None
        if p is not None and p.op == "cast":
            u = prod(p.inputs[0], "unsqueeze")
            mask = u.inputs[0] if u is not None else None
            uax = u.attrs.get("axes") if u is not None else None
        elif p is not None and p.op == "unsqueeze":
            uax = p.attrs.get("axes")
            c = prod(p.inputs[0], "cast")
            mask = (c.inputs[0] if c is not None else p.inputs[0])
        if mask is None or uax is None or len(uax) != 1 or x in tensors:
            continue
        ax = axes[0]
        # mask [..axis] + unsqueezed last dim must line up with x [.., axis, feature]
        if uax[0] not in (-1, ax + 1):
            continue
        d.op = "masked_mean"
        d.inputs = [x, mask]
        d.attrs = {"axis": ax}
        n += 1
    if n:
        eliminate_dead(graph, tensors)
    return n
