"""Matrix products: matmul (2-D and batched, broadcasting batch dims), linear."""
from __future__ import annotations

import numpy as np

from ..ir import dtypes as dt
from ..ir.errors import GraphBuildError
from ..ir.node import TensorType, user_location
from ..ir.shapes import broadcast_shapes, shape_str
from .base import Op, apply, register

__all__ = ["matmul", "linear"]


@register
class MatmulOp(Op):
    """a @ b for a (..., m, k) and b (..., k, n); batch dims broadcast."""
    name = "matmul"
    arity = 2

    def infer(self, types):
        a, b = types
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError("matmul operands must have rank >= 2 (the user function "
                             "handles vectors)")
        if not (dt.is_float(a.dtype) and dt.is_float(b.dtype)):
            raise TypeError(f"matmul needs float operands, got {a.dtype} and {b.dtype}")
        ka, kb = a.shape[-1], b.shape[-2]
        if ka != kb:
            raise ValueError(f"inner dimensions differ: {shape_str(a.shape)} @ "
                             f"{shape_str(b.shape)} ({ka} != {kb})")
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return TensorType(dt.promote(a.dtype, b.dtype), batch + (a.shape[-2], b.shape[-1]))

    def evaluate(self, a, b):
        return np.matmul(a, b).astype(dt.promote(a.dtype, b.dtype), copy=False)

    def vjp(self, node, g):
        from .elementwise import unbroadcast
        from .shape import transpose
        a, b = node.inputs

        def mT(x):
            perm = list(range(x.ndim))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            return transpose(x, perm)
        ga = matmul(g, mT(b))
        gb = matmul(mT(a), g)
        return [unbroadcast(ga, a), unbroadcast(gb, b)]


def matmul(a, b):
    """NumPy's matmul semantics, including 1-D operands (promoted, then squeezed)."""
    from .shape import reshape
    from .base import as_node
    a, b = as_node(a), as_node(b)
    if a.ndim == 0 or b.ndim == 0:
        raise GraphBuildError(f"matmul: operands must not be scalars (got shapes "
                              f"{shape_str(a.shape)} and {shape_str(b.shape)})\n"
                              f"  at {user_location()}")
    va, vb = a.ndim == 1, b.ndim == 1
    if va:
        a = reshape(a, (1, a.shape[0]))
    if vb:
        b = reshape(b, (b.shape[0], 1))
    out = apply("matmul", [a, b])
    if va or vb:
        shape = tuple(out.shape)
        if va:
            shape = shape[:-2] + shape[-1:]
        if vb:
            shape = shape[:-1]
        out = reshape(out, shape)
    return out


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight shaped (out_features, in_features)."""
    from .shape import transpose
    if weight.ndim != 2:
        raise GraphBuildError(f"linear: weight must be 2-D (out, in), got "
                              f"{shape_str(weight.shape)}\n  at {user_location()}")
    y = matmul(x, transpose(weight))
    return y + bias if bias is not None else y
