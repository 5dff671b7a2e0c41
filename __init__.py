"""sparsedge: a sparse-kernel inference runtime for CPUs and ARM edge boards.

Light to import: ``import sparsedge`` loads only the error classes. ``sparsedge.Session``
(the runtime, numpy + numba) and ``sparsedge.convert`` (offline, may use torch) are
imported on first use.
"""
from __future__ import annotations

from .errors import (  # noqa: F401
    CheckpointError,
    ConversionError,
    FormatError,
    InputError,
    ModelFileError,
    SparsedgeError,
    UnsupportedOpError,
    UnsupportedOpInFileError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Session",
    "convert",
    "SparsedgeError",
    "ModelFileError",
    "FormatError",
    "CheckpointError",
    "InputError",
    "UnsupportedOpError",
    "ConversionError",
]


def __getattr__(name):  # PEP 562: lazy heavy imports
    if name == "Session":
        from .runtime import Session

        return Session
    if name == "convert":
        from .loaders import convert

        return convert
    raise AttributeError(f"module 'sparsedge' has no attribute {name!r}")
