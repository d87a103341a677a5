"""The pass framework: a registry of named passes, a node-by-node rebuild
helper that rewrites passes share, and the provenance rule for new nodes.

Contract of a pass: `fn(graph, ctx) -> (new_graph, changes)`.  A pass never
mutates the nodes of the graph it is given (nodes are immutable; rewrites
build new nodes), so the unoptimized graph stays valid and the caller can
compare the two.  `changes` is a list of short human-readable strings, one per
rewrite (empty: the pass changed nothing).  `ctx` is the `PassContext`, which
holds the options and collects notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import node as _node_mod
from ..ir.graph import Graph, clone_with_inputs
from ..ir.node import TensorType

PASSES: dict = {}


@dataclass
class PassInfo:
    name: str
    fn: object
    doc: str


def register_pass(name: str):
    """Decorator: add a pass function to the registry under `name`."""
    def deco(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = PassInfo(name, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


@dataclass
class PassContext:
    """Options every pass can read.

    nan_unsafe: allow rewrites that are wrong for inf/NaN inputs (x*0 -> 0).
    fold_limit: largest number of elements constant folding materializes.
    max_fusion: largest number of ops fused into one node.
    n_updates: how many trailing graph outputs are parameter-update values
      (the Function writes them into the parameters after the call).
    """
    nan_unsafe: bool = False
    fold_limit: int = 1 << 20
    max_fusion: int = 64
    n_updates: int = 0
    notes: list = field(default_factory=list)


def fresh_id_mark() -> int:
    """An id no existing node has: nodes built after this call have larger ids."""
    return next(_node_mod._ids) + 1


def adopt_provenance(result, original, mark: int) -> None:
    """Give nodes built by a rewrite (id >= mark) the original node's loc/scope/role,
    so errors, renderings and reports still point at the user's line.

    Only the new nodes are walked: a node older than `mark` cannot have been
    built by the rewrite, and neither can anything it reads (ids grow), so the
    walk stops there.  Walking the whole ancestry instead made every rewrite
    cost O(graph) and the simplify pass quadratic in the graph's size."""
    stack, seen = [result], set()
    while stack:
        n = stack.pop()
        if n.id < mark or n.id in seen:
            continue
        seen.add(n.id)
        if n.inputs:
            n.loc, n.scope, n.role = original.loc, original.scope, original.role
            stack.extend(n.inputs)


def rebuild(graph: Graph, visit, max_steps: int = 8):
    """Walk `graph` inputs-first, rebuilding nodes whose inputs were replaced.

    `visit(node)` gets each node with its inputs already rewritten and returns
    a replacement node or None.  A replacement is visited again (up to
    `max_steps` times, the loop guard for rules that undo each other); nodes it
    built are not revisited in this sweep -- the fixed-point driver's next
    sweep reaches them.  Returns (new graph, number of replacements).
    """
    memo: dict = {}
    count = 0
    for n in graph.nodes:
        if n.inputs:
            new_inputs = tuple(memo[i.id] for i in n.inputs)
            m = n if all(a is b for a, b in zip(new_inputs, n.inputs)) else \
                clone_with_inputs(n, new_inputs)
        else:
            m = n
        for _ in range(max_steps):
            r = visit(m)
            if r is None or r is m:
                break
            count += 1
            m = r
        memo[n.id] = m
    out = Graph([memo[o.id] for o in graph.outputs], [memo.get(i.id, i) for i in graph.inputs])
    return out, count


def is_tensor(node) -> bool:
    """False for tuple-valued nodes (a loop's results), which have no single shape."""
    return isinstance(node.type, TensorType)


def count_kernels(graph: Graph) -> int:
    """Nodes a backend launches as kernels: every non-leaf except views (reshape)."""
    return sum(1 for n in graph.nodes if n.inputs and n.op.name not in VIEW_OPS)


VIEW_OPS = frozenset({"reshape"})
