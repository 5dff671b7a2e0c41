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
from .rewrite_bert import (_feature_major_values, _fuse_attention, _fuse_linear_residual, _fuse_qkv,
                           _fuse_residual_layernorm, _fuse_softmax_scale)
from .rewrite_conv import _fuse_residuals
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
    """What op constructors see at load: tensors, selector, feature-major values, and the
    execution graph (after the rewrites; ``consumers(value)`` lists (node, input index) pairs)."""

    def __init__(self, model, selector, fm_values, file=None, tensors=None, graph=None):
        self.model = model
        self.graph = graph
        self._consumers = None
        self.tensors = model.tensors if tensors is None else tensors
        self.selector = selector
        self.fm_values = fm_values
        self.file = file
        self._consts: dict = {}

    def consumers(self, value) -> list:
        """[(node, input index)] of the execution graph reading ``value`` (empty without a graph)."""
        if self._consumers is None:
            self._consumers = {}
            for n in (self.graph.nodes if self.graph is not None else []):
                for k, name in enumerate(n.inputs):
                    self._consumers.setdefault(name, []).append((n, k))
        return self._consumers.get(value, [])

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
        self._ctx = LoadContext(self._model, self._selector, self._fm, self.path, self._tensors, self._exec)
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
                "no_reuse_bytes": p.naive_bytes, "values_in_arena": len(p.slots),
                "values_handed_over": sorted(p.unwritten)}

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
