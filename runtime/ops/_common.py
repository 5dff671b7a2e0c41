"""Helpers shared by op modules (not an op module: the leading underscore keeps load_all away)."""
from __future__ import annotations

import numpy as np

from ...kernels.table import ACTIVATIONS

EMPTY_F32 = np.zeros(0, dtype=np.float32)
EMPTY_F32.setflags(write=False)  # read-only like mapped weights: one numba specialization for both


def act_code(name: str, node=None):
    from ...errors import UnsupportedOpError

    if name not in ACTIVATIONS:
        raise UnsupportedOpError(f"unknown fused activation {name!r} (known: {sorted(ACTIVATIONS)})",
                                 node=node, field="activation")
    return ACTIVATIONS[name]


def _np_act(y, act) -> bool:
    """relu / relu6 in place with numpy (no numba dispatch: keeps dense models numba-free at run
    time, which matters for cold start); False for other activations."""
    if act == 0:
        return True
    if act == 1:
        np.maximum(y, np.float32(0), out=y)
        return True
    if act == 2:
        np.clip(y, np.float32(0), np.float32(6), out=y)
        return True
    return False


def epilogue_rows(y2d, bias, act):
    """y2d [R, C] float32 in place: y = act(y + bias[None, :]) (torch layout)."""
    if bias is None and act == 0:
        return
    if act in (0, 1, 2):
        if bias is not None:
            np.add(y2d, bias, out=y2d)
        _np_act(y2d, act)
        return
    from ...kernels.nn import bias_act_rows

    bias_act_rows(y2d, EMPTY_F32 if bias is None else bias, act, 0.0, 0.0)


def epilogue_cols(y2d, bias, act, residual=None):
    """y2d [C, N] float32 in place: y = act(y + bias[:, None] + residual) (feature-major)."""
    if residual is not None:
        np.add(y2d, residual, out=y2d)
    if bias is None and act == 0:
        return
    if act in (0, 1, 2):
        if bias is not None:
            np.add(y2d, bias[:, None], out=y2d)
        _np_act(y2d, act)
        return
    from ...kernels.nn import bias_act_cols

    bias_act_cols(y2d, EMPTY_F32 if bias is None else bias, act, 0.0, 0.0)


def prod(shape) -> int:
    p = 1
    for d in shape:
        p *= int(d)
    return p


def as_f32_const(t):
    """A stored constant (WeightFormat or array) as a numpy array; float16/bfloat16 widened
    (the only case that copies)."""
    if t is None or isinstance(t, np.ndarray):
        return t
    a = t.to_dense()
    return a


def split0(y, ins, fn, work=None) -> None:
    """Run ``fn(y_part, ins_parts)`` over ranges of y's first axis on the call's threads
    (``runtime.par``). An input with y's rank and first dim is sliced alike; any other input
    (broadcast along axis 0, or lower rank, or None) is passed whole. ``work`` defaults to y.size."""
    from .. import par

    if y.ndim == 0 or y.shape[0] < 2:
        fn(y, ins)
        return
    n = y.shape[0]
    cut = [a is not None and a.ndim == y.ndim and a.shape[0] == n for a in ins]

    def part(i0, i1):
        fn(y[i0:i1], [a[i0:i1] if c else a for a, c in zip(ins, cut)])

    par.split(n, part, float(y.size if work is None else work))
