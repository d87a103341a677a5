"""Lowering of `scan` (a loop over a sequence axis) and `tuple_get`.

A scan becomes a *loop region* of the program: a run of kernels (the body
graph's kernels, lowered once) that the backend's entry function executes
`length` times, forward or reverse, in native code.  Inside the region:

* per-step slices (x_t, y_t, and the carry saved entering step t) are *view*
  buffers: the backend passes pointer(parent) + t * (slice size) for them, so
  nothing is copied in or out of the stacked arrays;
* captured values (weights) are the outer buffers themselves, read in place;
* each carry lives in the tuple element that holds the final carry: the init
  value is copied there before the loop, the body's new carry is written to a
  scratch buffer and copied back at the end of every step (carries are small).

The body graph is optimized (fusion etc.) before lowering when the backend
passes `lower_graph(graph, optimize_body=...)` (the kernel layer does not import
the graph passes), so its elementwise chains become single kernels.

Lifetimes: the memory planner sees each kernel's buffers only; two empty
"keep" kernels, just before and just after the region, list every buffer that
must live across iterations (outer values the body reads, the stacked
outputs, the carries), so none of them shares bytes with a body temporary.
"""
from __future__ import annotations

from math import prod

from ..ir.errors import NotLoweredError
from ..ir.graph import Graph
from . import ir as K
from .ir import Buffer, Kernel
from .lower import (ALIAS_OPS, LOWER, _foldable_transposes, _shape, elementwise_kernel,
                    lower_fused, rule)


class LoopRegion:
    """Kernels [start, end) of the program run `length` times (t = 0.., or reversed)."""
    __slots__ = ("start", "end", "length", "reverse", "index")

    def __init__(self, start, end, length, reverse, index):
        self.start, self.end, self.length, self.reverse = start, end, int(length), bool(reverse)
        self.index = index

    def __repr__(self):
        return (f"loop{self.index}[kernels {self.start}..{self.end}) x {self.length}"
                f"{' reversed' if self.reverse else ''}")


class View:
    """A view buffer's placement: parent buffer + (base + t_loop * step) elements.
    Holds the view buffer itself too: Program.views is keyed by id(), which must not
    be reused by another buffer while the program lives."""
    __slots__ = ("parent", "loop", "step", "base", "buf")

    def __init__(self, parent, loop, step, base=0, buf=None):
        self.parent, self.loop, self.step, self.base = parent, loop, int(step), int(base)
        self.buf = buf


def _regions(prog) -> list:
    return prog.loops


def view_buffer(lw, parent: Buffer, loop: LoopRegion, step: int, size: int) -> Buffer:
    _regions(lw.prog)
    lw._count += 1
    b = Buffer(f"{parent.name}_t{lw._count}", parent.dtype, size)
    lw.prog.views[id(b)] = View(parent, loop, step, buf=b)
    return b


def _copy(out, src, n):
    return elementwise_kernel("copy", out, (n,), [src], [(n,)], lambda xs: xs[0])


def _users(lw):
    u = getattr(lw, "_scan_users", None)
    if u is None:
        u = lw._scan_users = lw.graph.users()
    return u


@rule("tuple_get")
def lower_tuple_get(lw, n):
    src = n.inputs[0]
    tb = getattr(lw, "tuple_bufs", {}).get(src.id)
    if tb is None:
        raise NotLoweredError(f"tuple_get of a {src.op.name} node is not supported (at {n.loc})")
    lw.bufs[n.id] = tb[n.attrs["index"]]
    return []


@rule("scan")
def lower_scan(lw, n):
    if not getattr(lw, "native_loops", False):
        raise NotLoweredError(f"this backend cannot run loops (scan) yet; the loop was built "
                              f"at {n.loc}")
    a = n.attrs
    nc, nx = a["n_carry"], a["n_x"]
    types = n.type.types
    ny = len(types) - 2 * nc
    ins = n.inputs
    init, xs, caps = ins[:nc], ins[nc:nc + nx], ins[nc + nx:]
    T = int(_shape(xs[0])[0]) if xs else int(a["length"])
    if T <= 0:
        raise NotLoweredError(f"scan over an empty sequence (at {n.loc})")
    used = {u.attrs["index"] for u in _users(lw).get(n.id, []) if u.op.name == "tuple_get"}
    out_ids = {o.id for o in lw.graph.outputs}
    if n.id in out_ids:
        raise NotLoweredError(f"a loop node cannot be a graph output itself (at {n.loc})")
    # Tuple elements: final carries (also the live carries), stacked ys, stacked saved carries.
    tb = [lw.new_buffer(t.dtype, prod(int(d) for d in t.shape), hint="scan") for t in types]
    if not hasattr(lw, "tuple_bufs"):
        lw.tuple_bufs = {}
    lw.tuple_bufs[n.id] = tb
    carry_sizes = [prod(_shape(c)) for c in init]
    for k in range(nc):
        lw.emit(n, [_copy(tb[k], lw.buf(init[k]), carry_sizes[k])])

    body = Graph(a["body"].outputs, a["body"].inputs)
    if getattr(lw, "optimize_body", None) is not None:   # the backend's optimizer (fusion)
        body = lw.optimize_body(body)
    regions = _regions(lw.prog)
    region = LoopRegion(len(lw.prog.kernels), None, T, a["reverse"], len(regions))
    regions.append(region)
    start = len(lw.prog.kernels)
    sub = _BodyLowerer(lw, body)
    bind = {}
    for k in range(nc):
        bind[body.inputs[k].id] = tb[k]
    for j, x in enumerate(xs):
        step = prod(_shape(x)[1:])
        bind[body.inputs[nc + j].id] = view_buffer(lw, lw.buf(x), region, step, step)
    for j, c in enumerate(caps):
        bind[body.inputs[nc + nx + j].id] = lw.buf(c)
    # Save the carries entering this step (for BPTT) if anyone reads them.
    for k in range(nc):
        if nc + ny + k in used:
            v = view_buffer(lw, tb[nc + ny + k], region, carry_sizes[k], carry_sizes[k])
            lw.emit(n, [_copy(v, tb[k], carry_sizes[k])])
    # Where the body's results go.
    targets = []     # (body output node, destination buffer)
    new_carry = []
    y_views = []
    for j in range(ny):
        step = prod(_shape(body.outputs[nc + j]))
        y_views.append(view_buffer(lw, tb[nc + j], region, step, step))
    for k in range(nc):
        o = body.outputs[k]
        j = next((j for j in range(ny) if body.outputs[nc + j] is o), None)
        if j is not None:
            # The new carry is also y_t (an RNN's h): written once, into y's slot;
            # the carry is copied from there at the end of the step.
            new_carry.append(y_views[j])
            continue
        mm = _accumulating_gemm(body, k)
        if mm is not None:
            # carry' = carry + A @ B, the carry read nowhere else: a GEMM accumulating
            # into the carry in place (a gradient summed over the steps).
            sub.accumulate[body.outputs[k].id] = (mm, tb[k])
            new_carry.append(None)
            targets.append((body.outputs[k], tb[k]))
            continue
        nb = lw.new_buffer(body.outputs[k].dtype, carry_sizes[k], hint="nc")
        new_carry.append(nb)
        targets.append((body.outputs[k], nb))
    for j in range(ny):
        targets.append((body.outputs[nc + j], y_views[j]))
    sub.lower(bind, targets)
    for k in range(nc):
        if new_carry[k] is not None:
            lw.emit(n, [_copy(tb[k], new_carry[k], carry_sizes[k])])
    region.end = len(lw.prog.kernels)
    # Keep-alive markers around the region (see the module docstring).
    views = lw.prog.views
    keep, seen = [], set()
    for kern in lw.prog.kernels[start:region.end]:
        for b in kern.buffers:
            while id(b) in views:
                b = views[id(b)].parent
            if id(b) in seen:
                continue
            seen.add(id(b))
            inner = id(b) in sub.created and b not in tb[:nc]
            if not inner:
                keep.append(b)
    tag = f"loop{region.index}_begin_T{T}" + ("_reverse" if a["reverse"] else "")
    lw.prog.kernels.insert(start, Kernel(tag, keep, []))
    lw.prog.kernel_nodes.insert(start, n)
    for r in regions:
        if r is not region and r.start >= start:   # regions nested inside this one
            r.start += 1
            r.end += 1
    region.start, region.end = start + 1, region.end + 1
    lw.emit(n, [Kernel(f"loop{region.index}_end", keep, [])])
    return []


def _accumulating_gemm(body, k):
    """The inner matmul if body output k is a fused `carry_k + matmul(a, b)` (2-D, same
    shape) and carry k is read by nothing else; else None."""
    o, ph = body.outputs[k], body.inputs[k]
    if o.op.name != "fused" or o.attrs.get("kind") != "matmul_epilogue" or o.value is None:
        return None
    if sum(1 for x in body.outputs if x is o) != 1 or sum(1 for i in o.inputs if i is ph) != 1:
        return None
    if len(body.users().get(ph.id, [])) != 1:
        return None
    inner = o.value
    root = inner.outputs[0]
    if root.op.name != "add" or len(inner.nodes) != len(inner.inputs) + 2:
        return None     # exactly: the inputs, one matmul, the add
    for mm, other in (root.inputs, root.inputs[::-1]):
        if mm.op.name != "matmul" or mm.ndim != 2 or other.op.name != "input":
            continue
        pos = [j for j, i_in in enumerate(inner.inputs) if i_in is other]
        if (len(pos) == 1 and o.inputs[pos[0]] is ph and all(i is not other for i in mm.inputs)
                and tuple(mm.shape) == tuple(root.shape) == tuple(other.shape)
                and mm.dtype == root.dtype):
            return mm
    return None


def _lower_accumulating(lw, m, mm, acc):
    inner = m.value
    folded = lw.folded
    for i_in, o_in in zip(inner.inputs, m.inputs):
        if o_in.id in folded:
            folded[i_in.id] = folded[o_in.id]
            continue
        lw.bufs[i_in.id] = lw.buf(o_in)
    lw.bufs[mm.id] = acc
    ks = LOWER["matmul"](lw, mm)
    (kern,) = ks
    (g,) = kern.body
    assert isinstance(g, K.Gemm)
    g.accumulate = True
    return ks


class _BodyLowerer:
    """Lowers a loop body's nodes into the enclosing program (shared buffers/kernels)."""

    def __init__(self, lw, body):
        self.lw, self.graph = lw, body
        self.created = set()
        self.accumulate = {}   # body node id -> (inner matmul, carry buffer): see lower_scan

    def lower(self, bind, targets):
        lw, body = self.lw, self.graph
        saved_bufs, saved_folded, saved_graph = lw.bufs, getattr(lw, "folded", {}), lw.graph
        saved_users = getattr(lw, "_scan_users", None)
        lw.bufs = dict(bind)
        lw.graph = body
        lw._scan_users = None
        lw.folded = _foldable_transposes(body)
        shadow = lw.__dict__.get("new_buffer")   # a wrapper of an enclosing loop body
        orig_new = lw.new_buffer
        created = self.created

        def new_buffer(*args, **kw):
            b = orig_new(*args, **kw)
            created.add(id(b))
            return b
        lw.new_buffer = new_buffer
        try:
            dest = {}
            for o, buf in targets:
                if o.id in bind or o.is_leaf or o.op.name in ("reshape", "tuple_get", "scan") \
                        or o.id in dest or o.id in lw.folded:
                    continue
                dest[o.id] = buf
            for m in body.nodes:
                if m.id in lw.bufs or m.id in lw.folded:
                    continue
                name = m.op.name
                if m.is_leaf:
                    if name == "input":
                        raise NotLoweredError(f"loop body input {m.label()} is not bound")
                    b = lw.new_buffer(m.dtype, prod(_shape(m)), hint="c", temp=False)
                    lw.prog.externals.append((b, (name[:5], m)))
                    lw.bufs[m.id] = b
                    continue
                if name == "reshape" or (name in ALIAS_OPS and m.id not in dest):
                    lw.bufs[m.id] = lw.buf(m.inputs[0])
                    if name != "reshape":
                        lw.emit(m, LOWER[name](lw, m))
                    continue
                if name in ("scan", "tuple_get"):
                    lw.emit(m, LOWER[name](lw, m))
                    continue
                if m.id in self.accumulate:
                    mm, acc = self.accumulate[m.id]
                    lw.bufs[m.id] = acc
                    lw.emit(m, _lower_accumulating(lw, m, mm, acc))
                    continue
                if name not in LOWER and name != "fused":
                    raise NotLoweredError(f"the llvm backend cannot lower op {name} (inside a "
                                          f"loop body) yet; built at {m.loc}")
                lw.bufs[m.id] = dest.get(m.id) or lw.new_buffer(m.dtype, prod(_shape(m)),
                                                                hint="v")
                lw.emit(m, LOWER[name](lw, m) if name in LOWER else lower_fused(lw, m))
            for o, buf in targets:
                src = lw.buf(o)
                if src is not buf:
                    size = prod(_shape(o))
                    lw.emit(o, [_copy(buf, src, size)])
        finally:
            lw.bufs, lw.folded, lw.graph = saved_bufs, saved_folded, saved_graph
            lw._scan_users = saved_users
            if shadow is None:
                del lw.new_buffer
            else:
                lw.new_buffer = shadow


# ------------------------------------------------------------------ BPTT residuals
def share_residuals(graph):
    """Let backward loops read what their forward loop already computed.

    The BPTT scan that autodiff builds re-derives each forward step from the saved
    carry, so its body recomputes e.g. ``h_{t-1} @ W.T + b + xp_t`` (a GEMM per step)
    that the forward body computed too.  For a scan B whose sequence inputs include
    the saved carries of a scan F, B's body nodes that equal F's body nodes (same
    ops over the same carries, sequence slices and captured values) and contain a
    matmul are taken from F instead: F stacks them as extra per-step outputs (or
    they already are its outputs) and B reads them as extra sequence inputs.
    Returns a new graph (or `graph` when nothing is shared)."""
    done = set()
    while True:
        pair = _find_pair(graph, done)
        if pair is None:
            return graph
        graph = _share(graph, *pair, done)


def _find_pair(graph, done):
    for n in graph.nodes:
        if n.op.name != "scan" or n.id in done:
            continue
        a = n.attrs
        xs = n.inputs[a["n_carry"]:a["n_carry"] + a["n_x"]]
        fs = set()
        for x in xs:
            if x.op.name == "tuple_get" and x.inputs[0].op.name == "scan":
                f = x.inputs[0]
                fa = f.attrs
                n_y = len(f.type.types) - 2 * fa["n_carry"]
                if x.attrs["index"] >= fa["n_carry"] + n_y:
                    fs.add(f)
        if len(fs) == 1:
            return fs.pop(), n
        done.add(n.id)
    return None


def _keys(body, ph_keys, intern):
    """{node id: int} structural keys of body nodes (equal keys: equal values)."""
    import numpy as np
    keys = {}
    for m in body.nodes:
        if m.id in ph_keys:
            k = ph_keys[m.id]
        elif m.op.name == "constant" and np.asarray(m.value).size <= 64:
            v = np.asarray(m.value)
            k = ("const", v.dtype.str, v.shape, v.tobytes())
        elif m.is_leaf or any(isinstance(v, Graph) for v in m.attrs.values()):
            k = ("node", m.id)
        else:
            try:
                attrs = tuple(sorted(m.attrs.items()))
                hash(attrs)
            except TypeError:
                k = ("node", m.id)
            else:
                k = (m.op.name, attrs, str(m.type), tuple(keys[i.id] for i in m.inputs))
        keys[m.id] = intern.setdefault(k, len(intern))
    return keys


def _share(graph, F, B, done):
    from ..ops.base import REGISTRY, apply
    from ..ir.node import Node
    fa, ba = F.attrs, B.attrs
    fnc, fnx = fa["n_carry"], fa["n_x"]
    fny = len(F.type.types) - 2 * fnc
    bnc, bnx = ba["n_carry"], ba["n_x"]
    fb, bb = fa["body"], ba["body"]
    intern = {}
    fph = {}
    for k, p in enumerate(fb.inputs):
        if k < fnc:
            fph[p.id] = ("carry", k)
        elif k < fnc + fnx:
            fph[p.id] = ("x", F.inputs[k].id)
        else:
            fph[p.id] = ("cap", F.inputs[k].id)
    bph = {}
    for k, p in enumerate(bb.inputs):
        src = B.inputs[k]
        if k < bnc:
            bph[p.id] = ("bcarry", k)
        elif k < bnc + bnx:
            if (src.op.name == "tuple_get" and src.inputs[0] is F
                    and src.attrs["index"] >= fnc + fny):
                bph[p.id] = ("carry", src.attrs["index"] - fnc - fny)
            else:
                bph[p.id] = ("x", src.id)
        else:
            bph[p.id] = ("cap", src.id)
    fk = _keys(fb, fph, intern)
    bk = _keys(bb, bph, intern)
    fnode = {}
    for m in fb.nodes:
        fnode.setdefault(fk[m.id], m)
    matched = {m.id for m in bb.nodes if bk[m.id] in fnode and not m.is_leaf}
    has_mm = {}
    for m in bb.nodes:
        has_mm[m.id] = m.id in matched and (
            m.op.name == "matmul" or any(has_mm.get(i.id, False) for i in m.inputs))
    users = bb.users()
    b_outs = {o.id for o in bb.outputs}
    frontier = [m for m in bb.nodes if has_mm[m.id] and (
        m.id in b_outs or any(u.id not in matched for u in users.get(m.id, [])))]
    done.add(B.id)
    if not frontier:
        return graph
    # F's per-step values for the frontier: existing outputs or new stacked ones.
    f_ys = list(fb.outputs[fnc:])
    extra = []
    src_index = []
    for m in frontier:
        f = fnode[bk[m.id]]
        j = next((j for j, y in enumerate(f_ys) if y is f), None)
        if j is None:
            j = len(f_ys)
            f_ys.append(f)
            extra.append(f)
        src_index.append(fnc + j)
    E = len(extra)
    if E:
        new_fb = Graph(list(fb.outputs) + extra, fb.inputs)
        F2 = apply("scan", list(F.inputs), body=new_fb, n_carry=fnc, n_x=fnx,
                   reverse=fa["reverse"], length=fa["length"], body_id=fa["body_id"])
    else:
        F2 = F
    remap = {}
    for n in graph.nodes:
        if n.op.name == "tuple_get" and n.inputs[0] is F and F2 is not F:
            i = n.attrs["index"]
            remap[n.id] = apply("tuple_get", [F2], index=i if i < fnc + fny else i + E)
    stacked = [apply("tuple_get", [F2], index=i) for i in src_index]
    phs = []
    for k, m in enumerate(frontier):
        ph = Node(REGISTRY["input"], (), {}, m.type, name=f"residual{k}_t")
        phs.append(ph)
    new_bb = Graph(bb.outputs, [])
    new_bb.replace_all({m.id: ph for m, ph in zip(frontier, phs)})
    new_bb = Graph(new_bb.outputs, list(bb.inputs[:bnc + bnx]) + phs + list(bb.inputs[bnc + bnx:]))
    # First re-point every reader of F's results (B's inputs may depend on them
    # indirectly, e.g. the cotangent of y*y reads y), then swap B for the new loop.
    g = Graph(graph.outputs, graph.inputs)
    g.replace_all(remap)
    Bn = next(m for m in g.nodes if m.op.name == "scan" and m.attrs["body"] is bb)
    b_in = list(Bn.inputs)
    B2 = apply("scan", b_in[:bnc + bnx] + stacked + b_in[bnc + bnx:], body=new_bb,
               n_carry=bnc, n_x=bnx + len(frontier), reverse=ba["reverse"],
               length=ba["length"], body_id=ba["body_id"])
    done.add(B2.id)
    g.replace_all({Bn.id: B2})
    return g
