"""Which loops of a kernel-IR loop nest may run as independent CUDA threads.

The kernel IR's loops are mostly tagged "serial"/"vector" (they were written
for one CPU thread), so the CUDA backend decides itself what is parallel.  A
set P of loop variables of a perfect loop chain may become thread (or block)
indices when, for every buffer the nest writes, distinct P-tuples write
disjoint elements, and every read of a written buffer is at the very index the
same iteration writes.  Disjointness is proved on the affine form of the store
index: ``index = sum_p c_p * p + rest`` where no P variable occurs in ``rest``;
sorting P by |c_p|, each stride must exceed the span of everything below it
(a mixed-radix numbering).  Indices are compared by their affine form (loops of
extent 1 folded away); several stores of an iteration into one buffer that
differ by constants are proved disjoint as one index plus an offset variable.

Read-modify-write adds (``b[i] = b[i] + v`` with no other access to ``b``)
need no such proof: they become ``atomicAdd``.
"""
from __future__ import annotations

import threading
from math import gcd, prod

from ...kernel import ir as K


# ------------------------------------------------------------------ walking
def walk_exprs(e):
    """e and its sub-expressions, each distinct node once (expressions are DAGs: an
    activation uses its argument several times, and chains of them would blow up)."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, K.Load):
            stack.append(x.index)
        elif isinstance(x, K.BinOp):
            stack += [x.a, x.b]
        elif isinstance(x, K.UnOp):
            stack.append(x.a)
        elif isinstance(x, K.Select):
            stack += [x.cond, x.a, x.b]
        elif isinstance(x, K.Cast):
            stack.append(x.a)


def stmt_exprs(s):
    """The expressions a statement evaluates directly (not those of nested bodies)."""
    if isinstance(s, K.Store):
        return [s.index, s.value]
    if isinstance(s, K.Assign):
        return [s.value]
    if isinstance(s, K.If):
        return [s.cond]
    if isinstance(s, K.Gemm):
        return [s.a[1], s.b[1], s.c[1]]
    return []


def walk_stmts(body):
    for s in body:
        yield s
        if isinstance(s, (K.Loop, K.If)):
            yield from walk_stmts(s.body)
        elif isinstance(s, K.Gemm):
            pass


def all_exprs(body):
    for s in walk_stmts(body):
        for e in stmt_exprs(s):
            yield from walk_exprs(e)


def locals_touched(body) -> set:
    out = set()
    for s in walk_stmts(body):
        if isinstance(s, K.Assign):
            out.add(id(s.local))
    for e in all_exprs(body):
        if isinstance(e, K.Local):
            out.add(id(e))
    return out


def locals_assigned(body) -> set:
    return {id(s.local) for s in walk_stmts(body) if isinstance(s, K.Assign)}


def locals_read(body) -> set:
    return {id(e) for e in all_exprs(body) if isinstance(e, K.Local)}


def contains_gemm(body) -> bool:
    return any(isinstance(s, K.Gemm) for s in walk_stmts(body))


_tls = threading.local()


def reset_keys():
    """Start a fresh table of structural keys (codegen does, per program)."""
    _tls.table = {}


def key(e, memo=None) -> int:
    """A structural key: equal keys compute the same value at the same point.

    Keys are interned integers (a node's key is its tag plus its children's keys),
    so expression DAGs cost one step per distinct node and compare in O(1)."""
    table = getattr(_tls, "table", None)
    if table is None:
        table = _tls.table = {}
    if memo is None:
        memo = {}
    k = memo.get(id(e))
    if k is not None:
        return k
    if isinstance(e, K.Const):
        t = ("c", str(e.dtype), repr(e.value))
    elif isinstance(e, (K.Var, K.Local)):
        t = ("v", id(e))
    elif isinstance(e, K.Load):
        t = ("ld", id(e.buf), key(e.index, memo))
    elif isinstance(e, K.BinOp):
        t = ("b", e.op, key(e.a, memo), key(e.b, memo))
    elif isinstance(e, K.UnOp):
        t = ("u", e.op, key(e.a, memo))
    elif isinstance(e, K.Select):
        t = ("s", key(e.cond, memo), key(e.a, memo), key(e.b, memo))
    elif isinstance(e, K.Cast):
        t = ("t", str(e.dtype), key(e.a, memo))
    else:
        raise TypeError(type(e))
    k = table.setdefault(t, len(table))
    memo[id(e)] = k
    return k


def free_vars(e) -> set:
    return {id(x) for x in walk_exprs(e) if isinstance(x, K.Var)}


def has_local(e) -> bool:
    return any(isinstance(x, (K.Local, K.Load)) for x in walk_exprs(e))


# ------------------------------------------------------------------ chains
def loop_chain(s):
    """The perfectly nested loops starting at s, and the innermost body."""
    chain = [s]
    while len(chain[-1].body) == 1 and isinstance(chain[-1].body[0], K.Loop):
        chain.append(chain[-1].body[0])
    return chain, chain[-1].body


# ------------------------------------------------------------------ affine forms
def linear(e, ranges=None):
    """(coefficients {id(var): int}, constant, [(multiplier, opaque expr)]) of an index.

    With `ranges`, floor division and modulo by a positive constant of an affine
    expression are resolved when the part not divisible by the constant provably
    stays in [0, c): (c*q + r) // c = q and (c*q + r) % c = r.
    """
    if isinstance(e, K.Const) and e.dtype == K.INDEX:
        return {}, int(e.value), []
    if isinstance(e, K.Var):
        return {id(e): 1}, 0, []
    if isinstance(e, K.BinOp) and e.op in ("add", "sub"):
        ca, ka, oa = linear(e.a, ranges)
        cb, kb, ob = linear(e.b, ranges)
        s = 1 if e.op == "add" else -1
        c = dict(ca)
        for v, x in cb.items():
            c[v] = c.get(v, 0) + s * x
        return c, ka + s * kb, oa + [(s * m, x) for m, x in ob]
    if isinstance(e, K.BinOp) and e.op == "mul":
        ca, ka, oa = linear(e.a, ranges)
        cb, kb, ob = linear(e.b, ranges)
        if not ca and not oa:
            return {v: ka * x for v, x in cb.items()}, ka * kb, [(ka * m, x) for m, x in ob]
        if not cb and not ob:
            return {v: kb * x for v, x in ca.items()}, ka * kb, [(kb * m, x) for m, x in oa]
    if (ranges is not None and isinstance(e, K.BinOp) and e.op in ("div", "mod")
            and isinstance(e.b, K.Const) and int(e.b.value) > 0):
        c = int(e.b.value)
        co, k, op = linear(e.a, ranges)
        if not op:
            q = {v: x // c for v, x in co.items() if x % c == 0}
            r = {v: x for v, x in co.items() if x % c != 0}
            lo = hi = k % c
            ok = True
            for v, x in r.items():
                rg = ranges.get(v)
                if rg is None:
                    ok = False
                    break
                lo += min(x * rg[0], x * rg[1])
                hi += max(x * rg[0], x * rg[1])
            if ok and 0 <= lo and hi < c:
                if e.op == "div":
                    return q, k // c, []
                return r, k % c, []
    return {}, 0, [(1, e)]


def interval(e, ranges):
    """Bounds (lo, hi) of an integer expression, or None when unknown.

    ranges: {id(var): (lo, hi)}.  Locals and loads are unknown.
    """
    if isinstance(e, K.Const):
        v = int(e.value)
        return v, v
    if isinstance(e, K.Var):
        return ranges.get(id(e))
    if isinstance(e, K.Select):
        a, b = interval(e.a, ranges), interval(e.b, ranges)
        if a is None or b is None:
            return None
        return min(a[0], b[0]), max(a[1], b[1])
    if isinstance(e, K.BinOp) and e.op in ("add", "sub", "mul", "max", "min"):
        a, b = interval(e.a, ranges), interval(e.b, ranges)
        if a is None or b is None:
            return None
        if e.op == "add":
            return a[0] + b[0], a[1] + b[1]
        if e.op == "sub":
            return a[0] - b[1], a[1] - b[0]
        if e.op == "max":
            return max(a[0], b[0]), max(a[1], b[1])
        if e.op == "min":
            return min(a[0], b[0]), min(a[1], b[1])
        ps = [x * y for x in a for y in b]
        return min(ps), max(ps)
    if isinstance(e, K.BinOp) and e.op in ("div", "mod"):
        a, b = interval(e.a, ranges), interval(e.b, ranges)
        if a is None or b is None or b[0] != b[1] or b[0] <= 0 or a[0] < 0:
            return None
        if e.op == "div":
            return a[0] // b[0], a[1] // b[0]
        return 0, min(b[0] - 1, a[1])
    return None


def _disjoint(index, P, ranges, fixed=frozenset()):
    """True if distinct values of the vars in P give disjoint index values, whatever
    the other loop variables do (those in `fixed` are the same for all threads)."""
    coef, _, opaque = linear(index, ranges)
    Pids = {id(v) for v in P}
    span = 0
    varying_opaque = False
    for m, x in opaque:
        fv = free_vars(x)
        if fv & Pids:
            return False
        if not (fv - fixed) and not has_local(x):
            continue          # a constant offset
        if has_local(x):
            return False      # a value computed inside the nest: unknown
        iv = interval(x, ranges)
        if iv is None:
            return False
        varying_opaque = True
        span += abs(m) * (iv[1] - iv[0])
    if not varying_opaque and all(coef.get(id(v), 0) or ranges[id(v)][0] == ranges[id(v)][1]
                                  for v in P) and _injective(coef, ranges, fixed):
        return True           # the whole index is a mixed-radix number of its loops
    for v, c in coef.items():
        if v not in Pids and v not in fixed:
            lo, hi = ranges[v]
            span += abs(c) * (hi - lo)
    for v in sorted(P, key=lambda v: abs(coef.get(id(v), 0))):
        lo, hi = ranges[id(v)]
        if hi == lo:
            continue
        c = abs(coef.get(id(v), 0))
        if c <= span:
            return False
        span += c * (hi - lo)
    return True


def _injective(coef, ranges, fixed):
    """sum c_v * v is one-to-one over the varying loops (strides sorted, each larger
    than the span of all smaller ones)."""
    span = 0
    terms = sorted((abs(c), ranges[v][1] - ranges[v][0]) for v, c in coef.items()
                   if v not in fixed and ranges.get(v) and ranges[v][1] > ranges[v][0])
    for c, w in terms:
        if c <= span:
            return False
        span += c * w
    return True


def _rmw_add(s):
    """The added value if s is `b[i] = b[i] + v` (v not reading b), else None."""
    if not isinstance(s, K.Store) or not isinstance(s.value, K.BinOp) or s.value.op != "add":
        return None
    if s.buf.dtype.name not in ("float32", "float64", "int32"):   # CUDA's atomicAdd types
        return None
    for load, other in ((s.value.a, s.value.b), (s.value.b, s.value.a)):
        if isinstance(load, K.Load) and load.buf is s.buf and key(load.index) == key(s.index):
            if not any(isinstance(x, K.Load) and x.buf is s.buf for x in walk_exprs(other)):
                return other
    return None


def index_form(e, ranges):
    """A canonical form of an index expression: (affine terms, constant, opaque parts).

    Loop variables whose range is a single value are folded into the constant, so
    ``v[d0*N + i]`` and ``v[i]`` with d0 in 0..1 are the same element (lowerings
    drop a unit batch dimension on one side of an in-place update)."""
    coef, k, opaque = linear(e, ranges)
    terms = []
    for v, c in coef.items():
        rg = ranges.get(v)
        if c == 0:
            continue
        if rg is not None and rg[0] == rg[1]:
            k += c * rg[0]
        else:
            terms.append((v, c))
    return frozenset(terms), k, tuple(sorted((m, key(x)) for m, x in opaque))


def _union_index(indices, ranges):
    """One index expression standing for several stores of an iteration that differ
    only in a constant offset (an unrolled window: b[2t], b[2t + 1]): the common
    affine part plus u * step, u a fresh variable over the offsets' range (added to
    `ranges`).  None when the stores differ otherwise."""
    forms = [index_form(e, ranges) for e in indices]
    terms = {f[0] for f in forms}
    if len(terms) != 1 or any(f[2] for f in forms):
        return None
    byid = {id(x): x for e in indices for x in walk_exprs(e) if isinstance(x, K.Var)}
    ks = sorted({f[1] for f in forms})
    step = 0
    for k in ks[1:]:
        step = gcd(step, k - ks[0])
    e = K.idx(ks[0])
    for v, c in next(iter(terms)):
        e = K.add(e, K.mul(byid[v], c))
    if step:
        u = K.Var("u")
        ranges[id(u)] = (0, (ks[-1] - ks[0]) // step)
        e = K.add(e, K.mul(u, step))
    return e


class Parallel:
    """The result of `choose_parallel`: the thread variables (outer to inner as in
    the chain), the serial rest of the chain, and the buffers updated atomically."""

    def __init__(self, pvars, serial, atomic):
        self.pvars, self.serial, self.atomic = pvars, serial, atomic

    @property
    def extent(self):
        return prod(l.extent for l in self.pvars)


def writes_thread_scratch(body) -> bool:
    return any(isinstance(s, K.Store) and getattr(s.buf, "scope", "global") == "thread"
               for s in walk_stmts(body)) or any(
        isinstance(s, K.Gemm) and getattr(s.c[0], "scope", "global") == "thread"
        for s in walk_stmts(body))


def choose_parallel(chain, body, outer_ranges, fixed=frozenset(), top=False) -> Parallel:
    """Pick thread variables among the loops of `chain` (see the module docstring).

    outer_ranges: ranges of variables bound outside the chain; `fixed`: ids of
    those that are the same for every thread (host loops, block indices).
    top: the chain starts at the top of a kernel, where the IR's "parallel" tag
    promises independent iterations (trusted unless they share thread scratch).
    """
    ranges = dict(outer_ranges)
    for l in chain:
        ranges[id(l.var)] = (0, max(l.extent - 1, 0))
    for s in walk_stmts(body):
        if isinstance(s, K.Loop):
            ranges[id(s.var)] = (0, max(s.extent - 1, 0))
    stores = [s for s in walk_stmts(body) if isinstance(s, K.Store)]
    written = {id(s.buf) for s in stores}
    # every read of a written buffer: (buf id, index key)
    reads: dict = {}
    for s in walk_stmts(body):
        for e in stmt_exprs(s):
            for x in walk_exprs(e):
                if isinstance(x, K.Load) and id(x.buf) in written:
                    reads.setdefault(id(x.buf), {})[key(x.index)] = x.index
    atomic_ok = set()
    for b in written:
        bs = [s for s in stores if id(s.buf) == b]
        if all(_rmw_add(s) is not None for s in bs):
            n_reads = sum(1 for s in walk_stmts(body) for e in stmt_exprs(s)
                          for x in walk_exprs(e) if isinstance(x, K.Load) and id(x.buf) == b)
            if n_reads == len(bs):
                atomic_ok.add(b)

    trusted = set()
    if top and chain[0].kind == "parallel" and not writes_thread_scratch(chain[0].body):
        trusted.add(id(chain[0]))
    fixed_t = set(fixed) | {id(l.var) for l in chain if id(l) in trusted}

    def check(P, use_atomic):
        if all(id(l) in trusted for l in P):
            return True
        P = [l for l in P if id(l) not in trusted]
        for b in written:
            if use_atomic and b in atomic_ok:
                continue
            bs = [s for s in stores if id(s.buf) == b]
            ks = {index_form(s.index, ranges) for s in bs}
            rs = {index_form(e, ranges) for e in reads.get(b, {}).values()}
            # every read of b is at an element the same iteration writes
            index, r = bs[0].index, ranges
            if len(ks) > 1:      # several stores: their union must be a disjoint set
                r = dict(ranges)
                index = _union_index([s.index for s in bs], r)
            if index is None or rs - ks:
                if P:
                    return False
                continue
            if not _disjoint(index, [l.var for l in P], r, fixed_t):
                return False
        return True

    def best(use_atomic):
        """The subset of the chain with the most threads that passes (chains are short)."""
        cand = [l for l in chain if l.extent > 1]
        subsets = []
        for mask in range(1 << len(cand)):
            Q = [l for k, l in enumerate(cand) if mask >> k & 1]
            subsets.append((prod(l.extent for l in Q), mask, Q))
        for _, _, Q in sorted(subsets, key=lambda t: (-t[0], -t[1])):
            if check(Q, use_atomic):
                return Q
        return []

    strict = best(False)
    P, atomic = strict, set()
    if atomic_ok and prod(l.extent for l in strict) < prod(l.extent for l in chain):
        relaxed = best(True)
        if prod(l.extent for l in relaxed) > prod(l.extent for l in strict):
            P, atomic = relaxed, atomic_ok
    pids = {id(l) for l in P}
    return Parallel(P, [l for l in chain if id(l) not in pids], atomic)


# ------------------------------------------------------------------ reductions
def reduction_of(chain, body, acc_ids=None):
    """If the chain accumulates into one local (`acc = E(acc, v)`), return
    (local, E, v, identity kind), else None."""
    if len(body) != 1 or not isinstance(body[0], K.Assign):
        return None
    s = body[0]
    acc, E = s.local, s.value
    # the maximal sub-expressions of E not reading acc must all be one value v
    others = []
    done = set()

    def collect(e):
        if id(e) in done:
            return
        done.add(id(e))
        if not any(x is acc for x in walk_exprs(e)):
            others.append(e)
            return
        if isinstance(e, K.BinOp):
            collect(e.a)
            collect(e.b)
        elif isinstance(e, K.UnOp):
            collect(e.a)
        elif isinstance(e, K.Select):
            collect(e.cond)
            collect(e.a)
            collect(e.b)
        elif isinstance(e, K.Cast):
            collect(e.a)
    collect(E)
    if not others:
        return None
    # v: the per-iteration value; every other acc-free part must be a function of v
    # alone (as isnan(v) in NumPy's maximum), so that E(a, b) is E with acc=a, v=b
    v = min(others, key=lambda o: sum(1 for _ in walk_exprs(o)))
    kv = key(v)
    for o in others:
        if not _only_of(o, kv):
            return None
    if any(x is acc for x in walk_exprs(v)) or v.dtype != acc.dtype:
        return None
    kind = _identity_kind(E, acc, v)
    if kind is None:
        return None
    return acc, E, v, kind


def _only_of(e, kv, memo=None) -> bool:
    """e is built from the value with key kv and constants only."""
    memo = {} if memo is None else memo
    r = memo.get(id(e))
    if r is None:
        if key(e) == kv:
            r = True
        elif isinstance(e, (K.Var, K.Local, K.Load)):
            r = False
        else:
            from .cexpr import children
            r = all(_only_of(c, kv, memo) for c in children(e))
        memo[id(e)] = r
    return r


def _identity_kind(E, acc, v):
    if isinstance(E, K.BinOp):
        pair = {key(E.a), key(E.b)} == {key(acc), key(v)}
        if pair and E.op in ("add", "or", "max", "min", "and"):
            return E.op
        return None
    if isinstance(E, K.Select):
        # NumPy's maximum/minimum: select(isnan(v) | v >= acc, v, acc)
        if key(E.a) == key(v) and key(E.b) == key(acc):
            for x in walk_exprs(E.cond):
                if isinstance(x, K.BinOp) and {key(x.a), key(x.b)} == {key(acc), key(v)}:
                    if x.op in ("ge", "gt"):
                        return "max" if key(x.a) == key(v) else None
                    if x.op in ("le", "lt"):
                        return "min" if key(x.a) == key(v) else None
    return None


def reduction_with_prelude(chain, body):
    """A reduction whose iterations first compute private scalars: `body` is a
    prelude of assignments and loops over locals (no stores), then `acc = E(acc, v)`
    with v reading those locals (a mean of per-row losses).  Every local of the
    prelude must be assigned in the iteration before it is read, so iterations
    share nothing but acc and may run on different threads.  Returns
    (local, E, v, identity kind, prelude) or None."""
    if len(body) < 2 or not isinstance(body[-1], K.Assign):
        return None
    red = reduction_of(chain, body[-1:])
    if red is None:
        return None
    acc, prelude = red[0], body[:-1]
    defined = set()
    for s in prelude:
        if isinstance(s, K.Assign):
            if locals_read([s]) - defined or s.local is acc:
                return None
            defined.add(id(s.local))
        elif isinstance(s, K.Loop) and s.extent >= 1:
            if any(isinstance(x, (K.Store, K.Gemm, K.If)) for x in walk_stmts(s.body)):
                return None
            mine = locals_assigned([s])
            if locals_read([s]) - defined - mine or id(acc) in mine:
                return None
            # a local first assigned inside the loop must not carry between its iterations
            if (mine - defined) & locals_read([s]):
                return None
            defined |= mine
        else:
            return None
    return red + (prelude,)



def substitute(e, kv, new, memo=None):
    """e with every sub-expression whose structural key is kv replaced by `new`."""
    memo = {} if memo is None else memo
    r = memo.get(id(e))
    if r is not None:
        return r
    if key(e) == kv:
        r = new
    elif isinstance(e, K.Load):
        i = substitute(e.index, kv, new, memo)
        r = e if i is e.index else K.Load(e.buf, i)
    elif isinstance(e, K.BinOp):
        a, b = substitute(e.a, kv, new, memo), substitute(e.b, kv, new, memo)
        r = e if (a is e.a and b is e.b) else K.BinOp(e.op, a, b, e.reassoc)
    elif isinstance(e, K.UnOp):
        a = substitute(e.a, kv, new, memo)
        r = e if a is e.a else K.UnOp(e.op, a)
    elif isinstance(e, K.Select):
        c, a, b = (substitute(x, kv, new, memo) for x in (e.cond, e.a, e.b))
        r = e if (c is e.cond and a is e.a and b is e.b) else K.Select(c, a, b)
    elif isinstance(e, K.Cast):
        a = substitute(e.a, kv, new, memo)
        r = e if a is e.a else K.Cast(a, e.dtype)
    else:
        r = e
    memo[id(e)] = r
    return r
