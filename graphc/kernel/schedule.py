"""Schedule transformations on kernel-IR loop nests.

Each function rewrites statements in place of the loop it is given and
returns the new loop(s); none changes what the kernel computes:

    split(loop, factor)        for i in 0..n  ->  for io in 0..ceil(n/f): for ii in 0..f:
                                                  (guarded by io*f + ii < n when f does not divide n)
    reorder(outer)             swap a perfectly nested pair: for a: for b: S -> for b: for a: S
    tile(loop, fo, fi)         split both loops of a perfect pair and move the inner pair in
    vectorize / parallelize / unroll(loop)   set the loop's kind (a hint backends map
                                                  to SIMD lanes, threads or blocks, unrolling)

`find_loops(body)` lists loops depth first so callers can pick one.
"""
from __future__ import annotations

from . import ir as K
from .ir import BinOp, If, Loop, Var


def find_loops(body) -> list:
    out = []
    for s in body:
        if isinstance(s, Loop):
            out.append(s)
            out.extend(find_loops(s.body))
        elif isinstance(s, If):
            out.extend(find_loops(s.body))
    return out


def substitute(node, var, expr):
    """A copy of statements/expressions with Var `var` replaced by `expr`."""
    if isinstance(node, list):
        return [substitute(s, var, expr) for s in node]
    if isinstance(node, Var):
        return expr if node is var else node
    if isinstance(node, (K.Const, K.Local)):
        return node
    if isinstance(node, K.Load):
        return K.Load(node.buf, substitute(node.index, var, expr))
    if isinstance(node, BinOp):
        a, b = substitute(node.a, var, expr), substitute(node.b, var, expr)
        if node.dtype == K.INDEX and node.op in ("add", "mul"):
            return (K.add if node.op == "add" else K.mul)(a, b)   # folds 0 and 1
        return BinOp(node.op, a, b, node.reassoc)
    if isinstance(node, K.UnOp):
        return K.UnOp(node.op, substitute(node.a, var, expr))
    if isinstance(node, K.Select):
        return K.Select(*(substitute(x, var, expr) for x in (node.cond, node.a, node.b)))
    if isinstance(node, K.Cast):
        return K.Cast(substitute(node.a, var, expr), node.dtype)
    if isinstance(node, Loop):
        return Loop(node.var, node.extent, substitute(node.body, var, expr), node.kind)
    if isinstance(node, K.Store):
        return K.Store(node.buf, substitute(node.index, var, expr),
                       substitute(node.value, var, expr))
    if isinstance(node, K.Assign):
        return K.Assign(node.local, substitute(node.value, var, expr))
    if isinstance(node, If):
        return If(substitute(node.cond, var, expr), substitute(node.body, var, expr))
    if isinstance(node, K.Gemm):
        ops = [(b, substitute(o, var, expr), rs, cs) for b, o, rs, cs in (node.a, node.b, node.c)]
        return K.Gemm(node.M, node.N, node.K, *ops, accumulate=node.accumulate)
    raise TypeError(f"cannot substitute in {type(node).__name__}")


def _replace(body, old, new_stmts) -> bool:
    """Replace statement `old` (by identity) inside `body` (recursively)."""
    for k, s in enumerate(body):
        if s is old:
            body[k:k + 1] = new_stmts
            return True
        if isinstance(s, (Loop, If)) and _replace(s.body, old, new_stmts):
            return True
    return False


def split(kernel, loop, factor):
    """Split `loop` into (outer, inner) of `factor` iterations; returns them."""
    if factor < 1:
        raise ValueError("split factor must be >= 1")
    n = loop.extent
    outer_n = -(-n // factor)
    io, ii = Var(loop.var.name + "o"), Var(loop.var.name + "i")
    index = K.add(K.mul(io, factor), ii)
    body = substitute(loop.body, loop.var, index)
    if n % factor:
        body = [If(BinOp("lt", index, K.idx(n)), body)]
    inner = Loop(ii, factor, body, loop.kind if loop.kind in ("vector", "unroll") else "serial")
    outer = Loop(io, outer_n, [inner], loop.kind if loop.kind == "parallel" else "serial")
    if not _replace(kernel.body, loop, [outer]):
        raise ValueError("loop is not in this kernel")
    return outer, inner


def reorder(kernel, outer):
    """Interchange `outer` with the single loop it holds (a perfect nest)."""
    if len(outer.body) != 1 or not isinstance(outer.body[0], Loop):
        raise ValueError("reorder needs a perfectly nested pair of loops")
    inner = outer.body[0]
    new_inner = Loop(outer.var, outer.extent, inner.body, inner.kind)
    new_outer = Loop(inner.var, inner.extent, [new_inner], outer.kind)
    if not _replace(kernel.body, outer, [new_outer]):
        raise ValueError("loop is not in this kernel")
    return new_outer, new_inner


def tile(kernel, outer, f_outer, f_inner):
    """Tile a perfect pair (outer, inner) by (f_outer, f_inner): loops become
    (outer_o, inner_o, outer_i, inner_i).  Returns the four loops."""
    if len(outer.body) != 1 or not isinstance(outer.body[0], Loop):
        raise ValueError("tile needs a perfectly nested pair of loops")
    inner = outer.body[0]
    if outer.extent % f_outer or inner.extent % f_inner:
        raise ValueError("tile factors must divide the extents")
    oo, oi = split(kernel, outer, f_outer)
    io, ii = split(kernel, oi.body[0], f_inner)
    # oo: oi: io: ii  ->  oo: io: oi: ii
    io2, oi2 = reorder(kernel, oi)
    return oo, io2, oi2, oi2.body[0]


def _tag(kind):
    def f(loop):
        loop.kind = kind
        return loop
    f.__name__ = kind
    return f


vectorize = _tag("vector")
parallelize = _tag("parallel")
unroll = _tag("unroll")


# ------------------------------------------------------------------ loop collapsing
class _NotAffine(Exception):
    pass


def _mentions(e, vs) -> bool:
    if isinstance(e, Var):
        return e in vs
    if isinstance(e, K.Load):
        return _mentions(e.index, vs)
    if isinstance(e, BinOp):
        return _mentions(e.a, vs) or _mentions(e.b, vs)
    if isinstance(e, K.UnOp):
        return _mentions(e.a, vs)
    if isinstance(e, K.Select):
        return any(_mentions(x, vs) for x in (e.cond, e.a, e.b))
    if isinstance(e, K.Cast):
        return _mentions(e.a, vs)
    return False


def _coefs(e, a, b):
    """(coefficient of a, coefficient of b) in the integer expression e, where e is
    affine in a and b (other terms are free of both); _NotAffine otherwise."""
    if isinstance(e, Var):
        return (int(e is a), int(e is b))
    if not _mentions(e, (a, b)):
        return (0, 0)
    if isinstance(e, BinOp) and e.op in ("add", "sub"):
        (x0, x1), (y0, y1) = _coefs(e.a, a, b), _coefs(e.b, a, b)
        s = 1 if e.op == "add" else -1
        return (x0 + s * y0, x1 + s * y1)
    if isinstance(e, BinOp) and e.op == "mul":
        for c, x in ((e.a, e.b), (e.b, e.a)):
            if isinstance(c, K.Const):
                x0, x1 = _coefs(x, a, b)
                return (x0 * int(c.value), x1 * int(c.value))
    raise _NotAffine


def _check_collapse(node, a, b, extent_b):
    """Raise _NotAffine unless a and b occur only in buffer indices of the form
    c*(a*extent_b + b) + (terms free of a and b)."""
    if isinstance(node, list):
        for s in node:
            _check_collapse(s, a, b, extent_b)
    elif isinstance(node, (K.Load, K.Store)):
        ca, cb = _coefs(node.index, a, b)
        if ca != cb * extent_b:
            raise _NotAffine
        if isinstance(node, K.Store):
            _check_collapse(node.value, a, b, extent_b)
    elif isinstance(node, BinOp):
        _check_collapse(node.a, a, b, extent_b)
        _check_collapse(node.b, a, b, extent_b)
    elif isinstance(node, K.UnOp):
        _check_collapse(node.a, a, b, extent_b)
    elif isinstance(node, K.Select):
        for x in (node.cond, node.a, node.b):
            _check_collapse(x, a, b, extent_b)
    elif isinstance(node, K.Cast):
        _check_collapse(node.a, a, b, extent_b)
    elif isinstance(node, Var):
        if node is a or node is b:
            raise _NotAffine      # used as a value, not in an index
    elif isinstance(node, K.Assign):
        _check_collapse(node.value, a, b, extent_b)
    elif isinstance(node, Loop):
        _check_collapse(node.body, a, b, extent_b)
    elif isinstance(node, (K.Const, K.Local)):
        pass
    else:                         # If, Gemm, anything else: leave the nest alone
        raise _NotAffine


def collapse_loops(body) -> list:
    """Merge perfectly nested serial/vector loop pairs `for a: for b: S` into one
    loop over t = a*extent_b + b when a and b appear only in buffer indices, always
    as c*(a*extent_b + b) (contiguous across the pair): a row loop of 28 and its
    column loop become one loop of 784, so the vectorizer sees one long trip count
    instead of a 16-lane body and a 12-element remainder per row.  Iteration order
    is unchanged, so results (reductions included) are identical.  Returns the new
    statement list (loops are rebuilt, statements otherwise shared)."""
    out = []
    for s in body:
        if isinstance(s, Loop):
            s = Loop(s.var, s.extent, collapse_loops(s.body), s.kind)
            while (s.kind == "serial" and len(s.body) == 1 and isinstance(s.body[0], Loop)
                   and s.body[0].kind in ("serial", "vector")):
                inner = s.body[0]
                try:
                    _check_collapse(inner.body, s.var, inner.var, inner.extent)
                except _NotAffine:
                    break
                t = Var(s.var.name + inner.var.name)
                new_body = substitute(substitute(inner.body, s.var, K.idx(0)), inner.var, t)
                s = Loop(t, s.extent * inner.extent, new_body, inner.kind)
        elif isinstance(s, If):
            s = If(s.cond, collapse_loops(s.body))
        out.append(s)
    return out
