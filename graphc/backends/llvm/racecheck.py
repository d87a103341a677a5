"""Static check of a multi-threaded entry: no two threads touch the same bytes
in one phase unless both only read them.

A phase is the stretch of kernels between two barriers (runtime._entry puts a
barrier only where the arena ranges of two kernels conflict).  Within a phase
every thread runs its part of each shared kernel and thread 0 also runs the
single-threaded ones, with nothing ordering one thread's kernels against
another's.  So for every pair of kernels a, b of a phase and every pair of
different threads ta (running a) and tb (running b), what ta may write must be
disjoint from what tb may read or write.  The places a kernel touches:

  * its arena buffers and external arrays (runtime._access_ranges; a
    thread-scoped buffer counts as every thread's copy, an external array as
    all of them);
  * hidden scratch that is not in the arena: each packed GEMM's slice of the
    module's workspace (gemm.workspace), which depends on the thread --
    thread t uses [t * stride, t * stride + slice) of `graphc_ws_<dtype>`.

Both come from what the code generator actually emitted (the module's
recorded GEMM sites and its workspace stride), so a change to either that
lets two threads share scratch fails here, at compile time, with the kernels
named -- not as a wrong number one call in a thousand.  `conflicts` runs on
every multi-threaded compile (it is cheap); it compares the chunks of one
kernel only for their scratch.

`chunk_conflicts` (below) compares the chunks of one shared kernel element by
element, and runs on stress builds (GRAPHC_DEBUG_SCHEDULE=shuffle, see
stress.py) and in the tests, as its enumeration costs compile time.
"""
from __future__ import annotations


def phases(barrier_before, n_kernels):
    """Lists of kernel indices between barriers; barrier_before: set of k."""
    out, cur = [], []
    for k in range(n_kernels):
        if k in barrier_before and cur:
            out.append(cur)
            cur = []
        cur.append(k)
    if cur:
        out.append(cur)
    return out


def _touches(k, tid, ranges, ws):
    """(reads, writes) of kernel k on thread tid: lists of (place, lo, hi)."""
    reads, writes = ranges[k]
    reads = [(("slot", s), lo, hi) for s, lo, hi in reads]
    writes = [(("slot", s), lo, hi) for s, lo, hi in writes]
    for buf, size, stride in ws.get(k, ()):
        # packing writes the slice, the micro-kernel reads it back
        r = (("ws", buf), tid * stride, tid * stride + size)
        reads.append(r)
        writes.append(r)
    return reads, writes


def _meet(xs, ys):
    for pa, la, ha in xs:
        for pb, lb, hb in ys:
            if pa == pb and la < hb and lb < ha:
                return pa, max(la, lb), min(ha, hb)
    return None


def conflicts(phase_list, spmd, nthreads, ranges, ws, names=None):
    """Every (kernel a, thread, kernel b, thread, place, [lo, hi)) of one phase where one
    thread writes what another reads or writes.  spmd[k]: all threads run kernel k,
    else thread 0 alone; ws: {k: [(scratch buffer, slice elements, thread stride)]}."""
    names = names or {}
    found = []
    for ph in phase_list:
        actors = [(k, t) for k in ph for t in (range(nthreads) if spmd[k] else (0,))]
        touch = {a: _touches(a[0], a[1], ranges, ws) for a in actors}
        for i, a in enumerate(actors):
            ra, wa = touch[a]
            for b in actors[i + 1:]:
                if a[1] == b[1]:
                    continue     # one thread runs its kernels in order
                rb, wb = touch[b]
                if a[0] == b[0]:  # two chunks of one kernel: only their scratch (see above)
                    ra, wa, rb, wb = ([x for x in v if x[0][0] == "ws"]
                                      for v in (touch[a][0], touch[a][1], rb, wb))
                else:
                    ra, wa = touch[a]
                hit = _meet(wa, rb + wb) or _meet(wb, ra)
                if hit:
                    found.append((names.get(a[0], a[0]), a[1], names.get(b[0], b[0]), b[1])
                                 + hit)
    return found


# ---------------------------------------------------------------- chunks of one kernel
#
# The chunks of one shared kernel run on different threads with no barrier between
# them, so what chunk t writes must be disjoint from what chunk t' reads or writes
# (thread-scoped buffers excepted: each thread has its own copy).  Checked by
# enumerating each chunk's accesses: every index expression is evaluated with NumPy
# over the chunk's iteration points.  An index that depends on loaded data or on a
# local counts as the whole buffer; a kernel with more than MAX_POINTS points in
# some statement is left unchecked (reported, not guessed).  Run on stress builds
# (GRAPHC_DEBUG_SCHEDULE=shuffle) and in the tests: it costs time per compile.

import numpy as _np

from ...kernel import ir as _K

MAX_POINTS = 1 << 20


class _Unknown(Exception):
    """An index this analysis cannot evaluate (depends on data or a local)."""


class _TooBig(Exception):
    pass


def chunk_bounds(extent, part, nt, align=None):
    """[lo, hi) of chunk `part` of range(extent): codegen.KernelEmitter.chunk's formula."""
    if align is None:
        align = 64 if extent >= 64 * 16 else 1
    units = -(-extent // align)
    lo = units * part // nt * align
    hi = min(units * (part + 1) // nt * align, extent)
    return lo, hi


_BIN = {
    "add": _np.add, "sub": _np.subtract, "mul": _np.multiply,
    "max": _np.maximum, "min": _np.minimum,
    "lt": _np.less, "le": _np.less_equal, "gt": _np.greater, "ge": _np.greater_equal,
    "eq": _np.equal, "ne": _np.not_equal,
    "and": _np.bitwise_and, "or": _np.bitwise_or, "xor": _np.bitwise_xor,
}


def _eval(e, env):
    if isinstance(e, _K.Const):
        if e.dtype.kind == "f":
            raise _Unknown
        return _np.asarray(e.value, dtype=e.dtype)
    if isinstance(e, _K.Var):
        if id(e) not in env:
            raise _Unknown
        return env[id(e)]
    if isinstance(e, _K.BinOp):
        if e.a.dtype.kind == "f":
            raise _Unknown
        a, b = _eval(e.a, env), _eval(e.b, env)
        if e.op in _BIN:
            return _BIN[e.op](a, b)
        if e.op in ("div", "mod"):      # codegen: floor division, 0 where b == 0
            safe = _np.where(b == 0, 1, b)
            r = _np.floor_divide(a, safe) if e.op == "div" else _np.mod(a, safe)
            return _np.where(b == 0, 0, r)
        if e.op == "lshr":
            return (a.astype(_np.uint64) >> b.astype(_np.uint64)).astype(_np.int64)
        raise _Unknown
    if isinstance(e, _K.Select):
        return _np.where(_eval(e.cond, env), _eval(e.a, env), _eval(e.b, env))
    if isinstance(e, _K.UnOp) and e.a.dtype.kind != "f":
        a = _eval(e.a, env)
        if e.op == "neg":
            return -a
        if e.op == "abs":
            return _np.abs(a)
        if e.op == "not":
            return ~a
        raise _Unknown
    if isinstance(e, _K.Cast) and e.a.dtype.kind != "f" and e.dtype.kind != "f":
        return _eval(e.a, env).astype(e.dtype)
    raise _Unknown          # Load, Local, float arithmetic


class _Walker:
    """Every element index one chunk of a kernel may read and write, per buffer."""

    def __init__(self):
        self.reads, self.writes = {}, {}

    def touch(self, where, buf, index, env, n):
        try:
            idx = _np.broadcast_to(_eval(index, env), (n,)) if n else _np.zeros(0, _np.int64)
        except _Unknown:
            idx = _np.arange(buf.size)
        where.setdefault(id(buf), (buf, []))[1].append(_np.asarray(idx, dtype=_np.int64))

    def loads(self, e, env, n):
        if isinstance(e, _K.Load):
            self.touch(self.reads, e.buf, e.index, env, n)
            self.loads(e.index, env, n)
        for name in ("a", "b", "cond", "index", "value"):
            sub = getattr(e, name, None)
            if isinstance(sub, _K.Expr) and not isinstance(e, _K.Load):
                self.loads(sub, env, n)

    def region(self, where, op, rows, cols, env, n):
        buf, off, rs, cs = op
        if n * rows * cols > MAX_POINTS:
            raise _TooBig
        r = _np.arange(rows)[:, None] * rs + _np.arange(cols)[None, :] * cs
        try:
            base = _np.broadcast_to(_eval(off, env), (n,))
        except _Unknown:
            base = None
        if base is None:
            idx = _np.arange(buf.size)
        else:
            idx = (base[:, None] + r.reshape(1, -1)).reshape(-1)
        where.setdefault(id(buf), (buf, []))[1].append(idx.astype(_np.int64))

    def gemm(self, g, env, n, m_range=None, n_range=None):
        m0, m1 = m_range or (0, g.M)
        n0, n1 = n_range or (0, g.N)
        a, b, c = g.a, g.b, g.c
        shift = lambda op, k: (op[0], _K.add(op[1], k) if k else op[1], op[2], op[3])
        self.region(self.reads, shift(a, m0 * a[2]), m1 - m0, g.K, env, n)
        self.region(self.reads, shift(b, n0 * b[3]), g.K, n1 - n0, env, n)
        cc = shift(c, m0 * c[2] + n0 * c[3])
        self.region(self.writes, cc, m1 - m0, n1 - n0, env, n)
        if g.accumulate:
            self.region(self.reads, cc, m1 - m0, n1 - n0, env, n)
        for op in (a, b, c):
            self.loads(op[1], env, n)

    def stmts(self, body, env, n):
        for s in body:
            if isinstance(s, _K.Loop):
                self.loop(s, 0, s.extent, env, n)
            elif isinstance(s, _K.If):
                self.loads(s.cond, env, n)
                try:
                    keep = _np.broadcast_to(_eval(s.cond, env), (n,)).astype(bool)
                    env2 = {k: (v[keep] if _np.ndim(v) else v) for k, v in env.items()}
                    self.stmts(s.body, env2, int(keep.sum()))
                except _Unknown:
                    self.stmts(s.body, env, n)
            elif isinstance(s, _K.Store):
                self.touch(self.writes, s.buf, s.index, env, n)
                self.loads(s.index, env, n)
                self.loads(s.value, env, n)
            elif isinstance(s, _K.Assign):
                self.loads(s.value, env, n)
            elif isinstance(s, _K.Gemm):
                self.gemm(s, env, n)
            else:
                raise _TooBig         # a statement this does not know: unchecked

    def loop(self, s, lo, hi, env, n):
        ext = max(hi - lo, 0)
        if n * ext > MAX_POINTS:
            raise _TooBig
        env2 = {k: _np.repeat(v, ext) if _np.ndim(v) else v for k, v in env.items()}
        env2[id(s.var)] = _np.tile(_np.arange(lo, hi, dtype=_np.int64), n)
        self.stmts(s.body, env2, n * ext)


def chunk_conflicts(kern, nthreads, gemm_split):
    """(buffer name, chunk, chunk, first shared element) for every pair of chunks of a
    shared kernel where one writes what the other reads or writes; None when the
    kernel is too large (or too unusual) to enumerate.  gemm_split: {id(gemm): (axis,
    align)} as gemm.emit_gemm shared out its top-level GEMMs ('tid0': thread 0 alone)."""
    chunks = []
    try:
        for t in range(nthreads):
            w = _Walker()
            for s in kern.body:
                if isinstance(s, _K.Loop):
                    w.loop(s, *chunk_bounds(s.extent, t, nthreads), {}, 1)
                elif isinstance(s, _K.Gemm):
                    axis, align = gemm_split.get(id(s), ("tid0", None))
                    if axis == "loops":        # its reference loop nest, shared out
                        for lp in s.as_loops():
                            w.loop(lp, *chunk_bounds(lp.extent, t, nthreads), {}, 1)
                    elif axis == "tid0":
                        if t == 0:
                            w.gemm(s, {}, 1)
                    elif axis == "M":
                        w.gemm(s, {}, 1, m_range=chunk_bounds(s.M, t, nthreads, align))
                    else:
                        w.gemm(s, {}, 1, n_range=chunk_bounds(s.N, t, nthreads, align))
                else:
                    return None
            chunks.append(w)
    except _TooBig:
        return None

    def masks(where):       # buffer -> which elements (a bool per element)
        out = {}
        for k, (buf, parts) in where.items():
            if buf.scope == "thread":
                continue
            m = _np.zeros(buf.size, dtype=bool)
            for idx in parts:
                m[idx[(idx >= 0) & (idx < buf.size)]] = True
            out[k] = (buf, m)
        return out
    w_sets = [masks(c.writes) for c in chunks]
    r_sets = [masks(c.reads) for c in chunks]
    found = []
    for t in range(nthreads):
        for u in range(nthreads):
            if t == u:
                continue
            for k, (buf, wt) in w_sets[t].items():
                for other in (w_sets[u], r_sets[u]):
                    if k in other:
                        both = wt & other[k][1]
                        if both.any():
                            found.append((buf.name, t, u, int(both.argmax())))
    return found
