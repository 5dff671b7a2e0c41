"""``bsr``: block-sparse rows with ``r x c`` blocks (r along output rows, c along input columns).

meta ``{"block": [r, c]}``. With ``R = ceil(out/r)``, ``C = ceil(in/c)``: ``indptr`` int32 ``[R+1]``,
``indices`` int32 ``[nblk]`` (block-column index < C, sorted unique within a block row),
``data`` float32 ``[nblk, r, c]``. Edge blocks are padded with zeros (checked by ``validate``);
kernels must not read X rows >= in nor write Y rows >= out.
"""
from __future__ import annotations

import numpy as np

from .base import (WeightFormat, check_array, check_indptr, check_meta_keys, check_orig_shape,
                   check_row_indices, parse_block, parse_shape, pick_arrays, register, weight_2d, _fail)


def _ceil(a, b):
    return -(-a // b)


def block_view(w2d: np.ndarray, r: int, c: int) -> np.ndarray:
    """Zero-padded blocks of a 2-D array as ``[R, C, r, c]``."""
    out, inn = w2d.shape
    R, C = _ceil(out, r), _ceil(inn, c)
    p = np.zeros((R * r, C * c), dtype=w2d.dtype)
    p[:out, :inn] = w2d
    return p.reshape(R, r, C, c).transpose(0, 2, 1, 3)


def bsr_structure(w2d: np.ndarray, r: int, c: int, *, name=None):
    """(indptr int32 [R+1], indices int32 [nblk], blocks [R, C, r, c], block mask [R, C])."""
    blocks = block_view(w2d, r, c)
    mask = (blocks != 0).any(axis=(2, 3))
    counts = mask.sum(axis=1, dtype=np.int64)
    if int(counts.sum()) >= 2 ** 31:
        _fail(name, "indices", "too many blocks for int32 indptr")
    indptr = np.zeros(blocks.shape[0] + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(counts)
    _, bcols = np.nonzero(mask)
    return indptr, np.ascontiguousarray(bcols, dtype=np.int32), blocks, mask


class _BSRBase(WeightFormat):
    """Shared BSR structure for ``bsr`` and ``bsr_i8``."""

    def _init_structure(self, shape, block, indptr, indices, name, orig_shape):
        self.shape = parse_shape(shape, name=name, ndim=2)
        self.block = (int(block[0]), int(block[1]))
        self.indptr, self.indices = indptr, indices
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    @property
    def grid(self):
        """(R, C): number of block rows and block columns."""
        (out, inn), (r, c) = self.shape, self.block
        return _ceil(out, r), _ceil(inn, c)

    def meta(self):
        return {"block": [self.block[0], self.block[1]]}

    def _validate_structure(self, full):
        parse_block({"block": list(self.block)}, name=self.name)
        R, C = self.grid
        check_array(self.name, "indptr", self.indptr, np.int32, shape=(R + 1,))
        check_array(self.name, "indices", self.indices, np.int32, ndim=1)
        nblk = int(self.indices.shape[0])
        if nblk >= 2 ** 31:
            self._fail("indices", f"block count {nblk} does not fit int32")
        check_indptr(self.name, "indptr", self.indptr, nblk)
        check_row_indices(self.name, "indices", self.indptr, self.indices, C, full=full)
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape)
        return nblk

    def _check_padding(self, field, blocks):
        """Padded parts of edge blocks (rows >= out, cols >= in) must be zero."""
        (out, inn), (r, c) = self.shape, self.block
        R, C = self.grid
        if out % r:
            k0, k1 = int(self.indptr[R - 1]), int(self.indptr[R])
            if np.any(blocks[k0:k1, out - (R - 1) * r:, :]):
                self._fail(field, f"padding rows (>= out={out}) of the last block row must be zero")
        if inn % c and blocks.shape[0]:
            sel = self.indices == C - 1
            if np.any(blocks[sel][:, :, inn - (C - 1) * c:]):
                self._fail(field, f"padding columns (>= in={inn}) of the last block column must be zero")

    def _block_rows(self):
        return np.repeat(np.arange(self.grid[0], dtype=np.int64), np.diff(self.indptr.astype(np.int64)))

    def _scatter(self, blocks: np.ndarray) -> np.ndarray:
        """Dense float32 [out, in] from blocks [nblk, r, c] (float32) at this structure."""
        (out, inn), (r, c) = self.shape, self.block
        R, C = self.grid
        p = np.zeros((R, C, r, c), dtype=np.float32)
        p[self._block_rows(), self.indices.astype(np.int64)] = blocks
        return np.ascontiguousarray(p.transpose(0, 2, 1, 3).reshape(R * r, C * c)[:out, :inn])

    @property
    def nblocks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nnz(self) -> int:
        """Stored entries inside the logical shape (block padding excluded)."""
        (out, inn), (r, c) = self.shape, self.block
        if self.nblocks == 0:
            return 0
        rows = np.minimum(r, out - self._block_rows() * r)
        cols = np.minimum(c, inn - self.indices.astype(np.int64) * c)
        return int(np.sum(rows * cols))


@register
class BSR(_BSRBase):
    """BSR float32: meta block [r, c]; indptr int32 [R+1], indices int32 [nblk], data float32 [nblk, r, c]."""

    kind = "bsr"

    def __init__(self, shape, block, indptr, indices, data, *, name=None, orig_shape=None):
        self._init_structure(shape, block, indptr, indices, name, orig_shape)
        self.data = data

    @classmethod
    def from_dense(cls, w, *, block=(4, 1), name=None) -> "BSR":
        """Exact BSR of ``w`` ([out, in] or N-D conv weight viewed 2-D): every block with a non-zero."""
        r, c = parse_block({"block": list(block)}, name=name)
        w2, orig = weight_2d(w, name=name)
        w2 = np.asarray(w2, dtype=np.float32)
        indptr, indices, blocks, mask = bsr_structure(w2, r, c, name=name)
        data = np.ascontiguousarray(blocks[mask], dtype=np.float32).reshape(-1, r, c)
        return cls(w2.shape, (r, c), indptr, indices, data, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "BSR":
        check_meta_keys(meta, ("block",), name=name)
        block = parse_block(meta, name=name)
        a = pick_arrays(arrays, ("indptr", "indices", "data"), name=name)
        return cls(shape, block, a["indptr"], a["indices"], a["data"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"indptr": self.indptr, "indices": self.indices, "data": self.data}

    def validate(self, full: bool = True) -> None:
        nblk = self._validate_structure(full)
        check_array(self.name, "data", self.data, np.float32, shape=(nblk,) + self.block)
        if full:
            self._check_padding("data", self.data)

    def to_dense(self) -> np.ndarray:
        return self._scatter(self.data)
