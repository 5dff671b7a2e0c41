"""``dense``: a plain array. Used for dense weights and for constants (bias, LayerNorm, embeddings).

Arrays: ``{"values": any shape}`` with dtype float32, float16, int64, int32, int8, uint8, bool,
or bfloat16 stored as uint16 with ``meta {"dtype": "bfloat16"}``. float16/bfloat16 are widened
to float32 at load (``widened()``; the model-file reader does it). A dense conv weight may be
stored 2-D ``[out, in/groups*kh*kw]`` with ``orig_shape`` (``from_dense(w, as_2d=True)``) or
with its 4-D shape as is.
"""
from __future__ import annotations

import numpy as np

from .base import (FORMATS, WeightFormat, check_array, check_meta_keys, check_orig_shape, parse_shape,
                   pick_arrays, register, weight_2d, _fail)

# storage dtypes (name -> numpy dtype of the stored array)
DENSE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int64": np.int64,
                "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
_NP_TO_NAME = {np.dtype(v): k for k, v in DENSE_DTYPES.items() if k != "bfloat16"}


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    x = np.array(x, dtype=np.float32, order="C")
    b = x.view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bfloat16_bits_to_float32(u: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@register
class Dense(WeightFormat):
    """A dense array. ``values``: any shape, a dtype of ``DENSE_DTYPES`` (bfloat16 as uint16)."""

    kind = "dense"

    def __init__(self, values: np.ndarray, *, dtype: str | None = None, name=None, orig_shape=None):
        self.values = values
        self.dtype = dtype if dtype is not None else _NP_TO_NAME.get(np.dtype(values.dtype), str(values.dtype))
        self.shape = tuple(int(d) for d in values.shape)
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    @classmethod
    def from_dense(cls, w, *, dtype: str | None = None, as_2d: bool = False, name=None) -> "Dense":
        """Store ``w`` (copied to a C-contiguous array). ``dtype``: a ``DENSE_DTYPES`` name
        (default: w's own dtype; float64 -> float32, int/bool kept). ``as_2d``: store an
        N-D (conv) weight as ``[out, prod(rest)]`` with ``orig_shape``."""
        w = np.asarray(w)
        orig = None
        if as_2d:
            w, orig = weight_2d(w, name=name)
        if dtype is None:
            if w.dtype.kind == "f":
                dtype = "float16" if w.dtype == np.float16 else "float32"
            elif np.dtype(w.dtype) in _NP_TO_NAME:
                dtype = _NP_TO_NAME[np.dtype(w.dtype)]
            else:
                _fail(name, "values", f"dtype {w.dtype} cannot be stored dense")
        if dtype not in DENSE_DTYPES:
            _fail(name, "meta.dtype", f"must be one of {list(DENSE_DTYPES)}, got {dtype!r}")
        if dtype == "bfloat16":
            v = float32_to_bfloat16_bits(w.astype(np.float32))
        else:
            v = np.array(w, dtype=DENSE_DTYPES[dtype], order="C", copy=True)  # keeps 0-d (ascontiguousarray does not)
        return cls(v, dtype=dtype, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "Dense":
        check_meta_keys(meta, ("dtype",), name=name)
        a = pick_arrays(arrays, ("values",), name=name)
        v = a["values"]
        dtype = meta.get("dtype")
        if dtype is not None and dtype != "bfloat16":
            _fail(name, "meta.dtype", f"only 'bfloat16' may be given, got {dtype!r}")
        if dtype is None and np.dtype(v.dtype) not in _NP_TO_NAME:
            _fail(name, "values", f"dtype {v.dtype} not allowed for dense (allowed: {list(DENSE_DTYPES)})")
        obj = cls(v, dtype=dtype, name=name, orig_shape=orig_shape)
        obj.shape = parse_shape(shape, name=name)
        return obj

    def arrays(self):
        return {"values": self.values}

    def meta(self):
        return {"dtype": "bfloat16"} if self.dtype == "bfloat16" else {}

    def validate(self, full: bool = True) -> None:
        if self.dtype not in DENSE_DTYPES:
            self._fail("meta.dtype", f"must be one of {list(DENSE_DTYPES)}, got {self.dtype!r}")
        check_array(self.name, "values", self.values, DENSE_DTYPES[self.dtype], shape=self.shape)
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape) if self.shape else None

    def to_dense(self) -> np.ndarray:
        """float formats: float32 (a view when already float32); integer/bool: the values as stored."""
        if self.dtype == "bfloat16":
            return bfloat16_bits_to_float32(self.values)
        if self.dtype == "float16":
            return self.values.astype(np.float32)
        return self.values

    def widened(self) -> "Dense":
        """float16/bfloat16 -> a float32 Dense (a copy); any other dtype: self."""
        if self.dtype not in ("float16", "bfloat16"):
            return self
        d = Dense(np.array(self.to_dense(), order="C"), name=self.name, orig_shape=self.orig_shape)
        d.stored_dtype = self.dtype
        return d

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.values))


assert FORMATS["dense"] is Dense
