"""Fusion: groups of ops become one `fused` node that a backend runs as one kernel.

The fused node (the contract backends rely on):

    node.op.name == "fused"
    node.attrs   == {"kind": "elementwise" | "reduce" | "matmul_epilogue" | "conv_epilogue",
                     "label": "sub+exp+sum",      # the member ops, inputs first
                     "uid": <int>}                 # unique: keeps Node.key() distinct
    node.value   == the inner graphc.ir.Graph: `inputs` are `input` nodes that
                    correspond positionally to node.inputs; one output.  Besides
                    those inputs its only leaves are scalar (shape ()) constants.

Kind "reduce" holds reductions and the elementwise ops around them:
prologue ops (at the reduced input's shape) -> sum/mean/max/min -> epilogue ops
(at its output shape); or a row softmax/log_softmax followed by elementwise ops;
or softmax_cross_entropy's per-row losses -> elementwise ops -> a reduction to
one value -> elementwise ops; or a row group: keepdims reductions over the same
trailing axes of a shape D with elementwise ops of shape D or of the row shape.

Grouping rules (predictable by design; docs/optimizer.md has the full list and
examples):

0. Recomputation: a reduction whose elementwise prologue is also read by other
   elementwise ops gets its own copy of it (recompute_prologues), kept only
   when that yields fewer kernels.
1. Nodes are visited from the outputs backwards.  A fusable node that no group
   holds yet roots a new group: an elementwise op (op.elementwise), or a
   reduction (sum, mean, max, min).
2. A group absorbs a producer p of one of its members when
   - every user of p is already in the group (a value needed elsewhere stays
     materialized: a group has exactly one output),
   - p is not a graph output (outputs, including parameter-update values,
     are materialized),
   - p's users are all before/in the reduction or all after it,
   - p is elementwise and has that side's iteration shape (the root's shape,
     or the reduced input's shape for the prologue) or has a single element,
   - the group holds fewer than `max_fusion` ops.
3. A group of elementwise ops may also absorb one matmul/conv2d (-> matmul_/
   conv_epilogue), one reduction of its shape (-> reduce, with its prologue),
   or one row softmax/log_softmax (-> reduce); a reduce group reducing
   softmax_cross_entropy's losses to one value may absorb that op.  The inputs
   of matmul, conv2d and the softmax family stay outside the group.
4. Row groups (merge_row_groups): an elementwise group of shape D merges the
   keepdims reductions over D's trailing axes (and their groups, and the ops
   of shape D or of the row shape between them) that only it reads.
5. A group of one op is left as the plain op.
"""
from __future__ import annotations

import heapq
import itertools
import weakref
from math import prod

import numpy as np

from ..ir.errors import GraphcError, IndexOutOfRangeError
from ..ir.graph import Graph, clone_with_inputs
from ..ir.node import Node, TensorType
from ..ops.base import REGISTRY, Op, register
from .framework import count_kernels, is_tensor, register_pass

REDUCE_OPS = frozenset({"sum", "mean", "max", "min"})
MATMUL_OPS = frozenset({"matmul"})
CONV_OPS = frozenset({"conv2d"})

_INNER: "weakref.WeakValueDictionary[int, Graph]" = weakref.WeakValueDictionary()
_uids = itertools.count()


def inner_graph(node_or_uid) -> Graph:
    """The inner graph of a fused node (or of its uid)."""
    uid = node_or_uid.attrs["uid"] if isinstance(node_or_uid, Node) else node_or_uid
    try:
        return _INNER[uid]
    except KeyError:
        raise GraphcError(f"fused node uid={uid} has no inner graph (was it freed?)") from None


def run_inner(graph: Graph, args) -> np.ndarray:
    """Evaluate an inner graph with the ops' NumPy references (like the interpreter)."""
    vals = {i.id: a for i, a in zip(graph.inputs, args)}
    for n in graph.nodes:
        if n.id in vals:
            continue
        if n.op.name == "constant":
            vals[n.id] = n.value
        elif n.op.name == "input":
            raise GraphcError(f"fused graph reads input {n.label()} that is not among its inputs")
        else:
            try:
                with np.errstate(all="ignore"):
                    vals[n.id] = np.asarray(n.op.evaluate(*(vals[i.id] for i in n.inputs),
                                                          **n.attrs))
            except IndexOutOfRangeError as e:   # reported at the inner node's line
                raise e.located(n.loc) from None
    return vals[graph.outputs[0].id]


def infer_inner(graph: Graph, types) -> TensorType:
    """The output type of an inner graph for (possibly new) input types."""
    tys = {i.id: t for i, t in zip(graph.inputs, types)}
    for n in graph.nodes:
        if n.id in tys:
            continue
        if not n.inputs:
            tys[n.id] = n.type
        else:
            tys[n.id] = n.op.infer([tys[i.id] for i in n.inputs], **n.attrs)
    return tys[graph.outputs[0].id]


@register
class FusedOp(Op):
    """Several ops run as one kernel; the inner graph lives in node.value."""
    name = "fused"
    arity = None
    differentiable = False

    def check(self, kind, label, uid):
        if kind not in ("elementwise", "reduce", "matmul_epilogue", "conv_epilogue"):
            raise ValueError(f"unknown fusion kind {kind!r}")
        return {"kind": kind, "label": str(label), "uid": int(uid)}

    def infer(self, types, kind, label, uid):
        return infer_inner(inner_graph(uid), types)

    def evaluate(self, *args, kind, label, uid):
        return run_inner(inner_graph(uid), args)

    def vjp(self, node, g):
        raise GraphcError("fused nodes have no gradient rule: fusion runs after autodiff "
                          "(differentiate the unoptimized graph, then compile)")


# ------------------------------------------------------------------ grouping
def _is_ew(n) -> bool:
    return bool(n.inputs) and n.op.elementwise and is_tensor(n)


def _is_reduction(n) -> bool:
    return n.op.name in REDUCE_OPS and bool(n.inputs) and is_tensor(n.inputs[0])


ROW_OPS = frozenset({"softmax", "log_softmax", "softmax_cross_entropy"})
# A fused loss reduction visits the rows one after another (one accumulator):
# only for logits up to this many elements; larger ones keep the parallel
# per-row kernel and a (chunked, parallel) reduction.
XENT_LIMIT = 1 << 16


def _is_row_softmax(n) -> bool:
    """softmax/log_softmax along axis 1 of a matrix (what the row kernels fuse)."""
    return (n.op.name in ("softmax", "log_softmax") and is_tensor(n) and n.ndim == 2
            and n.attrs["axis"] == 1)


def _is_row_xent(n) -> bool:
    """softmax_cross_entropy of (N, C) logits: one loss per row."""
    return (n.op.name == "softmax_cross_entropy" and is_tensor(n) and n.ndim == 1
            and n.inputs[0].ndim == 2)


def _numel(shape):
    return None if any(isinstance(d, str) for d in shape) else prod(shape)


def find_groups(graph: Graph, max_size: int = 64) -> list:
    """Fusion groups as (kind, nodes) (nodes inputs first; the last one is the root)."""
    order = graph.nodes
    index = {n.id: k for k, n in enumerate(order)}
    users = graph.users()
    outputs = {o.id for o in graph.outputs}
    assigned: dict = {}
    groups = []
    for root in reversed(order):
        if root.id in assigned or not root.inputs:
            continue
        # part[id]: "post" = computed at the group's output shape (elementwise ops,
        # epilogues), "pre" = inside the reduction's loop at its input's shape.
        if _is_ew(root):
            kind, part = "elementwise", {root.id: "post"}
            domain = {"post": tuple(root.shape), "pre": None}
        elif _is_reduction(root):
            kind, part = "reduce", {root.id: "red"}
            domain = {"post": tuple(root.shape), "pre": tuple(root.inputs[0].shape)}
        else:
            continue
        members = {root.id: root}
        red = root if kind == "reduce" else None
        blocked, has_row_op = set(), False
        heap = []
        queued = set()

        def push(n):
            for p in n.inputs:
                if p.id not in queued and p.id not in members:
                    queued.add(p.id)
                    heapq.heappush(heap, (-index[p.id], p.id, p))
        push(root)
        while heap and len(members) < max_size:
            _, _, p = heapq.heappop(heap)
            if (p.id in assigned or not p.inputs or p.id in outputs or p.id in blocked
                    or not all(u.id in members for u in users[p.id])):
                continue
            sides = {"post" if part[u.id] == "post" else "pre" for u in users[p.id]}
            if len(sides) != 1:
                continue        # read both inside and after the reduction: materialized
            side = sides.pop()
            if _is_ew(p) and (tuple(p.shape) == domain[side] or _numel(p.shape) == 1):
                members[p.id], part[p.id] = p, side
                push(p)
            elif (kind == "elementwise" and p.op.name in MATMUL_OPS | CONV_OPS
                  and tuple(p.shape) == domain["post"]):
                kind = "matmul_epilogue" if p.op.name in MATMUL_OPS else "conv_epilogue"
                members[p.id], part[p.id] = p, "post"   # its inputs stay outside the group
            elif (kind == "elementwise" and _is_reduction(p)
                  and tuple(p.shape) == domain["post"]):
                # an elementwise epilogue on a reduction (bias gradient + SGD update)
                kind, domain["pre"] = "reduce", tuple(p.inputs[0].shape)
                members[p.id], part[p.id] = p, "red"
                red = p
                push(p)
            elif (kind == "elementwise" and side == "post" and _is_row_softmax(p)
                  and tuple(p.shape) == domain["post"]):
                # softmax over the rows of a matrix, then elementwise ops (the
                # cross-entropy gradient softmax(z) - onehot): one row kernel
                kind = "reduce"
                members[p.id], part[p.id] = p, "post"     # its input stays outside
                blocked.update(i.id for i in p.inputs)
            elif (kind == "reduce" and side == "pre" and not has_row_op and red is not None
                  and _is_row_xent(p) and tuple(p.shape) == domain["pre"]
                  and _numel(tuple(red.shape)) == 1
                  and (_numel(p.inputs[0].shape) or XENT_LIMIT + 1) <= XENT_LIMIT):
                # a loss reduced to one value: mean(softmax_cross_entropy(z, y))
                members[p.id], part[p.id] = p, "pre"      # its inputs stay outside
                blocked.update(i.id for i in p.inputs)
            has_row_op = has_row_op or p.op.name in ROW_OPS and p.id in members
        if len(members) < 2:
            continue
        group = sorted(members.values(), key=lambda n: index[n.id])
        for n in group:
            assigned[n.id] = len(groups)
        groups.append((kind, group))
    return groups


# ------------------------------------------------------------------ row groups
def _row_axes(red):
    """The reduced axes of a keepdims reduction over the trailing axes of its
    input, or None."""
    if not _is_reduction(red) or not red.attrs.get("keepdims"):
        return None
    x = red.inputs[0]
    axes = tuple(red.op.axes(x.ndim, red.attrs["axis"]))
    if not axes or axes != tuple(range(x.ndim - len(axes), x.ndim)):
        return None
    return axes


def _row_member(n, domain, row_shape, axes) -> bool:
    if _is_ew(n):
        return tuple(n.shape) in (domain, row_shape) or _numel(n.shape) == 1
    return _row_axes(n) == axes and tuple(n.inputs[0].shape) == domain


def merge_row_groups(graph: Graph, groups: list, max_size: int) -> list:
    """Merge an elementwise group of shape D with the reductions (and their groups)
    over D's trailing axes whose row values (keepdims) only it and they read:
    layer_norm's mean, variance and normalization become one row kernel.

    Every member is then elementwise of shape D, of the row shape (D with the
    reduced axes 1) or of one element, or a keepdims reduction over those axes
    of a D-shaped value; nothing outside reads any member but the root.
    """
    users = graph.users()
    outputs = {o.id for o in graph.outputs}
    grouped = {n.id for _, g in groups for n in g}
    groups = list(groups) + [("elementwise", [n]) for n in reversed(graph.nodes)
                             if _is_ew(n) and n.id not in grouped]   # lone ops may root too
    group_of = {n.id: k for k, (_, g) in enumerate(groups) for n in g}
    index = {n.id: i for i, n in enumerate(graph.nodes)}
    roots = [g[-1] for _, g in groups]
    merged_into = {}
    for k in sorted(range(len(groups)), key=lambda j: -index[roots[j].id]):   # consumers first
        kind, g = groups[k]
        root = roots[k]
        if kind != "elementwise" or not root.ndim or k in merged_into:
            continue
        domain = tuple(root.shape)
        members = {n.id: n for n in g}
        parts, axes = [k], None
        changed = True
        while changed:
            changed = False
            for n in list(members.values()):
                for p in n.inputs:
                    if p.id in members or not p.inputs or p.id in outputs:
                        continue
                    src = group_of.get(p.id)
                    block = [p] if src is None else groups[src][1]
                    if src is not None and (src in merged_into or roots[src] is not p):
                        continue
                    red = next((m for m in block if _is_reduction(m)), None)
                    ax = axes if red is None else _row_axes(red)
                    if ax is None or (axes is not None and ax != axes):
                        continue        # one set of reduced axes per row group
                    rs = tuple(1 if d in ax else s for d, s in enumerate(domain))
                    if not all(_row_member(m, domain, rs, ax) for m in block):
                        continue
                    if not all(u.id in members or u.id in {m.id for m in block}
                               for u in users[p.id]):
                        continue
                    if len(members) + len(block) > max_size:
                        continue
                    axes = ax
                    for m in block:
                        members[m.id] = m
                    if src is not None:
                        parts.append(src)
                    changed = True
        if len(parts) == 1 and not any(_is_reduction(m) for m in members.values()):
            continue
        if not any(_is_reduction(m) for m in members.values()):
            continue
        for j in parts[1:]:
            merged_into[j] = k
        groups[k] = ("reduce", list(members.values()))
    return [(kind, sorted(g, key=lambda n: index[n.id]))
            for k, (kind, g) in enumerate(groups) if k not in merged_into and len(g) > 1]


# ------------------------------------------------------------------ recomputation
RECOMPUTE_LIMIT = 16


def _absorbable(b, domain) -> bool:
    """Could some group absorb `b` if all its readers were in that group?"""
    if not b.inputs or not is_tensor(b):
        return False
    if _is_ew(b):
        return tuple(b.shape) == domain or _numel(b.shape) == 1
    return (b.op.name in MATMUL_OPS | CONV_OPS or _is_reduction(b)) and tuple(b.shape) == domain


def _prologue_cone(red, users, outputs, limit):
    """The elementwise ops of red's input shape that red depends on through such ops
    (topological order), when recomputing them inside red's kernel lets their
    other readers fuse them; else None.

    Conditions: some cone value is also read outside the cone; every such outside
    reader is elementwise; the cone has at most `limit` ops; every value the cone
    reads from outside it (which recomputation gives one more reader) is a leaf,
    a graph output, unfusable, or already read outside the cone.
    """
    domain = tuple(red.inputs[0].shape)
    cone, stack = {}, [red.inputs[0]]
    while stack:
        m = stack.pop()
        if m.id in cone or not _is_ew(m) or tuple(m.shape) != domain or m.id in outputs:
            continue
        cone[m.id] = m
        if len(cone) > limit:
            return None
        stack.extend(m.inputs)
    if not cone:
        return None
    inside = set(cone) | {red.id}
    shared = False
    for m in cone.values():
        outside = [u for u in users[m.id] if u.id not in inside]
        if outside:
            shared = True
            if not all(_is_ew(u) for u in outside):
                return None
    if not shared:
        return None
    for m in cone.values():
        for b in m.inputs:
            if b.id in cone or b.id in outputs or not _absorbable(b, domain):
                continue
            if all(u.id in cone for u in users[b.id]):
                return None
    return cone


def recompute_prologues(graph: Graph, limit: int = RECOMPUTE_LIMIT):
    """A copy of `graph` in which each reduction that qualifies (see _prologue_cone)
    reads its own copy of its elementwise prologue; (graph, descriptions)."""
    users = graph.users()
    outputs = {o.id for o in graph.outputs}
    cones = {}
    for n in graph.nodes:
        if _is_reduction(n):
            c = _prologue_cone(n, users, outputs, limit)
            if c is not None:
                cones[n.id] = c
    if not cones:
        return graph, []
    memo, notes = {}, []
    for n in graph.nodes:
        ins = tuple(memo[i.id] for i in n.inputs)
        if n.id in cones:
            cone = cones[n.id]
            copies = {}
            for m in graph.nodes:           # topological order
                if m.id in cone:
                    copies[m.id] = clone_with_inputs(
                        m, tuple(copies.get(i.id, memo[i.id]) for i in m.inputs))
            ins = tuple(copies.get(i.id, memo[i.id]) for i in n.inputs)
            notes.append(f"{n.op.name} {n.label()} recomputes {len(cone)} elementwise ops")
        memo[n.id] = n if all(a is b for a, b in zip(ins, n.inputs)) else clone_with_inputs(n, ins)
    out = Graph([memo[o.id] for o in graph.outputs], [memo.get(i.id, i) for i in graph.inputs])
    return out, notes


def _kernels_after(graph, groups) -> int:
    return count_kernels(graph) - sum(len(g) - 1 for _, g in groups)


def _label(group) -> str:
    names = [n.op.name for n in group]
    if len(names) > 6:
        return "+".join(names[:5]) + f"+...({len(names)} ops)"
    return "+".join(names)


def make_fused(kind: str, group: list, mapped_input) -> Node:
    """Build the fused node for `group` (members inputs-first, root last).

    `mapped_input(n)` gives the node of the new outer graph that stands for
    the external value n.
    """
    member_ids = {n.id for n in group}
    ext, inner_of = [], {}
    inner_inputs = []
    for n in group:
        for i in n.inputs:
            if i.id in member_ids or i.id in inner_of:
                continue
            if i.op.name == "constant" and is_tensor(i) and i.shape == ():
                inner_of[i.id] = i          # scalars become immediates inside the kernel
                continue
            leaf = Node(REGISTRY["input"], (), {}, i.type, name=f"in{len(ext)}", loc=i.loc)
            inner_of[i.id] = leaf
            inner_inputs.append(leaf)
            ext.append(i)
    for n in group:
        m = Node(n.op, tuple(inner_of[i.id] for i in n.inputs), n.attrs, n.type, name=n.name,
                 loc=n.loc)
        m.scope, m.role = n.scope, n.role
        inner_of[n.id] = m
    root = group[-1]
    inner = Graph([inner_of[root.id]], inner_inputs)
    uid = next(_uids)
    _INNER[uid] = inner
    attrs = {"kind": kind, "label": _label(group), "uid": uid}
    fused = Node(REGISTRY["fused"], tuple(mapped_input(i) for i in ext), attrs, root.type,
                 name=root.name, value=inner, loc=root.loc)
    fused.scope, fused.role = root.scope, root.role
    return fused


@register_pass("fuse")
def fuse(graph: Graph, ctx):
    """Group elementwise chains, matmul/conv epilogues and reduction prologues."""
    groups = merge_row_groups(graph, find_groups(graph, ctx.max_fusion), ctx.max_fusion)
    changes = []
    alt, notes = recompute_prologues(graph, min(RECOMPUTE_LIMIT, ctx.max_fusion // 2))
    if notes:
        alt_groups = merge_row_groups(alt, find_groups(alt, ctx.max_fusion), ctx.max_fusion)
        if _kernels_after(alt, alt_groups) < _kernels_after(graph, groups):
            graph, groups, changes = alt, alt_groups, notes
    root_of = {g[-1].id: (kind, g) for kind, g in groups}
    inside = {n.id for _, g in groups for n in g[:-1]}
    memo: dict = {}
    for n in graph.nodes:
        if n.id in inside:
            continue
        if n.id in root_of:
            kind, g = root_of[n.id]
            memo[n.id] = make_fused(kind, g, lambda i: memo[i.id])
            changes.append(f"fused {kind} [{memo[n.id].attrs['label']}] ({len(g)} ops)")
        elif n.inputs:
            new_inputs = tuple(memo[i.id] for i in n.inputs)
            if all(a is b for a, b in zip(new_inputs, n.inputs)):
                memo[n.id] = n
            else:
                m = Node(n.op, new_inputs, n.attrs, n.type, name=n.name, value=n.value, loc=n.loc)
                m.scope, m.role = n.scope, n.role
                memo[n.id] = m
        else:
            memo[n.id] = n
    out = Graph([memo[o.id] for o in graph.outputs], [memo.get(i.id, i) for i in graph.inputs])
    return out, changes
