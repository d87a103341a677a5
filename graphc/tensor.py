"""Leaves of the DSL: graph inputs, parameters and constants."""
from __future__ import annotations

import numpy as np

from .ir import dtypes as dt
from .ir.node import Node, TensorType, user_location
from .ir.shapes import normalize_shape, shape_str
from .ops.base import REGISTRY, constant

__all__ = ["input", "Parameter", "constant", "Tensor"]

Tensor = Node  # the symbolic tensor users hold is a graph node


def input(name: str, shape, dtype="float32") -> Node:
    """A graph input called `name`.

    `shape` may use None (the batch dimension "N") or names for sizes that are
    only known when the compiled function is called; it specializes then.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"input name must be a non-empty string, got {name!r}")
    t = TensorType(dt.as_dtype(dtype), normalize_shape(shape, f"shape of input {name!r}"))
    return Node(REGISTRY["input"], (), {}, t, name=name, loc=user_location())


class Parameter(Node):
    """A named array that compiled functions read and, through `updates`, write.

    Its shape and dtype are fixed at creation; assigning `.value` checks them.
    """

    __slots__ = ("trainable",)

    def __init__(self, value, name: str | None = None, dtype=None, trainable: bool = True):
        arr = np.array(value, dtype=dt.as_dtype(dtype) if dtype is not None else None)
        if dtype is None:
            if arr.dtype == np.float64 and not isinstance(value, np.ndarray):
                arr = arr.astype(np.float32)  # Python floats/lists: float32 by default
            arr = arr.astype(dt.as_dtype(arr.dtype), copy=False)
        super().__init__(REGISTRY["parameter"], (), {}, TensorType(arr.dtype, arr.shape),
                         name=name, value=np.require(arr, requirements="C"), loc=user_location())
        self.trainable = trainable

    def set_value(self, new) -> None:
        """Copy `new` into the parameter's array (shape and dtype must match)."""
        new = np.asarray(new)
        if new.shape != self.value.shape:
            raise ValueError(f"parameter {self.label()}: expected shape "
                             f"{shape_str(self.value.shape)}, got {shape_str(new.shape)}")
        if not np.can_cast(new.dtype, self.value.dtype, "same_kind"):
            raise TypeError(f"parameter {self.label()}: cannot store {new.dtype} values "
                            f"in a {self.value.dtype} parameter")
        np.copyto(self.value, new, casting="same_kind")

    def numpy(self) -> np.ndarray:
        return self.value

    def __repr__(self):
        return f"<Parameter {self.label()}: {self.type}>"
