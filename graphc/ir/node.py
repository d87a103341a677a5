"""Values of the graph IR: typed nodes.

There is one node type.  A node is (op, inputs, attributes) and produces one
typed value, so a node *is* the value it computes (multi-result computations
are expressed as several nodes sharing sub-nodes, which CSE merges).  Leaves
are nodes too: graph inputs, parameters and constants.

The IR knows nothing about specific ops: `op` is any object with a `name`
attribute (the op library supplies them).  Operator overloading (x + y, x @ w)
is installed on `Node` by the frontend (graphc/tensor.py).
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import dtypes as _dt
from .shapes import Shape, normalize_shape, shape_str


@dataclass(frozen=True)
class TensorType:
    dtype: np.dtype
    shape: Shape

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dt.as_dtype(self.dtype))
        object.__setattr__(self, "shape", normalize_shape(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{shape_str(self.shape)}"


@dataclass(frozen=True)
class TupleType:
    """The type of a node producing several values (a loop); read with tuple_get."""
    types: tuple

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.types) + ")"


# ---------------------------------------------------------------- provenance
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside_package(f):
    """(the innermost frame from `f` outward that is not graphc's, frames skipped)."""
    skipped = 0
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PKG_DIR + os.sep):
        f, skipped = f.f_back, skipped + 1
    return f, skipped


def user_location(skip_internal: bool = True) -> str:
    """'file:line' of the innermost frame outside the graphc package."""
    f = sys._getframe(1)
    if skip_internal:
        f, _ = _outside_package(f)
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "<unknown>"


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for a warning issued by this function's caller,
    that names the user's line (the innermost frame outside graphc), whatever path
    through graphc (locks, fast paths) led there."""
    return 1 + _outside_package(sys._getframe(1))[1]


class _BuildContext(threading.local):
    def __init__(self):
        self.scope: tuple = ()
        self.role: str = "forward"


_ctx = _BuildContext()


def current_scope() -> tuple:
    """The scopes (innermost last) that nodes built now belong to."""
    return _ctx.scope


@contextmanager
def name_scope(name: str):
    """Nodes built inside belong to this (nested) scope; the renderer clusters them."""
    _ctx.scope = _ctx.scope + (name,)
    try:
        yield
    finally:
        _ctx.scope = _ctx.scope[:-1]


@contextmanager
def role(r: str):
    """Tag nodes built inside as 'forward', 'backward' or 'update'."""
    old, _ctx.role = _ctx.role, r
    try:
        yield
    finally:
        _ctx.role = old


def current_role() -> str:
    return _ctx.role


_ids = itertools.count()


class Node:
    """One typed value of the graph and the computation that produces it."""

    __slots__ = ("op", "inputs", "attrs", "type", "name", "id", "loc", "scope",
                 "role", "value", "__weakref__")
    __array_priority__ = 1000  # make `ndarray + node` defer to Node.__radd__

    def __init__(self, op, inputs, attrs: dict, type: TensorType, name: str | None = None,
                 value=None, loc: str | None = None):
        self.op = op
        self.inputs: tuple = tuple(inputs)
        self.attrs: dict = dict(attrs)
        self.type: TensorType = type
        self.name = name
        self.id = next(_ids)
        self.loc = loc if loc is not None else user_location()
        self.scope = _ctx.scope
        self.role = _ctx.role
        self.value = value  # constant's / parameter's array, else None

    # -- convenience ---------------------------------------------------
    @property
    def shape(self) -> Shape:
        if isinstance(self.type, TupleType):
            raise TypeError(f"{self!r} is a tuple of values; index it with gc.tuple_get")
        return self.type.shape

    @property
    def dtype(self) -> np.dtype:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.type.shape)

    @property
    def is_leaf(self) -> bool:
        return not self.inputs and self.op.name in ("input", "parameter", "constant")

    def label(self) -> str:
        return self.name or f"%{self.id}"

    def attrs_key(self) -> tuple:
        return tuple(sorted(self.attrs.items()))

    def key(self):
        """Structural identity: equal keys compute equal values (CSE merges them).

        Inputs and parameters are identified by the object itself, constants by
        their bytes, and random ops carry their seed in their attributes.
        """
        name = self.op.name
        if name in ("input", "parameter"):
            return (name, self.id)
        if name == "constant":
            v = self.value
            return (name, str(v.dtype), v.shape, v.tobytes())
        return (name, self.attrs_key(), tuple(i.id for i in self.inputs))

    def __repr__(self) -> str:
        return f"<{self.op.name} {self.label()}: {self.type}>"

    def __hash__(self):
        return object.__hash__(self)

    # `==` stays identity so nodes can live in sets and dicts; the elementwise
    # comparison is gc.equal.  A symbolic tensor has no truth value.
    def __bool__(self):
        raise TypeError(f"the truth value of symbolic tensor {self!r} is unknown until the "
                        "graph runs; use gc.where(...) for data-dependent choices")

    def __array__(self, dtype=None, copy=None):
        # Without this, np.asarray(node) silently makes a 0-d object array.
        value = " (a parameter's or constant's current values: node.value)" \
            if self.value is not None else ""
        raise TypeError(f"np.asarray({self!r}): a symbolic tensor has no values until the "
                        f"graph runs; compile it with gc.compile(inputs, outputs) and call "
                        f"the result with arrays{value}")

    def _repr_svg_(self):
        """Jupyter draws the graph that computes this node (None without graphviz)."""
        from .. import viz  # lazily: the IR does not depend on the tools layer
        return viz.repr_svg(self)


def make_leaf(op, type: TensorType, name=None, value=None, loc=None) -> Node:
    return Node(op, (), {}, type, name=name, value=value, loc=loc)
