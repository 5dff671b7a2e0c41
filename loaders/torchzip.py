"""Reader for ``torch.save`` zip checkpoints (torch >= 1.6), without torch and without running code.

Layout (as written by torch): one top-level folder of any name (``archive/``, the file stem...)
holding ``data.pkl`` (the pickled object; tensors refer to storages by persistent id
``('storage', torch.FloatStorage, '0', 'cpu', numel)``), ``data/<key>`` (raw little-endian
storage bytes, usually stored uncompressed and 64-byte aligned), ``byteorder`` (optional,
``little`` / ``big``) and bookkeeping records (``version``, ``.format_version`` ...).

* Stored records are memory-mapped: arrays are ``np.frombuffer`` views on an ``mmap`` (zero
  copy; read-only; the mmap stays alive as long as any array's ``.base`` chain refers to it).
* Deflated records are decompressed with a bound (stored ones are mapped, so only the file
  size bounds them): a record whose declared size exceeds ``size_cap``, whose output would exceed its declared size, whose total with the other
  records exceeds ``size_cap``, or whose CRC does not match, is refused (zip-bomb defence;
  nothing is decompressed past ``declared + 1`` bytes). Other compression methods are refused.
* Entry names with ``..``, absolute paths, backslashes or NULs, duplicate names, and local
  headers that disagree with the central directory are refused.
* TorchScript archives (``constants.pkl``, ``code/``) and torch.export ``.pt2`` archives
  (``archive_format``) are recognised and refused with a message saying what they are.
"""
from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib

import numpy as np

from ..errors import CheckpointError
from .unpickler import (MAX_PICKLE_BYTES, StorageRef, StorageTable, check_key, one_line,
                        restricted_loads, storage_type_dtype)

__all__ = ["ZipCheckpoint", "read_torch_zip", "is_zip", "DEFAULT_SIZE_CAP"]

DEFAULT_SIZE_CAP = 8 << 30  # bytes: largest decompressed record / total / tensor accepted by default
_CHUNK = 1 << 20
_MAX_ENTRIES = 1 << 20


def is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _map(path):
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError("empty file", file=path)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None


class ZipCheckpoint:
    """An open zip archive checked for hostile structure; records are read from an mmap.

    ``prefix`` is the top-level folder holding ``data.pkl``; ``record(name)`` returns a 1-D
    uint8 array of a record's (decompressed) bytes, a zero-copy view when it is stored."""

    def __init__(self, path, *, size_cap: int = DEFAULT_SIZE_CAP, mm=None):
        self.path, self.size_cap = path, size_cap
        self.mm = mm if mm is not None else _map(path)
        self.decompressed = 0
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
                NotImplementedError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"not a readable zip archive: {one_line(str(e))}", file=path) from None
        if len(infos) > _MAX_ENTRIES:
            raise CheckpointError(f"zip holds {len(infos)} entries (max {_MAX_ENTRIES})", file=path)
        self.entries: dict[str, zipfile.ZipInfo] = {}
        for zi in infos:
            name = zi.filename
            parts = name.split("/")
            if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts
                    or (len(name) > 1 and name[1] == ":")):
                raise CheckpointError(f"refused zip entry name {one_line(name)} (unsafe path)", file=path)
            if name in self.entries:
                raise CheckpointError(f"duplicate zip entry {one_line(name)}", file=path)
            self.entries[name] = zi
        pkls = [n for n in self.entries if n.count("/") == 1 and n.endswith("/data.pkl")]
        tops = {n.split("/", 1)[0] for n in self.entries if "/" in n}
        for t in tops:
            if f"{t}/archive_format" in self.entries or str(path).endswith(".pt2"):
                raise CheckpointError("torch.export .pt2 archive: its loader runs torch.load and may "
                                      "execute code; accept it only with --trusted", file=path)
            if f"{t}/constants.pkl" in self.entries or any(n.startswith(f"{t}/code/") for n in self.entries):
                raise CheckpointError("TorchScript archive (torch.jit.save) holds code, not a state_dict: "
                                      "save model.state_dict() with torch.save instead", file=path)
        if len(pkls) != 1:
            what = "no" if not pkls else f"{len(pkls)}"
            raise CheckpointError(f"{what} '<folder>/data.pkl' record in the zip (not a torch.save checkpoint?)",
                                  file=path)
        self.prefix = pkls[0][: -len("data.pkl")]

    # ------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.prefix + name in self.entries

    def _data_span(self, zi: zipfile.ZipInfo) -> tuple[int, int]:
        mm, off = self.mm, zi.header_offset
        if off < 0 or off + 30 > len(mm):
            raise CheckpointError(f"zip entry {one_line(zi.filename)} has its header outside the file", file=self.path)
        sig, _v, flag, method, _t, _d, _crc, _cs, _us, nlen, elen = struct.unpack_from("<4sHHHHHIIIHH", mm, off)
        if sig != b"PK\x03\x04":
            raise CheckpointError(f"zip entry {one_line(zi.filename)}: bad local header", file=self.path)
        if method != zi.compress_type:
            raise CheckpointError(f"zip entry {one_line(zi.filename)}: local header disagrees with the "
                                  "central directory", file=self.path)
        start = off + 30 + nlen + elen
        enc = "utf-8" if flag & 0x800 else "cp437"
        try:
            lname = bytes(mm[off + 30: off + 30 + nlen]).decode(enc)
        except UnicodeDecodeError:
            lname = None
        if lname != zi.orig_filename:
            raise CheckpointError(f"zip entry {one_line(zi.filename)}: local name {one_line(lname)} differs "
                                  "from the central directory", file=self.path)
        end = start + zi.compress_size
        if end > len(mm):
            raise CheckpointError(f"zip entry {one_line(zi.filename)} extends past the end of the file "
                                  "(truncated?)", file=self.path)
        return start, end

    def record(self, name: str, *, limit: int | None = None) -> np.ndarray:
        """Bytes of record ``prefix + name`` as a 1-D uint8 array (zero-copy when stored)."""
        full = self.prefix + name
        zi = self.entries.get(full)
        if zi is None:
            raise CheckpointError(f"missing record {one_line(full)}", file=self.path)
        # stored records are mapped, not copied: only explicit limits (pickle, byteorder) apply
        cap = self.size_cap if limit is None else min(limit, self.size_cap)
        if zi.file_size > cap and (limit is not None or zi.compress_type != zipfile.ZIP_STORED):
            raise CheckpointError(f"record {one_line(full)} declares {zi.file_size} bytes, over the cap of "
                                  f"{cap} bytes", file=self.path)
        start, end = self._data_span(zi)
        if zi.compress_type == zipfile.ZIP_STORED:
            if zi.compress_size != zi.file_size:
                raise CheckpointError(f"stored record {one_line(full)}: sizes disagree", file=self.path)
            return np.frombuffer(self.mm, dtype=np.uint8, count=end - start, offset=start)
        if zi.compress_type != zipfile.ZIP_DEFLATED:
            raise CheckpointError(f"record {one_line(full)} uses zip compression method {zi.compress_type} "
                                  "(only stored and deflated are read)", file=self.path)
        return self._inflate(zi, full, start, end, cap)

    def _inflate(self, zi, full, start, end, cap) -> np.ndarray:
        declared = zi.file_size
        if self.decompressed + declared > self.size_cap:
            raise CheckpointError(f"decompressed records would total over the cap of {self.size_cap} bytes",
                                  file=self.path)
        out = bytearray()
        d = zlib.decompressobj(-15)
        pos = start
        try:
            while not d.eof:
                if d.unconsumed_tail:
                    data = d.unconsumed_tail
                elif pos < end:
                    data = self.mm[pos: min(end, pos + _CHUNK)]
                    pos += len(data)
                else:
                    break
                out += d.decompress(data, declared - len(out) + 1)
                if len(out) > declared:
                    raise CheckpointError(f"record {one_line(full)} inflates past its declared size of "
                                          f"{declared} bytes (zip bomb?)", file=self.path)
        except zlib.error as e:
            raise CheckpointError(f"record {one_line(full)}: corrupt deflate data ({e})", file=self.path) from None
        if not d.eof or len(out) != declared:
            raise CheckpointError(f"record {one_line(full)}: inflated to {len(out)} bytes, declared {declared}",
                                  file=self.path)
        if zlib.crc32(out) != zi.CRC:
            raise CheckpointError(f"record {one_line(full)}: CRC mismatch", file=self.path)
        self.decompressed += declared
        return np.frombuffer(out, dtype=np.uint8)


def read_torch_zip(path, *, size_cap: int = DEFAULT_SIZE_CAP, pickle_cap: int = MAX_PICKLE_BYTES, mm=None):
    """Unpickle a torch zip checkpoint safely. Returns ``(obj, table)``: the unpickled object, in
    which tensors are :class:`~.unpickler.TensorRef`, and the :class:`~.unpickler.StorageTable`
    that materialises them (lazily: storages never referenced by a returned tensor are not read)."""
    z = ZipCheckpoint(path, size_cap=size_cap, mm=mm)
    swap = False
    if z.has("byteorder"):
        bo = z.record("byteorder", limit=16).tobytes()
        if bo not in (b"little", b"big"):
            raise CheckpointError(f"unknown byteorder record {one_line(bo)}", file=path)
        swap = bo == b"big"
    pkl = z.record("data.pkl", limit=pickle_cap)

    def resolve(pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise CheckpointError(f"unexpected persistent id {one_line(pid)}", file=path)
        _, stype, key, location, numel = pid
        dt = storage_type_dtype(stype, path)
        key = check_key(key, path)
        if not isinstance(location, (str, bytes)):
            raise CheckpointError("storage location is not a string", file=path)
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key!r}: bad element count {one_line(numel)}", file=path)
        nbytes = numel * dt.itemsize
        zi = z.entries.get(z.prefix + "data/" + key)
        if zi is None:
            raise CheckpointError(f"storage {key!r} has no record 'data/{key}'", file=path)
        if zi.file_size != nbytes:
            raise CheckpointError(f"storage {key!r} size mismatch: declared {numel} x torch.{dt.name} = "
                                  f"{nbytes} bytes, record holds {zi.file_size}", file=path)
        return StorageRef(key, dt, nbytes)

    obj = restricted_loads(memoryview(pkl), resolve=resolve, source=path, limit=pickle_cap)
    table = StorageTable(lambda key: z.record("data/" + key), source=path, swap=swap)
    return obj, table
