"""Helpers shared by the formats / model-file / hostile-file tests."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from sparsedge.formats import BSR, BSRI8, CSR, CSRI8, NM, Dense, DenseI8, LowRank
from sparsedge.formats.graph import Graph, Node, ValueInfo
from sparsedge.formats.modelfile import ALIGN, PREAMBLE


def sparse_matrix(rng, out, inn, density, empty_rows=False, dtype=np.float32):
    """Random [out, in] float32 with about ``density`` non-zeros (values never 0)."""
    w = rng.standard_normal((out, inn)).astype(dtype)
    w[w == 0] = 1.0
    w[rng.random((out, inn)) >= density] = 0
    if empty_rows and out > 1:
        w[rng.random(out) < 0.3] = 0
    return w


def nm_matrix(rng, out, inn, n, m, fill=1.0):
    """Random N:M-compliant [out, in]: each group of m input columns keeps <= n non-zeros."""
    w = rng.standard_normal((out, inn)).astype(np.float32)
    w[w == 0] = 1.0
    mask = np.zeros((out, inn), dtype=bool)
    for g0 in range(0, inn, m):
        width = min(m, inn - g0)
        for i in range(out):
            k = min(n, width) if rng.random() < fill else rng.integers(0, min(n, width) + 1)
            mask[i, g0 + rng.choice(width, size=k, replace=False)] = True
    return np.where(mask, w, 0).astype(np.float32)


def one_of_each(rng=None, out=13, inn=22):
    """{name: format} with every kind and variant, from one 70%-sparse matrix (plus a 2:4 one)."""
    rng = rng or np.random.default_rng(7)
    w = sparse_matrix(rng, out, inn, 0.3)
    wnm = nm_matrix(rng, out, inn, 2, 4)
    conv = sparse_matrix(rng, 8, 3 * 3 * 3, 0.5).reshape(8, 3, 3, 3)
    return {
        "dense_f32": Dense.from_dense(w), "dense_f16": Dense.from_dense(w, dtype="float16"),
        "dense_bf16": Dense.from_dense(w, dtype="bfloat16"),
        "csr": CSR.from_dense(w), "csr_u16": CSR.from_dense(w, index_dtype="uint16"),
        "bsr_4x1": BSR.from_dense(w, block=(4, 1)), "bsr_1x16": BSR.from_dense(w, block=(1, 16)),
        "bsr_4x4": BSR.from_dense(w, block=(4, 4)), "nm_2_4": NM.from_dense(wnm, n=2, m=4),
        "nm_4_8": NM.from_dense(wnm, n=4, m=8),
        "i8_sym_ch": DenseI8.from_dense(w), "i8_aff_t": DenseI8.from_dense(w, mode="affine", granularity="tensor"),
        "csr_i8": CSRI8.from_dense(w), "bsr_i8": BSRI8.from_dense(w, block=(8, 1)),
        "lr_f32": LowRank.from_dense(w, rank=5), "lr_i8": LowRank.from_dense(w, rank=5, dtype="int8"),
        "conv_csr": CSR.from_dense(conv),
        "bias": Dense.from_dense(np.arange(out, dtype=np.float32)),
        "ids": Dense.from_dense(np.arange(6, dtype=np.int64).reshape(1, 6)),
        "flag": Dense.from_dense(np.array([True, False])),
        "empty_csr": CSR.from_dense(np.zeros((3, 5), np.float32)),
    }


def linear_graph(tensors, inn=22, act_quant=None):
    """A graph applying every 2-D [*, inn] weight of ``tensors`` to input x with bias ``bias``."""
    nodes, outs = [], []
    for name, t in tensors.items():
        if len(t.shape) == 2 and t.shape[1] == inn and name != "ids":
            nodes.append(Node("linear", f"lin_{name}", ["x", name, "bias" if t.shape[0] == 13 else ""],
                              [f"y_{name}"], {"activation": "relu"}))
            outs.append(f"y_{name}")
    nodes.append(Node("concat", "cat", outs, ["y"], {"axis": -1}))
    return Graph([ValueInfo("x", "float32", ["batch", inn])], [ValueInfo("y", "float32", ["batch", "n"])], nodes,
                 act_quant or {"x": {"scale": 0.05, "zero_point": 3}})


def split(blob: bytes):
    """(preamble fields, header dict, data section bytes) of a model file image."""
    f = PREAMBLE.unpack(blob[:PREAMBLE.size])
    hlen = f[4]
    header = json.loads(blob[PREAMBLE.size:PREAMBLE.size + hlen])
    d0 = -(-(PREAMBLE.size + hlen) // ALIGN) * ALIGN
    return f, header, blob[d0:]


def rebuild(header: dict, data: bytes, *, major=None, minor=None, flags=0, raw_header: bytes | None = None,
            fix_size=True) -> bytes:
    """A model file image from a header dict and a data section, with consistent CRCs and sizes."""
    from sparsedge.formats.modelfile import MAJOR, MINOR, MAGIC

    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    d0 = -(-(PREAMBLE.size + len(h)) // ALIGN) * ALIGN
    size = d0 + len(data)
    pre = PREAMBLE.pack(MAGIC, MAJOR if major is None else major, MINOR if minor is None else minor, flags, len(h),
                        size if fix_size else size + 1, zlib.crc32(h), bytes(24), 0)
    pre = pre[:60] + struct.pack("<I", zlib.crc32(pre[:60]))
    return pre + h + bytes(d0 - PREAMBLE.size - len(h)) + data


def fix_buffer_crcs(header: dict, data: bytes) -> None:
    """Recompute every array's crc32 in ``header`` from ``data`` (in place)."""
    for t in header["tensors"]:
        for a in t["arrays"].values():
            off, nb = a["offset"], a["nbytes"]
            if isinstance(off, int) and isinstance(nb, int) and 0 <= off and off + nb <= len(data):
                a["crc32"] = zlib.crc32(data[off:off + nb]) if nb else 0
