"""The kernel IR: loop nests over flat buffers with affine indexing.

A `Kernel` reads and writes `Buffer`s (flat, typed, of known element count)
through `Load`/`Store` at integer index expressions built from loop
variables.  Scalars flow through `Expr` trees; per-kernel scalar variables
(`Local`) hold accumulators.  Loops carry a schedule tag ("serial",
"parallel", "vector", "unroll") that a backend maps onto its own machinery
(threads, SIMD lanes, CUDA blocks/threads).  Nothing here knows about LLVM.

One coarse statement, `Gemm`, names a (strided) matrix product: backends may
emit a tuned micro-kernel for it, and `Gemm.as_loops()` gives the plain loop
nest any backend can compile instead.
"""
from __future__ import annotations

import itertools

import numpy as np

INDEX = np.dtype("int64")
BOOL = np.dtype("bool")

_names = itertools.count()


class Buffer:
    """A flat array of `size` elements of `dtype` (kernel parameter).

    scope "global": one array shared by all threads; "thread": scratch private
    to each iteration of the kernel's top-level "parallel" loop -- written before
    it is read within an iteration, never carrying values between iterations --
    so a backend may give each CPU thread one copy (reused by the iterations it
    runs) or each GPU block its own (the CUDA backend's shared memory).
    """
    __slots__ = ("name", "dtype", "size", "scope")

    def __init__(self, name, dtype, size, scope="global"):
        self.name, self.dtype, self.size = name, np.dtype(dtype), int(size)
        self.scope = scope

    def __repr__(self):
        tag = "" if self.scope == "global" else f" {self.scope}"
        return f"{self.name}:{self.dtype}[{self.size}]{tag}"


# ------------------------------------------------------------------ expressions
class Expr:
    __slots__ = ("dtype",)


class Const(Expr):
    __slots__ = ("value",)

    def __init__(self, value, dtype):
        self.dtype = np.dtype(dtype)
        self.value = value

    def __repr__(self):
        return repr(self.value) if self.dtype != INDEX else str(int(self.value))


class Var(Expr):
    """A loop index (int64)."""
    __slots__ = ("name",)

    def __init__(self, name=None):
        self.dtype = INDEX
        self.name = name or f"i{next(_names)}"

    def __repr__(self):
        return self.name


class Local(Expr):
    """A scalar variable of the kernel (read); written by `Assign`."""
    __slots__ = ("name",)

    def __init__(self, dtype, name=None):
        self.dtype = np.dtype(dtype)
        self.name = name or f"t{next(_names)}"

    def __repr__(self):
        return self.name


class Load(Expr):
    __slots__ = ("buf", "index")

    def __init__(self, buf: Buffer, index: Expr):
        self.dtype, self.buf, self.index = buf.dtype, buf, index

    def __repr__(self):
        return f"{self.buf.name}[{self.index!r}]"


ARITH = ("add", "sub", "mul", "div", "mod", "max", "min", "pow", "and", "or", "xor", "lshr")
# Integer add/sub/mul wrap modulo 2**bits (two's complement); "lshr" is a logical
# (unsigned) right shift and "xor" a bitwise xor, for hashing.
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
UNARY = ("neg", "abs", "sqrt", "exp", "log", "expm1", "log1p", "erf", "sign", "not",
         "floor", "isnan", "recip")


class BinOp(Expr):
    """Arithmetic (same dtype in and out; integer div floors, like NumPy's //) or a
    comparison (bool out).  `reassoc` lets a backend reorder a reduction."""
    __slots__ = ("op", "a", "b", "reassoc")

    def __init__(self, op, a, b, reassoc=False):
        if op not in ARITH + COMPARE:
            raise ValueError(f"unknown binary op {op}")
        if a.dtype != b.dtype:
            raise TypeError(f"{op}: operand dtypes differ ({a.dtype}, {b.dtype})")
        self.op, self.a, self.b, self.reassoc = op, a, b, reassoc
        self.dtype = BOOL if op in COMPARE else a.dtype

    def __repr__(self):
        return f"{self.op}({self.a!r}, {self.b!r})"


class UnOp(Expr):
    __slots__ = ("op", "a")

    def __init__(self, op, a):
        if op not in UNARY:
            raise ValueError(f"unknown unary op {op}")
        self.op, self.a = op, a
        self.dtype = BOOL if op in ("isnan", "not") else a.dtype

    def __repr__(self):
        return f"{self.op}({self.a!r})"


class Select(Expr):
    __slots__ = ("cond", "a", "b")

    def __init__(self, cond, a, b):
        if cond.dtype != BOOL or a.dtype != b.dtype:
            raise TypeError(f"select({cond.dtype}, {a.dtype}, {b.dtype})")
        self.cond, self.a, self.b, self.dtype = cond, a, b, a.dtype

    def __repr__(self):
        return f"select({self.cond!r}, {self.a!r}, {self.b!r})"


class Cast(Expr):
    __slots__ = ("a",)

    def __init__(self, a, dtype):
        self.a, self.dtype = a, np.dtype(dtype)

    def __repr__(self):
        return f"{self.dtype}({self.a!r})"


# ------------------------------------------------------------------ statements
class Stmt:
    __slots__ = ()


class Loop(Stmt):
    """for var in range(extent): body.  kind: serial | parallel | vector | unroll.

    A "parallel" loop at the top of a kernel has independent iterations that a
    backend may split across threads (or blocks); elsewhere it runs serially.
    """
    __slots__ = ("var", "extent", "body", "kind")

    def __init__(self, var, extent, body, kind="serial"):
        self.var, self.extent, self.body, self.kind = var, int(extent), list(body), kind


class Store(Stmt):
    __slots__ = ("buf", "index", "value")

    def __init__(self, buf, index, value):
        if value.dtype != buf.dtype:
            raise TypeError(f"store of {value.dtype} into {buf!r}")
        self.buf, self.index, self.value = buf, index, value


class Assign(Stmt):
    __slots__ = ("local", "value")

    def __init__(self, local, value):
        if value.dtype != local.dtype:
            raise TypeError(f"assign of {value.dtype} to {local.dtype} local")
        self.local, self.value = local, value


class If(Stmt):
    __slots__ = ("cond", "body")

    def __init__(self, cond, body):
        self.cond, self.body = cond, list(body)


class Gemm(Stmt):
    """C[m, n] (+)= sum_k A[m, k] B[k, n] over strided views of flat buffers.

    Each operand is (buffer, base offset Expr, row stride, column stride).
    """
    __slots__ = ("M", "N", "K", "a", "b", "c", "accumulate")

    def __init__(self, M, N, K, a, b, c, accumulate=False):
        self.M, self.N, self.K = int(M), int(N), int(K)
        self.a, self.b, self.c, self.accumulate = a, b, c, accumulate

    def as_loops(self):
        """The reference loop nest (i, k, j order: unit-stride inner loop over C's row)."""
        (A, ao, ars, acs), (B, bo, brs, bcs), (C, co, crs, ccs) = self.a, self.b, self.c
        i, j, k = Var("gi"), Var("gj"), Var("gk")
        dt = C.dtype
        cidx = add(co, add(mul(i, idx(crs)), mul(j, idx(ccs))))
        if self.dot_rows():
            # A few rows times a transposed matrix (columns contiguous), as in x @ W.T
            # at batch 1: dot products along contiguous rows of A and columns of B
            # (j, i, k order: B's row is read once for every row of A), not a gather
            # per element.  The j loop is parallel: threads share out B's rows.
            # Four rows of B at a time share each load of A and give the vectorized
            # k loop four independent sums (one B row at a time left the reduction's
            # latency exposed: a 1024x256 product ran at ~20 GFLOP/s on one core).
            av = Load(A, add(ao, add(mul(i, idx(ars)), k)))

            def rows(jj, count):
                accs = [Local(dt, f"gacc{r}") for r in range(count)]
                js = [add(jj, r) for r in range(count)]
                cis = [add(co, add(mul(i, idx(crs)), mul(jr, idx(ccs)))) for jr in js]
                init = [Load(C, ci) if self.accumulate else Const(0, dt) for ci in cis]
                body = [Assign(a, v) for a, v in zip(accs, init)]
                body.append(Loop(k, self.K, [
                    Assign(a, BinOp("add", a, BinOp("mul", av, Load(
                        B, add(bo, add(k, mul(jr, idx(bcs)))))), reassoc=True))
                    for a, jr in zip(accs, js)], "vector"))
                body += [Store(C, ci, a) for ci, a in zip(cis, accs)]
                return [Loop(i, self.M, body)]

            out = []
            if self.N // 4:
                out.append(Loop(j, self.N // 4, rows(mul(j, 4), 4), "parallel"))
            if self.N % 4:
                out.append(Loop(Var("gj1"), 1, rows(idx(self.N // 4 * 4), self.N % 4),
                                "parallel"))
            return out
        out = []
        if not self.accumulate:
            out.append(Loop(i, self.M, [Loop(j, self.N, [Store(C, cidx, Const(0, dt))],
                                             "vector")]))
        av = Load(A, add(ao, add(mul(i, idx(ars)), mul(k, idx(acs)))))
        bv = Load(B, add(bo, add(mul(k, idx(brs)), mul(j, idx(bcs)))))
        upd = Store(C, cidx, BinOp("add", Load(C, cidx), BinOp("mul", av, bv)))
        out.append(Loop(i, self.M, [Loop(k, self.K, [Loop(j, self.N, [upd], "vector")])]))
        return out

    def dot_rows(self) -> bool:
        """Is this the few-rows-times-a-transposed-matrix case that as_loops runs as
        dot products (x @ W.T at batch 1)?"""
        (_, _, _, acs), (_, _, brs, bcs), _ = self.a, self.b, self.c
        return (brs == 1 and bcs != 1 and acs == 1 and self.M <= DOT_ROWS_MAX_M
                and self.K >= 16 and self.c[0].dtype.kind == "f")

    @property
    def flops(self):
        return 2 * self.M * self.N * self.K


# Gemm.dot_rows: the most rows of A run as dot products (each B row, read once per
# row of A, stays in L1 between them).
DOT_ROWS_MAX_M = 8


class Kernel:
    """One function over `buffers`: what a backend compiles and calls."""

    def __init__(self, name, buffers, body, flops=0):
        self.name, self.buffers, self.body, self.flops = name, list(buffers), list(body), flops

    def format(self) -> str:
        lines = [f"kernel {self.name}({', '.join(map(repr, self.buffers))}):"]
        _fmt(self.body, lines, 1)
        return "\n".join(lines)

    __str__ = format


def _fmt(body, lines, depth):
    pad = "  " * depth
    for s in body:
        if isinstance(s, Loop):
            tag = "" if s.kind == "serial" else f"  # {s.kind}"
            lines.append(f"{pad}for {s.var!r} in 0..{s.extent}:{tag}")
            _fmt(s.body, lines, depth + 1)
        elif isinstance(s, Store):
            lines.append(f"{pad}{s.buf.name}[{s.index!r}] = {s.value!r}")
        elif isinstance(s, Assign):
            lines.append(f"{pad}{s.local!r} = {s.value!r}")
        elif isinstance(s, If):
            lines.append(f"{pad}if {s.cond!r}:")
            _fmt(s.body, lines, depth + 1)
        elif isinstance(s, Gemm):
            lines.append(f"{pad}gemm M={s.M} N={s.N} K={s.K} C{'+' if s.accumulate else ''}="
                         f"{s.c[0].name}@{s.c[1]!r} A={s.a[0].name}@{s.a[1]!r}{s.a[2:]} "
                         f"B={s.b[0].name}@{s.b[1]!r}{s.b[2:]}")


# ------------------------------------------------------------------ index helpers
def idx(v) -> Expr:
    return v if isinstance(v, Expr) else Const(int(v), INDEX)


def add(a, b) -> Expr:
    a, b = idx(a), idx(b)
    if isinstance(a, Const) and a.value == 0:
        return b
    if isinstance(b, Const) and b.value == 0:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return idx(a.value + b.value)
    return BinOp("add", a, b)


def mul(a, b) -> Expr:
    a, b = idx(a), idx(b)
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Const):
            if x.value == 0:
                return idx(0)
            if x.value == 1:
                return y
    if isinstance(a, Const) and isinstance(b, Const):
        return idx(a.value * b.value)
    return BinOp("mul", a, b)


def affine(vars_, strides, base=0) -> Expr:
    """base + sum(v * s), skipping zero strides."""
    e = idx(base)
    for v, s in zip(vars_, strides):
        if s:
            e = add(e, mul(v, s))
    return e


def contiguous_strides(shape) -> tuple:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return tuple(reversed(st))


def loop_nest(shape, make_body, inner_kind="vector", outer_kind="serial"):
    """Loops over `shape` (outermost first); make_body(vars) -> list of statements.

    outer_kind="parallel" marks the outermost loop parallel (its iterations must be
    independent)."""
    vars_ = [Var(f"d{k}") for k in range(len(shape))]
    body = make_body(vars_)
    for k in reversed(range(len(shape))):
        kind = inner_kind if k == len(shape) - 1 else "serial"
        if k == 0 and outer_kind == "parallel":
            kind = "parallel"
        body = [Loop(vars_[k], shape[k], body, kind)]
    return body


def is_spmd(kernel, min_work=1 << 18) -> bool:
    """Should every thread run this kernel, sharing out its top-level parallel loops
    and GEMMs?  Only when that is legal and the kernel does enough work to pay for
    waking threads and a barrier (otherwise one thread runs it)."""
    if not kernel.body or not all(
            (isinstance(s, Loop) and s.kind == "parallel" and s.extent > 1)
            or (isinstance(s, Gemm) and (s.N >= 64 or s.M >= 64) and s.K >= 16 and s.M >= 4
                and s.M * s.N * s.K >= 1 << 15)   # (smaller: the loop nest, on one thread)
            or (isinstance(s, Gemm) and s.dot_rows() and s.N >= 64)  # rows of B shared
            for s in kernel.body):
        return False
    work = max(kernel.flops, sum(b.size for b in kernel.buffers))
    if all(isinstance(s, Gemm) and s.dot_rows() for s in kernel.body):
        # matrix-vector products are memory-bound: each thread streams its share of
        # the matrix (a 256 KB one takes ~5 us on one core); worth sharing from 64K
        # elements
        return sum(b.size for b in kernel.buffers) >= 1 << 16
    return work >= min_work
