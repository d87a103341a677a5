"""Lowering of indexing ops (slice, pad, concat, take, take_grad, one_hot,
index_check) and of the remaining loss/reduction ops (logsumexp, nll).

Integer indices read from memory are clamped into range before they address
anything, so a bad index can never read or write out of bounds; a check kernel
(checks.py) before each such use scans the index array, fed or computed in the
graph, and the runtime raises the reference's IndexOutOfRangeError after the call.
"""
from __future__ import annotations

from math import prod

import numpy as np

from . import ir as K
from .ir import (INDEX, Assign, BinOp, Cast, Const, Kernel, Load, Local, Loop, Select, Store,
                 UnOp, Var, affine, contiguous_strides, idx)
from .checks import check_kernels, label_checks
from .lower import _shape, _uniq, elementwise_kernel, reduce_kernels, rule


def _clamp(e, hi):
    z, h = idx(0), idx(hi)
    e = Select(BinOp("lt", e, z), z, e)
    return Select(BinOp("gt", e, h), h, e)


def _check_index(lw, node, ind, n, what):
    """The check kernels of index array node `ind` (must lie in [0, n))."""
    return check_kernels(lw, node, lw.buf(ind), n, _shape(ind), what=what)


@rule("slice")
def lower_slice(lw, n):
    x = n.inputs[0]
    xs, os_ = _shape(x), _shape(n)
    X, Y = lw.buf(x), lw.buf(n)
    st = contiguous_strides(xs)
    base, steps = 0, []
    for d, s in enumerate(n.attrs["spec"]):
        if s is None:
            steps.append(st[d])
        else:
            start, step, _ = s
            base += start * st[d]
            steps.append(step * st[d])

    def body(vs):
        return [Store(Y, affine(vs, contiguous_strides(os_)), Load(X, affine(vs, steps, base)))]
    return [Kernel("slice", [Y, X], K.loop_nest(os_, body, outer_kind="parallel"))]


@rule("pad")
def lower_pad(lw, n):
    x = n.inputs[0]
    xs, os_ = _shape(x), _shape(n)
    X, Y = lw.buf(x), lw.buf(n)
    ost = contiguous_strides(os_)
    base, steps = 0, []
    for d, s in enumerate(n.attrs["spec"]):
        if s is None:
            steps.append(ost[d])
        else:
            start, step, _ = s
            base += start * ost[d]
            steps.append(step * ost[d])
    v = Var("z")
    fill = Kernel("pad_fill", [Y], [Loop(v, Y.size, [Store(Y, v, Const(n.attrs["value"], Y.dtype))],
                                        "parallel")])
    place = Kernel("pad_place", [Y, X], K.loop_nest(xs, lambda vs: [
        Store(Y, affine(vs, steps, base), Load(X, affine(vs, contiguous_strides(xs))))],
        outer_kind="parallel"))
    return [fill, place]


@rule("concat")
def lower_concat(lw, n):
    axis = n.attrs["axis"]
    os_ = _shape(n)
    Y = lw.buf(n)
    ost = contiguous_strides(os_)
    kernels, offset = [], 0
    for x in n.inputs:
        xs = _shape(x)
        X = lw.buf(x)

        def body(vs, X=X, xs=xs, offset=offset):
            v = Load(X, affine(vs, contiguous_strides(xs)))
            v = v if v.dtype == Y.dtype else Cast(v, Y.dtype)
            return [Store(Y, affine(vs, ost, offset * ost[axis]), v)]
        if prod(xs):
            kernels.append(Kernel("concat", _uniq([Y, X]),
                                  K.loop_nest(xs, body, outer_kind="parallel")))
        offset += xs[axis]
    return kernels


def _take_dims(x_shape, idx_shape, axis):
    outer = prod(x_shape[:axis])
    inner = prod(x_shape[axis + 1:])
    return outer, prod(idx_shape), inner, x_shape[axis]


@rule("take")
def lower_take(lw, n):
    x, ind = n.inputs
    X, I, Y = lw.buf(x), lw.buf(ind), lw.buf(n)
    axis = n.attrs["axis"]
    outer, m, inner, size = _take_dims(_shape(x), _shape(ind), axis)
    checks = _check_index(lw, n, ind, size, f"axis {axis} of size {size}")
    o, j, i = Var("o"), Var("j"), Var("i")
    k = _clamp(Cast(Load(I, j), INDEX), size - 1)
    body = [Store(Y, affine([o, j, i], [m * inner, inner, 1]),
                  Load(X, K.add(affine([o, i], [size * inner, 1]), K.mul(k, inner))))]
    return checks + [Kernel("take", [Y, X, I], [Loop(o, outer, [Loop(j, m, [Loop(i, inner, body,
                                                                         "vector")])],
                                            "parallel")])]


@rule("take_grad")
def lower_take_grad(lw, n):
    g, ind, like = n.inputs
    G, I, Y = lw.buf(g), lw.buf(ind), lw.buf(n)
    axis = n.attrs["axis"]
    outer, m, inner, size = _take_dims(_shape(like), _shape(ind), axis)
    checks = _check_index(lw, n, ind, size, f"axis {axis} of size {size}")
    o, j, i, z = Var("o"), Var("j"), Var("i"), Var("z")
    k = _clamp(Cast(Load(I, j), INDEX), size - 1)
    dst = K.add(affine([o, i], [size * inner, 1]), K.mul(k, inner))
    body = [Loop(z, size * inner, [Store(Y, affine([o, z], [size * inner, 1]),
                                         Const(0, Y.dtype))], "vector"),
            Loop(j, m, [Loop(i, inner, [Store(Y, dst, BinOp("add", Load(Y, dst), Load(
                G, affine([o, j, i], [m * inner, inner, 1]))))], "vector")])]
    return checks + [Kernel("take_grad", [Y, G, I], [Loop(o, outer, body, "parallel")])]


@rule("one_hot")
def lower_one_hot(lw, n):
    ind = n.inputs[0]
    I, Y = lw.buf(ind), lw.buf(n)
    C = n.attrs["num_classes"]
    checks = _check_index(lw, n, ind, C, f"num_classes={C}")
    j, c = Var("j"), Var("c")
    hit = BinOp("eq", Cast(Load(I, j), INDEX), c)
    return checks + [Kernel("one_hot", [Y, I], [Loop(j, I.size, [Loop(c, C, [
        Store(Y, affine([j, c], [C, 1]), Cast(hit, Y.dtype))], "vector")], "parallel")])]


@rule("logsumexp")
def lower_logsumexp(lw, n):
    """m = max (0 where not finite); out = m + log(sum(exp(x - m)))."""
    x = n.inputs[0]
    xs = _shape(x)
    X, Y = lw.buf(x), lw.buf(n)
    from ..ir.shapes import normalize_axes
    axes = set(normalize_axes(n.attrs["axis"], len(xs), "logsumexp"))
    kept = [d for d in range(len(xs)) if d not in axes]
    kept_shape = [xs[d] for d in kept]
    M = lw.new_buffer(n.dtype, prod(kept_shape), hint="lse_max")
    S = lw.new_buffer(n.dtype, prod(kept_shape), hint="lse_sum")
    in_st = contiguous_strides(xs)
    kst = contiguous_strides(kept_shape)

    def m_at(vs):
        return Load(M, affine([vs[d] for d in kept], kst))
    ks = reduce_kernels(lw, "max", xs, axes, n.dtype, M, [X], lambda vs: Load(X, affine(vs, in_st)))
    v = Var("v")
    mv = Load(M, v)
    fin = BinOp("lt", UnOp("abs", mv), Const(float("inf"), n.dtype))
    ks.append(Kernel("lse_finite", [M], [Loop(v, M.size, [Store(M, v, Select(
        fin, mv, Const(0.0, n.dtype)))], "parallel")]))
    ks += reduce_kernels(lw, "sum", xs, axes, n.dtype, S, [X, M], lambda vs: UnOp(
        "exp", BinOp("sub", Load(X, affine(vs, in_st)), m_at(vs))))
    w = Var("w")
    ks.append(Kernel("lse_out", [Y, M, S], [Loop(w, Y.size, [Store(Y, w, BinOp(
        "add", Load(M, w), UnOp("log", Load(S, w))))], "parallel")]))
    return ks


@rule("nll")
def lower_nll(lw, n):
    """Per sample -logp[label]; label smoothing mixes in -mean(logp); ignore_index -> 0."""
    x, y = n.inputs
    X, L, OUT = lw.buf(x), lw.buf(y), lw.buf(n)
    xs = _shape(x)
    cax = 1 if len(xs) >= 2 else 0
    outer, C, inner = prod(xs[:cax]), xs[cax], prod(xs[cax + 1:])
    d = n.dtype
    ii = n.attrs["ignore_index"]
    checks = label_checks(lw, n, y, C)
    o, i, r = Var("o"), Var("i"), Var("r")
    at = lambda rr: Load(X, affine([o, rr, i], [C * inner, inner, 1]))
    lab = Cast(Load(L, affine([o, i], [inner, 1])), INDEX)
    loss = UnOp("neg", at(_clamp(lab, C - 1)))
    body = []
    eps = n.attrs["label_smoothing"]
    if eps:
        tot = Local(d, "tot")
        body += [Assign(tot, Const(0.0, d)),
                 Loop(r, C, [Assign(tot, BinOp("add", tot, at(r), reassoc=True))], "vector")]
        loss = BinOp("sub", BinOp("mul", Const(1.0 - eps, d), loss),
                     BinOp("mul", Const(eps, d), BinOp("div", tot, Const(float(C), d))))
    if ii is not None:
        valid = BinOp("ne", lab, Const(ii, INDEX))
        loss = Select(valid, loss, Const(0.0, d))
    body.append(Store(OUT, affine([o, i], [inner, 1]), loss))
    return checks + [Kernel("nll", [OUT, X, L], [Loop(o, outer, [Loop(i, inner, body)],
                                                      "parallel")])]


@rule("index_check")
def lower_index_check(lw, n):
    """The check alone: the output is the input's buffer (Lowerer aliases it), except
    where a loop body gave the output a buffer of its own, which gets a copy."""
    x = n.inputs[0]
    a = n.attrs
    ks = check_kernels(lw, n, lw.buf(x), a["size"], _shape(x), op=a["for_op"], kind=a["kind"],
                       what=a["what"], ignore=a["ignore"])
    if lw.buf(n) is not lw.buf(x):
        size = prod(_shape(n))
        ks.append(elementwise_kernel("copy", lw.buf(n), (size,), [lw.buf(x)], [(size,)],
                                     lambda xs: xs[0]))
    return ks


def _s64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix64(z):
    """splitmix64's finalizer on int64 expressions (wrapping arithmetic)."""
    from ..ops.nn import DROPOUT_MIX1, DROPOUT_MIX2
    z = BinOp("xor", z, BinOp("lshr", z, idx(30)))
    z = BinOp("mul", z, idx(_s64(DROPOUT_MIX1)))
    z = BinOp("xor", z, BinOp("lshr", z, idx(27)))
    z = BinOp("mul", z, idx(_s64(DROPOUT_MIX2)))
    return BinOp("xor", z, BinOp("lshr", z, idx(31)))


@rule("dropout")
def lower_dropout(lw, n):
    """The op's documented counter-based hash, bit for bit (see ops/nn.py DropoutOp)."""
    from ..ops.nn import DROPOUT_GOLDEN, DROPOUT_STREAM_OFFSET, _mix64_int
    x, key = n.inputs
    X, KB, Y = lw.buf(x), lw.buf(key), lw.buf(n)
    a = n.attrs
    salt = _s64(_mix64_int(a["stream"] + DROPOUT_STREAM_OFFSET))
    s = _mix64(BinOp("xor", Cast(Load(KB, idx(0)), INDEX), idx(salt)))
    i = Var("i")
    z = _mix64(BinOp("add", s, BinOp("mul", i, idx(_s64(DROPOUT_GOLDEN)))))
    keep = BinOp("ge", BinOp("lshr", z, idx(40)), idx(a["threshold"]))
    d = Y.dtype
    scale = float(np.asarray(a["scale"], dtype=d))       # one multiply in x's dtype
    val = Select(keep, BinOp("mul", Load(X, i), Const(scale, d)), Const(0.0, d))
    return [Kernel("dropout", [Y, X, KB], [Loop(i, Y.size, [Store(Y, i, val)], "parallel")],
                   flops=Y.size * 12)]
