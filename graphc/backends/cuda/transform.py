"""Loop transformations that let a GPU run a kernel's independent iterations at once.

The kernel IR writes convolutions as ``for n (parallel): im2col into a scratch
buffer; GEMM from it`` — right for a CPU thread that owns the scratch, but on
a GPU it would serialize the batch.  For a top-level "parallel" loop (its
iterations are independent) the CUDA backend

* **privatizes** "thread"-scope scratch: one copy per iteration, in a new
  global buffer indexed by the loop variable;
* **distributes** the loop over its statements (loop fission: legal because
  no iteration depends on another), so im2col over all images becomes one
  kernel and the GEMMs one batched launch;
* **interchanges** it with an inner serial loop that holds a GEMM (the inner
  loop goes to the host; the parallel loop stays inside, still independent).
"""
from __future__ import annotations

import itertools

from ...kernel import ir as K
from . import analysis as A

PRIVATE_LIMIT_BYTES = 256 << 20   # scratch copies beyond this keep the host loop
_count = itertools.count()


def scratch_written(body) -> list:
    out, seen = [], set()
    for s in A.walk_stmts(body):
        bufs = [s.buf] if isinstance(s, K.Store) else [s.c[0]] if isinstance(s, K.Gemm) else []
        for b in bufs:
            if getattr(b, "scope", "global") == "thread" and id(b) not in seen:
                seen.add(id(b))
                out.append(b)
    return out


def accumulation_only(loop, scratch_ids) -> bool:
    """The iterations of `loop` interact only by GEMMs adding into C: every store goes
    to a scratch buffer (made private per iteration), and every GEMM accumulates into
    a float C at an offset independent of the loop variable that nothing else in the
    loop touches."""
    gemm_c = set()
    for s in A.walk_stmts(loop.body):
        if isinstance(s, K.Store) and id(s.buf) not in scratch_ids:
            return False
        if isinstance(s, K.Gemm):
            C, off = s.c[0], s.c[1]
            if (not s.accumulate or id(C) in scratch_ids or C.dtype.kind != "f"
                    or id(loop.var) in A.free_vars(off)):
                return False
            gemm_c.add(id(C))
    if not gemm_c:
        return False
    for s in A.walk_stmts(loop.body):
        touched = [s.buf] if isinstance(s, K.Store) else []
        for e in A.stmt_exprs(s) if not isinstance(s, K.Gemm) else []:
            touched += [x.buf for x in A.walk_exprs(e) if isinstance(x, K.Load)]
        if isinstance(s, K.Gemm):
            touched += [s.a[0], s.b[0]]
        if any(id(b) in gemm_c for b in touched):
            return False
    return True


class _Rewriter:
    """Copy statements, sending accesses of `old` buffers to `new` at an offset."""

    def __init__(self, mapping):
        self.mapping = mapping    # id(old) -> (new buffer, offset Expr)
        self.memo = {}

    def expr(self, e):
        r = self.memo.get(id(e))
        if r is not None:
            return r
        if isinstance(e, K.Load):
            idx = self.expr(e.index)
            m = self.mapping.get(id(e.buf))
            r = K.Load(m[0], K.add(m[1], idx)) if m else (
                e if idx is e.index else K.Load(e.buf, idx))
        elif isinstance(e, K.BinOp):
            a, b = self.expr(e.a), self.expr(e.b)
            r = e if (a is e.a and b is e.b) else K.BinOp(e.op, a, b, e.reassoc)
        elif isinstance(e, K.UnOp):
            a = self.expr(e.a)
            r = e if a is e.a else K.UnOp(e.op, a)
        elif isinstance(e, K.Select):
            c, a, b = self.expr(e.cond), self.expr(e.a), self.expr(e.b)
            r = e if (c is e.cond and a is e.a and b is e.b) else K.Select(c, a, b)
        elif isinstance(e, K.Cast):
            a = self.expr(e.a)
            r = e if a is e.a else K.Cast(a, e.dtype)
        else:
            r = e
        self.memo[id(e)] = r
        return r

    def operand(self, op):
        buf, off, rs, cs = op
        m = self.mapping.get(id(buf))
        off = self.expr(off)
        return (m[0], K.add(m[1], off), rs, cs) if m else (buf, off, rs, cs)

    def stmts(self, body):
        out = []
        for s in body:
            if isinstance(s, K.Loop):
                out.append(K.Loop(s.var, s.extent, self.stmts(s.body), s.kind))
            elif isinstance(s, K.If):
                out.append(K.If(self.expr(s.cond), self.stmts(s.body)))
            elif isinstance(s, K.Store):
                m = self.mapping.get(id(s.buf))
                idx = self.expr(s.index)
                out.append(K.Store(m[0] if m else s.buf, K.add(m[1], idx) if m else idx,
                                   self.expr(s.value)))
            elif isinstance(s, K.Assign):
                out.append(K.Assign(s.local, self.expr(s.value)))
            elif isinstance(s, K.Gemm):
                out.append(K.Gemm(s.M, s.N, s.K, self.operand(s.a), self.operand(s.b),
                                  self.operand(s.c), s.accumulate))
            else:
                raise TypeError(type(s))
        return out


def privatize(loop, extra=()):
    """(loop with per-iteration copies of its thread scratch and of the `extra`
    buffers it writes, new buffers) or None when the copies would be too big."""
    scratch = scratch_written(loop.body)
    ids = {id(b) for b in scratch}
    written = {id(s.buf) for s in A.walk_stmts(loop.body) if isinstance(s, K.Store)}
    scratch += [b for b in extra if id(b) in written and id(b) not in ids]
    if not scratch:
        return loop, []
    total = sum(b.size * b.dtype.itemsize for b in scratch) * loop.extent
    if total > PRIVATE_LIMIT_BYTES:
        return None
    mapping, new = {}, []
    for b in scratch:
        nb = K.Buffer(f"{b.name}_per_{loop.var.name}{next(_count)}", b.dtype,
                      b.size * loop.extent)
        mapping[id(b)] = (nb, K.mul(loop.var, b.size))
        new.append(nb)
    return K.Loop(loop.var, loop.extent, _Rewriter(mapping).stmts(loop.body), loop.kind), new
