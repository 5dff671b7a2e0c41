"""Static activation quantization parameters, stored in ``Graph.act_quant``.

``act_quant = {value_name: {"scale": float > 0 finite, "zero_point": int, "dtype": "int8"|"uint8"}}``
(``dtype`` optional, default "int8"; zero_point within the dtype's range). Per-tensor:
``q = clip(round(x / scale) + zero_point, qmin, qmax)``, ``x ~ scale * (q - zero_point)``.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ModelFileError

QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def validate_act_quant(act_quant, *, file=None, values=None) -> dict:
    """Check ``act_quant`` and return it normalised (floats, ints, dtype filled in).

    ``values``: optional set of value names that exist in the graph; entries naming others are
    rejected. Raises ModelFileError naming file, value (as node) and field."""
    if not isinstance(act_quant, dict):
        raise ModelFileError("act_quant must be an object", file=file, field="act_quant")
    out = {}
    for v, p in act_quant.items():
        if not isinstance(v, str) or not isinstance(p, dict):
            raise ModelFileError(f"entry {v!r} must map a value name to an object", file=file, field="act_quant")
        where = dict(file=file, node=v)
        if values is not None and v not in values:
            raise ModelFileError("act_quant names a value the graph does not define", field="act_quant", **where)
        extra = sorted(set(p) - {"scale", "zero_point", "dtype"})
        if extra:
            raise ModelFileError(f"unknown keys {extra}", field="act_quant", **where)
        dtype = p.get("dtype", "int8")
        if not isinstance(dtype, str) or dtype not in QRANGE:
            raise ModelFileError(f"dtype must be one of {list(QRANGE)}, got {dtype!r}", field="act_quant.dtype",
                                 **where)
        s = p.get("scale")
        if (isinstance(s, bool) or not isinstance(s, (int, float)) or (isinstance(s, int) and s >= 2 ** 1000)
                or not math.isfinite(float(s)) or float(s) <= 0):
            raise ModelFileError(f"scale must be a finite number > 0, got {s!r}", field="act_quant.scale", **where)
        z = p.get("zero_point", 0)
        lo, hi = QRANGE[dtype]
        if isinstance(z, bool) or not isinstance(z, int) or not lo <= z <= hi:
            raise ModelFileError(f"zero_point must be an int in [{lo}, {hi}], got {z!r}",
                                 field="act_quant.zero_point", **where)
        out[v] = {"scale": float(s), "zero_point": int(z), "dtype": dtype}
    return out


def act_quant_from_range(lo: float, hi: float, *, dtype: str = "int8", symmetric: bool = False) -> dict:
    """Parameters mapping the observed range [lo, hi] (widened to include 0) onto ``dtype``."""
    qmin, qmax = QRANGE[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(-lo, hi)
        scale = a / ((qmax - qmin) / 2.0) if a > 0 else 1.0
        zp = 0 if dtype == "int8" else 128
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    scale = float(np.float32(scale)) or 1.0
    return {"scale": scale, "zero_point": int(zp), "dtype": dtype}
