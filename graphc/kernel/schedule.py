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
        return BinOp(node.op, substitute(node.a, var, expr), substitute(node.b, var, expr),
                     node.reassoc)
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
