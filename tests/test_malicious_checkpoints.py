"""Hostile checkpoints: every one is refused with a one-line CheckpointError and nothing runs.

Each code-execution payload would create ``tmp_path / "pwned"`` if it ran; the tests assert
that file never exists. Pickles are assembled opcode by opcode (``_P``) so that the exact
GLOBAL / STACK_GLOBAL / REDUCE / INST / OBJ / BUILD / EXT sequences are under test, and also
produced by ``pickle.dumps`` of ``__reduce__`` payloads at protocols 2-5.
"""
import copyreg
import functools
import json
import os
import pickle
import struct
import subprocess
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedge.errors import CheckpointError
from sparsedge.loaders.checkpoint import load_state_dict
from sparsedge.loaders.unpickler import restricted_loads


# ------------------------------------------------------------------------------------------
# a tiny pickle assembler
class _P:
    """Opcode-level pickle builder (protocol 2 framing unless STACK_GLOBAL is used)."""

    def __init__(self, proto=2):
        self.b = bytearray(b"\x80" + bytes([proto]))

    def raw(self, b):
        self.b += b
        return self

    def s(self, text):  # BINUNICODE
        e = text.encode("utf-8", "surrogatepass")
        return self.raw(b"X" + struct.pack("<I", len(e)) + e)

    def i(self, n):
        if 0 <= n < 2**31:
            return self.raw(b"J" + struct.pack("<i", n))
        e = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return self.raw(b"\x8a" + bytes([len(e)]) + e)

    def none(self):
        return self.raw(b"N")

    def false(self):
        return self.raw(b"\x89")

    def glob(self, mod, name):  # GLOBAL (protocol 0 style, works in any protocol)
        return self.raw(b"c" + mod.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n")

    def sglob(self, mod, name):  # STACK_GLOBAL
        return self.s(mod).s(name).raw(b"\x93")

    def mark(self):
        return self.raw(b"(")

    def tup(self):  # TUPLE from the last MARK
        return self.raw(b"t")

    def reduce(self):
        return self.raw(b"R")

    def persid(self):
        return self.raw(b"Q")

    def put(self, k):
        return self.raw(b"q" + bytes([k]))

    def get(self, k):
        return self.raw(b"h" + bytes([k]))

    def stop(self):
        return bytes(self.raw(b".").b)


def _tensor(p, *, key="0", numel=6, offset=0, size=(6,), stride=(1,), stype=("torch", "FloatStorage")):
    """Push _rebuild_tensor_v2(storage(key, numel), offset, size, stride, False, OrderedDict())."""
    p.glob("torch._utils", "_rebuild_tensor_v2").mark()
    p.mark().s("storage").glob(*stype).s(key).s("cpu").i(numel).tup().persid()
    p.i(offset).mark()
    for d in size:
        p.i(d)
    p.tup().mark()
    for d in stride:
        p.i(d)
    p.tup().false().glob("collections", "OrderedDict").mark().tup().reduce()
    return p.tup().reduce()


def _state_dict(items):
    """Pickle {name: <opcodes pushed by fn(p)>}."""
    p = _P()
    p.raw(b"}").mark()
    for name, fn in items:
        p.s(name)
        fn(p)
    p.raw(b"u")
    return p.stop()


def write_zip(path, pkl, records=None, top="archive", method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr(f"{top}/data.pkl", pkl)
        for k, v in (records or {"0": np.arange(6, dtype=np.float32).tobytes()}).items():
            z.writestr(f"{top}/data/{k}", v)
        z.writestr(f"{top}/version", "3\n")


def write_legacy(path, pkl, storages=None):
    """Raw-pickle legacy file: magic, protocol, sys_info, pkl, keys, then data."""
    storages = storages if storages is not None else {"0": (6, np.arange(6, dtype=np.float32).tobytes())}
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            f.write(pickle.dumps(obj, protocol=2))
        f.write(pkl)
        f.write(pickle.dumps(sorted(storages), protocol=2))
        for k in sorted(storages):
            n, data = storages[k]
            f.write(struct.pack("<q", n) + data)


def refused(path, match=None, **kw):
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(path, **kw)
    msg = str(ei.value)
    assert type(ei.value) is CheckpointError
    assert "\n" not in msg and len(msg) < 600, msg
    if match:
        assert match in msg, msg
    return msg


@pytest.fixture
def canary(tmp_path):
    c = tmp_path / "pwned"
    yield c
    assert not c.exists(), "a payload ran"


def test_sanity_hand_assembled_pickle_is_readable(tmp_path):
    """The assembler builds real checkpoints: the payload tests below differ only in the payload."""
    f = tmp_path / "ok.pt"
    write_zip(f, _state_dict([("w", _tensor)]))
    np.testing.assert_array_equal(load_state_dict(f)["w"], np.arange(6, dtype=np.float32))
    g = tmp_path / "ok_legacy.pt"
    write_legacy(g, _state_dict([("w", _tensor)]))
    np.testing.assert_array_equal(load_state_dict(g)["w"], np.arange(6, dtype=np.float32))


def test_old_pickle_shapes_are_readable(tmp_path):
    """Older torch pickles: 4-arg _rebuild_tensor, legacy persistent ids with view metadata."""
    def old_rebuild(p):
        p.glob("torch._utils", "_rebuild_tensor").mark()
        p.mark().s("storage").glob("torch", "FloatStorage").s("0").s("cpu").i(6).tup().persid()
        return p.i(1).mark().i(2).i(2).tup().mark().i(1).i(2).tup().tup().reduce()

    def view_pid(p):  # storage view: elements 2..5 of storage 0, tensor over the view
        p.glob("torch._utils", "_rebuild_tensor_v2").mark()
        p.mark().s("storage").glob("torch", "FloatStorage").s("0").s("cpu").i(6)
        p.mark().s("v1").i(2).i(4).tup().tup().persid()
        return p.i(1).mark().i(3).tup().mark().i(1).tup().false().none().tup().reduce()

    f = tmp_path / "old.pt"
    write_legacy(f, _state_dict([("a", old_rebuild), ("v", view_pid)]))
    out = load_state_dict(f)
    np.testing.assert_array_equal(out["a"], np.array([[1, 3], [2, 4]], np.float32))
    np.testing.assert_array_equal(out["v"], np.array([3, 4, 5], np.float32))
    assert np.shares_memory(out["a"], out["v"])
    # a view reaching past its root storage is refused
    def bad_view(p):
        p.glob("torch._utils", "_rebuild_tensor_v2").mark()
        p.mark().s("storage").glob("torch", "FloatStorage").s("0").s("cpu").i(6)
        p.mark().s("v1").i(4).i(4).tup().tup().persid()
        return p.i(0).mark().i(1).tup().mark().i(1).tup().false().none().tup().reduce()

    write_legacy(f, _state_dict([("v", bad_view)]))
    refused(f, match="storage view past the end")
    write_legacy(f, _state_dict([(f"w{i}", _tensor) for i in range(50)]))
    refused(f, match="larger than the cap", pickle_cap=200)


# ------------------------------------------------------------------------------------------
# code-execution payloads
def _payloads(c):
    cmd = f"touch {c}"
    py = f"open({str(c)!r}, 'w').close()"
    out = {}
    out["os.system GLOBAL"] = _P().glob("os", "system").mark().s(cmd).tup().reduce().stop()
    out["posix.system STACK_GLOBAL"] = _P(4).sglob("posix", "system").mark().s(cmd).tup().reduce().stop()
    out["subprocess.Popen"] = (_P().glob("subprocess", "Popen").mark().raw(b"]").mark().s("touch").s(str(c))
                               .raw(b"e").tup().reduce().stop())
    out["builtins.eval"] = _P().glob("builtins", "eval").mark().s(py).tup().reduce().stop()
    out["builtins.exec"] = _P(4).sglob("builtins", "exec").mark().s(py).tup().reduce().stop()
    out["__builtin__.eval (py2 name)"] = _P().glob("__builtin__", "eval").mark().s(py).tup().reduce().stop()
    # nested: getattr(__import__('os'), 'system')(cmd)
    out["nested getattr/__import__"] = (_P().glob("builtins", "getattr").mark().glob("builtins", "__import__").mark()
                                        .s("os").tup().reduce().s("system").tup().reduce().mark().s(cmd).tup()
                                        .reduce().stop())
    # obfuscated names: dotted attribute walk, look-alike unicode, embedded newline / spaces
    out["dotted torch.serialization.os.system"] = (_P(4).sglob("torch", "serialization.os.system").mark().s(cmd)
                                                   .tup().reduce().stop())
    out["dotted rebuild.__globals__"] = (_P(4).sglob("torch._utils", "_rebuild_tensor_v2.__globals__").stop())
    out["cyrillic os"] = _P(4).sglob("\u043es", "system").mark().s(cmd).tup().reduce().stop()
    out["newline in module"] = _P(4).sglob("os\npath", "system").mark().s(cmd).tup().reduce().stop()
    out["trailing space"] = _P(4).sglob("os ", "system").mark().s(cmd).tup().reduce().stop()
    out["allowed module, bad name"] = _P().glob("torch._utils", "os").stop()
    out["collections.OrderedDict dotted"] = _P(4).sglob("collections", "OrderedDict.__init__").stop()
    # STACK_GLOBAL whose strings come from the memo (scanner cannot see them; find_class must)
    out["STACK_GLOBAL via memo"] = (_P(4).s("os").put(1).s("system").put(2).raw(b"0").raw(b"0").get(1).get(2)
                                    .raw(b"\x93").mark().s(cmd).tup().reduce().stop())
    # INST and OBJ opcodes
    out["INST os.system"] = bytes(b"(S'" + cmd.encode() + b"'\nios\nsystem\n.")
    out["OBJ os.system"] = _P().mark().glob("os", "system").s(cmd).raw(b"o").stop()
    # BUILD with a class that has __setstate__ side effects
    out["functools.partial"] = (_P().glob("functools", "partial").mark().glob("os", "system").s(cmd).tup().reduce()
                                .stop())
    out["copyreg._reconstructor"] = _P().glob("copyreg", "_reconstructor").stop()
    out["torch.load itself"] = _P().glob("torch", "load").mark().s(str(c)).tup().reduce().stop()
    out["torch.nn Module class"] = _P().glob("torch.nn.modules.linear", "Linear").mark().tup().reduce().stop()
    out["numpy object dtype"] = _P().glob("numpy", "dtype").mark().s("O").false().raw(b"\x88").tup().reduce().stop()
    out["numpy _reconstruct"] = _P().glob("numpy.core.multiarray", "_reconstruct").stop()
    # payload hidden inside a legitimate-looking state_dict
    out["payload inside state_dict"] = _state_dict([("w", _tensor), ("x", lambda p: p.glob("os", "system")
                                                                        .mark().s(cmd).tup().reduce())])
    return out


PAYLOAD_NAMES = sorted(_payloads("X"))


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_code_payloads_refused(tmp_path, canary, name, container):
    pkl = _payloads(canary)[name]
    f = tmp_path / "evil.pt"
    (write_zip if container == "zip" else write_legacy)(f, pkl)
    msg = refused(f)
    assert "refused" in msg or "malformed" in msg, msg


@pytest.mark.parametrize("name,glob", [("os.system GLOBAL", "'os.system'"), ("builtins.eval", "'builtins.eval'"),
                                       ("posix.system STACK_GLOBAL", "'posix.system'"),
                                       ("subprocess.Popen", "'subprocess.Popen'"),
                                       ("STACK_GLOBAL via memo", "'os.system'"),
                                       ("cyrillic os", "'\\u043es.system'"),
                                       ("newline in module", "'os\\npath.system'"),
                                       ("dotted torch.serialization.os.system", "'torch.serialization.os.system'"),
                                       ("torch.nn Module class", "'torch.nn.modules.linear.Linear'")])
def test_refusal_names_the_global(tmp_path, canary, name, glob):
    f = tmp_path / "evil.pt"
    write_zip(f, _payloads(canary)[name])
    msg = refused(f, match=f"refused global {glob}")
    assert str(f) in msg


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reduce_payloads_from_pickle_dumps(tmp_path, canary, protocol):
    class Sys:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    class Pop:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(canary)],))

    class Ev:
        def __reduce__(self):
            return (eval, (f"open({str(canary)!r}, 'w').close()",))

    for i, obj in enumerate([Sys(), Pop(), Ev(), {"w": functools.partial(os.system, "true")}]):
        f = tmp_path / f"p{i}.pt"
        write_zip(f, pickle.dumps({"state_dict": {"x": obj}}, protocol=protocol))
        refused(f, match="refused global")


def test_ext_opcodes_refused_even_when_registered(tmp_path, canary):
    copyreg.add_extension("os", "system", 0xF1)
    try:
        pkl = _P().raw(b"\x82\xf1").mark().s(f"touch {canary}").tup().reduce().stop()
        f = tmp_path / "ext.pt"
        write_zip(f, pkl)
        refused(f, match="EXT1")
    finally:
        copyreg.remove_extension("os", "system", 0xF1)


class _SideEffect:
    """A class whose unpickling would create the canary (as a pickled nn.Module subclass would)."""

    path = None

    def __setstate__(self, state):
        open(state["path"], "w").close()


def test_pickled_modules_refused(tmp_path, canary):
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    f = tmp_path / "module.pt"
    torch.save(m, f)
    refused(f, match="refused global 'torch.nn.modules")
    torch.save({"model": m.state_dict(), "module": m}, f)
    refused(f, match="refused global")
    g = tmp_path / "module_legacy.pt"
    torch.save(m, g, _use_new_zipfile_serialization=False)
    refused(g, match="refused")
    obj = _SideEffect()
    obj.__dict__["path"] = str(canary)
    h = tmp_path / "side.pt"
    torch.save({"w": torch.ones(2), "evil": obj}, h)
    refused(h, match="_SideEffect")


# ------------------------------------------------------------------------------------------
# inert stand-ins called with hostile arguments
@pytest.mark.parametrize("build,match", [
    (lambda p: p.glob("torch._utils", "_rebuild_tensor_v2").mark().s("not a storage").i(0).mark().tup().mark().tup()
     .false().none().tup().reduce(), "expected a storage"),
    (lambda p: p.glob("torch._utils", "_rebuild_parameter").mark().s("x").false().none().tup().reduce(),
     "expected a tensor"),
    (lambda p: p.glob("torch._tensor", "_rebuild_from_type_v2").mark().glob("collections", "OrderedDict")
     .glob("torch", "Tensor").mark().tup().none().tup().reduce(), "_rebuild_from_type_v2"),
    (lambda p: p.glob("torch", "Tensor").mark().tup().reduce(), "refused call"),
    (lambda p: p.glob("torch", "FloatStorage").mark().i(10**9).tup().reduce(), "refused call"),
    (lambda p: p.glob("builtins", "bytearray").mark().i(10**12).tup().reduce(), "bytearray"),
    (lambda p: p.glob("_codecs", "encode").mark().s("x").s("rot13").tup().reduce(), "_codecs"),
    (lambda p: p.glob("torch", "device").mark().i(3).tup().reduce(), "torch.device"),
    (lambda p: _tensor(p).mark().raw(b"}").tup().raw(b"b"), "BUILD"),  # BUILD on a tensor
    (lambda p: p.glob("torch", "float32").mark().raw(b"}").tup().raw(b"b"), "BUILD"),
    (lambda p: p.mark().s("storage").s("FloatStorage").s("0").s("cpu").i(6).tup().persid(), "storage type"),
    (lambda p: p.mark().s("module").s("x").tup().persid(), "persistent id"),
    (lambda p: p.s("0").persid(), "persistent id"),
    (lambda p: _tensor(p, key="../0"), "bad storage key"),
    (lambda p: _tensor(p, key="0\nx"), "bad storage key"),
])
def test_hostile_arguments_refused(tmp_path, build, match):
    f = tmp_path / "h.pt"
    write_zip(f, _state_dict([("w", build)]))
    refused(f, match=match)


# ------------------------------------------------------------------------------------------
# storages, views and sizes
@pytest.mark.parametrize("kw,records,match", [
    (dict(numel=6), {"0": b"\0" * 20}, "size mismatch"),           # record shorter than declared
    (dict(numel=6), {"0": b"\0" * 28}, "size mismatch"),           # longer
    (dict(numel=2**60), None, "size mismatch"),                     # huge declared size
    (dict(key="7"), None, "no record"),                             # missing record
    (dict(offset=4, size=(3,)), None, "past the end"),              # view past the end
    (dict(size=(2, 4), stride=(4, 1)), None, "past the end"),
    (dict(size=(7,)), None, "past the end"),
    (dict(offset=-1, size=(2,)), None, "negative"),
    (dict(size=(2,), stride=(-1,)), None, "negative"),
    (dict(size=(-2,)), None, "negative"),
    (dict(size=(10**6, 10**6), stride=(0, 0)), None, "size cap"),   # 4 TB view of 24 bytes
    (dict(size=(2, 3), stride=(1,)), None, "differ in length"),
    (dict(size=(1,) * 40, stride=(1,) * 40), None, "dims"),
    (dict(stype=("torch", "QInt8Storage"), numel=24), None, "not supported"),
])
def test_storage_and_view_checks(tmp_path, kw, records, match):
    f = tmp_path / "s.pt"
    write_zip(f, _state_dict([("w", functools.partial(_tensor, **kw))]), records=records)
    refused(f, match=match, size_cap=1 << 30)


def test_legacy_storage_checks(tmp_path):
    pkl = _state_dict([("w", _tensor)])
    f = tmp_path / "l.pt"
    write_legacy(f, pkl, {"0": (6, b"\0" * 20)})  # truncated data
    refused(f, match="past the end of the file")
    write_legacy(f, pkl, {"0": (5, b"\0" * 20)})  # count disagrees with the pickle
    refused(f, match="size mismatch")
    write_legacy(f, pkl, {"0": (6, b"\0" * 24), "9": (1, b"\0" * 4)})  # unreferenced key
    refused(f, match="not referenced")
    write_legacy(f, pkl, {})
    refused(f, match="no data")
    write_legacy(f, _state_dict([("w", functools.partial(_tensor, offset=5, size=(2,)))]))
    refused(f, match="past the end")
    with open(f, "wb") as fh:
        fh.write(pickle.dumps(12345, protocol=2) + pickle.dumps(1001, protocol=2))
    refused(f, match="magic")


# ------------------------------------------------------------------------------------------
# zip structure
def _zip_with_names(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            zi = zipfile.ZipInfo("placeholder")
            zi.filename = n  # bypass zipfile's own normalisation
            z.writestr(zi, _state_dict([("w", _tensor)]) if n.endswith("data.pkl") else
                       np.arange(6, dtype=np.float32).tobytes())


@pytest.mark.parametrize("names,match", [
    (["archive/data.pkl", "archive/data/0", "../evil"], "unsafe path"),
    (["archive/data.pkl", "archive/data/../../0"], "unsafe path"),
    (["archive/data.pkl", "/etc/archive/data/0"], "unsafe path"),
    (["archive/data.pkl", "archive\\data\\0"], "unsafe path"),
    (["archive/data.pkl", "archive/data/0", "archive/data/0"], "duplicate"),
    (["a/data.pkl", "b/data.pkl", "a/data/0"], "2 '<folder>/data.pkl'"),
    (["data.pkl", "data/0"], "no '<folder>/data.pkl'"),
    (["archive/data.pkl", "archive/data/0", "archive/constants.pkl"], "TorchScript"),
])
def test_zip_structure_refused(tmp_path, names, match):
    f = tmp_path / "z.pt"
    with pytest.warns(UserWarning) if len(set(names)) < len(names) else _nullctx():
        _zip_with_names(f, names)
    refused(f, match=match)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _patch_sizes(path, name: bytes, size: int):
    """Rewrite the uncompressed size of entry ``name`` in its local and central headers."""
    b = bytearray(open(path, "rb").read())
    i = b.find(b"PK\x03\x04")
    while i >= 0:
        n, e = struct.unpack_from("<HH", b, i + 26)
        if bytes(b[i + 30: i + 30 + n]) == name:
            struct.pack_into("<I", b, i + 22, size)
        i = b.find(b"PK\x03\x04", i + 4)
    i = b.find(b"PK\x01\x02")
    while i >= 0:
        n = struct.unpack_from("<H", b, i + 28)[0]
        if bytes(b[i + 46: i + 46 + n]) == name:
            struct.pack_into("<I", b, i + 24, size)
        i = b.find(b"PK\x01\x02", i + 4)
    open(path, "wb").write(bytes(b))


BOMB = 64 << 20  # 64 MiB of zeros deflate to ~64 KiB


def _bomb_zip(path, numel):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        # a small view of a big storage: the storage (record) is what the cap must stop
        z.writestr("archive/data.pkl", _state_dict([("w", functools.partial(_tensor, numel=numel, size=(6,)))]))
        z.writestr("archive/data/0", b"\0" * BOMB)


def test_zip_bomb_declared_size_over_cap(tmp_path):
    f = tmp_path / "bomb.pt"
    _bomb_zip(f, BOMB // 4)
    assert os.path.getsize(f) < BOMB // 100
    tracemalloc.start()
    try:
        refused(f, match="over the cap", size_cap=8 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    # the same file under a large enough cap is a legitimate (if silly) checkpoint
    assert load_state_dict(f, size_cap=1 << 30)["w"].shape == (6,)


def test_zip_bomb_lying_declared_size(tmp_path):
    f = tmp_path / "liar.pt"
    _bomb_zip(f, 6)
    _patch_sizes(f, b"archive/data/0", 24)  # claims 24 bytes, inflates to 64 MiB
    tracemalloc.start()
    try:
        refused(f, match="inflates past its declared size")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # stopped after declared+1 bytes of output, not 64 MiB


def test_zip_bomb_total_over_cap(tmp_path):
    f = tmp_path / "many.pt"
    items = [(f"w{i}", functools.partial(_tensor, key=str(i), numel=1 << 20, size=(1 << 20,))) for i in range(6)]
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", _state_dict(items))
        for i in range(6):
            z.writestr(f"archive/data/{i}", b"\0" * (4 << 20))
    refused(f, match="total over the cap", size_cap=16 << 20)


def test_deflate_corruption_and_crc(tmp_path):
    f = tmp_path / "crc.pt"
    write_zip(f, _state_dict([("w", _tensor)]), method=zipfile.ZIP_DEFLATED)
    b = bytearray(open(f, "rb").read())
    i = b.find(b"PK\x01\x02")
    while i >= 0:  # corrupt the CRC of data/0 in the central directory
        n = struct.unpack_from("<H", b, i + 28)[0]
        if bytes(b[i + 46: i + 46 + n]) == b"archive/data/0":
            struct.pack_into("<I", b, i + 16, 0xDEADBEEF)
        i = b.find(b"PK\x01\x02", i + 4)
    open(f, "wb").write(bytes(b))
    refused(f, match="CRC")


# ------------------------------------------------------------------------------------------
# safetensors
def _st(path, header, data=b"", hlen=None):
    h = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if hlen is None else hlen) + h + data)


@pytest.mark.parametrize("header,data,hlen,match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the data buffer"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "needs 12"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "bad data_offsets"),
    ({"w": {"dtype": "O", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ([1, 2], b"", None, "not a JSON object"),
    (b'{"w": 1, "w": 2}', b"", None, "duplicate JSON key"),
    (b"[" * 50000 + b"]" * 50000, b"", None, "not valid JSON"),
    (b"{}", b"", 2**63, "exceeds"),
    (b"{}", b"", 1000, "past the end of the file"),
    (b"\xff\xfe{}", b"", None, "not valid JSON"),
])
def test_safetensors_hostile_headers(tmp_path, header, data, hlen, match):
    f = tmp_path / "x.safetensors"
    _st(f, header, data, hlen)
    refused(f, match=match)


# ------------------------------------------------------------------------------------------
# fuzz: truncation and byte flips of real files only ever give CheckpointError
def _real_files(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(4).half()}
    sd["t"] = sd["a"].t()
    files = {}
    files["zip"] = tmp_path / "z.pt"
    torch.save(sd, files["zip"])
    files["legacy"] = tmp_path / "l.pt"
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    files["deflated"] = tmp_path / "d.pt"
    with zipfile.ZipFile(files["zip"]) as zin, zipfile.ZipFile(files["deflated"], "w", zipfile.ZIP_DEFLATED) as zo:
        for zi in zin.infolist():
            zo.writestr(zi.filename, zin.read(zi.filename))
    files["safetensors"] = tmp_path / "s.safetensors"
    h = json.dumps({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                    "b": {"dtype": "BF16", "shape": [2], "data_offsets": [48, 52]}}).encode()
    files["safetensors"].write_bytes(struct.pack("<Q", len(h)) + h + bytes(range(52)))
    return {k: v.read_bytes() for k, v in files.items()}


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    return _real_files(tmp_path_factory.mktemp("real"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["zip", "legacy", "deflated", "safetensors"]), data=st.data())
def test_fuzz_truncate_and_flip(tmp_path, real_files, kind, data):
    b = bytearray(real_files[kind])
    if data.draw(st.booleans(), label="truncate"):
        b = b[: data.draw(st.integers(0, len(b) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="nflips")):
            i = data.draw(st.integers(0, len(b) - 1), label="at")
            b[i] = data.draw(st.integers(0, 255), label="byte")
    suffix = ".safetensors" if kind == "safetensors" else ".pt"
    f = tmp_path / f"fuzz{suffix}"
    f.write_bytes(bytes(b))
    try:
        out = load_state_dict(f)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(v, np.ndarray) for v in out.values())


def test_restricted_loads_direct(tmp_path, canary):
    """The unpickler on its own (what every reader uses) refuses payloads and garbage."""
    for pkl in _payloads(canary).values():
        with pytest.raises(CheckpointError):
            restricted_loads(pkl)
    for junk in [b"", b"\x80\x02", b"\x80\x05\x95" + b"\xff" * 8, b"garbage", pickle.dumps(1) + b"extra"]:
        with pytest.raises(CheckpointError):
            restricted_loads(junk)
    big = pickle.dumps(list(range(1000)), protocol=2)
    with pytest.raises(CheckpointError, match="cap"):
        restricted_loads(big, limit=100)
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200k nested lists, no recursion
    assert isinstance(restricted_loads(deep, limit=1 << 20), list)
    assert restricted_loads(pickle.dumps({"a": {1, 2}, "b": b"xy", "c": 1 + 2j, "d": frozenset([3])},
                                         protocol=2)) == {"a": {1, 2}, "b": b"xy", "c": 1 + 2j, "d": frozenset([3])}
    assert float(restricted_loads(pickle.dumps(np.float64(0.25), protocol=2))) == 0.25



@pytest.mark.parametrize("name", ["os.system GLOBAL", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "STACK_GLOBAL via memo", "INST os.system", "nested getattr/__import__"])
def test_payloads_are_live(tmp_path, name):
    """Control: plain pickle.loads DOES run these payloads (so the canary checks above can fail)."""
    c = tmp_path / "pwned"
    r = pickle.loads(_payloads(c)[name])
    if isinstance(r, subprocess.Popen):
        r.wait(timeout=30)
    assert c.exists()
