"""Loops in the graph: `scan`, a body sub-graph applied along a sequence axis.

    final_carry, ys = gc.scan(step, init, xs)        # step(carry, x_t) -> (carry, y_t)

`step` is ordinary graphc code; it is traced once into a body graph (not
unrolled), so a loop over T steps is one node whatever T is.  Values the body
uses from outside (parameters, other tensors) are captured as explicit inputs
of the loop node, so gradients reach them.

The loop node produces a tuple (see TupleType): the final carries, the stacked
per-step outputs, and the stacked carries *entering* each step (what
backpropagation through time needs).  Its gradient is another scan running
the other way over the sequence: each backward step re-derives the forward
step's vector-Jacobian product from the saved carry (a graph built by
gc.grad on the traced body), and accumulates the captured parameters'
gradients in its carry.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..ir import dtypes as dt
from ..ir.graph import Graph, toposort
from ..ir.node import Node, TensorType, TupleType, user_location
from ..ir.shapes import shape_str
from .base import REGISTRY, Op, apply, as_node, register
from .reference import eval_graph

__all__ = ["scan", "tuple_get"]

_body_ids = itertools.count()


@register
class TupleGetOp(Op):
    """Element `index` of a tuple-valued node (a loop's results)."""
    name = "tuple_get"
    arity = 1

    def check(self, index):
        return {"index": int(index)}

    def infer(self, types, index):
        t = types[0]
        if not isinstance(t, TupleType):
            raise TypeError("tuple_get reads a tuple-valued node")
        if not 0 <= index < len(t.types):
            raise ValueError(f"index {index} out of range for a tuple of {len(t.types)}")
        return t.types[index]

    def evaluate(self, tup, index):
        return tup[index]
    # Its gradient is handled by autodiff, which collects cotangents per element.


def tuple_get(node, index):
    return apply("tuple_get", [node], index=index)


def _flatten(x, what):
    if x is None:
        return [], None
    if isinstance(x, (tuple, list)):
        return [as_node(v) for v in x], len(x)
    return [as_node(x)], -1


def _unflatten(nodes, tree):
    if tree is None:
        return None
    if tree == -1:
        return nodes[0]
    return tuple(nodes)


def _placeholder(name, ttype):
    return Node(REGISTRY["input"], (), {}, ttype, name=name)


@register
class ScanOp(Op):
    """Loop `body` over the leading axis of the sequence inputs."""
    name = "scan"
    arity = None

    def check(self, body, n_carry, n_x, reverse=False, length=None, body_id=None):
        return {"body": body, "n_carry": int(n_carry), "n_x": int(n_x),
                "reverse": bool(reverse), "length": length, "body_id": body_id}

    def infer(self, types, body, n_carry, n_x, reverse, length, body_id):
        carries, xs = types[:n_carry], types[n_carry:n_carry + n_x]
        caps = types[n_carry + n_x:]
        if xs:
            T = xs[0].shape[0] if xs[0].ndim else None
            for x in xs:
                if x.ndim == 0 or x.shape[0] != T:
                    raise ValueError("sequence inputs must share their leading (time) axis; got "
                                     + ", ".join(shape_str(x.shape) for x in xs))
        else:
            T = length
        if T is None:
            raise ValueError("scan over no sequence inputs needs length=")
        ph = body.inputs
        if len(ph) != len(types):
            raise ValueError(f"body expects {len(ph)} inputs, loop has {len(types)}")
        want = list(carries) + [TensorType(x.dtype, x.shape[1:]) for x in xs] + list(caps)
        for p, w in zip(ph, want):
            if p.dtype != w.dtype or len(p.shape) != len(w.shape):
                raise TypeError(f"loop input {p.label()} expects {p.type}, got {w}")
        outs = [o.type for o in body.outputs]
        for k, (c, o) in enumerate(zip(carries, outs[:n_carry])):
            if c.dtype != o.dtype or len(c.shape) != len(o.shape):
                raise TypeError(f"step returns carry {k} as {o}, but it enters as {c}")
        ys = [TensorType(o.dtype, (T,) + tuple(o.shape)) for o in outs[n_carry:]]
        saved = [TensorType(c.dtype, (T,) + tuple(c.shape)) for c in carries]
        return TupleType(tuple(carries) + tuple(ys) + tuple(saved))

    def evaluate(self, *arrays, body, n_carry, n_x, reverse, length, body_id):
        carries = list(arrays[:n_carry])
        xs = arrays[n_carry:n_carry + n_x]
        caps = list(arrays[n_carry + n_x:])
        T = xs[0].shape[0] if xs else int(length)
        if T == 0:
            raise ValueError("scan over an empty sequence (length 0)")
        ids = [p.id for p in body.inputs]
        saved = [np.empty((T,) + c.shape, c.dtype) for c in carries]
        ys = None
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            for k, c in enumerate(carries):
                saved[k][t] = c
            outs = eval_graph(body, dict(zip(ids, carries + [x[t] for x in xs] + caps)))
            carries = [np.asarray(o) for o in outs[:n_carry]]
            if ys is None:
                ys = [np.empty((T,) + np.shape(o), np.asarray(o).dtype) for o in outs[n_carry:]]
            for j, o in enumerate(outs[n_carry:]):
                ys[j][t] = o
        return tuple(carries) + tuple(ys) + tuple(saved)

    def vjp(self, node, gs):
        return _scan_vjp(node, gs)


def scan(step, init, xs=None, reverse=False, length=None):
    """Run `step(carry, x_t) -> (carry, y_t)` over the leading axis of `xs`.

    init and the carry may be a tensor or a tuple of tensors, likewise xs and
    y_t (y_t may be None).  Returns (final_carry, ys) with ys stacked along a
    new leading axis.  With reverse=True the loop runs from the last element
    to the first (ys stay aligned with xs).
    """
    loc = user_location()
    init_l, init_tree = _flatten(init, "init")
    xs_l, xs_tree = _flatten(xs, "xs")
    if not init_l:
        raise ValueError(f"scan needs at least one carried value (at {loc})")
    for x in xs_l:
        if x.ndim == 0:
            raise ValueError(f"scan: sequence input {x.label()} is a scalar; it needs a "
                             f"leading time axis (at {loc})")
    c_ph = [_placeholder(f"carry{k}", c.type) for k, c in enumerate(init_l)]
    x_ph = [_placeholder(f"x{k}_t", TensorType(x.dtype, x.shape[1:])) for k, x in enumerate(xs_l)]
    out = step(_unflatten(c_ph, init_tree), _unflatten(x_ph, xs_tree))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"scan: step must return (carry, y) (at {loc})")
    new_c, ys = out
    new_c_l, c_tree = _flatten(new_c, "carry")
    ys_l, ys_tree = _flatten(ys, "y")
    if len(new_c_l) != len(init_l):
        raise ValueError(f"scan: step returned {len(new_c_l)} carried values, init has "
                         f"{len(init_l)} (at {loc})")
    for k, (a, b) in enumerate(zip(init_l, new_c_l)):
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"scan: carry {k} enters the step as {a.type} but leaves as "
                             f"{b.type}; a carry must keep its type (at {loc})")
    body_outs = new_c_l + ys_l
    # Closure conversion: outer values used by the body become explicit inputs.
    inner_ids = {p.id for p in c_ph + x_ph}
    inner = set(inner_ids)
    order = toposort(body_outs)
    for n in order:
        if any(i.id in inner for i in n.inputs):
            inner.add(n.id)
    captured, mapping = [], {}

    def capture(v):
        if v.id not in mapping:
            ph = _placeholder(f"captured{len(captured)}", v.type)
            ph.scope = v.scope
            mapping[v.id] = ph
            captured.append(v)
    for n in order:
        if n.id in inner and n.id not in inner_ids:
            for i in n.inputs:
                if i.id not in inner and i.op.name != "constant":
                    capture(i)
    for o in body_outs:
        if o.id not in inner:
            capture(o)  # the step returns an outer value unchanged
    body = Graph(body_outs, c_ph + x_ph + [mapping[c.id] for c in captured])
    body.replace_all(mapping)
    node = apply("scan", init_l + xs_l + captured, body=body, n_carry=len(init_l),
                 n_x=len(xs_l), reverse=reverse, length=length, body_id=next(_body_ids))
    n_c = len(init_l)
    finals = [tuple_get(node, k) for k in range(n_c)]
    stacked = [tuple_get(node, n_c + j) for j in range(len(ys_l))]
    return _unflatten(finals, init_tree), _unflatten(stacked, ys_tree)


def _clone(graph: Graph, substitute: dict) -> list:
    """graph.outputs rebuilt with inputs replaced per {placeholder id: node}."""
    g = Graph(graph.outputs)
    g.replace_all(substitute)
    return g.outputs


def _scan_vjp(node, gs):
    """Backpropagation through time as a reverse scan (see the module docstring)."""
    from .elementwise import zeros_like, cast
    from .reduce import sum as rsum
    from ..autodiff import grad
    a = node.attrs
    body, n_c, n_x = a["body"], a["n_carry"], a["n_x"]
    types = node.type.types
    n_y = len(types) - 2 * n_c
    if any(g is not None for g in gs[n_c + n_y:]):
        raise NotImplementedError("differentiating a loop's saved carries (a gradient of a "
                                  "gradient through scan) is not supported")
    init, xs, caps = node.inputs[:n_c], node.inputs[n_c:n_c + n_x], node.inputs[n_c + n_x:]
    fin = [tuple_get(node, k) for k in range(n_c)]
    g_fin = [g if g is not None else zeros_like(f) for g, f in zip(gs[:n_c], fin)]
    y_nodes = [tuple_get(node, n_c + j) for j in range(n_y)]
    g_ys = [g if g is not None else zeros_like(y) for g, y in zip(gs[n_c:n_c + n_y], y_nodes)]
    saved = [tuple_get(node, n_c + n_y + k) for k in range(n_c)]
    float_caps = [k for k, c in enumerate(caps) if dt.is_float(c.dtype)]
    float_xs = [k for k, x in enumerate(xs) if dt.is_float(x.dtype)]
    float_cs = [k for k, c in enumerate(init) if dt.is_float(c.dtype)]

    def back_step(carry, seq):
        g_c = list(carry[:n_c])
        acc = list(carry[n_c:])
        gy_t = list(seq[:n_y])
        c_prev = list(seq[n_y:n_y + n_c])
        x_t = list(seq[n_y + n_c:])
        cap = list(caps)
        sub = {p.id: v for p, v in zip(body.inputs, c_prev + x_t + cap)}
        outs = _clone(body, sub)
        terms = []
        for o, g in zip(outs, g_c + gy_t):
            if dt.is_float(o.dtype):
                terms.append(rsum(o * cast(g, o.dtype)))
        s = terms[0]
        for t in terms[1:]:
            s = s + t
        wrt = [c_prev[k] for k in float_cs] + [x_t[k] for k in float_xs] + \
              [cap[k] for k in float_caps]
        grads = grad(s, wrt) if wrt else []
        gc_prev = list(g_c)  # non-float carries keep a (zero) cotangent slot
        for k, gk in zip(float_cs, grads[:len(float_cs)]):
            gc_prev[k] = gk
        gx = grads[len(float_cs):len(float_cs) + len(float_xs)]
        gcap = grads[len(float_cs) + len(float_xs):]
        new_acc = [a_ + g_ for a_, g_ in zip(acc, gcap)]
        return tuple(gc_prev + new_acc), (tuple(gx) if gx else None)

    acc0 = [zeros_like(caps[k]) for k in float_caps]
    seq = tuple(g_ys + saved + list(xs))
    (back_carry, g_xs) = scan(back_step, tuple(g_fin + acc0), seq, reverse=not a["reverse"])
    back_carry = list(back_carry)
    g_xs = [] if g_xs is None else ([g_xs] if isinstance(g_xs, Node) else list(g_xs))
    result = []
    for k in range(n_c):
        result.append(back_carry[k] if k in float_cs else None)
    gx_iter = iter(g_xs)
    for k in range(n_x):
        result.append(next(gx_iter) if k in float_xs else None)
    acc_iter = iter(back_carry[n_c:])
    for k in range(len(caps)):
        result.append(next(acc_iter) if k in float_caps else None)
    return result
