"""exp, expm1, log, log1p and erf as straight-line LLVM IR (no libm calls).

Each function is emitted once per module and float type as an internal,
always-inline function made only of arithmetic, bit casts and selects, so the
loop vectorizer can widen loops that call it (a libm call would block that).
Accuracy: Taylor / atanh series on reduced arguments with enough terms that
the truncation error is below half an ulp of the type; the result is within
a few ulp of the correctly rounded value.
"""
from __future__ import annotations

import math

from llvmlite import ir

F32, F64 = ir.FloatType(), ir.DoubleType()
I32, I64 = ir.IntType(32), ir.IntType(64)
I1 = ir.IntType(1)


def _consts(t):
    if t == F32:
        return dict(ity=I32, mbits=23, bias=127, exp_terms=8, log_terms=7, lo=-104.0, hi=89.0,
                    erf_series=34, erf_cf=24, minnorm=1.1754943508222875e-38)
    return dict(ity=I64, mbits=52, bias=1023, exp_terms=14, log_terms=13, lo=-746.0, hi=710.0,
                erf_series=70, erf_cf=60, minnorm=2.2250738585072014e-308)


class MathLib:
    def __init__(self, module):
        self.module = module
        self.fns = {}

    def call(self, builder, name, x):
        fn = self.fns.get((name, str(x.type)))
        if fn is None:
            fn = self._define(name, x.type)
        return builder.call(fn, [x])

    def _define(self, name, t):
        fnty = ir.FunctionType(t, [t])
        fn = ir.Function(self.module, fnty, name=f"graphc_{name}_{'f32' if t == F32 else 'f64'}")
        fn.linkage = "internal"
        fn.attributes.add("alwaysinline")
        fn.attributes.add("nounwind")
        self.fns[(name, str(t))] = fn
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        b.ret(getattr(self, "_" + name)(b, fn.args[0], t))
        return fn

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _c(t, v):
        return ir.Constant(t, v)

    def _isnan(self, b, x):
        return b.fcmp_unordered("uno", x, x)

    def _floor(self, b, x, t):
        f = self.module.declare_intrinsic("llvm.floor", [t])
        return b.call(f, [x])

    def _pow2(self, b, n, t):
        """2**n as a float for integer n (of the int type) within the normal range."""
        k = _consts(t)
        bits = b.shl(b.add(n, self._c(k["ity"], k["bias"])), self._c(k["ity"], k["mbits"]))
        return b.bitcast(bits, t)

    # -------------------------------------------------------------- exp
    def _exp(self, b, x, t):
        k = _consts(t)
        c = lambda v: self._c(t, v)
        xc = b.select(b.fcmp_ordered(">", x, c(k["hi"])), c(k["hi"]), x)
        xc = b.select(b.fcmp_ordered("<", xc, c(k["lo"])), c(k["lo"]), xc)
        xc = b.select(self._isnan(b, x), c(0.0), xc)
        nf = self._floor(b, b.fadd(b.fmul(xc, c(1 / math.log(2))), c(0.5)), t)
        # Cody-Waite: ln2 split so n*ln2_hi is exact.
        ln2_hi = 0.693145751953125 if t == F32 else 0.6931471803691238
        ln2_lo = math.log(2) - ln2_hi
        r = b.fsub(b.fsub(xc, b.fmul(nf, c(ln2_hi))), b.fmul(nf, c(ln2_lo)))
        # e^r = 1 + r(1 + r/2(1 + r/3(...)))
        p = c(1.0)
        for j in range(k["exp_terms"], 0, -1):
            p = b.fadd(c(1.0), b.fmul(b.fmul(r, c(1.0 / j)), p))
        n = b.fptosi(nf, k["ity"])
        n1 = b.ashr(n, self._c(k["ity"], 1))
        n2 = b.sub(n, n1)
        res = b.fmul(b.fmul(p, self._pow2(b, n1, t)), self._pow2(b, n2, t))
        return b.select(self._isnan(b, x), x, res)

    def _expm1(self, b, x, t):
        k = _consts(t)
        c = lambda v: self._c(t, v)
        # Small |x|: the Taylor series without its leading 1 (no cancellation).
        p = c(1.0)
        for j in range(k["exp_terms"] + 1, 1, -1):
            p = b.fadd(c(1.0), b.fmul(b.fmul(x, c(1.0 / j)), p))
        small = b.fmul(x, p)
        big = b.fsub(self.call(b, "exp", x), c(1.0))
        ax = b.call(self.module.declare_intrinsic("llvm.fabs", [t]), [x])
        return b.select(b.fcmp_ordered("<", ax, c(0.34657359)), small, big)

    # -------------------------------------------------------------- log
    def _log(self, b, x, t):
        k = _consts(t)
        c = lambda v: self._c(t, v)
        ity = k["ity"]
        ci = lambda v: self._c(ity, v)
        # Subnormals: scale into the normal range first.
        sub = b.fcmp_ordered("<", x, c(k["minnorm"]))
        scale = float(2 ** k["mbits"])
        xs = b.select(sub, b.fmul(x, c(scale)), x)
        bits = b.bitcast(xs, ity)
        e = b.sub(b.lshr(bits, ci(k["mbits"])), ci(k["bias"]))
        mant_mask = (1 << k["mbits"]) - 1
        m = b.bitcast(b.or_(b.and_(bits, ci(mant_mask)), ci(k["bias"] << k["mbits"])), t)
        big = b.fcmp_ordered(">", m, c(math.sqrt(2.0)))
        m = b.select(big, b.fmul(m, c(0.5)), m)
        e = b.select(big, b.add(e, ci(1)), e)
        ef = b.sitofp(e, t)
        ef = b.select(sub, b.fsub(ef, c(float(k["mbits"]))), ef)
        s = b.fdiv(b.fsub(m, c(1.0)), b.fadd(m, c(1.0)))
        s2 = b.fmul(s, s)
        p = c(1.0 / (2 * k["log_terms"] + 1))
        for j in range(k["log_terms"] - 1, -1, -1):
            p = b.fadd(c(1.0 / (2 * j + 1)), b.fmul(s2, p))
        logm = b.fmul(b.fmul(c(2.0), s), p)
        ln2_hi = 0.693145751953125 if t == F32 else 0.6931471803691238
        ln2_lo = math.log(2) - ln2_hi
        res = b.fadd(b.fmul(ef, c(ln2_hi)), b.fadd(b.fmul(ef, c(ln2_lo)), logm))
        res = b.select(b.fcmp_ordered("==", x, c(0.0)), c(-math.inf), res)
        res = b.select(b.fcmp_ordered("==", x, c(math.inf)), x, res)
        res = b.select(b.fcmp_unordered("<", x, c(0.0)), c(math.nan), res)   # x < 0 or NaN
        return res

    def _log1p(self, b, x, t):
        c = lambda v: self._c(t, v)
        w = b.fadd(c(1.0), x)
        lw = self.call(b, "log", w)
        # log(w) * x / (w - 1) corrects the rounding of 1 + x (Goldberg's trick).
        corr = b.fdiv(b.fmul(lw, x), b.fsub(w, c(1.0)))
        res = b.select(b.fcmp_ordered("==", w, c(1.0)), x, corr)
        return b.select(b.fcmp_ordered("==", w, c(math.inf)), w, res)

    # -------------------------------------------------------------- erf
    def _erf(self, b, x, t):
        k = _consts(t)
        c = lambda v: self._c(t, v)
        ax = b.call(self.module.declare_intrinsic("llvm.fabs", [t]), [x])
        # |x| < 2.5: 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!!  (positive terms)
        xs = b.select(b.fcmp_ordered("<", ax, c(2.5)), ax, c(0.0))
        x2 = b.fmul(xs, xs)
        term, total = xs, xs
        for n in range(1, k["erf_series"]):
            term = b.fmul(term, b.fmul(x2, c(2.0 / (2 * n + 1))))
            total = b.fadd(total, term)
        small = b.fmul(b.fmul(c(2.0 / math.sqrt(math.pi)), self.call(b, "exp", b.fsub(c(0.0), x2))),
                       total)
        # |x| >= 2.5: 1 - erfc, erfc by its continued fraction (depth fixed).
        xl = b.select(b.fcmp_ordered("<", ax, c(2.5)), c(2.5), ax)
        xl = b.select(b.fcmp_ordered(">", xl, c(30.0)), c(30.0), xl)
        kk = c(0.0)
        for n in range(k["erf_cf"], 0, -1):
            kk = b.fdiv(c(n / 2.0), b.fadd(xl, kk))
        erfc = b.fdiv(b.fdiv(self.call(b, "exp", b.fsub(c(0.0), b.fmul(xl, xl))),
                             c(math.sqrt(math.pi))), b.fadd(xl, kk))
        large = b.fsub(c(1.0), erfc)
        r = b.select(b.fcmp_ordered("<", ax, c(2.5)), small, large)
        r = b.call(self.module.declare_intrinsic("llvm.copysign", [t], ir.FunctionType(t, [t, t])), [r, x])
        return b.select(self._isnan(b, x), x, r)
