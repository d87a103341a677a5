"""Algebraic simplification: a table of (pattern, replacement) rules.

Every rule preserves the node's type (dtype and shape; a shape that the
rewrite shrank is broadcast back) and, unless `nan_unsafe` is set, its value
for every input including inf and NaN.  The stable rewrites (log∘softmax,
log∘sigmoid, nll∘log_softmax) change values only where the naive form
overflowed or took log(0): there they give the finite, correct result.
"""
from __future__ import annotations

from math import prod

import numpy as np

from ..ir.graph import Graph
from ..ir.shapes import broadcast_shapes, is_symbolic, normalize_axes
from ..ops import elementwise as E
from ..ops import shape as S
from ..ops.base import REGISTRY, apply, constant
from .framework import adopt_provenance, fresh_id_mark, is_tensor, rebuild, register_pass
from .patterns import Const, P, Rule, X


# ------------------------------------------------------------------ replacement helpers
def _broadcast(x, shape):
    """broadcast_to(x, shape), or None when shape has a symbolic dim that x does not carry
    at the same (right-aligned) position: broadcast_to binds symbols from its input's dims."""
    shape = tuple(shape)
    lead = len(shape) - x.ndim
    for i, d in enumerate(shape):
        if isinstance(d, str) and (i < lead or x.shape[i - lead] != d):
            return None
    return apply("broadcast_to", [x], shape=shape)


def _same(x):
    return lambda n, b: b[x]


def _compose_transpose(n, b):
    inner, x = b["inner"], b["x"]
    p1, p2 = inner.attrs["perm"], n.attrs["perm"]
    perm = tuple(p1[j] for j in p2)
    if perm == tuple(range(len(perm))):
        return x
    return apply("transpose", [x], perm=perm)


def _collapse_reshape(n, b):
    x = b["x"]
    if tuple(x.shape) == tuple(n.shape):
        return x
    return apply("reshape", [x], shape=tuple(n.shape))


def _collapse_broadcast(n, b):
    return _broadcast(b["x"], n.shape)


def _zeros(n, b):
    return _broadcast(constant(0, n.dtype), n.shape) if n.shape != () else constant(0, n.dtype)


def _strip_broadcast_inputs(n, b):
    """elementwise(broadcast_to(a), y) -> elementwise(a, y): ops broadcast by themselves.

    If the stripped inputs no longer broadcast to the node's full shape, the
    op runs on the small shape and one broadcast_to follows (broadcasting
    commutes with elementwise ops), which is cheaper than before.
    """
    ins = list(n.inputs)
    stripped = [i.inputs[0] if i.op.name == "broadcast_to" else i for i in ins]
    if all(a is b_ for a, b_ in zip(stripped, ins)):
        return None
    try:
        small = broadcast_shapes(*(s.shape for s in stripped))
    except ValueError:
        return None
    out = apply(n.op, stripped, **n.attrs)
    if tuple(small) != tuple(n.shape):
        if len(small) > n.ndim:
            return None
        out = _broadcast(out, n.shape)
    return out


def _sum_of_broadcast(n, b):
    """sum(broadcast_to(x, s), R) = sum(x, R') * count when R covers every expanded axis."""
    bc, x = b["bc"], b["x"]
    shape = tuple(bc.shape)
    if is_symbolic(shape) or is_symbolic(x.shape):
        return None
    axes = set(normalize_axes(n.attrs["axis"], len(shape), "sum"))
    lead = len(shape) - x.ndim
    expanded = set(range(lead)) | {lead + i for i, d in enumerate(x.shape)
                                   if d == 1 and shape[lead + i] != 1}
    if not expanded or not expanded <= axes:
        return None
    count = prod(shape[a] for a in expanded)
    if count == 0:
        return None   # sum over an empty axis is 0, but 0 * inf would be nan
    rest = tuple(a - lead for a in sorted(axes) if a >= lead and a - lead not in
                 {e - lead for e in expanded})
    y = apply("sum", [x], axis=rest, keepdims=True) if rest else x
    y = S.reshape(y, tuple(n.shape))
    if count != 1:
        y = E.mul(y, constant(count, n.dtype))
    return y


def _log_softmax(n, b):
    if "log_softmax" not in REGISTRY:
        return None
    return apply("log_softmax", [b["x"]], axis=b["sm"].attrs["axis"])


def _raw_log_softmax(n, b):
    """log(exp(z) / sum(exp(z), axis=a, keepdims=True)) -> log_softmax(z, a)."""
    if "log_softmax" not in REGISTRY:
        return None
    s, z = b["s"], b["z"]
    axes = normalize_axes(s.attrs["axis"], z.ndim, "sum")
    if len(axes) != 1 or not s.attrs["keepdims"]:
        return None
    return apply("log_softmax", [z], axis=axes[0])


def _log_sigmoid(n, b):
    if "log_sigmoid" not in REGISTRY:
        return None
    return apply("log_sigmoid", [b["x"]])


def _class_axis(ndim):
    return 1 if ndim >= 2 else 0


def _nll_of_log_softmax(n, b):
    """nll(log_softmax(x, class axis), y) -> softmax_cross_entropy(x, y)."""
    if "softmax_cross_entropy" not in REGISTRY:
        return None
    ls, x, y = b["ls"], b["x"], b["y"]
    if ls.attrs["axis"] != _class_axis(x.ndim):
        return None
    return apply("softmax_cross_entropy", [x, y], **n.attrs)


def _is_class_ids(node):
    """A constant holding arange(C) laid along one axis (how one-hot labels are built)."""
    v = node.value if node.op.name == "constant" else None
    if v is None or v.ndim == 0 or sum(d != 1 for d in v.shape) > 1:
        return False
    return bool(np.array_equal(v.reshape(-1), np.arange(v.size)))


def _onehot_cross_entropy(n, b):
    """-sum(onehot(y) * log_softmax(x), class axis) -> softmax_cross_entropy(x, y)."""
    if "softmax_cross_entropy" not in REGISTRY:
        return None
    s, ls, x, y, ids, rs = b["s"], b["ls"], b["x"], b["y"], b["ids"], b["rs"]
    cax = _class_axis(x.ndim)
    if ls.attrs["axis"] != cax or s.attrs["keepdims"]:
        return None
    if tuple(normalize_axes(s.attrs["axis"], x.ndim, "sum")) != (cax,):
        return None
    if y.dtype.kind != "i" or tuple(ids.value.shape) != tuple(
            x.shape[cax] if i == cax else 1 for i in range(x.ndim)):
        return None
    # the labels were reshaped to put a 1 at the class axis
    expect = tuple(y.shape[:cax]) + (1,) + tuple(y.shape[cax:])
    if tuple(rs.shape) != expect or tuple(n.shape) != tuple(y.shape):
        return None
    return apply("softmax_cross_entropy", [x, y], ignore_index=None, label_smoothing=0.0)


def _relu_mask(n, b):
    """greater(x, 0) -> greater(relu(x), 0) when relu(x) is computed anyway.

    Equal for every x (NaN included: both are False).  Backward graphs test the
    pre-activation; reading the activation instead leaves the matmul/conv
    output with one user, so the relu fuses into its epilogue.
    """
    r = b.get("_relu_of", {}).get(b["x"].id)
    return None if r is None else E.greater(r, b["_const0"])


def _transpose_of_matmul(n, b):
    """transpose(a @ b) -> transpose(b) @ transpose(a) when a or b is itself a transpose
    (which then cancels): one transpose instead of two, and the matmul can take
    the elementwise epilogue that reads its result."""
    mm = b["mm"]
    a, c = mm.inputs
    nd = n.ndim
    if nd < 2 or n.attrs["perm"] != tuple(range(nd - 2)) + (nd - 1, nd - 2):
        return None
    if a.ndim != nd or c.ndim != nd or not (a.op.name == "transpose" or c.op.name == "transpose"):
        return None
    perm = n.attrs["perm"]
    return apply("matmul", [apply("transpose", [c], perm=perm), apply("transpose", [a], perm=perm)])


def _reshape_of_splat(n, b):
    """reshape(broadcast_to(s)) with one-element s -> broadcast_to(scalar s, new shape)."""
    s = b["s"]
    if s.ndim and any(d != 1 for d in s.shape):
        return None
    if s.shape != ():
        s = apply("reshape", [s], shape=())
    return _broadcast(s, n.shape) if n.shape != () else s


def _reshape_of_keepdims(n, b):
    """reshape(sum(x, axes, keepdims=True)) to the reduced shape without the kept
    1-dims -> sum(x, axes): the same values in the same order.  Only when the
    reshape is the reduction's one reader (otherwise both forms would be computed).
    The reduction then feeds its readers directly, so an elementwise epilogue
    (the bias gradient's SGD update) fuses into it."""
    r = b["r"]
    if not r.attrs.get("keepdims") or b.get("_nusers", {}).get(r.id) != 1:
        return None
    out = apply(r.op, [r.inputs[0]], axis=r.attrs["axis"], keepdims=False)
    return out if tuple(out.shape) == tuple(n.shape) else None


def _nan_unsafe(ctx):
    return ctx.nan_unsafe


def _is_elementwise(n):
    return n.op.elementwise and n.inputs and any(i.op.name == "broadcast_to" for i in n.inputs)


def _add_leaves(n, out, depth=0):
    """The terms of a tree of same-shaped adds rooted at n (at most 64 terms)."""
    if (n.op.name == "add" and depth < 8 and len(out) < 64
            and all(tuple(i.shape) == tuple(n.shape) for i in n.inputs)):
        for i in n.inputs:
            _add_leaves(i, out, depth + 1)
    else:
        out.append(n)
    return out


def _sum_of_pads(n, b):
    """pad(a) + pad(b) + ... where the zero pads place their inputs side by side along
    one axis and tile it exactly (the gradient of an LSTM's gate split): concat."""
    if n.op.name != "add" or any(tuple(i.shape) != tuple(n.shape) for i in n.inputs):
        return None
    leaves = _add_leaves(n, [])
    if len(leaves) < 2 or any(x.op.name != "pad" or x.attrs["value"] != 0 or x.dtype != n.dtype
                              for x in leaves):
        return None
    axis, parts = None, []
    for x in leaves:
        spec = x.attrs["spec"]
        placed = [k for k, sp in enumerate(spec) if sp is not None]
        if len(placed) != 1 or tuple(x.shape) != tuple(n.shape):
            return None
        k = placed[0]
        start, step, count = spec[k]
        if (axis is not None and k != axis) or step != 1 or count <= 0:
            return None
        axis = k
        parts.append((start, count, x.inputs[0]))
    parts.sort(key=lambda p: p[0])
    pos = 0
    for start, count, _ in parts:
        if start != pos:
            return None     # a gap or an overlap
        pos += count
    if pos != n.shape[axis]:
        return None
    return apply("concat", [x for _, _, x in parts], axis=axis)


_LOG_SOFTMAX_OF = P("div", P("exp", X("z"), name="e"), P("sum", X("e"), name="s"))
_ONEHOT = P("cast", P("equal", P("reshape", X("y"), name="rs"), X("ids", where=_is_class_ids)))

RULES = [
    Rule("x+0", P("add", X("x"), Const(0)), _same("x")),
    Rule("x-0", P("sub", X("x"), Const(0)), _same("x")),
    Rule("0-x", P("sub", Const(0), X("x")), lambda n, b: E.neg(b["x"])),
    Rule("x*1", P("mul", X("x"), Const(1)), _same("x")),
    Rule("x/1", P("div", X("x"), Const(1)), _same("x")),
    Rule("x*-1", P("mul", X("x"), Const(-1)), lambda n, b: E.neg(b["x"])),
    Rule("x**1", P("pow", X("x"), Const(1)), _same("x")),
    Rule("x**2", P("pow", X("x"), Const(2)), lambda n, b: E.square(b["x"])),
    Rule("x*0", P("mul", X("x"), Const(0)), _zeros, enabled=_nan_unsafe),
    Rule("--x", P("neg", P("neg", X("x"))), _same("x")),
    Rule("x+-y", P("add", X("x"), P("neg", X("y"))), lambda n, b: E.sub(b["x"], b["y"])),
    Rule("x--y", P("sub", X("x"), P("neg", X("y"))), lambda n, b: E.add(b["x"], b["y"])),
    Rule("transpose.transpose", P("transpose", P("transpose", X("x"), name="inner")),
         _compose_transpose),
    Rule("reshape.reshape", P("reshape", P("reshape", X("x"))), _collapse_reshape),
    Rule("broadcast.broadcast", P("broadcast_to", P("broadcast_to", X("x"))),
         _collapse_broadcast),
    Rule("reshape(reduce keepdims)",
         P("reshape", P(("sum", "mean", "max", "min"), X("x"), name="r")), _reshape_of_keepdims),
    Rule("reshape(broadcast scalar)", P("reshape", P("broadcast_to", X("s"))), _reshape_of_splat),
    Rule("transpose(matmul)", P("transpose", P("matmul", X("a"), X("b"), name="mm")),
         _transpose_of_matmul),
    Rule("relu mask", P("greater", X("x"), Const(0)), _relu_mask),
    Rule("elementwise(broadcast)", P(None, where=_is_elementwise), _strip_broadcast_inputs),
    Rule("sum(broadcast)", P("sum", P("broadcast_to", X("x"), name="bc")), _sum_of_broadcast),
    Rule("sum of tiling pads->concat", P("add"), _sum_of_pads),
    Rule("log(softmax)->log_softmax", P("log", P("softmax", X("x"), name="sm")), _log_softmax),
    Rule("log(exp/sum exp)->log_softmax", P("log", _LOG_SOFTMAX_OF), _raw_log_softmax),
    Rule("log(sigmoid)->log_sigmoid", P("log", P("sigmoid", X("x"))), _log_sigmoid),
    Rule("nll(log_softmax)->softmax_cross_entropy",
         P("nll", P("log_softmax", X("x"), name="ls"), X("y")), _nll_of_log_softmax),
    Rule("-sum(onehot*log_softmax)->softmax_cross_entropy",
         P("neg", P("sum", P("mul", _ONEHOT, P("log_softmax", X("x"), name="ls")), name="s")),
         _onehot_cross_entropy),
]
RULES = [r for r in RULES if r.build is not None]


def _identity_view(n):
    """reshape/broadcast_to to the same shape, transpose by the identity: x itself."""
    if n.op.name in ("reshape", "broadcast_to") and tuple(n.inputs[0].shape) == tuple(n.shape):
        return n.inputs[0]
    if n.op.name == "transpose" and n.attrs["perm"] == tuple(range(n.ndim)):
        return n.inputs[0]
    return None


RULES.insert(0, Rule("identity view", P(("reshape", "broadcast_to", "transpose")),
                     lambda n, b: _identity_view(n)))


def _fit_type(n, r):
    """`r` retyped to n's type, or None when that is impossible without a cast."""
    if r is None:
        return None
    if r.dtype != n.dtype:
        return None
    if tuple(r.shape) != tuple(n.shape):
        try:
            if tuple(broadcast_shapes(r.shape, n.shape)) != tuple(n.shape):
                return None
        except ValueError:
            return None
        r = _broadcast(r, n.shape)
    return r


def simplify_node(n, ctx, rules=None, state=None):
    """The first applicable rule's rewrite of `n`, as (rule name, new node), or None.

    `state` holds facts about the nodes visited so far (relu_of: input id -> relu node).
    """
    for rule in (RULES if rules is None else rules):
        if not rule.may_match(n) or (rule.enabled is not None and not rule.enabled(ctx)):
            continue
        mark = fresh_id_mark()
        try:
            r = _fit_type(n, rule.apply(n, state))
        except (TypeError, ValueError):
            r = None   # a rule whose replacement does not type-check declines
        if r is None or r is n:
            continue
        adopt_provenance(r, n, mark)
        return rule.name, r
    return None


@register_pass("simplify")
def simplify(graph: Graph, ctx):
    """Apply the algebraic rewrite rules (RULES) bottom-up."""
    changes = []
    state = {"_relu_of": {}, "_nusers": {k: len(v) for k, v in graph.users().items()}}
    by_op: dict = {}   # op name -> the rules (in order) whose pattern root can match it

    def visit(n):
        if not n.inputs or not is_tensor(n) or not all(is_tensor(i) for i in n.inputs):
            return None
        if n.op.name == "relu":
            state["_relu_of"].setdefault(n.inputs[0].id, n)
        rules = by_op.get(n.op.name)
        if rules is None:
            rules = by_op[n.op.name] = [r for r in RULES if r.may_match(n)]
        hit = simplify_node(n, ctx, rules=rules, state=state)
        if hit is None:
            return None
        name, r = hit
        changes.append(f"{name}: {n.op.name} {n.label()}")
        return r
    g, _ = rebuild(graph, visit)
    return g, changes
