"""Errors of the ONNX importer and exporter."""
from __future__ import annotations

from ..ir.errors import GraphcError


class OnnxImportError(GraphcError, ValueError):
    """The model cannot be read or converted (malformed file, unsupported feature)."""


class UnsupportedOperatorError(OnnxImportError):
    """The model uses operators graphc does not import; the message lists all of them."""

    def __init__(self, message: str, unsupported: dict):
        super().__init__(message)
        self.unsupported = unsupported  # (domain, op_type) -> [node names]


class OnnxExportError(GraphcError, ValueError):
    """A graphc graph holds something ONNX export does not support."""


class MissingExtraError(GraphcError, ModuleNotFoundError):
    """An optional package graphc needs here is not installed; the message says which
    extra installs it."""


def require_onnx(what: str = "gc.onnx"):
    """The `onnx` module, or a MissingExtraError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError(f"{what} needs the 'onnx' package, which is not installed: "
                                "pip install 'graphc[onnx]'", name="onnx") from None
    return onnx
