"""Core shape ops: reshape, broadcast_to, transpose.

(Slicing, concatenation, padding and friends live in ops/indexing.py.)
"""
from __future__ import annotations

from math import prod

import numpy as np

from ..ir.errors import GraphBuildError
from ..ir.node import Node, TensorType, user_location
from ..ir.shapes import broadcast_shapes, normalize_shape, shape_str, symbols
from .base import Op, apply, register

__all__ = ["reshape", "broadcast_to", "transpose", "permute", "flatten"]


def _resolve_reshape(src, target):
    """Resolve -1 in `target` against `src`; both may hold symbolic dims.

    Sizes are compared as products: an integer coefficient times a multiset of
    symbols, so (T, N, V) -> (-1, V) gives ("N*T", V) and ("N*T", V) -> (T, N, V)
    is accepted; a -1 takes whatever coefficient and symbols are left over."""
    from collections import Counter

    from ..ir.shapes import dim_factors, make_dim
    target = tuple(target)
    if sum(1 for d in target if d == -1) > 1:
        raise ValueError(f"reshape target {target} has more than one -1")
    for d in target:
        if isinstance(d, int) and d < -1:
            raise ValueError(f"reshape target {target} has a negative dimension {d}")

    def expand(dims):
        coef, names = 1, Counter()
        for d in dims:
            c, ns = dim_factors(d)
            coef *= c
            names.update(ns)
        return coef, names
    src_coef, src_syms = expand(src)
    tgt_coef, tgt_syms = expand(d for d in target if d != -1)
    if -1 in target:
        missing = tgt_syms - src_syms
        if missing:
            s = sorted(missing)[0]
            raise ValueError(f"cannot reshape {shape_str(src)} to {target}: "
                             f"symbol {s!r} is not a dimension of the input")
        if tgt_coef == 0 or src_coef % tgt_coef:
            raise ValueError(f"cannot reshape {shape_str(src)} ({src_coef} elements"
                             f"{' times ' + '*'.join(sorted(src_syms.elements())) if src_syms else ''}) "
                             f"to {target}")
        fill = make_dim(src_coef // tgt_coef, (src_syms - tgt_syms).elements())
        return tuple(fill if d == -1 else d for d in target)
    if src_syms != tgt_syms or src_coef != tgt_coef:
        raise ValueError(f"cannot reshape {shape_str(src)} to {shape_str(target)}: "
                         "sizes differ")
    return target


@register
class ReshapeOp(Op):
    """Same elements, new shape (one dimension may be -1).  Symbolic dimensions
    merge into products: (T, N, V) -> (-1, V) gives (N*T, V), which every backend
    specializes from the bound sizes of N and T."""
    name = "reshape"
    arity = 1
    shape_attrs = ("shape",)

    def check(self, shape):
        shape = (shape,) if isinstance(shape, (int, str)) else tuple(shape)
        return {"shape": tuple(d if isinstance(d, str) else int(d) for d in shape)}

    def infer(self, types, shape):
        return TensorType(types[0].dtype, _resolve_reshape(types[0].shape, shape))

    def evaluate(self, a, shape):
        return a.reshape(tuple(-1 if isinstance(d, str) else d for d in shape))

    def vjp(self, node, g):
        return [reshape(g, node.inputs[0].shape)]


def reshape(a, shape):
    if isinstance(a, Node) and tuple(a.shape) == tuple(shape):
        return a
    return apply("reshape", [a], shape=shape)


@register
class BroadcastToOp(Op):
    """Broadcast to a larger shape (NumPy rules)."""
    name = "broadcast_to"
    arity = 1
    shape_attrs = ("shape",)

    def check(self, shape):
        return {"shape": normalize_shape(shape)}

    def infer(self, types, shape):
        src = types[0].shape
        if len(src) > len(shape):
            raise ValueError(f"cannot broadcast {shape_str(src)} to fewer dimensions "
                             f"{shape_str(shape)}")
        out = broadcast_shapes(src, shape)
        if tuple(out) != tuple(shape):
            raise ValueError(f"cannot broadcast {shape_str(src)} to {shape_str(shape)}")
        return TensorType(types[0].dtype, shape)

    def evaluate(self, a, shape):
        # A concrete array never holds symbols; bind them from the array's own dims.
        lead = len(shape) - a.ndim
        concrete = tuple(a.shape[i - lead] if isinstance(d, str) else d
                         for i, d in enumerate(shape))
        return np.array(np.broadcast_to(a, concrete))  # a writable, contiguous copy

    def vjp(self, node, g):
        from .elementwise import unbroadcast
        return [unbroadcast(g, node.inputs[0])]


def broadcast_to(a, shape):
    shape = normalize_shape(shape)
    if isinstance(a, Node) and tuple(a.shape) == shape:
        return a
    return apply("broadcast_to", [a], shape=shape)


@register
class TransposeOp(Op):
    """Permute axes (default: reverse them)."""
    name = "transpose"
    arity = 1

    def check(self, perm):
        return {"perm": tuple(int(p) for p in perm)}

    def infer(self, types, perm):
        a = types[0]
        if sorted(perm) != list(range(a.ndim)):
            raise ValueError(f"perm {perm} is not a permutation of the {a.ndim} axes")
        return TensorType(a.dtype, tuple(a.shape[p] for p in perm))

    def evaluate(self, a, perm):
        return np.array(np.transpose(a, perm), order="C")

    def vjp(self, node, g):
        inv = tuple(int(i) for i in np.argsort(node.attrs["perm"]))
        return [transpose(g, inv)]


def transpose(a, perm=None):
    """Permute axes; `perm=None` reverses them (for 2-D: the matrix transpose)."""
    nd = a.ndim
    perm = tuple(reversed(range(nd))) if perm is None else tuple(p % nd if nd else p for p in perm)
    if perm == tuple(range(nd)):
        return a
    return apply("transpose", [a], perm=perm)


def permute(a, *perm):
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
        perm = tuple(perm[0])
    return transpose(a, perm)


def flatten(a, start_dim=1, end_dim=-1):
    """Merge dims start_dim..end_dim into one (default keeps the batch dim)."""
    nd = a.ndim
    s, e = start_dim % nd, end_dim % nd
    if s > e:
        raise GraphBuildError(f"flatten: start_dim {start_dim} is after end_dim {end_dim}\n"
                              f"  at {user_location()}")
    mid = a.shape[s:e + 1]
    if len(symbols(mid)) > 1 or (symbols(mid) and len(mid) > 1):
        raise GraphBuildError(f"flatten: cannot merge symbolic dimensions {mid}\n"
                              f"  at {user_location()}")
    merged = mid[0] if len(mid) == 1 else prod(mid)
    return reshape(a, tuple(a.shape[:s]) + (merged,) + tuple(a.shape[e + 1:]))
