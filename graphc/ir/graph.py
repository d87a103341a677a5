"""A graph: the nodes that a set of outputs depends on, in topological order."""
from __future__ import annotations

from collections import defaultdict

from .node import Node


def toposort(outputs) -> list:
    """Every node the outputs depend on, inputs before users (iterative DFS)."""
    order, seen = [], set()
    for out in outputs:
        if out.id in seen:
            continue
        stack = [(out, iter(out.inputs))]
        seen.add(out.id)
        while stack:
            node, it = stack[-1]
            for child in it:
                if child.id not in seen:
                    seen.add(child.id)
                    stack.append((child, iter(child.inputs)))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


class Graph:
    """The computation from leaves to `outputs`.

    Nodes are immutable once built; rewrites build new nodes and call
    `replace`, which re-points users and outputs.  `nodes` (a fresh list, in
    topological order) is sorted again whenever the outputs change; since
    nodes are immutable it is cached while they do not.
    """

    def __init__(self, outputs, inputs=()):
        self.outputs: list = list(outputs)
        self.inputs: list = list(inputs)

    # ------------------------------------------------------------ queries
    @property
    def nodes(self) -> list:
        # Cached per set of outputs: nodes are immutable, so the order depends only on
        # which nodes are the outputs.  Passes ask for it (len, users, kernel counts)
        # many times per graph; re-sorting each time cost O(graph) per question.
        key = tuple(o.id for o in self.outputs)
        cached = self.__dict__.get("_nodes_cache")
        if cached is None or cached[0] != key:
            cached = self._nodes_cache = (key, toposort(self.outputs))
        return list(cached[1])

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self):
        self.nodes  # noqa: B018  (fills the cache)
        return len(self._nodes_cache[1])

    def users(self) -> dict:
        """node id -> list of nodes that read it (with repeats for repeated reads)."""
        u = defaultdict(list)
        for n in self.nodes:
            for i in n.inputs:
                u[i.id].append(n)
        return u

    def leaves(self, kind: str | None = None) -> list:
        return [n for n in self.nodes if not n.inputs and (kind is None or n.op.name == kind)]

    def op_counts(self) -> dict:
        counts = defaultdict(int)
        for n in self.nodes:
            counts[n.op.name] += 1
        return dict(counts)

    # ------------------------------------------------------------ rewriting
    def replace(self, old: Node, new: Node) -> None:
        """Make every reader of `old` (and the outputs) read `new` instead.

        Nodes are rebuilt along the path from `old` to the outputs, because
        node inputs are immutable tuples; untouched sub-graphs are shared.
        """
        self.replace_all({old.id: new})

    def replace_all(self, mapping: dict) -> None:
        """Apply {old node id: new node} to the whole graph at once."""
        if not mapping:
            return
        memo = dict(mapping)
        for n in self.nodes:
            if n.id in memo:
                continue
            new_inputs = tuple(memo.get(i.id, i) for i in n.inputs)
            if any(a is not b for a, b in zip(new_inputs, n.inputs)):
                memo[n.id] = clone_with_inputs(n, new_inputs)
        self.outputs = [memo.get(o.id, o) for o in self.outputs]

    # ------------------------------------------------------------ views
    def to_networkx(self):
        """A networkx.MultiDiGraph: one vertex per node id, edges input → user."""
        import networkx as nx
        g = nx.MultiDiGraph()
        for n in self.nodes:
            g.add_node(n.id, node=n, op=n.op.name, label=n.label(), type=str(n.type))
            for k, i in enumerate(n.inputs):
                g.add_edge(i.id, n.id, index=k)
        return g

    def format(self) -> str:
        """One line per node: name = op[attrs](inputs) : type."""
        lines = []
        outs = {o.id for o in self.outputs}
        for n in self.nodes:
            attrs = ", ".join(f"{k}={_short(v)}" for k, v in sorted(n.attrs.items()))
            args = ", ".join(i.label() for i in n.inputs)
            head = f"{n.label()} = {n.op.name}"
            if attrs:
                head += f"[{attrs}]"
            if n.inputs:
                head += f"({args})"
            tail = "   # output" if n.id in outs else ""
            lines.append(f"{head} : {n.type}{tail}")
        return "\n".join(lines)

    __str__ = format

    def __repr__(self):
        return f"<Graph: {len(self)} nodes, {len(self.outputs)} outputs>"

    def _repr_svg_(self):
        """Jupyter shows the graph as a picture (None = fall back to text without graphviz)."""
        from .. import viz  # lazily: the IR does not depend on the tools layer
        return viz.repr_svg(self)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def clone_with_inputs(n: Node, new_inputs) -> Node:
    """A copy of `n` reading `new_inputs` (type unchanged; provenance kept)."""
    m = Node(n.op, new_inputs, n.attrs, n.type, name=n.name, value=n.value, loc=n.loc)
    m.scope, m.role = n.scope, n.role
    return m
