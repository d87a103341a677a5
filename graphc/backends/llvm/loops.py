"""Native time loops in the entry function (programs with loop regions).

graphc/kernel/lower_loop.py lowers a `scan` to a region of kernels that runs
`length` times, plus *view* buffers addressed at parent + t * step.  Here the
entry function gets a counted loop over t around each region (t running down
for a reversed loop) and passes each view as base pointer + t_eff * stride
bytes, so the loop costs one pointer add per view per step; the kernels
inside (and the GEMMs in them) are the ordinary ones.

Threads: every thread runs the same loop; kernels worth sharing (SPMD) are
called by all threads and end with a barrier, the others run on thread 0.
A barrier is added where a shared kernel follows thread-0 work, including
across the loop's back edge.
"""
from __future__ import annotations

from llvmlite import ir

from ...kernel import ir as K
from .codegen import I64


def loop_calls(prog, slot_of, offsets, n_ext) -> list:
    """Per kernel, per buffer: (table slot, byte offset, ((loop index, bytes per t), ...))."""
    views = prog.views
    mark_prepacked(prog)

    def place(b):
        steps = []
        off = 0
        while id(b) in views:
            v = views[id(b)]
            size = b.dtype.itemsize
            steps.append((v.loop.index, v.step * size))
            off += v.base * size
            b = v.parent
        if id(b) in slot_of:
            return slot_of[id(b)], off, tuple(steps)
        return n_ext, offsets[id(b)] + off, tuple(steps)
    return [[place(b) for b in kern.buffers] for kern in prog.kernels]


def _written(body, out):
    for s in body:
        if isinstance(s, K.Store):
            out.add(id(s.buf))
        elif isinstance(s, K.Gemm):
            out.add(id(s.c[0]))
        elif isinstance(s, (K.Loop, K.If)):
            _written(s.body, out)
    return out


def mark_prepacked(prog):
    """Mark the top-level GEMMs inside loops whose B operand no kernel of the loop writes
    (a recurrent weight): gemm.py packs such a B once per loop run instead of every step.

    Kernels with the same structure share one function (runtime._structure_key), so a
    GEMM is marked only if every kernel of its structure is such a loop GEMM; its panels
    are tagged with B's address, and every loop start clears the tags."""
    from .gemm import _PREPACK
    from .runtime import _structure_key
    _PREPACK.clear()
    views = prog.views

    def root(b):
        while id(b) in views:
            b = views[id(b)].parent
        return id(b)
    inner = {}          # kernel index -> its innermost loop region
    for r in prog.loops:
        for k in range(r.start, r.end):
            if k not in inner or inner[k].end - inner[k].start > r.end - r.start:
                inner[k] = r
    written = {}
    ok, groups = {}, {}
    for k, kern in enumerate(prog.kernels):
        if not kern.body:
            continue
        gemms = [s for s in kern.body if isinstance(s, K.Gemm)]
        if not gemms:
            continue
        key = _structure_key(kern)
        groups.setdefault(key, []).append(k)
        r = inner.get(k)
        good = []
        if r is not None:
            if r.index not in written:
                w = set()
                for kk in range(r.start, r.end):
                    _written(prog.kernels[kk].body, w)
                written[r.index] = {root(b) for kk in range(r.start, r.end)
                                    for b in prog.kernels[kk].buffers if id(b) in w}
            for g in gemms:
                bb = g.b[0]
                if id(bb) not in views and root(bb) not in written[r.index] \
                        and g.b[0] is not g.c[0] and g.b[0] is not g.a[0]:
                    good.append(g)
        ok[k] = (len(good) == len(gemms), good)
    for key, ks in groups.items():
        if all(ok[k][0] for k in ks):
            for k in ks:
                for g in ok[k][1]:
                    _PREPACK[id(g)] = (g,)


def loop_entry(mb, fns, calls, spmd, n_ext, nthreads, profile, prog):
    from .runtime import entry_prologue
    b, tid, slots, err, bar, prof, barrier, rc, nt, is_main = entry_prologue(
        mb, n_ext, nthreads, profile)
    fn = b.function
    c = lambda v: ir.Constant(I64, v)
    starts = {}
    for r in prog.loops:
        starts.setdefault(r.start, []).append(r)
    tvals = {}
    state = {"dirty": False}

    def call(k):
        kfn, args, par = fns[k], calls[k], spmd[k]
        if not prog.kernels[k].body:
            return        # a lifetime marker
        ptrs = []
        for s, off, steps in args:
            p = slots[s]
            byte = c(off) if off or s == n_ext else None
            for li, stride in steps:
                term = b.mul(tvals[li], c(stride))
                byte = term if byte is None else b.add(byte, term)
            if byte is not None:
                p = b.gep(p, [byte], source_etype=ir.IntType(8))
            ptrs.append(p)
        if par and state["dirty"]:
            b.call(barrier, [bar, nt])
            state["dirty"] = False
        if mb.stress is not None:
            mb.stress.delay(b, k, tid, 0)
        t0 = b.call(rc, []) if profile else None
        if par:
            b.call(kfn, ptrs + [tid, nt])
            b.call(barrier, [bar, nt])
        else:
            with b.if_then(is_main):
                b.call(kfn, ptrs + [c(0), c(1)])
            state["dirty"] = True
        if profile:
            with b.if_then(is_main):
                slot = b.gep(prof, [c(k)], source_etype=I64)
                b.store(b.add(b.load(slot, typ=I64), b.sub(b.call(rc, []), t0)), slot)
        if mb.error_fn is not None:
            flag = b.load(err, typ=I64)
            with b.if_then(b.icmp_unsigned("!=", flag, c(0)), likely=False):
                b.ret_void()

    def emit_range(lo, hi):
        k = lo
        while k < hi:
            inner = [r for r in starts.get(k, []) if r.end <= hi and r.index not in tvals]
            if inner:
                r = max(inner, key=lambda r: r.end)     # the outermost region starting here
                emit_loop(r)
                k = r.end
            else:
                call(k)
                k += 1

    def emit_loop(r):
        shared = nthreads > 1 and any(spmd[r.start:r.end])
        if shared and state["dirty"]:
            b.call(barrier, [bar, nt])
            state["dirty"] = False
        for tag in getattr(mb, "prepack_tags", ()):
            # Loop-invariant B panels (gemm.py) are repacked in each run of a loop.
            b.store(c(0), b.gep(tag, [c(0), b.mul(tid, c(8))], inbounds=True))
        pre = b.block
        head = fn.append_basic_block(f"loop{r.index}.head")
        body = fn.append_basic_block(f"loop{r.index}.body")
        done = fn.append_basic_block(f"loop{r.index}.done")
        b.branch(head)
        b.position_at_end(head)
        t = b.phi(I64, name=f"t{r.index}")
        t.add_incoming(c(0), pre)
        b.cbranch(b.icmp_signed("<", t, c(r.length)), body, done)
        b.position_at_end(body)
        tvals[r.index] = b.sub(c(r.length - 1), t) if r.reverse else t
        emit_range(r.start, r.end)
        if shared and state["dirty"]:
            # The next step's first shared kernel must see thread 0's writes.
            b.call(barrier, [bar, nt])
            state["dirty"] = False
        t.add_incoming(b.add(t, c(1)), b.block)
        b.branch(head)
        b.position_at_end(done)
        del tvals[r.index]
        if not shared and any(prog.kernels[k].body for k in range(r.start, r.end)):
            state["dirty"] = True

    emit_range(0, len(prog.kernels))
    b.ret_void()
