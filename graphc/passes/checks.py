"""Drop run-time index checks that another node of the graph already makes.

The gradient of a label loss (cross_entropy, nll_loss) reads the labels through
an `index_check` node, so that a graph holding only the gradient still checks
them.  A training graph also holds the loss itself, whose own kernel checks the
same labels against the same class count and ignore_index in the same call,
with the same error: the `index_check` is then redundant and is replaced by the
labels (one scan of the labels per call instead of two).
"""
from __future__ import annotations

from ..ir.graph import Graph
from .framework import is_tensor, rebuild, register_pass

LABEL_LOSSES = frozenset({"softmax_cross_entropy", "nll"})


def _loss_check(n):
    """(labels id, classes, ignore_index, op) that label-loss node n checks, or None."""
    if n.op.name not in LABEL_LOSSES:
        return None
    scores, labels = n.inputs
    cax = 1 if scores.ndim >= 2 else 0
    return labels.id, scores.shape[cax], n.attrs["ignore_index"], n.op.name


@register_pass("checks")
def drop_redundant_checks(graph: Graph, ctx):
    """Replace index_check(labels) by labels where a label loss in the graph checks
    the same labels the same way (same class count, ignore_index and reported op)."""
    made = {c for c in map(_loss_check, graph.nodes) if c is not None}
    if not made:
        return graph, []
    changes = []

    def visit(n):
        if n.op.name != "index_check" or not is_tensor(n):
            return None
        a = n.attrs
        if a["kind"] != "label" or (n.inputs[0].id, a["size"], a["ignore"], a["for_op"]) \
                not in made:
            return None
        changes.append(f"index_check {n.label()}: already checked by {a['for_op']}")
        return n.inputs[0]
    g, _ = rebuild(graph, visit)
    return g, changes
