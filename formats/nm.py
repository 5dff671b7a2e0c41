"""``nm``: N:M structured sparsity along the input dimension (2:4, 4:8, any 1 <= N <= M <= 256).

meta ``{"n": N, "m": M}``; with ``G = ceil(in/M)`` groups per row: ``values`` float32 ``[out, G*N]``,
``offsets`` uint8 ``[out, G*N]``. Slot ``j`` of group ``g`` holds ``W[i, g*M + offsets[i, g*N+j]]``.
Within a group offsets are strictly increasing, ``< M`` and ``g*M + offset < in``; unused slots hold
value 0 at a distinct offset. Only the last group can be narrower than N columns (``in % M < N``):
its slots beyond its width hold value 0 at offset 0 (so every offset stays inside the row).
"""
from __future__ import annotations

import numpy as np

from .base import (WeightFormat, check_array, check_meta_keys, check_orig_shape, meta_int, parse_shape,
                   pick_arrays, register, weight_2d, _fail)


def _ceil(a, b):
    return -(-a // b)


@register
class NM(WeightFormat):
    """N:M: meta n, m; values float32 [out, G*N]; offsets uint8 [out, G*N]; G = ceil(in/M)."""

    kind = "nm"

    def __init__(self, shape, n, m, values, offsets, *, name=None, orig_shape=None):
        self.shape = parse_shape(shape, name=name, ndim=2)
        self.n, self.m = int(n), int(m)
        self.values, self.offsets = values, offsets
        self.name = name
        self.orig_shape = None if orig_shape is None else tuple(orig_shape)

    @property
    def groups(self) -> int:
        return _ceil(self.shape[1], self.m)

    @classmethod
    def from_dense(cls, w, *, n=2, m=4, name=None) -> "NM":
        """Exact N:M form of ``w``; FormatError if a group of M input columns has more than N non-zeros.
        (Magnitude pruning to N:M is the converter's job.)"""
        n, m = _parse_nm({"n": n, "m": m}, name)
        w2, orig = weight_2d(w, name=name)
        w2 = np.asarray(w2, dtype=np.float32)
        out, inn = w2.shape
        G = _ceil(inn, m)
        p = np.zeros((out, G * m), dtype=np.float32)
        p[:, :inn] = w2
        p = p.reshape(out, G, m)
        nzc = (p != 0).sum(axis=2)
        if nzc.size and int(nzc.max()) > n:
            i, g = np.unravel_index(int(np.argmax(nzc)), nzc.shape)
            _fail(name, "values", f"row {i}, input columns {g * m}..{min(g * m + m, inn) - 1} hold "
                                  f"{int(nzc[i, g])} non-zeros, more than N={n} of {n}:{m}")
        pos = np.arange(m)
        width = np.full(G, m, dtype=np.int64)
        if G:
            width[-1] = inn - (G - 1) * m
        valid = pos[None, :] < width[:, None]  # [G, m]
        key = np.where(valid[None], np.where(p != 0, 0, 1), 2) * m + pos  # nonzeros, then zeros, then padding
        chosen = np.sort(np.argsort(key, axis=2, kind="stable")[:, :, :n], axis=2)  # [out, G, n]
        vals = np.take_along_axis(p, chosen, axis=2)
        bad = chosen >= width[None, :, None]
        chosen[bad] = 0
        vals[bad] = 0
        return cls((out, inn), n, m, np.ascontiguousarray(vals.reshape(out, G * n)),
                   np.ascontiguousarray(chosen.reshape(out, G * n).astype(np.uint8)), name=name, orig_shape=orig)

    @classmethod
    def from_arrays(cls, shape, meta, arrays, *, name=None, orig_shape=None) -> "NM":
        check_meta_keys(meta, ("n", "m"), name=name)
        n, m = _parse_nm(meta, name)
        a = pick_arrays(arrays, ("values", "offsets"), name=name)
        return cls(shape, n, m, a["values"], a["offsets"], name=name, orig_shape=orig_shape)

    def arrays(self):
        return {"values": self.values, "offsets": self.offsets}

    def meta(self):
        return {"n": self.n, "m": self.m}

    def validate(self, full: bool = True) -> None:
        n, m = _parse_nm({"n": self.n, "m": self.m}, self.name)
        out, inn = self.shape
        G = self.groups
        check_array(self.name, "values", self.values, np.float32, shape=(out, G * n))
        check_array(self.name, "offsets", self.offsets, np.uint8, shape=(out, G * n))
        self.orig_shape = check_orig_shape(self.name, self.shape, self.orig_shape)
        if not full or out == 0 or G == 0:
            return
        off = self.offsets.reshape(out, G, n)
        width = np.full(G, m, dtype=np.int64)
        width[-1] = inn - (G - 1) * m
        if not bool(np.all(off < width[None, :, None])):
            i, g, j = np.argwhere(off >= width[None, :, None])[0]
            self._fail("offsets", f"row {i}, group {g}: offset {int(off[i, g, j])} outside the group "
                                  f"(width {int(width[g])}, in={inn})")
        k_last = min(n, int(width[-1]))
        # strictly increasing over the first min(n, width) slots of each group
        full_groups = off[:, :G - 1] if k_last < n else off
        if n > 1 and full_groups.size and not bool(np.all(full_groups[:, :, 1:] > full_groups[:, :, :-1])):
            i, g, _ = np.argwhere(~(full_groups[:, :, 1:] > full_groups[:, :, :-1]))[0]
            self._fail("offsets", f"row {i}, group {g}: offsets must be strictly increasing")
        if k_last < n:
            last = off[:, G - 1, :k_last]
            if k_last > 1 and not bool(np.all(last[:, 1:] > last[:, :-1])):
                self._fail("offsets", f"group {G - 1}: offsets must be strictly increasing")
            if np.any(self.values.reshape(out, G, n)[:, G - 1, k_last:]):
                self._fail("values", f"group {G - 1}: slots beyond the last group's width must hold 0")

    def to_dense(self) -> np.ndarray:
        out, inn = self.shape
        G, n, m = self.groups, self.n, self.m
        p = np.zeros((out, G, m), dtype=np.float32)
        off = self.offsets.reshape(out, G, n).astype(np.int64)
        vals = self.values.reshape(out, G, n)
        # add (not assign) so that padding slots (value 0, possibly repeated offset 0) cannot clobber
        ii, gg = np.meshgrid(np.arange(out), np.arange(G), indexing="ij")
        for j in range(n):
            p[ii, gg, off[:, :, j]] += vals[:, :, j]
        return np.ascontiguousarray(p.reshape(out, G * m)[:, :inn])

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.values))


def _parse_nm(meta, name):
    m = meta_int(meta, "m", name=name, lo=1, hi=256)
    n = meta_int(meta, "n", name=name, lo=1, hi=m)
    return n, m
