"""sparsedge.runtime.capi: the C API (libsparsedge.so + sparsedge.h), built with cffi's embedding mode.

``sparsedge build-capi OUT_DIR`` (build.py) compiles the library; ``embedded.py`` is its Python
side, running inside the embedded interpreter; ``sparsedge.h`` documents the API and
``example.c`` shows it in use. See build.py for how the library finds its Python environment.
"""
