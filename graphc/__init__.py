"""graphc: a compute-graph compiler for neural networks.

Define a model with symbolic tensors, differentiate it symbolically, look at
its graphs, and compile them to a NumPy interpreter or native code.
"""
from . import ir
from .ir import (Graph, GraphBuildError, GraphcError, IndexOutOfRangeError, Node, TensorType,
                 name_scope)
from .ir.dtypes import bool_, float32, float64, int32, int64
from . import ops as _ops
from .ops import PUBLIC as _PUBLIC

globals().update(_PUBLIC)

from .tensor import Parameter, Tensor, constant, input  # noqa: E402
from .autodiff import grad  # noqa: E402
from .function import Function, compile  # noqa: E402
from .gradcheck import check_grad  # noqa: E402

from .input_cast import InputCastWarning  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"nn": "graphc.nn", "optim": "graphc.optim", "data": "graphc.data",
         "passes": "graphc.passes", "onnx": "graphc.onnx", "models": "graphc.models",
         "train": "graphc.train", "distributed": "graphc.distributed", "viz": "graphc.viz"}
_LAZY_ATTRS = {"render": ("graphc.viz", "render"), "to_dot": ("graphc.viz", "to_dot")}

# The lazily loaded names are listed too, so tab completion and dir(gc) offer them.
__all__ = sorted(set(_PUBLIC) | set(_LAZY) | set(_LAZY_ATTRS) | {
    "Parameter", "Tensor", "constant", "input", "grad", "compile", "Function", "check_grad",
    "Graph", "Node", "TensorType", "GraphBuildError", "GraphcError", "IndexOutOfRangeError",
    "InputCastWarning", "name_scope", "float32", "float64", "int32", "int64", "bool_"})


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_ATTRS))


def __getattr__(name):
    # Submodules and tools load on first use, keeping `import graphc` light.
    import importlib
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name in _LAZY_ATTRS:
        mod, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")
