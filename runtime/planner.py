"""Static memory plan for one concrete input shape.

Every intermediate value (and every op scratch buffer) gets an offset in one byte arena; values
whose lifetimes do not overlap share memory (greedy best-fit by decreasing size over lifetime
intervals, 64-byte aligned). Values a node never writes in their planned layout (handed over in
another one, ``NodePlan.unwritten``) take no memory. View ops (reshape, flatten, squeeze, unsqueeze) alias their input
and extend its lifetime. Graph outputs produced by a non-view op are written into fresh arrays
(returned to the caller, never aliased with the arena); outputs that are views, inputs or
constants are copied at the end. ``Plan.peak_bytes`` = arena + output arrays.

An arena is used by one call at a time: the Session keeps a pool of arenas per plan (each with
its views prebuilt), so concurrent calls each get their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALIGN = 64


def _nbytes(shape, dtype) -> int:
    n = np.dtype(dtype).itemsize
    for d in shape:
        n *= int(d)
    return n


def _up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Plan:
    key: tuple
    shapes: dict  # value -> tuple
    dtypes: dict  # value -> str
    env: dict
    node_plans: list  # NodePlan per node
    slots: dict = field(default_factory=dict)  # value -> offset in arena
    scratch_slots: list = field(default_factory=list)  # per node: list of (offset, shape, dtype)
    fresh: set = field(default_factory=set)  # graph outputs written into fresh arrays
    unwritten: set = field(default_factory=set)  # values no node writes in this layout (NodePlan.unwritten)
    alias: dict = field(default_factory=dict)  # view value -> root value it aliases
    arena_bytes: int = 0
    output_bytes: int = 0
    naive_bytes: int = 0  # sum of all buffers without reuse (for reports)

    @property
    def peak_bytes(self) -> int:
        return self.arena_bytes + self.output_bytes


def assign_offsets(items) -> tuple:
    """items: list of (key, size, start, end) -> ({key: offset}, arena size). Intervals inclusive."""
    placed = []  # (offset, size, start, end)
    offs = {}
    top = 0
    for key, size, s, e in sorted(items, key=lambda t: (-t[1], t[2])):
        if size == 0:
            offs[key] = 0
            continue
        busy = sorted((o, o + sz) for o, sz, ps, pe in placed if ps <= e and s <= pe)
        best, best_gap = None, None
        cur = 0
        for a, b in busy:
            if a - cur >= size and (best_gap is None or a - cur < best_gap):
                best, best_gap = cur, a - cur
            cur = max(cur, b)
        if best is None:
            best = cur
        offs[key] = best
        placed.append((best, size, s, e))
        top = max(top, best + size)
    return offs, top


def build_plan(key, graph, ops, shp, node_plans, const_names) -> Plan:
    """Lay out every value and scratch buffer of ``graph`` for the concrete shapes ``shp``
    (``shapes.infer`` result) and the per-node plans."""
    p = Plan(key, {k: tuple(v) for k, v in shp.shapes.items()}, dict(shp.dtypes), dict(shp.env), node_plans)
    inputs = {v.name for v in graph.inputs}
    outputs = [v.name for v in graph.outputs]
    n_nodes = len(graph.nodes)
    start, end, size = {}, {}, {}
    for i, (node, op) in enumerate(zip(graph.nodes, ops)):
        for name in node.inputs:
            if not name or name in inputs or name in const_names:
                continue
            r = p.alias.get(name, name)
            if r in start:
                end[r] = max(end[r], i)
        for k, name in enumerate(node.outputs):
            if op.view and k == 0:
                src = node.inputs[0]
                if src in inputs or src in const_names:
                    p.alias[name] = None  # a view of a feed or constant: nothing to place
                else:
                    p.alias[name] = p.alias.get(src, src)
                continue
            if k in node_plans[i].unwritten:
                if name in outputs:
                    raise RuntimeError(f"internal: node {node.name} hands graph output {name} over in another layout")
                p.unwritten.add(name)
                continue
            if name in outputs:
                p.fresh.add(name)
                p.output_bytes += _nbytes(p.shapes[name], p.dtypes[name])
                continue
            start[name] = end[name] = i
            size[name] = _up(_nbytes(p.shapes[name], p.dtypes[name]))
    for name in outputs:  # outputs that are views of arena values must live until the final copy
        r = p.alias.get(name)
        if r is not None and r in start:
            end[r] = n_nodes
        if name not in p.fresh:
            p.output_bytes += _nbytes(p.shapes[name], p.dtypes[name])
    items = [(("v", n), size[n], start[n], end[n]) for n in start]
    for i, np_ in enumerate(node_plans):
        for j, (s, dt) in enumerate(np_.scratch):
            items.append((("s", i, j), _up(_nbytes(s, dt)), i, i))
    shared: dict = {}
    for i, np_ in enumerate(node_plans):
        for key, s, dt in np_.shared:
            if key in shared:
                shared[key][3] = i
            else:
                shared[key] = [tuple(s), dt, i, i]
                if isinstance(np_.data, dict):
                    np_.data.setdefault("_first_shared", set()).add(key)
    for key, (s, dt, a, b) in shared.items():
        items.append((("h", key), _up(_nbytes(s, dt)), a, b))
    offs, top = assign_offsets(items)
    p.arena_bytes = top
    p.naive_bytes = sum(it[1] for it in items)
    p.slots = {k[1]: o for k, o in offs.items() if k[0] == "v"}
    p.scratch_slots = [[(offs[("s", i, j)], tuple(s), dt) for j, (s, dt) in enumerate(np_.scratch)]
                       + [(offs[("h", key)], tuple(s), dt) for key, s, dt in np_.shared]
                       for i, np_ in enumerate(node_plans)]
    return p


def arena_views(plan: Plan, arena: np.ndarray) -> tuple:
    """Prebuilt views into one arena: ({value: array}, [per-node scratch arrays])."""
    def view(off, shape, dtype):
        n = _nbytes(shape, dtype)
        return arena[off:off + n].view(np.dtype(dtype)).reshape(shape)

    vals = {v: view(o, plan.shapes[v], plan.dtypes[v]) for v, o in plan.slots.items()}
    for v in plan.unwritten:  # no memory: a read-only NaN array of the shape (writes raise)
        dt = np.dtype(plan.dtypes[v])
        vals[v] = np.broadcast_to(np.array(np.nan if dt.kind == "f" else 0, dt), plan.shapes[v])
    scr = [[view(o, s, dt) for o, s, dt in node] for node in plan.scratch_slots]
    return vals, scr
