"""The weight-format contract every module in ``formats/`` follows.

Layout contract (project-wide, see README "Contracts"):

* A weight is 2-D ``[out, in]``. A conv weight ``[out, in/groups, kh, kw]`` is viewed as
  ``[out, in/groups*kh*kw]`` in that (torch) order; the original 4-D shape is kept in
  ``WeightFormat.orig_shape``.
* BSR blocks are ``r x c``: r along output rows, c along input columns (as scipy).
  Shapes not divisible by the block are padded (invisibly) with zeros up to whole blocks;
  ``shape`` stays the logical shape.
* N:M groups run along the input dimension: in every run of M consecutive input
  columns of a row at most N entries are non-zero.
* Quantized values: ``real = scale * (q - zero_point)``; per-output-channel scales have
  shape ``[out]``, per-tensor scales shape ``[1]``.

A format object owns a set of numpy arrays (``arrays()``), a small JSON-able dict of
attributes (``meta()``) and a logical shape. ``from_arrays`` rebuilds it from exactly those
(this is how the model-file reader builds formats over memory-mapped arrays without
copying), and ``validate(full=True)`` checks every invariant a kernel relies on, raising
``FormatError``; ``full=False`` skips O(nnz) scans and checks only shapes/dtypes/sizes.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import FormatError


class WeightFormat:
    """Abstract base. Subclasses set ``kind`` and implement the methods below."""

    kind: ClassVar[str] = ""  # registry key stored in the model file, e.g. "csr", "bsr", "nm"

    shape: tuple[int, ...]  # logical shape; 2-D [out, in] for compressed formats
    orig_shape: tuple[int, ...] | None = None  # e.g. the 4-D conv weight shape, or None
    name: str | None = None  # tensor name, for error messages

    # --- construction -------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: np.ndarray, **options) -> "WeightFormat":
        """Compress a dense array. Sparse formats keep exactly its non-zeros."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, shape, meta: dict, arrays: dict, *, name=None, orig_shape=None) -> "WeightFormat":
        """Rebuild from ``meta()`` and ``arrays()`` without copying (no validation here)."""
        raise NotImplementedError

    # --- content ------------------------------------------------------------------
    def to_dense(self) -> np.ndarray:
        """The float32 dense matrix (dequantized for int8 formats), logical shape."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays this format owns, by name (what the model file stores)."""
        raise NotImplementedError

    def meta(self) -> dict:
        """Small JSON-serialisable attributes (block shape, n:m, quant mode, ...)."""
        return {}

    def validate(self, full: bool = True) -> None:
        """Raise ``FormatError`` (naming tensor and field) unless every invariant holds."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of all owned arrays."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def nnz(self) -> int:
        """Stored non-zeros: csr/csr_i8 stored entries; bsr/bsr_i8 stored block entries inside the
        logical shape (padding excluded); dense/dense_i8/nm non-zero values; lowrank out*k + k*in."""
        raise NotImplementedError

    @property
    def density(self) -> float:
        n = int(np.prod(self.shape)) if len(self.shape) else 1
        return self.nnz / n if n else 0.0

    # --- helpers for subclasses -----------------------------------------------------
    def _fail(self, field: str, msg: str):
        raise FormatError(msg, tensor=self.name, field=field)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or ''} shape={self.shape} {self.meta()} nbytes={self.nbytes}>"


FORMATS: dict[str, type[WeightFormat]] = {}


def register(cls: type[WeightFormat]) -> type[WeightFormat]:
    """Class decorator: add a format to the registry under ``cls.kind``."""
    assert cls.kind and cls.kind not in FORMATS, cls.kind
    FORMATS[cls.kind] = cls
    return cls


# --- shared helpers (used by every format module) --------------------------------------------------
def _fail(name, field, msg):
    raise FormatError(msg, tensor=name, field=field)


MAX_WEIGHT_DIM = 2 ** 31 - 1  # out / in of a 2-D weight format (kernels index with int32)


def parse_shape(shape, *, name=None, field="shape", ndim=None) -> tuple:
    """A shape as a tuple of Python ints >= 0 (bools, floats, negatives rejected)."""
    if not isinstance(shape, (list, tuple)):
        _fail(name, field, f"must be a list of ints, got {type(shape).__name__}")
    out = []
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or int(d) < 0:
            _fail(name, field, f"dims must be ints >= 0, got {list(shape)!r}")
        if int(d) >= 2 ** 62:
            _fail(name, field, f"dim {int(d)} too large")
        out.append(int(d))
    if ndim is not None and len(out) != ndim:
        _fail(name, field, f"must have {ndim} dims, got {len(out)}")
    if ndim == 2 and max(out, default=0) > MAX_WEIGHT_DIM:
        _fail(name, field, f"a weight dim must be <= {MAX_WEIGHT_DIM} (int32 indices), got {list(out)}")
    return tuple(out)


def weight_2d(w, *, name=None):
    """View a weight as 2-D ``[out, in]``: 2-D as is, N-D (conv) as ``[out, prod(rest)]``.

    Returns ``(w2d, orig_shape)`` where orig_shape is None for 2-D input."""
    w = np.asarray(w)
    if w.ndim == 2:
        return w, None
    if w.ndim < 2:
        _fail(name, "shape", f"a weight must be 2-D [out, in] (or a conv weight), got shape {w.shape}")
    return w.reshape(w.shape[0], -1), tuple(int(d) for d in w.shape)


def meta_int(meta, key, *, name=None, lo=None, hi=None, default=None):
    """``meta[key]`` as an int within [lo, hi] (FormatError otherwise)."""
    if not isinstance(meta, dict):
        _fail(name, "meta", f"must be an object, got {type(meta).__name__}")
    v = meta.get(key, default)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        _fail(name, f"meta.{key}", f"must be an int, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(name, f"meta.{key}", f"must be in [{lo}, {hi}], got {v}")
    return v


def meta_str(meta, key, choices, *, name=None, default=None):
    if not isinstance(meta, dict):
        _fail(name, "meta", f"must be an object, got {type(meta).__name__}")
    v = meta.get(key, default)
    if v not in choices or not isinstance(v, str):
        _fail(name, f"meta.{key}", f"must be one of {list(choices)}, got {v!r}")
    return v


def check_meta_keys(meta, allowed, *, name=None):
    if not isinstance(meta, dict):
        _fail(name, "meta", f"must be an object, got {type(meta).__name__}")
    extra = sorted(set(meta) - set(allowed))
    if extra:
        _fail(name, "meta", f"unknown keys {extra} (allowed: {sorted(allowed)})")


def parse_block(meta, *, name=None):
    """meta['block'] as (r, c), both in [1, 1024]."""
    b = meta.get("block") if isinstance(meta, dict) else None
    if not isinstance(b, (list, tuple)) or len(b) != 2:
        _fail(name, "meta.block", f"must be [r, c], got {b!r}")
    r, c = b
    for v in (r, c):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= 1024:
            _fail(name, "meta.block", f"must be two ints in [1, 1024], got {list(b)!r}")
    return int(r), int(c)


def pick_arrays(arrays, required, optional=(), *, name=None) -> dict:
    """Check that ``arrays`` holds exactly ``required`` (+ any of ``optional``) numpy arrays."""
    if not isinstance(arrays, dict):
        _fail(name, "arrays", "must be a dict of arrays")
    missing = [k for k in required if k not in arrays]
    if missing:
        _fail(name, missing[0], "array missing")
    extra = sorted(set(arrays) - set(required) - set(optional))
    if extra:
        _fail(name, extra[0], f"unexpected array (allowed: {sorted(set(required) | set(optional))})")
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):
            _fail(name, k, f"must be a numpy array, got {type(a).__name__}")
    return dict(arrays)


def check_array(name, field, a, dtypes, shape=None, ndim=None):
    """Exact dtype (one of ``dtypes``), exact shape, C-contiguous, aligned, numpy array."""
    if not isinstance(a, np.ndarray):
        _fail(name, field, f"must be a numpy array, got {type(a).__name__}")
    if isinstance(dtypes, (str, np.dtype, type)):
        dtypes = (dtypes,)
    dts = [np.dtype(d) for d in dtypes]
    if a.dtype not in dts or a.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        _fail(name, field, f"dtype must be {' or '.join(str(d) for d in dts)}, got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        _fail(name, field, f"shape must be {tuple(shape)}, got {tuple(a.shape)}")
    if ndim is not None and a.ndim != ndim:
        _fail(name, field, f"must be {ndim}-D, got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        _fail(name, field, "must be C-contiguous")
    if not a.flags.aligned:
        _fail(name, field, "must be aligned")


def check_indptr(name, field, indptr, nnz):
    """indptr[0] == 0, non-decreasing, indptr[-1] == nnz (dtype/shape checked by the caller)."""
    if indptr.shape[0] == 0:
        _fail(name, field, "must have at least one entry")
    if int(indptr[0]) != 0:
        _fail(name, field, f"must start at 0, got {int(indptr[0])}")
    if int(indptr[-1]) != nnz:
        _fail(name, field, f"must end at nnz={nnz}, got {int(indptr[-1])}")
    if indptr.shape[0] > 1 and not bool(np.all(indptr[1:] >= indptr[:-1])):
        k = int(np.argmax(indptr[1:] < indptr[:-1]))
        _fail(name, field, f"must be non-decreasing (entry {k + 1}: {int(indptr[k + 1])} < {int(indptr[k])})")


def check_row_indices(name, field, indptr, indices, ncols, *, full=True):
    """Every index in [0, ncols), sorted and unique within each row (indptr already valid)."""
    n = indices.shape[0]
    if n == 0 or not full:
        return
    if indices.dtype.kind == "i" and int(indices.min()) < 0:
        _fail(name, field, f"negative index {int(indices.min())}")
    mx = int(indices.max())
    if mx >= ncols:
        _fail(name, field, f"index {mx} out of range (must be < {ncols})")
    if n > 1:
        ok = indices[1:] > indices[:-1]  # same dtype: no widened copy
        starts = indptr[1:-1]
        starts = starts[(starts > 0) & (starts < n)]
        ok[starts - 1] = True  # a new row may restart anywhere (indptr dtype: no widened copy)
        if not bool(ok.all()):
            k = int(np.argmin(ok)) + 1
            row = int(np.searchsorted(np.asarray(indptr, dtype=np.int64), k, side="right")) - 1
            _fail(name, field, f"indices must be sorted and unique within a row (row {row}, position {k})")


def check_scales(name, field, s):
    """Every scale finite and > 0."""
    if s.size and not bool(np.all(np.isfinite(s) & (s > 0))):
        bad = s[~(np.isfinite(s) & (s > 0))][0]
        _fail(name, field, f"scales must be finite and > 0, got {float(bad)!r}")


def check_orig_shape(name, shape, orig_shape):
    """orig_shape (if any) has shape[0] leading and the same element count as shape."""
    if orig_shape is None:
        return None
    o = parse_shape(orig_shape, name=name, field="orig_shape")
    if len(o) < 2 or o[0] != shape[0] or int(np.prod(o, dtype=object)) != int(np.prod(shape, dtype=object)):
        _fail(name, "orig_shape", f"{list(o)} does not match stored shape {list(shape)}")
    return o


def symmetric_scales(absmax: np.ndarray) -> np.ndarray:
    """float32 scales absmax/127, with 1.0 where absmax is 0 (scales must be > 0)."""
    s = (np.asarray(absmax, dtype=np.float64) / 127.0).astype(np.float32)
    s[~(s > 0) | ~np.isfinite(s)] = 1.0
    return s


def quantize_sym(x: np.ndarray, scale) -> np.ndarray:
    """int8 clip(round(x / scale), -127, 127)."""
    q = np.rint(np.asarray(x, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    return np.clip(q, -127, 127).astype(np.int8)
