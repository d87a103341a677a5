"""The reference backend: walk the graph in topological order with NumPy."""
from __future__ import annotations

import numpy as np

from ...ir.errors import GraphcError
from ...ir.graph import Graph


def _check_result(node, out):
    """Catch a reference implementation that disagrees with its own type rule."""
    if out.dtype != node.dtype or out.ndim != node.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(node.shape, out.shape)):
        raise GraphcError(f"internal error: {node.op.name} produced {out.dtype}{out.shape}, "
                          f"its type rule says {node.type} (node built at {node.loc})")


def run(graph: Graph, feeds: dict) -> list:
    """Evaluate graph.outputs; `feeds` maps input node id → array."""
    order = graph.nodes
    remaining = {}
    for n in order:
        for i in n.inputs:
            remaining[i.id] = remaining.get(i.id, 0) + 1
    keep = {o.id for o in graph.outputs}
    vals: dict = {}
    for n in order:
        kind = n.op.name
        if kind == "input":
            out = feeds[n.id]
        elif kind in ("parameter", "constant"):
            out = n.value
        else:
            args = [vals[i.id] for i in n.inputs]
            try:
                with np.errstate(all="ignore"):
                    out = n.op.evaluate(*args, **n.attrs)
            except GraphcError:
                raise
            except Exception as e:  # a data-dependent failure (e.g. an index out of range)
                raise GraphcError(f"{kind} failed at run time: {e}\n  node built at {n.loc}") from e
            out = np.asarray(out)
            _check_result(n, out)
        vals[n.id] = out
        for i in n.inputs:
            remaining[i.id] -= 1
            if remaining[i.id] == 0 and i.id not in keep:
                del vals[i.id]  # free intermediates as soon as their last reader ran
    return [vals[o.id] for o in graph.outputs]


def build(graph: Graph):
    ids = [i.id for i in graph.inputs]

    def runner(arrays):
        return run(graph, dict(zip(ids, arrays)))
    return runner
