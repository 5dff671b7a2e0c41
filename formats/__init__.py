"""sparsedge.formats: weight formats (one module each) and the model file.

``FORMATS`` maps a kind ("dense", "csr", "bsr", "nm", "dense_i8", "csr_i8", "bsr_i8", "lowrank")
to its class. See ``base.py`` for the contract and each module for its arrays.
"""
from .base import FORMATS, WeightFormat, register
from .dense import Dense
from .csr import CSR
from .bsr import BSR
from .nm import NM
from .quant import DenseI8, CSRI8, BSRI8
from .lowrank import LowRank
from .actquant import validate_act_quant, act_quant_from_range
from .graph import Graph, Node, ValueInfo
from .modelfile import ModelFile, read_model, write_model

__all__ = ["FORMATS", "WeightFormat", "register", "Dense", "CSR", "BSR", "NM", "DenseI8", "CSRI8", "BSRI8",
           "LowRank", "validate_act_quant", "act_quant_from_range", "from_arrays", "Graph", "Node", "ValueInfo",
           "ModelFile", "read_model", "write_model"]


def from_arrays(kind: str, shape, meta: dict, arrays: dict, *, name=None, orig_shape=None) -> WeightFormat:
    """Rebuild a format object of ``kind`` from its meta and arrays (no copies, no validation)."""
    from ..errors import FormatError

    cls = FORMATS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FormatError(f"unknown format kind {kind!r} (known: {sorted(FORMATS)})", tensor=name, field="kind")
    return cls.from_arrays(shape, meta, arrays, name=name, orig_shape=orig_shape)
