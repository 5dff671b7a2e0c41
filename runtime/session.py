"""``Session``: load a model file, plan it, pick a kernel per layer, run it.

Shaped like onnxruntime's InferenceSession::

    sess = sparsedge.Session("model.sparsedge", threads=2)
    [y] = sess.run(None, {"x": x})

Load: the file is read and validated (``formats.modelfile.read_model``, arrays are views of its
memory map), every op is checked against the op table and the runtime's op registry
(``UnsupportedOpError`` naming the node), symbolic shapes are inferred, and one op object per
node is built (weights used straight from the map). Per concrete input shape, the first call
builds a plan (concrete shapes, kernel choice per layer, memory plan), cached by shape. Each call
takes an arena from the plan's pool (or allocates one), so one Session can be called from several
Python threads at once.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ModelFileError, UnsupportedOpError
from ..formats import optable
from . import par as _par
from . import threads as _threads
from .planner import arena_views, build_plan
from .select import Selector, format_report
from .shapes import bind_symbols, infer

_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "int32": "tensor(int32)",
              "int8": "tensor(int8)", "uint8": "tensor(uint8)", "bool": "tensor(bool)",
              "float64": "tensor(double)", "float16": "tensor(float16)"}


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.bool_) if name == "bool" else np.dtype(name)


@dataclass(frozen=True)
class NodeArg:
    """An input or output declaration: ``name``, ``shape`` (ints; symbolic dims as str),
    ``type`` (onnxruntime spelling, e.g. ``tensor(float)``), ``dtype`` (numpy dtype)."""
    name: str
    shape: list
    type: str
    dtype: np.dtype

    def __repr__(self):
        return f"NodeArg(name={self.name!r}, type={self.type!r}, shape={self.shape!r})"


class LoadContext:
    """What op constructors see at load: tensors, selector, feature-major values."""

    def __init__(self, model, selector, fm_values, file=None, tensors=None):
        self.model = model
        self.tensors = model.tensors if tensors is None else tensors
        self.selector = selector
        self.fm_values = fm_values
        self.file = file
        self._consts: dict = {}

    def weight(self, name, node=None):
        if name not in self.tensors:
            raise ModelFileError(f"weight {name!r} is not a stored tensor", node=node, file=self.file)
        return self.tensors[name]

    def constant(self, name):
        """A stored tensor as a numpy array (dense values from the map; other formats densified)."""
        if name not in self._consts:
            t = self.tensors[name]
            if isinstance(t, np.ndarray):
                a = t
            elif t.kind == "dense":
                a = t.to_dense()
            else:
                a = t.to_dense()
                orig = getattr(t, "orig_shape", None)
                if orig is not None:
                    a = a.reshape(orig)
            self._consts[name] = a
        return self._consts[name]


def _feature_major_values(graph, tensors=None) -> set:
    """Values produced by a linear and consumed only (as x) by linears, and not graph outputs;
    also a fused q|k|v linear's output read only by its ``_attention`` when the weight is not dense
    float32 (kernel path: the attention reads it feature-major, no transpose back); and an
    ``_attention`` output read only through a reshape to [.., H*D] by linears with non-dense
    weights (x input), with that reshape's output (the attention writes [H*D, B*S])."""
    consumers: dict = {}
    for node in graph.nodes:
        for k, name in enumerate(node.inputs):
            consumers.setdefault(name, []).append((node, k))
    outs = {v.name for v in graph.outputs}
    fm = set()
    for node in graph.nodes:
        if node.op != "linear":
            continue
        v = node.outputs[0]
        cs = consumers.get(v, [])
        if node.attrs.get("_residual"):  # its residual is in torch layout
            continue
        if v not in outs and cs and all(n.op == "linear" and k == 0 for n, k in cs):
            fm.add(v)
        elif v not in outs and len(cs) == 1 and cs[0][0].op == "_attention" and cs[0][0].attrs.get("qkv") and \
                cs[0][1] == 0 and tensors is not None and node.attrs.get("activation", "none") == "none":
            w = tensors.get(node.inputs[1])
            if w is not None and not isinstance(w, np.ndarray) and w.kind != "dense":
                fm.add(v)
    if tensors is None:
        return fm
    for node in graph.nodes:  # _attention -> reshape [.., H*D] -> kernel-path linears (x only)
        if node.op != "_attention":
            continue
        v = node.outputs[0]
        cs = consumers.get(v, [])
        if v in outs or len(cs) != 1 or cs[0][0].op != "reshape" or cs[0][1] != 0:
            continue
        r = cs[0][0]
        shp = r.attrs.get("shape")
        hd = int(node.attrs.get("heads", 0)) * int(node.attrs.get("head_dim", 0))
        if not isinstance(shp, (list, tuple)) or not shp or shp[-1] != hd or hd <= 0:
            continue
        u = r.outputs[0]
        us = consumers.get(u, [])
        if u in outs or not us or not all(n.op == "linear" and k == 0 for n, k in us):
            continue
        ws = [tensors.get(n.inputs[1]) for n, _ in us]
        if all(w is not None and not isinstance(w, np.ndarray) and w.kind != "dense" for w in ws):
            fm.add(v)
            fm.add(u)
    return fm


def _fuse_residuals(graph, sym) -> list:
    """Execution node list with ``[relu|clamp(0,6)](add(conv2d(x), r))`` rewritten into one conv2d
    carrying ``r`` as a 4th input (attr ``_residual``) and the activation; the fused node takes the
    last replaced node's position so every input is defined by then."""
    from ..formats.graph import Node

    consumers: dict = {}
    for node in graph.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    outs = {v.name for v in graph.outputs}
    replace, drop = {}, set()
    for c in graph.nodes:
        if c.op != "conv2d" or c.attrs.get("activation", "none") != "none" or c.attrs.get("_residual"):
            continue
        v = c.outputs[0]
        cs = consumers.get(v, [])
        if v in outs or len(cs) != 1 or cs[0].op != "add" or id(cs[0]) in drop:
            continue
        a = cs[0]
        if a.inputs[0] == a.inputs[1]:
            continue
        r = a.inputs[1] if a.inputs[0] == v else a.inputs[0]
        if r not in sym.shapes or sym.shapes.get(r) != sym.shapes.get(v) or sym.dtypes.get(r) != "float32":
            continue
        last, act, out = a, "none", a.outputs[0]
        us = consumers.get(out, [])
        if out not in outs and len(us) == 1:
            nxt = us[0]
            if nxt.op == "relu":
                last, act, out = nxt, "relu", nxt.outputs[0]
            elif nxt.op == "clamp" and nxt.attrs.get("min") == 0.0 and nxt.attrs.get("max") == 6.0:
                last, act, out = nxt, "relu6", nxt.outputs[0]
        ins = list(c.inputs) + [""] * (3 - len(c.inputs))
        fused = Node("conv2d", c.name, ins[:3] + [r], [out], {**c.attrs, "activation": act, "_residual": True})
        drop.update({id(c), id(a), id(last)})
        replace[id(last)] = fused
    return [replace.get(id(n), n) for n in graph.nodes if id(n) not in drop or id(n) in replace]


def _graph_maps(nodes) -> tuple:
    """({value: [consumer nodes]}, {value: producer node}) of a node list (graph-rewrite helper)."""
    consumers: dict = {}
    producer: dict = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
        for name in node.outputs:
            producer[name] = node
    return consumers, producer


def _fuse_linear_residual(nodes, outputs, sym, tensors) -> list:
    """Node list with ``add(r, linear(x))`` (either order; the linear with activation none, its
    output used only by the add; r a float32 activation of the same symbolic shape) rewritten into
    one linear carrying r as a 4th input (runtime-internal attr ``_residual``): a transformer's
    residual connection added while the linear's output rows are in cache, without a pass of its
    own. The fused node takes the add's position (every input is defined by then)."""
    from ..formats.graph import Node

    consumers, producer = _graph_maps(nodes)
    outs = set(outputs)
    replace, drop = {}, set()
    for a in nodes:
        if a.op != "add" or len(a.inputs) != 2 or a.inputs[0] == a.inputs[1]:
            continue
        for k in (1, 0):
            v, r = a.inputs[k], a.inputs[1 - k]
            lin = producer.get(v)
            if lin is None or lin.op != "linear" or id(lin) in drop or lin.attrs.get("_residual"):
                continue
            if lin.attrs.get("activation", "none") != "none" or v in outs or len(consumers.get(v, [])) != 1:
                continue
            if r in tensors or r not in sym.shapes or list(sym.shapes.get(r) or []) != list(sym.shapes.get(v) or [0]):
                continue
            if sym.dtypes.get(r) != "float32" or sym.dtypes.get(v) != "float32":
                continue
            ins = list(lin.inputs) + [""] * (3 - len(lin.inputs))
            replace[id(a)] = Node("linear", lin.name, ins[:3] + [r], list(a.outputs), {**lin.attrs, "_residual": True})
            drop.add(id(lin))
            break
    if not replace:
        return nodes
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


def _fuse_residual_layernorm(nodes, outputs, sym, tensors) -> list:
    """Node list with ``layernorm(linear_with_residual(...))`` (last axis; the linear's output used
    only by the layernorm; layernorm weight / bias stored constants or absent) rewritten into the
    linear carrying the layernorm's weight and bias as inputs 5 and 6 and attr ``_ln_eps``: the
    post-residual layernorm of a transformer block computed per row while the linear's output is
    in cache. The fused node takes the layernorm's position."""
    from ..formats.graph import Node

    consumers, producer = _graph_maps(nodes)
    outs = set(outputs)
    replace, drop = {}, set()
    for ln in nodes:
        if ln.op != "layernorm":
            continue
        v = ln.inputs[0]
        lin = producer.get(v)
        if lin is None or lin.op != "linear" or not lin.attrs.get("_residual") or "_ln_eps" in lin.attrs:
            continue
        if lin.attrs.get("activation", "none") != "none" or v in outs or len(consumers.get(v, [])) != 1:
            continue
        shp = sym.shapes.get(v)
        ax = int(ln.attrs.get("axis", -1))
        if not shp or ax not in (-1, len(shp) - 1):
            continue
        wb = (list(ln.inputs[1:3]) + ["", ""])[:2]
        if any(n and n not in tensors for n in wb):
            continue
        from ..formats import optable

        eps = float(optable.with_defaults("layernorm", ln.attrs)["eps"])
        ins = list(lin.inputs[:4]) + wb
        replace[id(ln)] = Node("linear", lin.name, ins, list(ln.outputs), {**lin.attrs, "_ln_eps": eps})
        drop.add(id(lin))
    if not replace:
        return nodes
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


def _fuse_attention(nodes, outputs, sym, tensors) -> list:
    """Node list with the multi-head attention core (reshape / transpose of q, k, v, the two
    matmuls, the softmax with its folded scale and optional additive mask, the transpose back; see
    ``runtime/ops/attention.py``) rewritten into one runtime-internal ``_attention`` node at the
    final transpose's position, when every intermediate value has that single use, q, k, v are
    float32 ``[B, S, H*D]`` and the mask (if any) is float32 ``[B or 1, 1, 1, Sk]``."""
    from ..formats.graph import Node

    consumers, producer = _graph_maps(nodes)
    outs = set(outputs)

    def only(v, op):  # the producer of v when it is `op` and v's only use is the chain
        n = producer.get(v)
        if n is None or n.op != op or v in outs or len(consumers.get(v, [])) != 1:
            return None
        return n

    def heads(t, perm):  # transpose(reshape(x, [B, S, H, D]), perm) -> (x, [B, S, H, D]) or None
        if t is None or list(t.attrs.get("perm", [])) != perm:
            return None
        r = only(t.inputs[0], "reshape")
        if r is None:
            return None
        x = r.inputs[0]
        vs, xs = sym.shapes.get(r.outputs[0]), sym.shapes.get(x)
        if vs is None or xs is None or len(vs) != 4 or len(xs) != 3 or sym.dtypes.get(x) != "float32":
            return None
        if not all(isinstance(d, int) for d in vs[2:]) or xs[:2] != vs[:2] or xs[2] != vs[2] * vs[3]:
            return None
        return x, vs, r

    replace, drop = {}, set()
    for m2 in nodes:
        if m2.op != "matmul" or len(m2.inputs) != 2:
            continue
        sm = only(m2.inputs[0], "softmax")
        if sm is None or int(sm.attrs.get("axis", -1)) % 4 != 3:
            continue
        m1 = only(sm.inputs[0], "matmul")
        if m1 is None:
            continue
        tq = only(m1.inputs[0], "transpose")
        tk = only(m1.inputs[1], "transpose")
        tv = only(m2.inputs[1], "transpose")
        cs = consumers.get(m2.outputs[0], [])
        if m2.outputs[0] in outs or len(cs) != 1 or cs[0].op != "transpose" or \
                list(cs[0].attrs.get("perm", [])) != [0, 2, 1, 3]:
            continue
        to = cs[0]
        hq, hk, hv = heads(tq, [0, 2, 1, 3]), heads(tk, [0, 2, 3, 1]), heads(tv, [0, 2, 1, 3])
        if hq is None or hk is None or hv is None:
            continue
        (q, qs, rq), (k, ks, rk), (v, vs, rv) = hq, hk, hv
        if not (qs[0] == ks[0] == vs[0] and ks[1] == vs[1] and qs[2:] == ks[2:] == vs[2:]):
            continue
        mask = sm.inputs[1] if len(sm.inputs) > 1 else ""
        if mask:
            ms = sym.shapes.get(mask)
            if ms is None and mask in tensors:
                ms = list(getattr(tensors[mask], "shape", []))
            mdt = sym.dtypes.get(mask, "float32" if mask in tensors else None)
            if ms is None or len(ms) != 4 or mdt != "float32" or ms[1] != 1 or ms[2] != 1 or \
                    ms[3] != ks[1] or ms[0] not in (1, qs[0]):
                continue
        chain = [rq, rk, rv, tq, tk, tv, m1, sm, m2, to]
        if any(id(n) in drop for n in chain):
            continue
        attrs = {"heads": int(qs[2]), "head_dim": int(qs[3]), "scale": float(sm.attrs.get("_scale", 1.0))}
        replace[id(to)] = Node("_attention", m2.name, [q, k, v, mask], list(to.outputs), attrs)
        drop.update(id(n) for n in chain)
    if not replace:
        return nodes
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop or id(n) in replace]


def _concat_rows(wfs, name):
    """One weight format object holding the rows of ``wfs`` (same kind, same in-dim) stacked, or
    None when the kind / layout is not supported (dense float32, csr, csr_i8, per-channel dense_i8)."""
    from ..formats.base import FORMATS

    kinds = {"dense" if isinstance(w, np.ndarray) else w.kind for w in wfs}
    if len(kinds) != 1 or len({int(np.prod(w.shape[1:])) for w in wfs}) != 1:
        return None
    kind = kinds.pop()
    if any(len(w.shape) != 2 or getattr(w, "orig_shape", None) not in (None, tuple(w.shape)) for w in wfs):
        return None
    out = sum(int(w.shape[0]) for w in wfs)
    shape = (out, int(wfs[0].shape[1]))
    try:
        if kind == "dense":
            vals = [w if isinstance(w, np.ndarray) else w.values for w in wfs]
            if any(v.dtype != np.float32 for v in vals):
                return None
            return FORMATS["dense"](np.ascontiguousarray(np.concatenate(vals, axis=0)), name=name)
        if kind in ("csr", "csr_i8"):
            arrs = [w.arrays() for w in wfs]
            if len({a["indices"].dtype for a in arrs}) != 1:
                return None
            nnz = np.cumsum([0] + [int(a["indptr"][-1]) for a in arrs])
            indptr = np.concatenate([arrs[0]["indptr"][:1]] + [a["indptr"][1:] + np.int32(o)
                                                               for a, o in zip(arrs, nnz[:-1])]).astype(np.int32)
            d = {"indptr": indptr, "indices": np.concatenate([a["indices"] for a in arrs])}
            for f in arrs[0]:
                if f not in d:
                    d[f] = np.concatenate([a[f] for a in arrs])
            return FORMATS[kind].from_arrays(shape, wfs[0].meta(), d, name=name)
        if kind == "dense_i8":
            metas = [w.meta() for w in wfs]
            if any(m != metas[0] for m in metas) or metas[0].get("granularity") != "channel":
                return None
            arrs = [w.arrays() for w in wfs]
            d = {f: np.concatenate([a[f] for a in arrs]) for f in arrs[0]}
            return FORMATS[kind].from_arrays(shape, metas[0], d, name=name)
    except Exception:  # anything unexpected: leave the layers unfused
        return None
    return None


def _fuse_qkv(nodes, outputs, tensors) -> tuple:
    """(node list, {name: tensor}) with the q, k, v linears feeding one ``_attention`` node (same
    input, activation none, no residual, weights of one kind that ``_concat_rows`` stacks, biases
    all present or all absent, each output used only by the attention) merged into one linear
    (named as q's; weights and biases stacked at load: a copy) whose output ``[..., 3*H*D]`` the
    attention reads with a row stride (attr ``qkv``): the input is read, and for int8 kernels
    quantized, once; one kernel call and one output pass instead of three."""
    from ..formats.graph import Node

    consumers, producer = _graph_maps(nodes)
    outs = set(outputs)
    extra: dict = {}
    replace, drop = {}, set()
    for a in nodes:
        if a.op != "_attention" or a.attrs.get("qkv") or len(set(a.inputs[:3])) != 3:
            continue
        lins = [producer.get(v) for v in a.inputs[:3]]
        if any(n is None or n.op != "linear" or id(n) in drop or n.attrs.get("_residual") or
               n.attrs.get("activation", "none") != "none" or n.outputs[0] in outs or
               len(consumers.get(n.outputs[0], [])) != 1 for n in lins):
            continue
        if len({n.inputs[0] for n in lins}) != 1 or any(n.inputs[1] not in tensors for n in lins):
            continue
        bnames = [n.inputs[2] if len(n.inputs) > 2 else "" for n in lins]
        if any(bnames) and not all(b in tensors for b in bnames):
            continue
        base = lins[0].name
        w = _concat_rows([tensors[n.inputs[1]] for n in lins], f"{base}.__qkv_weight")
        if w is None:
            continue
        wname, bname = f"{base}.__qkv_weight", ""
        if all(bnames):
            from ..formats.base import FORMATS

            bs = []
            for b in bnames:
                t = tensors[b]
                bs.append(np.asarray(t if isinstance(t, np.ndarray) else t.to_dense(), np.float32).reshape(-1))
            if sum(b.shape[0] for b in bs) != w.shape[0]:
                continue
            bname = f"{base}.__qkv_bias"
            extra[bname] = FORMATS["dense"](np.concatenate(bs), name=bname)
        extra[wname] = w
        qkv = f"{lins[0].outputs[0]}.__qkv"
        first = min(nodes.index(n) for n in lins)
        replace[id(nodes[first])] = Node("linear", base, [lins[0].inputs[0], wname] + ([bname] if bname else []),
                                         [qkv], dict(lins[0].attrs))
        replace[id(a)] = Node("_attention", a.name, [qkv, "", "", a.inputs[3] if len(a.inputs) > 3 else ""],
                              list(a.outputs), {**a.attrs, "qkv": True})
        drop.update(id(n) for n in lins)
        drop.add(id(a))
    if not replace:
        return nodes, extra
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop or id(n) in replace], extra


def _fuse_softmax_scale(nodes, outputs, tensors) -> list:
    """Node list with ``softmax(div(x, c))`` / ``softmax(mul(x, c))`` (c a stored scalar float
    constant, the div/mul output used only as the softmax's x) rewritten into one softmax with the
    runtime-internal attr ``_scale`` (1/c or c): attention's score scaling without a pass of its own."""
    from ..formats.graph import Node

    consumers: dict = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    outs = set(outputs)
    scale_of: dict = {}
    for n in nodes:
        if n.op not in ("div", "mul") or len(n.inputs) != 2 or n.outputs[0] in outs:
            continue
        c = n.inputs[1]
        t = tensors.get(c)
        if t is None or n.inputs[0] in tensors:
            continue
        try:
            v = t if isinstance(t, np.ndarray) else (t.to_dense() if getattr(t, "kind", "") == "dense" else None)
        except Exception:
            v = None
        if v is None or v.size != 1 or v.dtype.kind != "f":
            continue
        v = float(np.asarray(v, dtype=np.float64).reshape(()))
        if n.op == "div" and v == 0.0:
            continue
        cs = consumers.get(n.outputs[0], [])
        if len(cs) != 1 or cs[0].op != "softmax" or cs[0].inputs[0] != n.outputs[0] or \
                n.outputs[0] in cs[0].inputs[1:]:
            continue
        scale_of[id(cs[0])] = (n, (1.0 / v) if n.op == "div" else v)
    if not scale_of:
        return nodes
    drop = {id(sc[0]) for sc in scale_of.values()}
    out = []
    for n in nodes:
        if id(n) in drop:
            continue
        if id(n) in scale_of:
            d, sc = scale_of[id(n)]
            n = Node("softmax", n.name, [d.inputs[0]] + list(n.inputs[1:]), list(n.outputs),
                     {**n.attrs, "_scale": float(n.attrs.get("_scale", 1.0)) * sc})
        out.append(n)
    return out


class Session:
    """Run a ``.sparsedge`` model. See the module docstring.

    Plans (and their arena pools) are cached per input shape, the ``MAX_PLANS`` most recent kept.

    path: model file path (or an already loaded ``ModelFile``); threads: numba threads per call
    (None = all); tune: time candidate kernels on first use of each shape and cache the choice in
    MODEL.tune.json; profile: record per-op times of every run; kernel_overrides: {node name:
    kernel name} to force a layer's kernel; verify_checksums: CRC-check every buffer at load.
    """

    MAX_PLANS = 32

    def __init__(self, path, threads=None, tune=False, profile=False, kernel_overrides=None,
                 verify_checksums=True):
        from ..formats.modelfile import ModelFile, read_model

        t0 = time.perf_counter()
        _threads.configure()
        if isinstance(path, ModelFile) or (hasattr(path, "graph") and hasattr(path, "tensors")):
            self._model = path
            self.path = getattr(path, "path", None)
        else:
            self.path = os.fspath(path)
            self._model = read_model(self.path, verify_checksums=verify_checksums)
        self.threads = _threads.resolve(threads)
        self.blas_threads = _threads.blas_policy(self.threads)
        self.profile = bool(profile)
        self.graph = g = self._model.graph
        self.metadata = getattr(self._model, "metadata", {}) or {}
        from .ops import impl_for, load_all

        load_all()
        for node in g.nodes:
            if node.op not in optable.OPS:
                raise UnsupportedOpError(f"op {node.op!r} is not supported by this runtime", node=node.name,
                                         file=self.path)
        overrides = dict(kernel_overrides or {})
        names = {n.name for n in g.nodes}
        if overrides:
            from .select import BUILTINS, _table_rows

            known = {r.name for r in _table_rows()} | set(BUILTINS)
            for k, v in overrides.items():
                if k not in names:
                    raise InputError(f"no node named {k!r} in the model", node=k, field="kernel_overrides")
                if v not in known:
                    raise InputError(f"unknown kernel {v!r} (known: {sorted(known)})", node=k,
                                     field="kernel_overrides")
        act_quant = {}
        for node in g.nodes:
            if node.op in ("linear", "conv2d") and node.inputs[0] in g.act_quant:
                act_quant[node.name] = g.act_quant[node.inputs[0]]
        self._selector = Selector(self.path, overrides, tune, self.threads, act_quant)
        self._sym = infer(g, self._model.tensors, None, file=self.path)
        from ..formats.graph import Graph

        out_names = [v.name for v in g.outputs]
        nodes = _fuse_softmax_scale(_fuse_residuals(g, self._sym), out_names, self._model.tensors)
        nodes = _fuse_linear_residual(nodes, out_names, self._sym, self._model.tensors)
        nodes = _fuse_residual_layernorm(nodes, out_names, self._sym, self._model.tensors)
        extra: dict = {}
        if os.environ.get("SPARSEDGE_NO_ATTENTION_FUSION", "") in ("", "0"):
            nodes = _fuse_attention(nodes, out_names, self._sym, self._model.tensors)
            nodes, extra = _fuse_qkv(nodes, out_names, self._model.tensors)
        self._tensors = {**self._model.tensors, **extra} if extra else self._model.tensors
        self._exec = Graph(g.inputs, g.outputs, nodes, g.act_quant)
        self._fm = _feature_major_values(self._exec, self._tensors)
        self._ctx = LoadContext(self._model, self._selector, self._fm, self.path, self._tensors)
        self._ops = [impl_for(n.op)(n, self._ctx) for n in self._exec.nodes]
        self._const_names = set(self._tensors)
        self._const_inputs = {}
        for node, op in zip(self._exec.nodes, self._ops):
            skip = optable.spec(node.op).weight_input if node.op in optable.OPS else None
            widx = optable.spec(node.op).inputs.index(skip) if skip else -1
            for k, name in enumerate(node.inputs):
                if name and name in self._const_names and k != widx:
                    self._const_inputs[name] = self._ctx.constant(name)
        self._inputs = [NodeArg(v.name, list(v.shape), _ORT_TYPES.get(v.dtype, f"tensor({v.dtype})"),
                                _np_dtype(v.dtype)) for v in g.inputs]
        self._outputs = []
        for v in g.outputs:
            shape = list(v.shape) if v.shape else list(self._sym.shapes.get(v.name, []))
            self._outputs.append(NodeArg(v.name, shape, _ORT_TYPES.get(v.dtype, f"tensor({v.dtype})"),
                                         _np_dtype(v.dtype)))
        self._out_index = {v.name: i for i, v in enumerate(self._outputs)}
        self._plans: dict = {}
        self._pools: dict = {}
        self._lock = threading.RLock()
        self.last_profile: list = []
        self._prof_tot: dict = {}
        self._prof_runs = 0
        self.load_ms = (time.perf_counter() - t0) * 1e3

    @property
    def threading_layer(self) -> str:
        """numba's threading layer in use ("tbb", "omp"; "workqueue" means runs are serialised)."""
        return _threads.layer()

    # --- declarations --------------------------------------------------------------------------
    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return list(self._outputs)

    def get_modelmeta(self) -> dict:
        return dict(self.metadata)

    # --- planning ------------------------------------------------------------------------------
    def _norm_shapes(self, input_shapes: dict) -> dict:
        if not isinstance(input_shapes, dict):
            raise InputError("input shapes must be a dict {input name: shape tuple}", field="input_shapes")
        known = {v.name for v in self._inputs}
        for k in input_shapes:
            if k not in known:
                raise InputError(f"unknown input (model inputs: {sorted(known)})", tensor=k, field="name")
        out = {}
        for v in self._inputs:
            if v.name not in input_shapes:
                raise InputError("missing input", tensor=v.name, field="name")
            try:
                out[v.name] = tuple(int(d) for d in input_shapes[v.name])
            except (TypeError, ValueError):
                raise InputError(f"shape must be a tuple of ints, got {input_shapes[v.name]!r}", tensor=v.name,
                                 field="shape") from None
            if any(d < 0 for d in out[v.name]):
                raise InputError(f"negative dim in shape {out[v.name]}", tensor=v.name, field="shape")
        return out

    def _plan(self, shapes: dict):
        key = tuple(shapes[v.name] for v in self._inputs)
        p = self._plans.get(key)
        if p is not None:
            return p
        with self._lock:
            p = self._plans.get(key)
            if p is not None:
                return p
            bind_symbols(self.graph, shapes)
            shp = infer(self._exec, self._tensors, shapes, file=self.path)
            nps = []
            for node, op in zip(self._exec.nodes, self._ops):
                ins = [None if not n else (tuple(shp.shapes[n]) if n in shp.shapes else None,
                                           shp.dtypes.get(n)) for n in node.inputs]
                ins = [None if (i is None or i[0] is None) else i for i in ins]
                for k, n in enumerate(node.inputs):
                    if n and ins[k] is None and n in self._tensors:
                        t = self._tensors[n]
                        ins[k] = (tuple(getattr(t, "shape")), "float32")
                outs = [(tuple(shp.shapes[n]), shp.dtypes[n]) for n in node.outputs]
                nps.append(op.plan(ins, outs, shp.env))
            p = build_plan(key, self._exec, self._ops, shp, nps, self._const_names)
            self._selector.save()
            while len(self._plans) >= self.MAX_PLANS:  # bound memory when shapes vary a lot
                old = next(iter(self._plans))
                del self._plans[old]
                self._pools.pop(old, None)
            self._plans[key] = p
            self._pools[key] = []
            return p

    def output_shapes(self, input_shapes: dict) -> dict:
        """{output name: shape tuple} for the given {input name: shape} (plans that shape)."""
        p = self._plan(self._norm_shapes(input_shapes))
        return {v.name: tuple(p.shapes[v.name]) for v in self._outputs}

    def planned_peak_bytes(self, input_shapes: dict) -> int:
        """Bytes one run() allocates at that shape: the activation arena plus the output arrays."""
        return self._plan(self._norm_shapes(input_shapes)).peak_bytes

    def plan_info(self, input_shapes: dict) -> dict:
        p = self._plan(self._norm_shapes(input_shapes))
        return {"arena_bytes": p.arena_bytes, "output_bytes": p.output_bytes, "peak_bytes": p.peak_bytes,
                "no_reuse_bytes": p.naive_bytes, "values_in_arena": len(p.slots)}

    # --- run -----------------------------------------------------------------------------------
    def _validate_feeds(self, feeds) -> dict:
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict {{input name: numpy array}}, got {type(feeds).__name__}",
                             field="feeds")
        known = {v.name: v for v in self._inputs}
        for k in feeds:
            if k not in known:
                raise InputError(f"unknown input (model inputs: {sorted(known)})", tensor=k, field="name")
        out = {}
        for v in self._inputs:
            if v.name not in feeds:
                raise InputError("missing input", tensor=v.name, field="name")
            a = feeds[v.name]
            if not isinstance(a, np.ndarray):
                raise InputError(f"must be a numpy array, got {type(a).__name__}", tensor=v.name, field="type")
            if a.dtype != v.dtype:
                raise InputError(f"expected dtype {v.dtype} ({v.type}), got {a.dtype}", tensor=v.name, field="dtype")
            if not a.flags.c_contiguous or not a.flags.aligned:
                a = np.ascontiguousarray(a)
            out[v.name] = a
        return out

    def run(self, output_names, feeds: dict) -> list:
        """Run the model. output_names: list of output names (None = all); feeds: {name: array}."""
        if self._model is None:
            raise InputError("the session is closed", file=self.path)
        if output_names is None:
            wanted = [v.name for v in self._outputs]
        else:
            if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
                raise InputError("output_names must be a list of output names or None", field="output_names")
            for n in output_names:
                if n not in self._out_index:
                    raise InputError(f"unknown output (model outputs: {list(self._out_index)})", tensor=n,
                                     field="output_names")
            wanted = list(output_names)
        feeds = self._validate_feeds(feeds)
        p = self._plan({k: a.shape for k, a in feeds.items()})
        _threads.use_threads(self.threads)
        _par.set_threads(self.threads)
        if _threads.needs_lock():
            with _threads.RUN_LOCK:
                vals = self._execute(p, feeds)
        else:
            vals = self._execute(p, feeds)
        return [vals[n] for n in wanted]

    def _get_arena(self, p):
        with self._lock:
            pool = self._pools.get(p.key)
            if pool:
                return pool.pop()
        # the planner's offsets are multiples of 64: start the arena on a 64-byte boundary too, so
        # activations are cache-line aligned (kernels copy a misaligned X: straddling loads cost 2x)
        raw = np.empty(p.arena_bytes + 64, dtype=np.uint8)
        skip = (-raw.ctypes.data) % 64
        arena = raw[skip:skip + p.arena_bytes]
        return (arena,) + arena_views(p, arena)

    def _execute(self, p, feeds) -> dict:
        slot = self._get_arena(p)
        _, bufs, scratch = slot
        try:
            vals = dict(feeds)
            consts = self._const_inputs
            prof = [] if self.profile else None
            for i, (node, op) in enumerate(zip(self._exec.nodes, self._ops)):
                ins = []
                for n in node.inputs:
                    if not n:
                        ins.append(None)
                    elif n in vals:
                        ins.append(vals[n])
                    else:
                        ins.append(consts.get(n))
                np_ = p.node_plans[i]
                t0 = time.perf_counter() if prof is not None else 0.0
                if op.view:
                    res = op.view_of(ins, [p.shapes[n] for n in node.outputs])
                    for n, a in zip(node.outputs, res):
                        vals[n] = a
                else:
                    outs = []
                    for n in node.outputs:
                        if n in p.fresh:
                            a = np.empty(p.shapes[n], dtype=_np_dtype(p.dtypes[n]))
                        else:
                            a = bufs[n]
                        vals[n] = a
                        outs.append(a)
                    if any(o.size for o in outs):  # nothing to compute for empty outputs (batch 0)
                        op.run(ins, outs, scratch[i], np_.data)
                if prof is not None:
                    prof.append((node.name, node.op, np_.kernel, (time.perf_counter() - t0) * 1e3))
            res = {}
            for v in self._outputs:
                a = vals[v.name]
                res[v.name] = a if v.name in p.fresh else np.array(a, copy=True)
            if prof is not None:
                self._record(prof)
            return res
        finally:
            with self._lock:
                pool = self._pools.get(p.key)
                if pool is not None and self._plans.get(p.key) is p:
                    pool.append(slot)

    # --- profiling -------------------------------------------------------------------------------
    def _record(self, prof):
        with self._lock:
            self.last_profile = prof
            self._prof_runs += 1
            for name, op, kern, ms in prof:
                t = self._prof_tot.setdefault(name, [op, kern, 0.0, 0])
                t[1] = kern
                t[2] += ms
                t[3] += 1

    def profile_report(self) -> str:
        """Per-op summary over all profiled runs (profile=True): calls, mean ms, share of total."""
        with self._lock:
            if not self._prof_tot:
                return "no profile recorded (create the Session with profile=True and run it)"
            tot = sum(t[2] for t in self._prof_tot.values()) or 1e-12
            lines = [f"profile over {self._prof_runs} run(s); mean ms per run",
                     f"{'node':<32} {'op':<14} {'kernel':<24} {'ms':>9} {'share':>7}"]
            rows = sorted(self._prof_tot.items(), key=lambda kv: -kv[1][2])
            for name, (op, kern, ms, n) in rows:
                lines.append(f"{name[:32]:<32} {op:<14} {kern[:24]:<24} {ms / max(self._prof_runs, 1):>9.3f} "
                             f"{ms / tot:>7.1%}")
            by_op: dict = {}
            for name, (op, kern, ms, n) in rows:
                by_op[op] = by_op.get(op, 0.0) + ms
            lines.append("by op: " + ", ".join(f"{k} {v / max(self._prof_runs, 1):.3f} ms"
                                               for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])))
            lines.append(f"total {tot / max(self._prof_runs, 1):.3f} ms per run")
            return "\n".join(lines)

    # --- selection report --------------------------------------------------------------------------
    def selection_report(self) -> list:
        """Per weight layer and N: node, op, format, sparsity, N, chosen kernel, why, measured ms."""
        return self._selector.report()

    def format_selection_report(self) -> str:
        return format_report(self.selection_report())

    def close(self) -> None:
        with self._lock:
            self._plans.clear()
            self._pools.clear()
        m, self._model = self._model, None
        if m is not None and hasattr(m, "close") and self.path is not None:
            m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<sparsedge.Session {self.path!r} nodes={len(self.graph.nodes)} threads={self.threads}>"
