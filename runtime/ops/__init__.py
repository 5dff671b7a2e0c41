"""Op implementations: a small registry, one module per op or op family.

Adding an op = one file in this folder (plus its row in ``formats/optable.py``)::

    from . import Op, register

    def _ref(attrs, x, env=None):                        # plain numpy, for tests and the converter
        return np.negative(x)

    @register("my_op", reference=_ref)
    class MyOp(Op):
        def run(self, ins, outs, scratch, data):     # write every output in place
            np.negative(ins[0], out=outs[0])

Every module here is imported by ``load_all()``. Ops of the table without a dedicated class run
through ``RefOp`` (the numpy reference, copied into the planned buffer) so the runtime always
covers the whole table.

Lifecycle of an op object (one per graph node, built at load):

* ``__init__(node, ctx)``: load-time work (weights from the memory map, constants, flags).
  ``ctx`` is the Session's ``LoadContext`` (tensors, selector, layout flags).
* ``plan(ins, outs, env) -> NodePlan``: per concrete input shape; ``ins`` / ``outs`` are lists of
  ``(shape tuple, dtype str)`` (None for an omitted optional input). Returns the scratch buffers
  the op needs (allocated in the arena) and any per-shape data (e.g. the chosen kernel).
* ``run(ins, outs, scratch, data)``: ``ins`` numpy arrays (C-contiguous; None for omitted
  optionals), ``outs`` preallocated outputs to fill, ``scratch`` arrays from the plan.
* View ops (``view = True``: reshape, flatten, squeeze, unsqueeze) instead implement
  ``view_of(ins, out_shapes) -> list`` returning views of their input (no buffer).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import numpy as np

from ...formats import optable

IMPLS: dict = {}


@dataclass
class NodePlan:
    scratch: list = field(default_factory=list)  # list of (shape tuple, dtype str)
    data: object = None
    kernel: str = ""  # what runs (for profiles and reports)
    # buffers shared by several nodes: list of (key, shape tuple, dtype str); appended after
    # ``scratch`` in run()'s scratch list; live from the first to the last node naming the key.
    # The planner sets ``data["_first_shared"]`` (a set of keys) on the first user when data is a dict.
    shared: list = field(default_factory=list)
    # indices of outputs this node never writes in their planned buffer, because the value is handed
    # over in another layout that its readers read (the packed conv hand-off): the planner gives them
    # no arena memory and a read-only NaN view of the shape (an unexpected reader would see NaN)
    unwritten: tuple = ()


class Op:
    view = False
    weight = False  # True for ops whose weight input gets a kernel selected (linear, conv2d)

    def __init__(self, node, ctx):
        self.node = node
        self.name = node.name
        self.attrs = optable.with_defaults(node.op, node.attrs) if node.op in optable.OPS else dict(node.attrs)
        self.ctx = ctx

    def plan(self, ins, outs, env) -> NodePlan:
        return NodePlan(kernel=self.default_kernel())

    def default_kernel(self) -> str:
        return "numpy"

    def run(self, ins, outs, scratch, data):  # pragma: no cover - abstract
        raise NotImplementedError

    def view_of(self, ins, out_shapes):  # pragma: no cover - view ops only
        raise NotImplementedError


def register(*names, reference=None):
    """Class decorator: the class implements the ops ``names``. ``reference``: the op's plain-numpy
    reference ``fn(attrs, *inputs, env=None)`` when ``runtime/reference.py`` has none (a new op
    can then live in one file here plus its row in ``formats/optable.py``)."""
    def deco(cls):
        for n in names:
            if n not in optable.OPS:
                raise KeyError(f"op {n!r} is not in formats/optable.py")
            IMPLS[n] = cls
            if reference is not None:
                from ..reference import register_reference

                register_reference(n, reference)
        return cls
    return deco


class RefOp(Op):
    """Any op without a dedicated class: the numpy reference, copied into the planned output
    (allocates temporaries; used for rare ops only)."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        self.env = {}

    def plan(self, ins, outs, env):
        return NodePlan(data=dict(env), kernel="numpy_reference")

    def run(self, ins, outs, scratch, data):
        from ..reference import eval_node

        res = eval_node(self.node, ins, data)
        for o, r in zip(outs, res):
            np.copyto(o, r, casting="unsafe")


def register_internal(*names):
    """Class decorator for runtime-internal ops (names start with "_"): nodes the Session's
    load-time fusions create (never stored in a model file, not in the op table)."""
    def deco(cls):
        for n in names:
            if not n.startswith("_"):
                raise KeyError(f"internal op {n!r} must start with '_'")
            IMPLS[n] = cls
        return cls
    return deco


_loaded = False


def load_all() -> dict:
    """Import every op module in this package (once) and return ``{op: class}``."""
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            if not m.name.startswith("_"):
                importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True
    return IMPLS


def impl_for(op: str):
    """The implementing class for ``op`` (RefOp when no dedicated class exists)."""
    load_all()
    return IMPLS.get(op, RefOp)
