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
