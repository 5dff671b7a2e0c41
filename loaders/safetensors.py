"""safetensors reader (single files and sharded checkpoints with an index json), numpy only.

File layout (the safetensors spec): an unsigned little-endian 64-bit header length N, N bytes
of UTF-8 JSON (may be padded with spaces), then the data buffer. The JSON maps each tensor
name to ``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`` (offsets relative
to the start of the data buffer, row-major little-endian data); the optional ``__metadata__``
maps strings to strings.

Checks: N <= 100 MB and inside the file; JSON object without duplicate keys; known dtype;
shape of non-negative ints; ``end - begin == prod(shape) * itemsize``; offsets inside the
buffer; tensors do not overlap. Arrays are zero-copy views on an mmap of the file (read-only);
F16 / BF16 / F8_E4M3 / F8_E5M2 are widened to float32.

Sharded checkpoints: ``model.safetensors.index.json`` is ``{"metadata": {...},
"weight_map": {tensor name: shard file name}}``; shard names must be plain file names in the
index's folder. Every mapped name must be in its shard; a name in two shards is refused.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from ..errors import CheckpointError
from .unpickler import TORCH_DTYPES, MAX_NDIM, TorchDType, one_line, widen

__all__ = ["read_safetensors", "read_safetensors_header", "read_index", "load_sharded", "is_safetensors",
           "SAFETENSORS_DTYPES", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: dict[str, TorchDType] = {
    "BOOL": TORCH_DTYPES["bool"], "U8": TORCH_DTYPES["uint8"], "I8": TORCH_DTYPES["int8"],
    "I16": TORCH_DTYPES["int16"], "U16": TORCH_DTYPES["uint16"], "I32": TORCH_DTYPES["int32"],
    "U32": TORCH_DTYPES["uint32"], "I64": TORCH_DTYPES["int64"], "U64": TORCH_DTYPES["uint64"],
    "F16": TORCH_DTYPES["float16"], "BF16": TORCH_DTYPES["bfloat16"], "F32": TORCH_DTYPES["float32"],
    "F64": TORCH_DTYPES["float64"], "C64": TORCH_DTYPES["complex64"],
    "F8_E4M3": TORCH_DTYPES["float8_e4m3fn"], "F8_E5M2": TORCH_DTYPES["float8_e5m2"],
    "F8_E8M0": TORCH_DTYPES["float8_e8m0fnu"],
}


def is_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack_from("<Q", head, 0)
    return 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"


def _no_dupes(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"duplicate JSON key {one_line(k)}")
        d[k] = v
    return d


def _json(text: bytes | str, path, what):
    try:
        return json.loads(text, object_pairs_hook=_no_dupes)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e.detail}", file=path) from None
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {one_line(str(e))}", file=path) from None


def _nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path, mm) -> tuple[dict, dict, int]:
    """Parse and check the header of an mmapped safetensors file:
    ``(entries {name: (TorchDType, shape, begin, end)}, metadata, data_start)``."""
    size = len(mm)
    if size < 8:
        raise CheckpointError("too short for a safetensors file", file=path)
    (n,) = struct.unpack_from("<Q", mm, 0)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes", file=path)
    if 8 + n > size:
        raise CheckpointError(f"header length {n} runs past the end of the file ({size} bytes)", file=path)
    header = _json(bytes(mm[8: 8 + n]), path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", file=path)
    data_start = 8 + n
    buf_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError("__metadata__ must map strings to strings", file=path)
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError("entry is not an object", file=path, tensor=name)
        dname, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dt = SAFETENSORS_DTYPES.get(dname) if isinstance(dname, str) else None
        if dt is None:
            raise CheckpointError(f"unsupported dtype {one_line(dname)}", file=path, tensor=name, field="dtype")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_nonneg_int(s) for s in shape):
            raise CheckpointError(f"bad shape {one_line(shape)}", file=path, tensor=name, field="shape")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_nonneg_int(o) for o in offs)
                or offs[0] > offs[1]):
            raise CheckpointError(f"bad data_offsets {one_line(offs)}", file=path, tensor=name,
                                  field="data_offsets")
        numel = 1
        for s in shape:
            numel *= s
        b, e = offs
        if e - b != numel * dt.itemsize:
            raise CheckpointError(f"data_offsets span {e - b} bytes, shape {shape} of {dname} needs "
                                  f"{numel * dt.itemsize}", file=path, tensor=name, field="data_offsets")
        if e > buf_len:
            raise CheckpointError(f"data_offsets end {e} past the data buffer ({buf_len} bytes)",
                                  file=path, tensor=name, field="data_offsets")
        entries[name] = (dt, tuple(shape), b, e)
    spans = sorted((b, e, nm) for nm, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"tensors {n0!r} and {n1!r} overlap in the data buffer", file=path)
    return entries, meta, data_start


def _map(path):
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError("empty file", file=path)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None


def read_safetensors(path, *, mm=None, names=None) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file (or only ``names``) as numpy arrays, header order.
    Zero-copy read-only views except widened (float16/bfloat16/float8 -> float32) ones."""
    mm = mm if mm is not None else _map(path)
    entries, _meta, start = read_safetensors_header(path, mm)
    out = {}
    for name, (dt, shape, b, e) in entries.items():
        if names is not None and name not in names:
            continue
        n = (e - b) // dt.itemsize
        raw = np.frombuffer(mm, dtype=dt.storage, count=n, offset=start + b) if n else np.zeros(0, dt.storage)
        out[name] = widen(raw, dt).reshape(shape)
    return out


def read_index(path) -> tuple[dict[str, str], str]:
    """Parse a ``*.index.json``: ``({tensor name: shard file name}, folder)``."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None
    if len(text) > MAX_HEADER_BYTES:
        raise CheckpointError("index json larger than 100 MB", file=path)
    idx = _json(text, path, "index")
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError("index has no 'weight_map' object", file=path, field="weight_map")
    for name, shard in wm.items():
        if (not isinstance(shard, str) or not shard or shard in (".", "..") or "/" in shard or "\\" in shard
                or "\x00" in shard):
            raise CheckpointError(f"shard name {one_line(shard)} is not a plain file name", file=path,
                                  tensor=name, field="weight_map")
    return wm, os.path.dirname(os.path.abspath(path))


def load_sharded(path, read_shard) -> dict[str, np.ndarray]:
    """Tensors of a sharded checkpoint whose index is ``path``. ``read_shard(file) -> dict``
    reads one shard. Names come in weight_map order; extra tensors in shards are kept after."""
    wm, folder = read_index(path)
    shards: dict[str, list[str]] = {}
    for name, shard in wm.items():
        shards.setdefault(shard, []).append(name)
    out: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for shard in shards:
        f = os.path.join(folder, shard)
        if not os.path.isfile(f):
            raise CheckpointError(f"shard {shard!r} listed in the index is missing", file=path)
        got = read_shard(f)
        for name in shards[shard]:
            if name not in got:
                raise CheckpointError(f"index maps it to {shard!r}, which does not hold it", file=path, tensor=name)
        for name, arr in got.items():
            if name in owner:
                raise CheckpointError(f"in two shards ({owner[name]!r} and {shard!r})", file=path, tensor=name)
            owner[name] = shard
            out[name] = arr
    ordered = {n: out[n] for n in wm}
    ordered.update((n, a) for n, a in out.items() if n not in ordered)
    return ordered
