"""Kernel IR -> LLVM IR (llvmlite's IR builder).

Each kernel becomes an internal function taking one `noalias` pointer per
buffer; `entry(ptr table)` calls them in program order with pointers read
from the table (externals) or computed from the arena base (temporaries).
Loops are emitted as plain counted loops; LLVM's O3 loop vectorizer widens
the inner ones (functions ask for 512-bit vectors where the CPU has AVX-512).
`Gemm` goes to the tuned matrix-multiply generator in gemm.py.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...kernel import ir as K
from .mathlib import MathLib

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
F32, F64 = ir.FloatType(), ir.DoubleType()
PTR = ir.PointerType()


def reg_type(dtype):
    """The LLVM type a value of `dtype` has in registers."""
    return {"float32": F32, "float64": F64, "int32": I32, "int64": I64,
            "bool": I1}[np.dtype(dtype).name]


def mem_type(dtype):
    return I8 if np.dtype(dtype) == K.BOOL else reg_type(dtype)


class ModuleBuilder:
    def __init__(self, name="graphc", fn_attrs=(), debug_bounds=False, nthreads=1):
        self.module = ir.Module(name=name)
        self.nthreads = nthreads
        self.math = MathLib(self.module)
        self.fn_attrs = dict(fn_attrs)   # e.g. {"prefer-vector-width": "512"}
        self.debug_bounds = debug_bounds
        self.error_fn = None
        self.stress = None               # stress.Stress: the GRAPHC_DEBUG_SCHEDULE helpers
        self.gemm_sites = {}             # kernel function name -> [(scratch, slice, stride)]
        self.gemm_split = {}             # id(top-level Gemm) -> how threads share it out

    def kernel(self, kern: K.Kernel, index: int):
        # buffers..., thread id, thread count
        fnty = ir.FunctionType(ir.VoidType(), [PTR] * len(kern.buffers) + [I64, I64])
        fn = ir.Function(self.module, fnty, name=f"k{index}_{kern.name}")
        fn.linkage = "internal"
        fn.attributes.add("nounwind")
        # Kernels stay separate functions: inlining them all into `entry` makes one huge
        # function whose optimization time grows much faster than the code.
        fn.attributes.add("noinline")
        for a in fn.args[:-2]:
            a.add_attribute("noalias")
        KernelEmitter(self, fn, kern, index).emit()
        return fn

    def ir_text(self) -> str:
        text = str(self.module)
        if self.fn_attrs:
            # Function attributes with values are added textually to each definition.
            attr = " ".join(f'"{k}"="{v}"' for k, v in self.fn_attrs.items())
            lines = []
            for line in text.splitlines():
                if line.startswith("define ") and line.rstrip().endswith("{"):
                    line = line.rstrip()[:-1] + attr + " {"
                lines.append(line)
            text = "\n".join(lines)
        return text


class KernelEmitter:
    def __init__(self, mb: ModuleBuilder, fn, kern: K.Kernel, index):
        self.mb, self.fn, self.kern = mb, fn, kern
        self.tid, self.nt = fn.args[-2], fn.args[-1]
        self.depth = 0
        entry = fn.append_basic_block("entry")
        self.alloca_builder = ir.IRBuilder(entry)
        self.ptr = {}
        for bf, a in zip(kern.buffers, fn.args):
            if bf.scope == "thread":   # the runtime allocates one copy per thread
                off = self.alloca_builder.mul(self.tid, ir.Constant(I64, bf.size))
                a = self.alloca_builder.gep(a, [off], inbounds=True,
                                            source_etype=mem_type(bf.dtype))
            self.ptr[id(bf)] = a
        # The chunk of each top-level parallel loop this thread runs: its id, or under
        # the stress schedule a shuffled one (stress.py).
        self.part = self.tid
        if mb.stress is not None:
            self.part = mb.stress.part(self.alloca_builder, index, self.tid, self.nt)
        self.index = index
        self.vars = {}
        self.locals = {}
        body = fn.append_basic_block("body")
        self.b = ir.IRBuilder(body)

    def emit(self):
        if self.mb.stress is None:
            self.stmts(self.kern.body)
        else:
            for i, s in enumerate(self.kern.body):   # a random wait before each chunk
                self.mb.stress.delay(self.b, self.index, self.tid, i + 1)
                self.stmts([s])
        self.b.ret_void()
        self.alloca_builder.branch(self.fn.basic_blocks[1])

    # -------------------------------------------------------------- statements
    def stmts(self, body):
        for s in body:
            getattr(self, "s_" + type(s).__name__)(s)

    def s_Loop(self, s: K.Loop):
        b = self.b
        if s.extent <= 0:
            return
        lo, hi = ir.Constant(I64, 0), ir.Constant(I64, s.extent)
        if s.kind == "parallel" and self.depth == 0:
            lo, hi = self.chunk(s.extent)
        pre = b.block
        head = self.fn.append_basic_block(f"{s.var.name}.head")
        body = self.fn.append_basic_block(f"{s.var.name}.body")
        done = self.fn.append_basic_block(f"{s.var.name}.done")
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(I64, name=s.var.name)
        i.add_incoming(lo, pre)
        b.cbranch(b.icmp_signed("<", i, hi), body, done)
        b.position_at_end(body)
        self.vars[id(s.var)] = i
        self.depth += 1
        self.stmts(s.body)
        self.depth -= 1
        nxt = b.add(i, ir.Constant(I64, 1), flags=("nuw", "nsw"))
        i.add_incoming(nxt, b.block)
        b.branch(head)
        b.position_at_end(done)

    def chunk(self, extent, align=None):
        """This thread's [lo, hi) of range(extent): contiguous, fixed by (part, nt) --
        the chunk boundaries depend on the thread count only."""
        b = self.b
        if align is None:
            align = 64 if extent >= 64 * 16 else 1   # keep vector loops on whole vectors
        units = -(-extent // align)
        c = lambda v: ir.Constant(I64, v)
        lo = b.mul(b.sdiv(b.mul(c(units), self.part), self.nt), c(align))
        hi = b.mul(b.sdiv(b.mul(c(units), b.add(self.part, c(1))), self.nt), c(align))
        hi = b.select(b.icmp_signed(">", hi, c(extent)), c(extent), hi)
        return lo, hi

    def s_If(self, s: K.If):
        b = self.b
        cond = self.expr(s.cond)
        with b.if_then(cond):
            self.stmts(s.body)

    def s_Store(self, s: K.Store):
        v = self.expr(s.value)
        if s.buf.dtype == K.BOOL:
            v = self.b.zext(v, I8)
        self.b.store(v, self.address(s.buf, s.index))

    def s_Assign(self, s: K.Assign):
        self.b.store(self.expr(s.value), self.local_slot(s.local))

    def s_Gemm(self, s: K.Gemm):
        from .gemm import emit_gemm
        emit_gemm(self, s)

    def local_slot(self, loc):
        slot = self.locals.get(id(loc))
        if slot is None:
            slot = self.alloca_builder.alloca(reg_type(loc.dtype), name=loc.name)
            self.locals[id(loc)] = slot
        return slot

    def address(self, buf, index):
        i = self.expr(index)
        if self.mb.debug_bounds:
            self.bounds_check(buf, i)
        return self.b.gep(self.ptr[id(buf)], [i], inbounds=True, source_etype=mem_type(buf.dtype))

    def bounds_check(self, buf, i):
        from .runtime import bounds_error_fn
        b = self.b
        bad = b.icmp_unsigned(">=", i, ir.Constant(I64, buf.size))
        with b.if_then(bad, likely=False):
            fn = bounds_error_fn(self.mb)
            b.call(fn, [ir.Constant(I64, self.kern_index()), i, ir.Constant(I64, buf.size)])
            b.ret_void()   # leave the kernel; entry sees the error record and stops

    def kern_index(self):
        return int(self.fn.name[1:].split("_", 1)[0])

    # -------------------------------------------------------------- expressions
    def expr(self, e):
        return getattr(self, "e_" + type(e).__name__)(e)

    def e_Const(self, e):
        t = reg_type(e.dtype)
        if e.dtype.kind == "f":
            return ir.Constant(t, float(e.value))
        return ir.Constant(t, int(bool(e.value)) if e.dtype == K.BOOL else int(e.value))

    def e_Var(self, e):
        return self.vars[id(e)]

    def e_Local(self, e):
        return self.b.load(self.local_slot(e), typ=reg_type(e.dtype))

    def e_Load(self, e):
        v = self.b.load(self.address(e.buf, e.index), typ=mem_type(e.buf.dtype))
        if e.buf.dtype == K.BOOL:
            v = self.b.icmp_unsigned("!=", v, ir.Constant(I8, 0))
        return v

    def e_Cast(self, e):
        b = self.b
        v = self.expr(e.a)
        src, dst = e.a.dtype, e.dtype
        st, dt_ = reg_type(src), reg_type(dst)
        if src == dst:
            return v
        if dst == K.BOOL:
            if src.kind == "f":
                return b.fcmp_unordered("!=", v, ir.Constant(st, 0.0))
            return b.icmp_signed("!=", v, ir.Constant(st, 0))
        if src == K.BOOL:
            return b.uitofp(v, dt_) if dst.kind == "f" else b.zext(v, dt_)
        if src.kind == "f" and dst.kind == "f":
            return b.fptrunc(v, dt_) if dst.itemsize < src.itemsize else b.fpext(v, dt_)
        if src.kind == "f":
            # fptosi of NaN/out-of-range is poison; freeze keeps it a (garbage) value.
            return b.freeze(b.fptosi(v, dt_)) if hasattr(b, "freeze") else b.fptosi(v, dt_)
        if dst.kind == "f":
            return b.sitofp(v, dt_)
        return b.trunc(v, dt_) if dst.itemsize < src.itemsize else b.sext(v, dt_)

    def e_Select(self, e):
        return self.b.select(self.expr(e.cond), self.expr(e.a), self.expr(e.b))

    def e_UnOp(self, e):
        b = self.b
        op = e.op
        v = self.expr(e.a)
        t = v.type
        isf = e.a.dtype.kind == "f"
        if op == "neg":
            return b.fneg(v) if isf else b.sub(ir.Constant(t, 0), v)
        if op == "abs":
            if isf:
                return b.call(self.mb.module.declare_intrinsic("llvm.fabs", [t]), [v])
            if e.a.dtype == K.BOOL:
                return v
            return b.select(b.icmp_signed("<", v, ir.Constant(t, 0)), b.sub(ir.Constant(t, 0), v), v)
        if op == "not":
            return b.xor(v, ir.Constant(I1, 1))
        if op == "isnan":
            return b.fcmp_unordered("uno", v, v) if isf else ir.Constant(I1, 0)
        if op in ("sqrt", "floor"):
            return b.call(self.mb.module.declare_intrinsic(f"llvm.{op}", [t]), [v])
        if op == "recip":
            return b.fdiv(ir.Constant(t, 1.0), v)
        if op in ("exp", "log", "expm1", "log1p", "erf"):
            return self.mb.math.call(b, op, v)
        raise NotImplementedError(op)

    def e_BinOp(self, e):
        b = self.b
        x, y = self.expr(e.a), self.expr(e.b)
        d = e.a.dtype
        op = e.op
        isf = d.kind == "f"
        flags = ("reassoc", "contract") if e.reassoc else ()
        if op in K.COMPARE:
            sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[op]
            if isf:
                return b.fcmp_unordered(sym, x, y) if op == "ne" else b.fcmp_ordered(sym, x, y)
            if d == K.BOOL:
                return b.icmp_unsigned(sym, x, y)
            return b.icmp_signed(sym, x, y)
        if op == "and":
            return b.and_(x, y)
        if op == "or":
            return b.or_(x, y)
        if op == "xor":
            return b.xor(x, y)
        if op == "lshr":
            return b.lshr(x, y)
        if isf:
            if op == "add":
                return b.fadd(x, y, flags=flags)
            if op == "sub":
                return b.fsub(x, y)
            if op == "mul":
                return b.fmul(x, y, flags=flags)
            if op == "div":
                return b.fdiv(x, y)
            if op == "max":
                return b.select(b.fcmp_ordered(">=", x, y), x, y)
            if op == "min":
                return b.select(b.fcmp_ordered("<=", x, y), x, y)
            if op == "pow":
                return b.call(self.mb.module.declare_intrinsic("llvm.pow", [x.type],
                                                                  ir.FunctionType(x.type, [x.type, x.type])), [x, y])
            if op == "mod":
                return b.frem(x, y)
        if d == K.BOOL:
            if op in ("add", "max", "or"):
                return b.or_(x, y)
            if op in ("mul", "min", "and"):
                return b.and_(x, y)
            if op == "sub":
                return b.xor(x, y)
        if op == "add":
            return b.add(x, y)
        if op == "sub":
            return b.sub(x, y)
        if op == "mul":
            return b.mul(x, y)
        if op == "max":
            return b.select(b.icmp_signed(">=", x, y), x, y)
        if op == "min":
            return b.select(b.icmp_signed("<=", x, y), x, y)
        if op in ("div", "mod"):
            return self._int_divmod(op, x, y)
        raise NotImplementedError(f"{op} on {d}")

    def _int_divmod(self, op, x, y):
        """NumPy's floor division / modulo; 0 where y == 0 (never a hardware trap)."""
        b = self.b
        t = x.type
        zero, one, mone = ir.Constant(t, 0), ir.Constant(t, 1), ir.Constant(t, -1)
        yz = b.icmp_signed("==", y, zero)
        ym1 = b.icmp_signed("==", y, mone)
        safe = b.select(b.or_(yz, ym1), one, y)   # avoid /0 and INT_MIN / -1
        q = b.sdiv(x, safe)
        r = b.srem(x, safe)
        adjust = b.and_(b.icmp_signed("!=", r, zero),
                        b.icmp_signed("!=", b.icmp_signed("<", r, zero),
                                      b.icmp_signed("<", y, zero)))
        if op == "div":
            q = b.select(adjust, b.sub(q, one), q)
            q = b.select(ym1, b.sub(zero, x), q)
            return b.select(yz, zero, q)
        r = b.select(adjust, b.add(r, y), r)
        r = b.select(ym1, zero, r)
        return b.select(yz, zero, r)
