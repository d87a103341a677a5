"""Native loops on the LLVM backend: gc.scan and graphc.nn.RNN/LSTM/GRU forward and
backward (BPTT) against the NumPy backend, training steps, streaming, and the
loop staying a loop (kernel and node counts independent of T).

Tolerances: float32 everywhere.  The values pass through at most T=5 chained
steps whose dot products have at most 12 terms (hidden and input sizes), and
the parameter gradients sum at most T*N = 15 such terms; both backends round
differently (fused multiply-adds, GEMM blocking, vectorized reductions), so
they agree to a few float32 ulps per operation: rtol 2e-5 on values of order
one, atol 2e-6 for values near zero.
"""
import numpy as np
import pytest

import graphc as gc
from graphc.backends.llvm import runners
from graphc.nn.rnn import GRU, LSTM, RNN

T, N, I, H = 5, 3, 4, 6
RTOL, ATOL = 2e-5, 2e-6


def _both(inputs, outputs, args, updates=None):
    """Compile on both backends, run, return (numpy results, llvm results)."""
    res = []
    for be in ("numpy", "llvm"):
        f = gc.compile(inputs, outputs, backend=be)
        res.append(f(*args))
    return res


def _close(a_list, b_list, rtol=RTOL, atol=ATOL):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


def _program(f):
    (r,) = runners(f)
    return r.prog


# ------------------------------------------------------------------ scan
def _rnn_scan(x, h0, W, U, b, reverse=False):
    def step(h, xt):
        hn = gc.tanh(xt @ W + h @ U + b)
        return hn, hn * 2.0
    return gc.scan(step, h0, x, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_forward_and_bptt_match_numpy_backend(reverse):
    rng = np.random.default_rng(0)
    shapes = [(T, N, 2), (N, H), (2, H), (H, H), (H,)]
    args = [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in shapes]
    ins = [gc.input(f"a{k}", s) for k, s in enumerate(shapes)]
    hT, ys = _rnn_scan(*ins, reverse=reverse)
    loss = gc.sum(ys * ys) + gc.sum(hT)
    grads = gc.grad(loss, ins)
    ref, got = _both(ins, [hT, ys] + list(grads), args)
    _close(ref, got)
    # An independent check of the forward values: an explicit Python loop.
    x, h, W, U, b = [a.astype(np.float64) for a in args]
    want = np.zeros((T, N, H))
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = np.tanh(x[t] @ W + h @ U + b)
        want[t] = 2 * h
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], h, rtol=1e-5, atol=1e-6)


def test_scan_is_a_native_loop_whose_code_does_not_grow_with_T():
    rng = np.random.default_rng(1)
    counts = []
    for steps in (4, 40):
        x = gc.input("x", (steps, N, 2))
        h0, W, U, b = (gc.input(n, s) for n, s in
                       [("h0", (N, H)), ("W", (2, H)), ("U", (H, H)), ("b", (H,))])
        hT, ys = _rnn_scan(x, h0, W, U, b)
        f = gc.compile([x, h0, W, U, b], [hT, ys], backend="llvm")
        args = [rng.standard_normal(s).astype(np.float32)
                for s in [(steps, N, 2), (N, H), (2, H), (H, H), (H,)]]
        f(*args)
        prog = _program(f)
        assert len(prog.loops) == 1 and prog.loops[0].length == steps
        counts.append(len(prog.kernels))
    assert counts[0] == counts[1]


def test_scan_with_integer_carry_unused_outputs_and_passthrough():
    """An int carry (a step counter), a float carry returned unchanged, a y that is a
    sequence input itself, and stacked outputs nobody reads."""
    x = gc.input("x", (T, N))
    k0 = gc.input("k0", (), "int32")
    c0 = gc.input("c0", (N,))

    def step(carry, xt):
        k, c = carry
        return (k + 1, c), (xt, xt * gc.cast(k, "float32"))
    (kT, cT), (same, scaled) = gc.scan(step, (k0, c0), x)
    rng = np.random.default_rng(2)
    args = [rng.standard_normal((T, N)).astype(np.float32), np.int32(3),
            rng.standard_normal(N).astype(np.float32)]
    ref, got = _both([x, k0, c0], [kT, cT, same, scaled], args)
    _close(ref, got, rtol=0, atol=0)
    assert int(got[0]) == 3 + T
    np.testing.assert_array_equal(got[3], args[0] * (3 + np.arange(T, dtype=np.float32))[:, None])


def test_nested_scan():
    """A loop inside a loop body (a region inside a region)."""
    x = gc.input("x", (T, 4, N))
    h0 = gc.input("h0", (N,))

    def outer(h, xt):
        def inner(g, xr):
            g2 = gc.tanh(g + xr)
            return g2, g2
        g, _ = gc.scan(inner, h, xt)
        return g * 0.5, g
    hT, ys = gc.scan(outer, h0, x)
    rng = np.random.default_rng(3)
    args = [rng.standard_normal((T, 4, N)).astype(np.float32),
            rng.standard_normal(N).astype(np.float32)]
    grads = gc.grad(gc.sum(ys) + gc.sum(hT * hT), [x, h0])
    ref, got = _both([x, h0], [hT, ys] + list(grads), args)
    _close(ref, got)
    h = args[1].astype(np.float64)
    for t in range(T):
        g = h
        for r in range(4):
            g = np.tanh(g + args[0][t, r])
        h = g * 0.5
    np.testing.assert_allclose(got[0], h, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ nn layers
CASES = [(RNN, {}), (RNN, {"nonlinearity": "relu"}), (LSTM, {}), (GRU, {})]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("opts", [
    dict(bidirectional=True, num_layers=2, variable=False, batch_first=False),
    dict(bidirectional=True, num_layers=2, variable=True, batch_first=True),
])
def test_layers_forward_and_gradients_match_numpy_backend(cls, kw, opts):
    rng = np.random.default_rng(4)
    bf = opts["batch_first"]
    m = cls(I, H, num_layers=opts["num_layers"], bidirectional=opts["bidirectional"],
            batch_first=bf, rng=4, **kw)
    shape = (N, T, I) if bf else (T, N, I)
    x = gc.input("x", shape)
    ln = gc.input("lengths", (N,), "int64")
    lengths = np.array([5, 2, 3])
    out, st = m(x, lengths=ln if opts["variable"] else None)
    states = list(st) if cls is LSTM else [st]
    wts = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    loss = gc.sum(out * wts) + sum(gc.sum(s * s) for s in states)
    params = list(m.parameters())
    grads = gc.grad(loss, params + [x])
    ins = [x, ln] if opts["variable"] else [x]
    xv = rng.standard_normal(shape).astype(np.float32)
    args = [xv, lengths] if opts["variable"] else [xv]
    ref, got = _both(ins, [out] + states + list(grads), args)
    _close(ref, got)
    if opts["variable"]:   # outputs past each sequence's end are zero
        o = got[0] if bf else got[0].transpose(1, 0, 2)
        for b, n in enumerate(lengths):
            assert not o[b, n:].any()


def test_lstm_training_steps_with_updates_match_numpy_backend():
    rng = np.random.default_rng(5)
    xv = rng.standard_normal((T, N, I)).astype(np.float32)
    yv = rng.standard_normal((T, N, H)).astype(np.float32)
    runs = {}
    for be in ("numpy", "llvm"):
        m = LSTM(I, H, num_layers=2, rng=5)
        x, y = gc.input("x", (T, N, I)), gc.input("y", (T, N, H))
        out, _ = m(x)
        loss = gc.mean((out - y) * (out - y))
        params = list(m.parameters())
        grads = gc.grad(loss, params)
        f = gc.compile([x, y], loss, updates={p: p - 0.5 * g for p, g in zip(params, grads)},
                       backend=be)
        losses = [float(f(xv, yv)) for _ in range(4)]
        runs[be] = (losses, [p.value.copy() for p in params])
    (l_ref, p_ref), (l_got, p_got) = runs["numpy"], runs["llvm"]
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
    assert l_got[-1] < l_got[0]          # it trains
    _close(p_ref, p_got, rtol=1e-4, atol=1e-5)   # 4 updated steps compound the rounding


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_streaming_step_on_llvm_equals_whole_sequence(cls):
    rng = np.random.default_rng(6)
    m = cls(I, H, num_layers=2, rng=6)
    x = gc.input("x", (T, N, I))
    out, _ = m(x)
    whole = gc.compile([x], out, backend="llvm")
    xt = gc.input("x_t", (N, I))
    if cls is LSTM:
        h, c = gc.input("h", (2, N, H)), gc.input("c", (2, N, H))
        y, (h2, c2) = m.step(xt, (h, c))
        step = gc.compile([xt, h, c], [y, h2, c2], backend="llvm")
    else:
        h = gc.input("h", (2, N, H))
        y, h2 = m.step(xt, h)
        step = gc.compile([xt, h], [y, h2], backend="llvm")
    xv = rng.standard_normal((T, N, I)).astype(np.float32)
    state = m.initial_state(N)
    ys = []
    for t in range(T):
        res = step(xv[t], *(state if cls is LSTM else (state,)))
        ys.append(res[0])
        state = tuple(res[1:]) if cls is LSTM else res[1]
    np.testing.assert_allclose(np.stack(ys), whole(xv), rtol=RTOL, atol=ATOL)


def test_symbolic_length_and_batch_specialize_per_shape():
    m = GRU(I, H, rng=7)
    x = gc.input("x", ("T", "N", I))
    out, hn = m(x)
    f_np = gc.compile([x], [out, hn])
    f = gc.compile([x], [out, hn], backend="llvm")
    rng = np.random.default_rng(7)
    for shape in [(3, 2, I), (7, 1, I)]:
        xv = rng.standard_normal(shape).astype(np.float32)
        _close(f_np(xv), f(xv))


def test_threads_share_the_gemms_inside_the_loop(monkeypatch):
    """Big enough steps that the recurrent GEMMs are split among 2 threads, with
    barriers inside the native loop."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    rng = np.random.default_rng(8)
    m = LSTM(16, 64, rng=8)
    x = gc.input("x", (6, 32, 16))
    out, (hn, cn) = m(x)
    grads = gc.grad(gc.sum(out * out), list(m.parameters()))
    xv = rng.standard_normal((6, 32, 16)).astype(np.float32)
    ref = gc.compile([x], [out, cn] + list(grads))(xv)
    f = gc.compile([x], [out, cn] + list(grads), backend="llvm")
    for _ in range(2):
        _close(ref, f(xv), rtol=1e-4, atol=1e-5)   # reductions of 64..192 terms
    from graphc.kernel.ir import is_spmd
    (r,) = runners(f)
    assert r.nthreads == 2
    shared_in_loops = [k for reg in r.prog.loops for k in r.prog.kernels[reg.start:reg.end]
                       if is_spmd(k)]
    assert shared_in_loops


def test_loop_results_bitwise_equal_for_1_and_2_threads(monkeypatch, tmp_path):
    """Inside native loops the elementwise kernels are shared among threads from far
    less work than at the top level (runtime.LOOP_MIN_WORK): an LSTM's forward and
    BPTT results do not depend on the thread count, and match the interpreter."""
    from graphc.kernel.ir import is_spmd
    from graphc.backends.llvm.runtime import LOOP_MIN_WORK
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(21)
    m = LSTM(24, 128, rng=21)
    x = gc.input("x", (5, 32, 24))
    out, (hn, cn) = m(x)
    outs = [out, cn] + list(gc.grad(gc.sum(out * out), list(m.parameters())))
    xv = rng.standard_normal((5, 32, 24)).astype(np.float32)
    got = []
    for nt in ("1", "2"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        f = gc.compile([x], outs, backend="llvm")
        got.append(f(xv))
    (r,) = runners(f)
    small_shared = [k for reg in r.prog.loops for k in r.prog.kernels[reg.start:reg.end]
                    if not k.flops and is_spmd(k, LOOP_MIN_WORK)]
    assert small_shared      # gate activations etc. run on both threads
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    _close(gc.compile([x], outs)(xv), got[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_loop_invariant_weight_packed_once_per_call_sees_in_place_updates(monkeypatch,
                                                                         threads):
    """The recurrent weight's GEMM panels are packed once per loop run (gemm.py,
    loops.mark_prepacked): an in-place change of the weight between calls, and a
    different weight array, must be seen by the next call; a B that changes inside
    the loop (the carry in h @ M_t) is never reused."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    from graphc.backends.llvm import gemm
    rng = np.random.default_rng(12)
    Tn, B, Hn = 4, 8, 64
    W = gc.Parameter(rng.standard_normal((Hn, Hn)).astype(np.float32) * 0.1, name="W")
    x = gc.input("x", (Tn, B, Hn))
    h0 = gc.input("h0", (B, Hn))

    def step(h, x_t):
        h2 = gc.tanh(h @ W + x_t)
        return h2, h2
    hT, ys = gc.scan(step, h0, x)
    f = gc.compile([x, h0], [ys], backend="llvm")

    def ref(xv, hv, wv):
        out = []
        for t in range(Tn):
            hv = np.tanh(hv.astype(np.float64) @ wv + xv[t])
            out.append(hv)
        return np.stack(out)
    xv = rng.standard_normal((Tn, B, Hn)).astype(np.float32)
    hv = rng.standard_normal((B, Hn)).astype(np.float32)
    for k in range(3):
        np.testing.assert_allclose(f(xv, hv)[0], ref(xv, hv, W.value), rtol=1e-4, atol=1e-5)
        if k == 0:
            assert gemm._PREPACK       # the step's GEMM reads W's panels packed once
        W.value[...] = rng.standard_normal((Hn, Hn)).astype(np.float32) * 0.1   # in place
    W.set_value(rng.standard_normal((Hn, Hn)).astype(np.float32) * 0.1)
    np.testing.assert_allclose(f(xv, hv)[0], ref(xv, hv, W.value), rtol=1e-4, atol=1e-5)

    # B carried (changes every step): M_{t+1} = M_t @ A_t, y_t = M_t; not prepacked.
    m0 = gc.input("m0", (B, B * 4))
    a = gc.input("a", (Tn, B * 4, B * 4))

    def step2(m, a_t):
        m2 = (m @ a_t) * 0.5
        return m2, m2 @ gc.transpose(m2)
    _, zs = gc.scan(step2, m0, a)
    g = gc.compile([m0, a], [zs], backend="llvm")
    mv = rng.standard_normal((B, B * 4)).astype(np.float32)
    av = rng.standard_normal((Tn, B * 4, B * 4)).astype(np.float32)
    want, cur = [], mv.astype(np.float64)
    for t in range(Tn):
        cur = cur @ av[t] * 0.5
        want.append(cur @ cur.T)
    np.testing.assert_allclose(g(mv, av)[0], np.stack(want), rtol=1e-4, atol=1e-4)


def test_streaming_fast_call_path_takes_fresh_and_strided_arrays():
    """Runner's fast path copies small inputs into staging arrays: new array objects,
    non-contiguous views and changed values each call must all be seen."""
    m = LSTM(4, 6, rng=3)
    x = gc.input("x", (2, 4))
    h = gc.input("h", (1, 2, 6))
    c = gc.input("c", (1, 2, 6))
    y, (h2, c2) = m.step(x, (h, c))
    f = gc.compile([x, h, c], [y, h2, c2], backend="llvm")
    ref = gc.compile([x, h, c], [y, h2, c2])
    rng = np.random.default_rng(5)
    hv = np.zeros((1, 2, 6), np.float32)
    cv = np.zeros((1, 2, 6), np.float32)
    for k in range(4):
        big = rng.standard_normal((2, 8)).astype(np.float32)
        xv = big[:, ::2] if k % 2 else np.ascontiguousarray(big[:, :4])
        got = f(xv, hv, cv)
        want = ref(np.ascontiguousarray(xv), hv, cv)
        _close(want, got)
        _, hv, cv = got


# ------------------------------------------------------------------ graph size
def test_lstm_graph_node_count_is_independent_of_T():
    from graphc.ir.graph import Graph

    def count(steps):
        m = LSTM(64, 256, rng=0)
        x = gc.input("x", (steps, 2, 64))
        out, (hn, cn) = m(x)
        loss = gc.sum(out) + gc.sum(cn)
        grads = gc.grad(loss, list(m.parameters()))

        def nodes(outs):
            seen, todo, total = set(), list(outs), 0
            while todo:        # every node, including those inside loop bodies
                n = todo.pop()
                if n.id in seen:
                    continue
                seen.add(n.id)
                total += 1
                todo.extend(n.inputs)
                body = n.attrs.get("body") if n.op.name == "scan" else None
                if body is not None:
                    todo.extend(body.outputs)
            return total
        return nodes([out, hn, cn]), nodes([loss] + list(grads)), len(Graph([out]).nodes)
    small, large = count(10), count(100)
    assert small == large
    assert small[2] < 40


@pytest.mark.parametrize("cls", [RNN, LSTM])
def test_backward_loop_reuses_forward_products_instead_of_recomputing(cls):
    """BPTT re-derives each step from the saved carry; the lowering takes the
    recomputed h @ W_hh.T (+ activations) from the forward loop's stacked outputs,
    so per step: 1 GEMM forward, 2 backward (dh, dW), not 3 — and the forward loop
    still runs once (the loss reads y, so the backward loop's inputs do too)."""
    from graphc.kernel.ir import Gemm
    m = cls(8, 16, rng=9)
    x = gc.input("x", (T, N, 8))
    out, _ = m(x)
    grads = gc.grad(gc.sum(out * out), list(m.parameters()) + [x])
    xv = np.random.default_rng(9).standard_normal((T, N, 8)).astype(np.float32)
    f = gc.compile([x], [out] + list(grads), backend="llvm")
    _close(gc.compile([x], [out] + list(grads))(xv), f(xv))
    prog = _program(f)

    def gemms(body):
        n = 0
        for s in body:
            if isinstance(s, Gemm):
                n += 1
            elif hasattr(s, "body"):
                n += gemms(s.body)
        return n
    per_loop = [sum(gemms(k.body) for k in prog.kernels[r.start:r.end]) for r in prog.loops]
    assert per_loop == [1, 2]


def test_backends_without_native_loops_get_a_clear_error():
    from graphc.ir.errors import NotLoweredError
    from graphc.ir.graph import Graph
    from graphc.kernel.lower import lower_graph
    x = gc.input("x", (T, N, I))
    out, _ = RNN(I, H, rng=0)(x)
    with pytest.raises(NotLoweredError, match="cannot run loops.*test_llvm_loop.py"):
        lower_graph(Graph([out], [x]), loops=False)
    prog = lower_graph(Graph([out], [x]))
    assert len(prog.loops) == 1
