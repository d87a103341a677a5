"""The op protocol, the op registry, and `apply`, which builds checked nodes.

Every op is one `Op` subclass holding everything the system needs to know
about it: attribute validation (`check`), the type rule (`infer`), the NumPy
reference implementation (`evaluate`), the gradient rule (`vjp`, which builds
graph nodes so the backward pass is a graph) and, later, its lowering.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..ir import dtypes as dt
from ..ir.errors import GraphBuildError
from ..ir.node import Node, TensorType, user_location
from ..ir.shapes import shape_str

REGISTRY: dict = {}


class Op:
    """Base class.  Subclasses set `name` and override what applies."""

    name: str = ""
    arity: int | None = None       # number of inputs; None = variadic
    shape_attrs: tuple = ()        # attributes that hold shapes (may hold symbols)
    differentiable: bool = True
    elementwise: bool = False      # output[i] depends on inputs[i] only (fusable)
    lowering = None                # set by backends' lowering tables, not here

    def check(self, **attrs) -> dict:
        """Validate and normalize attributes; raise TypeError/ValueError."""
        if attrs:
            raise TypeError(f"unexpected attributes {sorted(attrs)}")
        return attrs

    def infer(self, types: list, **attrs) -> TensorType:
        raise NotImplementedError

    def evaluate(self, *args, **attrs) -> np.ndarray:
        raise NotImplementedError(f"op {self.name} has no NumPy implementation")

    def vjp(self, node: Node, g: Node) -> list:
        """Cotangents for node.inputs given the output cotangent `g` (None = zero)."""
        raise NotImplementedError(f"op {self.name} has no gradient rule")

    def __repr__(self):
        return f"Op({self.name})"


def register(cls):
    """Class decorator: instantiate the op and add it to the registry."""
    op = cls()
    if not op.name:
        raise ValueError(f"{cls.__name__} has no name")
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return cls


def get_op(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}") from None


# ------------------------------------------------------------------ leaves
@register
class InputOp(Op):
    """A graph input, fed when a compiled function is called."""
    name = "input"
    arity = 0
    differentiable = False


@register
class ParameterOp(Op):
    """A trainable or state array held by a Parameter; updated through `updates`."""
    name = "parameter"
    arity = 0
    differentiable = False


@register
class ConstantOp(Op):
    """A compile-time constant array."""
    name = "constant"
    arity = 0
    differentiable = False


def constant(value, dtype=None, name=None) -> Node:
    """A constant node holding `value` (copied, read-only)."""
    arr = np.array(value, dtype=dt.as_dtype(dtype) if dtype is not None else None)
    if dtype is None:
        if arr.dtype.kind == "f":
            # Python floats and lists default to float32 (the working precision);
            # a NumPy float64 array keeps its dtype.
            from_numpy = isinstance(value, (np.ndarray, np.generic))
            arr = arr if (from_numpy and arr.dtype == dt.float64) else arr.astype(dt.float32)
        elif arr.dtype.kind in "iu" and arr.dtype not in (dt.int32, dt.int64):
            arr = arr.astype(dt.int64)  # Python ints, and NumPy's other int widths
        arr = arr.astype(dt.as_dtype(arr.dtype))
    arr.setflags(write=False)
    return Node(REGISTRY["constant"], (), {}, TensorType(arr.dtype, arr.shape), name=name,
                value=arr, loc=user_location())


# ------------------------------------------------------------------ apply
def _is_weak_scalar(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, np.ndarray)


def as_node(x, like_dtype=None) -> Node:
    """Lift a Python/NumPy value to a constant node.

    Python scalars are 'weak': they take the dtype of the tensor they meet
    (a Python float next to an int tensor becomes float32).
    """
    if isinstance(x, Node):
        return x
    if _is_weak_scalar(x):
        if like_dtype is not None:
            like = dt.as_dtype(like_dtype)
            if isinstance(x, bool):
                d = like
            elif isinstance(x, numbers.Integral):
                d = like
            else:
                d = like if like.kind == "f" else dt.float32
            if like.kind == "b" and not isinstance(x, bool):
                d = dt.float32 if isinstance(x, float) else dt.int64
            return constant(x, d)
        return constant(x)
    if isinstance(x, (np.ndarray, np.generic, list, tuple)):
        return constant(x)
    raise TypeError(f"cannot use {type(x).__name__} {x!r} as a tensor")


def apply(op, inputs, **attrs) -> Node:
    """Build a node: lift inputs, validate attributes, run the type rule.

    Errors name the op, the input types and the user's line of code.
    """
    if isinstance(op, str):
        op = get_op(op)
    loc = user_location()
    inputs = list(inputs)
    like = next((i.dtype for i in inputs
                 if isinstance(i, Node) and isinstance(i.type, TensorType)), None)
    try:
        nodes = [as_node(i, like) for i in inputs]
    except TypeError as e:
        raise GraphBuildError(f"{op.name}: {e}\n  at {loc}") from None
    if op.arity is not None and len(nodes) != op.arity:
        raise GraphBuildError(f"{op.name} takes {op.arity} inputs, got {len(nodes)}\n  at {loc}")
    try:
        attrs = op.check(**attrs)
        ttype = op.infer([n.type for n in nodes], **attrs)
    except (TypeError, ValueError) as e:
        if isinstance(e, GraphBuildError):
            raise
        desc = ", ".join(f"{n.label()}: {n.type}" for n in nodes)
        raise GraphBuildError(f"{op.name}: {e}\n  inputs: {desc}\n  at {loc}") from None
    return Node(op, nodes, attrs, ttype, loc=loc)


# ------------------------------------------------------------------ helpers used by gradient rules
def shapes_desc(types) -> str:
    return ", ".join(shape_str(t.shape) for t in types)
