"""Graph rewrites for transformer blocks, applied at Session load to the execution node list.

Each function takes a node list (plus the graph's output names, symbolic shapes, tensors as
needed) and returns a new list; the file's graph is never modified. ``feature_major_values``
decides which values are handed between kernel-path ops as [features, tokens] instead of torch's
[tokens, features]. Conv rewrites live in ``rewrite_conv``.
"""
from __future__ import annotations

import numpy as np


def _feature_major_values(graph, tensors=None) -> set:
    """Values produced by a linear and consumed only (as x) by linears, and not graph outputs;
    also a fused q|k|v linear's output read only by its ``_attention`` when the weight is not dense
    float32 (kernel path: the attention reads it feature-major, no transpose back); and an
    ``_attention`` output read only through a reshape to [.., H*D] by linears with non-dense
    weights (x input), with that reshape's output (the attention writes [H*D, B*S]); and the
    residual stream of a transformer: the output of a kernel-path linear with a fused residual
    (``_residual``, optionally ``_ln_eps``) read only by kernel-path linears as x or as their fused
    residual (the layernorm then runs over the feature axis, the residual is read feature-major:
    no transposes between layers); and a last-axis ``layernorm``'s output read the same way."""
    consumers: dict = {}
    for node in graph.nodes:
        for k, name in enumerate(node.inputs):
            consumers.setdefault(name, []).append((node, k))
    outs = {v.name for v in graph.outputs}
    fm = set()

    def kernel_path(n):  # a linear whose weight runs a kernel (not dense float32 BLAS)
        w = tensors.get(n.inputs[1]) if tensors is not None else None
        return w is not None and not isinstance(w, np.ndarray) and w.kind != "dense"

    for node in graph.nodes:
        if node.op != "linear":
            continue
        v = node.outputs[0]
        cs = consumers.get(v, [])
        if v in outs or not cs:
            continue
        if node.attrs.get("_residual"):
            # a transformer's residual stream: the output of a linear with a fused residual (and
            # layernorm) read by kernel-path linears as x or as their fused residual (input 3)
            if tensors is not None and kernel_path(node) and all(
                    n.op == "linear" and (k == 0 or (k == 3 and n.attrs.get("_residual"))) and kernel_path(n)
                    for n, k in cs):
                fm.add(v)
            continue
        if all(n.op == "linear" and k == 0 for n, k in cs):
            fm.add(v)
        elif v not in outs and len(cs) == 1 and cs[0][0].op == "_attention" and cs[0][0].attrs.get("qkv") and \
                cs[0][1] == 0 and tensors is not None and node.attrs.get("activation", "none") == "none":
            w = tensors.get(node.inputs[1])
            if w is not None and not isinstance(w, np.ndarray) and w.kind != "dense":
                fm.add(v)
    if tensors is None:
        return fm
    for node in graph.nodes:  # a last-axis layernorm (BERT's embedding layernorm) read only by
        # kernel-path linears as x or as their fused residual: it writes [C, N] (transposing its
        # input first), no transpose in the first q|k|v linear
        if node.op not in ("layernorm", "_layernorm_add") or node.attrs.get("axis", -1) != -1:
            continue
        v = node.outputs[0]
        cs = consumers.get(v, [])
        if v not in outs and cs and all(
                n.op == "linear" and (k == 0 or (k == 3 and n.attrs.get("_residual"))) and kernel_path(n)
                for n, k in cs):
            fm.add(v)
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
    # a last-axis layernorm of a chain of (at most 2) float32 adds, each intermediate sum read only
    # by the next add: ``_layernorm_add`` with x0 and the addends as inputs 3, 4 (attr ``_adds``; BERT's embedding
    # sum word + position + token type): the sums and the layernorm in one op (the adds were two
    # single-threaded numpy broadcasts of the whole [B, S, H]); x0 must have the output's shape
    for ln in nodes:
        if ln.op != "layernorm" or id(ln) in replace:
            continue
        shp = sym.shapes.get(ln.outputs[0])
        ax = int(ln.attrs.get("axis", -1))
        if not shp or ax not in (-1, len(shp) - 1):
            continue
        v, addends, chain = ln.inputs[0], [], []
        while len(addends) < 2:
            a = producer.get(v)
            if a is None or a.op != "add" or len(a.inputs) != 2 or v in outs or len(consumers.get(v, [])) != 1:
                break
            full = [u for u in a.inputs if sym.shapes.get(u) == shp]
            if not full:
                break
            # go on up through an input that is itself an add (x + y commutes exactly)
            u = next((w for w in full if producer.get(w) is not None and producer[w].op == "add"), full[0])
            other = a.inputs[1] if u == a.inputs[0] else a.inputs[0]
            addends.insert(0, other)
            chain.append(a)
            v = u
        if not addends:
            continue

        def f32(n):  # a float32 value or stored dense float32 constant
            t = tensors.get(n)
            if t is not None:
                return getattr(t, "kind", "") == "dense" and str(getattr(t, "dtype", "")) == "float32"
            return sym.dtypes.get(n) == "float32"

        if not all(f32(n) for n in [v] + addends):
            continue
        wb = (list(ln.inputs[1:3]) + ["", ""])[:2]
        from ..formats import optable

        eps = float(optable.with_defaults("layernorm", ln.attrs)["eps"])
        replace[id(ln)] = Node("_layernorm_add", ln.name, [v] + wb + addends, list(ln.outputs),
                               {"eps": eps, "axis": -1, "_adds": len(addends)})
        for a in chain:
            drop.add(id(a))
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
