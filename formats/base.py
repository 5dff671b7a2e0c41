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
        """Stored non-zeros (for dense: count of non-zero entries)."""
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
