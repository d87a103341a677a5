"""Lowering of the fused groups that `lower.lower_fused` does not cover itself.

Registered as LOWER["fused"]; every other fused node goes on to
`lower.lower_fused` unchanged.

* A `reduce` group whose root is elementwise: prologue ops (at the reduced
  input's shape) -> one reduction -> epilogue ops (at the reduction's output
  shape), e.g. the bias gradient with its SGD update `b - lr * sum(g, 0)`.
  One kernel: the prologue is inlined into the reduction's loads and the
  epilogue is applied where the reduced value is stored.
* A group holding one row op of the softmax family (graphc.passes.fusion.ROW_OPS):
  softmax/log_softmax of a matrix along its rows followed by elementwise ops,
  or a full reduction (with prologue/epilogue ops) of softmax_cross_entropy's
  per-row losses.  The op's own kernel (lower_nn) is reused: its stores are
  rewritten to apply the epilogue, or to accumulate the reduction.
Anything else (or a row kernel of an unexpected form) goes on to lower_fused,
which expands the inner graph op by op.
"""
from __future__ import annotations

from math import prod

import numpy as np

from . import ir as K
from .ir import Assign, BinOp, Buffer, Const, If, Kernel, Load, Local, Loop, Store, Var, affine, \
    contiguous_strides
from .checks import checks_mark, checks_rollback
from .lower import (LOWER, SCALAR, _combine, _fused_leaves, _ident, _inner_expr, _shape, _uniq,
                    broadcast_strides, lower_fused, reduce_kernels)
from .scalar import scalar_expr

REDUCTIONS = ("sum", "mean", "max", "min")


def _ancestors(node) -> set:
    seen, stack = set(), [node]
    while stack:
        m = stack.pop()
        for i in m.inputs:
            if i.id not in seen:
                seen.add(i.id)
                stack.append(i)
    return seen


def split_reduce_epilogue(inner, allow=None):
    """(prologue nodes, reduction, epilogue nodes) of an inner graph that is an
    elementwise expression around exactly one reduction, or None."""
    root = inner.outputs[0]
    reds = [m for m in inner.nodes if m.op.name in REDUCTIONS and m.inputs]
    if len(reds) != 1 or reds[0] is root:
        return None
    red = reds[0]
    before = _ancestors(red)
    pre = [m for m in inner.nodes if m.id in before]
    post = [m for m in inner.nodes if m.id not in before and m is not red]
    if not all(m.is_leaf or m is allow or m.op.name in SCALAR for m in pre + post):
        return None
    if _shape(root) != _shape(red) or any(
            not m.is_leaf and _shape(m) != _shape(red) and prod(_shape(m)) != 1 for m in post):
        return None
    return pre, red, post


def _epilogue_expr(root, red, red_value, leaves, ovs, out_shape):
    """The epilogue's value at output position `ovs` (index exprs over out_shape)."""
    vals = {red.id: red_value}

    def val(m):
        if m.id not in vals:
            if m.id in leaves:
                b, shp = leaves[m.id]
                vals[m.id] = Load(b, affine(ovs, broadcast_strides(shp, out_shape)))
            elif m.op.name == "constant":
                vals[m.id] = Const(np.asarray(m.value).reshape(-1)[0].item(), m.dtype)
            else:
                vals[m.id] = scalar_expr(m.op.name, m.attrs, [val(i) for i in m.inputs],
                                         m.dtype)
        return vals[m.id]
    return val(root)


def lower_reduce_epilogue(lw, n, parts):
    pre, red, post = parts
    src = red.inputs[0]
    xs = _shape(src)
    axes = set(red.op.axes(src.ndim, red.attrs["axis"]))
    op, acc_dt = red.op.name, red.dtype
    out_shape = _shape(red)
    keep = red.attrs["keepdims"]
    kept = [d for d in range(len(xs)) if d not in axes]
    kept_shape = [xs[d] for d in kept]
    out_st = contiguous_strides(kept_shape)
    leaves = _fused_leaves(lw, n)
    out = lw.buf(n)
    in_bufs = [b for b, _ in leaves.values()]

    def load_at(vs):
        return _inner_expr(pre, src, leaves, vs, xs)

    def out_vars(kvs):
        """Index exprs over out_shape from loop vars over the kept dims."""
        if not keep:
            return list(kvs)
        it = iter(kvs)
        return [next(it) if d not in axes else K.idx(0) for d in range(len(xs))]

    def epi(value, kvs):
        return _epilogue_expr(n.value.outputs[0], red, value, leaves, out_vars(kvs), out_shape)

    size = prod(xs)
    big_total = xs and len(axes) == len(xs) and size >= 1 << 16
    if not big_total and (not xs or (len(xs) - 1) in axes):
        # innermost axis reduced: one register accumulator per output element,
        # the epilogue applied to it before the store
        vs = {d: Var(f"r{d}") for d in range(len(xs))}
        acc = Local(acc_dt, "acc")
        v = load_at([vs[d] for d in range(len(xs))])
        v = v if v.dtype == acc_dt else K.Cast(v, acc_dt)
        body = [Assign(acc, _combine(op, acc, v))]
        for k, d in enumerate(sorted(axes, reverse=True)):
            body = [Loop(vs[d], xs[d], body, "vector" if k == 0 else "serial")]
        tot = acc
        if op == "mean":
            tot = BinOp("div", acc, Const(float(prod(xs[d] for d in axes)), acc_dt))
        kvs = [vs[d] for d in kept]
        body = ([Assign(acc, _ident(op, acc_dt))] + body +
                [Store(out, affine(kvs, out_st), epi(tot, kvs))])
        for d in reversed(kept):
            body = [Loop(vs[d], xs[d], body, "parallel" if d == kept[0] else "serial")]
        return [Kernel(f"fused_{op}_epilogue", _uniq([out] + in_bufs), body, flops=size)]
    # otherwise the plain reduction kernel(s) into a scratch row, the epilogue
    # appended to the last kernel as a loop nest over the output
    scratch = lw.new_buffer(acc_dt, max(1, prod(kept_shape)), hint="red")
    ks = reduce_kernels(lw, op, xs, axes, acc_dt, scratch, in_bufs, load_at,
                        name=f"fused_{op}_epilogue")
    last = ks[-1]
    last.body += K.loop_nest(kept_shape, lambda kvs: [
        Store(out, affine(kvs, out_st), epi(Load(scratch, affine(kvs, out_st)), kvs))])
    last.buffers = _uniq(last.buffers + [out] + in_bufs)
    return ks


# ------------------------------------------------------------------ softmax-family rows
ROW_OPS = ("softmax", "log_softmax", "softmax_cross_entropy")


def _rewrite_stores(body, buf, fn, loops=(), serial=False):
    """`body` with every Store into `buf` replaced by fn(store, enclosing loops)."""
    out = []
    for s in body:
        if isinstance(s, Loop):
            kind = "serial" if serial and s.kind == "parallel" else s.kind
            out.append(Loop(s.var, s.extent, _rewrite_stores(s.body, buf, fn, loops + (s,), serial),
                            kind))
        elif isinstance(s, If):
            out.append(If(s.cond, _rewrite_stores(s.body, buf, fn, loops, serial)))
        elif isinstance(s, Store) and s.buf is buf:
            out.extend(fn(s, loops))
        else:
            out.append(s)
    return out


def _row_kernel(lw, row, leaves):
    """The row op's own kernel, reading the fused node's buffers; (kernel, its output
    placeholder, the index-check kernels that go before it) or None."""
    if not all(i.id in leaves for i in row.inputs) or row.op.name not in LOWER:
        return None
    for i in row.inputs:
        lw.bufs[i.id] = leaves[i.id][0]
    ph = Buffer(f"row{row.id}", row.dtype, prod(_shape(row)))
    lw.bufs[row.id] = ph
    ks = LOWER[row.op.name](lw, row)
    checks = [k for k in ks if k.name.startswith("check_")]
    main = [k for k in ks if not k.name.startswith("check_")]
    return (main[0], ph, checks) if len(main) == 1 else None


def lower_softmax_epilogue(lw, n, row):
    """softmax(z) (rows of a matrix) then elementwise ops: one kernel."""
    inner = n.value
    root = inner.outputs[0]
    if row.ndim != 2 or row.attrs["axis"] != 1 or _shape(root) != _shape(row) or any(
            not (m.is_leaf or m is row or m.op.name in SCALAR) for m in inner.nodes):
        return None
    leaves = _fused_leaves(lw, n)
    got = _row_kernel(lw, row, leaves)
    if got is None:
        return None
    k, ph, checks = got
    shape = _shape(row)
    out = lw.buf(n)
    hits = []

    def store(st, loops):
        if not loops or loops[0].extent != shape[0] or loops[-1].extent != shape[1]:
            return [st]
        hits.append(st)
        ovs = [loops[0].var, loops[-1].var]
        return [Store(out, st.index, _epilogue_expr(root, row, st.value, leaves, ovs, shape))]
    body = _rewrite_stores(k.body, ph, store)
    if len(hits) != 1:
        return None
    bufs = _uniq([out] + [b for b in k.buffers if b is not ph] + [b for b, _ in leaves.values()])
    return checks + [Kernel(f"fused_{row.op.name}", bufs, body, flops=k.flops)]


def lower_xent_reduction(lw, n, row):
    """A full reduction of softmax_cross_entropy's per-row losses (plus elementwise
    ops before and after it): one kernel, the rows visited in order."""
    parts = split_reduce_epilogue(n.value, allow=row)
    if parts is None:
        pre, red, post = ([m for m in n.value.nodes if m is not n.value.outputs[0]],
                          n.value.outputs[0], [])
        if red.op.name not in REDUCTIONS:
            return None
    else:
        pre, red, post = parts
    if (row.ndim != 1 or prod(_shape(red)) != 1 or row not in pre
            or any(not (m.is_leaf or m is row or m.op.name in SCALAR) for m in pre + post)):
        return None
    leaves = _fused_leaves(lw, n)
    got = _row_kernel(lw, row, leaves)
    if got is None:
        return None
    k, ph, checks = got
    op, acc_dt = red.op.name, red.dtype
    acc = Local(acc_dt, "acc")
    dom = _shape(row)
    hits = []

    def store(st, loops):
        hits.append(st)
        v = _epilogue_expr(red.inputs[0], row, st.value, leaves, [st.index], dom)
        v = v if v.dtype == acc_dt else K.Cast(v, acc_dt)
        return [Assign(acc, _combine(op, acc, v))]
    body = _rewrite_stores(k.body, ph, store, serial=True)
    if len(hits) != 1:
        return None
    tot = acc
    if op == "mean":
        tot = BinOp("div", acc, Const(float(prod(dom)), acc_dt))
    out = lw.buf(n)
    root = n.value.outputs[0]
    zero = [K.idx(0)] * red.ndim
    val = tot if root is red else _epilogue_expr(root, red, tot, leaves, zero, _shape(red))
    body = [Assign(acc, _ident(op, acc_dt))] + body + [Store(out, K.idx(0), val)]
    bufs = _uniq([out] + [b for b in k.buffers if b is not ph] + [b for b, _ in leaves.values()])
    return checks + [Kernel(f"fused_{row.op.name}_{op}", bufs, body, flops=k.flops)]


# ------------------------------------------------------------------ row kernels
def lower_row_kernel(lw, n):
    """Several keepdims reductions over the trailing axes of one shape D, with
    elementwise ops of shape D, of the row shape or of one element (layer_norm):
    per row, each reduction is a loop over the row into a scalar (its D-shaped
    operands recomputed inline), row-shaped ops are scalars, and a last loop
    stores the D-shaped result.  None when the inner graph is not of that form."""
    inner = n.value
    root = inner.outputs[0]
    reds = [m for m in inner.nodes if m.op.name in REDUCTIONS and m.inputs]
    if not reds or not root.ndim or root.op.name in REDUCTIONS:
        return None
    D = _shape(root)
    if _shape(reds[0].inputs[0]) != D:
        return None
    axes = tuple(reds[0].op.axes(len(D), reds[0].attrs["axis"]))
    k = len(D) - len(axes)
    if not axes or axes != tuple(range(k, len(D))):
        return None
    row_shape = D[:k] + (1,) * len(axes)
    for m in inner.nodes:
        if m.is_leaf:
            continue
        if m.op.name in REDUCTIONS:
            if (not m.attrs["keepdims"] or _shape(m.inputs[0]) != D
                    or tuple(m.op.axes(len(D), m.attrs["axis"])) != axes):
                return None
        elif m.op.name not in SCALAR or (_shape(m) not in (D, row_shape)
                                          and prod(_shape(m)) != 1):
            return None
    leaves = _fused_leaves(lw, n)
    rv = [Var(f"d{d}") for d in range(k)]
    scalar_of = {}      # row-valued node id -> Local (per row)

    def expr(m, pos, memo):
        """m's value at full position `pos` (index exprs over D)."""
        if m.id in scalar_of:
            return scalar_of[m.id]
        if m.id in memo:
            return memo[m.id]
        if m.id in leaves:
            b, shp = leaves[m.id]
            v = Load(b, affine(pos, broadcast_strides(shp, D)))
        elif m.op.name == "constant":
            v = Const(np.asarray(m.value).reshape(-1)[0].item(), m.dtype)
        else:
            v = scalar_expr(m.op.name, m.attrs, [expr(i, pos, memo) for i in m.inputs], m.dtype)
        memo[m.id] = v
        return v
    row_pos = rv + [K.idx(0)] * len(axes)
    body = []
    for m in inner.nodes:
        if m.is_leaf or m is root or (m.op.name not in REDUCTIONS and _shape(m) == D):
            continue
        loc = Local(m.dtype)
        if m.op.name in REDUCTIONS:
            av = [Var(f"a{d}") for d in axes]
            v = expr(m.inputs[0], rv + av, {})
            v = v if v.dtype == m.dtype else K.Cast(v, m.dtype)
            loop = [Assign(loc, _combine(m.op.name, loc, v))]
            for j, d in reversed(list(enumerate(axes))):
                loop = [Loop(av[j], D[d], loop, "vector" if d == len(D) - 1 else "serial")]
            body += [Assign(loc, _ident(m.op.name, m.dtype))] + loop
            if m.op.name == "mean":
                cnt = float(prod(D[d] for d in axes))
                body.append(Assign(loc, BinOp("div", loc, Const(cnt, m.dtype))))
        else:
            body.append(Assign(loc, expr(m, row_pos, {})))
        scalar_of[m.id] = loc
    out = lw.buf(n)
    av = [Var(f"o{d}") for d in axes]
    st = contiguous_strides(D)
    if root.id in scalar_of:
        return None
    store = [Store(out, affine(rv + av, st), expr(root, rv + av, {}))]
    for j, d in reversed(list(enumerate(axes))):
        store = [Loop(av[j], D[d], store, "vector" if d == len(D) - 1 else "serial")]
    body += store
    for d in reversed(range(k)):
        body = [Loop(rv[d], D[d], body, "parallel" if d == 0 else "serial")]
    bufs = _uniq([out] + [b for b, _ in leaves.values()])
    return [Kernel("fused_rows", bufs, body, flops=len(reds) * 2 * prod(D))]


def lower_fused_group(lw, n):
    if n.attrs.get("kind") == "reduce":
        rows = [m for m in n.value.nodes if m.op.name in ROW_OPS]
        if len(rows) == 1:
            row = rows[0]
            mark = checks_mark(lw.prog)
            ks = (lower_xent_reduction(lw, n, row) if row.op.name == "softmax_cross_entropy"
                  else lower_softmax_epilogue(lw, n, row))
            if ks is not None:
                return ks
            checks_rollback(lw.prog, mark)   # (the row kernel's checks were not kept)
            lw.bufs.pop(row.id, None)      # the expansion below computes it
        elif not rows:
            parts = split_reduce_epilogue(n.value)
            if parts is not None:
                return lower_reduce_epilogue(lw, n, parts)
            ks = lower_row_kernel(lw, n)
            if ks is not None:
                return ks
    return lower_fused(lw, n)


LOWER["fused"] = lower_fused_group
