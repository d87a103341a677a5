"""Shapes with optional symbolic dimensions.

A dimension is either a non-negative int or a symbol: a str naming a size
that is only known when a compiled function is first called (the batch
dimension "N" is the common case).  Type rules work on such shapes; a
compiled function specializes the graph on the concrete sizes of its inputs.
"""
from __future__ import annotations

from math import prod
from typing import Iterable, Union

Dim = Union[int, str]
Shape = tuple

BATCH = "N"  # the symbol `None` stands for in a user's shape


def normalize_shape(shape, what="shape") -> Shape:
    """Turn a user-given shape into a tuple of ints and symbols.

    `None` becomes the batch symbol "N"; strings are symbols; ints must be >= 0.
    """
    if shape is None:
        raise TypeError(f"{what} must be a tuple of dimensions, got None")
    if isinstance(shape, (int, str)) or shape is None:
        shape = (shape,)
    out = []
    for d in shape:
        if d is None:
            out.append(BATCH)
        elif isinstance(d, str):
            if not d.isidentifier() and not _is_product(d):
                raise ValueError(f"symbolic dimension {d!r} in {what} must be an identifier")
            out.append(d)
        elif isinstance(d, (int,)) or (hasattr(d, "__index__") and not isinstance(d, bool)):
            d = int(d)
            if d < 0:
                raise ValueError(f"{what} {tuple(shape)} has a negative dimension {d}")
            out.append(d)
        else:
            raise TypeError(f"{what} {shape!r}: dimension {d!r} must be an int, a name, or None")
    return tuple(out)


def _is_product(d: str) -> bool:
    parts = d.split("*")
    return len(parts) > 1 and all(p.isidentifier() or (p.isdigit() and int(p) > 0)
                                  for p in parts)


def dim_factors(d) -> tuple:
    """(integer coefficient, sorted symbol names) of a dimension: 6 -> (6, []),
    "N" -> (1, ["N"]), "3*N*T" -> (3, ["N", "T"]).

    A product of symbols appears when a reshape merges dimensions, e.g. (T, N, V)
    -> (-1, V) gives ("N*T", V); it is written in this canonical form (the
    coefficient first, then the names sorted) so equal products compare equal."""
    if isinstance(d, str):
        coef, names = 1, []
        for p in d.split("*"):
            if p.isdigit():
                coef *= int(p)
            else:
                names.append(p)
        return coef, sorted(names)
    return int(d), []


def make_dim(coef: int, names) -> Dim:
    """The dimension coef * prod(names), canonical (see dim_factors)."""
    names = sorted(names)
    if not names or coef == 0:
        return int(coef)
    return "*".join(([str(coef)] if coef != 1 else []) + names)


def is_symbolic(shape: Iterable) -> bool:
    return any(isinstance(d, str) for d in shape)


def symbols(shape: Iterable) -> set:
    return {d for d in shape if isinstance(d, str)}


def numel(shape: Iterable) -> int | None:
    """Number of elements, or None when a dimension is symbolic."""
    shape = tuple(shape)
    if is_symbolic(shape):
        return None
    return prod(shape)


def shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def broadcast_shapes(*shapes) -> Shape:
    """NumPy broadcasting extended to symbols; raises ValueError on mismatch.

    A symbol broadcasts against 1 and against the same symbol.  A symbol
    against a concrete size > 1 yields the concrete size; the specialized graph
    re-checks it once the symbol is bound.
    """
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for i in range(ndim):
        dims = [s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0]
        out: Dim = 1
        for d in dims:
            if d == 1 or d == out:
                continue
            if out == 1:
                out = d
            elif isinstance(d, str) and isinstance(out, int):
                continue
            elif isinstance(out, str) and isinstance(d, int):
                out = d
            else:
                raise ValueError("shapes " + ", ".join(shape_str(s) for s in shapes)
                                 + " cannot be broadcast together")
        result.append(out)
    return tuple(result)


def substitute(shape, bindings: dict) -> Shape:
    """Replace bound symbols by their sizes (in products of symbols too)."""
    def one(d):
        if not isinstance(d, str):
            return d
        if d in bindings:
            return bindings[d]
        if "*" not in d:
            return d
        coef, names = dim_factors(d)
        left = []
        for n in names:
            if n in bindings:
                coef *= int(bindings[n])
            else:
                left.append(n)
        return make_dim(coef, left)
    return tuple(one(d) for d in shape)


def normalize_axis(axis: int, ndim: int, op: str = "") -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{op}: axis must be an int, got {axis!r}")
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim if ndim else 0


def normalize_axes(axis, ndim: int, op: str = "") -> tuple:
    """None → all axes; int or sequence → sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int) and not isinstance(axis, bool):
        axis = (axis,)
    axes = tuple(sorted(normalize_axis(a, ndim, op) for a in axis))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op}: repeated axis in {axis}")
    return axes
