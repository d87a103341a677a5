"""Matrix multiply for the LLVM backend: packed operands and a register-blocked
micro-kernel with vector FMA (the BLIS scheme).

    for jc in N by NC:                 pack B[pc:pc+KC, jc:jc+NC] into NR-wide panels
      for pc in K by KC:
        for ic in M by MC:             pack A[ic:ic+MC, pc:pc+KC] into MR-tall panels
          for jr, ir:                  MR x NR block of C in registers:
            for p in KC:               MR*NR/VW vector FMAs per step
              acc[r][v] += A[r, p] * B[p, v*VW:(v+1)*VW]

Packing copies any strided view (transposed operands included) into
unit-stride panels, zero-padded at the edges, so the micro-kernel never
branches; edge tiles of C go through a small stack tile and a scalar copy.
Workspace lives in one module-level buffer per dtype (a compiled function
runs one call at a time; see Runner), one slice per thread at a stride shared
by every GEMM of the module (see `workspace`).  Small products use the kernel
IR's reference loop nest instead.
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from .codegen import I64, PTR, reg_type

KC, MC, NC = 256, 144, 2048


MR = 6     # rows of the micro-kernel (params)


def params(dtype, avx512):
    vw = (16 if dtype.itemsize == 4 else 8) if avx512 else (8 if dtype.itemsize == 4 else 4)
    return dict(VW=vw, MR=MR, NV=2)     # 6 x 2 vectors: 12 accumulators + 2 B + 1 A


@contextmanager
def counted_loop(b, fn, start, stop, step=1, name="l"):
    """for i in range(start, stop, step) with i64 bounds (llvm values or ints)."""
    c = lambda v: ir.Constant(I64, v) if isinstance(v, int) else v
    pre = b.block
    head = fn.append_basic_block(name + ".head")
    body = fn.append_basic_block(name + ".body")
    done = fn.append_basic_block(name + ".done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name=name)
    i.add_incoming(c(start), pre)
    b.cbranch(b.icmp_signed("<", i, c(stop)), body, done)
    b.position_at_end(body)
    yield i
    nxt = b.add(i, c(step), flags=("nsw",))
    i.add_incoming(nxt, b.block)
    b.branch(head)
    b.position_at_end(done)


def workspace(mb, dtype, per_thread):
    """The module's scratch buffer for `dtype` and the global holding its per-thread
    stride, grown so that every thread's slice holds at least `per_thread` elements.

    Thread t's slice starts at t * stride, one stride for every GEMM site of the
    module (the largest slice any site asks for).  It must not be a per-site size:
    kernels between two barriers run concurrently on different threads (see
    runtime._entry), so thread 1 can be packing in one site while thread 0 still
    packs in another, and with per-site strides thread 1's slice of a small
    product (1 * its size) started inside thread 0's slice of a larger one.  The
    stride is an internal constant, so the optimizer folds it into each site."""
    ws = getattr(mb, "gemm_ws", None)
    if ws is None:
        ws = mb.gemm_ws = {}
    key = dtype.name
    if key not in ws:
        gv = ir.GlobalVariable(mb.module, ir.ArrayType(reg_type(dtype), 0),
                               name=f"graphc_ws_{key}")
        gv.linkage = "internal"
        gv.align = 64
        stride = ir.GlobalVariable(mb.module, I64, name=f"graphc_ws_stride_{key}")
        stride.linkage = "internal"
        stride.global_constant = True
        ws[key] = (gv, stride, [0])
    gv, stride, size = ws[key]
    if per_thread > size[0]:
        size[0] = per_thread
        stride.initializer = ir.Constant(I64, per_thread)
        gv.value_type = ir.ArrayType(reg_type(dtype), per_thread * mb.nthreads)
        gv.initializer = ir.Constant(gv.value_type, None)
    return gv, stride


def emit_gemm(em, g):
    dtype = g.c[0].dtype
    # Tiny products, and short reductions (K < 16: packing would cost more than the
    # FMAs), use the plain loop nest, whose inner loop LLVM vectorizes over C's row.
    small = (g.M * g.N * g.K < 32 * 32 * 32 or g.N < 8 or g.M < 4 or g.K < 16
             or dtype.kind != "f"
             # few rows times a transposed matrix with few columns (a conv's
             # grad-weight for few channels): dot products beat packing B, a gather
             or (g.dot_rows() and g.N < 64))
    split = em.mb.gemm_split if em.depth == 0 and em.mb.nthreads > 1 else {}  # racecheck
    if small or any(op[0].dtype != dtype for op in (g.a, g.b)):
        split[id(g)] = ("loops", None) if g.dot_rows() else ("tid0", None)
        if em.depth == 0 and em.mb.nthreads > 1 and not g.dot_rows():
            # A top-level GEMM is shared out among threads; this small one runs on one
            # (dot products: their parallel j loop is shared out).
            with em.b.if_then(em.b.icmp_signed("==", em.tid, ir.Constant(I64, 0))):
                em.stmts(g.as_loops())
        else:
            em.stmts(g.as_loops())
        return
    fn, nr, kc, mc, nc = gemm_function(em.mb, dtype)
    # This call's workspace slice per thread: the A panels (MC x KC, fixed: the
    # function addresses B's panels after them) and the B panels of one band of at most
    # NC columns by KC rows, sized to this product, so small GEMMs keep small scratch.
    ws_elems = mc * kc + -(-min(g.N, nc) // nr) * nr * min(g.K, kc)
    ws_elems = -(-ws_elems // 16) * 16
    ws, stride = workspace(em.mb, dtype, ws_elems)
    # (for racecheck: which scratch this kernel uses, how much, at which thread stride)
    em.mb.gemm_sites.setdefault(em.fn.name, []).append((ws, ws_elems, stride))
    b = em.b
    c = lambda v: ir.Constant(I64, v)
    offs = [em.expr(op[1]) for op in (g.a, g.b, g.c)]
    n_cols = c(g.N)
    m_rows = c(g.M)
    if em.depth == 0 and em.mb.nthreads > 1:
        nth = em.mb.nthreads
        if -(-g.N // nr) < 2 * nth and g.M >= 4 * MR * nth:
            # Few columns, many rows (a late ResNet conv at batch 1: N = 49 pixels,
            # M = 512..2048 channels): each thread computes a band of C's rows
            # (MR-aligned); column bands would leave threads without a whole one.
            # Every element is still summed in the same order whatever the thread
            # count.
            lo, hi = em.chunk(g.M, align=MR)
            split[id(g)] = ("M", MR)
            m_rows = b.sub(hi, lo)
            offs[0] = b.add(offs[0], b.mul(lo, c(g.a[2])))
            offs[2] = b.add(offs[2], b.mul(lo, c(g.c[2])))
        else:
            # A top-level GEMM: each thread computes a band of C's columns (NR-aligned,
            # so every element is summed in the same order whatever the thread count).
            lo, hi = em.chunk(g.N, align=nr)
            split[id(g)] = ("N", nr)
            n_cols = b.sub(hi, lo)
            offs[1] = b.add(offs[1], b.mul(lo, c(g.b[3])))
            offs[2] = b.add(offs[2], b.mul(lo, c(g.c[3])))
    wsp = b.gep(ws, [c(0), b.mul(em.tid, b.load(stride, typ=I64))], inbounds=True)
    args = []
    for (buf, _, rs, cs), off in zip((g.a, g.b, g.c), offs):
        args += [em.ptr[id(buf)], off, c(rs), c(cs)]
    args += [m_rows, n_cols, c(g.K)]
    args.append(ir.Constant(ir.IntType(1), int(g.accumulate)))
    args.append(wsp)
    i1 = ir.IntType(1)
    mark = _PREPACK.get(id(g))
    nr_cols = -(-g.N // nr) * nr
    per = nr_cols * g.K
    nth = em.mb.nthreads
    if mark is not None and mark[0] is g and em.depth == 0 \
            and per * nth * dtype.itemsize <= PREPACK_MAX_BYTES:
        # B is loop-invariant (see mark_prepacked): pack it once per loop run into this
        # site's persistent panels; the tag (B's address and band width per thread) says
        # whether the panels hold it.  Loop starts clear the tags (loops.py).
        k = len(getattr(em.mb, "prepack_tags", ()))
        if not hasattr(em.mb, "prepack_tags"):
            em.mb.prepack_tags = []
        ft = reg_type(dtype)
        pk = ir.GlobalVariable(em.mb.module, ir.ArrayType(ft, per * nth),
                               name=f"graphc_bpk{k}")
        pk.linkage = "internal"
        pk.initializer = ir.Constant(ir.ArrayType(ft, per * nth), None)
        pk.align = 64
        tag = ir.GlobalVariable(em.mb.module, ir.ArrayType(I64, 8 * nth), name=f"graphc_btag{k}")
        tag.linkage = "internal"
        tag.initializer = ir.Constant(ir.ArrayType(I64, 8 * nth), None)
        tag.align = 64
        em.mb.prepack_tags.append(tag)
        bptr = b.ptrtoint(b.gep(em.ptr[id(g.b[0])], [offs[1]], source_etype=ft), I64)
        t0 = b.gep(tag, [c(0), b.mul(em.tid, c(8))], inbounds=True)
        t1 = b.gep(tag, [c(0), b.add(b.mul(em.tid, c(8)), c(1))], inbounds=True)
        same = b.and_(b.icmp_unsigned("==", b.load(t0, typ=I64), bptr),
                      b.icmp_unsigned("==", b.load(t1, typ=I64), n_cols))
        b.store(bptr, t0)
        b.store(n_cols, t1)
        args.append(b.gep(pk, [c(0), b.mul(em.tid, c(per))], inbounds=True))
        args += [ir.Constant(i1, 1), b.not_(same)]
    else:
        args += [wsp, ir.Constant(i1, 0), ir.Constant(i1, 1)]
    b.call(fn, args)


# Gemm statements whose B operand does not change while their loop runs: id -> (gemm,).
# Filled by loops.mark_prepacked just before the kernels are emitted (the Gemm object
# is held so its id cannot be reused by another while the entry exists).
_PREPACK = {}
PREPACK_MAX_BYTES = 32 << 20    # panels of one site, all threads (a static buffer)


def gemm_function(mb, dtype):
    """The module's shared gemm for `dtype` (one copy keeps compile time down)."""
    fns = getattr(mb, "gemm_fns", None)
    if fns is None:
        fns = mb.gemm_fns = {}
    if dtype.name not in fns:
        from .runtime import _target
        em = GemmEmitter(mb, dtype, params(dtype, _target()["avx512"]))
        fn = em.build()
        fns[dtype.name] = (fn, em.NR, em.kc, em.mc, em.nc)
    return fns[dtype.name]


class GemmEmitter:
    def __init__(self, mb, dtype, p):
        self.mb = mb
        self.dtype = dtype
        self.ft = reg_type(self.dtype)
        self.VW, self.MR, self.NV = p["VW"], p["MR"], p["NV"]
        self.NR = self.VW * self.NV
        self.vt = ir.VectorType(self.ft, self.VW)
        self.kc, self.mc, self.nc = KC, MC, NC

    def c64(self, v):
        return ir.Constant(I64, v)

    def gep(self, base, i):
        return self.b.gep(base, [i], inbounds=True, source_etype=self.ft)

    def _vptr(self, ptr):
        if getattr(ptr.type, "is_opaque", True):
            return ptr
        return self.b.bitcast(ptr, self.vt.as_pointer())

    def vload(self, ptr, align):
        return self.b.load(self._vptr(ptr), typ=self.vt, align=align)

    def vstore(self, val, ptr, align):
        self.b.store(val, self._vptr(ptr), align=align)

    def build(self):
        mb = self.mb
        fnty = ir.FunctionType(ir.VoidType(), [PTR, I64, I64, I64] * 3 + [I64] * 3 +
                               [ir.IntType(1), reg_type(self.dtype).as_pointer()] +
                               [reg_type(self.dtype).as_pointer(), ir.IntType(1),
                                ir.IntType(1)])
        fn = ir.Function(mb.module, fnty, name=f"graphc_gemm_{self.dtype.name}")
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        fn.attributes.add("nounwind")
        for k in (0, 4, 8):
            fn.args[k].add_attribute("noalias")
        self.fn = fn
        entry = fn.append_basic_block("entry")
        self.b = b = ir.IRBuilder(entry)
        (self.A, self.Ab, self.ars, self.acs, self.B, self.Bb, self.brs, self.bcs,
         self.C, self.Cb, self.crs, self.ccs, M, N, K, accumulate, ws, bpk, use_pk,
         do_pack) = fn.args
        # The caller's workspace slice (a typed float*: see vload/vstore).  With use_pk,
        # B's panels live in bpk instead (all of B, block (jc, pc) at jc*K + pc*nb_r),
        # packed by this call only when do_pack (a loop-invariant B packed once).
        self.Ap = ws
        bp_ws = b.gep(ws, [self.c64(self.mc * self.kc)], inbounds=True)
        self.tile = b.alloca(ir.ArrayType(self.ft, self.MR * self.NR))
        with counted_loop(b, fn, 0, N, self.nc, "jc") as jc:
            with counted_loop(b, fn, 0, K, self.kc, "pc") as pc:
                nb = b.sub(self.imin(N, b.add(jc, self.c64(self.nc))), jc)
                kb = b.sub(self.imin(K, b.add(pc, self.c64(self.kc))), pc)
                nb_r = b.mul(b.sdiv(b.add(nb, self.c64(self.NR - 1)), self.c64(self.NR)),
                             self.c64(self.NR))
                bp_pk = b.gep(bpk, [b.add(b.mul(jc, K), b.mul(pc, nb_r))], inbounds=True)
                self.Bp = b.select(use_pk, bp_pk, bp_ws)
                with b.if_then(b.or_(b.not_(use_pk), do_pack)):
                    self.pack_b(jc, pc, nb, kb)
                self.stress_delay(ws, 1)
                first = b.icmp_signed("==", pc, self.c64(0))
                overwrite = b.and_(first, b.not_(accumulate))
                with counted_loop(b, fn, 0, M, self.mc, "ic") as ic:
                    mb_ = b.sub(self.imin(M, b.add(ic, self.c64(self.mc))), ic)
                    self.pack_a(ic, pc, mb_, kb)
                    self.stress_delay(ws, 2)
                    self.macro(ic, jc, mb_, nb, kb, overwrite)
        b.ret_void()
        return fn

    def stress_delay(self, ws, salt):
        """Under the stress schedule (stress.py), a random wait between packing panels
        into the workspace and reading them back: another thread writing the same
        scratch then overwrites them in between.  The slice's address tells the
        threads apart (this function does not know the thread id)."""
        st = self.mb.stress
        if st is not None:
            b = self.b
            st.delay_salted(b, -1, b.add(b.ptrtoint(ws, I64), self.c64(salt)))

    def imin(self, x, y):
        return self.b.select(self.b.icmp_signed("<", x, y), x, y)

    # -------------------------------------------------------------- packing
    def pack_b(self, jc, pc, nb, kb):
        """Bp[jr/NR][p][0:NR] = B[pc + p, jc + jr + 0:NR] (zeros past N)."""
        b = self.b
        zero = ir.Constant(self.ft, 0.0)
        nb_r = b.mul(b.sdiv(b.add(nb, self.c64(self.NR - 1)), self.c64(self.NR)),
                     self.c64(self.NR))
        with counted_loop(b, self.fn, 0, nb_r, self.NR, "pbj") as jr:
            with counted_loop(b, self.fn, 0, kb, 1, "pbp") as p:
                row = b.add(self.Bb, b.mul(b.add(pc, p), self.brs))
                dst0 = b.add(b.mul(jr, kb), b.mul(p, self.c64(self.NR)))
                if True:
                    # Full unit-stride panels: vector copies; else element by element.
                    full = b.and_(b.icmp_signed("<=", b.add(jr, self.c64(self.NR)), nb),
                                  b.icmp_signed("==", self.bcs, self.c64(1)))
                    with b.if_else(full) as (then, other):
                        with then:
                            for v in range(self.NV):
                                src = self.gep(self.B, b.add(row, b.add(jc, b.add(
                                    jr, self.c64(v * self.VW)))))
                                val = self.vload(src, self.dtype.itemsize)
                                self.vstore(val, self.gep(self.Bp, b.add(dst0, self.c64(
                                    v * self.VW))), 64)
                        with other:
                            self._pack_b_scalar(row, jc, jr, nb, dst0, zero)

    def _pack_b_scalar(self, row, jc, jr, nb, dst0, zero):
        b = self.b
        with counted_loop(b, self.fn, 0, self.NR, 1, "pbs") as q:
            col = b.add(jr, q)
            ok = b.icmp_signed("<", col, nb)
            safe = b.select(ok, col, self.c64(0))
            src = self.gep(self.B, b.add(row, b.mul(b.add(jc, safe), self.bcs)))
            val = b.select(ok, b.load(src, typ=self.ft), zero)
            b.store(val, self.gep(self.Bp, b.add(dst0, q)))

    def pack_a(self, ic, pc, mb_, kb):
        """Ap[ir/MR][p][0:MR] = A[ic + ir + 0:MR, pc + p] (zeros past M)."""
        b = self.b
        zero = ir.Constant(self.ft, 0.0)
        with counted_loop(b, self.fn, 0, mb_, self.MR, "paI") as ir_:
            with counted_loop(b, self.fn, 0, kb, 1, "pap") as p:
                colo = b.mul(b.add(pc, p), self.acs)
                dst0 = b.add(b.mul(ir_, kb), b.mul(p, self.c64(self.MR)))
                for r in range(self.MR):
                    row = b.add(ir_, self.c64(r))
                    ok = b.icmp_signed("<", row, mb_)
                    safe = b.select(ok, row, self.c64(0))
                    src = self.gep(self.A, b.add(self.Ab, b.add(
                        b.mul(b.add(ic, safe), self.ars), colo)))
                    val = b.select(ok, b.load(src, typ=self.ft), zero)
                    b.store(val, self.gep(self.Ap, b.add(dst0, self.c64(r))))

    # -------------------------------------------------------------- macro + micro kernel
    def macro(self, ic, jc, mb_, nb, kb, overwrite):
        b = self.b
        nb_r = b.mul(b.sdiv(b.add(nb, self.c64(self.NR - 1)), self.c64(self.NR)),
                     self.c64(self.NR))
        with counted_loop(b, self.fn, 0, nb_r, self.NR, "jr") as jr:
            with counted_loop(b, self.fn, 0, mb_, self.MR, "ir") as ir_:
                acc = self.micro(b.mul(ir_, kb), b.mul(jr, kb), kb)
                self.store_tile(acc, b.add(ic, ir_), b.add(jc, jr),
                                b.sub(mb_, ir_), b.sub(nb, jr), overwrite)

    def micro(self, a_off, b_off, kb):
        b, fn = self.b, self.fn
        pre = b.block
        head = fn.append_basic_block("mk.head")
        body = fn.append_basic_block("mk.body")
        done = fn.append_basic_block("mk.done")
        b.branch(head)
        b.position_at_end(head)
        p = b.phi(I64, name="p")
        p.add_incoming(self.c64(0), pre)
        zero = ir.Constant(self.vt, None)
        accs = []
        for r in range(self.MR):
            for v in range(self.NV):
                phi = b.phi(self.vt, name=f"acc{r}_{v}")
                phi.add_incoming(zero, pre)
                accs.append(phi)
        b.cbranch(b.icmp_signed("<", p, kb), body, done)
        b.position_at_end(body)
        fma = self.fma_decl()
        bp = b.add(b_off, b.mul(p, self.c64(self.NR)))
        bv = [self.vload(self.gep(self.Bp, b.add(bp, self.c64(v * self.VW))), 64)
              for v in range(self.NV)]
        ap = b.add(a_off, b.mul(p, self.c64(self.MR)))
        new = []
        for r in range(self.MR):
            a = b.load(self.gep(self.Ap, b.add(ap, self.c64(r))), typ=self.ft)
            av = b.insert_element(ir.Constant(self.vt, ir.Undefined), a, ir.Constant(ir.IntType(32), 0))
            av = b.shuffle_vector(av, ir.Constant(self.vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), self.VW), None))
            for v in range(self.NV):
                new.append(b.call(fma, [av, bv[v], accs[r * self.NV + v]]))
        nxt = b.add(p, self.c64(1))
        latch = b.block
        p.add_incoming(nxt, latch)
        for phi, val in zip(accs, new):
            phi.add_incoming(val, latch)
        b.branch(head)
        b.position_at_end(done)
        return accs

    def fma_decl(self):
        mod = self.mb.module
        name = f"llvm.fma.v{self.VW}{'f32' if self.dtype.itemsize == 4 else 'f64'}"
        try:
            return mod.get_global(name)
        except KeyError:
            return ir.Function(mod, ir.FunctionType(self.vt, [self.vt] * 3), name=name)

    def store_tile(self, acc, i0, j0, mrem, nrem, overwrite):
        """C[i0 + r, j0 + v*VW + 0:VW] (+)= acc for the valid part of the tile."""
        b = self.b
        full = b.and_(b.icmp_signed(">=", mrem, self.c64(self.MR)),
                      b.icmp_signed(">=", nrem, self.c64(self.NR)))
        full = b.and_(full, b.icmp_signed("==", self.ccs, self.c64(1)))
        with b.if_else(full) as (then, other):
            with then:
                for r in range(self.MR):
                    rowoff = b.add(self.Cb, b.mul(b.add(i0, self.c64(r)), self.crs))
                    for v in range(self.NV):
                        ptr = self.gep(self.C, b.add(rowoff, b.add(j0, self.c64(v * self.VW))))
                        old = self.vload(ptr, self.dtype.itemsize)
                        val = acc[r * self.NV + v]
                        val = b.select(overwrite, val, b.fadd(old, val))
                        self.vstore(val, ptr, self.dtype.itemsize)
            with other:
                tile = self.tile
                for r in range(self.MR):
                    for v in range(self.NV):
                        ptr = b.gep(tile, [self.c64(0), self.c64(r * self.NR + v * self.VW)],
                                    inbounds=True)
                        self.vstore(acc[r * self.NV + v], ptr, self.dtype.itemsize)
                mlim = self.imin(mrem, self.c64(self.MR))
                nlim = self.imin(nrem, self.c64(self.NR))
                with counted_loop(b, self.fn, 0, mlim, 1, "er") as r:
                    with counted_loop(b, self.fn, 0, nlim, 1, "ec") as q:
                        t = b.load(b.gep(tile, [self.c64(0), b.add(b.mul(r, self.c64(self.NR)), q)],
                                         inbounds=True), typ=self.ft)
                        ci = b.add(self.Cb, b.add(b.mul(b.add(i0, r), self.crs),
                                                  b.mul(b.add(j0, q), self.ccs)))
                        ptr = self.gep(self.C, ci)
                        old = b.load(ptr, typ=self.ft)
                        b.store(b.select(overwrite, t, b.fadd(old, t)), ptr)
