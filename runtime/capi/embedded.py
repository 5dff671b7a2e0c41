"""The Python side of libsparsedge.so: the ``extern "Python"`` functions behind sparsedge.h.

Loaded by the library's init code (see build.py) inside the embedded interpreter:
``install(ffi, lib)`` registers every function with ``ffi.def_extern``. Each one returns a
``sparsedge_status`` and never lets an exception out: every entry is wrapped in
``try/except BaseException`` and the message goes to the C thread-local error buffer
(``lib.sparsedge__set_error``).

Sessions are referred to from C by an integer handle cast to ``sparsedge_session *``:
handles are never reused, so a closed or invented handle gives SPARSEDGE_ERR_ARGUMENT,
never a crash. Input buffers are wrapped without copying (``np.frombuffer``); outputs are
copied into the caller's buffers after every check has passed.
"""
from __future__ import annotations

import itertools
import os
import threading

import numpy as np

# sparsedge_status (sparsedge.h)
OK, ERR_ARGUMENT, ERR_MODEL_FILE, ERR_INPUT, ERR_BUFFER_SIZE, ERR_UNSUPPORTED, ERR_INTERNAL, ERR_INIT = range(8)
STATUS_NAMES = {OK: "SPARSEDGE_OK", ERR_ARGUMENT: "SPARSEDGE_ERR_ARGUMENT", ERR_MODEL_FILE: "SPARSEDGE_ERR_MODEL_FILE",
                ERR_INPUT: "SPARSEDGE_ERR_INPUT", ERR_BUFFER_SIZE: "SPARSEDGE_ERR_BUFFER_SIZE",
                ERR_UNSUPPORTED: "SPARSEDGE_ERR_UNSUPPORTED", ERR_INTERNAL: "SPARSEDGE_ERR_INTERNAL",
                ERR_INIT: "SPARSEDGE_ERR_INIT"}

# sparsedge_dtype (sparsedge.h) <-> numpy
DTYPES = {1: np.dtype(np.float32), 2: np.dtype(np.int64), 3: np.dtype(np.int32), 4: np.dtype(np.int8),
          5: np.dtype(np.uint8), 6: np.dtype(np.bool_)}
DTYPE_NAMES = {0: "SPARSEDGE_DTYPE_UNKNOWN", 1: "SPARSEDGE_FLOAT32", 2: "SPARSEDGE_INT64", 3: "SPARSEDGE_INT32",
               4: "SPARSEDGE_INT8", 5: "SPARSEDGE_UINT8", 6: "SPARSEDGE_BOOL"}
CODES = {v: k for k, v in DTYPES.items()}
MAX_RANK = 32

_ffi = None
_lib = None
_sessions: dict = {}
_lock = threading.Lock()
_handles = itertools.count(1)


class CapiError(Exception):
    """An error with its C status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def dtype_code(dt) -> int:
    try:
        return CODES.get(np.dtype(dt), 0)
    except TypeError:
        return 0


def _dtype_name(code: int) -> str:
    return DTYPE_NAMES.get(int(code), f"unknown dtype code {int(code)}")


def classify(exc: BaseException) -> tuple[int, str]:
    """(status, message) for an exception raised below an entry point."""
    from ...errors import InputError, ModelFileError, SparsedgeError, UnsupportedOpError

    if isinstance(exc, CapiError):
        return exc.status, str(exc)
    if isinstance(exc, UnsupportedOpError):
        return ERR_UNSUPPORTED, str(exc)
    if isinstance(exc, ModelFileError):
        return ERR_MODEL_FILE, str(exc)
    if isinstance(exc, InputError):
        return ERR_INPUT, str(exc)
    if isinstance(exc, SparsedgeError):
        return ERR_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return ERR_INTERNAL, "out of memory"
    return ERR_INTERNAL, f"internal error ({type(exc).__name__}: {exc}); please report it"


class _Entry:
    """A session plus the C copies of its input/output descriptions (alive until close)."""

    def __init__(self, session):
        self.session = session
        self.io = []  # [inputs, outputs]; each a list of (name, code, dims, name_c, shape_c)
        self.index = []  # [inputs, outputs]; name -> position
        for infos in (session.get_inputs(), session.get_outputs()):
            rows = []
            for info in infos:
                dims = tuple(d if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else -1
                             for d in info.shape)
                dims = tuple(int(d) for d in dims)
                name = str(info.name)
                rows.append((name, dtype_code(info.dtype), dims, _ffi.new("char[]", name.encode("utf-8")),
                             _ffi.new("int64_t[]", list(dims) or [0])))
            self.io.append(rows)
            self.index.append({r[0]: i for i, r in enumerate(rows)})


def _entry(handle) -> _Entry:
    if handle == _ffi.NULL:
        raise CapiError(ERR_ARGUMENT, "session is NULL")
    key = int(_ffi.cast("uintptr_t", handle))
    e = _sessions.get(key)
    if e is None:
        raise CapiError(ERR_ARGUMENT, "invalid or closed session")
    return e


def _string(p, what) -> str:
    if p == _ffi.NULL:
        raise CapiError(ERR_ARGUMENT, f"{what} is NULL")
    return _ffi.string(p).decode("utf-8", "surrogateescape")


def _need(p, what):
    if p == _ffi.NULL:
        raise CapiError(ERR_ARGUMENT, f"{what} is NULL")


# ---- entry points (names without the sparsedge__py_ prefix) -----------------------------------
def open_(path, options, out):
    p = os.fsdecode(_ffi.string(path)) if path != _ffi.NULL else None
    if p is None:
        raise CapiError(ERR_ARGUMENT, "path is NULL")
    kwargs = {}
    if options != _ffi.NULL:
        if options.struct_size != _ffi.sizeof("sparsedge_options"):
            raise CapiError(ERR_ARGUMENT, f"options.struct_size is {options.struct_size}, expected "
                                          f"{_ffi.sizeof('sparsedge_options')}: call sparsedge_options_init first")
        if options.threads < 0:
            raise CapiError(ERR_ARGUMENT, f"options.threads must be >= 0, got {options.threads}")
        if options.reserved != 0:
            raise CapiError(ERR_ARGUMENT, "options.reserved must be 0")
        if options.threads:
            kwargs["threads"] = int(options.threads)
        if options.tune:
            kwargs["tune"] = True
    if not os.path.isfile(p):
        raise CapiError(ERR_MODEL_FILE, f"model file {p!r}: " + ("is not a file" if os.path.exists(p) else "not found"))
    try:
        from .. import Session

        session = Session(p, **kwargs)
    except OSError as e:
        raise CapiError(ERR_MODEL_FILE, f"model file {p!r}: {e.strerror or e}") from None
    entry = _Entry(session)
    with _lock:
        h = next(_handles)
        _sessions[h] = entry
    out[0] = _ffi.cast("sparsedge_session *", h)
    return OK


def close(handle):
    _entry(handle)
    with _lock:
        e = _sessions.pop(int(_ffi.cast("uintptr_t", handle)), None)
    if e is None:
        raise CapiError(ERR_ARGUMENT, "invalid or closed session")
    close_fn = getattr(e.session, "close", None)
    if close_fn is not None:
        close_fn()
    return OK


def count(handle, which, out):
    e = _entry(handle)
    _need(out, "count (the out pointer)")
    out[0] = len(e.io[which])
    return OK


def info(handle, which, index, name, dtype, rank, shape):
    e = _entry(handle)
    rows = e.io[which]
    if index >= len(rows):
        raise CapiError(ERR_ARGUMENT, f"{('input', 'output')[which]} index {index} out of range "
                                      f"(the model has {len(rows)})")
    n, code, dims, name_c, shape_c = rows[index]
    if name != _ffi.NULL:
        name[0] = name_c
    if dtype != _ffi.NULL:
        dtype[0] = code
    if rank != _ffi.NULL:
        rank[0] = len(dims)
    if shape != _ffi.NULL:
        shape[0] = shape_c
    return OK


def index_(handle, which, name, out):
    e = _entry(handle)
    n = _string(name, "name")
    _need(out, "index (the out pointer)")
    kind = ("input", "output")[which]
    if n not in e.index[which]:
        raise CapiError(ERR_ARGUMENT, f"no {kind} named {n!r} (the model's {kind}s: "
                                      f"{', '.join(r[0] for r in e.io[which])})")
    out[0] = e.index[which][n]
    return OK


def _resolve(e, which, tensors, count, what):
    """Positions in the model of the C tensors tensors[0..count), checking names and repeats."""
    kind = ("input", "output")[which]
    if count and tensors == _ffi.NULL:
        raise CapiError(ERR_ARGUMENT, f"{what} is NULL but its count is {count}")
    pos, seen = [], set()
    for i in range(count):
        t = tensors[i]
        if t.name == _ffi.NULL:
            if i >= len(e.io[which]):
                raise CapiError(ERR_ARGUMENT, f"{what}[{i}] has no name and the model has only "
                                              f"{len(e.io[which])} {kind}s")
            j = i
        else:
            n = _ffi.string(t.name).decode("utf-8", "surrogateescape")
            if n not in e.index[which]:
                raise CapiError(ERR_ARGUMENT, f"{what}[{i}]: no {kind} named {n!r} (the model's {kind}s: "
                                              f"{', '.join(r[0] for r in e.io[which])})")
            j = e.index[which][n]
        if j in seen:
            raise CapiError(ERR_ARGUMENT, f"{what}[{i}]: {kind} {e.io[which][j][0]!r} given twice")
        seen.add(j)
        pos.append(j)
    return pos


def _read_shape(t, what, name):
    if t.rank < 0 or t.rank > MAX_RANK:
        raise CapiError(ERR_ARGUMENT, f"{what} {name!r}: rank {t.rank} out of range 0..{MAX_RANK}")
    if t.rank and t.shape == _ffi.NULL:
        raise CapiError(ERR_ARGUMENT, f"{what} {name!r}: shape is NULL but rank is {t.rank}")
    dims = tuple(int(t.shape[k]) for k in range(t.rank))
    if any(d < 0 for d in dims):
        raise CapiError(ERR_INPUT, f"{what} {name!r}: negative dim in shape {list(dims)}")
    return dims


def shapes_or_run(handle, inputs, n_in, outputs, n_out, run):
    e = _entry(handle)
    model_in, model_out = e.io
    if n_in != len(model_in):
        raise CapiError(ERR_ARGUMENT, f"the model has {len(model_in)} inputs "
                                      f"({', '.join(r[0] for r in model_in)}), got num_inputs={n_in}")
    if n_out < 1:
        raise CapiError(ERR_ARGUMENT, "num_outputs is 0 (ask for at least one output)")
    in_pos = _resolve(e, 0, inputs, n_in, "inputs")
    out_pos = _resolve(e, 1, outputs, n_out, "outputs")

    feeds, in_shapes = {}, {}
    for i, j in enumerate(in_pos):
        t = inputs[i]
        name, code, decl, _, _ = model_in[j]
        if (run or t.dtype != 0) and t.dtype != code:
            raise CapiError(ERR_INPUT, f"input {name!r}: dtype {_dtype_name(t.dtype)}, the model expects "
                                       f"{_dtype_name(code)}")
        dims = _read_shape(t, "input", name)
        if len(dims) != len(decl) or any(d != -1 and d != g for d, g in zip(decl, dims)):
            raise CapiError(ERR_INPUT, f"input {name!r}: shape {list(dims)} does not fit the model's "
                                       f"{list(model_in_decl(e, j))}")
        in_shapes[name] = dims
        if run:
            dt = DTYPES[code]
            need = int(np.prod(dims, dtype=object)) * dt.itemsize if dims else dt.itemsize
            if t.nbytes != need:
                raise CapiError(ERR_BUFFER_SIZE, f"input {name!r}: nbytes is {t.nbytes}, shape {list(dims)} of "
                                                 f"{_dtype_name(code)} needs {need}")
            if need == 0:
                arr = np.zeros(dims, dt)
            else:
                if t.data == _ffi.NULL:
                    raise CapiError(ERR_ARGUMENT, f"input {name!r}: data is NULL")
                arr = np.frombuffer(_ffi.buffer(t.data, need), dtype=dt).reshape(dims)
                if dt == np.bool_ and arr.view(np.uint8).max() > 1:
                    raise CapiError(ERR_INPUT, f"input {name!r}: SPARSEDGE_BOOL elements must be 0 or 1")
                arr.flags.writeable = False
            feeds[name] = arr

    predicted = e.session.output_shapes(in_shapes)
    plan = []
    for i, j in enumerate(out_pos):
        t = outputs[i]
        name, code, decl, _, _ = model_out[j]
        shp = predicted.get(name) if isinstance(predicted, dict) else None
        if shp is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shp):
            raise CapiError(ERR_INTERNAL, f"output {name!r}: shape could not be inferred ({shp!r})")
        shp = tuple(int(d) for d in shp)
        dt = DTYPES.get(code)
        if dt is None:
            raise CapiError(ERR_UNSUPPORTED, f"output {name!r}: dtype not representable in the C API")
        if t.rank < len(shp):
            raise CapiError(ERR_BUFFER_SIZE, f"output {name!r}: rank is {len(shp)} but the shape array's "
                                             f"capacity (rank field) is {t.rank}")
        if t.shape == _ffi.NULL:
            raise CapiError(ERR_ARGUMENT, f"output {name!r}: shape is NULL")
        need = int(np.prod(shp, dtype=object)) * dt.itemsize if shp else dt.itemsize
        if run:
            if t.dtype != code:
                raise CapiError(ERR_INPUT, f"output {name!r}: dtype {_dtype_name(t.dtype)}, the model gives "
                                           f"{_dtype_name(code)}")
            if t.nbytes < need:
                raise CapiError(ERR_BUFFER_SIZE, f"output {name!r}: nbytes is {t.nbytes}, shape {list(shp)} "
                                                 f"of {_dtype_name(code)} needs {need}")
            if need and t.data == _ffi.NULL:
                raise CapiError(ERR_ARGUMENT, f"output {name!r}: data is NULL")
        plan.append((t, name, code, dt, shp, need))

    if run:
        results = e.session.run([p[1] for p in plan], feeds)
        if len(results) != len(plan):
            raise CapiError(ERR_INTERNAL, f"Session.run returned {len(results)} arrays for {len(plan)} outputs")
        arrays = []
        for (t, name, code, dt, shp, need), r in zip(plan, results):
            r = np.asarray(r)
            if tuple(r.shape) != shp or r.dtype != dt:
                raise CapiError(ERR_INTERNAL, f"output {name!r}: computed {r.dtype}{list(r.shape)}, "
                                              f"predicted {dt}{list(shp)}")
            arrays.append(np.ascontiguousarray(r))
        for (t, name, code, dt, shp, need), r in zip(plan, arrays):
            if need:
                _ffi.memmove(t.data, r, need)
    for t, name, code, dt, shp, need in plan:
        t.dtype = code
        for k, d in enumerate(shp):
            t.shape[k] = d
        t.rank = len(shp)
        if not run:
            t.nbytes = need
    return OK


def model_in_decl(e, j):
    return ["?" if d == -1 else d for d in e.io[0][j][2]]


# ---- registration ---------------------------------------------------------------------------------
def _wrap(fn, names, which_arg):
    """A C entry point around fn: every exception becomes (status, thread-local message)."""

    def entry(*args):
        try:
            return fn(*args)
        except BaseException as exc:  # never let anything escape into C
            try:
                status, msg = classify(exc)
                cname = names[1 if (which_arg is not None and args[which_arg]) else 0]
                if not msg.startswith("sparsedge_"):
                    msg = f"{cname}: {msg}"
                _lib.sparsedge__set_error(msg.encode("utf-8", "replace")[:2000])
            except BaseException:
                status = ERR_INTERNAL
                try:
                    _lib.sparsedge__set_error(b"sparsedge: internal error while reporting an error")
                except BaseException:
                    pass
            return status

    return entry


# extern "Python" name -> (implementation, (C name, C name when the `which` flag is set), flag position)
_ENTRIES = {
    "sparsedge__py_open": (open_, ("sparsedge_open",), None),
    "sparsedge__py_close": (close, ("sparsedge_close",), None),
    "sparsedge__py_count": (count, ("sparsedge_num_inputs", "sparsedge_num_outputs"), 1),
    "sparsedge__py_info": (info, ("sparsedge_input_info", "sparsedge_output_info"), 1),
    "sparsedge__py_index": (index_, ("sparsedge_input_index", "sparsedge_output_index"), 1),
    "sparsedge__py_shapes": (shapes_or_run, ("sparsedge_output_shapes", "sparsedge_run"), 5),
}


def install(ffi, lib) -> None:
    """Register the extern "Python" functions of the library (called by its init code)."""
    global _ffi, _lib
    _ffi, _lib = ffi, lib
    for cname, (fn, names, which_arg) in _ENTRIES.items():
        ffi.def_extern(name=cname, error=ERR_INTERNAL)(_wrap(fn, names, which_arg))
    lib.sparsedge__mark_ready()
