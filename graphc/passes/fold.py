"""Constant folding, CSE and DCE: the passes that only look at one node at a time."""
from __future__ import annotations

from math import prod

import numpy as np

from ..ir.graph import Graph
from ..ir.shapes import is_symbolic
from ..ops.base import constant
from .framework import is_tensor, register_pass, rebuild

# Ops never folded: they have effects or fresh randomness, or their value is
# only known at run time even with constant inputs.
_NEVER_FOLD = frozenset({"input", "parameter", "constant", "fused"})
# Ops that only read the *shape* of their input (fold once the shape is concrete).
SHAPE_ONLY = frozenset({"numel"})
# Ops that make their output bigger than their input: folding them would turn a
# cheap fill into a large constant, so they fold only when the result is tiny.
_EXPANDING = frozenset({"broadcast_to"})
_TINY = 1


def _is_stateful(op) -> bool:
    return (getattr(op, "stateful", False) or getattr(op, "random", False)
            or op.name.startswith(("random", "dropout", "rand")))


def _size(node):
    return None if is_symbolic(node.shape) else prod(node.shape)


def try_fold(n, limit: int):
    """The constant `n` evaluates to, or None when it must not be folded."""
    if not n.inputs or n.op.name in _NEVER_FOLD or _is_stateful(n.op):
        return None
    if not is_tensor(n) or not all(is_tensor(i) for i in n.inputs):
        return None
    size = _size(n)
    if size is None or size > limit:
        return None
    if n.op.name in SHAPE_ONLY:
        if any(is_symbolic(i.shape) for i in n.inputs):
            return None
        args = [np.empty(i.shape, dtype=i.dtype) for i in n.inputs]
    else:
        if not all(i.op.name == "constant" for i in n.inputs):
            return None
        if n.op.name in _EXPANDING and size > _TINY:
            return None
        args = [i.value for i in n.inputs]
    try:
        with np.errstate(all="ignore"):
            out = np.asarray(n.op.evaluate(*args, **n.attrs))
    except Exception:  # leave run-time failures (bad index, ...) to run time
        return None
    if out.dtype != n.dtype or out.shape != tuple(n.shape):
        return None
    c = constant(out, dtype=n.dtype)
    c.loc, c.scope, c.role = n.loc, n.scope, n.role
    return c


@register_pass("fold")
def fold_constants(graph: Graph, ctx):
    """Evaluate nodes whose inputs are all constants (and shape-only ops like numel)."""
    changes = []

    def visit(n):
        c = try_fold(n, ctx.fold_limit)
        if c is not None:
            changes.append(f"folded {n.op.name} {n.label()} -> constant{tuple(n.shape)}")
        return c
    g, _ = rebuild(graph, visit, max_steps=1)
    return g, changes


@register_pass("cse")
def eliminate_common_subexpressions(graph: Graph, ctx):
    """Merge structurally identical nodes (same Node.key() after merging inputs)."""
    seen: dict = {}
    changes = []

    def visit(n):
        if n.op.name in ("input", "parameter"):
            return None
        k = n.key()
        try:
            first = seen.get(k)
        except TypeError:      # an unhashable attribute: never merged
            return None
        if first is None:
            seen[k] = n
            return None
        if first is n:
            return None
        changes.append(f"merged {n.op.name} {n.label()} into {first.label()}")
        return first
    g, _ = rebuild(graph, visit, max_steps=1)
    return g, changes


@register_pass("dce")
def eliminate_dead_code(graph: Graph, ctx):
    """Keep only nodes some output depends on.

    A Graph is defined by its outputs, so every rewrite already drops the
    nodes it makes dead; this pass rebuilds the graph from its outputs and
    reports what an explicit node list (`ctx.candidates`, if a caller set it)
    held beyond that.
    """
    live = {n.id for n in graph.nodes}
    dead = [n for n in getattr(ctx, "candidates", ()) if n.id not in live]
    g = Graph(list(graph.outputs), list(graph.inputs))
    return g, [f"dropped dead {n.op.name} {n.label()}" for n in dead]


def dead_nodes(nodes, outputs) -> list:
    """The members of `nodes` that none of `outputs` depends on."""
    live = {n.id for n in Graph(outputs).nodes}
    return [n for n in nodes if n.id not in live]
