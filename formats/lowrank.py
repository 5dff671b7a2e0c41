"""``lowrank``: ``W ~ U @ V`` with rank k.

meta ``{"rank": k, "dtype": "float32"|"int8"}``; float32: ``u`` float32 ``[out, k]``, ``v`` float32
``[k, in]``. int8: ``u``, ``v`` int8 of those shapes plus ``u_scale`` float32 ``[out]`` and ``v_scale``
float32 ``[k]`` (symmetric per row: ``U = u_scale[:, None] * u``, ``V = v_scale[:, None] * v``).
"""
from __future__ import annotations

import numpy as np

from .base import (WeightFormat, check_array, check_meta_keys, check_orig_shape, check_scales, meta_int,
                   meta_str, parse_shape, pick_arrays, quantize_sym, register, symmetric_scales, weight_2d, _fail)


@register
class LowRank(WeightFormat):
    """Low-rank factors: u [out, k], v [k, in] (float32, or int8 with u_scale [out], v_scale [k])."""

    kind = "lowrank"

    def __init__(self, shape, u, v, u_scale=None, v_scale=None, *, dtype="float32", name=None, orig_shape=None):
        self.shape = parse_shape(shape, name=name, ndim=2)
        self.u, self.v, self.u_scale, self.v_scale = u, v, u_scale, v_scale
        self.dtype = dtype
        self.rank = int(u.shape[1]) if getattr(u, "ndim", 0) == 2 else -1
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    @classmethod
    def from_factors(cls, u, v, *, dtype="float32", name=None, orig_shape=None) -> "LowRank":
        """From float factors u [out, k], v [k, in]; ``dtype="int8"`` quantizes each symmetric per row."""
        meta_str({"dtype": dtype}, "dtype", ("float32", "int8"), name=name)
        u = np.ascontiguousarray(u, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0] or u.shape[1] < 1:
            _fail(name, "u", f"factors must be [out, k] and [k, in] with k >= 1, got {u.shape} and {v.shape}")
        shape = (u.shape[0], v.shape[1])
        if dtype == "float32":
            return cls(shape, u, v, name=name, orig_shape=orig_shape)
        if not (np.isfinite(u).all() and np.isfinite(v).all()):
            _fail(name, "u", "cannot quantize non-finite factors")
        us = symmetric_scales(np.abs(u).max(axis=1))
        vs = symmetric_scales(np.abs(v).max(axis=1) if v.shape[1] else np.zeros(v.shape[0]))
        return cls(shape, np.ascontiguousarray(quantize_sym(u, us[:, None])),
                   np.ascontiguousarray(quantize_sym(v, vs[:, None])), us, vs, dtype="int8", name=name,
                   orig_shape=orig_shape)

    @classmethod
    def from_dense(cls, w, *, rank=None, energy=None, dtype="float32", name=None) -> "LowRank":
        """Truncated SVD of ``w``: ``rank`` k, or the smallest k keeping ``energy`` (0..1] of sum(s^2).
        U gets the singular values (U = U_k * s_k, V = Vt_k). Neither given: full rank (exact)."""
        w2, orig = weight_2d(w, name=name)
        w2 = np.asarray(w2, dtype=np.float32)
        if w2.size == 0:
            _fail(name, "shape", "cannot factor an empty matrix")
        U, s, Vt = np.linalg.svd(w2.astype(np.float64), full_matrices=False)
        kmax = len(s)
        if rank is not None:
            k = int(rank)
            if not 1 <= k:
                _fail(name, "meta.rank", f"must be >= 1, got {rank}")
            k = min(k, kmax)
        elif energy is not None:
            if not 0 < float(energy) <= 1:
                _fail(name, "meta.rank", f"energy must be in (0, 1], got {energy}")
            e = np.cumsum(s ** 2)
            tot = e[-1]
            k = kmax if tot == 0 else int(np.searchsorted(e, float(energy) * tot * (1 - 1e-12)) + 1)
            k = max(1, min(k, kmax))
        else:
            k = kmax
        return cls.from_factors(U[:, :k] * s[:k], Vt[:k], dtype=dtype, name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "LowRank":
        check_meta_keys(meta, ("rank", "dtype"), name=name)
        dtype = meta_str(meta, "dtype", ("float32", "int8"), name=name)
        rank = meta_int(meta, "rank", name=name, lo=1, hi=2 ** 31 - 1)
        if dtype == "float32":
            a = pick_arrays(arrays, ("u", "v"), name=name)
            obj = cls(shape, a["u"], a["v"], dtype=dtype, name=name, orig_shape=orig_shape)
        else:
            a = pick_arrays(arrays, ("u", "v", "u_scale", "v_scale"), name=name)
            obj = cls(shape, a["u"], a["v"], a["u_scale"], a["v_scale"], dtype=dtype, name=name,
                      orig_shape=orig_shape)
        obj.rank = rank
        return obj

    def arrays(self):
        a = {"u": self.u, "v": self.v}
        if self.dtype == "int8":
            a.update(u_scale=self.u_scale, v_scale=self.v_scale)
        return a

    def meta(self):
        return {"rank": self.rank, "dtype": self.dtype}

    def validate(self, full: bool = True) -> None:
        meta_str({"dtype": self.dtype}, "dtype", ("float32", "int8"), name=self.name)
        meta_int({"rank": self.rank}, "rank", name=self.name, lo=1, hi=2 ** 31 - 1)
        out, inn = self.shape
        k = self.rank
        dt = np.float32 if self.dtype == "float32" else np.int8
        check_array(self.name, "u", self.u, dt, shape=(out, k))
        check_array(self.name, "v", self.v, dt, shape=(k, inn))
        if self.dtype == "int8":
            check_array(self.name, "u_scale", self.u_scale, np.float32, shape=(out,))
            check_array(self.name, "v_scale", self.v_scale, np.float32, shape=(k,))
            check_scales(self.name, "u_scale", self.u_scale)
            check_scales(self.name, "v_scale", self.v_scale)
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape)

    def factors(self):
        """Float32 (U [out, k], V [k, in]), dequantized for int8."""
        if self.dtype == "float32":
            return self.u, self.v
        return ((self.u_scale[:, None] * self.u.astype(np.float32)).astype(np.float32),
                (self.v_scale[:, None] * self.v.astype(np.float32)).astype(np.float32))

    def to_dense(self) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            u, v = self.factors()
            return np.ascontiguousarray(u @ v, dtype=np.float32)

    @property
    def nnz(self) -> int:
        """Stored parameters (out*k + k*in)."""
        return int(self.u.size + self.v.size)
