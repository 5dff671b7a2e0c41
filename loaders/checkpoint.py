"""One entry point for reading checkpoints safely: :func:`load_state_dict`.

Never imports torch, never calls ``torch.load`` / ``pickle.load``: pickled checkpoints go
through :mod:`.unpickler` (an allow-list of inert stand-ins; anything else is refused with a
CheckpointError naming the global, before it could run).

Accepted sources (the kind is sniffed from the content, the extension only breaks ties):

* torch zip checkpoints (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` from ``torch.save``, torch >= 1.6),
* legacy torch checkpoints (raw pickle stream, torch 0.4-1.5 or ``_use_new_zipfile_serialization=False``;
  tar archives, torch < 0.4),
* ``.safetensors`` files and sharded checkpoints (``*.safetensors.index.json``,
  ``pytorch_model.bin.index.json``),
* a Hugging Face model folder: ``model.safetensors``, ``model.safetensors.index.json``,
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (first found, in this order), else
  the folder's only ``*.safetensors.index.json`` / ``*.safetensors`` / ``*.bin.index.json`` /
  ``*.bin|.pt|.pth|.ckpt`` file.

``.pt2`` (torch.export) archives are refused: their loader uses ``torch.load`` and may run
code. With ``trusted=True`` a :class:`Pt2ArchiveError` (a CheckpointError) is raised instead,
carrying ``path``: the converter catches it and, having been told the file is trusted, loads
the archive with ``torch.export.load`` itself. TorchScript archives are refused.

Returned arrays: float16 / bfloat16 / float8 (e4m3fn, e5m2, their fnuz variants, e8m0) are
widened to float32; float32, float64 (kept as float64), int8/16/32/64, uint8/16/32/64, bool and
complex are kept as stored. Arrays read from uncompressed data are zero-copy, **read-only**
views on a memory map of the file (valid after return and after the file is closed; copy
before modifying). Tensors that share a storage (tied weights) share memory. Only tensors are
returned: other entries (ints, strings, optimizer state outside the chosen state_dict) are
skipped.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from ..errors import CheckpointError
from .legacy import is_legacy_pickle, is_tar, read_legacy_pickle, read_legacy_tar
from .safetensors import is_safetensors, load_sharded, read_safetensors
from .torchzip import DEFAULT_SIZE_CAP, is_zip, read_torch_zip
from .unpickler import MAX_PICKLE_BYTES, TensorRef, one_line

__all__ = ["load_state_dict", "checkpoint_kind", "find_state_dict", "Pt2ArchiveError", "DEFAULT_SIZE_CAP",
           "HF_WEIGHT_FILES"]

# looked for, in this order, in a Hugging Face model folder
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_MAX_SEARCH_DEPTH = 4
_MAX_SEARCH_NODES = 100_000


class Pt2ArchiveError(CheckpointError):
    """A torch.export ``.pt2`` archive given with ``trusted=True``: load it with
    ``torch.export.load(err.path)`` (which may run code). Without ``trusted`` a plain
    CheckpointError refuses the file."""

    def __init__(self, path):
        self.path = path
        super().__init__("torch.export .pt2 archive: read it with torch.export.load (trusted=True was given; "
                         "it uses torch.load and may execute code)", file=path)


def _head(path, n=512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None


def _is_pt2_zip(path) -> bool:
    """A torch.export archive under another extension (it has an ``<folder>/archive_format`` record)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.count("/") == 1 and n.endswith("/archive_format") for n in zf.namelist())
    except Exception:  # unreadable zips are reported by the zip reader itself
        return False


def checkpoint_kind(path) -> str:
    """What ``path`` is: "hf-folder", "safetensors", "safetensors-index", "torch-index",
    "pt2", "torch-zip", "torch-legacy", "torch-tar". Raises CheckpointError if unknown."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return "hf-folder"
    if not os.path.exists(p):
        raise CheckpointError("no such file or folder", file=p)
    if p.endswith(".index.json"):
        return "safetensors-index" if p.endswith(".safetensors.index.json") else "torch-index"
    head = _head(p)
    if not head:
        raise CheckpointError("empty file", file=p)
    if p.endswith(".pt2"):
        return "pt2"
    if p.endswith(".safetensors"):
        return "safetensors"  # parsed as such, so header problems get a precise message
    if is_zip(head):
        return "pt2" if _is_pt2_zip(p) else "torch-zip"
    if is_tar(head):
        return "torch-tar"
    if is_legacy_pickle(head):
        return "torch-legacy"
    if is_safetensors(head):
        return "safetensors"
    if p.endswith(".json"):
        return "safetensors-index"
    raise CheckpointError("not a recognised checkpoint (torch zip, legacy torch, safetensors, index json "
                          "or model folder)", file=p)


def _hf_folder(path) -> str:
    for name in HF_WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    try:
        listing = sorted(os.listdir(path))
    except OSError:
        listing = []
    # otherwise a single weights file of another name (diffusers, exported checkpoints...)
    for suffixes in ((".safetensors.index.json",), (".safetensors",), (".bin.index.json",),
                     (".bin", ".pt", ".pth", ".ckpt")):
        found = [n for n in listing if n.endswith(suffixes) and os.path.isfile(os.path.join(path, n))
                 and not (suffixes == (".safetensors",) and "-of-" in n)]
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1:
            raise CheckpointError(f"model folder holds several weight files ({', '.join(found[:6])}); "
                                  "give the file itself", file=path)
    listing = listing[:20]
    raise CheckpointError(f"model folder holds none of {', '.join(HF_WEIGHT_FILES)} (found: "
                          f"{', '.join(listing) or 'nothing'})", file=path)


def _tensor_items(d: dict):
    return [(k, v) for k, v in d.items() if isinstance(k, str) and isinstance(v, TensorRef)]


def find_state_dict(obj, *, key=None, source=None) -> tuple[str, dict]:
    """The dict of tensors inside an unpickled checkpoint: ``(path, dict)``.

    Candidates are dicts (the top level, or nested under string dict keys up to 4 levels, not
    inside optimizer state_dicts, i.e. dicts with 'param_groups', nor inside lists) holding at
    least one tensor value under a string key; a candidate's path joins its keys with '/'
    ("" is the top level). ``key`` picks one by path (or by a key anywhere if unique);
    otherwise there must be exactly one candidate, else a CheckpointError lists them."""
    if isinstance(obj, TensorRef):
        raise CheckpointError("checkpoint holds a single tensor, not a state_dict (a dict of tensors)",
                              file=source)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors", file=source)
    cands: list[tuple[str, dict, int]] = []
    stack = [("", obj, 0)]
    seen, nodes = set(), 0
    while stack:
        p, d, depth = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        nodes += 1
        if nodes > _MAX_SEARCH_NODES:
            break
        n = len(_tensor_items(d))
        if n:
            cands.append((p, d, n))
        if depth < _MAX_SEARCH_DEPTH:
            for k, v in reversed(list(d.items())):
                # optimizer state_dicts ({'state': {0: {...}}, 'param_groups': [...]}) are skipped
                if isinstance(v, dict) and isinstance(k, str) and "param_groups" not in v:
                    stack.append((f"{p}/{k}" if p else str(k), v, depth + 1))
    cands.sort(key=lambda c: c[0])

    def listing():
        return ", ".join(f"{(c[0] or '<top level>')!r} ({c[2]} tensors)" for c in cands[:12])

    if key is not None:
        key = str(key).strip("/")
        exact = [c for c in cands if c[0] == key]
        if not exact:
            exact = [c for c in cands if c[0].split("/")[-1] == key]
        if len(exact) == 1:
            return exact[0][0], exact[0][1]
        if not exact:
            raise CheckpointError(f"key {key!r} does not hold a dict of tensors; candidates: {listing() or 'none'}",
                                  file=source)
        raise CheckpointError(f"key {key!r} is ambiguous; give the full path: {listing()}", file=source)
    if not cands:
        raise CheckpointError("no tensors found in the checkpoint", file=source)
    if len(cands) > 1:
        raise CheckpointError(f"several dicts of tensors, choose one with key= (--key): {listing()}", file=source)
    return cands[0][0], cands[0][1]


def _materialize(sd: dict, table, source, size_cap) -> dict[str, np.ndarray]:
    return {k: v.to_numpy(table, name=k, size_cap=size_cap) for k, v in _tensor_items(sd)}


def _load_pickled(path, kind, key, size_cap, pickle_cap):
    reader = {"torch-zip": read_torch_zip, "torch-legacy": read_legacy_pickle, "torch-tar": read_legacy_tar}[kind]
    obj, table = reader(path, size_cap=size_cap, pickle_cap=pickle_cap)
    _p, sd = find_state_dict(obj, key=key, source=path)
    return _materialize(sd, table, path, size_cap)


def load_state_dict(path, *, key: str | None = None, size_cap: int = DEFAULT_SIZE_CAP,
                    trusted: bool = False, pickle_cap: int = MAX_PICKLE_BYTES) -> dict[str, np.ndarray]:
    """Read the tensors of a checkpoint without torch and without running code.

    ``path``: a torch checkpoint (zip or legacy), a .safetensors file, a sharded index json
    or a Hugging Face model folder. ``key``: where the state_dict sits in a training
    checkpoint (e.g. "model", "state_dict", or a nested path "a/b"); by default it must be
    unambiguous. ``size_cap``: bytes; refuses a deflated record, or the total of deflated records,
    inflating to more than this (zip-bomb defence), and a view larger than both its storage and
    this (stride-0 expansion); memory-mapped data is bounded by the file size instead. ``trusted``: only changes
    how ``.pt2`` archives are refused (see :class:`Pt2ArchiveError`). ``pickle_cap``: bytes
    of pickle accepted.

    Returns ``{name: np.ndarray}`` in checkpoint order (float32 for 16/8-bit floats; see the
    module docstring). Every failure is a :class:`CheckpointError` with a one-line message.
    """
    p = os.fspath(path)
    try:
        kind = checkpoint_kind(p)
        if kind == "hf-folder":
            p = _hf_folder(p)
            kind = checkpoint_kind(p)
        if kind == "pt2":
            if trusted:
                raise Pt2ArchiveError(p)
            raise CheckpointError("torch.export .pt2 archive refused: its loader uses torch.load and may "
                                  "execute code; pass trusted=True (--trusted) only for files you trust", file=p)
        if kind in ("safetensors", "safetensors-index") and key is not None:
            raise CheckpointError("key= selects a state_dict inside a pickled checkpoint; a safetensors file "
                                  "is already flat", file=p)
        if kind == "safetensors":
            return read_safetensors(p)
        if kind == "safetensors-index":
            return load_sharded(p, read_safetensors)
        if kind == "torch-index":
            return load_sharded(p, lambda f: load_state_dict(f, key=key, size_cap=size_cap,
                                                             pickle_cap=pickle_cap))
        return _load_pickled(p, kind, key, size_cap, pickle_cap)
    except CheckpointError as e:
        if e.file is None:
            raise CheckpointError(e.detail, file=p, tensor=e.tensor, field=e.field) from None
        raise
    except MemoryError:
        raise CheckpointError("out of memory while reading", file=p) from None
    except (OSError, ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError,
            UnicodeError, AttributeError) as e:
        # defence in depth: a reader bug or an unforeseen malformed input must still be a
        # one-line CheckpointError (the tests fuzz for these; each one found is fixed at its source)
        raise CheckpointError(f"unreadable checkpoint ({type(e).__name__}: {one_line(str(e))})", file=p) from None
