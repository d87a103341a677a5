"""Reverse-mode automatic differentiation as a graph transform.

`grad(y, wrt)` walks the graph from y back to the leaves, asks each op's
gradient rule (its VJP, which builds ordinary graph nodes) for its inputs'
cotangents, and sums contributions.  The result is a set of new nodes in the
same IR: the backward graph can be printed, rendered, optimized, compiled,
and differentiated again.
"""
from __future__ import annotations

from .ir import dtypes as dt
from .ir.errors import GraphBuildError
from .ir.graph import toposort
from .ir.node import Node, TupleType, _ctx, role, user_location
from .ir.shapes import shape_str
from .ops import elementwise as E
from .ops.base import as_node, constant

__all__ = ["grad"]


def _sum_all(terms):
    total = terms[0]
    for t in terms[1:]:
        total = E.add(total, t)
    return total


def grad(y: Node, wrt, grad_output=None, allow_unused: bool = True):
    """Gradients of `y` with respect to each node in `wrt`, as graph nodes.

    y must be a scalar unless `grad_output` (the cotangent of y, same shape)
    is given.  A node of `wrt` that y does not depend on gets zeros, or a
    ValueError when `allow_unused=False`.  Returns a list (a single node when
    `wrt` is a single node).
    """
    single = isinstance(wrt, Node)
    wrt_list = [wrt] if single else list(wrt)
    loc = user_location()
    if not isinstance(y, Node):
        raise TypeError(f"grad: y must be a graph tensor, got {type(y).__name__} (at {loc})")
    for w in wrt_list:
        if not isinstance(w, Node):
            raise TypeError(f"grad: wrt entries must be graph tensors, got {type(w).__name__}")
        if not dt.is_float(w.dtype):
            raise TypeError(f"grad: cannot differentiate with respect to {w.label()} of "
                            f"dtype {w.dtype} (at {loc})")
    if not dt.is_float(y.dtype):
        raise TypeError(f"grad: y has non-float dtype {y.dtype} (at {loc})")

    with role("backward"):
        if grad_output is None:
            if y.shape != ():
                raise GraphBuildError(
                    f"grad: y has shape {shape_str(y.shape)}; it must be a scalar, or pass "
                    f"grad_output (at {loc})")
            seed = constant(1.0, y.dtype)
        else:
            seed = as_node(grad_output, y.dtype)
            if tuple(seed.shape) != tuple(y.shape):
                raise GraphBuildError(f"grad: grad_output shape {shape_str(seed.shape)} != y "
                                      f"shape {shape_str(y.shape)} (at {loc})")

        order = toposort([y])
        wanted = {w.id for w in wrt_list}
        # Nodes through which y depends on some wrt node: only they need cotangents.
        needs = set()
        for n in order:
            if n.id in wanted or any(i.id in needs for i in n.inputs):
                needs.add(n.id)

        cts: dict = {y.id: [seed]} if y.id in needs else {}
        tuple_cts: dict = {}  # tuple-valued node id -> {element index: [terms]}
        for n in reversed(order):
            if isinstance(n.type, TupleType):
                parts = tuple_cts.get(n.id)
                if not parts:
                    continue
                g = [(_sum_all(parts[k]) if parts.get(k) else None)
                     for k in range(len(n.type.types))]
            else:
                terms = cts.get(n.id)
                if not terms or not n.inputs:
                    continue
                g = _sum_all(terms)
                cts[n.id] = [g]
            if not any(i.id in needs for i in n.inputs):
                continue
            if n.op.name == "tuple_get":
                src = n.inputs[0]
                tuple_cts.setdefault(src.id, {}).setdefault(n.attrs["index"], []).append(g)
                continue
            saved_scope = _ctx.scope
            _ctx.scope = n.scope
            try:
                in_grads = n.op.vjp(n, g)
            finally:
                _ctx.scope = saved_scope
            for inp, gi in zip(n.inputs, in_grads):
                if gi is None or inp.id not in needs:
                    continue
                if tuple(gi.shape) != tuple(inp.shape):
                    raise AssertionError(
                        f"internal error: gradient rule of {n.op.name} returned shape "
                        f"{shape_str(gi.shape)} for an input of shape {shape_str(inp.shape)}")
                if gi.dtype != inp.dtype:
                    gi = E.cast(gi, inp.dtype)
                cts.setdefault(inp.id, []).append(gi)

        results = []
        for w in wrt_list:
            terms = cts.get(w.id)
            if terms:
                results.append(_sum_all(terms))
            elif allow_unused:
                results.append(E.zeros_like(w))
            else:
                raise ValueError(f"grad: y does not depend on {w.label()} (at {loc})")
    return results[0] if single else results
