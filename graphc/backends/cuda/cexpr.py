"""Kernel-IR expressions and statements as CUDA C text.

Shared sub-expressions (one Expr object used twice, as the activation
formulas do) are evaluated once into `const` temporaries placed before the
statement, so the text stays linear in the size of the expression DAG.
"""
from __future__ import annotations

import numpy as np

from ...ir.errors import NotLoweredError
from ...kernel import ir as K
from .analysis import key

CTYPE = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long",
         "bool": "bool", "int8": "signed char", "uint8": "unsigned char", "int16": "short"}


def ctype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in CTYPE:
        raise NotLoweredError(f"the cuda backend has no C type for dtype {name}")
    return CTYPE[name]


def const(value, dtype) -> str:
    d = np.dtype(dtype)
    if d == K.BOOL:
        return "true" if value else "false"
    if d.kind == "f":
        v = float(value)
        suffix = "F" if d == np.float32 else "D"
        if np.isnan(v):
            return f"GC_NAN_{suffix}"
        if np.isinf(v):
            return f"GC_INF_{suffix}" if v > 0 else f"(-GC_INF_{suffix})"
        if d == np.float32:
            v = float(np.float32(v))
            text = repr(v)
            return text + "f" if ("." in text or "e" in text) else text + ".0f"
        text = repr(v)
        return text if ("." in text or "e" in text) else text + ".0"
    v = int(value)
    if d.itemsize == 8:
        return f"{v}LL" if v != -2**63 else "(-9223372036854775807LL - 1)"
    return str(v)


_FMATH = {"sqrt": "sqrt", "exp": "exp", "log": "log", "expm1": "expm1", "log1p": "log1p",
          "erf": "erf", "floor": "floor", "abs": "fabs", "pow": "pow", "mod": "fmod"}


def fmath(name, dtype) -> str:
    base = _FMATH[name]
    return base + "f" if np.dtype(dtype) == np.float32 else base


def children(e):
    if isinstance(e, K.Load):
        return (e.index,)
    if isinstance(e, K.BinOp):
        return (e.a, e.b)
    if isinstance(e, K.UnOp):
        return (e.a,)
    if isinstance(e, K.Select):
        return (e.cond, e.a, e.b)
    if isinstance(e, K.Cast):
        return (e.a,)
    return ()


def _walk(e):
    """Each distinct node of the expression DAG once."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend(children(x))


def nonneg(e) -> bool:
    """Provably >= 0 (index arithmetic over loop variables and constants)."""
    if isinstance(e, K.Const):
        return e.dtype.kind in "iu" and int(e.value) >= 0
    if isinstance(e, K.Var):
        return True
    if isinstance(e, K.BinOp) and e.op in ("add", "mul", "div", "mod", "max", "min"):
        return nonneg(e.a) and nonneg(e.b)
    if isinstance(e, K.Select):
        return nonneg(e.a) and nonneg(e.b)
    return False


class Namer:
    """Unique C identifiers for IR objects (several Vars may share a name)."""

    def __init__(self, reserved=()):
        self.used = set(reserved)
        self.names: dict = {}

    def fresh(self, hint):
        hint = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in hint) or "t"
        if hint[0].isdigit():
            hint = "_" + hint
        name, k = hint, 1
        while name in self.used:
            name = f"{hint}_{k}"
            k += 1
        self.used.add(name)
        return name

    def of(self, obj, hint):
        n = self.names.get(id(obj))
        if n is None:
            n = self.names[id(obj)] = self.fresh(hint)
        return n


class ExprWriter:
    def __init__(self, namer: Namer, bufname):
        self.namer = namer
        self.bufname = bufname          # Buffer -> C name
        self.temps: dict = {}           # id(expr) -> temp name (current statement)
        self.by_key: dict = {}          # structural key -> C text (reduction combiners)
        self.wrap_all = False           # hashing statement: every integer op wraps

    # ---------------------------------------------------------------- temporaries
    def prepare(self, roots) -> list:
        """Declarations of the shared sub-expressions of `roots` (call before emit).

        Also decides whether the statement's integer arithmetic must wrap in every
        position (it hashes: xor / logical shifts)."""
        self.wrap_all = any(isinstance(x, K.BinOp) and x.op in ("xor", "lshr")
                            for r in roots for x in _walk(r))
        counts: dict = {}

        def count(e):
            counts[id(e)] = counts.get(id(e), 0) + 1
            if counts[id(e)] == 1:
                for c in children(e):
                    count(c)
        for r in roots:
            count(r)
        decls, done = [], set()

        def visit(e):
            if id(e) in done:
                return
            done.add(id(e))
            for c in children(e):
                visit(c)
            if counts[id(e)] > 1 and isinstance(e, (K.Load, K.BinOp, K.UnOp, K.Select, K.Cast)):
                t = self.namer.fresh("e")
                decls.append(f"const {ctype(e.dtype)} {t} = {self.emit(e)};")
                self.temps[id(e)] = t
        for r in roots:
            visit(r)
        return decls

    def clear(self):
        self.temps = {}
        self.wrap_all = False

    # ---------------------------------------------------------------- expressions
    def emit(self, e) -> str:
        t = self.temps.get(id(e))
        if t is not None:
            return t
        if self.by_key:
            t = self.by_key.get(key(e))
            if t is not None:
                return t
        return getattr(self, "e_" + type(e).__name__)(e)

    def e_Const(self, e):
        return const(e.value, e.dtype)

    def e_Var(self, e):
        return self.namer.of(e, e.name)

    def e_Local(self, e):
        return self.namer.of(e, e.name)

    def e_Load(self, e):
        return f"{self.bufname(e.buf)}[{self.emit(e.index)}]"

    def e_Cast(self, e):
        a = self.emit(e.a)
        if e.dtype == K.BOOL:
            return f"({a} != 0)"
        return f"(({ctype(e.dtype)}){a})"

    def e_Select(self, e):
        return f"({self.emit(e.cond)} ? {self.emit(e.a)} : {self.emit(e.b)})"

    def e_UnOp(self, e):
        a = self.emit(e.a)
        d = e.a.dtype
        isf = d.kind == "f"
        op = e.op
        if op == "neg":
            return f"(-{a})" if d != K.BOOL else a
        if op == "not":
            return f"(!{a})"
        if op == "isnan":
            return f"({a} != {a})" if isf else "false"
        if op == "abs":
            if isf:
                return f"{fmath('abs', d)}({a})"
            return a if d == K.BOOL else f"({a} < 0 ? -{a} : {a})"
        if op == "sign":
            z, o = const(0, d), const(1, d)
            return f"({a} > {z} ? {o} : ({a} < {z} ? {const(-1, d)} : {a}))"
        if op == "recip":
            return f"({const(1.0, d)} / {a})"
        if op in ("sqrt", "exp", "log", "expm1", "log1p", "erf", "floor"):
            if not isf:
                raise NotLoweredError(f"{op} of {d} in the cuda backend")
            return f"{fmath(op, d)}({a})"
        raise NotLoweredError(f"unary op {op} in the cuda backend")

    _SYM = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
            "eq": "==", "ne": "!="}

    def e_BinOp(self, e):
        a, b = self.emit(e.a), self.emit(e.b)
        d = e.a.dtype
        op = e.op
        if op in K.COMPARE:
            return f"({a} {self._SYM[op]} {b})"
        if d == K.BOOL:
            if op == "xor":
                return f"({a} != {b})"
            if op in ("add", "max", "or"):
                return f"({a} || {b})"
            if op in ("mul", "min", "and"):
                return f"({a} && {b})"
            if op == "sub":
                return f"({a} != {b})"
        if op == "and":
            return f"({a} & {b})"
        if op == "or":
            return f"({a} | {b})"
        if op == "xor":
            return f"({a} ^ {b})"
        if op == "lshr":
            return f"gc_lshr({a}, {b})"
        if op in ("add", "sub", "mul"):
            if d.kind == "i" and d.itemsize in (4, 8) and (self.wrap_all or d != K.INDEX):
                # data arithmetic wraps like NumPy (index arithmetic cannot overflow)
                return f"gc_w{op}({a}, {b})"
            return f"({a} {self._SYM[op]} {b})"
        if op == "max":
            return f"({a} >= {b} ? {a} : {b})"
        if op == "min":
            return f"({a} <= {b} ? {a} : {b})"
        if d.kind == "f":
            if op == "div":
                return f"({a} / {b})"
            if op in ("pow", "mod"):
                return f"{fmath(op, d)}({a}, {b})"
        if op in ("div", "mod"):
            if nonneg(e.a) and isinstance(e.b, K.Const) and int(e.b.value) > 0:
                return f"({a} {'/' if op == 'div' else '%'} {b})"
            return f"gc_floor{op}({a}, {b})"
        raise NotLoweredError(f"binary op {op} on {d} in the cuda backend")


class StmtWriter:
    """Statements, indented; `atomic` holds ids of buffers updated with atomicAdd."""

    def __init__(self, ew: ExprWriter, atomic=frozenset()):
        self.ew = ew
        self.atomic = atomic
        self.lines: list = []

    def out(self, depth, text):
        self.lines.append("  " * depth + text)

    def stmts(self, body, depth):
        for s in body:
            self.stmt(s, depth)

    def stmt(self, s, depth):
        ew = self.ew
        if isinstance(s, K.Loop):
            v = ew.emit(s.var)
            if s.kind == "unroll":
                self.out(depth, "#pragma unroll")
            self.out(depth, f"for (long long {v} = 0; {v} < {s.extent}LL; ++{v}) {{")
            self.stmts(s.body, depth + 1)
            self.out(depth, "}")
            return
        if isinstance(s, K.If):
            decls = ew.prepare([s.cond])
            for d in decls:
                self.out(depth, d)
            self.out(depth, f"if ({ew.emit(s.cond)}) {{")
            ew.clear()
            self.stmts(s.body, depth + 1)
            self.out(depth, "}")
            return
        if isinstance(s, K.Store):
            from .analysis import _rmw_add
            added = _rmw_add(s) if id(s.buf) in self.atomic else None
            roots = [s.index, added if added is not None else s.value]
            for d in ew.prepare(roots):
                self.out(depth, d)
            target = f"{ew.bufname(s.buf)}[{ew.emit(s.index)}]"
            if added is not None:
                self.out(depth, f"atomicAdd(&{target}, {ew.emit(added)});")
            else:
                self.out(depth, f"{target} = {ew.emit(s.value)};")
            ew.clear()
            return
        if isinstance(s, K.Assign):
            for d in ew.prepare([s.value]):
                self.out(depth, d)
            self.out(depth, f"{ew.emit(s.local)} = {ew.emit(s.value)};")
            ew.clear()
            return
        raise NotLoweredError(f"statement {type(s).__name__} inside a cuda thread body")
