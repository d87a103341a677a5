"""Reductions over axes: sum, mean, max, min, argmax, argmin, var, and numel."""
from __future__ import annotations

from math import prod

import numpy as np

from ..ir import dtypes as dt
from ..ir.node import Node, TensorType
from ..ir.shapes import normalize_axes
from .base import Op, apply, register

__all__ = ["sum", "mean", "max", "min", "argmax", "argmin", "var", "numel"]

_builtin_sum = sum


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _expand_back(g: Node, x: Node, axes, keepdims) -> Node:
    """Broadcast a reduced cotangent back over the reduced axes of x."""
    from .shape import broadcast_to, reshape
    if not keepdims:
        g = reshape(g, _reduced_shape(x.shape, axes, True))
    return broadcast_to(g, x.shape)


class ReduceOp(Op):
    arity = 1

    def check(self, axis=None, keepdims=False):
        if axis is not None and not isinstance(axis, int):
            axis = tuple(axis)
        return {"axis": axis, "keepdims": bool(keepdims)}

    def axes(self, ndim, axis):
        return normalize_axes(axis, ndim, self.name)

    def out_dtype(self, d):
        return d

    def infer(self, types, axis, keepdims):
        a = types[0]
        axes = self.axes(a.ndim, axis)
        return TensorType(self.out_dtype(a.dtype), _reduced_shape(a.shape, axes, keepdims))


@register
class SumOp(ReduceOp):
    """Sum over axes (all by default)."""
    name = "sum"

    def out_dtype(self, d):
        return dt.int64 if d == dt.bool_ else d

    def evaluate(self, a, axis, keepdims):
        ax = self.axes(a.ndim, axis)
        return np.asarray(np.sum(a, axis=ax, keepdims=keepdims), dtype=self.out_dtype(a.dtype))

    def vjp(self, node, g):
        x = node.inputs[0]
        return [_expand_back(g, x, self.axes(x.ndim, node.attrs["axis"]), node.attrs["keepdims"])]


@register
class MeanOp(ReduceOp):
    """Arithmetic mean over axes (all by default)."""
    name = "mean"

    def infer(self, types, axis, keepdims):
        t = super().infer(types, axis, keepdims)
        return TensorType(t.dtype if dt.is_float(t.dtype) else dt.float32, t.shape)

    def evaluate(self, a, axis, keepdims):
        ax = self.axes(a.ndim, axis)
        od = a.dtype if dt.is_float(a.dtype) else dt.float32
        return np.asarray(np.mean(a, axis=ax, keepdims=keepdims, dtype=od), dtype=od)

    def vjp(self, node, g):
        x = node.inputs[0]
        axes = self.axes(x.ndim, node.attrs["axis"])
        return [_expand_back(g, x, axes, node.attrs["keepdims"]) / numel(x, axes)]


class _ExtremumOp(ReduceOp):
    np_fn = None

    def evaluate(self, a, axis, keepdims):
        ax = self.axes(a.ndim, axis)
        if a.size == 0:
            raise ValueError(f"{self.name} of an empty tensor")
        return np.asarray(type(self).np_fn(a, axis=ax, keepdims=keepdims), dtype=a.dtype)

    def vjp(self, node, g):
        # The gradient is shared equally among tied extrema.
        from .elementwise import equal, cast
        x = node.inputs[0]
        axes = self.axes(x.ndim, node.attrs["axis"])
        keep = node.attrs["keepdims"]
        m = _expand_back(node, x, axes, keep)
        mask = cast(equal(x, m), x.dtype)
        count = sum(mask, axis=axes, keepdims=True)
        return [_expand_back(g, x, axes, keep) * mask / count]


@register
class MaxOp(_ExtremumOp):
    """Maximum over axes."""
    name = "max"
    np_fn = np.max


@register
class MinOp(_ExtremumOp):
    """Minimum over axes."""
    name = "min"
    np_fn = np.min


class _ArgOp(Op):
    arity = 1
    differentiable = False
    np_fn = None

    def check(self, axis=None, keepdims=False):
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise TypeError(f"{self.name}: axis must be an int or None, got {axis!r}")
        return {"axis": axis, "keepdims": bool(keepdims)}

    def infer(self, types, axis, keepdims):
        a = types[0]
        if axis is None:
            shape = (1,) * a.ndim if keepdims else ()
        else:
            axes = normalize_axes(axis, a.ndim, self.name)
            shape = _reduced_shape(a.shape, axes, keepdims)
        return TensorType(dt.int64, shape)

    def evaluate(self, a, axis, keepdims):
        if axis is None:
            r = type(self).np_fn(a.reshape(-1))
            return np.asarray(r, dtype=np.int64).reshape((1,) * a.ndim if keepdims else ())
        return np.asarray(type(self).np_fn(a, axis=axis, keepdims=keepdims), dtype=np.int64)


@register
class ArgmaxOp(_ArgOp):
    """Index of the maximum along an axis (first one on ties); int64."""
    name = "argmax"
    np_fn = np.argmax


@register
class ArgminOp(_ArgOp):
    """Index of the minimum along an axis (first one on ties); int64."""
    name = "argmin"
    np_fn = np.argmin


@register
class NumelOp(Op):
    """Number of elements of x over `axes`, as a scalar of `dtype`.

    Reads only x's shape, so it stays correct for symbolic (batch) dims and
    folds to a constant once shapes are concrete.
    """
    name = "numel"
    arity = 1
    differentiable = False

    def check(self, axes, dtype):
        return {"axes": tuple(axes), "dtype": str(dt.as_dtype(dtype))}

    def infer(self, types, axes, dtype):
        return TensorType(dtype, ())

    def evaluate(self, a, axes, dtype):
        return np.asarray(prod(a.shape[i] for i in axes), dtype=dtype)

    def vjp(self, node, g):
        return [None]


def numel(x, axes=None, dtype=None):
    axes = normalize_axes(axes, x.ndim, "numel")
    return apply("numel", [x], axes=axes, dtype=dtype or (x.dtype if dt.is_float(x.dtype)
                                                             else dt.float32))


def sum(x, axis=None, keepdims=False):
    return apply("sum", [x], axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return apply("mean", [x], axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):
    return apply("max", [x], axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):
    return apply("min", [x], axis=axis, keepdims=keepdims)


def argmax(x, axis=None, keepdims=False):
    return apply("argmax", [x], axis=axis, keepdims=keepdims)


def argmin(x, axis=None, keepdims=False):
    return apply("argmin", [x], axis=axis, keepdims=keepdims)


def var(x, axis=None, keepdims=False, correction=0):
    """Variance; `correction=1` gives the unbiased (Bessel) estimate."""
    from .elementwise import square
    axes = normalize_axes(axis, x.ndim, "var")
    d = x - mean(x, axis=axes, keepdims=True)
    ss = sum(square(d), axis=axes, keepdims=keepdims)
    return ss / (numel(x, axes) - correction) if correction else ss / numel(x, axes)
