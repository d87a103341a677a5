"""The reference backend: walk the graph in topological order with NumPy."""
from __future__ import annotations

from ...ir.graph import Graph
from ...ops.reference import eval_graph


def run(graph: Graph, feeds: dict) -> list:
    """Evaluate graph.outputs; `feeds` maps input node id → array."""
    return eval_graph(graph, feeds)


def build(graph: Graph):
    ids = [i.id for i in graph.inputs]

    def runner(arrays):
        return eval_graph(graph, dict(zip(ids, arrays)))
    return runner
