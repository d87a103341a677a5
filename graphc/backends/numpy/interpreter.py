"""The reference backend: walk the graph in topological order with NumPy."""
from __future__ import annotations

from ...ir.graph import Graph
from ...ops.reference import eval_graph
from .blas import limited as _one_blas_thread


def run(graph: Graph, feeds: dict) -> list:
    """Evaluate graph.outputs; `feeds` maps input node id → array."""
    with _one_blas_thread:            # the thread policy: see blas.py
        return eval_graph(graph, feeds)


def build(graph: Graph):
    ids = [i.id for i in graph.inputs]

    def runner(arrays):
        with _one_blas_thread:
            return eval_graph(graph, dict(zip(ids, arrays)))
    return runner
