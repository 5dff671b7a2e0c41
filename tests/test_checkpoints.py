"""Checkpoint readers (loaders/): files written by torch itself read back without torch.

torch is only used to WRITE files and to compute the expected values; the readers never
import it (checked in a subprocess).
"""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from sparsedge.errors import CheckpointError
from sparsedge.loaders.checkpoint import Pt2ArchiveError, checkpoint_kind, load_state_dict
from sparsedge.loaders.unpickler import FP8_TABLES

WIDENED = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _torch():
    return pytest.importorskip("torch")


def _expected(t):
    """What the reader must return for torch tensor t: widened dtypes as float32, else as-is."""
    torch = _torch()
    t = t.detach()
    if str(t.dtype).replace("torch.", "") in WIDENED:
        return t.float().numpy()
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # numpy() refuses some of these
        return t.view(getattr(torch, "int" + str(t.dtype)[-2:])).numpy().view(f"u{t.element_size()}")
    return t.numpy()


def _assert_same(out, sd):
    assert list(out) == [k for k, v in sd.items() if _is_tensor(v)]
    for k, v in sd.items():
        if not _is_tensor(v):
            continue
        exp = _expected(v)
        assert out[k].dtype == exp.dtype, (k, out[k].dtype, exp.dtype)
        assert out[k].shape == exp.shape, (k, out[k].shape, exp.shape)
        np.testing.assert_array_equal(out[k], exp, err_msg=k)


def _is_tensor(v):
    torch = _torch()
    return isinstance(v, torch.Tensor)


def _all_dtypes_sd(torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(3, 5, generator=g) * 10
    sd = {
        "f32": f.clone(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": f.half(),
        "bf16": f.bfloat16(),
        "i8": torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
        "i16": torch.randint(-30000, 30000, (2, 3), generator=g, dtype=torch.int16),
        "i32": torch.randint(-2**31, 2**31 - 1, (5,), generator=g, dtype=torch.int32),
        "i64": torch.tensor([-2**62, 0, 2**62 + 12345], dtype=torch.int64),
        "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            sd[name] = f.to(getattr(torch, name))
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            sd[name] = torch.arange(5, dtype=torch.int64).to(getattr(torch, name)) * 7
    return sd


# ------------------------------------------------------------------------------------------
def test_fp8_tables_match_torch():
    torch = _torch()
    codes = torch.arange(256, dtype=torch.uint8)
    for name, table in FP8_TABLES.items():
        if not hasattr(torch, name):
            continue
        ref = codes.view(getattr(torch, name)).float().numpy()
        np.testing.assert_array_equal(table, ref, err_msg=name)
        assert np.array_equal(np.signbit(table), np.signbit(ref)), name


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_zip_every_dtype_every_protocol(tmp_path, protocol):
    torch = _torch()
    sd = _all_dtypes_sd(torch, protocol)
    f = tmp_path / "m.pt"
    torch.save(sd, f, pickle_protocol=protocol)
    assert checkpoint_kind(f) == "torch-zip"
    _assert_same(load_state_dict(f), sd)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_raw_pickle_every_dtype(tmp_path, protocol):
    torch = _torch()
    sd = _all_dtypes_sd(torch, 10 + protocol)
    f = tmp_path / "legacy.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert checkpoint_kind(f) == "torch-legacy"
    _assert_same(load_state_dict(f), sd)


def _views_sd(torch):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    half = torch.randn(4, 6).half()
    x4 = torch.randn(2, 3, 4, 5)
    return {
        "base": base,
        "transposed": base.t(),
        "sliced": base[1:4, 2:7],
        "offset_row": base[3],
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 4).expand(3, 4),
        "permuted": x4.permute(0, 2, 3, 1),
        "channels_last": x4.contiguous(memory_format=torch.channels_last),
        "half": half,
        "half_t": half.t(),
        "tied": base,
        "tied_half": half,
        "int_view": torch.arange(20, dtype=torch.int64)[5:15:3],
    }


@pytest.mark.parametrize("legacy", [False, True])
def test_views_and_tied_weights(tmp_path, legacy):
    torch = _torch()
    sd = _views_sd(torch)
    f = tmp_path / "v.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=not legacy)
    out = load_state_dict(f)
    _assert_same(out, sd)
    for a, b in [("tied", "base"), ("transposed", "base"), ("sliced", "base"), ("tied_half", "half"),
                 ("half_t", "half")]:
        assert np.shares_memory(out[a], out[b]), (a, b)
    assert not np.shares_memory(out["base"], out["half"])
    assert out["transposed"].strides == (4, 32)
    assert out["expanded"].strides[0] == 0


def _rewrite_zip(src, dst, *, method=zipfile.ZIP_STORED, rename=None, edit=None):
    """Copy a zip, optionally deflating, renaming the top folder, or editing records."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=method) as zout:
        for zi in zin.infolist():
            data = zin.read(zi.filename)
            name = zi.filename
            if rename:
                name = rename + "/" + name.split("/", 1)[1]
            if edit:
                name, data = edit(name, data)
                if name is None:
                    continue
            zout.writestr(name, data)


def test_deflated_records_and_renamed_folder(tmp_path):
    torch = _torch()
    sd = _views_sd(torch)
    sd.update(_all_dtypes_sd(torch, 3))
    f = tmp_path / "m.pt"
    torch.save(sd, f)
    g = tmp_path / "deflated.pt"
    _rewrite_zip(f, g, method=zipfile.ZIP_DEFLATED, rename="some other name")
    with zipfile.ZipFile(g) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
        assert all(i.filename.startswith("some other name/") for i in z.infolist())
    out = load_state_dict(g)
    _assert_same(out, sd)
    assert np.shares_memory(out["tied"], out["base"])


def test_big_endian_byteorder_record(tmp_path):
    torch = _torch()
    sd = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(5).half(),
          "d": torch.randn(2).bfloat16(), "e": torch.tensor([1, 2], dtype=torch.uint8)}
    f = tmp_path / "le.pt"
    torch.save(sd, f)
    isz = {"0": 4, "1": 8, "2": 2, "3": 2, "4": 1}  # storage keys follow pickling order

    def swap(name, data):
        top, rest = name.split("/", 1)
        if rest == "byteorder":
            return name, b"big"
        if rest.startswith("data/"):
            n = isz[rest[5:]]
            return name, np.frombuffer(data, dtype=f"<u{n}").astype(f">u{n}").tobytes()
        return name, data

    g = tmp_path / "be.pt"
    _rewrite_zip(f, g, edit=swap)
    _assert_same(load_state_dict(g), sd)


def test_parameters_and_tensor_state(tmp_path):
    torch = _torch()
    p = torch.nn.Parameter(torch.randn(3, 2))
    q = torch.nn.Parameter(torch.randn(4))
    q.note = "hello"  # Parameter with python state: _rebuild_parameter_with_state
    t = torch.randn(5)
    t.extra = 7  # tensor with python state: _rebuild_from_type_v2
    sd = {"p": p, "q": q, "t": t, "ord": torch.ones(2)}
    f = tmp_path / "p.pt"
    torch.save(sd, f)
    _assert_same(load_state_dict(f), sd)


def test_real_module_state_dict_and_training_checkpoint(tmp_path):
    torch = _torch()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sd = m.state_dict()
    f = tmp_path / "plain.pth"
    torch.save(sd, f)
    _assert_same(load_state_dict(f), sd)
    assert load_state_dict(f)["1.num_batches_tracked"].dtype == np.int64

    ck = tmp_path / "train.ckpt"
    torch.save({"epoch": 3, "model": sd, "optimizer": opt.state_dict(), "best": np.float64(0.25),
                "args": {"lr": 1e-3, "name": "run"}}, ck)
    _assert_same(load_state_dict(ck), sd)  # found unambiguously (optimizer state is nested deeper)
    _assert_same(load_state_dict(ck, key="model"), sd)

    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    amb = tmp_path / "two.ckpt"
    torch.save({"model": sd, "ema": {"model": ema}, "step": torch.tensor(5)}, amb)
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(amb)
    msg = str(ei.value)
    assert "'model'" in msg and "'ema/model'" in msg and "<top level>" in msg and "key=" in msg
    assert "\n" not in msg
    _assert_same(load_state_dict(amb, key="ema/model"), ema)
    _assert_same(load_state_dict(amb, key="/model"), sd)
    with pytest.raises(CheckpointError, match="ambiguous"):
        _ambiguous_leaf(amb)
    with pytest.raises(CheckpointError, match="'nope' does not hold"):
        load_state_dict(amb, key="nope")


def _ambiguous_leaf(path):
    # 'model' is an exact path here, so pick a leaf name shared by two candidates instead
    from sparsedge.loaders.checkpoint import find_state_dict
    from sparsedge.loaders.unpickler import StorageRef, TensorRef, TORCH_DTYPES
    t = TensorRef(StorageRef("0", TORCH_DTYPES["float32"], 4), 0, (1,), (1,), TORCH_DTYPES["float32"])
    find_state_dict({"a": {"w": {"x": t}}, "b": {"w": {"x": t}}}, key="w", source=path)


def test_no_tensors_and_single_tensor(tmp_path):
    torch = _torch()
    f = tmp_path / "a.pt"
    torch.save({"epoch": 1, "name": "x"}, f)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict(f)
    torch.save(torch.ones(3), f)
    with pytest.raises(CheckpointError, match="single tensor"):
        load_state_dict(f)
    torch.save([torch.ones(3)], f)
    with pytest.raises(CheckpointError, match="list"):
        load_state_dict(f)


def test_zero_copy_and_lifetime(tmp_path):
    torch = _torch()
    sd = {"w": torch.randn(64, 32), "i": torch.arange(10)}
    f = tmp_path / "z.pt"
    torch.save(sd, f)
    out = load_state_dict(f)
    w = out["w"]
    assert not w.flags.owndata and not w.flags.writeable
    # the base chain ends in the file's mmap
    b = w
    while getattr(b, "base", None) is not None and isinstance(b, np.ndarray):
        b = b.base
    assert type(b).__name__ in ("mmap", "memoryview"), type(b)
    del out
    import gc
    gc.collect()
    os.unlink(f)  # the mapping outlives the path and every other reference
    np.testing.assert_array_equal(w, sd["w"].numpy())


def test_legacy_tar_format(tmp_path):
    """torch < 0.4 tar checkpoints, built by hand per torch.serialization._legacy_load."""
    torch = _torch()
    a = np.arange(12, dtype=np.float32)
    h = np.array([1.5, -2.0, 3.25], dtype=np.float16)

    def pk(obj):
        return pickle.dumps(obj, protocol=2)

    storages = io.BytesIO()
    storages.write(pk(2))
    storages.write(pk(("1", "cpu", torch.FloatStorage)))
    storages.write(struct.pack("<q", a.size) + a.tobytes())
    storages.write(pk(("2", "cpu", torch.HalfStorage)))
    storages.write(struct.pack("<q", h.size) + h.tobytes())
    storages.write(pk([("3", "1", 4, 6)]))  # storage view: elements 4..9 of storage 1
    tensors = io.BytesIO()
    tensors.write(pk(3))
    for key, skey, size, stride, off in [("10", "1", (3, 4), (4, 1), 0), ("11", "3", (2, 3), (1, 2), 0),
                                         ("12", "2", (3,), (1,), 0)]:
        tensors.write(pk((key, skey, torch.FloatTensor)))
        tensors.write(struct.pack("<i4x", len(size)) + struct.pack(f"<{len(size)}q", *size)
                      + struct.pack(f"<{len(size)}q", *stride) + struct.pack("<q", off))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.key if isinstance(obj, _Key) else None

    main = io.BytesIO()
    P(main, protocol=2).dump({"w": _Key("10"), "view_t": _Key("11"), "h": _Key("12"), "epoch": 4})
    f = tmp_path / "old.pt"
    with tarfile.open(f, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, buf in [("sys_info", io.BytesIO(pk({}))), ("pickle", main), ("storages", storages),
                          ("tensors", tensors)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(buf.getvalue())
            tar.addfile(ti, io.BytesIO(buf.getvalue()))
    assert checkpoint_kind(f) == "torch-tar"
    out = load_state_dict(f)
    np.testing.assert_array_equal(out["w"], a.reshape(3, 4))
    np.testing.assert_array_equal(out["view_t"], a[4:10].reshape(3, 2).T)
    np.testing.assert_array_equal(out["h"], h.astype(np.float32))
    assert np.shares_memory(out["w"], out["view_t"])


class _Key:
    def __init__(self, key):
        self.key = key


# ------------------------------------------------------------------------------------------
# safetensors (written by hand per the spec: the safetensors package is not a dependency)
_ST_CODES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16",
             np.dtype("int8"): "I8", np.dtype("int16"): "I16", np.dtype("int32"): "I32",
             np.dtype("int64"): "I64", np.dtype("uint8"): "U8", np.dtype("uint16"): "U16",
             np.dtype("uint32"): "U32", np.dtype("uint64"): "U64", np.dtype("bool"): "BOOL"}


def write_safetensors(path, tensors, *, metadata=None, raw=None, pad=True):
    """tensors: {name: ndarray}; raw: {name: (dtype code, shape, bytes)} for BF16 / F8."""
    items = [(k, _ST_CODES[v.dtype], list(v.shape), np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"))
              .tobytes()) for k, v in tensors.items()]
    items += [(k, c, list(s), b) for k, (c, s, b) in (raw or {}).items()]
    header, off, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for k, code, shape, b in items:
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _bf16(x):
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_safetensors_all_dtypes(tmp_path, rng):
    ts = {"f32": rng.standard_normal((3, 4)).astype(np.float32),
          "f64": rng.standard_normal(5),
          "f16": rng.standard_normal((2, 2)).astype(np.float16),
          "i8": rng.integers(-128, 127, 9).astype(np.int8),
          "i16": rng.integers(-9, 9, (3, 1)).astype(np.int16),
          "i32": rng.integers(-9, 9, 4).astype(np.int32),
          "i64": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
          "u8": rng.integers(0, 255, 3).astype(np.uint8),
          "u16": np.array([0, 65535], np.uint16), "u32": np.array([7], np.uint32),
          "u64": np.array([2**63 + 5], np.uint64), "bool": np.array([True, False]),
          "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    bf = rng.standard_normal(6).astype(np.float32)
    e4 = np.arange(0, 256, 7, dtype=np.uint8)
    raw = {"bf16": ("BF16", [2, 3], _bf16(bf).tobytes()), "f8a": ("F8_E4M3", [e4.size], e4.tobytes()),
           "f8b": ("F8_E5M2", [e4.size], e4.tobytes())}
    f = tmp_path / "m.safetensors"
    write_safetensors(f, ts, metadata={"format": "pt"}, raw=raw)
    assert checkpoint_kind(f) == "safetensors"
    out = load_state_dict(f)
    assert set(out) == set(ts) | set(raw)
    for k, v in ts.items():
        exp = v.astype(np.float32) if v.dtype == np.float16 else v
        assert out[k].dtype == exp.dtype and out[k].shape == exp.shape, k
        np.testing.assert_array_equal(out[k], exp)
    np.testing.assert_array_equal(out["bf16"], (_bf16(bf).astype(np.uint32) << 16).view(np.float32).reshape(2, 3))
    np.testing.assert_array_equal(out["f8a"], FP8_TABLES["float8_e4m3fn"][e4])
    np.testing.assert_array_equal(out["f8b"], FP8_TABLES["float8_e5m2"][e4])
    assert not out["f32"].flags.writeable and not out["f32"].flags.owndata
    with pytest.raises(CheckpointError, match="already flat"):
        load_state_dict(f, key="model")


def test_safetensors_matches_torch(tmp_path):
    """bf16 / f16 / f8 bytes produced by torch widen exactly as torch does."""
    torch = _torch()
    sd = _all_dtypes_sd(torch, 7)
    code = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
            torch.bool: "BOOL"}
    for n, c in [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                 ("uint32", "U32"), ("uint64", "U64")]:
        if hasattr(torch, n):
            code[getattr(torch, n)] = c
    raw = {k: (code[v.dtype], list(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes()
               if v.numel() and v.dim() else _bytes_of(torch, v)) for k, v in sd.items()}
    f = tmp_path / "t.safetensors"
    write_safetensors(f, {}, raw=raw)
    _assert_same(load_state_dict(f), sd)


def _bytes_of(torch, v):
    return v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def test_sharded_safetensors_and_hf_folders(tmp_path, rng):
    a = {"emb.weight": rng.standard_normal((5, 3)).astype(np.float32), "ln.bias": np.arange(3, dtype=np.float32)}
    b = {"fc.weight": rng.standard_normal((2, 3)).astype(np.float32), "fc.bias": np.ones(2, np.float16)}
    d = tmp_path / "hf"
    d.mkdir()
    write_safetensors(d / "model-00001-of-00002.safetensors", a)
    write_safetensors(d / "model-00002-of-00002.safetensors", b)
    wm = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    for src in (d / "model.safetensors.index.json", d):
        out = load_state_dict(src)
        assert list(out) == list(wm)
        for k, v in {**a, **b}.items():
            np.testing.assert_array_equal(out[k], v.astype(np.float32) if v.dtype == np.float16 else v)
    # single-file model.safetensors wins over the index in a folder
    write_safetensors(d / "model.safetensors", {"only": np.zeros(2, np.float32)})
    assert list(load_state_dict(d)) == ["only"]
    # index problems
    for wmap, pat in [({"x": "../evil.safetensors"}, "plain file name"), ({"x": "nothere.safetensors"}, "missing"),
                      ({"nope": "model-00001-of-00002.safetensors"}, "does not hold it")]:
        bad = d / "bad.safetensors.index.json"
        bad.write_text(json.dumps({"weight_map": wmap}))
        with pytest.raises(CheckpointError, match=pat):
            load_state_dict(bad)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds none of"):
        load_state_dict(empty)
    # a folder with one weights file of another name
    other = tmp_path / "diffusers"
    other.mkdir()
    write_safetensors(other / "diffusion_pytorch_model.safetensors", {"u": np.ones(3, np.float32)})
    assert list(load_state_dict(other)) == ["u"]
    write_safetensors(other / "second.safetensors", {"v": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="several weight files"):
        load_state_dict(other)


def test_safetensors_bool_bytes_normalised(tmp_path):
    f = tmp_path / "b.safetensors"
    write_safetensors(f, {}, raw={"b": ("BOOL", [4], bytes([0, 1, 2, 255]))})
    out = load_state_dict(f)["b"]
    assert out.dtype == np.bool_ and out.tolist() == [False, True, True, True]
    assert out.view(np.uint8).max() == 1


def test_hf_folder_pytorch_bin_shards(tmp_path):
    torch = _torch()
    d = tmp_path / "hf"
    d.mkdir()
    s1 = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3).half()}
    s2 = {"b.weight": torch.randn(2, 2).bfloat16()}
    torch.save(s1, d / "pytorch_model-00001-of-00002.bin")
    torch.save(s2, d / "pytorch_model-00002-of-00002.bin")
    wm = {**{k: "pytorch_model-00001-of-00002.bin" for k in s1}, **{k: "pytorch_model-00002-of-00002.bin" for k in s2}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    assert checkpoint_kind(d / "pytorch_model.bin.index.json") == "torch-index"
    _assert_same(load_state_dict(d), {**s1, **s2})
    torch.save({**s1, **s2}, d / "pytorch_model.bin")
    _assert_same(load_state_dict(d), {**s1, **s2})


def test_pt2_refused_unless_trusted(tmp_path):
    f = tmp_path / "m.pt2"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("m/archive_format", "pt2")
    with pytest.raises(CheckpointError, match="trusted") as ei:
        load_state_dict(f)
    assert not isinstance(ei.value, Pt2ArchiveError)
    with pytest.raises(Pt2ArchiveError) as ei:
        load_state_dict(f, trusted=True)
    assert ei.value.path == str(f)
    g = tmp_path / "renamed.pt"  # a .pt2 archive under another extension is recognised too
    os.rename(f, g)
    assert checkpoint_kind(g) == "pt2"
    with pytest.raises(CheckpointError, match="pt2") as ei:
        load_state_dict(g)
    assert not isinstance(ei.value, Pt2ArchiveError)
    with pytest.raises(Pt2ArchiveError):
        load_state_dict(g, trusted=True)


def test_real_pt2_archive_refused(tmp_path):
    torch = _torch()
    ep = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    f = tmp_path / "lin.pt2"
    torch.export.save(ep, f)
    with pytest.raises(CheckpointError, match="may execute code"):
        load_state_dict(f)


def test_readers_never_import_torch(tmp_path, rng):
    f = tmp_path / "m.safetensors"
    write_safetensors(f, {"w": rng.standard_normal(3).astype(np.float32)})
    code = ("import sys; from sparsedge.loaders.checkpoint import load_state_dict; "
            f"load_state_dict({str(f)!r}); import sparsedge.loaders.torchzip, sparsedge.loaders.legacy; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
