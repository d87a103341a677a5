"""The parallelization decisions, checked by brute force.

The CPU emulator runs threads one after another, so it cannot see a data race
between threads; the race-freedom of the generated kernels rests on
`analysis.choose_parallel` (and on the IR's "parallel" tags, which it trusts).
Here every decision the code generator made for real training graphs is
re-checked by enumerating all iterations: each element a kernel writes
non-atomically must be written by one thread (or block) only, and a thread
must never read an element another thread writes.  Index expressions are
evaluated with NumPy over the whole iteration space (an independent
evaluator, not the generator's C text).
"""
import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import analysis as A
from graphc.ir.graph import Graph
from graphc.kernel import ir as K
from graphc.passes import optimize


class Unsupported(Exception):
    pass


def ev(e, env):
    """Vectorized value of an index expression (NumPy's floor division, as the IR)."""
    if isinstance(e, K.Const):
        return np.int64(int(e.value)) if e.dtype != K.BOOL else np.bool_(bool(e.value))
    if isinstance(e, K.Var):
        return env[id(e)]
    if isinstance(e, (K.Local, K.Load)):
        raise Unsupported(type(e).__name__)
    if isinstance(e, K.Select):
        return np.where(ev(e.cond, env), ev(e.a, env), ev(e.b, env))
    if isinstance(e, K.Cast):
        return np.asarray(ev(e.a, env)).astype(e.dtype)
    if isinstance(e, K.UnOp):
        a = ev(e.a, env)
        return {"neg": lambda: -a, "not": lambda: ~a, "abs": lambda: np.abs(a)}[e.op]()
    a, b = ev(e.a, env), ev(e.b, env)
    ops = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.floor_divide,
           "mod": np.mod, "max": np.maximum, "min": np.minimum, "lt": np.less,
           "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
           "ne": np.not_equal, "and": np.logical_and, "or": np.logical_or}
    return ops[e.op](a, b)


def accesses(body, loops=()):
    """(kind, buffer, index expr, enclosing loops) for every store and load."""
    for s in body:
        if isinstance(s, K.Loop):
            yield from accesses(s.body, loops + (s,))
        elif isinstance(s, K.If):
            yield from accesses(s.body, loops)
        else:
            if isinstance(s, K.Store):
                yield "store", s.buf, s.index, loops
            for e in A.stmt_exprs(s):
                for x in A.walk_exprs(e):
                    if isinstance(x, K.Load):
                        yield "load", x.buf, x.index, loops


def _space(loops):
    uniq = list({id(l): l for l in loops}.values())
    grids = np.meshgrid(*[np.arange(l.extent) for l in uniq], indexing="ij") if uniq else []
    return {id(l.var): g.ravel() for l, g in zip(uniq, grids)}, (grids[0].size if uniq else 1)


def _flat(env, loops, n):
    key = np.zeros(n, np.int64)
    for l in loops:
        key = key * l.extent + env[id(l.var)]
    return key


def check_threads(threads, body, host, atomic, fixed=(), private=()):
    """Distinct `threads` tuples write disjoint elements and read nothing another writes.

    private: ids of buffers every `threads` tuple has its own copy of (a block's
    shared-memory scratch), skipped here; the threads inside a block are checked on
    them separately."""
    per_buf = {}
    for kind, buf, index, loops in accesses(body):
        if id(buf) in atomic or id(buf) in private:
            continue
        dims = list(host) + list(fixed) + list(threads) + list(loops)
        env, n = _space(dims)
        try:
            idx = np.broadcast_to(ev(index, env), (n,))
        except Unsupported:
            if kind == "load":
                continue
            raise AssertionError(f"non-atomic store to {buf.name} at a data-dependent index")
        outer = _flat(env, list(host) + list(fixed), n)
        thread = _flat(env, list(threads), n)
        per_buf.setdefault(id(buf), []).append((kind, outer, idx, thread))
    checked = 0
    for rows in per_buf.values():
        stores = [r for r in rows if r[0] == "store"]
        if not stores:
            continue
        so = np.concatenate([r[1] for r in stores])
        si = np.concatenate([r[2] for r in stores])
        st = np.concatenate([r[3] for r in stores])
        writers = {}
        for o, i, t in zip(so.tolist(), si.tolist(), st.tolist()):
            assert writers.setdefault((o, i), t) == t, "two threads write one element"
        for kind, o_, i_, t_ in rows:
            if kind == "load":
                for o, i, t in zip(o_.tolist(), i_.tolist(), t_.tolist()):
                    w = writers.get((o, i))
                    assert w is None or w == t, "a thread reads what another writes"
        checked += len(si)
    return checked


def check_program(cp):
    n = 0
    # a fused time step runs its parts with the same block/thread decomposition
    launches = [p for la in cp.launches for p in (la.parts or [la])]
    for la in launches:
        m = la.mapping
        assert m is not None, la.name
        if "gemm" in m:
            g = m["gemm"]
            Cb, co, crs, ccs = g.c
            mi, ni = K.Loop(K.Var("m"), g.M, []), K.Loop(K.Var("n"), g.N, [])
            store = K.Store(Cb, K.add(co, K.add(K.mul(mi.var, crs), K.mul(ni.var, ccs))),
                            K.Const(0, Cb.dtype))
            # every (m, n) of a batch entry is one logical writer: the batch index decides
            n += check_threads(m["batch"], [K.Loop(mi.var, g.M, [K.Loop(ni.var, g.N, [store])])],
                               m["host"], set())
        elif "blocks" in m:
            n += check_threads(m["blocks"], m["body"], m["host"], set().union(
                *[par.atomic for _, par in m["inner"]]) if m["inner"] else set(),
                private=m.get("private", ()))
            for s, par in m["inner"]:
                inner_body = A.loop_chain(s)[1]
                for l in reversed(par.serial):
                    inner_body = [K.Loop(l.var, l.extent, inner_body)]
                n += check_threads(par.pvars, inner_body, m["host"], par.atomic,
                                   fixed=m["blocks"])
        else:
            n += check_threads(m["threads"], m["body"], m["host"], m["atomic"])
    return n


def program(inputs, outputs, level=2):
    g, _ = optimize(Graph(list(outputs), list(inputs)), level)
    return C.generate_cuda(g)


# ------------------------------------------------------------------ the checker itself
def test_checker_catches_a_race():
    out = K.Buffer("out", "float32", 4)
    i, j = K.Var("i"), K.Var("j")
    li, lj = K.Loop(i, 4, []), K.Loop(j, 3, [])
    racy = [K.Store(out, i, K.Const(1.0, "float32"))]
    with pytest.raises(AssertionError, match="two threads"):
        check_threads([li, lj], racy, [], set())
    assert check_threads([li], [K.Loop(j, 3, racy)], [], set()) == 12
    shift = [K.Store(out, i, K.Load(out, K.BinOp("mod", K.add(i, 1), K.idx(4))))]
    with pytest.raises(AssertionError, match="reads what another"):
        check_threads([li], shift, [], set())


def test_analysis_refuses_the_race_and_the_shift():
    out = K.Buffer("out", "float32", 4)
    i, j = K.Var("i"), K.Var("j")
    inner = K.Loop(j, 3, [K.Store(out, i, K.Const(1.0, "float32"))])
    chain, body = A.loop_chain(K.Loop(i, 4, [inner]))
    par = A.choose_parallel(chain, body, {})
    assert [l.var for l in par.pvars] == [i] and [l.var for l in par.serial] == [j]
    shift = K.Loop(i, 4, [K.Store(out, i, K.Load(out, K.BinOp("mod", K.add(i, 1),
                                                                     K.idx(4))))])
    assert A.choose_parallel([shift], shift.body, {}).pvars == []


# ------------------------------------------------------------------ real graphs
def _lenet_step(B=2):
    from graphc import models, optim
    m = models.lenet5(rng=np.random.default_rng(0))
    x, y = gc.input("x", (B, 1, 28, 28)), gc.input("y", (B,), dtype="int64")
    opt = optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loss = gc.cross_entropy(m(x), y)
    return [x, y], [loss] + list(opt.updates(loss).values())


def test_lenet_training_step_kernels_are_race_free():
    ins, outs = _lenet_step()
    cp = program(ins, outs)
    assert check_program(cp) > 100_000


def test_conv_pool_and_reduction_kernels_are_race_free():
    x = gc.input("x", (3, 4, 9, 8))
    w = gc.input("w", (6, 2, 3, 2))
    y = gc.conv2d(x, w, stride=(2, 1), padding=((1, 1), (0, 1)), dilation=(1, 2), groups=2)
    p, q = gc.max_pool2d(y, 3, 2, 1), gc.avg_pool2d(y, 2, 1, 0)
    loss = gc.sum(p * p) + gc.sum(q * q) + gc.sum(gc.softmax(gc.reshape(y, (3, -1)), axis=1)) + \
        gc.sum(gc.max(y, axis=(0, 2)))
    dx, dw = gc.grad(loss, [x, w])
    for level in (0, 2):
        cp = program([x, w], [loss, dx, dw], level)
        assert check_program(cp) > 1000


def test_matmul_batched_and_broadcast_kernels_are_race_free():
    a, b = gc.input("a", (3, 1, 20, 7)), gc.input("b", (4, 7, 70))
    c = gc.input("c", (70, 66))
    y = gc.sum(gc.tanh((a @ b) @ c), axis=(0, 1))
    grads = gc.grad(gc.sum(y), [a, b, c])
    cp = program([a, b, c], [y] + grads)
    assert check_program(cp) > 1000


# ------------------------------------------------------------------ random nests
def _random_index(rng, vars_):
    """An index over the loop variables: affine terms, floor div/mod by constants,
    clamps, and a constant offset."""
    e = K.idx(int(rng.integers(0, 5)))
    for v in vars_:
        kind = rng.integers(0, 6)
        c = int(rng.integers(0, 7))
        if kind <= 2:
            term = K.mul(v, c)
        elif kind == 3:
            term = K.mul(K.BinOp("div", K.add(K.mul(v, int(rng.integers(1, 4))),
                                              K.idx(int(rng.integers(0, 3)))),
                                 K.idx(int(rng.integers(1, 4)))), c)
        elif kind == 4:
            term = K.mul(K.BinOp("mod", v, K.idx(int(rng.integers(1, 5)))), c)
        else:
            hi = int(rng.integers(0, 4))
            term = K.mul(K.Select(K.BinOp("gt", v, K.idx(hi)), K.idx(hi), v), c)
        e = K.add(e, term)
    return e


@pytest.mark.parametrize("seed", range(6))
def test_random_nests_analysis_is_sound(seed):
    """Whatever choose_parallel picks on random index expressions, brute force agrees
    that distinct thread tuples never collide (trusting no "parallel" tag)."""
    rng = np.random.default_rng(seed)
    picked = 0
    for _ in range(60):
        depth = int(rng.integers(1, 4))
        vars_ = [K.Var(f"v{k}") for k in range(depth)]
        extents = [int(rng.integers(1, 6)) for _ in range(depth)]
        out = K.Buffer("out", "float32", 4096)
        inp = K.Buffer("inp", "float32", 4096)
        idx = _random_index(rng, vars_)
        if rng.integers(0, 2):
            val = K.BinOp("add", K.Load(out, idx), K.Load(inp, _random_index(rng, vars_)))
        else:
            val = K.Load(inp, _random_index(rng, vars_))
        body = [K.Store(out, idx, val)]
        for v, n in reversed(list(zip(vars_, extents))):
            body = [K.Loop(v, n, body)]
        chain, inner = A.loop_chain(body[0])
        par = A.choose_parallel(chain, inner, {})
        if not par.pvars:
            continue
        per_thread = inner
        for l in reversed(par.serial):
            per_thread = [K.Loop(l.var, l.extent, per_thread)]
        check_threads(par.pvars, per_thread, [], par.atomic)
        picked += 1
    assert picked > 10


def test_indexing_and_loss_kernels_are_race_free():
    x = gc.input("x", (5, 7))
    ids = gc.input("ids", (3, 4), dtype="int64")
    wt = gc.input("wt", (11, 6))
    y = gc.input("y", (5,), dtype="int64")
    emb = gc.embedding(ids, wt)
    loss = (gc.sum(emb * emb) + gc.sum(gc.pad(x, ((1, 0), (2, 3))) ** 2)
            + gc.sum(gc.concatenate([x, gc.tanh(x)], axis=1) ** 2)
            + gc.nll_loss(gc.log_softmax(x, axis=1), y) + gc.logsumexp(x))
    grads = gc.grad(loss, [x, wt])
    for level in (0, 2):
        assert check_program(program([x, ids, wt, y], [loss] + grads, level)) > 100


def test_recurrent_kernels_are_race_free():
    from graphc import nn
    lstm = nn.LSTM(5, 7, num_layers=2, rng=np.random.default_rng(0))
    x = gc.input("x", (4, 3, 5))
    out = lstm(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = gc.sum(y * y)
    cp = program([x], [loss] + gc.grad(loss, [x] + list(lstm.parameters())))
    assert check_program(cp) > 1000


def test_grouped_weight_gradient_kernels_are_race_free():
    # 18 images: 6 groups of 3, the images of a group summed by an atomic GEMM
    x, g = gc.input("x", (18, 2, 5, 4)), gc.input("g", (18, 3, 5, 4))
    cp = program([x, g], [gc.conv2d_grad_weight(x, g, (3, 3), padding=1)], 0)
    (gemm,) = [la for la in cp.launches if la.mapping and "gemm" in la.mapping]
    assert [l.var.name for l in gemm.mapping["reduce"]] == ["nl"]
    assert check_program(cp) > 1000


def test_lenet_step_with_privatized_pool_scratch_is_race_free(monkeypatch):
    # pool scratch too big for shared memory: copies per plane in global memory and a
    # kernel per phase (each a grid over planes and the loops inside)
    from graphc.backends.cuda import codegen
    monkeypatch.setattr(codegen, "SHARED_SCRATCH_BYTES", 0)
    ins, outs = _lenet_step(3)
    cp = program(ins, outs)
    pools = [la for la in cp.launches if "max_pool2d" in la.name]
    assert len(pools) > 4 and all(la.grid[0] * la.block[0] > 3 * 6 for la in pools)
    assert check_program(cp) > 100_000


def test_unit_dimension_and_unrolled_stores_are_proved_disjoint():
    f32 = "float32"
    v = K.Buffer("v", f32, 8 * 5)
    d0, d1, i = K.Var("d0"), K.Var("d1"), K.Var("i")
    # in place: stores v[d0*40 + d1*5 + i], reads v[d1*5 + i] with d0 in 0..1
    st = K.Store(v, K.affine([d0, d1, i], [40, 5, 1]),
                 K.BinOp("mul", K.Load(v, K.affine([d1, i], [5, 1])), K.Const(2.0, f32)))
    nest = K.Loop(d0, 1, [K.Loop(d1, 8, [K.Loop(i, 5, [st])])])
    chain, body = A.loop_chain(nest)
    par = A.choose_parallel(chain, body, {})
    assert par.extent == 40 and [l.var for l in par.serial] == [d0]
    check_threads(par.pvars, [K.Loop(d0, 1, body)], [], set())
    # ... but not when d0 really varies (the read would cross threads)
    nest2 = K.Loop(d0, 2, [K.Loop(d1, 4, [K.Loop(i, 5, [K.Store(
        v, K.affine([d0, d1, i], [20, 5, 1]), K.Load(v, K.affine([d1, i], [5, 1])))])])])
    chain, body = A.loop_chain(nest2)
    par = A.choose_parallel(chain, body, {})
    assert id(d0) not in {id(l.var) for l in par.pvars}
    # two stores per iteration, b[2t] and b[2t+1]: disjoint across t
    b, t = K.Buffer("b", f32, 20), K.Var("t")
    one = K.Const(1.0, f32)
    unrolled = K.Loop(t, 10, [K.Store(b, K.mul(t, 2), one), K.Store(b, K.add(K.mul(t, 2), 1), one)])
    par = A.choose_parallel([unrolled], unrolled.body, {})
    assert [l.var for l in par.pvars] == [t]
    check_threads(par.pvars, unrolled.body, [], set())
    # b[t] and b[t+1] overlap between neighbours: refused
    overlap = K.Loop(t, 10, [K.Store(b, t, one), K.Store(b, K.add(t, 1), one)])
    assert A.choose_parallel([overlap], overlap.body, {}).pvars == []
    with pytest.raises(AssertionError, match="two threads"):
        check_threads([overlap], overlap.body, [], set())


def test_reduction_prelude_must_be_private_to_the_iteration():
    f32 = "float32"
    x = K.Buffer("x", f32, 12)
    o, r = K.Var("o"), K.Var("r")
    acc, m = K.Local(f32, "acc"), K.Local(f32, "m")
    row_max = K.Loop(r, 3, [K.Assign(m, K.BinOp("max", m, K.Load(x, K.affine([o, r], [3, 1]))))])
    red = K.Assign(acc, K.BinOp("add", acc, m))
    # m reset in every iteration: a reduction of per-row maxima
    ok = K.Loop(o, 4, [K.Assign(m, K.Const(float("-inf"), f32)), row_max, red])
    got = A.reduction_with_prelude(*A.loop_chain(ok))
    assert got is not None and got[0] is acc and len(got[4]) == 2
    # m carried from one row to the next (a running maximum): not independent
    carried = K.Loop(o, 4, [row_max, red])
    assert A.reduction_with_prelude(*A.loop_chain(carried)) is None
    # a prelude that stores to memory: not a reduction
    y = K.Buffer("y", f32, 4)
    stores = K.Loop(o, 4, [K.Assign(m, K.Const(0.0, f32)), K.Loop(r, 1, [K.Store(y, o, m)]), red])
    assert A.reduction_with_prelude(*A.loop_chain(stores)) is None


def test_block_reduction_refuses_a_prelude_scalar_read_afterwards():
    from graphc.backends.cuda.codegen import block_plan
    f32 = "float32"
    x, y = K.Buffer("x", f32, 12), K.Buffer("y", f32, 1)
    o, r = K.Var("o"), K.Var("r")
    acc, m = K.Local(f32, "acc"), K.Local(f32, "m")
    loop = K.Loop(o, 4, [K.Assign(m, K.Const(float("-inf"), f32)),
                         K.Loop(r, 3, [K.Assign(m, K.BinOp("max", m, K.Load(
                             x, K.affine([o, r], [3, 1]))))]),
                         K.Assign(acc, K.BinOp("add", acc, m))])
    init = K.Assign(acc, K.Const(0.0, f32))
    fine = block_plan([init, loop, K.Store(y, K.idx(0), acc)], {}, [])
    assert fine is not None and [k for k, _ in fine.kinds] == ["uniform", "reduce", "single"]
    # the last row's maximum read after the loop: each thread holds another row's
    later = block_plan([init, loop, K.Store(y, K.idx(0), K.BinOp("add", acc, m))], {}, [])
    assert later is None or "reduce" not in [k for k, _ in later.kinds]
