"""Pictures of graphs: `gc.render(...)` and `gc.to_dot(...)` (graphviz).

Every node shows its op, its key attributes and its output type.  Leaves are
styled by kind (inputs, parameters, constants); computed nodes are coloured
by role (forward, backward = gradient, update = optimizer); nodes built
inside `gc.name_scope(...)` / an `nn.Module` are grouped into nested labelled
clusters; fused nodes (from the optimizer) are drawn as a cluster holding
their inner graph.  Graphs too big for that to be readable (a training step:
hundreds of ops) are drawn as an overview by default, `detail="modules"`:
one box per module, one per module's gradient, one for the optimizer update
(`detail="full"` draws every op).

`grad_values={parameter or name: gradient array}` (from a real training
step, see `gradient_values`) annotates each parameter and its gradient with
the gradient's norm and colours them on a log scale: vanishing gradients
become visible as a column of cold colours.

This is a tool layer: it reads the IR and the public API only.  The `dot`
program (system graphviz) lays the picture out; when it is missing the error
says how to install it.
"""
from __future__ import annotations

import html
import math
import os
from collections import defaultdict

import numpy as np

from .ir.errors import GraphcError
from .ir.graph import Graph, toposort
from .ir.node import Node

__all__ = ["render", "to_dot", "to_svg", "gradient_values", "GraphvizNotFoundError",
           "ROLE_STYLE", "LEAF_STYLE"]

FORMATS = ("png", "svg", "pdf")

# Fill / border colours.  Roles are told apart by hue, leaves by shape too,
# so a greyscale print stays readable.
ROLE_STYLE = {
    "forward": {"fillcolor": "#dbe9f6", "color": "#3b6ea5"},
    "backward": {"fillcolor": "#fde0c5", "color": "#c8651b"},
    "update": {"fillcolor": "#e8d9f3", "color": "#7b4fa3"},
}
LEAF_STYLE = {
    "input": {"shape": "invhouse", "fillcolor": "#d4efd4", "color": "#2e7d32"},
    "parameter": {"shape": "cylinder", "fillcolor": "#fff3b0", "color": "#a68a00"},
    "constant": {"shape": "note", "fillcolor": "#eeeeee", "color": "#888888"},
}
_GROUP_TITLES = {"forward": "a module's ops, collapsed into one box",
                 "backward": "a module's gradient ops, collapsed",
                 "update": "the optimizer's update, collapsed"}
_ROLE_TITLES = {"forward": "forward op", "backward": "backward (gradient) op",
                "update": "parameter update"}
# What each leaf is, in the legend (the user's words, not graphviz's shape names).
_LEAF_TITLES = {"input": "input (data fed to each call)",
                "parameter": "parameter (weights, trained)",
                "constant": "constant"}
# Graphs with more drawable nodes than this are drawn as an overview by default
# (detail="auto"): LeNet-5's forward graph (36 nodes) in full, its training
# graph (96) and training step (~420) with one box per module.
AUTO_OVERVIEW_NODES = 80
DETAILS = ("auto", "modules", "full")
# Sequential colormap for gradient magnitudes, cold (tiny) to hot (large).
_GRAD_STOPS = ("#313695", "#4575b4", "#74add1", "#abd9e9", "#fee090", "#fdae61", "#f46d43",
               "#d73027", "#a50026")


class GraphvizNotFoundError(GraphcError, RuntimeError):
    """The graphviz `dot` program is not installed (or not on PATH)."""


_INSTALL_HINT = ("graphc renders graphs with the graphviz 'dot' program, which was not found "
                 "on PATH. Install graphviz: 'sudo apt-get install graphviz' (Debian/Ubuntu), "
                 "'brew install graphviz' (macOS), 'conda install -c conda-forge graphviz', or "
                 "see https://graphviz.org/download/")


# ------------------------------------------------------------------ collecting what to draw
def _collect(target, backward):
    """Normalize what the user passed to (outputs, updates, grad_of, title hint).

    Accepts a node, a list of nodes, a Graph, a compiled Function (outputs +
    parameter updates), or anything with a `function` attribute holding one
    (a compiled training step).  grad_of maps gradient node id -> parameter.
    """
    updates = []
    if hasattr(target, "function") and not isinstance(target, (Node, Graph)):
        target = target.function
    if isinstance(target, Graph):
        outputs = list(target.outputs)
    elif isinstance(target, Node):
        outputs = [target]
    elif hasattr(target, "outputs") and hasattr(target, "updates"):  # gc.Function
        outputs = list(target.outputs)
        updates = list(target.updates)
    elif isinstance(target, (list, tuple)):
        outputs = list(target)
    else:
        raise TypeError(f"render: expected a node, a list of nodes, a Graph or a compiled "
                        f"function, got {type(target).__name__}")
    for o in outputs:
        if not isinstance(o, Node):
            raise TypeError(f"render: outputs must be graph nodes, got {type(o).__name__}")
    grad_of = {}
    if backward:
        from .autodiff import grad
        loss = outputs[0]
        if loss.shape != ():
            raise ValueError(f"render(backward=True): the first output must be a scalar loss, "
                             f"got shape {loss.type}")
        params = [n for n in toposort(outputs)
                  if n.op.name == "parameter" and getattr(n, "trainable", True)
                  and n.dtype.kind == "f"]
        if not params:
            raise ValueError("render(backward=True): the loss depends on no trainable parameter")
        grads = grad(loss, params)
        for p, g in zip(params, grads):
            grad_of[g.id] = p
        outputs = outputs + list(grads)
    return outputs, updates, grad_of


# ------------------------------------------------------------------ labels
def _dtype_short(d) -> str:
    d = np.dtype(d)
    return {"f": f"f{d.itemsize * 8}", "i": f"i{d.itemsize * 8}", "u": f"u{d.itemsize * 8}",
            "b": "bool"}.get(d.kind, str(d))


def _type_str(n: Node) -> str:
    return f"{_dtype_short(n.dtype)}[{','.join(str(d) for d in n.shape)}]"


def _attr_str(v) -> str:
    """Compact attribute text: (1, 1) -> 1, ((2, 2), (2, 2)) -> 2."""
    if isinstance(v, tuple):
        items = [_attr_str(x) for x in v]
        if items and all(x == items[0] for x in items) and isinstance(v[0], (tuple, int)):
            return items[0]
        return "(" + ",".join(items) + ")"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _key_attrs(n: Node, limit: int = 4) -> list:
    out = []
    for k, v in sorted(n.attrs.items()):
        if v is None or v is False or (k in ("stride", "dilation", "groups")
                                       and _attr_str(v) == "1"):
            continue  # defaults that say nothing
        s = f"{k}={_attr_str(v)}"
        out.append(s if len(s) <= 32 else s[:29] + "...")
    if len(out) > limit:
        out = out[:limit] + ["..."]
    return out


def _const_text(n: Node) -> str | None:
    v = n.value
    if v is None:
        return None
    v = np.asarray(v)
    if v.size == 1:
        x = v.reshape(()).item()
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    return None


def _html_label(title: str, lines: list, type_text: str, note: str | None = None,
                type_colour: str = "#555555") -> str:
    e = html.escape
    parts = [f"<B>{e(title)}</B>"]
    for ln in lines:
        parts.append(f'<FONT POINT-SIZE="9">{e(ln)}</FONT>')
    if type_text:                       # (an empty FONT element is a dot syntax error)
        parts.append(f'<FONT POINT-SIZE="9" COLOR="{type_colour}">{e(type_text)}</FONT>')
    if note:
        parts.append(f'<FONT POINT-SIZE="9"><I>{e(note)}</I></FONT>')
    return "<" + "<BR/>".join(parts) + ">"


# ------------------------------------------------------------------ gradient colours
def _hex_to_rgb(h):
    return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))


def _grad_colour(t: float) -> str:
    """t in [0, 1] -> colour of the cold-to-hot map."""
    t = min(max(t, 0.0), 1.0) * (len(_GRAD_STOPS) - 1)
    i = min(int(t), len(_GRAD_STOPS) - 2)
    f = t - i
    a, b = _hex_to_rgb(_GRAD_STOPS[i]), _hex_to_rgb(_GRAD_STOPS[i + 1])
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def _text_colour(fill: str) -> str:
    r, g, b = _hex_to_rgb(fill)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


class _GradScale:
    """Log10 scale over the gradient norms being drawn."""

    def __init__(self, norms):
        logs = [math.log10(max(v, 1e-30)) for v in norms]
        self.lo, self.hi = (min(logs), max(logs)) if logs else (0.0, 0.0)

    def t(self, norm: float) -> float:
        if self.hi - self.lo < 1e-12:
            return 0.5
        return (math.log10(max(norm, 1e-30)) - self.lo) / (self.hi - self.lo)

    def colour(self, norm: float) -> str:
        return _grad_colour(self.t(norm))


def _resolve_grad_values(grad_values, nodes, grad_of):
    """{node id: norm} for the parameters / gradient nodes named by the user."""
    if not grad_values:
        return {}
    by_name = defaultdict(list)
    ids = {}
    for n in nodes:
        ids[n.id] = n
        if n.name:
            by_name[n.name].append(n)
    param_to_grad = {p.id: gid for gid, p in grad_of.items()}
    norms = {}
    for key, arr in grad_values.items():
        norm = float(np.linalg.norm(np.asarray(arr, dtype=np.float64).ravel()))
        if isinstance(key, Node):
            targets = [key] if key.id in ids else []
        elif isinstance(key, str):
            targets = [n for n in by_name.get(key, []) if n.op.name == "parameter"] \
                or by_name.get(key, [])
        else:
            raise TypeError(f"grad_values keys must be parameters (nodes) or their names, got "
                            f"{type(key).__name__}")
        if not targets:
            label = key.label() if isinstance(key, Node) else key
            raise KeyError(f"grad_values: {label!r} is not a node of the rendered graph")
        for t in targets:
            norms[t.id] = norm
            if t.id in param_to_grad:       # colour the gradient node too
                norms[param_to_grad[t.id]] = norm
    return norms


# ------------------------------------------------------------------ the drawing
class _Builder:
    def __init__(self, outputs, updates, grad_of, grad_norms, split_roles, show_constants,
                 detail="full"):
        import graphviz
        self.gv = graphviz
        self.outputs = outputs
        self.out_ids = {o.id for o in outputs}
        self.updates = updates
        self.grad_of = grad_of
        self.grad_norms = grad_norms
        self.scale = _GradScale(grad_norms.values()) if grad_norms else None
        self.split_roles = split_roles
        self.show_constants = show_constants
        self.nodes = toposort(outputs + [v for _, v in updates])
        self.roles_seen = set()
        self.leaves_seen = set()
        self.has_fused = False
        self.has_assign = False
        self.group_roles_seen = set()
        self.detail = detail
        self.update_owner = {}
        self.key = {}
        # Where a node's value leaves from (fused nodes: their inner output).
        self.tail = {}

    # -- node statements ------------------------------------------------
    def node_attrs(self, n: Node, prefix: str = "") -> tuple:
        kind = n.op.name
        attrs = {"style": "filled", "shape": "box"}
        note, type_colour = None, "#555555"
        if kind in LEAF_STYLE:
            self.leaves_seen.add(kind)
            attrs.update(LEAF_STYLE[kind])
            title = n.name or kind
            lines = [] if n.name is None or kind != "constant" else ["constant"]
            if kind == "constant":
                txt = _const_text(n)
                if txt is not None:
                    title = n.name or txt
                    lines = []
                attrs["fontsize"] = "9"
            elif kind == "parameter" and not getattr(n, "trainable", True):
                lines = ["buffer"]
        else:
            role = n.role if n.role in ROLE_STYLE else "forward"
            self.roles_seen.add(role)
            attrs.update(ROLE_STYLE[role])
            attrs["style"] = "filled,rounded"
            title = n.op.name
            lines = _key_attrs(n)
            if n.name:
                lines = [n.name] + lines
            if n.id in self.grad_of:
                lines = [f"grad of {self.grad_of[n.id].label()}"] + lines
        if n.id in self.grad_norms and not prefix:
            norm = self.grad_norms[n.id]
            fill = self.scale.colour(norm)
            type_colour = _text_colour(fill)
            attrs.update(fillcolor=fill, fontcolor=type_colour, penwidth="2")
            note = f"|grad| = {norm:.3g}"
        if n.id in self.out_ids and not prefix:
            attrs["peripheries"] = "2"
        attrs["tooltip"] = f"{n.op.name} {n.label()}: {n.type}  ({n.loc})"
        return _html_label(title, lines, _type_str(n), note, type_colour), attrs

    def _own_key(self, n: Node) -> tuple:
        scope = tuple(n.scope or ())
        if self.split_roles and n.role == "update":
            owner = self.update_owner.get(n.id)
            return ("~update",) + ((owner.label(),) if owner is not None else ())
        if self.split_roles and n.role == "backward":
            return ("~backward",) + scope
        return scope

    def assign_clusters(self) -> None:
        """cluster key of every node.

        Computed nodes go to their scope (backward/update ones under their own
        role's cluster).  Update nodes are grouped per parameter they update.
        Parameters and constants built outside any scope (a module's weights
        are created in __init__, not in forward) join the deepest cluster
        shared by the nodes that read them, so a layer's weights sit inside
        the layer's box.
        """
        owners = defaultdict(dict)          # node id -> {parameter id: parameter}
        for p, v in self.updates:
            stack, seen = [v], set()
            while stack:
                n = stack.pop()
                if n.id in seen or n.role != "update" or not n.inputs:
                    continue
                seen.add(n.id)
                owners[n.id][p.id] = p
                stack.extend(n.inputs)
        self.update_owner = {}
        for nid, ps in owners.items():
            main = _main_owner(list(ps.values()))
            if main is not None:
                self.update_owner[nid] = main
        users = defaultdict(list)
        for n in self.nodes:
            for i in n.inputs:
                users[i.id].append(n)
        self.key = {}
        for n in self.nodes:
            if n.inputs or n.op.name == "input":
                self.key[n.id] = self._own_key(n) if n.inputs else ()
        for n in self.nodes:
            if n.id in self.key:
                continue
            if n.scope or not users[n.id]:
                self.key[n.id] = (("~" + n.role,) if self.split_roles and n.role in
                                  ("backward", "update") and n.op.name == "constant" else ()) \
                    + tuple(n.scope or ())
                continue
            readers = users[n.id]
            if n.op.name == "parameter":
                fwd = [u for u in readers if u.role == "forward"]
                readers = fwd or readers
            keys = [self.key[u.id] for u in readers if u.id in self.key]
            self.key[n.id] = _common_prefix(keys)

    def cluster_key(self, n: Node) -> tuple:
        return self.key.get(n.id, ())

    # -- the whole picture ----------------------------------------------
    def build(self, title=None, rankdir="TB", legend=True):
        gv = self.gv
        g = gv.Digraph("graphc", graph_attr={
            "rankdir": rankdir, "fontname": "Helvetica", "fontsize": "11", "nodesep": "0.25",
            "ranksep": "0.35", "compound": "true", "newrank": "true"},
            node_attr={"fontname": "Helvetica", "fontsize": "10", "margin": "0.08,0.04"},
            edge_attr={"fontname": "Helvetica", "fontsize": "8", "arrowsize": "0.6",
                       "color": "#555555"})
        if title:
            g.attr(label=title, labelloc="t", fontsize="14")

        skipped = set()
        if not self.show_constants:
            skipped = {n.id for n in self.nodes if n.op.name == "constant"}

        self.assign_clusters()
        detail = self.detail
        if detail == "auto":
            drawn = sum(1 for n in self.nodes if n.id not in skipped)
            detail = "modules" if drawn > AUTO_OVERVIEW_NODES else "full"
        if detail == "modules":
            self._build_overview(g, skipped)
            if legend:
                self._legend(g)
            return g
        # Group node statements by cluster key.
        groups = defaultdict(list)
        for n in self.nodes:
            if n.id in skipped:
                continue
            key = self.cluster_key(n)
            if n.op.name == "fused" and isinstance(n.value, Graph):
                groups[key].append(("fused", n))
            else:
                groups[key].append(("node", n))
                self.tail[n.id] = f"n{n.id}"
        # Each update ends in a "new value of p" node, drawn in its cluster
        # rather than as an edge back up to p, so the picture flows one way.
        for p, v in self.updates:
            key = self.cluster_key(v) if v.inputs and v.role == "update" else \
                (("~update",) if self.split_roles else ())
            groups[key].append(("set", (p, v)))

        # Fused nodes first: their tails must be known before edges are drawn.
        for key, items in groups.items():
            for kind, n in items:
                if kind == "fused":
                    self.tail[n.id] = self._fused_tail(n)

        self._emit_tree(g, groups)

        for n in self.nodes:
            if n.id in skipped:
                continue
            if n.op.name == "fused" and isinstance(n.value, Graph):
                self._fused_in_edges(g, n, skipped)
                continue
            for i in n.inputs:
                if i.id in skipped:
                    continue
                self._edge(g, i, f"n{n.id}", n.role)
        for p, v in self.updates:
            if v.id in self.tail:
                g.edge(self.tail[v.id], f"set{p.id}", color=ROLE_STYLE["update"]["color"])
        if legend:
            self._legend(g)
        return g

    # -- the overview: one box per module, one for the optimizer update --------
    def _group_of(self, n: Node, extended: set):
        """The box `n` is collapsed into (a cluster key), or None to draw it alone.

        Module scopes collapse at the root module's children ("LeNet5",
        "conv1:Conv2d"): everything a child module computes, its parameters
        included, is one box; a scope with no sub-scopes (a module called on
        its own) is one box too.  The root module's own ops, inputs and the
        loss stay single nodes.  Every node of the optimizer update is one box.
        """
        if n.op.name == "input":
            return None
        key = self.cluster_key(n)
        if key[:1] == ("~update",):
            return ("~update",)
        if key == ("~backward",):               # the gradient of ops outside any module
            return ("~backward", "~loss")
        head = key[:1] if key[:1] == ("~backward",) else ()
        scope = key[len(head):]
        if len(scope) >= 2:
            return head + scope[:2]
        if len(scope) == 1 and key not in extended:
            return key
        return None

    def _build_overview(self, g, skipped):
        extended = set()                        # keys that have sub-scopes
        for k in set(self.key.values()):
            for j in range(1, len(k)):
                extended.add(k[:j])
        members = defaultdict(list)             # group key -> its nodes, in order
        group_of = {}
        for n in self.nodes:
            if n.id in skipped:
                continue
            gk = self._group_of(n, extended)
            if gk is not None:
                group_of[n.id] = gk
                members[gk].append(n)
        gid = {gk: f"g{k}" for k, gk in enumerate(members)}
        users = defaultdict(set)
        for n in self.nodes:
            for i in n.inputs:
                users[i.id].add(group_of.get(n.id, n.id))
        placed = defaultdict(list)              # cluster key -> ("node"/"group", item)
        for n in self.nodes:
            if n.id in skipped or n.id in group_of:
                continue
            placed[self.cluster_key(n)].append(("node", n))
            self.tail[n.id] = f"n{n.id}"
        for gk in members:
            parent = () if gk == ("~update",) else gk[:-1]
            placed[parent].append(("group", gk))
        self._emit_overview_tree(g, placed, members, gid, users, group_of)
        drawn_edges = set()
        for n in self.nodes:
            if n.id in skipped:
                continue
            dst = gid[group_of[n.id]] if n.id in group_of else f"n{n.id}"
            for i in n.inputs:
                if i.id in skipped:
                    continue
                src = gid[group_of[i.id]] if i.id in group_of else f"n{i.id}"
                if src == dst or (src, dst) in drawn_edges:
                    continue
                if n.role == "update" and i.role != "backward" and i.id in group_of:
                    continue    # a module's parameters read by the optimizer: said in its label
                drawn_edges.add((src, dst))
                colour = ROLE_STYLE.get(n.role, ROLE_STYLE["forward"])["color"]
                colour = colour if n.role != "forward" else "#555555"
                if n.role == "backward" and i.role == "backward" and i.inputs:
                    # Gradients flow from the loss back up to the first layer: laid out
                    # upwards, beside the forward column, so the picture is half as tall.
                    g.edge(dst, src, dir="back", color=colour)
                elif n.role != i.role or not i.inputs:
                    # values read across roles (activations read by the backward pass,
                    # gradients read by the optimizer), parameters and inputs: drawn, but
                    # they do not stretch the layout
                    g.edge(src, dst, color=colour, constraint="false")
                else:
                    g.edge(src, dst, color=colour)

    def _emit_overview_tree(self, g, placed, members, gid, users, group_of):
        children = _scope_children(placed)

        def fill(sub, key):
            for kind, item in placed.get(key, []):
                if kind == "node":
                    label, attrs = self.node_attrs(item)
                    sub.node(f"n{item.id}", label, **attrs)
                else:
                    label, attrs = self._group_attrs(item, members[item], users, group_of)
                    sub.node(gid[item], label, **attrs)
            for ck in sorted(children.get(key, []), key=_scope_sort_key):
                c = self._scope_cluster(ck)
                fill(c, ck)
                sub.subgraph(c)

        fill(g, ())

    def _scope_cluster(self, ck):
        """The dashed (backward, updates) or grey (module) box of scope `ck`."""
        c = self.gv.Digraph(name="cluster_" + "__".join(_safe(p) for p in ck))
        part = ck[-1]
        if part.startswith("~"):
            label = "backward (gradients)" if part == "~backward" else "parameter updates"
            style = ROLE_STYLE[part[1:]]
            c.attr(label=label, style="dashed,rounded", color=style["color"],
                   fontcolor=style["color"], fontsize="12")
        else:
            c.attr(label=part, style="rounded", color="#999999", fontcolor="#333333",
                   fontsize="11")
        return c

    def _group_attrs(self, gk, nodes, users, group_of):
        """Label and style of a collapsed box: what it is, its ops, its parameters,
        the type of the value it hands on, and gradient norms when known."""
        role = "update" if gk == ("~update",) else ("backward" if gk[0] == "~backward"
                                                     else "forward")
        self.group_roles_seen.add(role)
        ops, params, seen_ops = [], [], set()
        for n in nodes:
            if n.op.name == "parameter":
                params.append(n)
            elif n.inputs and n.op.name not in seen_ops:
                seen_ops.add(n.op.name)
                ops.append(n.op.name)
        n_ops = sum(1 for n in nodes if n.inputs)
        if role == "update":
            trained = [p for p, _ in self.updates if getattr(p, "trainable", True)]
            state = len(self.updates) - len(trained)
            title = "optimizer update"
            names = [p.label() for p in trained]
            lines = [f"{n_ops} ops: new values of {len(trained)} parameter"
                     f"{'s' * (len(trained) != 1)} from their gradients"] + \
                [", ".join(names[k:k + 4]) for k in range(0, min(len(names), 12), 4)]
            if len(names) > 12:
                lines[-1] += ", ..."
            type_text = f"and of {state} optimizer state tensor{'s' * (state != 1)}" \
                if state else ""
        else:
            if gk[-1] == "~loss":
                title = "gradient of the loss (ops outside modules)"
            else:
                name, _, kind = gk[-1].partition(":")
                title = (f"gradient of {name}" if role == "backward" else name) + \
                    (f" ({kind})" if kind else "")
            shown = ops[:4] + (["..."] if len(ops) > 4 else [])
            lines = [f"{n_ops} op{'s' * (n_ops != 1)}: {', '.join(shown)}"] if ops else []
            if params:
                lines.append(", ".join(f"{p.label().rsplit('.', 1)[-1]} {_type_str(p)}"
                                       for p in params))
            # the value handed on within the same pass (forward boxes: the activation
            # the next module reads; what the backward pass saves is not counted)
            role_of = {m.id: m.role for m in self.nodes}
            outputs = [n for n in nodes if n.id in self.out_ids]
            if outputs and role == "backward":
                shown_out = [self.grad_of[n.id].label().rsplit(".", 1)[-1]
                             if n.id in self.grad_of else n.label() for n in outputs]
                lines.append("outputs: gradient of " + ", ".join(shown_out))
            elif outputs:
                lines.append("outputs: " + ", ".join(n.label() for n in outputs))
            out = [n for n in nodes if any(
                u != gk and (role_of.get(u) if isinstance(u, int) else
                             ("backward" if u[0] == "~backward" else
                              "update" if u[0] == "~update" else "forward")) == n.role
                for u in users[n.id])]
            types = sorted({_type_str(n) for n in out if n.inputs})
            type_text = types[0] if len(types) == 1 else (f"{len(types)} outputs" if types
                                                          else "")
        attrs = {"shape": "box", "style": "filled,rounded,bold", "penwidth": "2"}
        attrs.update(ROLE_STYLE[role])
        note, type_colour = None, "#555555"
        normed = [(n, self.grad_norms[n.id]) for n in nodes if n.id in self.grad_norms
                  and (n.op.name == "parameter" or n.id in self.grad_of)]
        if normed and role != "update":
            fill = self.scale.colour(max(v for _, v in normed))
            type_colour = _text_colour(fill)
            attrs.update(fillcolor=fill, fontcolor=type_colour)
            parts = []
            for n, v in normed:
                p = n if n.op.name == "parameter" else self.grad_of[n.id]
                parts.append(f"|grad {p.label().rsplit('.', 1)[-1]}| = {v:.3g}")
            note = ", ".join(parts)
        if any(n.id in self.out_ids for n in nodes):
            attrs["peripheries"] = "2"
        attrs["tooltip"] = f"{title}: {n_ops} ops collapsed; detail='full' draws each"
        return _html_label(title, lines, type_text, note, type_colour), attrs

    def _edge(self, g, src: Node, dst: str, role: str):
        attrs = {}
        if role == "backward":
            attrs["color"] = ROLE_STYLE["backward"]["color"]
        elif role == "update":
            attrs["color"] = ROLE_STYLE["update"]["color"]
        g.edge(self.tail[src.id], dst, **attrs)

    def _emit_tree(self, g, groups):
        """Nested clusters: a scope ('a', 'b') sits inside the cluster of ('a',)."""
        children = _scope_children(groups)

        def fill(sub, key):
            for kind, n in groups.get(key, []):
                if kind == "node":
                    label, attrs = self.node_attrs(n)
                    sub.node(f"n{n.id}", label, **attrs)
                elif kind == "set":
                    self._emit_set(sub, *n)
                else:
                    self._emit_fused(sub, n)
            for ck in sorted(children.get(key, []), key=_scope_sort_key):
                c = self._scope_cluster(ck)
                fill(c, ck)
                sub.subgraph(c)

        fill(g, ())

    def _emit_set(self, sub, p, v):
        """The node standing for `p <- v` at the end of a step."""
        self.roles_seen.add("update")
        self.has_assign = True
        attrs = dict(LEAF_STYLE["parameter"])
        attrs.update(style="filled,dashed", penwidth="1.5", color=ROLE_STYLE["update"]["color"])
        note, type_colour = None, "#555555"
        if p.id in self.grad_norms:
            norm = self.grad_norms[p.id]
            fill = self.scale.colour(norm)
            type_colour = _text_colour(fill)
            attrs.update(fillcolor=fill, fontcolor=type_colour)
            note = f"|grad| = {norm:.3g}"
        label = _html_label(f"{p.label()} \u2190", ["new value"], _type_str(p), note, type_colour)
        attrs["tooltip"] = f"parameter {p.label()} is assigned this value after the step"
        sub.node(f"set{p.id}", label, **attrs)

    # -- fused nodes --------------------------------------------------------
    def _fused_parts(self, n):
        inner: Graph = n.value
        placeholders = list(inner.inputs)
        return inner, placeholders

    def _fused_tail(self, n) -> str:
        inner, _ = self._fused_parts(n)
        return f"n{n.id}_{inner.outputs[0].id}" if inner.outputs else f"n{n.id}"

    def _emit_fused(self, sub, n):
        self.has_fused = True
        self.roles_seen.add(n.role if n.role in ROLE_STYLE else "forward")
        inner, placeholders = self._fused_parts(n)
        c = self.gv.Digraph(name=f"cluster_fused_{n.id}")
        role = n.role if n.role in ROLE_STYLE else "forward"
        what = " ".join(str(n.attrs[k]) for k in ("kind", "label") if n.attrs.get(k))
        c.attr(label=f"fused {what}  {_type_str(n)}".replace("  ", " ", 1) if what else
               f"fused  {_type_str(n)}", style="filled,rounded", fillcolor="#f6f6f6",
               color=ROLE_STYLE[role]["color"], fontsize="10", penwidth="1.5")
        ph_ids = {p.id for p in placeholders}
        for k, p in enumerate(placeholders):
            c.node(f"n{n.id}_{p.id}", f"in{k}", shape="circle", fontsize="8", width="0.25",
                   height="0.25", fixedsize="true", style="filled", fillcolor="white")
        for m in inner.nodes:
            if m.id in ph_ids:
                continue
            label, attrs = self.node_attrs(m, prefix=f"n{n.id}_")
            if m.inputs:
                attrs.update(ROLE_STYLE[role])
            c.node(f"n{n.id}_{m.id}", label, **attrs)
            for i in m.inputs:
                c.edge(f"n{n.id}_{i.id}", f"n{n.id}_{m.id}")
        if n.id in self.out_ids and inner.outputs:
            c.attr(penwidth="3")
        sub.subgraph(c)

    def _fused_in_edges(self, g, n, skipped):
        _, placeholders = self._fused_parts(n)
        for k, i in enumerate(n.inputs):
            if i.id in skipped:
                continue
            dst = f"n{n.id}_{placeholders[k].id}" if k < len(placeholders) else \
                self._fused_tail(n)
            self._edge(g, i, dst, n.role)

    # -- legend -----------------------------------------------------------
    def _legend(self, g):
        rows = []
        for kind in ("input", "parameter", "constant"):
            if kind in self.leaves_seen:
                rows.append((LEAF_STYLE[kind]["fillcolor"], _LEAF_TITLES[kind]))
        for role in ("forward", "backward", "update"):
            if role in self.roles_seen:
                rows.append((ROLE_STYLE[role]["fillcolor"], _ROLE_TITLES[role]))
        for role in ("forward", "backward", "update"):
            if role in self.group_roles_seen:
                rows.append((ROLE_STYLE[role]["fillcolor"], _GROUP_TITLES[role]))
        if self.has_assign:
            rows.append((LEAF_STYLE["parameter"]["fillcolor"],
                         "p \u2190 new value: written into parameter p after the step"))
        if self.has_fused:
            rows.append(("#f6f6f6", "fused kernel: ops the optimizer runs as one loop"))
        cells = "".join(f'<TR><TD BGCOLOR="{c}" WIDTH="18"> </TD><TD ALIGN="LEFT">{html.escape(t)}'
                        f'</TD></TR>' for c, t in rows)
        if self.scale is not None:
            lo, hi = self.scale.lo, self.scale.hi
            steps = 5
            scale_cells = "".join(
                f'<TD BGCOLOR="{_grad_colour(k / (steps - 1))}"><FONT POINT-SIZE="8" '
                f'COLOR="{_text_colour(_grad_colour(k / (steps - 1)))}">'
                f'{10 ** (lo + (hi - lo) * k / (steps - 1)):.1e}</FONT></TD>'
                for k in range(steps))
            cells += (f'<TR><TD COLSPAN="2"><TABLE BORDER="0" CELLSPACING="0"><TR>{scale_cells}'
                      f'</TR></TABLE></TD></TR><TR><TD COLSPAN="2"><FONT POINT-SIZE="9">'
                      f'gradient norm (log scale)</FONT></TD></TR>')
        if not cells:
            return
        table = (f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2" CELLPADDING="3">'
                 f'<TR><TD COLSPAN="2"><B>legend</B></TD></TR>{cells}</TABLE>>')
        g.node("legend", table, shape="plaintext", fontsize="9")


def _main_owner(params):
    """The parameter a shared update node belongs to: optimizer buffers are
    named after their parameter ("w.momentum_buffer"), so w owns both."""
    if len(params) == 1:
        return params[0]
    root = min(params, key=lambda q: len(q.label()))
    prefix = root.label() + "."
    if all(q is root or q.label().startswith(prefix) for q in params):
        return root
    return None


def _common_prefix(keys) -> tuple:
    if not keys:
        return ()
    first = keys[0]
    n = len(first)
    for k in keys[1:]:
        n = min(n, len(k))
        for j in range(n):
            if k[j] != first[j]:
                n = j
                break
    return tuple(first[:n])


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(s))


def _scope_children(scopes) -> dict:
    """{scope: its direct sub-scopes} over `scopes` and every scope enclosing one."""
    keys = set(scopes)
    for k in list(keys):
        for j in range(1, len(k)):
            keys.add(k[:j])
    children = defaultdict(list)
    for k in keys:
        if k:
            children[k[:-1]].append(k)
    return children


def _scope_sort_key(k):
    return (k[-1].startswith("~"), k)


# ------------------------------------------------------------------ public API
def to_dot(outputs_or_graph, backward: bool = False, title: str | None = None,
           grad_values: dict | None = None, *, detail: str = "auto", split_roles: bool = True,
           show_constants: bool = True, legend: bool = True, rankdir: str = "TB"):
    """A `graphviz.Digraph` of a graph.

    outputs_or_graph: a node, a list of nodes, a `gc.Graph`, or a compiled
        function (its outputs and parameter updates are drawn).
    backward: when true, the first output must be a scalar loss; its
        gradients with respect to every trainable parameter are built and
        drawn with the forward graph (the training graph).
    grad_values: {parameter node, gradient node or parameter name: array}
        from a real step (see `gradient_values`); annotates and colours
        parameters and their gradients by gradient norm (log scale).
    split_roles: group backward/update nodes in their own clusters, each
        nested by module scope like the forward graph.
    show_constants: draw constant leaves (hide them for very large graphs).
    detail: "full" draws every op; "modules" draws an overview: each module
        (child of the model) as one box listing its ops, parameters and output
        type, its gradient ops as one box, and the optimizer update as one box;
        "auto" (default) draws the overview for graphs of more than
        AUTO_OVERVIEW_NODES nodes (a training step), the full graph otherwise.
    """
    if detail not in DETAILS:
        raise ValueError(f"to_dot: detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    outputs, updates, grad_of = _collect(outputs_or_graph, backward)
    b_nodes = toposort(outputs + [v for _, v in updates])
    for gid, p in _gradients_read_by_updates(updates).items():
        grad_of.setdefault(gid, p)
    norms = _resolve_grad_values(grad_values, b_nodes, grad_of)
    builder = _Builder(outputs, updates, grad_of, norms, split_roles, show_constants, detail)
    return builder.build(title=title, rankdir=rankdir, legend=legend)


def _gradients_read_by_updates(updates) -> dict:
    """{gradient node id: parameter} for a compiled training step.

    An optimizer's update of p reads p's gradient: a backward node of p's
    shape that the update-role nodes computing p's new value (and p's own
    optimizer buffers, named "p.<buffer>") read directly.
    """
    found = {}
    params = {p.id: p for p, _ in updates}
    for p, v in updates:
        stack, seen = [v], set()
        while stack:
            n = stack.pop()
            if n.id in seen or n.role != "update" or not n.inputs:
                continue
            seen.add(n.id)
            for i in n.inputs:
                if i.role == "backward" and i.inputs and tuple(i.shape) == tuple(p.shape):
                    owner = p
                    # a buffer's update reads the gradient of the parameter it belongs to
                    for q in params.values():
                        if p.label().startswith(q.label() + ".") and \
                                tuple(q.shape) == tuple(p.shape):
                            owner = q
                    found.setdefault(i.id, owner)
                stack.append(i)
    return found


def _pipe(dot, fmt: str) -> bytes:
    import graphviz
    try:
        return dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise GraphvizNotFoundError(_INSTALL_HINT) from None


def to_svg(outputs_or_graph, **kwargs) -> str:
    """The picture as SVG text (what Jupyter displays)."""
    return _pipe(to_dot(outputs_or_graph, **kwargs), "svg").decode("utf-8")


def repr_svg(graph) -> str | None:
    """Graph._repr_svg_: SVG text, or None (IPython then shows the text repr)
    when graphviz's `dot` is missing, with a one-line warning saying why."""
    try:
        return to_svg(graph)
    except GraphvizNotFoundError as e:
        import warnings
        warnings.warn(str(e), RuntimeWarning, stacklevel=3)
        return None


def render(outputs_or_graph, path, format: str | None = None, backward: bool = False,
           title: str | None = None, grad_values: dict | None = None, **kwargs) -> str:
    """Draw a graph to `path` (PNG, SVG or PDF; from the extension unless `format`).

    Returns the path written.  See `to_dot` for the other arguments.  Raises
    `GraphvizNotFoundError` (with install instructions) when graphviz's `dot`
    program is missing.
    """
    path = os.fspath(path)
    if format is None:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in FORMATS:
            raise ValueError(f"render: cannot tell the format from {path!r}; use a .png, .svg "
                             f"or .pdf file name or pass format=")
        format = ext
    format = format.lower()
    if format not in FORMATS:
        raise ValueError(f"render: format must be one of {', '.join(FORMATS)}, got {format!r}")
    dot = to_dot(outputs_or_graph, backward=backward, title=title, grad_values=grad_values,
                 **kwargs)
    data = _pipe(dot, format)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def gradient_values(loss: Node, inputs, arrays, params=None, backend: str = "numpy") -> dict:
    """Gradients of `loss` for one batch: {parameter: ndarray}.

    inputs: the gc.input nodes the loss reads; arrays: one array per input.
    params: the parameters to differentiate (default: every trainable
    parameter the loss depends on).  Parameters are not changed.  The result
    feeds `render(..., grad_values=...)` and per-layer gradient-norm tables.
    """
    from .autodiff import grad
    from .function import compile as gc_compile
    if params is None:
        params = [n for n in toposort([loss]) if n.op.name == "parameter"
                  and getattr(n, "trainable", True) and n.dtype.kind == "f"]
    params = list(params)
    grads = grad(loss, params)
    f = gc_compile(list(inputs), list(grads), backend=backend)
    vals = f(*arrays)
    return {p: np.asarray(v) for p, v in zip(params, vals)}
