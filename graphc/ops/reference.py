"""Evaluate a graph with each op's NumPy reference implementation.

This walker is the semantics of the IR: the NumPy backend is a thin wrapper
around it, and ops that hold an inner graph (fused groups, loop bodies)
evaluate that graph with it.
"""
from __future__ import annotations

import numpy as np

from ..ir.errors import GraphcError, IndexOutOfRangeError
from ..ir.node import TupleType


def _check_result(node, out):
    """Catch a reference implementation that disagrees with its own type rule."""
    if isinstance(node.type, TupleType):
        if not isinstance(out, tuple) or len(out) != len(node.type.types):
            raise GraphcError(f"internal error: {node.op.name} should produce a tuple of "
                              f"{len(node.type.types)} arrays")
        return
    if out.dtype != node.dtype or out.ndim != node.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(node.shape, out.shape)):
        raise GraphcError(f"internal error: {node.op.name} produced {out.dtype}{out.shape}, "
                          f"its type rule says {node.type} (node built at {node.loc})")


def eval_graph(graph, feeds: dict) -> list:
    """Evaluate graph.outputs; `feeds` maps input node id → array."""
    order = graph.nodes
    remaining: dict = {}
    for n in order:
        for i in n.inputs:
            remaining[i.id] = remaining.get(i.id, 0) + 1
    keep = {o.id for o in graph.outputs}
    vals: dict = {}
    for n in order:
        kind = n.op.name
        if kind == "input":
            try:
                out = feeds[n.id]
            except KeyError:
                raise GraphcError(f"no value fed for input {n.label()}") from None
        elif kind in ("parameter", "constant"):
            out = n.value
        else:
            args = [vals[i.id] for i in n.inputs]
            try:
                with np.errstate(all="ignore"):
                    out = n.op.evaluate(*args, **n.attrs)
            except IndexOutOfRangeError as e:   # the same error as the native backends'
                raise e.located(n.loc) from None
            except GraphcError:
                raise
            except Exception as e:  # a data-dependent failure (e.g. an index out of range)
                raise GraphcError(f"{kind} failed at run time: {e}\n  node built at {n.loc}") from e
            if not isinstance(out, tuple):
                out = np.asarray(out)
            _check_result(n, out)
        vals[n.id] = out
        for i in n.inputs:
            remaining[i.id] -= 1
            if remaining[i.id] == 0 and i.id not in keep:
                del vals[i.id]  # free intermediates as soon as their last reader ran
    return [vals[o.id] for o in graph.outputs]
