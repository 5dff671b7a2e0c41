"""Per-layer compression: pruning, int8, low-rank, and the choice of storage format.

Grammar (the same strings in flags, recipes and the Python API):

* prune:   ``0.9`` (unstructured, per layer) | ``global:0.9`` (unstructured, one magnitude threshold
  over all pruned layers) | ``block:4x1:0.9`` (r x c blocks by L2 norm; r along outputs) |
  ``nm:2:4`` (keep the N largest of every M consecutive inputs). Sparsity counts zeros already
  in the checkpoint: those are always kept.
* quant:   ``int8`` (weights int8 symmetric per output channel; activations quantized dynamically by
  the runtime) | ``int8:static`` (also static activation scales from calibration data, min-max) |
  ``int8:static:p99.9`` (percentile calibration) | ``none``.
* lowrank: ``rank:64`` | ``energy:0.95`` (smallest rank keeping that share of the squared singular
  values); applied only where it shrinks the layer.
* format:  ``auto`` (per layer, the fastest predicted format; dense when sparsity does not pay) |
  ``dense`` | ``csr`` | ``bsr:RxC`` | ``nm``. With int8, dense/csr/bsr become dense_i8/csr_i8/bsr_i8.

Weights are handled 2-D ``[out, in]``; conv weights ``[out, in/groups, kh, kw]`` are viewed as
``[out, in/groups*kh*kw]`` (the original shape is kept as ``orig_shape``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConversionError, InputError

# ----------------------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class PruneSpec:
    kind: str  # "unstructured" | "global" | "block" | "nm"
    sparsity: float = 0.0
    block: tuple = (1, 1)
    n: int = 0
    m: int = 0

    def __str__(self):
        if self.kind == "unstructured":
            return f"{self.sparsity:g}"
        if self.kind == "global":
            return f"global:{self.sparsity:g}"
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}:{self.sparsity:g}"
        return f"nm:{self.n}:{self.m}"


@dataclass(frozen=True)
class QuantSpec:
    static: bool = False
    method: str = "minmax"  # or "percentile"
    percentile: float = 99.99

    def __str__(self):
        if not self.static:
            return "int8"
        return "int8:static" + ("" if self.method == "minmax" else f":p{self.percentile:g}")


@dataclass(frozen=True)
class LowRankSpec:
    rank: int | None = None
    energy: float | None = None

    def __str__(self):
        return f"rank:{self.rank}" if self.rank is not None else f"energy:{self.energy:g}"


@dataclass(frozen=True)
class FormatSpec:
    kind: str  # "auto" | "dense" | "csr" | "bsr" | "nm"
    block: tuple | None = None

    def __str__(self):
        return f"bsr:{self.block[0]}x{self.block[1]}" if self.kind == "bsr" else self.kind


BSR_BLOCKS = ((1, 4), (4, 1), (8, 1), (16, 1), (1, 16), (4, 4))
NM_PATTERNS = ((2, 4), (4, 8), (1, 4), (2, 8), (1, 2))


def _frac(s: str, what: str, text: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise InputError(f"{what} {text!r}: {s!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise InputError(f"{what} {text!r}: sparsity must be in [0, 1), got {v}")
    return v


def _block(s: str, what: str, text: str) -> tuple:
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise InputError(f"{what} {text!r}: block {s!r} must be RxC, e.g. 4x1")
    return int(m.group(1)), int(m.group(2))


def parse_prune(text) -> PruneSpec | None:
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none", "0", "0.0")):
        return None
    if isinstance(text, (int, float)):
        text = str(text)
    t = text.strip()
    parts = t.split(":")
    if len(parts) == 1:
        return PruneSpec("unstructured", _frac(parts[0], "--prune", t))
    if parts[0] == "global" and len(parts) == 2:
        return PruneSpec("global", _frac(parts[1], "--prune", t))
    if parts[0] == "block" and len(parts) == 3:
        return PruneSpec("block", _frac(parts[2], "--prune", t), block=_block(parts[1], "--prune", t))
    if parts[0] == "nm" and len(parts) == 3:
        try:
            n, m = int(parts[1]), int(parts[2])
        except ValueError:
            raise InputError(f"--prune {t!r}: N and M must be integers, e.g. nm:2:4") from None
        if not (1 <= n < m <= 255):
            raise InputError(f"--prune {t!r}: need 1 <= N < M <= 255")
        return PruneSpec("nm", 1.0 - n / m, n=n, m=m)
    raise InputError(f"--prune {t!r}: expected 0.9, global:0.9, block:4x1:0.9 or nm:2:4")


def parse_quant(text) -> QuantSpec | None:
    if text is None or str(text).strip().lower() in ("", "none", "fp32", "float32"):
        return None
    t = str(text).strip().lower()
    if t == "int8":
        return QuantSpec()
    m = re.fullmatch(r"int8:static(?::(minmax|p(\d+(?:\.\d+)?)))?", t)
    if m:
        if m.group(2):
            p = float(m.group(2))
            if not 50.0 < p <= 100.0:
                raise InputError(f"--quant {text!r}: percentile must be in (50, 100]")
            return QuantSpec(True, "percentile", p)
        return QuantSpec(True, "minmax")
    raise InputError(f"--quant {text!r}: expected int8, int8:static or int8:static:p99.9")


def parse_lowrank(text) -> LowRankSpec | None:
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    t = str(text).strip().lower()
    m = re.fullmatch(r"rank:(\d+)", t)
    if m and int(m.group(1)) >= 1:
        return LowRankSpec(rank=int(m.group(1)))
    m = re.fullmatch(r"energy:(0?\.\d+|1(?:\.0*)?)", t)
    if m:
        return LowRankSpec(energy=float(m.group(1)))
    raise InputError(f"--lowrank {text!r}: expected rank:64 or energy:0.95")


def parse_format(text) -> FormatSpec:
    t = (str(text) if text is not None else "auto").strip().lower()
    if t in ("auto", "dense", "csr", "nm"):
        return FormatSpec(t)
    if t.startswith("bsr:"):
        b = _block(t[4:], "--format", t)
        if b not in BSR_BLOCKS:
            raise InputError(f"--format {text!r}: block must be one of "
                             + ", ".join(f"{r}x{c}" for r, c in BSR_BLOCKS))
        return FormatSpec("bsr", b)
    raise InputError(f"--format {text!r}: expected auto, dense, csr, bsr:RxC or nm")


@dataclass
class LayerPlan:
    """What to do with one layer (resolved from flags and the recipe)."""
    prune: PruneSpec | None = None
    quant: QuantSpec | None = None
    lowrank: LowRankSpec | None = None
    fmt: FormatSpec = field(default_factory=lambda: FormatSpec("auto"))
    skip: bool = False


# ----------------------------------------------------------------------------------------
# pruning (2-D float32 in, 2-D float32 out; existing zeros stay zero)


def prune_unstructured(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``round(sparsity * size)`` smallest-magnitude entries (existing zeros count)."""
    k = int(round(sparsity * w.size))
    out = w.copy()
    if k <= 0:
        return out
    flat = out.reshape(-1)
    idx = np.argpartition(np.abs(flat), k - 1)[:k]
    flat[idx] = 0.0
    return out


def prune_global(ws: list, sparsity: float) -> list:
    """One magnitude threshold over all the weights: ``round(sparsity * total)`` zeros overall."""
    total = sum(w.size for w in ws)
    k = int(round(sparsity * total))
    outs = [w.copy() for w in ws]
    if k <= 0 or not ws:
        return outs
    allabs = np.concatenate([np.abs(w).reshape(-1) for w in ws])
    idx = np.argpartition(allabs, k - 1)[:k]
    mask = np.zeros(total, dtype=bool)
    mask[idx] = True
    off = 0
    for o in outs:
        f = o.reshape(-1)
        f[mask[off: off + f.size]] = 0.0
        off += f.size
    return outs


def _pad_to(w: np.ndarray, r: int, c: int) -> np.ndarray:
    out, inn = w.shape
    po, pi = -out % r, -inn % c
    return np.pad(w, ((0, po), (0, pi))) if (po or pi) else w


def prune_block(w: np.ndarray, block: tuple, sparsity: float) -> np.ndarray:
    """Zero the ``round(sparsity * nblocks)`` r x c blocks of smallest L2 norm (edge blocks padded)."""
    r, c = block
    out, inn = w.shape
    p = _pad_to(w, r, c)
    br, bc = p.shape[0] // r, p.shape[1] // c
    blocks = p.reshape(br, r, bc, c)
    score = (blocks.astype(np.float64) ** 2).sum(axis=(1, 3)).reshape(-1)
    k = int(round(sparsity * score.size))
    keep = np.ones(score.size, dtype=bool)
    if k > 0:
        keep[np.argpartition(score, k - 1)[:k]] = False
    mask = np.repeat(np.repeat(keep.reshape(br, bc), r, axis=0), c, axis=1)[:out, :inn]
    return np.where(mask, w, np.float32(0)).astype(np.float32)


def prune_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive inputs of each row (last group may be short)."""
    out, inn = w.shape
    g = -(-inn // m)
    p = np.pad(w, ((0, 0), (0, g * m - inn)))
    grp = np.abs(p.reshape(out, g, m)).astype(np.float64)
    grp[:, -1, m - (g * m - inn):] = -1.0 if g * m > inn else grp[:, -1, m - (g * m - inn):]
    order = np.argsort(-grp, axis=2, kind="stable")
    keep = np.zeros_like(grp, dtype=bool)
    np.put_along_axis(keep, order[:, :, :n], True, axis=2)
    mask = keep.reshape(out, g * m)[:, :inn]
    return np.where(mask, w, np.float32(0)).astype(np.float32)


def is_nm(w: np.ndarray, n: int, m: int) -> bool:
    """Every run of m consecutive inputs of a row holds at most n non-zeros (and encodable)."""
    out, inn = w.shape
    g = -(-inn // m)
    last = inn - (g - 1) * m
    if last < n:  # the last group cannot hold n distinct offsets
        return False
    p = np.pad(w != 0, ((0, 0), (0, g * m - inn)))
    return bool((p.reshape(out, g, m).sum(axis=2) <= n).all())


# ----------------------------------------------------------------------------------------
# int8 and low-rank


def quant_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (q int8 like w, scale float32 [rows]); all-zero rows get scale 1."""
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = (amax / 127.0).astype(np.float32)
    scale[~(scale > 0)] = 1.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def lowrank_factors(w: np.ndarray, spec: LowRankSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """Truncated SVD ``w ~ u @ v`` (u [out, k], v [k, in], singular values split evenly), or None
    when the rank would not shrink the layer."""
    out, inn = w.shape
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    if spec.rank is not None:
        k = min(spec.rank, s.size)
    else:
        e = np.cumsum(s ** 2)
        tot = e[-1] if e.size else 0.0
        k = int(np.searchsorted(e, spec.energy * tot - 1e-12 * tot) + 1) if tot > 0 else 1
        k = max(1, min(k, s.size))
    if k * (out + inn) >= out * inn:
        return None
    r = np.sqrt(s[:k])
    return (u[:, :k] * r).astype(np.float32), (r[:, None] * vt[:k]).astype(np.float32)


# ----------------------------------------------------------------------------------------
# encoders: 2-D float32 -> (kind, meta, arrays) following the formats contract


def enc_dense(w):
    return "dense", {}, {"values": np.ascontiguousarray(w, dtype=np.float32)}


def _csr_struct(w):
    nz = w != 0
    indptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(nz.sum(axis=1), out=indptr[1:])
    rows, cols = np.nonzero(nz)
    itype = np.uint16 if w.shape[1] <= 65536 else np.int32
    return indptr, cols.astype(itype), rows, cols


def enc_csr(w):
    indptr, indices, rows, cols = _csr_struct(w)
    return "csr", {}, {"indptr": indptr, "indices": indices, "data": w[rows, cols].astype(np.float32)}


def enc_csr_i8(w):
    indptr, indices, rows, cols = _csr_struct(w)
    q, scale = quant_rows(w)
    return "csr_i8", {}, {"indptr": indptr, "indices": indices, "q": q[rows, cols], "scale": scale}


def _bsr_struct(w, block):
    r, c = block
    p = _pad_to(w, r, c)
    br, bc = p.shape[0] // r, p.shape[1] // c
    blocks = p.reshape(br, r, bc, c).transpose(0, 2, 1, 3)  # [br, bc, r, c]
    nz = (blocks != 0).any(axis=(2, 3))
    indptr = np.zeros(br + 1, dtype=np.int32)
    np.cumsum(nz.sum(axis=1), out=indptr[1:])
    bi, bj = np.nonzero(nz)
    return indptr, bj.astype(np.int32), np.ascontiguousarray(blocks[bi, bj]), p


def enc_bsr(w, block):
    indptr, indices, data, _ = _bsr_struct(w, block)
    return "bsr", {"block": list(block)}, {"indptr": indptr, "indices": indices, "data": data.astype(np.float32)}


def enc_bsr_i8(w, block):
    r, c = block
    q, scale = quant_rows(w)
    rows_p = -(-w.shape[0] // r) * r
    qf = q.astype(np.float32)
    indptr, indices, data, _ = _bsr_struct(qf, block)
    sc = np.ones(rows_p, dtype=np.float32)
    sc[: w.shape[0]] = scale
    # blocks of w that are non-zero but quantize to all-zero still count as stored blocks
    _, _, _, _ = None, None, None, None
    indptr2, indices2, _, _ = _bsr_struct(w, block)
    if not (np.array_equal(indptr, indptr2) and np.array_equal(indices, indices2)):
        indptr, indices = indptr2, indices2
        pq = _pad_to(qf, r, c)
        br, bc = pq.shape[0] // r, pq.shape[1] // c
        blocks = pq.reshape(br, r, bc, c).transpose(0, 2, 1, 3)
        bi = np.repeat(np.arange(br), np.diff(indptr))
        data = np.ascontiguousarray(blocks[bi, indices])
    return "bsr_i8", {"block": list(block)}, {"indptr": indptr, "indices": indices,
                                              "q": data.astype(np.int8), "scale": sc}


def enc_nm(w, n, m):
    out, inn = w.shape
    g = -(-inn // m)
    values = np.zeros((out, g * n), dtype=np.float32)
    offsets = np.zeros((out, g * n), dtype=np.uint8)
    p = np.pad(w, ((0, 0), (0, g * m - inn)))
    grp = p.reshape(out, g, m)
    valid = np.zeros((g, m), dtype=bool)
    for gi in range(g):
        valid[gi, : min(m, inn - gi * m)] = True
    # rank: non-zeros first (by position), then valid zeros, then invalid positions
    key = np.where(grp != 0, 0, np.where(valid[None], 1, 2)) * m + np.arange(m)
    order = np.argsort(key, axis=2, kind="stable")[:, :, :n]
    order.sort(axis=2)
    offsets[:] = order.reshape(out, g * n).astype(np.uint8)
    values[:] = np.take_along_axis(grp, order, axis=2).reshape(out, g * n)
    return "nm", {"n": n, "m": m}, {"values": values, "offsets": offsets}


def enc_dense_i8(w):
    q, scale = quant_rows(w)
    return "dense_i8", {"mode": "symmetric", "granularity": "channel"}, {
        "q": q, "scale": scale, "zero_point": np.zeros(w.shape[0], dtype=np.int32)}


def enc_lowrank(u, v, int8: bool):
    k = u.shape[1]
    if not int8:
        return "lowrank", {"rank": k, "dtype": "float32"}, {"u": u, "v": v}
    qu, su = quant_rows(u)
    qv, sv = quant_rows(v)
    return "lowrank", {"rank": k, "dtype": "int8"}, {"u": qu, "v": qv, "u_scale": su, "v_scale": sv}


def decode(kind: str, meta: dict, arrays: dict, shape: tuple) -> np.ndarray:
    """Plain-numpy decoder of the encodings above (the float32 matrix the runtime computes with)."""
    out, inn = shape
    if kind == "dense":
        return arrays["values"].astype(np.float32).reshape(out, inn)
    if kind == "dense_i8":
        return ((arrays["q"].astype(np.float32) - arrays["zero_point"].astype(np.float32)[:, None])
                * arrays["scale"][:, None])
    if kind in ("csr", "csr_i8"):
        w = np.zeros((out, inn), np.float32)
        rows = np.repeat(np.arange(out), np.diff(arrays["indptr"]))
        vals = arrays["data"] if kind == "csr" else arrays["q"].astype(np.float32) * arrays["scale"][rows]
        w[rows, arrays["indices"].astype(np.int64)] = vals
        return w
    if kind in ("bsr", "bsr_i8"):
        r, c = meta["block"]
        br, bc = -(-out // r), -(-inn // c)
        p = np.zeros((br, bc, r, c), np.float32)
        bi = np.repeat(np.arange(br), np.diff(arrays["indptr"]))
        if kind == "bsr":
            p[bi, arrays["indices"]] = arrays["data"]
        else:
            p[bi, arrays["indices"]] = arrays["q"].astype(np.float32)
        full = p.transpose(0, 2, 1, 3).reshape(br * r, bc * c)
        if kind == "bsr_i8":
            full = full * arrays["scale"][:, None]
        return np.ascontiguousarray(full[:out, :inn])
    if kind == "nm":
        n, m = meta["n"], meta["m"]
        g = -(-inn // m)
        w = np.zeros((out, g * m), np.float32)
        cols = (np.repeat(np.arange(g), n)[None, :] * m + arrays["offsets"].astype(np.int64))
        np.put_along_axis(w, cols, arrays["values"], axis=1)
        return w[:, :inn]
    if kind == "lowrank":
        u, v = arrays["u"].astype(np.float32), arrays["v"].astype(np.float32)
        if meta.get("dtype") == "int8":
            u = u * arrays["u_scale"][:, None]
            v = v * arrays["v_scale"][:, None]
        return u @ v
    raise ConversionError(f"unknown format kind {kind!r}")


# ----------------------------------------------------------------------------------------
# speed model and format choice

# Predicted time relative to dense float32 BLAS (lower is faster): this project's measurements on
# the development machine, 2 threads, all implementations of a case timed interleaved in one run
# (`sparsedge bench kernels --shapes ffn_n128,conv1x1,sq1024_n32,ffn_n1_dram --threads 2`,
# docs/results/kernels.json, session 2). Time ~ K x density, K taken between the shapes (W 3072x768
# x 128 / 1024x1024 x 32 / 256x256 x 3136): CSR K = 1.9 / 2.3-2.5 / 3.0-3.5 -> 2.5 (CSR then pays
# from about 60% sparsity: 1.05x / 0.86x / 0.67x at 50%, 1.70x / 1.56x / 1.11x at 70%); BSR at 90%
# 8x1 K = 1.08 / 0.92 / 1.5, 16x1 1.01 / 1.08 / 1.46, 4x1 1.03 / 1.02 / 1.74, 4x4 1.94 / 1.56 /
# 2.37, 1x16 3.6 / 3.1 / 6.1, 1x4 4.2 / 3.7 / 5.9; N:M 2:4 2.3 / 6.1 / 3.4 (kept at 6.7: `auto`
# does not pick N:M); dense int8 (AMX / VNNI) 0.14 / 0.18 / 0.55 -> 0.3; sparse int8 / sparse
# float32 at 90%: CSR 0.65 / 1.2 / 1.0, BSR 8x1 0.82 / 2.5 / 1.9, 4x4 0.38 / 0.9 / 1.4 -> 0.8
# (only compared with dense int8: the float32 formats are not candidates once int8 is asked for).
# `sparsedge tune` measures on the board.
_CSR_K = 2.5
_BSR_K = {(16, 1): 1.3, (8, 1): 1.3, (4, 1): 1.4, (4, 4): 2.2, (1, 16): 4.5, (1, 4): 5.0}
_INT8 = 0.3
_INT8_SPARSE = 0.8
_NM_K = 6.7


def predict_ratio(kind: str, density: float, block=None, int8=False, shape=None, rank=None) -> float:
    """Predicted run time of a layer relative to dense float32 (1.0)."""
    if kind == "dense":
        return _INT8 if int8 else 1.0
    if kind == "csr":
        r = min(1.5, _CSR_K * density + 0.01)
    elif kind == "bsr":
        r = min(1.5, _BSR_K.get(tuple(block), 2.0) * density + 0.01)
    elif kind == "nm":
        r = min(1.5, _NM_K * density + 0.02)
    elif kind == "lowrank":
        out, inn = shape
        r = 1.15 * rank * (out + inn) / (out * inn) + 0.02
    else:
        r = 1.0
    return r * (_INT8_SPARSE if int8 and kind in ("csr", "bsr") else (0.5 if int8 and kind == "lowrank" else 1.0))


def block_density(w: np.ndarray, block) -> float:
    r, c = block
    p = _pad_to(w, r, c)
    br, bc = p.shape[0] // r, p.shape[1] // c
    nz = (p.reshape(br, r, bc, c) != 0).any(axis=(1, 3))
    return float(nz.mean()) if nz.size else 0.0


def detect_nm(w: np.ndarray):
    for n, m in NM_PATTERNS:
        if w.shape[1] >= m and is_nm(w, n, m):
            return n, m
    return None


@dataclass
class LayerResult:
    """What happened to one layer (also the report's per-layer row)."""
    name: str
    op: str
    tensor: str
    shape: tuple  # 2-D [out, in]
    orig_shape: tuple
    groups: int = 1
    density_in: float = 1.0  # non-zeros in the checkpoint
    density: float = 1.0  # non-zeros stored after pruning
    kind: str = "dense"
    meta: dict = field(default_factory=dict)
    prune: str = ""
    quant: str = ""
    lowrank: str = ""
    skipped: bool = False
    bytes_before: int = 0
    bytes_after: int = 0
    predicted_ratio: float = 1.0  # predicted time / dense float32 time
    weight_rel_err: float = 0.0
    output_rel_err: float | None = None
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["shape"], d["orig_shape"] = list(self.shape), list(self.orig_shape)
        d["predicted_speedup"] = round(1.0 / self.predicted_ratio, 3) if self.predicted_ratio > 0 else None
        return d


def choose_format(w: np.ndarray, plan: LayerPlan, groups: int, res: LayerResult):
    """(kind, block_or_nm or None) for ``w`` (already pruned) under ``plan``."""
    int8 = plan.quant is not None
    d = float(np.count_nonzero(w)) / w.size if w.size else 1.0
    f = plan.fmt
    if f.kind == "dense" or groups > 1 and f.kind == "auto":
        if groups > 1 and d < 0.5 and f.kind == "auto":
            res.notes.append("grouped/depthwise conv kept dense (no sparse grouped kernel)")
        return "dense", None, predict_ratio("dense", d, int8=int8)
    if f.kind == "csr":
        return "csr", None, predict_ratio("csr", d, int8=int8)
    if f.kind == "bsr":
        return "bsr", f.block, predict_ratio("bsr", block_density(w, f.block), f.block, int8)
    if f.kind == "nm":
        nm = (plan.prune.n, plan.prune.m) if plan.prune and plan.prune.kind == "nm" else detect_nm(w)
        if nm is None or not is_nm(w, *nm):
            raise ConversionError("--format nm needs N:M-sparse weights (use --prune nm:2:4)", tensor=res.tensor)
        return "nm", nm, predict_ratio("nm", nm[0] / nm[1], int8=False)
    # auto: candidates by predicted ratio
    cands = [("dense", None, predict_ratio("dense", d, int8=int8))]
    if d < 0.6:
        cands.append(("csr", None, predict_ratio("csr", d, int8=int8)))
        blocks = [plan.prune.block] if plan.prune and plan.prune.kind == "block" and \
            tuple(plan.prune.block) in BSR_BLOCKS else []
        blocks += [(4, 1), (8, 1)]
        for b in dict.fromkeys(tuple(x) for x in blocks):
            cands.append(("bsr", b, predict_ratio("bsr", block_density(w, b), b, int8)))
        if not int8:
            nm = (plan.prune.n, plan.prune.m) if plan.prune and plan.prune.kind == "nm" else detect_nm(w)
            if nm is not None and is_nm(w, *nm):
                cands.append(("nm", nm, predict_ratio("nm", nm[0] / nm[1])))
    # within 10% of the fastest prediction (the model's accuracy), the compressed format wins:
    # the file is smaller and the weights stream fewer bytes on a board
    best = min(c[2] for c in cands)
    return min(cands, key=lambda c: (c[2] > 1.1 * best, c[0] == "dense", c[2]))


def encode(kind: str, extra, w: np.ndarray, int8: bool):
    """(kind, meta, arrays) for the chosen format; int8 variants when ``int8``."""
    if kind == "dense":
        return enc_dense_i8(w) if int8 else enc_dense(w)
    if kind == "csr":
        return enc_csr_i8(w) if int8 else enc_csr(w)
    if kind == "bsr":
        return enc_bsr_i8(w, extra) if int8 else enc_bsr(w, extra)
    if kind == "nm":
        return enc_nm(w, *extra)
    raise ConversionError(f"unknown format {kind!r}")


def weight_layers(graph, tensors) -> list:
    """[(node, weight tensor name)] for every conv2d/linear whose weight is a stored tensor."""
    out = []
    for nd in graph.nodes:
        if nd.op in ("linear", "conv2d") and len(nd.inputs) > 1 and nd.inputs[1] in tensors:
            out.append(nd)
    return out


def compress(graph, tensors: dict, plans: dict, progress=None) -> tuple[dict, list]:
    """Compress every weight layer of ``graph``.

    ``tensors``: {name: float32 ndarray} (conv weights 4-D). ``plans``: {layer name: LayerPlan}.
    Returns ``(encoded, results)``: ``encoded`` {tensor name: (kind, meta, arrays, shape2d, orig_shape,
    dense_hat)} for the weight tensors (``dense_hat`` is the float32 2-D matrix the format holds),
    and one ``LayerResult`` per layer, in graph order.
    """
    layers = weight_layers(graph, tensors)
    results, encoded = [], {}
    w2d = {}
    for nd in layers:
        w = tensors[nd.inputs[1]]
        w2d[nd.name] = np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float32)
    # global pruning first (one threshold over all layers that ask for it)
    globals_ = [nd for nd in layers if (p := plans[nd.name]).prune and p.prune.kind == "global" and not p.skip]
    pruned = {}
    if globals_:
        sp = plans[globals_[0].name].prune.sparsity
        if any(plans[nd.name].prune.sparsity != sp for nd in globals_):
            raise ConversionError("global pruning needs one sparsity for all its layers")
        for nd, w in zip(globals_, prune_global([w2d[nd.name] for nd in globals_], sp)):
            pruned[nd.name] = w
    for i, nd in enumerate(layers):
        plan = plans[nd.name]
        tname = nd.inputs[1]
        w0 = w2d[nd.name]
        orig = tuple(tensors[tname].shape)
        groups = int(nd.attrs.get("groups", 1)) if nd.op == "conv2d" else 1
        res = LayerResult(nd.name, nd.op, tname, tuple(w0.shape), orig, groups,
                          density_in=float(np.count_nonzero(w0)) / max(w0.size, 1),
                          bytes_before=int(w0.size * 4))
        if plan.skip:
            res.skipped = True
            kind, meta, arrays = enc_dense(w0)
            hat = w0
            res.predicted_ratio = 1.0
        else:
            w = w0
            p = plan.prune
            if p is not None:
                res.prune = str(p)
                if p.kind == "unstructured":
                    w = prune_unstructured(w0, p.sparsity)
                elif p.kind == "global":
                    w = pruned[nd.name]
                elif p.kind == "block":
                    w = prune_block(w0, p.block, p.sparsity)
                elif p.kind == "nm":
                    w = prune_nm(w0, p.n, p.m)
            int8 = plan.quant is not None
            res.quant = str(plan.quant) if int8 else ""
            lr = None
            if plan.lowrank is not None:
                if p is not None:
                    raise ConversionError("pruning and low-rank on the same layer are not supported",
                                          tensor=tname)
                lr = lowrank_factors(w0, plan.lowrank)
                if lr is None:
                    res.notes.append(f"low-rank {plan.lowrank} would not shrink this layer; not applied")
            if lr is not None:
                u, v = lr
                res.lowrank = f"rank:{u.shape[1]}"
                kind, meta, arrays = enc_lowrank(u, v, int8)
                res.predicted_ratio = predict_ratio("lowrank", 1.0, int8=int8, shape=w0.shape, rank=u.shape[1])
            else:
                kind0, extra, ratio = choose_format(w, plan, groups, res)
                if int8 and kind0 == "nm":
                    res.notes.append("no int8 N:M format: kept float32 values")
                kind, meta, arrays = encode(kind0, extra, w, int8 and kind0 != "nm")
                res.predicted_ratio = ratio
            hat = decode(kind, meta, arrays, w0.shape)
        res.kind, res.meta = kind, meta
        res.density = float(np.count_nonzero(hat)) / max(hat.size, 1) if kind != "lowrank" else 1.0
        res.bytes_after = int(sum(a.nbytes for a in arrays.values()))
        nrm = float(np.linalg.norm(w0))
        res.weight_rel_err = float(np.linalg.norm(hat - w0) / nrm) if nrm > 0 else float(np.abs(hat).max(initial=0))
        encoded[tname] = (kind, meta, arrays, tuple(w0.shape), orig, hat)
        results.append(res)
        if progress is not None:
            progress.update(i + 1)
    return encoded, results


# ----------------------------------------------------------------------------------------
# static activation calibration


def act_quant_params(samples: list, method: str = "minmax", percentile: float = 99.99) -> dict:
    """Affine int8 parameters from activation samples: {"scale": float, "zero_point": int}.

    real = scale * (q - zero_point), q in [-128, 127]; the range always includes 0.
    """
    x = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in samples]) if samples else np.zeros(1)
    if method == "percentile":
        lo = float(np.percentile(x, 100.0 - percentile))
        hi = float(np.percentile(x, percentile))
    else:
        lo, hi = float(x.min()), float(x.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ConversionError("calibration produced non-finite activations")
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
    return {"scale": float(scale), "zero_point": zp}


def fold_torch_prune(sd: dict) -> tuple[dict, list]:
    """Fold ``torch.nn.utils.prune`` pairs: ``X_orig * X_mask`` -> ``X``. Returns (state_dict, folded names)."""
    out, folded = {}, []
    for k, v in sd.items():
        if k.endswith("_orig"):
            base = k[: -len("_orig")]
            mk = base + "_mask"
            if mk in sd:
                mask = np.asarray(sd[mk])
                out[base] = (np.asarray(v, dtype=np.float32) * (mask != 0)).astype(np.float32)
                folded.append(base)
                continue
        if k.endswith("_mask") and (k[: -len("_mask")] + "_orig") in sd:
            continue
        out[k] = v
    return out, folded
