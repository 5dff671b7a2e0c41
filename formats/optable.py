"""The op table: every graph op, its inputs, attributes (with types) and shape rule.

One table, three users: the model-file reader validates graphs against it, the runtime
implements every op in it (``runtime/ops``), and the converter maps torch/aten ops onto it.

Conventions
* Tensors are row-major numpy arrays with torch's logical layout (NCHW images,
  ``[batch, seq, hidden]`` sequences). Kernel-internal layouts are the runtime's business.
* ``linear(x, weight, bias?)``: x ``[..., in]``, weight ``[out, in]`` (any weight format),
  y ``[..., out]``. ``conv2d(x, weight, bias?)``: weight ``[out, in/groups, kh, kw]``
  stored as ``[out, in/groups*kh*kw]`` (``orig_shape`` keeps the 4-D shape).
* Attribute types: ``int``, ``float``, ``bool``, ``str``, ``ints`` (list of int),
  ``dims`` (list of int or symbol str; -1 allowed in reshape), ``dtype`` (a VALUE_DTYPES str).
* Shape rules take input shapes (lists of int|str dims) and attrs and return output
  shapes; symbolic dims stay symbolic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

REQUIRED = object()  # marks an attribute without a default

ATTR_TYPES = ("int", "float", "bool", "str", "ints", "dims", "dtype", "floats")


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple  # input names, in order
    optional: tuple = ()  # names of inputs that may be "" / missing (always trailing)
    variadic: bool = False  # the last input repeats (concat)
    attrs: dict = field(default_factory=dict)  # attr -> (type, default or REQUIRED)
    n_outputs: int = 1
    weight_input: str | None = None  # the input that holds a (possibly compressed) weight
    shape: Callable | None = None  # shape rule, see ``infer`` in runtime/shapes.py
    doc: str = ""


OPS: dict[str, OpSpec] = {}


def _op(name, inputs, optional=(), variadic=False, attrs=None, n_outputs=1, weight_input=None, doc=""):
    OPS[name] = OpSpec(name, tuple(inputs), tuple(optional), variadic, dict(attrs or {}), n_outputs,
                       weight_input, None, doc)


_UNARY = {
    "relu": "max(x, 0)",
    "gelu": "gelu; attr approximate: 'none' (erf) or 'tanh'",
    "silu": "x * sigmoid(x)",
    "hardswish": "x * relu6(x + 3) / 6",
    "hardsigmoid": "relu6(x + 3) / 6",
    "sigmoid": "1 / (1 + exp(-x))",
    "tanh": "tanh(x)",
    "sqrt": "sqrt(x)",
    "rsqrt": "1 / sqrt(x)",
    "exp": "exp(x)",
    "neg": "-x",
    "erf": "erf(x)",
}
for _n, _d in _UNARY.items():
    _op(_n, ["x"], attrs={"approximate": ("str", "none")} if _n == "gelu" else {}, doc=_d)

for _n in ("add", "sub", "mul", "div", "pow"):
    _op(_n, ["a", "b"], doc=f"elementwise {_n} with numpy broadcasting")

_op("clamp", ["x"], attrs={"min": ("float", None), "max": ("float", None)}, doc="relu6 = clamp(0, 6); hardtanh")
_op("where", ["cond", "a", "b"], doc="numpy.where with broadcasting")
_op("cast", ["x"], attrs={"dtype": ("dtype", REQUIRED)})

_op("linear", ["x", "weight", "bias"], optional=("bias",), weight_input="weight",
    attrs={"activation": ("str", "none")},
    doc="y[..., out] = x[..., in] @ W.T + bias, then the fused activation (none, relu, relu6, gelu, "
        "gelu_tanh, silu, hardswish, sigmoid)")
_op("conv2d", ["x", "weight", "bias"], optional=("bias",), weight_input="weight",
    attrs={"stride": ("ints", [1, 1]), "padding": ("ints", [0, 0]), "dilation": ("ints", [1, 1]),
           "groups": ("int", 1), "activation": ("str", "none")},
    doc="NCHW conv; weight [out, in/groups, kh, kw] stored 2-D [out, in/groups*kh*kw]")
_op("batchnorm", ["x", "scale", "bias", "mean", "var"], attrs={"eps": ("float", 1e-5)},
    doc="inference batchnorm over axis 1 (normally folded into conv at conversion)")
_op("maxpool2d", ["x"], attrs={"kernel": ("ints", REQUIRED), "stride": ("ints", REQUIRED),
                               "padding": ("ints", [0, 0]), "dilation": ("ints", [1, 1]),
                               "ceil_mode": ("bool", False)})
_op("avgpool2d", ["x"], attrs={"kernel": ("ints", REQUIRED), "stride": ("ints", REQUIRED),
                               "padding": ("ints", [0, 0]), "ceil_mode": ("bool", False),
                               "count_include_pad": ("bool", True)})
_op("global_avgpool", ["x"], attrs={"keepdim": ("bool", True)}, doc="mean over H, W of NCHW")
_op("concat", ["xs"], variadic=True, attrs={"axis": ("int", REQUIRED)})
_op("flatten", ["x"], attrs={"start": ("int", 1), "end": ("int", -1)})
_op("reshape", ["x"], attrs={"shape": ("dims", REQUIRED)},
    doc="target dims: ints, symbols (resolved at run time), one -1 allowed")
_op("transpose", ["x"], attrs={"perm": ("ints", REQUIRED)})
_op("squeeze", ["x"], attrs={"axes": ("ints", REQUIRED)})
_op("unsqueeze", ["x"], attrs={"axes": ("ints", REQUIRED)})
_op("slice", ["x"], attrs={"axis": ("int", REQUIRED), "start": ("int", 0), "end": ("int", None),
                           "step": ("int", 1)})
_op("expand", ["x"], attrs={"shape": ("dims", REQUIRED)}, doc="broadcast to shape; -1 keeps a dim")
_op("softmax", ["x", "mask"], optional=("mask",), attrs={"axis": ("int", -1)},
    doc="softmax(x + mask) along axis; mask additive, broadcast")
_op("layernorm", ["x", "weight", "bias"], optional=("weight", "bias"),
    attrs={"eps": ("float", 1e-5), "axis": ("int", -1)}, doc="normalise over the last dim")
_op("embedding", ["ids", "table"], doc="table[ids]; ids int32/int64, validated in range at run time")
_op("matmul", ["a", "b"], doc="numpy.matmul semantics (batched, broadcast)")
_op("reduce_sum", ["x"], attrs={"axes": ("ints", REQUIRED), "keepdim": ("bool", False)})
_op("reduce_mean", ["x"], attrs={"axes": ("ints", REQUIRED), "keepdim": ("bool", False)})
_op("masked_mean", ["x", "mask"], attrs={"axis": ("int", 1)},
    doc="sum(x * mask[..., None]) / max(sum(mask), 1e-9): sentence-embedding mean pooling")
_op("l2norm", ["x"], attrs={"axis": ("int", -1), "eps": ("float", 1e-12)}, doc="x / max(||x||, eps)")


# --------------------------------------------------------------------------------------------
# Shape rules. ``rule(shapes, attrs) -> list of output shapes``; ``shapes`` are the input shapes
# (lists of int | str dims; None for an omitted optional input), ``attrs`` the node's attributes
# with defaults filled in. Symbolic dims stay symbolic: arithmetic on symbols yields expression
# strings (e.g. "batch*seq"); with all-int inputs the rules are exact. Rules raise ValueError
# (the caller names node and field) on inconsistent shapes.
# --------------------------------------------------------------------------------------------
def _is_int(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


def _sym(d) -> str:
    s = str(d)
    return s if (s.isidentifier() or s.lstrip("-").isdigit()) else f"({s})"


def dim_mul(a, b):
    if _is_int(a) and _is_int(b):
        return a * b
    if a == 1:
        return b
    if b == 1:
        return a
    return f"{_sym(a)}*{_sym(b)}"


def dim_prod(ds):
    p = 1
    for d in ds:
        p = dim_mul(p, d)
    return p


def dim_affine(d, scale_num, add, div):
    """(d * scale_num + add) // div + 1 style conv/pool output; symbolic -> expression."""
    if _is_int(d):
        return (d * scale_num + add) // div + 1
    return f"(({_sym(d)}+{add})//{div}+1)" if scale_num == 1 else f"(({_sym(d)}*{scale_num}+{add})//{div}+1)"


def _axis(a, rank, what="axis"):
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"{what} {a} out of range for rank {rank}")
    return a % rank if rank else 0


def broadcast(*shapes):
    shapes = [list(s) for s in shapes if s is not None]
    r = max(len(s) for s in shapes)
    out = []
    for i in range(r):
        ds = [s[len(s) - r + i] for s in shapes if len(s) - r + i >= 0]
        ints = [d for d in ds if _is_int(d) and d != 1]
        syms = [d for d in ds if not _is_int(d)]
        if len(set(ints)) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast (dim {i}: {sorted(set(ints))})")
        out.append(ints[0] if ints else (syms[0] if syms else 1))
    return out


def _same(shapes, attrs):
    return [list(shapes[0])]


def _bcast_rule(shapes, attrs):
    return [broadcast(*shapes)]


def _linear(shapes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) < 1 or len(w) != 2:
        raise ValueError(f"linear needs x [..., in] and a 2-D weight [out, in], got {x} and {w}")
    if _is_int(x[-1]) and x[-1] != w[1]:
        raise ValueError(f"x has {x[-1]} features, weight expects {w[1]}")
    return [list(x[:-1]) + [w[0]]]


def _conv_out(d, k, s, p, dl):
    if _is_int(d):
        o = (d + 2 * p - dl * (k - 1) - 1) // s + 1
        if o < 1:
            raise ValueError(f"conv/pool output size {o} < 1 (input {d}, kernel {k}, stride {s}, pad {p})")
        return o
    return f"(({_sym(d)}+{2 * p - dl * (k - 1) - 1})//{s}+1)"


def _conv2d(shapes, attrs):
    """The weight shape given must be the 4-D ``orig_shape`` [out, in/groups, kh, kw]."""
    x, w_orig = shapes[0], shapes[1]
    if len(x) != 4:
        raise ValueError(f"conv2d input must be NCHW (4-D), got {x}")
    if len(w_orig) != 4:
        raise ValueError(f"conv2d weight needs a 4-D shape [out, in/groups, kh, kw], got {w_orig}")
    g = attrs["groups"]
    if _is_int(x[1]) and x[1] != w_orig[1] * g:
        raise ValueError(f"input has {x[1]} channels, weight expects {w_orig[1]} x groups {g}")
    sh, sw = attrs["stride"]
    ph, pw = attrs["padding"]
    dh, dw = attrs["dilation"]
    return [[x[0], w_orig[0], _conv_out(x[2], w_orig[2], sh, ph, dh), _conv_out(x[3], w_orig[3], sw, pw, dw)]]


def _pool_out(d, k, s, p, dl, ceil_mode):
    if not _is_int(d):
        return _conv_out(d, k, s, p, dl)
    eff = dl * (k - 1) + 1
    num = d + 2 * p - eff
    o = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (o - 1) * s >= d + p:  # torch: last window must start inside input or left pad
        o -= 1
    if o < 1:
        raise ValueError(f"pool output size {o} < 1 (input {d}, kernel {k}, stride {s}, pad {p})")
    return o


def _pool(shapes, attrs):
    x = shapes[0]
    if len(x) != 4:
        raise ValueError(f"pooling input must be NCHW (4-D), got {x}")
    kh, kw = attrs["kernel"]
    sh, sw = attrs["stride"] or attrs["kernel"]
    ph, pw = attrs["padding"]
    dh, dw = attrs.get("dilation", [1, 1])
    cm = attrs["ceil_mode"]
    return [[x[0], x[1], _pool_out(x[2], kh, sh, ph, dh, cm), _pool_out(x[3], kw, sw, pw, dw, cm)]]


def _gap(shapes, attrs):
    x = shapes[0]
    if len(x) < 3:
        raise ValueError(f"global_avgpool input must be N, C, spatial..., got {x}")
    return [list(x[:2]) + ([1] * (len(x) - 2) if attrs["keepdim"] else [])]


def _concat(shapes, attrs):
    r = len(shapes[0])
    ax = _axis(attrs["axis"], r)
    out = list(shapes[0])
    tot = 0
    for s in shapes:
        if len(s) != r:
            raise ValueError(f"concat inputs differ in rank: {shapes}")
        for i in range(r):
            if i != ax and _is_int(s[i]) and _is_int(out[i]) and s[i] != out[i]:
                raise ValueError(f"concat inputs differ in dim {i}: {shapes}")
        tot = s[ax] + tot if (_is_int(s[ax]) and _is_int(tot)) else f"{_sym(tot)}+{_sym(s[ax])}"
    out[ax] = tot
    return [out]


def _flatten(shapes, attrs):
    x = shapes[0]
    r = len(x)
    if r == 0:
        return [[1]]
    a, b = _axis(attrs["start"], r, "start"), _axis(attrs["end"], r, "end")
    if b < a:
        raise ValueError(f"flatten end {b} < start {a}")
    return [list(x[:a]) + [dim_prod(x[a:b + 1])] + list(x[b + 1:])]


def reshape_dims(x, target, env=None):
    """Resolve a reshape target (ints, symbols, one -1) against input shape x."""
    env = env or {}
    t = [env.get(d, d) if isinstance(d, str) else d for d in target]
    if sum(1 for d in t if d == -1) > 1:
        raise ValueError(f"reshape target {target} has more than one -1")
    if any(_is_int(d) and d < -1 for d in t):
        raise ValueError(f"reshape target {target} has a negative dim")
    total = dim_prod(x)
    if -1 in t:
        known = dim_prod([d for d in t if d != -1])
        if _is_int(total) and _is_int(known):
            if known == 0 or total % known:
                raise ValueError(f"cannot reshape {list(x)} to {list(target)}")
            t[t.index(-1)] = total // known
        else:
            # cancel identical symbolic factors
            xs = [d for d in x]
            ks = [d for d in t if d != -1]
            for d in list(ks):
                if d in xs:
                    xs.remove(d)
                    ks.remove(d)
            rest_x, rest_k = dim_prod(xs), dim_prod(ks)
            if _is_int(rest_x) and _is_int(rest_k):
                if rest_k == 0 or rest_x % rest_k:
                    raise ValueError(f"cannot reshape {list(x)} to {list(target)}")
                t[t.index(-1)] = rest_x // rest_k
            else:
                t[t.index(-1)] = f"{_sym(rest_x)}/{_sym(rest_k)}" if rest_k != 1 else rest_x
    new_total = dim_prod(t)
    if _is_int(total) and _is_int(new_total) and total != new_total:
        raise ValueError(f"cannot reshape {list(x)} ({total} elements) to {list(target)} ({new_total})")
    return t


def _reshape(shapes, attrs):
    return [reshape_dims(shapes[0], attrs["shape"], attrs.get("_env"))]


def _transpose(shapes, attrs):
    x, p = shapes[0], list(attrs["perm"])
    if sorted(q % max(len(x), 1) for q in p) != list(range(len(x))):
        raise ValueError(f"perm {p} is not a permutation of rank {len(x)}")
    return [[x[q % len(x)] for q in p]]


def _squeeze(shapes, attrs):
    x = list(shapes[0])
    axes = sorted({_axis(a, len(x)) for a in attrs["axes"]})
    for a in axes:
        if _is_int(x[a]) and x[a] != 1:
            raise ValueError(f"cannot squeeze axis {a} of size {x[a]}")
    return [[d for i, d in enumerate(x) if i not in axes]]


def _unsqueeze(shapes, attrs):
    x = list(shapes[0])
    r = len(x) + len(attrs["axes"])
    axes = sorted({_axis(a, r) for a in attrs["axes"]})
    out, it = [], iter(x)
    for i in range(r):
        out.append(1 if i in axes else next(it))
    return [out]


def slice_len(d, start, end, step):
    if step == 0:
        raise ValueError("slice step must not be 0")
    if _is_int(d):
        return len(range(*slice(start, end, step).indices(d)))
    if step == 1 and start >= 0 and end is None:
        return d if start == 0 else f"{_sym(d)}-{start}"
    if step == 1 and start >= 0 and end is not None and end >= 0:
        return f"min({_sym(d)},{end})-{start}" if start else f"min({_sym(d)},{end})"
    return f"slice({_sym(d)},{start},{end},{step})"


def _slice(shapes, attrs):
    x = list(shapes[0])
    a = _axis(attrs["axis"], len(x))
    x[a] = slice_len(x[a], attrs["start"], attrs["end"], attrs["step"])
    return [x]


def expand_dims(x, target, env=None):
    env = env or {}
    t = [env.get(d, d) if isinstance(d, str) else d for d in target]
    if len(t) < len(x):
        raise ValueError(f"expand target {target} has lower rank than input {list(x)}")
    xs = [1] * (len(t) - len(x)) + list(x)
    out = []
    for xd, td in zip(xs, t):
        if td == -1:
            out.append(xd)
        elif _is_int(xd) and xd != 1 and _is_int(td) and xd != td:
            raise ValueError(f"cannot expand {list(x)} to {list(target)}")
        else:
            out.append(td if (xd == 1 or not _is_int(td) or not _is_int(xd)) else xd)
    return out


def _expand(shapes, attrs):
    return [expand_dims(shapes[0], attrs["shape"], attrs.get("_env"))]


def _softmax(shapes, attrs):
    x = shapes[0]
    _axis(attrs["axis"], len(x))
    if len(shapes) > 1 and shapes[1] is not None:
        b = broadcast(x, shapes[1])
        if len(b) != len(x):
            raise ValueError(f"mask {shapes[1]} has higher rank than x {x}")
    return [list(x)]


def _layernorm(shapes, attrs):
    x = shapes[0]
    _axis(attrs["axis"], len(x))
    for s in shapes[1:]:
        if s is not None and (len(s) != 1 or (_is_int(x[-1]) and s[0] != x[-1])):
            raise ValueError(f"layernorm weight/bias must be [{x[-1]}], got {s}")
    return [list(x)]


def _batchnorm(shapes, attrs):
    x = shapes[0]
    if len(x) < 2:
        raise ValueError(f"batchnorm input must be at least 2-D, got {x}")
    for s in shapes[1:]:
        if len(s) != 1 or (_is_int(x[1]) and s[0] != x[1]):
            raise ValueError(f"batchnorm parameters must be [{x[1]}], got {s}")
    return [list(x)]


def _embedding(shapes, attrs):
    ids, table = shapes
    if len(table) != 2:
        raise ValueError(f"embedding table must be 2-D, got {table}")
    return [list(ids) + [table[1]]]


def _matmul(shapes, attrs):
    a, b = list(shapes[0]), list(shapes[1])
    if not a or not b:
        raise ValueError("matmul inputs must be at least 1-D")
    va, vb = len(a) == 1, len(b) == 1
    if va:
        a = [1] + a
    if vb:
        b = b + [1]
    if _is_int(a[-1]) and _is_int(b[-2]) and a[-1] != b[-2]:
        raise ValueError(f"matmul inner dims differ: {shapes[0]} @ {shapes[1]}")
    batch = broadcast(a[:-2], b[:-2]) if (len(a) > 2 or len(b) > 2) else []
    out = batch + ([] if va else [a[-2]]) + ([] if vb else [b[-1]])
    return [out]


def _reduce(shapes, attrs):
    x = list(shapes[0])
    axes = {_axis(a, len(x)) for a in attrs["axes"]}
    if attrs["keepdim"]:
        return [[1 if i in axes else d for i, d in enumerate(x)]]
    return [[d for i, d in enumerate(x) if i not in axes]]


def _masked_mean(shapes, attrs):
    x, m = list(shapes[0]), list(shapes[1])
    ax = _axis(attrs["axis"], len(x))
    if len(m) != ax + 1:
        raise ValueError(f"mask {m} must cover x's dims up to axis {ax} (x {x})")
    for i in range(ax + 1):
        if _is_int(x[i]) and _is_int(m[i]) and x[i] != m[i] and m[i] != 1:
            raise ValueError(f"mask {m} does not match x {x}")
    return [x[:ax] + x[ax + 1:]]


def _where(shapes, attrs):
    return [broadcast(*shapes)]


_RULES = {
    "linear": _linear, "conv2d": _conv2d, "batchnorm": _batchnorm, "maxpool2d": _pool,
    "avgpool2d": _pool, "global_avgpool": _gap, "concat": _concat, "flatten": _flatten,
    "reshape": _reshape, "transpose": _transpose, "squeeze": _squeeze, "unsqueeze": _unsqueeze,
    "slice": _slice, "expand": _expand, "softmax": _softmax, "layernorm": _layernorm,
    "embedding": _embedding, "matmul": _matmul, "reduce_sum": _reduce, "reduce_mean": _reduce,
    "masked_mean": _masked_mean, "where": _where, "clamp": _same, "cast": _same, "l2norm": _same,
}
for _n in _UNARY:
    _RULES[_n] = _same
for _n in ("add", "sub", "mul", "div", "pow"):
    _RULES[_n] = _bcast_rule

for _n, _r in _RULES.items():
    object.__setattr__(OPS[_n], "shape", _r)
assert all(s.shape is not None for s in OPS.values()), [k for k, s in OPS.items() if s.shape is None]


def with_defaults(op: str, attrs: dict) -> dict:
    """``attrs`` with every missing attribute of ``op`` set to its default (REQUIRED ones must be given)."""
    out = dict(attrs)
    for k, (_t, default) in OPS[op].attrs.items():
        if k not in out:
            if default is REQUIRED:
                raise KeyError(k)
            out[k] = list(default) if isinstance(default, list) else default
    return out


def spec(op: str) -> OpSpec:
    """The OpSpec of ``op``; KeyError if unknown (callers turn it into UnsupportedOpError)."""
    return OPS[op]
