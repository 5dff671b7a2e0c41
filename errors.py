"""The sparsedge exception hierarchy.

Every error a user can cause (a bad file, checkpoint, input or unsupported op) is a
``SparsedgeError``. Messages name the file, the tensor or node, and the field, so that
one line tells the user what to fix. The CLI prints these as one line and exits 1;
any other exception is a bug in sparsedge and keeps its traceback.
"""
from __future__ import annotations

__all__ = [
    "SparsedgeError",
    "ModelFileError",
    "CheckpointError",
    "InputError",
    "UnsupportedOpError",
    "FormatError",
    "ConversionError",
    "UnsupportedOpInFileError",
]


def _where(file=None, tensor=None, node=None, field=None) -> str:
    parts = []
    if file is not None:
        parts.append(f"file {str(file)!r}")
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    if node is not None:
        parts.append(f"node {node!r}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


class SparsedgeError(Exception):
    """Base of every error sparsedge raises on purpose.

    ``SparsedgeError(msg, file=..., tensor=..., node=..., field=...)`` builds
    ``"<file 'x', tensor 'y', field 'z'>: msg"``; the parts are kept as attributes.
    """

    def __init__(self, message: str, *, file=None, tensor=None, node=None, field=None):
        self.file, self.tensor, self.node, self.field = file, tensor, node, field
        self.detail = message
        where = _where(file, tensor, node, field)
        super().__init__(f"{where}: {message}" if where else message)


class ModelFileError(SparsedgeError):
    """A .sparsedge model file is malformed, truncated, hostile or of an unsupported version."""


class FormatError(ModelFileError):
    """A weight format's arrays are inconsistent (bad indptr, indices out of range, bad scales...)."""


class CheckpointError(SparsedgeError):
    """A PyTorch / safetensors checkpoint cannot be read safely (refused global, bad storage...)."""


class InputError(SparsedgeError):
    """Feeds or arguments given by the user are wrong (name, dtype, shape, value)."""


class UnsupportedOpError(SparsedgeError):
    """An op (in a model file or in a captured torch graph) that sparsedge does not implement."""


class ConversionError(SparsedgeError):
    """Conversion failed for a reason the user can act on (recipe, flags, shapes)."""


class UnsupportedOpInFileError(ModelFileError, UnsupportedOpError):
    """A model file's graph uses an op this runtime does not know (both a file and an op error)."""
