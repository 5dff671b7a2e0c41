"""A pure-numpy reference interpreter of the op table.

Used by tests (the correctness oracle), by the converter (expected outputs computed from the
*compressed* weights: ``to_dense()`` of every weight format, i.e. dequantized int8, pruned
sparse values), and as the fallback path of the runtime for ops without a faster implementation.

Semantics follow torch (NCHW images, ``[batch, seq, hidden]`` sequences, float32 math).
``run_reference(model, feeds)`` -> ``{output name: array}``; ``REF[op](attrs, *inputs, env=...)``
evaluates one op (attrs with defaults filled in; weights as dense float32 arrays).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError, UnsupportedOpError
from ..formats import optable
from ..kernels.ref import _erf, activation, gelu, layernorm, sigmoid, softmax  # noqa: F401 (re-exported)

REF: dict = {}


def ref(*names):
    def deco(fn):
        for n in names:
            REF[n] = fn
        return fn
    return deco


# --- elementwise ---------------------------------------------------------------------------
_UNARY = {
    "relu": lambda x, a: np.maximum(x, x.dtype.type(0)),
    "gelu": lambda x, a: gelu(x, a.get("approximate", "none")),
    "silu": lambda x, a: (x * sigmoid(x)).astype(np.float32),
    "hardswish": lambda x, a: activation(x, "hardswish"),
    "hardsigmoid": lambda x, a: (np.clip(x + np.float32(3), 0, 6) / np.float32(6)).astype(np.float32),
    "sigmoid": lambda x, a: sigmoid(x),
    "tanh": lambda x, a: np.tanh(x),
    "sqrt": lambda x, a: np.sqrt(x),
    "rsqrt": lambda x, a: (np.float32(1) / np.sqrt(x)).astype(x.dtype),
    "exp": lambda x, a: np.exp(x),
    "neg": lambda x, a: -x,
    "erf": lambda x, a: _erf(np.asarray(x, dtype=np.float32)),
}
for _n, _f in _UNARY.items():
    REF[_n] = (lambda f: lambda attrs, x, env=None: f(x, attrs))(_f)


def result_dtype(op: str, a: np.dtype, b: np.dtype) -> np.dtype:
    """torch-like promotion for binary ops: any float -> float32; int/int div -> float32."""
    a, b = np.dtype(a), np.dtype(b)
    if a.kind == "f" or b.kind == "f" or op == "div":
        return np.dtype(np.float32)
    if a == b:
        return a
    if a.kind == "b":
        return b
    if b.kind == "b":
        return a
    return np.dtype(np.int64)


def _binary(fn, op):
    def f(attrs, a, b, env=None):
        dt = result_dtype(op, a.dtype, b.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(fn(a.astype(dt, copy=False), b.astype(dt, copy=False))).astype(dt, copy=False)
    return f


REF["add"] = _binary(np.add, "add")
REF["sub"] = _binary(np.subtract, "sub")
REF["mul"] = _binary(np.multiply, "mul")
REF["div"] = _binary(np.divide, "div")
REF["pow"] = _binary(np.power, "pow")


@ref("clamp")
def _clamp(attrs, x, env=None):
    lo, hi = attrs.get("min"), attrs.get("max")
    y = x
    if lo is not None:
        y = np.maximum(y, x.dtype.type(lo))
    if hi is not None:
        y = np.minimum(y, x.dtype.type(hi))
    return np.array(y, dtype=x.dtype)


@ref("where")
def _where(attrs, c, a, b, env=None):
    dt = result_dtype("where", a.dtype, b.dtype)
    return np.where(c.astype(bool), a.astype(dt), b.astype(dt))


@ref("cast")
def _cast(attrs, x, env=None):
    return x.astype(np.dtype(attrs["dtype"] if attrs["dtype"] != "bool" else np.bool_))


# --- weight ops ------------------------------------------------------------------------------
@ref("linear")
def _linear(attrs, x, w, b=None, env=None):
    """x [..., in] float32, w [out, in] dense float32 -> [..., out]."""
    y = np.matmul(x.astype(np.float32), w.T.astype(np.float32))
    if b is not None:
        y = y + b
    return activation(y.astype(np.float32), attrs.get("activation", "none"))


def im2col(x, kh, kw, stride, padding, dilation):
    """x [C, H, W] -> cols [C*kh*kw, Ho*Wo] (rows ordered c, i, j: torch weight order)."""
    C, H, W = x.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((C, kh, kw, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xp[:, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
    return cols.reshape(C * kh * kw, Ho * Wo), Ho, Wo


@ref("conv2d")
def _conv2d(attrs, x, w, b=None, env=None):
    """x [N, C, H, W]; w [out, in/groups, kh, kw] float32 -> [N, out, Ho, Wo]."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    g = attrs.get("groups", 1)
    Og = O // g
    outs = []
    for n in range(N):
        ys = []
        for gi in range(g):
            cols, Ho, Wo = im2col(x[n, gi * Cg:(gi + 1) * Cg], kh, kw, attrs["stride"], attrs["padding"],
                                  attrs["dilation"])
            ys.append(w[gi * Og:(gi + 1) * Og].reshape(Og, -1).astype(np.float32) @ cols)
        outs.append(np.concatenate(ys, 0).reshape(O, Ho, Wo))
    y = np.stack(outs).astype(np.float32) if outs else np.zeros((0, O, 1, 1), np.float32)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return activation(y.astype(np.float32), attrs.get("activation", "none"))


@ref("batchnorm")
def _batchnorm(attrs, x, scale, bias, mean, var, env=None):
    sh = (1, -1) + (1,) * (x.ndim - 2)
    inv = (scale / np.sqrt(var + np.float32(attrs["eps"]))).astype(np.float32)
    return ((x - mean.reshape(sh)) * inv.reshape(sh) + bias.reshape(sh)).astype(np.float32)


# --- pooling ---------------------------------------------------------------------------------
def _pool_windows(x, attrs, fill):
    kh, kw = attrs["kernel"]
    sh, sw = attrs["stride"] or attrs["kernel"]
    ph, pw = attrs["padding"]
    dh, dw = attrs.get("dilation", [1, 1])
    N, C, H, W = x.shape
    _, _, Ho, Wo = optable.OPS["maxpool2d"].shape([list(x.shape)], {**attrs, "dilation": [dh, dw]})[0]
    # pad enough on the right for ceil_mode windows
    need_h = (Ho - 1) * sh + dh * (kh - 1) + 1
    need_w = (Wo - 1) * sw + dw * (kw - 1) + 1
    xp = np.full((N, C, max(H + 2 * ph, need_h), max(W + 2 * pw, need_w)), fill, dtype=np.float32)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    wins = np.empty((kh * kw, N, C, Ho, Wo), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            wins[i * kw + j] = xp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
    return wins, (kh, kw, sh, sw, ph, pw, H, W, Ho, Wo)


@ref("maxpool2d")
def _maxpool(attrs, x, env=None):
    wins, _ = _pool_windows(x, attrs, -np.inf)
    return wins.max(0)


@ref("avgpool2d")
def _avgpool(attrs, x, env=None):
    wins, (kh, kw, sh, sw, ph, pw, H, W, Ho, Wo) = _pool_windows(x, {**attrs, "dilation": [1, 1]}, 0.0)
    s = wins.sum(0)
    hs = np.arange(Ho) * sh - ph
    ws = np.arange(Wo) * sw - pw
    if attrs["count_include_pad"]:
        ch = np.minimum(hs + kh, H + ph) - hs
        cw = np.minimum(ws + kw, W + pw) - ws
    else:
        ch = np.minimum(hs + kh, H) - np.maximum(hs, 0)
        cw = np.minimum(ws + kw, W) - np.maximum(ws, 0)
    div = (ch[:, None] * cw[None, :]).astype(np.float32)
    return (s / div).astype(np.float32)


@ref("global_avgpool")
def _gap(attrs, x, env=None):
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=attrs["keepdim"], dtype=np.float32).astype(np.float32)


# --- shape ops -------------------------------------------------------------------------------
@ref("concat")
def _concat(attrs, *xs, env=None):
    return np.concatenate(xs, axis=attrs["axis"])


@ref("flatten")
def _flatten(attrs, x, env=None):
    return x.reshape(optable.OPS["flatten"].shape([list(x.shape)], attrs)[0])


@ref("reshape")
def _reshape(attrs, x, env=None):
    return x.reshape(optable.reshape_dims(list(x.shape), attrs["shape"], env))


@ref("transpose")
def _transpose(attrs, x, env=None):
    return np.ascontiguousarray(np.transpose(x, attrs["perm"]))


@ref("squeeze")
def _squeeze(attrs, x, env=None):
    return x.reshape(optable.OPS["squeeze"].shape([list(x.shape)], attrs)[0])


@ref("unsqueeze")
def _unsqueeze(attrs, x, env=None):
    return x.reshape(optable.OPS["unsqueeze"].shape([list(x.shape)], attrs)[0])


@ref("slice")
def _slice(attrs, x, env=None):
    sl = [slice(None)] * x.ndim
    sl[attrs["axis"]] = slice(attrs["start"], attrs["end"], attrs["step"])
    return np.ascontiguousarray(x[tuple(sl)])


@ref("expand")
def _expand(attrs, x, env=None):
    return np.ascontiguousarray(np.broadcast_to(x, optable.expand_dims(list(x.shape), attrs["shape"], env)))


# --- transformer pieces ------------------------------------------------------------------------
@ref("softmax")
def _softmax(attrs, x, mask=None, env=None):
    return softmax(x, mask, attrs["axis"])


@ref("layernorm")
def _layernorm(attrs, x, w=None, b=None, env=None):
    ax = attrs["axis"] % x.ndim
    if ax != x.ndim - 1:
        return np.moveaxis(layernorm(np.moveaxis(x, ax, -1), w, b, attrs["eps"]), -1, ax)
    return layernorm(x, w, b, attrs["eps"])


def check_ids(ids, n, node=None):
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InputError(f"embedding index {bad} out of range [0, {n})", node=node, field="ids")


@ref("embedding")
def _embedding(attrs, ids, table, env=None):
    check_ids(ids, table.shape[0], attrs.get("_node"))
    return table[ids.astype(np.int64)]


@ref("matmul")
def _matmul(attrs, a, b, env=None):
    return np.matmul(a, b)


@ref("reduce_sum")
def _rsum(attrs, x, env=None):
    return np.sum(x, axis=tuple(attrs["axes"]), keepdims=attrs["keepdim"], dtype=x.dtype)


@ref("reduce_mean")
def _rmean(attrs, x, env=None):
    return np.mean(x, axis=tuple(attrs["axes"]), keepdims=attrs["keepdim"], dtype=np.float32).astype(x.dtype)


@ref("masked_mean")
def _masked_mean(attrs, x, mask, env=None):
    ax = attrs["axis"] % x.ndim
    m = mask.astype(np.float32).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    num = (x.astype(np.float32) * m).sum(ax)
    den = np.maximum(m.sum(ax), np.float32(1e-9))
    return (num / den).astype(np.float32)


@ref("l2norm")
def _l2norm(attrs, x, env=None):
    n = np.sqrt((x.astype(np.float32) ** 2).sum(attrs["axis"], keepdims=True))
    return (x / np.maximum(n, np.float32(attrs["eps"]))).astype(np.float32)


def register_reference(op: str, fn) -> None:
    """Add the reference of ``op`` from outside this module (an op module of ``runtime/ops`` does it
    with ``@register(op, reference=fn)``): ``fn(attrs, *inputs, env=None)`` -> array or list."""
    if op not in optable.OPS:
        raise KeyError(f"op {op!r} is not in formats/optable.py")
    REF.setdefault(op, fn)


def _load_op_references() -> None:
    """Import the runtime's op modules, which may register references of their ops."""
    try:
        from .ops import load_all

        load_all()
    except ImportError:  # pragma: no cover - the ops package is part of the runtime
        pass


def missing_references() -> list:
    """Ops of the table without a reference (after loading the op modules); tests keep it empty."""
    _load_op_references()
    return sorted(set(optable.OPS) - set(REF))


# --- whole graphs ------------------------------------------------------------------------------
def weight_dense(t) -> np.ndarray:
    """A tensor (WeightFormat or array) as a dense numpy array: float32 for float/quantized
    weights (compressed formats dequantized), integers/bools as stored; conv weights 4-D."""
    if isinstance(t, np.ndarray):
        return t
    a = t.to_dense()
    orig = getattr(t, "orig_shape", None)
    if orig is not None and tuple(orig) != tuple(a.shape):
        a = a.reshape(orig)
    return a


def eval_node(node, inputs, env=None):
    """Evaluate one graph node on numpy inputs (None for omitted optionals) -> list of outputs."""
    if node.op not in REF:
        _load_op_references()
    if node.op not in REF:
        raise UnsupportedOpError(f"op {node.op!r} has no reference implementation", node=node.name)
    attrs = optable.with_defaults(node.op, node.attrs)
    attrs["_node"] = node.name
    spec = optable.spec(node.op)
    args = list(inputs)
    while args and args[-1] is None and len(args) > len(spec.inputs) - len(spec.optional):
        args.pop()
    out = REF[node.op](attrs, *args, env=env or {})
    return list(out) if isinstance(out, (list, tuple)) else [out]


def run_reference(model, feeds: dict, output_names=None, keep_all: bool = False) -> dict:
    """Run ``model`` (an object with ``.graph`` and ``.tensors``) on ``feeds`` in plain numpy.

    Returns ``{output name: array}`` (every computed value too when ``keep_all``)."""
    g = model.graph
    vals: dict = {}
    env: dict = {}
    for vi in g.inputs:
        if vi.name not in feeds:
            raise InputError("missing input", tensor=vi.name)
        a = np.asarray(feeds[vi.name])
        for d, n in zip(vi.shape, a.shape):
            if isinstance(d, str):
                env.setdefault(d, int(n))
        vals[vi.name] = a
    cache: dict = {}

    def get(name):
        if name == "":
            return None
        if name in vals:
            return vals[name]
        if name in model.tensors:
            if name not in cache:
                cache[name] = weight_dense(model.tensors[name])
            return cache[name]
        raise InputError("value is not defined", tensor=name)

    for node in g.nodes:
        outs = eval_node(node, [get(i) for i in node.inputs], env)
        for name, v in zip(node.outputs, outs):
            vals[name] = v
    names = output_names or [v.name for v in g.outputs]
    res = {n: get(n) for n in names}
    if keep_all:
        res = {**vals, **res}
    return res
