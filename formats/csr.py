"""``csr``: compressed sparse rows over output rows, float32 values.

Arrays: ``indptr`` int32 ``[out+1]``; ``indices`` int32 (or uint16 when ``in <= 65536``) ``[nnz]``,
sorted and unique within a row; ``data`` float32 ``[nnz]``. ``nnz < 2**31``.
Row ``i`` holds columns ``indices[indptr[i]:indptr[i+1]]`` with values ``data[...]``.
"""
from __future__ import annotations

import numpy as np

from .base import (WeightFormat, check_array, check_indptr, check_meta_keys, check_orig_shape,
                   check_row_indices, parse_shape, pick_arrays, register, weight_2d, _fail)

INDEX_DTYPES = (np.int32, np.uint16)


def resolve_index_dtype(index_dtype, ncols, *, name=None):
    """"auto" -> uint16 when ncols <= 65536 else int32; "int32"/"uint16" (or numpy dtypes) as given."""
    if isinstance(index_dtype, str) and index_dtype == "auto":
        return np.dtype(np.uint16) if ncols <= 65536 else np.dtype(np.int32)
    try:
        dt = np.dtype(index_dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.int32), np.dtype(np.uint16)):
        _fail(name, "indices", f"index_dtype must be 'auto', 'int32' or 'uint16', got {index_dtype!r}")
    if dt == np.uint16 and ncols > 65536:
        _fail(name, "indices", f"uint16 indices need in <= 65536, got in={ncols}")
    return dt


def csr_structure(w2d: np.ndarray, index_dtype, *, name=None):
    """(indptr int32 [out+1], indices [nnz], mask) of the non-zeros of a 2-D array."""
    out, inn = w2d.shape
    mask = w2d != 0
    counts = mask.sum(axis=1, dtype=np.int64)
    nnz = int(counts.sum())
    if nnz >= 2 ** 31:
        _fail(name, "data", f"nnz {nnz} does not fit int32 indptr")
    indptr = np.zeros(out + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(counts)
    _, cols = np.nonzero(mask)  # row-major order: sorted within rows
    indices = np.ascontiguousarray(cols.astype(resolve_index_dtype(index_dtype, inn, name=name)))
    return indptr, indices, mask


class _CSRBase(WeightFormat):
    """Shared CSR structure (indptr / indices) for ``csr`` and ``csr_i8``."""

    value_field = "data"

    def _init_structure(self, shape, indptr, indices, name, orig_shape):
        self.shape = parse_shape(shape, name=name, ndim=2)
        self.indptr, self.indices = indptr, indices
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    def _validate_structure(self, full):
        out, inn = self.shape
        check_array(self.name, "indptr", self.indptr, np.int32, shape=(out + 1,))
        check_array(self.name, "indices", self.indices, INDEX_DTYPES, ndim=1)
        if self.indices.dtype == np.uint16 and inn > 65536:
            self._fail("indices", f"uint16 indices need in <= 65536, got in={inn}")
        nnz = int(self.indices.shape[0])
        if nnz >= 2 ** 31:
            self._fail("indices", f"nnz {nnz} does not fit int32")
        check_indptr(self.name, "indptr", self.indptr, nnz)
        check_row_indices(self.name, "indices", self.indptr, self.indices, inn, full=full)
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape)
        return nnz

    def _rows(self):
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr.astype(np.int64)))

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])


@register
class CSR(_CSRBase):
    """CSR float32: ``indptr`` int32 [out+1], ``indices`` int32|uint16 [nnz], ``data`` float32 [nnz]."""

    kind = "csr"

    def __init__(self, shape, indptr, indices, data, *, name=None, orig_shape=None):
        self._init_structure(shape, indptr, indices, name, orig_shape)
        self.data = data

    @classmethod
    def from_dense(cls, w, *, index_dtype="int32", name=None) -> "CSR":
        """Exact CSR of the non-zeros of ``w`` ([out, in], or N-D conv weight viewed 2-D).
        ``index_dtype``: "int32" (default), "uint16", or "auto" (uint16 when in <= 65536)."""
        w2, orig = weight_2d(w, name=name)
        w2 = np.asarray(w2, dtype=np.float32)
        indptr, indices, mask = csr_structure(w2, index_dtype, name=name)
        data = np.ascontiguousarray(w2[mask], dtype=np.float32)
        return cls(w2.shape, indptr, indices, data, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "CSR":
        check_meta_keys(meta, (), name=name)
        a = pick_arrays(arrays, ("indptr", "indices", "data"), name=name)
        return cls(shape, a["indptr"], a["indices"], a["data"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"indptr": self.indptr, "indices": self.indices, "data": self.data}

    def validate(self, full: bool = True) -> None:
        nnz = self._validate_structure(full)
        check_array(self.name, "data", self.data, np.float32, shape=(nnz,))

    def to_dense(self) -> np.ndarray:
        d = np.zeros(self.shape, dtype=np.float32)
        d[self._rows(), self.indices.astype(np.int64)] = self.data
        return d
