"""int8 weight formats: ``dense_i8``, ``csr_i8``, ``bsr_i8``. ``real = scale * (q - zero_point)``.

* ``dense_i8``: meta ``{"mode": "symmetric"|"affine", "granularity": "channel"|"tensor"}``;
  ``q`` int8 ``[out, in]``, ``scale`` float32 ``[out]`` (channel) or ``[1]`` (tensor),
  ``zero_point`` int32 of the scale's shape (all 0 when symmetric; in [-128, 127] when affine).
  Symmetric q is in [-127, 127].
* ``csr_i8``: ``indptr``/``indices`` as ``csr``; ``q`` int8 ``[nnz]``; ``scale`` float32 ``[out]``
  (symmetric per output row; a row without entries has scale 1).
* ``bsr_i8``: meta ``{"block": [r, c]}``; ``indptr``/``indices`` as ``bsr``; ``q`` int8 ``[nblk, r, c]``;
  ``scale`` float32 ``[ceil(out/r)*r]`` (symmetric per output row, padded rows scale 1).
Scales are finite and > 0. Dequantized values are within half a step (scale/2) of the originals.
"""
from __future__ import annotations

import numpy as np

from .base import (WeightFormat, check_array, check_meta_keys, check_orig_shape, check_scales, meta_str,
                   parse_block, parse_shape, pick_arrays, quantize_sym, register, symmetric_scales,
                   weight_2d, _fail)
from .bsr import _BSRBase, bsr_structure
from .csr import _CSRBase, csr_structure


def _finite_f32(w, name):
    w = np.asarray(w, dtype=np.float32)
    if w.size and not bool(np.isfinite(w).all()):
        _fail(name, "q", "cannot quantize non-finite weights")
    return w


@register
class DenseI8(WeightFormat):
    """Dense int8: q int8 [out, in]; scale float32 [out]|[1]; zero_point int32 [out]|[1]."""

    kind = "dense_i8"

    def __init__(self, shape, mode, granularity, q, scale, zero_point, *, name=None, orig_shape=None):
        self.shape = parse_shape(shape, name=name, ndim=2)
        self.mode, self.granularity = mode, granularity
        self.q, self.scale, self.zero_point = q, scale, zero_point
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    @classmethod
    def from_dense(cls, w, *, mode="symmetric", granularity="channel", name=None) -> "DenseI8":
        """Quantize ``w`` ([out, in] or N-D conv weight viewed 2-D) by min/max.
        symmetric: scale = max|w|/127, q in [-127, 127], zero_point 0.
        affine: range [min(w,0), max(w,0)] onto [-128, 127] with an integer zero point."""
        meta_str({"mode": mode}, "mode", ("symmetric", "affine"), name=name)
        meta_str({"granularity": granularity}, "granularity", ("channel", "tensor"), name=name)
        w2, orig = weight_2d(w, name=name)
        w2 = _finite_f32(w2, name)
        out, inn = w2.shape
        red = (lambda f, x: f(x, axis=1)) if granularity == "channel" else (lambda f, x: np.array([f(x)]))
        k = out if granularity == "channel" else 1
        if w2.size == 0:
            lo, hi = np.zeros(k), np.zeros(k)
        else:
            lo = np.minimum(red(np.min, w2).astype(np.float64), 0.0)
            hi = np.maximum(red(np.max, w2).astype(np.float64), 0.0)
        if mode == "symmetric":
            scale = symmetric_scales(np.maximum(-lo, hi))
            zp = np.zeros(k, dtype=np.int32)
            q = quantize_sym(w2, scale[:, None] if granularity == "channel" else scale)
        else:
            scale = ((hi - lo) / 255.0).astype(np.float32)
            scale[~(scale > 0)] = 1.0
            s64 = scale.astype(np.float64)
            zp = np.clip(np.rint(-128.0 - lo / s64), -128, 127).astype(np.int32)
            sb = s64[:, None] if granularity == "channel" else s64
            zb = zp[:, None] if granularity == "channel" else zp
            q = np.clip(np.rint(w2 / sb) + zb, -128, 127).astype(np.int8)
        return cls((out, inn), mode, granularity, np.ascontiguousarray(q), scale, zp, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "DenseI8":
        check_meta_keys(meta, ("mode", "granularity"), name=name)
        mode = meta_str(meta, "mode", ("symmetric", "affine"), name=name)
        gran = meta_str(meta, "granularity", ("channel", "tensor"), name=name)
        a = pick_arrays(arrays, ("q", "scale", "zero_point"), name=name)
        return cls(shape, mode, gran, a["q"], a["scale"], a["zero_point"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"q": self.q, "scale": self.scale, "zero_point": self.zero_point}

    def meta(self):
        return {"mode": self.mode, "granularity": self.granularity}

    def validate(self, full: bool = True) -> None:
        meta_str({"mode": self.mode}, "mode", ("symmetric", "affine"), name=self.name)
        meta_str({"granularity": self.granularity}, "granularity", ("channel", "tensor"), name=self.name)
        out, inn = self.shape
        k = out if self.granularity == "channel" else 1
        check_array(self.name, "q", self.q, np.int8, shape=(out, inn))
        check_array(self.name, "scale", self.scale, np.float32, shape=(k,))
        check_array(self.name, "zero_point", self.zero_point, np.int32, shape=(k,))
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape)
        check_scales(self.name, "scale", self.scale)
        zp = self.zero_point
        if self.mode == "symmetric":
            if zp.size and np.any(zp != 0):
                self._fail("zero_point", "must be 0 for symmetric quantization")
        elif zp.size and (int(zp.min()) < -128 or int(zp.max()) > 127):
            self._fail("zero_point", f"must be within the int8 range [-128, 127], got "
                                     f"{int(zp.min())}..{int(zp.max())}")

    def to_dense(self) -> np.ndarray:
        s = self.scale[:, None] if self.granularity == "channel" else self.scale
        z = self.zero_point[:, None] if self.granularity == "channel" else self.zero_point
        with np.errstate(over="ignore"):  # a huge (finite) scale may overflow to inf: the data says so
            return (s * (self.q.astype(np.int32) - z).astype(np.float32)).astype(np.float32)

    @property
    def nnz(self) -> int:
        if self.mode == "symmetric":
            return int(np.count_nonzero(self.q))
        z = self.zero_point[:, None] if self.granularity == "channel" else self.zero_point
        return int(np.count_nonzero(self.q.astype(np.int32) != z))


@register
class CSRI8(_CSRBase):
    """CSR int8: indptr int32 [out+1], indices int32|uint16 [nnz], q int8 [nnz], scale float32 [out]."""

    kind = "csr_i8"

    def __init__(self, shape, indptr, indices, q, scale, *, name=None, orig_shape=None):
        self._init_structure(shape, indptr, indices, name, orig_shape)
        self.q, self.scale = q, scale

    @classmethod
    def from_dense(cls, w, *, index_dtype="int32", name=None) -> "CSRI8":
        """Non-zeros of ``w`` quantized symmetric per output row (scale = row max|w| / 127).
        Entries that quantize to 0 stay stored (the structure is the float one's)."""
        w2, orig = weight_2d(w, name=name)
        w2 = _finite_f32(w2, name)
        indptr, indices, mask = csr_structure(w2, index_dtype, name=name)
        scale = symmetric_scales(np.abs(w2).max(axis=1) if w2.shape[1] else np.zeros(w2.shape[0]))
        rows = np.repeat(np.arange(w2.shape[0]), np.diff(indptr))
        q = quantize_sym(w2[mask], scale[rows])
        return cls(w2.shape, indptr, indices, np.ascontiguousarray(q), scale, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "CSRI8":
        check_meta_keys(meta, (), name=name)
        a = pick_arrays(arrays, ("indptr", "indices", "q", "scale"), name=name)
        return cls(shape, a["indptr"], a["indices"], a["q"], a["scale"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"indptr": self.indptr, "indices": self.indices, "q": self.q, "scale": self.scale}

    def validate(self, full: bool = True) -> None:
        nnz = self._validate_structure(full)
        check_array(self.name, "q", self.q, np.int8, shape=(nnz,))
        check_array(self.name, "scale", self.scale, np.float32, shape=(self.shape[0],))
        check_scales(self.name, "scale", self.scale)

    def to_dense(self) -> np.ndarray:
        d = np.zeros(self.shape, dtype=np.float32)
        rows = self._rows()
        with np.errstate(over="ignore"):
            d[rows, self.indices.astype(np.int64)] = self.scale[rows] * self.q.astype(np.float32)
        return d


@register
class BSRI8(_BSRBase):
    """BSR int8: meta block; indptr, indices as bsr; q int8 [nblk, r, c]; scale float32 [R*r]."""

    kind = "bsr_i8"

    def __init__(self, shape, block, indptr, indices, q, scale, *, name=None, orig_shape=None):
        self._init_structure(shape, block, indptr, indices, name, orig_shape)
        self.q, self.scale = q, scale

    @classmethod
    def from_dense(cls, w, *, block=(4, 1), name=None) -> "BSRI8":
        """Blocks of ``w`` with a non-zero, quantized symmetric per output row."""
        r, c = parse_block({"block": list(block)}, name=name)
        w2, orig = weight_2d(w, name=name)
        w2 = _finite_f32(w2, name)
        out, inn = w2.shape
        indptr, indices, blocks, mask = bsr_structure(w2, r, c, name=name)
        R = blocks.shape[0]
        absmax = np.zeros(R * r)
        if inn:
            absmax[:out] = np.abs(w2).max(axis=1)
        scale = symmetric_scales(absmax)
        # blocks [R, C, r, c] / scale per row: row index br*r + i
        sb = scale.reshape(R, 1, r, 1)
        q = quantize_sym(blocks, sb)[mask]
        return cls((out, inn), (r, c), indptr, indices, np.ascontiguousarray(q.reshape(-1, r, c)), scale,
                   name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "BSRI8":
        check_meta_keys(meta, ("block",), name=name)
        block = parse_block(meta, name=name)
        a = pick_arrays(arrays, ("indptr", "indices", "q", "scale"), name=name)
        return cls(shape, block, a["indptr"], a["indices"], a["q"], a["scale"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"indptr": self.indptr, "indices": self.indices, "q": self.q, "scale": self.scale}

    def validate(self, full: bool = True) -> None:
        nblk = self._validate_structure(full)
        R, _ = self.grid
        check_array(self.name, "q", self.q, np.int8, shape=(nblk,) + self.block)
        check_array(self.name, "scale", self.scale, np.float32, shape=(R * self.block[0],))
        check_scales(self.name, "scale", self.scale)
        if full:
            self._check_padding("q", self.q)

    def to_dense(self) -> np.ndarray:
        r = self.block[0]
        s = self.scale.reshape(-1, r)[self._block_rows()][:, :, None]  # [nblk, r, 1]
        with np.errstate(over="ignore"):
            return self._scatter((s * self.q.astype(np.float32)).astype(np.float32))
