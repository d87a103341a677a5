"""Lower a shape-concrete graph to a `Program`: buffers plus kernels in order.

Each graph value gets a Buffer; reshape aliases its input's buffer (graph
values are contiguous row-major arrays).  Leaves are *external* buffers whose
storage the runtime supplies at call time (inputs, parameters, constants);
everything else is a *temporary* the runtime lays out in its arena.
Lowering rules live in the table `LOWER` (op name -> function); ops without a
rule are collected and reported together by `NotLoweredError`.
"""
from __future__ import annotations

from math import prod

import numpy as np

from ..ir.errors import NotLoweredError
from . import ir as K
from .ir import (BOOL, INDEX, Assign, BinOp, Buffer, Cast, Const, Gemm, Kernel, Load, Local,
                 Loop, Select, Store, UnOp, Var, affine, contiguous_strides, idx)
from .scalar import SCALAR, nan_max, nan_min, scalar_expr
from .schedule import collapse_loops

LOWER: dict = {}
# Ops whose value is their input's buffer: reshape (a view) and index_check (a check
# kernel that writes nothing but its record).
ALIAS_OPS = frozenset({"reshape", "index_check"})


def rule(*names):
    def deco(fn):
        for n in names:
            LOWER[n] = fn
        return fn
    return deco


class Program:
    """What a backend compiles: buffers, kernels (in order), and where data lives."""

    def __init__(self):
        self.kernels: list = []
        self.externals: list = []   # (Buffer, ("input", i) | ("param"|"const", node))
        self.temps: list = []       # Buffers the runtime allocates
        self.outputs: list = []     # Buffer per graph output
        self.kernel_nodes: list = []  # the graph node each kernel came from (for errors/profiles)
        # Run-time index checks (checks.py): their check kernels write records into
        # check_buf, an external buffer the runtime resets before and reads after a call.
        self.checks: list = []
        self.check_buf = None
        # Native loops (lower_loop.py): regions of kernels run repeatedly, and view
        # buffers {id: View} placed at parent + t * step inside them.
        self.loops: list = []
        self.views: dict = {}

    def format(self) -> str:
        return "\n\n".join(k.format() for k in self.kernels)


def _shape(node):
    return tuple(int(d) for d in node.shape)


class Lowerer:
    def __init__(self, graph):
        self.graph = graph
        self.prog = Program()
        self.bufs: dict = {}
        self._count = 0

    def new_buffer(self, dtype, size, hint="t", temp=True, scope="global"):
        self._count += 1
        b = Buffer(f"{hint}{self._count}", dtype, int(size), scope)
        if temp:
            self.prog.temps.append(b)
        return b

    def buf(self, node) -> Buffer:
        return self.bufs[node.id]

    def emit(self, node, kernels):
        for k in kernels:
            k.body = collapse_loops(k.body)   # long contiguous inner loops (schedule.py)
            self.prog.kernels.append(k)
            self.prog.kernel_nodes.append(node)

    def run(self):
        g = self.graph
        for n in g.nodes:
            if n.op.name == "input" and not any(n is i for i in g.inputs):
                raise NotLoweredError(f"graph input {n.label()} is not among the graph's inputs")
        missing = [n for n in g.nodes if not n.is_leaf and n.op.name not in LOWER
                   and not _fused_ok(n)]
        if missing:
            lines = [f"  {n.op.name} ({n.type}) built at {n.loc}" for n in missing]
            names = sorted({n.op.name for n in missing})
            raise NotLoweredError(
                f"the llvm backend cannot lower op(s) {', '.join(names)} yet:\n" + "\n".join(lines))
        input_pos = {n.id: k for k, n in enumerate(g.inputs)}
        self.folded = _foldable_transposes(g)
        for n in g.nodes:
            name = n.op.name
            if n.id in self.folded:
                continue      # read through strides by its matmul users
            if n.is_leaf:
                b = self.new_buffer(n.dtype, prod(_shape(n)), hint=name[:5], temp=False)
                src = ("input", input_pos[n.id]) if name == "input" else (name[:5], n)
                self.prog.externals.append((b, src))
                self.bufs[n.id] = b
                continue
            if name in ALIAS_OPS:
                self.bufs[n.id] = self.buf(n.inputs[0])
                if name != "reshape":
                    self.emit(n, LOWER[name](self, n))
                continue
            if name in ("scan", "tuple_get"):   # tuple-valued: lower_loop sets the buffers
                self.emit(n, LOWER[name](self, n))
                continue
            self.bufs[n.id] = self.new_buffer(n.dtype, prod(_shape(n)), hint="v")
            self.emit(n, LOWER[name](self, n) if name in LOWER else lower_fused(self, n))
        self.prog.outputs = [self.buf(o) for o in g.outputs]
        return self.prog


def _swaps_last_two(perm) -> bool:
    n = len(perm)
    return n >= 2 and tuple(perm) == tuple(range(n - 2)) + (n - 1, n - 2)


def _foldable_transposes(g) -> dict:
    """{transpose node id: its input} for matrix transposes read only by matmuls:
    the GEMM reads the input with swapped strides instead of a transposed copy."""
    users = g.users()
    outs = {o.id for o in g.outputs}
    return {n.id: n.inputs[0] for n in g.nodes
            if n.op.name == "transpose" and _swaps_last_two(n.attrs["perm"])
            and n.id not in outs and users.get(n.id)
            and all(u.op.name == "matmul" or _matmul_operand_of_fused(u, n)
                    for u in users[n.id])}


def _matmul_operand_of_fused(u, n) -> bool:
    """Is `n` read by fused node `u` only as operands of matmuls inside it (a matmul
    epilogue group, lowered op by op: the inner matmul can read the strides)?"""
    if u.op.name != "fused" or u.value is None:
        return False
    inner = u.value
    iu = inner.users()
    inner_outs = {o.id for o in inner.outputs}
    for i_in, o_in in zip(inner.inputs, u.inputs):
        if o_in is n and (i_in.id in inner_outs or not iu.get(i_in.id) or
                          not all(m.op.name == "matmul" for m in iu[i_in.id])):
            return False
    return True


def lower_graph(graph, optimize_body=None, loops=True) -> Program:
    """loops: the backend runs Program.loops (native loop regions, see lower_loop.py);
    with loops=False a `scan` raises NotLoweredError.  optimize_body: Graph -> Graph,
    applied to loop bodies before they are lowered (e.g. the optimizer, for fusion)."""
    if loops:
        from .lower_loop import share_residuals
        graph = share_residuals(graph)
    lw = Lowerer(graph)
    lw.optimize_body = optimize_body
    lw.native_loops = loops
    return lw.run()


# ------------------------------------------------------------------ elementwise
def broadcast_strides(in_shape, out_shape):
    """Element strides of a contiguous `in_shape` array broadcast to `out_shape`."""
    st = contiguous_strides(in_shape)
    lead = len(out_shape) - len(in_shape)
    out = [0] * lead
    for d, s, o in zip(in_shape, st, out_shape[lead:]):
        out.append(s if d == o and d != 1 else 0)
    return out


def collapse(shape, stride_lists):
    """Merge adjacent loop dims where every operand is contiguous across them."""
    shape = list(shape)
    sts = [list(s) for s in stride_lists]
    k = len(shape) - 2
    while k >= 0:
        if all(s[k] == s[k + 1] * shape[k + 1] for s in sts):
            shape[k] *= shape[k + 1]
            del shape[k + 1]
            for s in sts:
                s[k] = s[k + 1]
                del s[k + 1]
        k -= 1
    return shape, sts


def elementwise_kernel(name, out_buf, out_shape, in_bufs, in_shapes, make_expr, flops_per=1):
    """out[p] = make_expr([in_k[proj_k(p)]]) over the output shape, with broadcasting."""
    out_shape = tuple(out_shape)
    strides = [broadcast_strides(s, out_shape) for s in in_shapes]
    keep = [d for d, e in enumerate(out_shape) if e != 1]     # size-1 dims: no loop
    sts = [[st[d] for d in keep] for st in [contiguous_strides(out_shape)] + strides]
    shape, sts = collapse([out_shape[d] for d in keep], sts)
    if not shape:
        shape, sts = [1], [[0] for _ in sts]

    def body(vs):
        loads = [Load(b, affine(vs, st)) for b, st in zip(in_bufs, sts[1:])]
        return [Store(out_buf, affine(vs, sts[0]), make_expr(loads))]
    size = prod(out_shape)
    return Kernel(name, _uniq([out_buf] + list(in_bufs)),
                  K.loop_nest(shape, body, outer_kind="parallel"), flops=size * flops_per)


def _uniq(bufs):
    seen, out = set(), []
    for b in bufs:
        if id(b) not in seen:
            seen.add(id(b))
            out.append(b)
    return out


ELEMENTWISE = set(SCALAR) - {"broadcast_to"}


@rule(*ELEMENTWISE, "broadcast_to")
def lower_elementwise(lw, n):
    return [elementwise_kernel(
        n.op.name, lw.buf(n), _shape(n), [lw.buf(i) for i in n.inputs],
        [_shape(i) for i in n.inputs],
        lambda xs: scalar_expr(n.op.name, n.attrs, xs, n.dtype))]


# ------------------------------------------------------------------ fused groups
def _fused_ok(n):
    return n.op.name == "fused"


def lower_fused(lw, n):
    """Elementwise groups become one loop nest; other kinds expand their inner graph."""
    inner = n.value
    inner_nodes = inner.nodes
    root = inner.outputs[0]
    if (n.attrs.get("kind") == "reduce" and root.op.name in ("sum", "mean", "max", "min")
            and all(m.op.name in SCALAR or m.is_leaf for m in inner_nodes if m is not root)):
        return _lower_fused_reduce(lw, n, root)
    pure = n.attrs.get("kind") == "elementwise" and all(
        m.op.name in SCALAR or m.is_leaf for m in inner_nodes)
    if not pure:
        if n.attrs.get("kind") in ("matmul_epilogue", "conv_epilogue"):
            ks = _lower_matmul_epilogue(lw, n)
            if ks is not None:
                return ks
        return _expand_inner(lw, n)
    out_shape = _shape(n)
    pos = {i.id: k for k, i in enumerate(inner.inputs)}
    extra = []   # constant leaves that are not scalars: read from their arrays
    ext_bufs = [lw.buf(i) for i in n.inputs]
    ext_shapes = [_shape(i) for i in n.inputs]
    for m in inner_nodes:
        if m.op.name == "parameter" or (m.op.name == "constant" and m.value.size != 1):
            b = lw.new_buffer(m.dtype, m.value.size, hint="c", temp=False)
            lw.prog.externals.append((b, ("const" if m.op.name == "constant" else "param", m)))
            pos[m.id] = len(ext_bufs)
            ext_bufs.append(b)
            ext_shapes.append(_shape(m))
            extra.append(m)

    def make(loads):
        vals = {}
        for m in inner_nodes:
            if m.id in pos:
                vals[m.id] = loads[pos[m.id]]
            elif m.op.name == "constant":   # a scalar: baked into the code
                v = np.asarray(m.value).reshape(-1)[0]
                vals[m.id] = Const(v.item(), m.dtype)
            elif m.op.name == "input":
                raise NotLoweredError(f"fused node input {m.label()} has no outer value")
            else:
                vals[m.id] = scalar_expr(m.op.name, m.attrs, [vals[i.id] for i in m.inputs],
                                         m.dtype)
        return vals[inner.outputs[0].id]
    return [elementwise_kernel("fused", lw.buf(n), out_shape, ext_bufs, ext_shapes, make,
                               flops_per=len(inner_nodes))]


def _fused_leaves(lw, n):
    """{inner node id: (buffer, shape)} for the inner graph's array-valued leaves."""
    inner = n.value
    leaves = {i.id: (lw.buf(o), _shape(o)) for i, o in zip(inner.inputs, n.inputs)}
    for m in inner.nodes:
        if m.op.name == "parameter" or (m.op.name == "constant" and m.value.size != 1):
            b = lw.new_buffer(m.dtype, m.value.size, hint="c", temp=False)
            lw.prog.externals.append((b, ("const" if m.op.name == "constant" else "param", m)))
            leaves[m.id] = (b, _shape(m))
    return leaves


def _inner_expr(nodes, stop, leaves, vs, domain):
    """Expr of inner node `stop` at loop vars `vs` over `domain` (leaves broadcast)."""
    vals = {}
    for m in nodes:
        if m.id in leaves:
            b, shp = leaves[m.id]
            vals[m.id] = Load(b, affine(vs, broadcast_strides(shp, domain)))
        elif m.op.name == "constant":
            vals[m.id] = Const(np.asarray(m.value).reshape(-1)[0].item(), m.dtype)
        elif m.is_leaf:
            raise NotLoweredError(f"fused node leaf {m.label()} has no outer value")
        else:
            vals[m.id] = scalar_expr(m.op.name, m.attrs, [vals[i.id] for i in m.inputs], m.dtype)
        if m is stop:
            break
    return vals[stop.id]


def _lower_fused_reduce(lw, n, root):
    """A reduction of an elementwise expression: one kernel, the expression inlined
    into the reduction's loads (no intermediate array)."""
    src = root.inputs[0]
    xs = _shape(src)
    axes = set(root.op.axes(src.ndim, root.attrs["axis"]))
    leaves = _fused_leaves(lw, n)
    nodes = [m for m in n.value.nodes if m is not root]
    bufs = [b for b, _ in leaves.values()]
    return reduce_kernels(lw, root.op.name, xs, axes, root.dtype, lw.buf(n), bufs,
                          lambda vs: _inner_expr(nodes, src, leaves, vs, xs),
                          name="fused_" + root.op.name)


def _lower_matmul_epilogue(lw, n):
    """A matmul (or conv2d: kind conv_epilogue) followed by elementwise ops: the GEMM,
    then one loop nest for the whole elementwise tail (in place over the output when the
    product has its shape).  None when the group has another form (then it is lowered
    op by op)."""
    inner = n.value
    root = inner.outputs[0]
    head = "conv2d" if n.attrs.get("kind") == "conv_epilogue" else "matmul"
    mms = [m for m in inner.nodes if m.op.name == head]
    rest = [m for m in inner.nodes if not m.is_leaf and m.op.name != head]
    in_ids = {i.id for i in inner.inputs}
    if (len(mms) != 1 or root is mms[0] or any(m.op.name not in SCALAR for m in rest)
            or any(i.id not in in_ids for i in mms[0].inputs)
            or any(m.op.name not in ("input", "constant", "parameter")
                   for m in inner.nodes if m.is_leaf)):
        return None
    mm = mms[0]
    folded = getattr(lw, "folded", {})
    leaves = {}
    for i_in, o_in in zip(inner.inputs, n.inputs):
        if o_in.id in folded:    # a transpose the matmul reads through strides
            folded[i_in.id] = folded[o_in.id]
            continue
        lw.bufs[i_in.id] = lw.buf(o_in)
        leaves[i_in.id] = (lw.buf(o_in), _shape(o_in))
    for m in inner.nodes:
        if m.op.name == "parameter" or (m.op.name == "constant" and m.value.size != 1):
            b = lw.new_buffer(m.dtype, m.value.size, hint="c", temp=False)
            lw.prog.externals.append((b, ("const" if m.op.name == "constant" else "param", m)))
            leaves[m.id] = (b, _shape(m))
    out = lw.buf(n)
    out_shape = _shape(n)
    mshape = _shape(mm)
    if mshape == out_shape and mm.dtype == n.dtype:
        lw.bufs[mm.id] = out          # product into the output, tail in place
    else:
        lw.bufs[mm.id] = lw.new_buffer(mm.dtype, prod(mshape), hint="mm")
    kernels = lower_matmul(lw, mm) if head == "matmul" else LOWER[head](lw, mm)
    leaves[mm.id] = (lw.bufs[mm.id], mshape)
    nodes = [m for m in inner.nodes if m.id in leaves or not m.is_leaf or m.op.name == "constant"]
    bufs = _uniq([out] + [b for b, _ in leaves.values()])
    ost = contiguous_strides(out_shape)

    def body(vs):
        return [Store(out, affine(vs, ost), _inner_expr(nodes, root, leaves, vs, out_shape))]
    shape = out_shape or (1,)
    if not out_shape:
        body_ = lambda vs: [Store(out, idx(0), _inner_expr(nodes, root, leaves, [], ()))]
    else:
        body_ = body
    kernels.append(Kernel("epilogue", bufs, K.loop_nest(shape, body_, outer_kind="parallel"),
                          flops=prod(out_shape) * len(rest)))
    return kernels


def _expand_inner(lw, n):
    """Lower a fused node's inner graph op by op (correct, not fused)."""
    inner = n.value
    folded = getattr(lw, "folded", {})
    for i_in, o_in in zip(inner.inputs, n.inputs):
        if o_in.id in folded:    # a transpose its inner matmuls read through strides
            folded[i_in.id] = folded[o_in.id]
            continue
        lw.bufs[i_in.id] = lw.buf(o_in)
    out_id = inner.outputs[0].id
    for m in inner.nodes:
        if m.id in lw.bufs or m.id in folded:
            continue
        if m.is_leaf:
            b = lw.new_buffer(m.dtype, prod(_shape(m)), hint="c", temp=False)
            lw.prog.externals.append((b, (m.op.name[:5], m)))
            lw.bufs[m.id] = b
            continue
        if m.op.name not in LOWER and m.op.name != "fused":
            raise NotLoweredError(f"the llvm backend cannot lower op {m.op.name} (inside a fused "
                                  f"node) yet; built at {m.loc}")
        if m.op.name in ALIAS_OPS:
            lw.bufs[m.id] = lw.buf(m.inputs[0])
            if m.op.name != "reshape":
                lw.emit(m, LOWER[m.op.name](lw, m))
        else:
            lw.bufs[m.id] = lw.buf(n) if m.id == out_id else lw.new_buffer(m.dtype,
                                                                           prod(_shape(m)))
            lw.emit(m, LOWER[m.op.name](lw, m) if m.op.name in LOWER else lower_fused(lw, m))
    if lw.bufs[out_id] is not lw.buf(n):   # the output is an alias (reshape) or a leaf
        src = lw.bufs[out_id]
        lw.emit(n, [elementwise_kernel("copy", lw.buf(n), (prod(_shape(n)),), [src],
                                       [(prod(_shape(n)),)], lambda xs: xs[0])])
    return []


# ------------------------------------------------------------------ shape ops
@rule("reshape")
def lower_reshape(lw, n):
    # Reshape aliases its input's buffer (handled in Lowerer.run); never called.
    raise AssertionError("reshape is an alias")


@rule("transpose")
def lower_transpose(lw, n):
    x = n.inputs[0]
    perm = n.attrs["perm"]
    in_st = contiguous_strides(_shape(x))
    st = [in_st[p] for p in perm]
    out, src = lw.buf(n), lw.buf(x)
    shape = _shape(n)

    def body(vs):
        return [Store(out, affine(vs, contiguous_strides(shape)), Load(src, affine(vs, st)))]
    kern = Kernel("transpose", [out, src], K.loop_nest(shape, body, outer_kind="parallel"))
    if len(shape) >= 2 and perm[-1] != len(perm) - 1:
        # Reads are strided: tile the last two loops so a tile's rows stay in cache.
        from .schedule import find_loops, tile
        loops = find_loops(kern.body)
        a, b = shape[-2], shape[-1]
        fa = next((f for f in (32, 16, 8) if a % f == 0 and a > f), None)
        fb = next((f for f in (32, 16, 8) if b % f == 0 and b > f), None)
        if fa and fb:
            tile(kern, loops[-2], fa, fb)
    return [kern]


@rule("numel")
def lower_numel(lw, n):
    v = prod(_shape(n.inputs[0])[a] for a in n.attrs["axes"])
    out = lw.buf(n)
    return [Kernel("numel", [out], [Store(out, idx(0), Const(v, n.dtype))])]


# ------------------------------------------------------------------ reductions
def _reduce_axes(n):
    x = n.inputs[0]
    return n.op.axes(x.ndim, n.attrs["axis"])


def _ident(op, dtype):
    if op == "sum" or op == "mean":
        return Const(0, dtype)
    if dtype == BOOL:
        return Const(op == "min", dtype)
    if dtype.kind == "f":
        return Const(-np.inf if op == "max" else np.inf, dtype)
    info = np.iinfo(dtype)
    return Const(info.min if op == "max" else info.max, dtype)


def _combine(op, acc, v):
    if op in ("sum", "mean"):
        return BinOp("add", acc, v, reassoc=True)
    if v.dtype == BOOL:
        return BinOp("or" if op == "max" else "and", acc, v)
    return nan_max(v, acc) if op == "max" else nan_min(v, acc)


@rule("sum", "mean", "max", "min")
def lower_reduce(lw, n):
    x = n.inputs[0]
    xs = _shape(x)
    src = lw.buf(x)
    in_st = contiguous_strides(xs)
    return reduce_kernels(lw, n.op.name, xs, set(_reduce_axes(n)), n.dtype, lw.buf(n), [src],
                          lambda vs: Load(src, affine(vs, in_st)))


def reduce_kernels(lw, op, xs, axes, acc_dt, out, in_bufs, load_at, name=None):
    """Kernels computing out = op over `axes` of load_at(index vars over xs).

    A large reduction to one value is split along axis 0 into a fixed number of
    chunks (partial results in a scratch buffer, then combined in order), so it
    runs in parallel and gives the same result for any thread count."""
    size = prod(xs)
    if xs and len(axes) == len(xs) and size >= 1 << 16:
        chunks = max(d for d in range(1, min(16, xs[0]) + 1) if xs[0] % d == 0)
        if chunks > 1:
            per = xs[0] // chunks
            part = lw.new_buffer(acc_dt, chunks, hint="part")
            c, rl = Var("c"), Var("rl")
            vs = [Var(f"r{d}") for d in range(len(xs))]
            acc = Local(acc_dt, "acc")
            v = load_at([affine([c, rl], [per, 1])] + vs[1:])
            v = v if v.dtype == acc_dt else Cast(v, acc_dt)
            body = [Assign(acc, _combine(op, acc, v))]
            for d in reversed(range(1, len(xs))):
                body = [Loop(vs[d], xs[d], body, "vector" if d == len(xs) - 1 else "serial")]
            body = [Loop(rl, per, body)]
            k1 = Kernel((name or op) + "_chunks", _uniq([part] + list(in_bufs)),
                        [Loop(c, chunks, [Assign(acc, _ident(op, acc_dt))] + body +
                              [Store(part, c, acc)], "parallel")], flops=size)
            acc2, c2 = Local(acc_dt, "acc"), Var("c")
            tot = acc2 if op != "mean" else BinOp("div", acc2, Const(float(size), acc_dt))
            k2 = Kernel(name or op, [out, part],
                        [Assign(acc2, _ident(op, acc_dt)),
                         Loop(c2, chunks, [Assign(acc2, _combine(op, acc2, Load(part, c2)))]),
                         Store(out, idx(0), tot)], flops=chunks)
            return [k1, k2]
    return [reduce_kernel(op, xs, axes, acc_dt, out, in_bufs, load_at, name)]


def reduce_kernel(op, xs, axes, acc_dt, out, in_bufs, load_at, name=None):
    """out = op over `axes` of the elements load_at(index vars over xs) (an Expr)."""
    kept = [d for d in range(len(xs)) if d not in axes]
    kept_shape = [xs[d] for d in kept]
    out_st = contiguous_strides(kept_shape)
    count = prod(xs[d] for d in axes)
    vs = {d: Var(f"r{d}") for d in range(len(xs))}

    def load():
        v = load_at([vs[d] for d in range(len(xs))])
        return v if v.dtype == acc_dt else Cast(v, acc_dt)
    out_idx = affine([vs[d] for d in kept], out_st)
    bufs = _uniq([out] + list(in_bufs))

    def finish(e):
        if op == "mean":
            return BinOp("div", e, Const(float(count), acc_dt))
        return e
    if not xs or (len(xs) - 1) in axes:
        # Reduce the innermost (contiguous) axis: a register accumulator per output.
        acc = Local(acc_dt, "acc")
        body = [Assign(acc, _combine(op, acc, load()))]
        red = sorted(axes)
        for k, d in enumerate(reversed(red)):
            body = [Loop(vs[d], xs[d], body, "vector" if k == 0 else "serial")]
        body = [Assign(acc, _ident(op, acc_dt))] + body + [Store(out, out_idx, finish(acc))]
        for d in reversed(kept):
            body = [Loop(vs[d], xs[d], body, "parallel" if d == kept[0] else "serial")]
        return Kernel(name or op, bufs, body, flops=prod(xs))
    # Innermost axis kept: accumulate into the output rows (unit-stride, vectorizes).
    init = K.loop_nest(kept_shape, lambda v: [Store(out, affine(v, out_st), _ident(op, acc_dt))])
    upd = [Store(out, out_idx, _combine(op, Load(out, out_idx), load()))]
    for d in reversed(range(len(xs))):
        upd = [Loop(vs[d], xs[d], upd, "vector" if d == len(xs) - 1 else "serial")]
    body = init + upd
    if op == "mean":
        body += K.loop_nest(kept_shape, lambda v: [Store(out, affine(v, out_st),
                                                         finish(Load(out, affine(v, out_st))))])
    return Kernel(name or op, bufs, body, flops=prod(xs))


@rule("argmax", "argmin")
def lower_argreduce(lw, n):
    x = n.inputs[0]
    xs = _shape(x)
    axis = n.attrs["axis"]
    src, out = lw.buf(x), lw.buf(n)
    if axis is None:
        xs = (prod(xs),)
        axis = 0
    axis %= max(len(xs), 1)
    outer, size, inner = prod(xs[:axis]), xs[axis], prod(xs[axis + 1:])
    o, r, i = Var("o"), Var("r"), Var("i")
    best, bi = Local(x.dtype, "best"), Local(INDEX, "bi")
    v = Load(src, affine([o, r, i], [size * inner, inner, 1]))
    better = BinOp("gt", v, best) if n.op.name == "argmax" else BinOp("lt", v, best)
    if x.dtype.kind == "f":
        better = BinOp("or", better, BinOp("and", UnOp("isnan", v),
                                           UnOp("not", UnOp("isnan", best))))
    first = Load(src, affine([o, i], [size * inner, 1]))
    body = [Assign(best, first), Assign(bi, idx(0)),
            Loop(r, size, [Assign(bi, Select(better, r, bi)), Assign(best, Select(better, v, best))]),
            Store(out, affine([o, i], [inner, 1]), bi)]
    return [Kernel(n.op.name, [out, src], [Loop(o, outer, [Loop(i, inner, body)], "parallel")])]


# ------------------------------------------------------------------ matmul
@rule("matmul")
def lower_matmul(lw, n):
    a, b = n.inputs
    ash, bsh, osh = _shape(a), _shape(b), _shape(n)
    M, Kd, N = ash[-2], ash[-1], bsh[-1]
    batch = osh[:-2]
    folded = getattr(lw, "folded", {})
    A = lw.buf(folded[a.id]) if a.id in folded else lw.buf(a)
    B = lw.buf(folded[b.id]) if b.id in folded else lw.buf(b)
    C = lw.buf(n)
    dtype = n.dtype
    if A.dtype != dtype or B.dtype != dtype:
        raise NotLoweredError(f"matmul of mixed dtypes {A.dtype}, {B.dtype} (node at {n.loc})")
    a_bst = broadcast_strides(ash[:-2], batch) if batch else []
    b_bst = broadcast_strides(bsh[:-2], batch) if batch else []
    vs = [Var(f"b{k}") for k in range(len(batch))]
    # An operand that is a folded transpose is read from its source, strides swapped.
    ars, acs = (1, M) if a.id in folded else (Kd, 1)
    brs, bcs = (1, Kd) if b.id in folded else (N, 1)
    g = Gemm(M, N, Kd, (A, affine(vs, [s * M * Kd for s in a_bst]), ars, acs),
             (B, affine(vs, [s * Kd * N for s in b_bst]), brs, bcs),
             (C, affine(vs, [s * M * N for s in contiguous_strides(batch)]), N, 1))
    body = [g]
    for k, (v, d) in reversed(list(enumerate(zip(vs, batch)))):
        body = [Loop(v, d, body, "parallel" if k == 0 else "serial")]
    return [Kernel("matmul", _uniq([C, A, B]), body, flops=2 * M * N * Kd * prod(batch))]


from . import lower_nn  # noqa: E402,F401  (registers the nn rules)
from . import lower_index  # noqa: E402,F401  (registers the indexing rules)
from . import lower_loop  # noqa: E402,F401  (registers scan and tuple_get)
from . import lower_fused as _lower_fused_rules  # noqa: E402,F401  (fused reductions with an epilogue)
