"""Readers for the pre-1.6 torch.save formats, without torch and without running code.

1. Raw pickle stream (torch 0.4 - 1.5, and ``torch.save(..., _use_new_zipfile_serialization=False)``):
   five pickles back to back -- magic number ``0x1950a86a20f9469cfc6c``, protocol version
   ``1001``, sys_info ``{'little_endian': ...}``, the object (tensors refer to storages by
   persistent id ``('storage', torch.FloatStorage, key, location, numel, view_metadata)``),
   the sorted list of storage keys -- then for each key an int64 element count followed by the
   raw storage bytes. Storages are zero-copy views on an mmap of the file.
2. Tar archive (torch < 0.4): members ``storages`` (count, then per storage a pickled
   ``(key, location, storage_type)``, an int64 element count and the bytes; then pickled views
   ``[(view_key, root_key, offset, numel)]``), ``tensors`` (count, then per tensor a pickled
   ``(key, storage_key, tensor_type)``, int32 ndim, 4 pad bytes, int64 sizes, int64 strides,
   int64 storage offset) and ``pickle`` (the object; persistent ids are tensor / storage keys).
   Members are read in place (never extracted).

Every pickle goes through :func:`~.unpickler.scan_pickle` and the restricted unpickler.
"""
from __future__ import annotations

import mmap
import os
import struct
import tarfile

import numpy as np

from ..errors import CheckpointError
from .unpickler import (MAX_NDIM, MAX_PICKLE_BYTES, StorageRef, StorageTable, check_key,
                        one_line, restricted_loads, scan_pickle, storage_type_dtype, _make_tensor)

__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "read_legacy_pickle", "read_legacy_tar",
           "is_legacy_pickle", "is_tar"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def is_legacy_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def _map(path):
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError("empty file", file=path)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None


class _Cursor:
    """Sequential reader over ``buf[start:end]`` that parses pickles and fixed-size fields."""

    def __init__(self, buf, start: int, end: int, source, pickle_cap: int):
        self.buf, self.pos, self.end, self.source, self.cap = buf, start, end, source, pickle_cap

    def pickle(self, resolve=None):
        end = scan_pickle(self.buf, self.pos, limit=self.cap, end=self.end, source=self.source)
        obj = restricted_loads(self.buf[self.pos:end], resolve=resolve, source=self.source, limit=self.cap)
        self.pos = end
        return obj

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.end:
            raise CheckpointError("truncated (file ends inside a header)", file=self.source)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def take(self, nbytes: int) -> tuple[int, int]:
        if nbytes < 0 or self.pos + nbytes > self.end:
            raise CheckpointError(f"storage of {nbytes} bytes runs past the end of the file (truncated or "
                                  "size mismatch)", file=self.source)
        s = self.pos
        self.pos += nbytes
        return s, self.pos


def _check_numel(n, what, source):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CheckpointError(f"{what}: bad element count {one_line(n)}", file=source)
    return n


def read_legacy_pickle(path, *, size_cap: int | None = None, pickle_cap: int = MAX_PICKLE_BYTES, mm=None):
    """Unpickle a raw-pickle legacy checkpoint. Returns ``(obj, table)`` like
    :func:`~.torchzip.read_torch_zip`."""
    mm = mm if mm is not None else _map(path)
    cur = _Cursor(mm, 0, len(mm), path, pickle_cap)
    magic = cur.pickle()
    if magic != MAGIC_NUMBER:
        raise CheckpointError("not a torch checkpoint (bad magic number)", file=path)
    proto = cur.pickle()
    if proto != PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {one_line(proto)}", file=path)
    sys_info = cur.pickle()
    little = True
    if isinstance(sys_info, dict):
        little = bool(sys_info.get("little_endian", True))
    roots: dict[str, StorageRef] = {}

    def resolve(pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
                raise CheckpointError(f"refused pickled module {one_line(pid[1])} (a whole nn.Module was saved; "
                                      "save model.state_dict() instead)", file=path)
            raise CheckpointError(f"unexpected persistent id {one_line(pid)}", file=path)
        if len(pid) == 5:
            pid = pid + (None,)
        if len(pid) != 6:
            raise CheckpointError(f"unexpected persistent id {one_line(pid)}", file=path)
        _, stype, key, location, numel, view = pid
        dt = storage_type_dtype(stype, path)
        key = check_key(key, path)
        numel = _check_numel(numel, f"storage {key!r}", path)
        if not isinstance(location, (str, bytes)):
            raise CheckpointError("storage location is not a string", file=path)
        root = roots.get(key)
        if root is None:
            root = roots[key] = StorageRef(key, dt, numel * dt.itemsize)
        elif root.nbytes != numel * dt.itemsize:
            raise CheckpointError(f"storage {key!r} declared with two sizes", file=path)
        if view is None:
            return StorageRef(key, dt, root.nbytes) if dt is not root.dtype else root
        if not isinstance(view, tuple) or len(view) != 3:
            raise CheckpointError(f"bad storage view {one_line(view)}", file=path)
        _vkey, off, vsize = view
        off = _check_numel(off, "view offset", path)
        vsize = _check_numel(vsize, "view size", path)
        if (off + vsize) * dt.itemsize > root.nbytes:
            raise CheckpointError(f"storage view past the end of storage {key!r}", file=path)
        return StorageRef(key, dt, vsize * dt.itemsize, off * dt.itemsize)

    obj = cur.pickle(resolve)
    keys = cur.pickle()
    if not isinstance(keys, list):
        raise CheckpointError("storage key list is not a list", file=path)
    spans: dict[str, tuple[int, int]] = {}
    for k in keys:
        k = check_key(k, path)
        root = roots.get(k)
        if root is None or k in spans:
            raise CheckpointError(f"storage key {k!r} not referenced by the pickle (or repeated)", file=path)
        (n,) = cur.unpack("<q")
        isz = root.dtype.itemsize
        if n < 0 or n * isz != root.nbytes:
            raise CheckpointError(f"storage {k!r} size mismatch: pickle declares {root.nbytes} bytes, data holds "
                                  f"{n} x {isz}", file=path)
        spans[k] = cur.take(n * isz)
    missing = set(roots) - set(spans)
    if missing:
        raise CheckpointError(f"storages {sorted(missing)[:5]} have no data (truncated?)", file=path)

    def loader(key):
        s, e = spans[key]
        return np.frombuffer(mm, dtype=np.uint8, count=e - s, offset=s)

    return obj, StorageTable(loader, source=path, swap=not little)


def read_legacy_tar(path, *, size_cap: int | None = None, pickle_cap: int = MAX_PICKLE_BYTES, mm=None):
    """Unpickle a tar-format (torch < 0.4) checkpoint. Returns ``(obj, table)``."""
    mm = mm if mm is not None else _map(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {}
            for m in tar.getmembers():
                if m.name in ("storages", "tensors", "pickle"):
                    if m.name in members or not m.isreg():
                        raise CheckpointError(f"tar member {m.name!r} repeated or not a regular file", file=path)
                    members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not a readable tar archive: {one_line(str(e))}", file=path) from None
    for need in ("storages", "tensors", "pickle"):
        if need not in members:
            raise CheckpointError(f"tar checkpoint lacks the {need!r} member", file=path)
        off, size = members[need]
        if off < 0 or off + size > len(mm):
            raise CheckpointError(f"tar member {need!r} extends past the end of the file", file=path)

    def cursor(name):
        off, size = members[name]
        return _Cursor(mm, off, off + size, path, pickle_cap)

    objs: dict[int, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    cur = cursor("storages")
    n_storages = _check_numel(cur.pickle(), "storage count", path)
    for _ in range(n_storages):
        rec = cur.pickle()
        if not isinstance(rec, tuple) or len(rec) != 3:
            raise CheckpointError(f"bad storage record {one_line(rec)}", file=path)
        key, _loc, stype = rec
        dt = storage_type_dtype(stype, path)
        key = check_key(key, path)
        (n,) = cur.unpack("<q")
        _check_numel(n, f"storage {key!r}", path)
        spans[key] = cur.take(n * dt.itemsize)
        objs[_int_key(key, path)] = StorageRef(key, dt, n * dt.itemsize)
    views = cur.pickle()
    if not isinstance(views, list):
        raise CheckpointError("storage view list is not a list", file=path)
    for v in views:
        if not isinstance(v, tuple) or len(v) != 4:
            raise CheckpointError(f"bad storage view {one_line(v)}", file=path)
        vkey, rkey, off, numel = v
        root = objs.get(_int_key(check_key(rkey, path), path))
        if not isinstance(root, StorageRef):
            raise CheckpointError(f"storage view of unknown storage {one_line(rkey)}", file=path)
        off, numel = _check_numel(off, "view offset", path), _check_numel(numel, "view size", path)
        isz = root.dtype.itemsize
        if (off + numel) * isz > root.nbytes:
            raise CheckpointError("storage view past the end of its storage", file=path)
        objs[_int_key(check_key(vkey, path), path)] = StorageRef(root.key, root.dtype, numel * isz, off * isz)

    cur = cursor("tensors")
    n_tensors = _check_numel(cur.pickle(), "tensor count", path)
    for _ in range(n_tensors):
        rec = cur.pickle()
        if not isinstance(rec, tuple) or len(rec) != 3:
            raise CheckpointError(f"bad tensor record {one_line(rec)}", file=path)
        tkey, skey, _ttype = rec
        st = objs.get(_int_key(check_key(skey, path), path))
        if not isinstance(st, StorageRef):
            raise CheckpointError(f"tensor of unknown storage {one_line(skey)}", file=path)
        (ndim,) = cur.unpack("<i")
        cur.unpack("<4x")
        if ndim < 0 or ndim > MAX_NDIM:
            raise CheckpointError(f"tensor with {ndim} dims", file=path)
        size = cur.unpack(f"<{ndim}q")
        stride = cur.unpack(f"<{ndim}q")
        (soff,) = cur.unpack("<q")
        objs[_int_key(check_key(tkey, path), path)] = _make_tensor(st, soff, size, stride)

    def resolve(pid):
        if isinstance(pid, tuple):
            raise CheckpointError(f"refused pickled module {one_line(pid[:1])} (a whole nn.Module was saved; "
                                  "save model.state_dict() instead)", file=path)
        o = objs.get(_int_key(check_key(pid, path), path))
        if o is None:
            raise CheckpointError(f"unknown persistent id {one_line(pid)}", file=path)
        return o

    obj = cursor("pickle").pickle(resolve)

    def loader(key):
        s, e = spans[key]
        return np.frombuffer(mm, dtype=np.uint8, count=e - s, offset=s)

    return obj, StorageTable(loader, source=path)


def _int_key(key: str, source) -> int:
    try:
        return int(key)
    except ValueError:
        raise CheckpointError(f"non-numeric key {one_line(key)} in a tar checkpoint", file=source) from None

