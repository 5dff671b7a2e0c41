"""A restricted unpickler for PyTorch checkpoints: reads state_dicts, never runs code.

A pickle is a program: its GLOBAL / STACK_GLOBAL / INST opcodes import any callable and
REDUCE calls it. :class:`RestrictedUnpickler` (a ``pickle.Unpickler`` subclass) resolves every
global through :meth:`~RestrictedUnpickler.find_class`, which only knows the few names a
state_dict needs, each mapped to an *inert* stand-in defined here (nothing from torch is ever
imported):

* ``collections.OrderedDict``                      -> :class:`SafeOrderedDict` (ignores BUILD state)
* ``torch._utils._rebuild_tensor{,_v2,_v3}``,
  ``_rebuild_parameter{,_with_state}``,
  ``torch._tensor._rebuild_from_type_v2``          -> functions building a lazy :class:`TensorRef`
* ``torch.<X>Storage`` / ``torch.cuda.<X>Storage``,
  ``torch.storage.{Untyped,Typed}Storage``         -> :class:`StorageType` markers
* ``torch.<dtype>`` (``torch.float32`` ...)         -> :class:`TorchDType` markers
* ``torch.Size`` -> tuple, ``torch.device`` -> str, ``torch.Tensor`` / ``torch.nn.Parameter`` /
  legacy ``torch.FloatTensor``... -> markers that cannot be called
* ``builtins.set/frozenset/complex/bytearray``, ``_codecs.encode`` (latin-1 only),
  numpy scalars (``numpy.core.multiarray.scalar`` + ``numpy.dtype`` of plain numeric types).

Everything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an ``nn.Module`` class,
``functools.partial``, dotted or look-alike names...) raises :class:`CheckpointError`
``refused global 'os.system'``. Before the unpickler runs, :func:`scan_pickle` walks the opcodes
(``pickletools.genops``): it bounds the pickle's size, refuses GLOBAL/INST names that are not
allowed and the EXT1/2/4 opcodes (the copyreg extension cache would bypass ``find_class``).

Tensors are not materialised while unpickling: rebuild functions return :class:`TensorRef`
(storage, element offset, shape, strides, dtype). The container reader (``torchzip``,
``legacy``) then turns them into numpy arrays with :meth:`TensorRef.to_numpy` through a
:class:`StorageTable`, which bounds-checks every view against its storage and widens
float16 / bfloat16 / float8 storages to float32 once per storage (so tied weights keep
sharing memory).
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections import OrderedDict
from typing import Callable

import numpy as np

from ..errors import CheckpointError

__all__ = [
    "RestrictedUnpickler", "restricted_loads", "scan_pickle", "TensorRef", "StorageRef",
    "StorageType", "TorchDType", "StorageTable", "SafeOrderedDict", "TORCH_DTYPES", "widen",
    "FP8_TABLES", "MAX_PICKLE_BYTES", "MAX_NDIM", "one_line",
]

MAX_PICKLE_BYTES = 256 << 20  # a state_dict pickle is ~100 bytes per tensor
MAX_NDIM = 32


def one_line(s, limit: int = 200) -> str:
    """ascii()-quoted, newline-free, length-limited rendering of untrusted text for messages
    (look-alike characters show as escapes: 'os' vs '\\u043es')."""
    r = ascii(s)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
def _fp8_table(exp_bits: int, man_bits: int, bias: int, *, fn: bool, fnuz: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit float (exactly, via ldexp)."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    e = (codes >> man_bits) & ((1 << exp_bits) - 1)
    m = codes & ((1 << man_bits) - 1)
    normal = np.ldexp(1.0 + m / (1 << man_bits), (e - bias).astype(np.int64))
    sub = np.ldexp(m / (1 << man_bits), np.full(256, 1 - bias, dtype=np.int64))
    val = sign * np.where(e == 0, sub, normal)
    emax = (1 << exp_bits) - 1
    if fnuz:  # no inf, no -0: code 0x80 is the only NaN
        val[0x80] = np.nan
    elif fn:  # e4m3fn: no inf, S.1111.111 is NaN
        nan = (e == emax) & (m == (1 << man_bits) - 1)
        val[nan] = np.copysign(np.nan, sign[nan])
    else:  # IEEE-like (e5m2): all-ones exponent is inf / NaN
        val[(e == emax) & (m == 0)] = sign[(e == emax) & (m == 0)] * np.inf
        nan = (e == emax) & (m != 0)
        val[nan] = np.copysign(np.nan, sign[nan])
    return val.astype(np.float32)


def _e8m0_table() -> np.ndarray:
    val = np.full(256, np.nan, dtype=np.float32)
    val[:255] = np.ldexp(np.ones(255), np.arange(255) - 127).astype(np.float32)  # 2**-127 .. 2**127
    return val


FP8_TABLES: dict[str, np.ndarray] = {
    "float8_e4m3fn": _fp8_table(4, 3, 7, fn=True, fnuz=False),
    "float8_e5m2": _fp8_table(5, 2, 15, fn=False, fnuz=False),
    "float8_e4m3fnuz": _fp8_table(4, 3, 8, fn=True, fnuz=True),
    "float8_e5m2fnuz": _fp8_table(5, 2, 16, fn=True, fnuz=True),
    "float8_e8m0fnu": _e8m0_table(),
}


class TorchDType:
    """Inert stand-in for a torch dtype: ``name`` (torch's), ``storage`` numpy dtype of the raw
    bytes (little-endian), ``widen`` ("", "f16", "bf16" or an FP8_TABLES key) and ``supported``."""

    __slots__ = ("name", "storage", "widen", "supported")

    def __init__(self, name: str, storage: str | None, widen: str = "", supported: bool = True):
        self.name, self.widen, self.supported = name, widen, supported
        self.storage = np.dtype(storage) if storage else np.dtype("u1")

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def out(self) -> np.dtype:
        """dtype of the arrays handed out (float32 for widened types)."""
        return np.dtype(np.float32) if self.widen else self.storage.newbyteorder("=")

    def __setstate__(self, state):
        raise CheckpointError("BUILD on a dtype")

    def __repr__(self):
        return f"torch.{self.name}"


_DT = [
    # name, storage dtype (little-endian), widen, supported
    ("float32", "<f4", ""), ("float64", "<f8", ""), ("float16", "<f2", "f16"),
    ("bfloat16", "<u2", "bf16"), ("int8", "i1", ""), ("int16", "<i2", ""), ("int32", "<i4", ""),
    ("int64", "<i8", ""), ("uint8", "u1", ""), ("uint16", "<u2", ""), ("uint32", "<u4", ""),
    ("uint64", "<u8", ""), ("bool", "?", ""), ("complex64", "<c8", ""), ("complex128", "<c16", ""),
    ("float8_e4m3fn", "u1", "float8_e4m3fn"), ("float8_e5m2", "u1", "float8_e5m2"),
    ("float8_e4m3fnuz", "u1", "float8_e4m3fnuz"), ("float8_e5m2fnuz", "u1", "float8_e5m2fnuz"),
    ("float8_e8m0fnu", "u1", "float8_e8m0fnu"),
]
TORCH_DTYPES: dict[str, TorchDType] = {n: TorchDType(n, s, w) for n, s, w in _DT}
# known to torch, refused when a tensor actually uses them (quantized, packed, complex32...)
for _n, _s in [("qint8", "i1"), ("quint8", "u1"), ("qint32", "<i4"), ("quint4x2", "u1"),
               ("quint2x4", "u1"), ("complex32", "<u4"), ("bits8", "u1"), ("bits16", "<u2"),
               ("bits1x8", "u1"), ("bits2x4", "u1"), ("bits4x2", "u1"), ("float4_e2m1fn_x2", "u1")]:
    TORCH_DTYPES[_n] = TorchDType(_n, _s, "", supported=False)
# torch also exposes the aliases as attributes: torch.float == torch.float32, ...
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "short": "int16",
                  "int": "int32", "long": "int64", "cfloat": "complex64", "cdouble": "complex128"}
for _a, _n in _DTYPE_ALIASES.items():
    TORCH_DTYPES.setdefault(_a, TORCH_DTYPES[_n])
_UINT8 = TORCH_DTYPES["uint8"]


def widen(raw: np.ndarray, dt: TorchDType) -> np.ndarray:
    """Raw storage elements (``dt.storage`` dtype, native or little-endian) -> handed-out array."""
    if dt.widen == "f16":
        return raw.astype(np.float32)
    if dt.widen == "bf16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dt.widen:
        return FP8_TABLES[dt.widen][raw.view(np.uint8)]
    if dt.name == "bool" and raw.size and raw.view(np.uint8).max() > 1:
        return raw.view(np.uint8) != 0  # bytes other than 0/1 would make an odd numpy bool
    return raw


# --------------------------------------------------------------------------------------------
# inert stand-ins
# --------------------------------------------------------------------------------------------
class StorageType:
    """Marker for ``torch.FloatStorage`` & co (``dtype``) and ``torch.UntypedStorage`` (uint8)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: TorchDType):
        self.name, self.dtype = name, dtype

    def __call__(self, *a, **k):
        raise CheckpointError(f"refused call of storage type {self.name}")

    def __setstate__(self, state):
        raise CheckpointError("BUILD on a storage type")

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES: dict[str, StorageType] = {}
for _n, _st in [("DoubleStorage", "float64"), ("FloatStorage", "float32"), ("HalfStorage", "float16"),
                ("LongStorage", "int64"), ("IntStorage", "int32"), ("ShortStorage", "int16"),
                ("CharStorage", "int8"), ("ByteStorage", "uint8"), ("BoolStorage", "bool"),
                ("BFloat16Storage", "bfloat16"), ("ComplexDoubleStorage", "complex128"),
                ("ComplexFloatStorage", "complex64"), ("QInt8Storage", "qint8"),
                ("QInt32Storage", "qint32"), ("QUInt8Storage", "quint8"),
                ("QUInt4x2Storage", "quint4x2"), ("QUInt2x4Storage", "quint2x4"),
                ("UntypedStorage", "uint8"), ("TypedStorage", "uint8")]:
    _STORAGE_TYPES[_n] = StorageType(_n, TORCH_DTYPES[_st])


class StorageRef:
    """A storage as the pickle refers to it: record ``key``, element ``dtype`` and ``nbytes``,
    starting ``byte_offset`` bytes into the key's data (legacy view storages only)."""

    __slots__ = ("key", "dtype", "nbytes", "byte_offset")

    def __init__(self, key: str, dtype: TorchDType, nbytes: int, byte_offset: int = 0):
        self.key, self.dtype, self.nbytes, self.byte_offset = key, dtype, nbytes, byte_offset

    def __setstate__(self, state):
        raise CheckpointError("BUILD on a storage")

    def __repr__(self):
        return f"StorageRef({self.key!r}, {self.dtype!r}, nbytes={self.nbytes}, byte_offset={self.byte_offset})"


class TensorRef:
    """A tensor not yet read: ``storage`` (StorageRef), ``offset`` (elements), ``shape``,
    ``stride`` (elements) and ``dtype`` (TorchDType)."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: StorageRef, offset: int, shape, stride, dtype: TorchDType):
        self.storage, self.offset, self.shape, self.stride, self.dtype = storage, offset, shape, stride, dtype

    def __setstate__(self, state):
        raise CheckpointError("BUILD on a tensor (tensor subclass state) is not supported")

    def __repr__(self):
        return f"TensorRef({self.dtype!r}, shape={self.shape}, stride={self.stride}, offset={self.offset})"

    def to_numpy(self, table: "StorageTable", *, name=None, size_cap: int | None = None) -> np.ndarray:
        """The tensor as a numpy array (a view on the table's storage array; read-only when the
        storage is memory-mapped). Raises CheckpointError for views outside their storage."""
        dt, st = self.dtype, self.storage
        src = table.source
        if not dt.supported:
            raise CheckpointError(f"dtype torch.{dt.name} is not supported (quantized / packed)",
                                  file=src, tensor=name)
        isz = dt.itemsize
        n_elem = st.nbytes // isz
        numel = 1
        for s in self.shape:
            numel *= s
        if size_cap is not None and numel > n_elem and numel * dt.out.itemsize > size_cap:
            # a view larger than its storage (stride 0): bounded so that a copy cannot explode
            raise CheckpointError(f"tensor of {numel} elements over a storage of {n_elem} exceeds the size cap "
                                  f"of {size_cap} bytes", file=src, tensor=name)
        if numel == 0:
            return np.zeros(self.shape, dtype=dt.out)
        last = self.offset + sum((s - 1) * t for s, t in zip(self.shape, self.stride))
        if last >= n_elem:
            raise CheckpointError(
                f"view past the end of its storage (needs element {last}, storage {st.key!r} has {n_elem} "
                f"elements of torch.{dt.name})", file=src, tensor=name)
        base = table.typed(st, dt)  # 1-D, handed-out dtype, n_elem long
        osz = base.itemsize
        contiguous = True
        expect = 1
        for s, t in zip(reversed(self.shape), reversed(self.stride)):
            if s != 1 and t != expect:
                contiguous = False
                break
            expect *= s
        if contiguous:
            return base[self.offset: self.offset + numel].reshape(self.shape)
        return np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=tuple(t * osz for t in self.stride), writeable=False)


class StorageTable:
    """Raw storage bytes by key, loaded lazily through ``loader(key) -> 1-D uint8 array``, and
    the typed (widened) array of each (key, byte_offset, dtype), computed once.

    ``swap``: the file is big-endian (its ``byteorder`` record), element bytes are swapped."""

    def __init__(self, loader: Callable[[str], np.ndarray], *, source=None, swap: bool = False):
        self.loader, self.source, self.swap = loader, source, swap
        self._raw: dict[str, np.ndarray] = {}
        self._typed: dict[tuple, np.ndarray] = {}

    def raw(self, key: str) -> np.ndarray:
        if key not in self._raw:
            self._raw[key] = self.loader(key)
        return self._raw[key]

    def typed(self, st: StorageRef, dt: TorchDType) -> np.ndarray:
        k = (st.key, st.byte_offset, st.nbytes, dt.name)
        if k in self._typed:
            return self._typed[k]
        raw = self.raw(st.key)
        if st.byte_offset + st.nbytes > raw.size:
            raise CheckpointError(f"storage {st.key!r} declares {st.byte_offset + st.nbytes} bytes, "
                                  f"its data has {raw.size}", file=self.source)
        n = st.nbytes // dt.itemsize
        chunk = raw[st.byte_offset: st.byte_offset + n * dt.itemsize]
        sdt = dt.storage.newbyteorder(">") if self.swap else dt.storage
        arr = chunk.view(sdt)
        if self.swap and sdt.itemsize > 1:
            arr = arr.astype(sdt.newbyteorder("="))
        arr = widen(arr, dt)
        self._typed[k] = arr
        return arr


class SafeOrderedDict(OrderedDict):
    """OrderedDict whose BUILD state (``_metadata`` of a state_dict) is dropped, not set."""

    def __setstate__(self, state):
        return None

    def __reduce__(self):  # pragma: no cover - never pickled by us
        return (OrderedDict, (list(self.items()),))


class _Marker:
    """A class torch pickles by name (``torch.Tensor``, ``torch.nn.Parameter``,
    ``torch.FloatTensor``): only usable as a type tag, never callable."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, *a, **k):
        raise CheckpointError(f"refused call of {self.qualname}")

    def __setstate__(self, state):
        raise CheckpointError(f"BUILD on {self.qualname}")

    def __repr__(self):
        return self.qualname


def _int(x, what):
    if type(x) is bool or not isinstance(x, int):
        raise CheckpointError(f"{what} is {type(x).__name__}, expected int")
    return x


def _int_tuple(x, what):
    if not isinstance(x, (tuple, list)):
        raise CheckpointError(f"{what} is {type(x).__name__}, expected a tuple of ints")
    if len(x) > MAX_NDIM:
        raise CheckpointError(f"{what} has {len(x)} dims (max {MAX_NDIM})")
    return tuple(_int(v, what) for v in x)


def _make_tensor(storage, storage_offset, size, stride, dtype=None):
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage")
    off = _int(storage_offset, "storage offset")
    shape = _int_tuple(size, "tensor size")
    strides = _int_tuple(stride, "tensor stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} differ in length")
    if off < 0 or any(s < 0 for s in shape) or any(t < 0 for t in strides):
        raise CheckpointError(f"negative storage offset, size or stride (offset {off}, size {shape}, "
                              f"stride {strides})")
    if dtype is None:
        dtype = storage.dtype
    elif not isinstance(dtype, TorchDType):
        raise CheckpointError(f"tensor dtype is a {type(dtype).__name__}, expected a torch dtype")
    if storage.nbytes % dtype.itemsize:
        raise CheckpointError(f"storage of {storage.nbytes} bytes is not a whole number of torch.{dtype.name}")
    return TensorRef(storage, off, shape, strides, dtype)


def _check_meta(metadata):
    if metadata:
        if not isinstance(metadata, dict):
            raise CheckpointError("tensor metadata is not a dict")
        if any(metadata.values()):
            raise CheckpointError(f"tensor with metadata {sorted(map(str, metadata))} (conj/neg bits) "
                                  "is not supported")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    _check_meta(metadata)
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    _check_meta(metadata)
    return _make_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
               _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS:
        raise CheckpointError(f"_rebuild_from_type_v2 with function {one_line(func)}")
    if not isinstance(new_type, _Marker):
        raise CheckpointError(f"_rebuild_from_type_v2 to type {one_line(new_type)}")
    if not isinstance(args, tuple):
        raise CheckpointError("_rebuild_from_type_v2 arguments are not a tuple")
    return func(*args)


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind="cpu", index=None):
    if not isinstance(kind, str) or (index is not None and not isinstance(index, int)):
        raise CheckpointError("torch.device with non-string type")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol 2 pickles bytes as _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointError("_codecs.encode allowed only as str.encode('latin1')")
    return obj.encode("latin1")


def _bytearray(obj=b""):
    if not isinstance(obj, (bytes, bytearray)):
        raise CheckpointError("bytearray allowed only from bytes")
    return bytearray(obj)


def _set(items=()):
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise CheckpointError("set allowed only from a list")
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


def _complex(re_=0.0, im=0.0):
    if not all(isinstance(v, (int, float)) for v in (re_, im)):
        raise CheckpointError("complex allowed only from numbers")
    return complex(re_, im)


_NP_SIMPLE = {"b1", "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class _NpDType:
    """Inert ``numpy.dtype('f8', False, True)`` for pickled numpy scalars (plain numbers only)."""

    __slots__ = ("spec", "order")

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or spec not in _NP_SIMPLE:
            raise CheckpointError(f"numpy dtype {one_line(spec)} refused (plain numeric dtypes only)")
        self.spec, self.order = spec, "<"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise CheckpointError("bad numpy dtype state")
        self.order = "<" if state[1] in ("|", "=") else state[1]


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _NpDType) or not isinstance(data, bytes):
        raise CheckpointError("numpy scalar from a non-numeric dtype")
    dt = np.dtype(dtype.order + dtype.spec if dtype.spec not in ("b1", "?", "i1", "u1") else dtype.spec)
    if len(data) != dt.itemsize:
        raise CheckpointError("numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dt)[0]


def _build_allowed() -> dict[tuple[str, str], object]:
    a: dict[tuple[str, str], object] = {("collections", "OrderedDict"): SafeOrderedDict}
    for f in _REBUILDERS:
        a[("torch._utils", f.__name__)] = f
    a[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    for n, st in _STORAGE_TYPES.items():
        a[("torch", n)] = st
        a[("torch.cuda", n)] = st
    a[("torch.storage", "UntypedStorage")] = _STORAGE_TYPES["UntypedStorage"]
    a[("torch.storage", "TypedStorage")] = _STORAGE_TYPES["TypedStorage"]
    for n, dt in TORCH_DTYPES.items():
        a[("torch", n)] = dt
    a[("torch", "Size")] = _torch_size
    a[("torch", "device")] = _torch_device
    for q in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter",
              "torch.nn.parameter.Buffer"):
        m, _, n = q.rpartition(".")
        a[(m, n)] = _Marker(q)
    for t in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"):
        for m in ("torch", "torch.cuda"):
            a[(m, t + "Tensor")] = _Marker(f"{m}.{t}Tensor")
    for m in ("builtins", "__builtin__"):
        a[(m, "set")] = _set
        a[(m, "frozenset")] = _frozenset
        a[(m, "bytearray")] = _bytearray
        a[(m, "complex")] = _complex
    a[("_codecs", "encode")] = _codecs_encode
    for m in ("numpy.core.multiarray", "numpy._core.multiarray"):
        a[(m, "scalar")] = _np_scalar
    a[("numpy", "dtype")] = _NpDType
    return a


ALLOWED_GLOBALS = _build_allowed()


def _refuse(module, name, source):
    g = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else f"{module!r}.{name!r}"
    return CheckpointError(f"refused global {one_line(g)} (only tensors, dtypes, storages and plain "
                           "containers may appear in a checkpoint; nothing was executed; if you trust the file, "
                           "re-save just its state_dict with torch.save)", file=source)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns the inert stand-ins of
    ``ALLOWED_GLOBALS`` and whose ``persistent_load`` calls ``resolve(pid)`` (a storage lookup
    given by the container reader). ``source`` names the file in error messages."""

    def __init__(self, file, *, resolve: Callable | None = None, source=None):
        super().__init__(file, encoding="ASCII", errors="strict")
        self._resolve, self._source = resolve, source

    def find_class(self, module, name):
        obj = ALLOWED_GLOBALS.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
        if obj is None:
            raise _refuse(module, name, self._source)
        return obj

    def persistent_load(self, pid):
        if self._resolve is None:
            raise CheckpointError(f"unexpected persistent id {one_line(pid)}", file=self._source)
        return self._resolve(pid)


_EXT = {"EXT1", "EXT2", "EXT4"}
_GLOBAL_OPS = {"GLOBAL", "INST"}


class _Window(io.RawIOBase):
    """Read-only file over ``buf[start:start+limit]`` (genops reads with read/readline)."""

    def __init__(self, buf, start: int, limit: int):
        self.buf, self.pos, self.end = buf, start, min(len(buf), start + limit)
        self.start = start

    def readable(self):
        return True

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.end - self.pos
        n = max(0, min(n, self.end - self.pos))
        out = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return out

    def readline(self, limit=-1):
        stop = self.end if limit is None or limit < 0 else min(self.end, self.pos + limit)
        i = self.buf.find(b"\n", self.pos, stop)  # bytes, bytearray and mmap all have find()
        n = (i + 1 - self.pos) if i >= 0 else stop - self.pos
        out = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return out

    def tell(self):
        return self.pos - self.start


def scan_pickle(buf, start: int = 0, *, limit: int = MAX_PICKLE_BYTES, end: int | None = None,
                source=None) -> int:
    """Walk the opcodes of the pickle at ``buf[start:end]`` without executing it; returns its
    end offset (one past STOP). Refuses EXT opcodes, GLOBAL/INST of names not allowed, pickles
    longer than ``limit`` bytes and malformed / truncated ones (CheckpointError)."""
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
    hard_end = len(buf) if end is None else min(end, len(buf))
    window = min(limit, hard_end - start)
    if isinstance(buf, (bytes, bytearray)) and start == 0 and hard_end == len(buf) and len(buf) <= limit:
        w = io.BytesIO(buf)  # C-speed reads; the whole pickle is already in memory
    else:
        w = _Window(buf, start, window)
    try:
        for op, arg, pos in pickletools.genops(w):
            if op.name in _EXT:
                raise CheckpointError(f"refused pickle opcode {op.name} (extension registry) at byte {pos}",
                                      file=source)
            if op.name in _GLOBAL_OPS:
                mod, _, name = str(arg).partition(" ")
                if (mod, name) not in ALLOWED_GLOBALS:
                    raise _refuse(mod, name, source)
            if op.name == "STOP":
                return start + pos + 1
    except CheckpointError:
        raise
    except Exception as e:  # ValueError from genops on malformed data, UnicodeDecodeError...
        if w.tell() >= window and start + window < hard_end:
            raise CheckpointError(f"pickle larger than the cap of {limit} bytes", file=source) from None
        raise CheckpointError(f"malformed or truncated pickle: {one_line(str(e))}", file=source) from None
    if start + window < hard_end:
        raise CheckpointError(f"pickle larger than the cap of {limit} bytes", file=source)
    raise CheckpointError("pickle has no STOP opcode (truncated)", file=source)


def restricted_loads(data, *, resolve: Callable | None = None, source=None,
                     limit: int = MAX_PICKLE_BYTES):
    """Unpickle ``data`` (bytes-like holding exactly one pickle, checked by :func:`scan_pickle`)
    with :class:`RestrictedUnpickler`. Every failure is a CheckpointError."""
    if len(data) > limit:
        raise CheckpointError(f"pickle of {len(data)} bytes exceeds the cap of {limit} bytes", file=source)
    end = scan_pickle(data, 0, limit=limit, source=source)
    if end != len(data):
        raise CheckpointError(f"{len(data) - end} trailing bytes after the pickle", file=source)
    try:
        return RestrictedUnpickler(io.BytesIO(bytes(data)), resolve=resolve, source=source).load()
    except CheckpointError as e:
        if e.file is None and source is not None:
            raise CheckpointError(e.detail, file=source, tensor=e.tensor, field=e.field) from None
        raise
    except RecursionError:
        raise CheckpointError("pickle nested too deeply", file=source) from None
    except MemoryError:
        raise CheckpointError("pickle needs too much memory", file=source) from None
    except Exception as e:  # UnpicklingError, TypeError from a malformed REDUCE, ...
        raise CheckpointError(f"malformed pickle: {type(e).__name__}: {one_line(str(e))}", file=source) from None


_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def check_key(key, source=None) -> str:
    """A storage key as pickled (str, or ASCII bytes from Python 2): a short safe name."""
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not _KEY_RE.match(key) or key in (".", ".."):
        raise CheckpointError(f"bad storage key {one_line(key)}", file=source)
    return key


def storage_type_dtype(st, source=None) -> TorchDType:
    if not isinstance(st, StorageType):
        raise CheckpointError(f"storage type is {one_line(st)}, expected a torch storage class", file=source)
    return st.dtype
