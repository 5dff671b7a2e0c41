"""sparsedge.loaders: safe checkpoint readers (``checkpoint``) and the converter (``convert``).

``convert`` here (and ``sparsedge.convert``) is the function; the module is
``sparsedge.loaders.convert`` in ``sys.modules``. Importing this package never imports torch.
"""
from __future__ import annotations

from .convert import ConversionResult, convert  # noqa: F401  (binds the function over the submodule)

__all__ = ["convert", "ConversionResult"]
