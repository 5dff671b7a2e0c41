"""`sparsedge build-capi OUT_DIR`: build libsparsedge.so and sparsedge.h with cffi's embedding mode.

Writes OUT_DIR/libsparsedge.so, OUT_DIR/sparsedge.h and OUT_DIR/example.c. Needs a C compiler
and the Python headers and shared libpython of the Python running this command
(Debian/Ubuntu: ``apt install gcc python3-dev``; pyenv: build Python with
``PYTHON_CONFIGURE_OPTS=--enable-shared``).

How the library finds its Python environment at run time: it stores the path of the Python
that built it (``sys.executable``, e.g. ``.venv/bin/python``) and starts the embedded
interpreter as that program, so the virtual environment's ``pyvenv.cfg`` and site-packages
(and an editable install's .pth files) are found exactly as by that python. Build it with
the environment in which sparsedge is installed. ``SPARSEDGE_PYTHON=/path/to/python`` at run
time picks another interpreter of the same Python version; ``PYTHONPATH`` / ``PYTHONHOME``
work as for python. The library is linked with an rpath to the libpython directory.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from ... import __version__
from ...errors import SparsedgeError

DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else None
HERE = Path(__file__).resolve().parent
MODULE_NAME = "_sparsedge_capi"
LIB_NAME = "libsparsedge.so"

# C helpers and the Python-implemented internals (not part of the public header).
_INTERNAL_CDEF = """
void sparsedge__set_error(const char *msg);
void sparsedge__mark_ready(void);
const char *sparsedge__python_used(void);
extern "Python" {
    int sparsedge__py_open(const char *, const sparsedge_options *, sparsedge_session **);
    int sparsedge__py_close(sparsedge_session *);
    int sparsedge__py_count(const sparsedge_session *, int, size_t *);
    int sparsedge__py_info(const sparsedge_session *, int, size_t, const char **, int32_t *,
                           int32_t *, const int64_t **);
    int sparsedge__py_index(const sparsedge_session *, int, const char *, size_t *);
    int sparsedge__py_shapes(sparsedge_session *, const sparsedge_tensor *, size_t,
                             sparsedge_tensor *, size_t, int);
}
"""

_INIT_CODE = f"""
from {MODULE_NAME} import ffi, lib
from sparsedge.runtime.capi import embedded
embedded.install(ffi, lib)
"""


def header_cdef(header_text: str) -> str:
    """The declarations between the BEGIN CDEF / END CDEF markers of sparsedge.h."""
    try:
        start = header_text.index("BEGIN CDEF")
        start = header_text.index("\n", start) + 1
        end = header_text.index("/* END CDEF */")
    except ValueError:
        raise SparsedgeError("CDEF markers missing", file=HERE / "sparsedge.h") from None
    return header_text[start:end]


def _c_string(s: str) -> str:
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        if c in '"\\' or b < 32 or b > 126:
            out.append(f"\\{b:03o}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def make_ffi(python: str | None = None):
    """The cffi FFI object for the library (python: the interpreter path to store)."""
    import cffi

    header = (HERE / "sparsedge.h").read_text()
    ffi = cffi.FFI()
    ffi.cdef(header_cdef(header))
    ffi.cdef(_INTERNAL_CDEF)
    ffi.embedding_api("")
    ffi.embedding_init_code(_INIT_CODE)
    python = sys.executable if python is None else python
    source = (f"#define SPARSEDGE_BUILD_PYTHON {_c_string(python)}\n"
              f"#define SPARSEDGE_VERSION_STRING {_c_string(__version__)}\n"
              + (HERE / "capi_impl.c").read_text())
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    link = ["-pthread"] + ([f"-Wl,-rpath,{libdir}"] if libdir else [])
    ffi.set_source(MODULE_NAME, source, include_dirs=[str(HERE)], extra_compile_args=["-O2", "-pthread"],
                   extra_link_args=link)
    return ffi


def check_toolchain() -> None:
    """Raise SparsedgeError if this Python cannot host an embedded library."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise SparsedgeError(
            f"this Python ({sys.executable}) has no shared libpython (built without --enable-shared); "
            "the C API embeds Python and needs it: use the distribution's python3 with python3-dev, "
            "or rebuild with PYTHON_CONFIGURE_OPTS=--enable-shared")
    inc = sysconfig.get_paths().get("include")
    if not inc or not os.path.exists(os.path.join(inc, "Python.h")):
        raise SparsedgeError(f"Python.h not found in {inc!r}: install the Python headers (python3-dev)")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        raise SparsedgeError(f"no C compiler found ({cc!r} or 'cc'): install gcc")


def build(out_dir, *, verbose: bool = False) -> Path:
    """Build OUT_DIR/libsparsedge.so (+ sparsedge.h, example.c). Returns the library path."""
    check_toolchain()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ffi = make_ffi()
    with tempfile.TemporaryDirectory(prefix=".capi-build-", dir=out) as tmp:
        try:
            built = ffi.compile(tmpdir=tmp, target=LIB_NAME, verbose=verbose)
        except Exception as e:  # cffi's VerificationError / distutils CompileError, LinkError
            raise SparsedgeError(f"compiling the C API failed: {type(e).__name__}: {e}") from None
        final = out / LIB_NAME
        tmp_final = out / f".{LIB_NAME}.tmp"
        shutil.copyfile(built, tmp_final)
        os.chmod(tmp_final, 0o755)
        os.replace(tmp_final, final)
    for name in ("sparsedge.h", "example.c"):
        tmp_copy = out / f".{name}.tmp"
        shutil.copyfile(HERE / name, tmp_copy)
        os.replace(tmp_copy, out / name)
    return final


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for libsparsedge.so, sparsedge.h, example.c")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")


def run(args) -> int:
    import time

    t0 = time.perf_counter()
    lib = build(args.out_dir, verbose=args.verbose)
    out = lib.parent
    print(f"built {lib} and {out / 'sparsedge.h'} in {time.perf_counter() - t0:.1f} s")
    print(f"embedded python: {sys.executable} (override at run time with SPARSEDGE_PYTHON)")
    print(f"compile a program: cc -I {out} app.c -L {out} -lsparsedge -Wl,-rpath,{out} -o app")
    return 0
