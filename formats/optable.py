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


def spec(op: str) -> OpSpec:
    """The OpSpec of ``op``; KeyError if unknown (callers turn it into UnsupportedOpError)."""
    return OPS[op]
