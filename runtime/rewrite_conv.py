"""Graph rewrites for CNNs, applied at Session load to the execution node list (the file's
graph is never modified). Transformer rewrites live in ``rewrite_bert``."""
from __future__ import annotations

def _fuse_residuals(graph, sym) -> list:
    """Execution node list with ``[relu|clamp(0,6)](add(conv2d(x), r))`` rewritten into one conv2d
    carrying ``r`` as a 4th input (attr ``_residual``) and the activation; the fused node takes the
    last replaced node's position so every input is defined by then. When both inputs of the add are
    convs, a stride-1 conv takes it."""
    from ..formats.graph import Node

    consumers: dict = {}
    for node in graph.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    outs = {v.name for v in graph.outputs}
    replace, drop = {}, set()
    # stride-1 convs claim an add first: in a downsampling block add(conv2(...), down(x)) the residual goes
    # into conv2 (the main path), so the 1x1 stride-2 ``down`` stays a plain conv that can be computed with
    # the block's first conv in one pass (runtime/ops/conv.py ``_sibling``), its output ready before conv2
    order = sorted(graph.nodes, key=lambda n: 0 if list(n.attrs.get("stride", [1, 1])) == [1, 1] else 1)
    for c in order:
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
