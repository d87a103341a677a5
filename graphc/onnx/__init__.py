"""ONNX interop: import ONNX models as graphc graphs, export graphc graphs as ONNX.

    model = gc.onnx.load("net.onnx")            # or bytes, or an onnx.ModelProto
    y = model(x_batch)                           # list of outputs (NumPy backend)
    f = model.compile(backend="llvm")            # a gc.Function over model.inputs
    dws = gc.grad(loss_of(model.outputs[0]), model.parameters)   # fine-tunable

    gc.onnx.export(outputs, "out.onnx", inputs=[x])

Needs the `onnx` package (the optional extra ``graphc[onnx]``).  Loading parses
the protobuf only; nothing in a model file is ever executed as code.
"""
from __future__ import annotations

from .errors import OnnxExportError, OnnxImportError, UnsupportedOperatorError
from .importer import OnnxModel, load
from .exporter import export
from . import zoo

__all__ = ["load", "export", "OnnxModel", "OnnxImportError", "OnnxExportError",
           "UnsupportedOperatorError", "supported_operators", "zoo"]


def supported_operators() -> list:
    """The ONNX operator types (default domain) the importer understands."""
    from .op_table import OPS
    return sorted(OPS)
