"""The sparsedge model file (``.sparsedge``): one little-endian, memory-mappable, validated file.

Layout::

    offset 0   preamble, 64 bytes (little-endian):
               0  magic      8s   b"SPRSEDGE"
               8  major      u16  format major version (a reader reads only its own major)
              10  minor      u16  format minor version (additions an older reader may ignore)
              12  flags      u32  0 (reserved; a reader refuses unknown bits)
              16  header_len u64  bytes of the JSON header
              24  file_size  u64  total bytes of the file (truncation check)
              32  header_crc u32  zlib.crc32 of the header bytes
              36  reserved   24 bytes of zero
              60  pre_crc    u32  zlib.crc32 of preamble bytes 0..59
    offset 64  header: UTF-8 JSON, ``header_len`` bytes
    data_offset = 64 + header_len rounded up to 64: data buffers, each at a multiple of 64 bytes
               from the file start, zero padding between them.

Header (JSON object)::

    {"format": "sparsedge", "version": [major, minor],
     "required_features": ["format:csr", ...],   # a reader refuses features it does not know
     "graph": Graph.to_json(),                   # see formats/graph.py, checked by graphcheck.py
     "metadata": {...},                          # free JSON (source, recipe, per-layer sparsity...)
     "tensors": [{"name", "kind", "shape", "orig_shape" (or null), "meta",
                  "arrays": {array_name: {"dtype", "shape", "offset", "nbytes", "crc32"}}}, ...]}

``offset`` is relative to ``data_offset``. Features: ``format:<kind>`` for every weight format used,
``dtype:float16`` / ``dtype:bfloat16`` when such dense tensors are stored, ``act_quant`` when the graph
carries static activation quantization. Unknown top-level header keys are ignored (room for minor
versions); everything else is checked strictly.

Reading (``read_model``) validates before any array is handed out: preamble (magic, CRC, version,
flags, header length against a cap and the file size), header CRC, JSON (size cap, nesting depth,
no NaN/Infinity, no duplicate keys), the tensor table (names, kinds, dtypes on an allow-list,
shapes, byte sizes computed with Python ints so they cannot overflow and must match ``nbytes``,
offsets 64-aligned, inside the file, not overlapping), buffer CRCs (unless
``verify_checksums=False``), then each format's ``validate(full=True)`` and the graph
(``graphcheck.check_graph``). Arrays are read-only numpy views into one ``np.memmap`` of the file
(or into one ``bytes`` read when ``mmap=False``); only float16/bfloat16 dense tensors are copied
(widened to float32). Every failure raises ``ModelFileError`` (or a subclass) naming the file,
the tensor or node, and the field.

Writing (``write_model``) validates the same things, then writes atomically: a temp file in the
destination directory, fsync, ``os.replace``, fsync of the directory; on any failure (including
KeyboardInterrupt) the temp file is removed and the destination is left untouched.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

from ..errors import FormatError, ModelFileError
from .atomic import atomic_write
from .base import FORMATS, WeightFormat
from .graph import Graph

MAGIC = b"SPRSEDGE"
MAJOR, MINOR = 1, 0
ALIGN = 64
PREAMBLE = struct.Struct("<8sHHIQQI24sI")
assert PREAMBLE.size == 64
HEADER_MAX = 64 << 20  # bytes of JSON header
JSON_MAX_DEPTH = 64
MAX_TENSORS = 1 << 20
MAX_NDIM = 8
KNOWN_FLAGS = 0

# dtypes an array may have in the file (numpy dtype names, little-endian)
ARRAY_DTYPES = {"float32": "<f4", "float16": "<f2", "uint16": "<u2", "int64": "<i8", "int32": "<i4",
                "int8": "i1", "uint8": "u1", "bool": "?"}
KNOWN_FEATURES = frozenset({f"format:{k}" for k in FORMATS} | {"dtype:float16", "dtype:bfloat16", "act_quant"})

# Test switch: when False, unexpected exceptions inside validation propagate (so the hostile-file
# tests can see validator bugs) instead of being reported as ModelFileError.
_WRAP_UNEXPECTED = True


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _features(tensors: dict, graph: Graph) -> list:
    f = {f"format:{t.kind}" for t in tensors.values()}
    for t in tensors.values():
        if t.kind == "dense" and getattr(t, "dtype", None) in ("float16", "bfloat16"):
            f.add(f"dtype:{t.dtype}")
    if graph.act_quant:
        f.add("act_quant")
    return sorted(f)


def write_model(path, graph: Graph, tensors: dict, metadata: dict | None = None) -> int:
    """Validate and write a model file atomically; returns its size in bytes.

    ``graph``: a ``Graph``; ``tensors``: {name: WeightFormat}; ``metadata``: JSON-able dict
    (numpy scalars/arrays are converted). Raises ModelFileError/FormatError on invalid content."""
    from .graphcheck import check_graph

    path = os.fspath(path)
    if not isinstance(tensors, dict):
        raise ModelFileError("tensors must be a dict name -> WeightFormat", file=path, field="tensors")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ModelFileError("metadata must be a dict", file=path, field="metadata")
    entries, buffers, pos = [], [], 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ModelFileError(f"tensor names must be non-empty strings, got {name!r}", file=path, field="tensors")
        if not isinstance(t, WeightFormat) or FORMATS.get(t.kind) is not type(t):
            raise ModelFileError(f"not a registered weight format: {type(t).__name__}", file=path, tensor=name,
                                 field="kind")
        saved = t.name
        t.name = name
        try:
            t.validate(full=True)
        except FormatError as e:
            raise FormatError(e.detail, file=path, tensor=name, field=e.field) from None
        finally:
            t.name = saved
        arrs = {}
        for an, a in t.arrays().items():
            dn = str(a.dtype)
            if dn not in ARRAY_DTYPES:
                raise FormatError(f"dtype {a.dtype} cannot be stored", file=path, tensor=name, field=an)
            a = np.asarray(a, dtype=np.dtype(ARRAY_DTYPES[dn]))
            if not a.flags.c_contiguous:  # (ascontiguousarray would turn a 0-d array into 1-d)
                a = np.ascontiguousarray(a)
            pos = _align(pos)
            arrs[an] = {"dtype": dn, "shape": list(a.shape), "offset": pos, "nbytes": int(a.nbytes),
                        "crc32": zlib.crc32(memoryview(a).cast("B")) if a.nbytes else 0}
            buffers.append((pos, a))
            pos += a.nbytes
        entries.append({"name": name, "kind": t.kind, "shape": list(t.shape),
                        "orig_shape": None if t.orig_shape is None else list(t.orig_shape),
                        "meta": t.meta(), "arrays": arrs})
    g = check_graph(graph, tensors=tensors, file=path)
    header = {"format": "sparsedge", "version": [MAJOR, MINOR], "required_features": _features(tensors, g),
              "graph": g.to_json(), "metadata": metadata, "tensors": entries}
    try:
        hbytes = json.dumps(header, default=_json_default, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"header is not JSON-serialisable: {e}", file=path, field="metadata") from None
    if len(hbytes) > HEADER_MAX:
        raise ModelFileError(f"header of {len(hbytes)} bytes exceeds the {HEADER_MAX}-byte cap", file=path,
                             field="header")
    data_offset = _align(PREAMBLE.size + len(hbytes))
    file_size = data_offset + pos
    pre = PREAMBLE.pack(MAGIC, MAJOR, MINOR, 0, len(hbytes), file_size, zlib.crc32(hbytes), bytes(24), 0)
    pre = pre[:60] + struct.pack("<I", zlib.crc32(pre[:60]))

    with atomic_write(path) as f:
        f.write(pre)
        f.write(hbytes)
        at = PREAMBLE.size + len(hbytes)
        for off, a in buffers:
            f.write(bytes(data_offset + off - at))
            if a.nbytes:
                f.write(memoryview(a).cast("B"))
            at = data_offset + off + a.nbytes
        f.write(bytes(file_size - at))  # the data section starts aligned even when it is empty
    return file_size


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------
class ModelFile:
    """A loaded model file. ``tensors`` hold read-only views into the file's memory map."""

    def __init__(self, path, graph, tensors, metadata, version, required_features, header, buf, file_size):
        self.path = path
        self.graph: Graph = graph
        self.tensors: dict[str, WeightFormat] = tensors
        self.metadata: dict = metadata
        self.version: tuple = version
        self.required_features: list = required_features
        self.header: dict = header  # the parsed JSON header (tensor table with stored dtypes, offsets)
        self.file_size = file_size
        self._buf = buf

    def close(self) -> None:
        """Drop this object's references to the mapping (it is unmapped once no array uses it)."""
        buf, self._buf = self._buf, None
        self.tensors = {}
        if isinstance(buf, np.memmap):
            mm = getattr(buf, "_mmap", None)
            del buf
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # arrays handed out earlier still use it; it closes when they go

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<ModelFile {self.path!r} v{self.version[0]}.{self.version[1]} tensors={len(self.tensors)} "
                f"nodes={len(self.graph.nodes)}>")


def _reject_constant(s):
    raise ValueError(f"non-finite number {s} not allowed")


def _parse_float(s):
    v = float(s)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"non-finite number {s[:40]} not allowed")
    return v


def _no_dupes(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k[:80]!r}")
        d[k] = v
    return d


def _json_depth_ok(obj, limit):
    stack = [(obj, 1)]
    while stack:
        o, dep = stack.pop()
        if dep > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, dep + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, dep + 1) for v in o)
    return True


def parse_header(hbytes: bytes, file=None) -> dict:
    """Parse the JSON header (capped depth, no NaN/Infinity, no duplicate keys) -> dict."""
    try:
        text = hbytes.decode("utf-8")
        h = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float,
                       object_pairs_hook=_no_dupes)
    except RecursionError:
        raise ModelFileError("header JSON nested too deeply", file=file, field="header") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"header is not valid JSON: {str(e)[:200]}", file=file, field="header") from None
    if not _json_depth_ok(h, JSON_MAX_DEPTH):
        raise ModelFileError(f"header JSON nested deeper than {JSON_MAX_DEPTH}", file=file, field="header")
    if not isinstance(h, dict):
        raise ModelFileError("header must be a JSON object", file=file, field="header")
    return h


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(v, file, tensor, field):
    if not isinstance(v, list) or len(v) > MAX_NDIM or not all(_is_int(d) and 0 <= d < 2 ** 62 for d in v):
        raise ModelFileError(f"must be a list of at most {MAX_NDIM} ints >= 0, got {v!r:.100}", file=file,
                             tensor=tensor, field=field)
    return tuple(v)


def read_preamble(pre: bytes, file=None, verify_checksums=True):
    """Unpack and check the 64-byte preamble -> (major, minor, flags, header_len, file_size, header_crc)."""
    if len(pre) < PREAMBLE.size:
        raise ModelFileError(f"file is {len(pre)} bytes, shorter than the {PREAMBLE.size}-byte preamble: "
                             "truncated or not a sparsedge model file", file=file, field="preamble")
    magic, major, minor, flags, hlen, fsize, hcrc, _res, pcrc = PREAMBLE.unpack(pre[:PREAMBLE.size])
    if magic != MAGIC:
        raise ModelFileError(f"bad magic {magic!r}: not a sparsedge model file", file=file, field="magic")
    if verify_checksums and zlib.crc32(pre[:60]) != pcrc:
        raise ModelFileError("preamble checksum mismatch (corrupt file)", file=file, field="preamble")
    if major > MAJOR:
        raise ModelFileError(f"file format version {major}.{minor} is newer than this reader "
                             f"({MAJOR}.{MINOR}): upgrade sparsedge to read it", file=file, field="version")
    if major < MAJOR:
        raise ModelFileError(f"file format version {major}.{minor} is an old major version this reader "
                             f"({MAJOR}.{MINOR}) no longer reads: re-convert the model", file=file, field="version")
    if flags & ~KNOWN_FLAGS:
        raise ModelFileError(f"unknown flags 0x{flags:x}", file=file, field="flags")
    return major, minor, flags, hlen, fsize, hcrc


def read_model(path, verify_checksums: bool = True, mmap: bool = True) -> ModelFile:
    """Open, validate and map a model file. Raises ModelFileError (or a subclass) on any problem.

    ``verify_checksums=False`` skips the CRC-32 checks (trusted fast loads; also the test switch
    that exercises the validators behind the checksums). ``mmap=False`` reads the file once into
    memory instead of mapping it."""
    path = os.fspath(path)
    try:
        return _read(path, verify_checksums, mmap)
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"cannot read: {e.strerror or e}", file=path) from None
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, AttributeError, RecursionError,
            MemoryError, ArithmeticError, struct.error, UnicodeError) as e:
        if not _WRAP_UNEXPECTED:
            raise
        raise ModelFileError(f"malformed file ({type(e).__name__}: {str(e)[:200]})", file=path) from e


def _read(path, verify, use_mmap) -> ModelFile:
    from .dense import Dense
    from .graphcheck import check_graph

    E = lambda msg, **kw: ModelFileError(msg, file=path, **kw)  # noqa: E731
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE.size)
        major, minor, flags, hlen, fsize, hcrc = read_preamble(pre, path, verify)
        if fsize != size:
            raise E(f"preamble says {fsize} bytes but the file has {size}: "
                    f"{'truncated' if size < fsize else 'trailing data or corrupt preamble'}", field="file_size")
        if hlen > HEADER_MAX:
            raise E(f"header length {hlen} exceeds the cap of {HEADER_MAX} bytes", field="header_len")
        data_offset = _align(PREAMBLE.size + hlen)
        if data_offset > size:
            raise E(f"header ({hlen} bytes) extends past the end of the file ({size} bytes): truncated",
                    field="header_len")
        hbytes = f.read(hlen)
    if len(hbytes) != hlen:
        raise E("short read of header (file changed while reading?)", field="header")
    if verify and zlib.crc32(hbytes) != hcrc:
        raise E("header checksum mismatch (corrupt file)", field="header")
    h = parse_header(hbytes, path)

    if h.get("format") != "sparsedge":
        raise E(f"header format must be 'sparsedge', got {h.get('format')!r:.80}", field="format")
    if h.get("version") != [major, minor]:
        raise E(f"header version {h.get('version')!r:.80} differs from the preamble's [{major}, {minor}]",
                field="version")
    feats = h.get("required_features")
    if not isinstance(feats, list) or not all(isinstance(x, str) for x in feats):
        raise E("must be a list of strings", field="required_features")
    unknown = sorted(set(feats) - KNOWN_FEATURES)
    if unknown:
        raise E(f"file requires features this reader does not understand: {unknown!s:.300}; "
                "upgrade sparsedge", field="required_features")
    metadata = h.get("metadata", {})
    if not isinstance(metadata, dict):
        raise E("must be an object", field="metadata")
    table = h.get("tensors")
    if not isinstance(table, list) or len(table) > MAX_TENSORS:
        raise E("must be a list of tensor entries", field="tensors")
    if "graph" not in h:
        raise E("missing", field="graph")

    # -- tensor table: bounds, sizes, alignment, overlap (before touching any data) --
    data_size = size - data_offset
    specs = []  # (name, kind, shape, orig_shape, meta, {array: (dtype, shape, start, nbytes, crc)})
    intervals = []
    names = set()
    for i, t in enumerate(table):
        if not isinstance(t, dict) or set(t) != {"name", "kind", "shape", "orig_shape", "meta", "arrays"}:
            raise E(f"entry {i} must be an object with name, kind, shape, orig_shape, meta, arrays",
                    field="tensors")
        name = t["name"]
        if not isinstance(name, str) or not name or len(name) > 4096:
            raise E(f"entry {i}: bad tensor name {name!r:.80}", field="name")
        if name in names:
            raise E("duplicate tensor name", tensor=name, field="name")
        names.add(name)
        kind = t["kind"]
        if not isinstance(kind, str) or kind not in FORMATS:
            raise E(f"unknown format kind {kind!r:.80} (known: {sorted(FORMATS)})", tensor=name, field="kind")
        if f"format:{kind}" not in feats:
            raise E(f"kind {kind!r} used but 'format:{kind}' is not among required_features", tensor=name,
                    field="required_features")
        shape = _check_shape(t["shape"], path, name, "shape")
        orig = None if t["orig_shape"] is None else _check_shape(t["orig_shape"], path, name, "orig_shape")
        if not isinstance(t["meta"], dict):
            raise E("must be an object", tensor=name, field="meta")
        arrs = t["arrays"]
        if not isinstance(arrs, dict) or len(arrs) > 16:
            raise E("must be an object of array descriptors", tensor=name, field="arrays")
        aspecs = {}
        for an, a in arrs.items():
            fld = f"arrays.{an:.80}"
            if not isinstance(a, dict) or set(a) != {"dtype", "shape", "offset", "nbytes", "crc32"}:
                raise E("must hold exactly dtype, shape, offset, nbytes, crc32", tensor=name, field=fld)
            dn = a["dtype"]
            if not isinstance(dn, str) or dn not in ARRAY_DTYPES:
                raise E(f"dtype {dn!r:.40} not allowed (allowed: {sorted(ARRAY_DTYPES)})", tensor=name,
                        field=fld + ".dtype")
            dt = np.dtype(ARRAY_DTYPES[dn])
            ashape = _check_shape(a["shape"], path, name, fld + ".shape")
            n = dt.itemsize
            for d in ashape:  # Python ints: no overflow; stop as soon as it cannot fit the file
                n *= d
                if n > data_size:
                    break
            off, nb, crc = a["offset"], a["nbytes"], a["crc32"]
            if not (_is_int(off) and _is_int(nb) and _is_int(crc)) or off < 0 or nb < 0 or not 0 <= crc < 2 ** 32:
                raise E("offset, nbytes and crc32 must be non-negative ints", tensor=name, field=fld)
            if n != nb:
                raise E(f"nbytes {nb} does not match shape {list(ashape)!s:.100} x {dn} "
                        f"({'more than the file holds' if n > data_size else n})", tensor=name, field=fld + ".nbytes")
            if off % ALIGN:
                raise E(f"offset {off} is not {ALIGN}-byte aligned", tensor=name, field=fld + ".offset")
            if off > data_size or nb > data_size - off:
                raise E(f"buffer [{off}, {off + nb}) lies outside the data section ({data_size} bytes)",
                        tensor=name, field=fld + ".offset")
            if nb:
                intervals.append((off, off + nb, name, an))
            aspecs[an] = (dt, ashape, data_offset + off, nb, crc)
        specs.append((name, kind, shape, orig, t["meta"], aspecs))
    intervals.sort()
    for (s0, e0, n0, a0), (s1, e1, n1, a1) in zip(intervals, intervals[1:]):
        if s1 < e0:
            raise E(f"buffer overlaps {n0!r}.{a0}", tensor=n1, field=f"arrays.{a1}.offset")

    # -- map the file and build the arrays (views, read-only) --
    if use_mmap:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    else:
        with open(path, "rb") as f:
            buf = np.frombuffer(f.read(), dtype=np.uint8)
    if buf.shape[0] != size:
        raise E("file changed while being read", field="file_size")
    tensors = {}
    for name, kind, shape, orig, meta, aspecs in specs:
        arrays = {}
        for an, (dt, ashape, start, nb, crc) in aspecs.items():
            raw = buf[start:start + nb]
            if verify and nb and zlib.crc32(raw) != crc:
                raise E("buffer checksum mismatch (corrupt file)", tensor=name, field=f"arrays.{an}")
            a = raw.view(np.ndarray).view(dt).reshape(ashape)  # plain ndarray view; .base -> the map
            arrays[an] = a
        try:
            obj = FORMATS[kind].from_arrays(shape, meta, arrays, name=name, orig_shape=orig)
            obj.validate(full=True)
        except FormatError as e:
            raise FormatError(e.detail, file=path, tensor=name, field=e.field) from None
        if kind == "dense" and obj.dtype in ("float16", "bfloat16"):
            if f"dtype:{obj.dtype}" not in feats:
                raise E(f"{obj.dtype} values but 'dtype:{obj.dtype}' not among required_features", tensor=name,
                        field="required_features")
            obj = obj.widened()
        tensors[name] = obj
    graph = check_graph(h["graph"], tensors=tensors, file=path)
    if graph.act_quant and "act_quant" not in feats:
        raise E("graph has act_quant but 'act_quant' is not among required_features", field="required_features")
    return ModelFile(path, graph, tensors, metadata, (major, minor), list(feats), h, buf, size)
