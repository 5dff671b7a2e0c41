"""Hostile model files: every case must load-and-validate or raise ModelFileError, nothing else.

Run with checksums on and off (``verify_checksums=False`` is the test switch that lets corrupt
bytes reach the validators). ``SPARSEDGE_FUZZ_CASES=N`` sets the number of random mutations per
mode (default 1500; each mode also runs the structured header mutations); ``SPARSEDGE_FUZZ_SEED=S``
picks another random stream.
"""
from __future__ import annotations

import copy
import json
import os
import tracemalloc
import zlib

import numpy as np
import pytest

from _formats_util import fix_buffer_crcs, linear_graph, one_of_each, rebuild, split
from sparsedge.errors import ModelFileError
from sparsedge.formats import modelfile as mfmod
from sparsedge.formats.graph import Node, ValueInfo
from sparsedge.formats.modelfile import read_model, write_model

FUZZ_CASES = int(os.environ.get("SPARSEDGE_FUZZ_CASES", "1500"))
FUZZ_SEED = int(os.environ.get("SPARSEDGE_FUZZ_SEED", "0"))
MODES = [True, False]  # verify_checksums


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    """Unexpected exceptions inside validation propagate (and fail the test) instead of being wrapped."""
    monkeypatch.setattr(mfmod, "_WRAP_UNEXPECTED", False)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(path, bytes, header, data section) of a valid file holding every format."""
    d = tmp_path_factory.mktemp("hostile")
    ts = one_of_each()
    g = linear_graph(ts)
    g.inputs.append(ValueInfo("img", "float32", ["batch", 3, 8, 8]))
    g.nodes.append(Node("conv2d", "conv", ["img", "conv_csr", ""], ["z"], {"padding": [1, 1]}))
    g.outputs.append(ValueInfo("z", "float32", ["batch", 8, 8, 8]))
    p = d / "valid.sparsedge"
    write_model(p, g, ts, {"source": "hostile"})
    blob = p.read_bytes()
    _, h, data = split(blob)
    return p, blob, h, data


def outcome(path, verify, *, use_mmap=True):
    """'ok' (loaded; every tensor re-validated and densified when small) or 'error' (ModelFileError)."""
    try:
        mf = read_model(path, verify_checksums=verify, mmap=use_mmap)
    except ModelFileError:
        return "error"
    try:
        for t in mf.tensors.values():
            t.validate(full=True)
            if t.kind != "dense" and int(np.prod(t.shape)) <= 1 << 20:
                t.to_dense()  # fancy indexing with the stored indices: IndexError if validation let one through
    finally:
        mf.close()
    return "ok"


def must_fail(path, verify, match=None):
    with pytest.raises(ModelFileError, match=match) as ei:
        read_model(path, verify_checksums=verify)
    assert str(path) in str(ei.value)
    return ei.value


def write(tmp_path, blob, name="h.sparsedge"):
    q = tmp_path / name
    q.write_bytes(blob)
    return q


def with_header(h, data, **kw):
    return rebuild(h, data, **kw)


def tensor(h, name):
    return next(t for t in h["tensors"] if t["name"] == name)


# ---------------------------------------------------------------------------------------------
# truncation, preamble, header
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verify", MODES)
def test_truncated_at_every_section_boundary(valid, tmp_path, verify):
    p, blob, h, data = valid
    hlen = mfmod.PREAMBLE.unpack(blob[:64])[4]
    d0 = len(blob) - len(data)
    cuts = {0, 1, 8, 12, 16, 24, 32, 60, 63, 64, 65, 64 + hlen // 2, 64 + hlen - 1, 64 + hlen, d0 - 1, d0,
            len(blob) - 1}
    for t in h["tensors"]:
        for a in t["arrays"].values():
            cuts |= {d0 + a["offset"], d0 + a["offset"] + a["nbytes"] - 1, d0 + a["offset"] + 1}
    for c in sorted(x for x in cuts if 0 <= x < len(blob)):
        q = write(tmp_path, blob[:c])
        must_fail(q, verify, "truncated|shorter|bytes but the file has|file is")
    # trailing garbage is refused too (the preamble records the size)
    must_fail(write(tmp_path, blob + b"\0" * 64), verify, "trailing")


@pytest.mark.parametrize("verify", MODES)
def test_bad_preamble(valid, tmp_path, verify):
    p, blob, h, data = valid
    must_fail(write(tmp_path, b"NOTSPRSE" + blob[8:]), verify, "magic")
    must_fail(write(tmp_path, b""), verify, "shorter")
    must_fail(write(tmp_path, with_header(h, data, major=mfmod.MAJOR + 1)), verify, "newer")
    must_fail(write(tmp_path, with_header(h, data, flags=4)), verify, "flags")
    # header length beyond the cap / beyond the file, with a consistent preamble CRC
    import struct
    for hlen in (mfmod.HEADER_MAX + 1, 2 ** 64 - 1, len(blob)):
        b = bytearray(blob)
        b[16:24] = struct.pack("<Q", hlen)
        b[60:64] = struct.pack("<I", zlib.crc32(bytes(b[:60])))
        must_fail(write(tmp_path, bytes(b)), verify, "header")
    if verify:
        b = bytearray(blob)
        b[10] ^= 1  # minor version, preamble CRC now wrong
        must_fail(write(tmp_path, bytes(b)), verify, "preamble checksum")
        b = bytearray(blob)
        b[70] ^= 1
        must_fail(write(tmp_path, bytes(b)), verify, "header checksum")


@pytest.mark.parametrize("verify", MODES)
def test_bad_json(valid, tmp_path, verify):
    p, blob, h, data = valid
    raw = json.dumps(h).encode()
    for bad, match in [(b"\xff\xfe" + raw, "JSON"), (raw[:-1], "JSON"), (b"[]", "object"),
                       (raw.replace(b'"source": "hostile"', b'"source": NaN'), "JSON"),
                       (raw.replace(b'"source": "hostile"', b'"source": 1e999'), "JSON"),
                       (raw.replace(b'"source": "hostile"', b'"source": 1, "source": 2'), "JSON"),
                       (raw.replace(b'"source": "hostile"', b'"source": ' + b"9" * 5000), "JSON"),
                       (raw.replace(b'"source": "hostile"', b'"source": ' + b"[" * 100000 + b"]" * 100000), "deep"),
                       (raw.replace(b'"source": "hostile"', b'"source": ' + b"[" * 100 + b"]" * 100), "deep")]:
        must_fail(write(tmp_path, rebuild(None, data, raw_header=bad)), verify, match)


# ---------------------------------------------------------------------------------------------
# tensor table: bounds, sizes, overlap, allow-lists
# ---------------------------------------------------------------------------------------------
def _table_cases(h, data):
    """(description, mutated header, expected message regex)."""
    cases = []

    def case(desc, match, fn):
        h2 = copy.deepcopy(h)
        fn(h2)
        cases.append((desc, h2, match))

    csr = lambda h2: tensor(h2, "csr")  # noqa: E731
    case("overlap", "overlaps", lambda h2: csr(h2)["arrays"]["data"].update(offset=csr(h2)["arrays"]["indices"]["offset"]))
    case("out of file", "outside", lambda h2: csr(h2)["arrays"]["data"].update(offset=len(data) + 64))
    case("past end", "outside", lambda h2: csr(h2)["arrays"]["data"].update(
        offset=(len(data) - csr(h2)["arrays"]["data"]["nbytes"] + 64) // 64 * 64))
    case("misaligned", "aligned", lambda h2: csr(h2)["arrays"]["data"].update(offset=csr(h2)["arrays"]["data"]["offset"] + 4))
    case("negative offset", "non-negative", lambda h2: csr(h2)["arrays"]["data"].update(offset=-64))
    case("bool offset", "non-negative", lambda h2: csr(h2)["arrays"]["data"].update(offset=True))
    case("float nbytes", "non-negative", lambda h2: csr(h2)["arrays"]["data"].update(nbytes=4.0))
    case("nbytes mismatch", "nbytes", lambda h2: csr(h2)["arrays"]["data"].update(nbytes=csr(h2)["arrays"]["data"]["nbytes"] + 4))
    case("overflow 2^64", "nbytes", lambda h2: csr(h2)["arrays"]["data"].update(shape=[2 ** 32, 2 ** 32], nbytes=0))
    case("overflow wrap", "nbytes", lambda h2: csr(h2)["arrays"]["data"].update(shape=[2 ** 61, 8], nbytes=(2 ** 66) % 2 ** 64))
    case("huge dims", "nbytes", lambda h2: csr(h2)["arrays"]["data"].update(shape=[2 ** 61] * 8, nbytes=64))
    case("dim too large", "ints", lambda h2: csr(h2)["arrays"]["data"].update(shape=[2 ** 70]))
    case("too many dims", "ints", lambda h2: csr(h2)["arrays"]["data"].update(shape=[1] * 9))
    case("negative dim", "ints", lambda h2: csr(h2)["arrays"]["data"].update(shape=[-1]))
    case("dtype object", "not allowed", lambda h2: csr(h2)["arrays"]["data"].update(dtype="object"))
    case("dtype float64", "not allowed", lambda h2: csr(h2)["arrays"]["data"].update(dtype="float64"))
    case("dtype swapped", "dtype", lambda h2: csr(h2)["arrays"]["data"].update(dtype="int32"))
    case("dtype list", "not allowed", lambda h2: csr(h2)["arrays"]["data"].update(dtype=["float32"]))
    case("crc range", "non-negative", lambda h2: csr(h2)["arrays"]["data"].update(crc32=2 ** 40))
    case("extra key", "exactly", lambda h2: csr(h2)["arrays"]["data"].update(extra=1))
    case("missing array", "missing", lambda h2: csr(h2)["arrays"].pop("data"))
    case("extra array", "unexpected|overlaps", lambda h2: csr(h2)["arrays"].update(more=dict(csr(h2)["arrays"]["data"])))
    case("unknown kind", "unknown format kind", lambda h2: csr(h2).update(kind="coo"))
    case("kind not declared", "required_features",
         lambda h2: h2.update(required_features=[f for f in h2["required_features"] if f != "format:nm"]))
    case("bf16 not declared", "required_features",
         lambda h2: h2.update(required_features=[f for f in h2["required_features"] if f != "dtype:bfloat16"]))
    case("act_quant not declared", "required_features",
         lambda h2: h2.update(required_features=[f for f in h2["required_features"] if f != "act_quant"]))
    case("duplicate tensor", "duplicate", lambda h2: h2["tensors"].append(copy.deepcopy(csr(h2))))
    case("empty name", "name", lambda h2: csr(h2).update(name=""))
    case("shape mismatch", "shape", lambda h2: csr(h2).update(shape=[13, 23, 1]))
    case("shape too small", "index|indices", lambda h2: csr(h2).update(shape=[13, 2]))
    case("shape rows", "shape", lambda h2: csr(h2).update(shape=[12, 22]))
    case("orig_shape", "orig_shape", lambda h2: tensor(h2, "conv_csr").update(orig_shape=[8, 3, 3, 4]))
    case("meta type", "meta", lambda h2: csr(h2).update(meta=[]))
    case("block meta", "block", lambda h2: tensor(h2, "bsr_4x4")["meta"].update(block=[4, 0]))
    case("block mismatch", "data", lambda h2: tensor(h2, "bsr_4x4")["meta"].update(block=[4, 1]))
    case("nm meta", "meta.n", lambda h2: tensor(h2, "nm_2_4")["meta"].update(n=9))
    case("quant mode", "mode", lambda h2: tensor(h2, "i8_sym_ch")["meta"].update(mode="asymmetric"))
    case("granularity flip", "scale", lambda h2: tensor(h2, "i8_sym_ch")["meta"].update(granularity="tensor"))
    case("mode flip", "zero_point", lambda h2: tensor(h2, "i8_aff_t")["meta"].update(mode="symmetric"))
    case("rank", "rank|shape", lambda h2: tensor(h2, "lr_f32")["meta"].update(rank=0))
    case("lowrank dtype flip", "u_scale|missing|unexpected", lambda h2: tensor(h2, "lr_f32")["meta"].update(dtype="int8"))
    case("dense dtype meta", "dtype", lambda h2: tensor(h2, "dense_f32")["meta"].update(dtype="float64"))
    case("bf16 storage", "values", lambda h2: tensor(h2, "dense_f32")["meta"].update(dtype="bfloat16"))
    case("tensors not list", "tensors", lambda h2: h2.update(tensors={}))
    case("no graph", "graph", lambda h2: h2.pop("graph"))
    case("features not list", "required_features", lambda h2: h2.update(required_features="format:csr"))
    case("format key", "format", lambda h2: h2.update(format="onnx"))
    case("version mismatch", "version", lambda h2: h2.update(version=[1, 9]))
    case("metadata list", "metadata", lambda h2: h2.update(metadata=[1]))
    # graph
    case("cycle", "cyclic", lambda h2: h2["graph"]["nodes"].reverse())
    case("undefined input", "not defined", lambda h2: h2["graph"]["nodes"][0]["inputs"].__setitem__(0, "nope"))
    case("unknown op", "unknown op", lambda h2: h2["graph"]["nodes"][0].update(op="custom_gemm"))
    case("bad attr", "attribute", lambda h2: h2["graph"]["nodes"][0]["attrs"].update(activation=[1]))
    case("act_quant nan", "scale", lambda h2: h2["graph"]["act_quant"]["x"].update(scale=-0.0))
    case("act_quant zp", "zero_point", lambda h2: h2["graph"]["act_quant"]["x"].update(zero_point=300))
    case("compressed at non-weight input", "compressed",
         lambda h2: h2["graph"]["nodes"][0]["inputs"].__setitem__(0, "csr"))
    return cases


@pytest.mark.parametrize("verify", MODES)
def test_tensor_table_and_graph(valid, tmp_path, verify):
    p, blob, h, data = valid
    cases = _table_cases(h, data)
    assert len(cases) > 50
    for desc, h2, match in cases:
        q = write(tmp_path, rebuild(h2, data))
        try:
            must_fail(q, verify, match)
        except BaseException as e:  # name the case
            raise AssertionError(f"case {desc!r}: {e!r}") from e


# ---------------------------------------------------------------------------------------------
# data: corrupt index arrays and scales with valid checksums (only the validators can catch them)
# ---------------------------------------------------------------------------------------------
def _patch(h, data, name, array, fn):
    a = tensor(h, name)["arrays"][array]
    dt = np.dtype(mfmod.ARRAY_DTYPES[a["dtype"]])
    buf = bytearray(data)
    arr = np.frombuffer(buf, dtype=dt, count=a["nbytes"] // dt.itemsize, offset=a["offset"]).copy()
    fn(arr)
    buf[a["offset"]:a["offset"] + a["nbytes"]] = arr.tobytes()
    h2 = copy.deepcopy(h)
    fix_buffer_crcs(h2, bytes(buf))
    return rebuild(h2, bytes(buf))


DATA_CASES = [
    ("csr", "indices", lambda a: a.__setitem__(0, 22), "out of range"),
    ("csr", "indices", lambda a: a.__setitem__(0, -5), "negative"),
    ("csr_u16", "indices", lambda a: a.__setitem__(-1, 65535), "out of range"),
    ("csr", "indptr", lambda a: a.__setitem__(3, a[4] + 1), "non-decreasing"),
    ("csr", "indptr", lambda a: a.__setitem__(0, 1), "start at 0"),
    ("csr", "indptr", lambda a: a.__setitem__(-1, a[-1] - 1), "end at nnz"),
    ("csr_i8", "indptr", lambda a: a.__setitem__(5, 2 ** 31 - 1), "non-decreasing"),
    ("csr", "indices", lambda a: a.__setitem__(1, a[0]), "sorted and unique"),
    ("bsr_4x4", "indices", lambda a: a.__setitem__(0, 6), "out of range"),
    ("bsr_i8", "indptr", lambda a: a.__setitem__(1, -1), "non-decreasing"),
    ("bsr_4x4", "data", lambda a: a.reshape(-1, 4, 4).__setitem__((-1, 3, 0), 1.0), "padding"),
    ("nm_2_4", "offsets", lambda a: a.__setitem__(0, 7), "outside the group"),
    ("nm_2_4", "offsets", lambda a: a.__setitem__(1, a[0]), "strictly increasing"),
    ("i8_sym_ch", "scale", lambda a: a.__setitem__(2, np.nan), "finite"),
    ("i8_sym_ch", "scale", lambda a: a.__setitem__(2, -1.0), "> 0"),
    ("i8_sym_ch", "zero_point", lambda a: a.__setitem__(0, 1), "must be 0"),
    ("i8_aff_t", "zero_point", lambda a: a.__setitem__(0, 1000), "int8 range"),
    ("csr_i8", "scale", lambda a: a.__setitem__(0, np.inf), "finite"),
    ("bsr_i8", "scale", lambda a: a.__setitem__(0, 0.0), "> 0"),
    ("lr_i8", "v_scale", lambda a: a.__setitem__(0, -np.inf), "finite"),
]


@pytest.mark.parametrize("verify", MODES)
@pytest.mark.parametrize("case", DATA_CASES, ids=[f"{c[0]}.{c[1]}.{i}" for i, c in enumerate(DATA_CASES)])
def test_corrupt_data_with_valid_checksums(valid, tmp_path, verify, case):
    p, blob, h, data = valid
    name, array, fn, match = case
    e = must_fail(write(tmp_path, _patch(h, data, name, array, fn)), verify, match)
    assert e.tensor == name and e.field == array


def test_no_allocation_beyond_file_size(valid, tmp_path):
    p, blob, h, data = valid
    cases = [c for c in _table_cases(h, data) if "overflow" in c[0] or "huge" in c[0] or "nbytes" in c[0]]
    tracemalloc.start()
    try:
        for _, h2, _ in cases:
            q = write(tmp_path, rebuild(h2, data))
            tracemalloc.reset_peak()
            with pytest.raises(ModelFileError):
                read_model(q, verify_checksums=False)
            assert tracemalloc.get_traced_memory()[1] < 4 * len(blob) + (1 << 20)
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# mutation fuzzing
# ---------------------------------------------------------------------------------------------
def _mutate_bytes(blob: bytes, rng) -> bytes:
    b = bytearray(blob)
    hlen = mfmod.PREAMBLE.unpack(blob[:64])[4]
    kind = rng.integers(8)
    # bias towards the preamble and header, where the structure is
    where = lambda: int(rng.integers(0, 64 + hlen)) if rng.random() < 0.6 else int(rng.integers(len(b)))  # noqa
    if kind <= 2:  # flip 1..8 bits
        for _ in range(int(rng.integers(1, 9))):
            b[where()] ^= 1 << int(rng.integers(8))
    elif kind == 3:  # overwrite a run with random bytes / 0x00 / 0xff / digits
        i, n = where(), int(rng.integers(1, 17))
        fill = rng.choice(4)
        run = (rng.integers(0, 256, n).astype(np.uint8).tobytes(), b"\0" * n, b"\xff" * n,
               bytes(rng.choice(list(b"0123456789"), n).astype(np.uint8)))[fill]
        b[i:i + n] = run[:len(b) - i] if i + n > len(b) else run
    elif kind == 4:  # insert or delete bytes (shifts everything after)
        i = where()
        if rng.random() < 0.5:
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 5))).astype(np.uint8).tobytes()
        else:
            del b[i:i + int(rng.integers(1, 5))]
    elif kind == 5:  # truncate anywhere
        b = b[:int(rng.integers(len(b)))]
    elif kind == 6:  # replace a digit inside the header (offsets, shapes, sizes)
        digits = [i for i in range(64, 64 + hlen) if 48 <= b[i] <= 57]
        for _ in range(int(rng.integers(1, 4))):
            b[digits[int(rng.integers(len(digits)))]] = int(rng.integers(48, 58))
    else:  # copy a run from elsewhere in the file
        i, j, n = where(), where(), int(rng.integers(1, 33))
        b[i:i + n] = b[j:j + n]
    return bytes(b)


HOSTILE_VALUES = [0, -1, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, -2 ** 63, 2 ** 64 + 7, 10 ** 30, 0.5, -0.0, 1e300, True, False,
                  None, "", "x", "float32", "uint16", "csr", "linear", [], [0], [-1], [2 ** 62, 2 ** 62], {}, {"a": 1},
                  [[[]]], "format:csr"]


def _mutate_json(h: dict, rng):
    """Replace / delete / duplicate one random node of the header tree."""
    h = copy.deepcopy(h)
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, path + [i])
    walk(h, [])
    path = paths[int(rng.integers(1, len(paths)))]
    parent = h
    for k in path[:-1]:
        parent = parent[k]
    k = path[-1]
    op = rng.integers(5)
    if op <= 2:
        parent[k] = copy.deepcopy(HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))])
    elif op == 3:
        if isinstance(parent, dict):
            del parent[k]
        else:
            parent.pop(k)
    else:
        v = parent[k]
        if isinstance(v, int) and not isinstance(v, bool):
            parent[k] = v + int(rng.choice([-64, -8, -4, -1, 1, 4, 8, 64]))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(v))
        else:
            parent[k] = [v]
    return h


def _run_fuzz(valid, tmp_path, verify, n, seed, structured):
    p, blob, h, data = valid
    rng = np.random.default_rng(seed)
    q = tmp_path / "fuzz.sparsedge"
    counts = {"ok": 0, "error": 0}
    for i in range(n):
        mutated = rebuild(_mutate_json(h, rng), data) if structured else _mutate_bytes(blob, rng)
        q.write_bytes(mutated)
        try:
            counts[outcome(q, verify, use_mmap=bool(i % 2))] += 1
        except BaseException as e:
            (tmp_path / "failing.sparsedge").write_bytes(mutated)
            raise AssertionError(f"case {i} (seed {seed}, structured={structured}, verify={verify}): "
                                 f"{type(e).__name__}: {e}; file kept at {tmp_path / 'failing.sparsedge'}") from e
    return counts


@pytest.mark.parametrize("verify", MODES)
def test_fuzz_random_bytes(valid, tmp_path, verify):
    counts = _run_fuzz(valid, tmp_path, verify, FUZZ_CASES, 1000 + verify + 10 * FUZZ_SEED, structured=False)
    assert counts["error"] > 0
    if not verify:
        assert counts["ok"] > 0  # with checksums off some mutations (e.g. of float values) load fine


@pytest.mark.parametrize("verify", MODES)
def test_fuzz_structured_header(valid, tmp_path, verify):
    counts = _run_fuzz(valid, tmp_path, verify, max(200, FUZZ_CASES // 3), 2000 + verify + 10 * FUZZ_SEED, structured=True)
    assert counts["error"] > 0
