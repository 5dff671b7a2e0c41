"""Plain-numpy references of the elementwise and normalization math the kernels implement
(float32 in, float32 out, torch semantics). The kernel tests compare against these, and the
runtime's reference interpreter (runtime/reference.py) evaluates ops with them."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedOpError


def _erf(x):
    try:
        from scipy.special import erf
        return erf(x).astype(x.dtype, copy=False)
    except ImportError:  # pragma: no cover
        return np.vectorize(math.erf, otypes=[x.dtype])(x)


def gelu(x, approximate="none"):
    x = np.asarray(x, dtype=np.float32)
    if approximate == "tanh":
        c = np.float32(math.sqrt(2.0 / math.pi))
        return (np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))).astype(np.float32)
    return (np.float32(0.5) * x * (np.float32(1) + _erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)


def sigmoid(x):
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)


def activation(y, act, lo=None, hi=None):
    """The fused activations of ``linear`` / ``conv2d`` (names as kernels.table.ACTIVATIONS)."""
    if act in ("none", None):
        return y
    if act == "relu":
        return np.maximum(y, np.float32(0))
    if act == "relu6":
        return np.clip(y, np.float32(0), np.float32(6))
    if act == "clamp":
        return np.clip(y, -np.inf if lo is None else lo, np.inf if hi is None else hi).astype(np.float32)
    if act == "gelu":
        return gelu(y)
    if act == "gelu_tanh":
        return gelu(y, "tanh")
    if act == "silu":
        return (y * sigmoid(y)).astype(np.float32)
    if act == "hardswish":
        return (y * np.clip(y + np.float32(3), 0, 6) / np.float32(6)).astype(np.float32)
    if act == "sigmoid":
        return sigmoid(y)
    raise UnsupportedOpError(f"unknown fused activation {act!r}", field="activation")


def softmax(x, mask=None, axis=-1):
    x = x.astype(np.float32)
    if mask is not None:
        x = x + mask.astype(np.float32)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - m)
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def layernorm(x, w=None, b=None, eps=1e-5):
    x = x.astype(np.float32)
    mu = x.mean(-1, keepdims=True, dtype=np.float64)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = ((x - mu) / np.sqrt(var + eps)).astype(np.float32)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.astype(np.float32)
