"""Thread safety of the LLVM backend: the stress harness.

Every multi-threaded result must be bit-identical to the 1-thread result (chunk
boundaries depend only on the thread count and every element is summed in one
order), on every call.  The harness compiles with GRAPHC_DEBUG_SCHEDULE=shuffle
(stress.py: chunks handed out in a shuffled order, random waits before every
kernel, chunk and between packing a GEMM's panels and reading them back), calls
each function many times with the same inputs at 2..8 threads and compares bit
for bit with 1 thread.  It found the GEMM-workspace race (gemm.workspace): two
independent GEMM kernels in one barrier interval addressed the shared scratch
at per-site strides, so their slices for different threads overlapped; on the
issue's graph about one call in ten came back wrong under the stress schedule.

The static check (racecheck.py, run by every multi-threaded compile) is tested
here too: it refuses the per-site workspace strides that caused the race.

Bounded: a few hundred calls per graph in all; `python tests/test_llvm_race.py
SECONDS` runs the long version (docs/architecture.md, "Thread safety and the
stress harness").
"""
import numpy as np
import pytest

import graphc as gc
from graphc import models
from graphc.backends import llvm as gllvm
from _issue13_graph import issue13_graph

RNG = np.random.default_rng(13)


def issue_graph():
    """Issue 13's graph: a conv and a matmul, their gradients, several outputs."""
    return issue13_graph(RNG)


def residual_graph(blocks=2, batch=2, ch=8, hw=16, classes=10):
    """A small residual conv net: logits and the gradients of every weight."""
    x = gc.input("x", (batch, 3, hw, hw))
    labels = gc.input("labels", (batch,), dtype="int64")
    ws = [gc.input("w0", (ch, 3, 3, 3))]
    h = gc.relu(gc.conv2d(x, ws[0], padding=1))
    for i in range(blocks):
        w1 = gc.input(f"w{i}a", (ch, ch, 3, 3))
        w2 = gc.input(f"w{i}b", (ch, ch, 3, 3))
        ws += [w1, w2]
        h = gc.relu(h + gc.conv2d(gc.relu(gc.conv2d(h, w1, padding=1)), w2, padding=1))
    fc = gc.input("fc", (ch, classes))
    logits = gc.global_avg_pool2d(h).reshape((batch, ch)) @ fc
    loss = gc.cross_entropy(logits, labels)
    grads = gc.grad(loss, ws + [fc])
    feeds = [RNG.standard_normal((batch, 3, hw, hw)).astype(np.float32),
             RNG.integers(0, classes, batch)]
    feeds += [(RNG.standard_normal(tuple(int(d) for d in w.shape)) * 0.3).astype(np.float32)
              for w in ws + [fc]]
    return [x, labels] + ws + [fc], [logits, loss] + list(grads), feeds


def lenet_graph(batch=64):
    """LeNet-5's training-step gradients (the loss and one gradient per parameter); at
    batch 64 its two fully connected gradient GEMMs share a phase (with the pre-fix
    workspace strides: ~3 % of stress calls wrong)."""
    model = models.lenet5(rng=np.random.default_rng(0))
    x = gc.input("x", (batch, 1, 28, 28))
    y = gc.input("y", (batch,), dtype="int64")
    loss = gc.cross_entropy(model(x), y)
    outs = [loss] + list(gc.grad(loss, model.parameters()))
    feeds = [RNG.standard_normal((batch, 1, 28, 28)).astype(np.float32),
             RNG.integers(0, 10, batch)]
    return [x, y], outs, feeds


def stress(monkeypatch, build, threads, calls, shuffle=True):
    """{thread count: calls whose results differ from 1 thread's} for build()'s graph."""
    inputs, outs, feeds = build()
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    monkeypatch.delenv("GRAPHC_DEBUG_SCHEDULE", raising=False)
    want = gc.compile(inputs, outs, backend="llvm")(*feeds)
    if shuffle:
        monkeypatch.setenv("GRAPHC_DEBUG_SCHEDULE", "shuffle")
    bad = {}
    for nt in threads:
        monkeypatch.setenv("GRAPHC_NUM_THREADS", str(nt))
        f = gc.compile(inputs, outs, backend="llvm")
        wrong = 0
        for _ in range(calls):
            got = f(*feeds)
            wrong += any(not np.array_equal(u, v) for u, v in zip(want, got))
        r = gllvm.runners(f)[0]
        assert r.nthreads == nt
        assert (r._stress_rng is not None) == shuffle
        bad[nt] = wrong
    return bad


def test_issue_graph_bit_identical_under_stress_at_2_to_8_threads(monkeypatch):
    bad = stress(monkeypatch, issue_graph, range(2, 9), 50)
    assert not any(bad.values()), f"calls with results unlike 1 thread's: {bad}"


def test_issue_graph_bit_identical_without_stress(monkeypatch):
    # The plain schedule (what users run): many back-to-back calls.
    bad = stress(monkeypatch, issue_graph, (2,), 300, shuffle=False)
    assert not any(bad.values()), bad


def test_residual_net_grads_bit_identical_under_stress(monkeypatch):
    bad = stress(monkeypatch, residual_graph, (3,), 30)
    assert not any(bad.values()), bad


def test_lenet_step_grads_bit_identical_under_stress(monkeypatch):
    bad = stress(monkeypatch, lenet_graph, (2,), 40)
    assert not any(bad.values()), bad


def test_stress_schedule_flag():
    from graphc.backends.llvm import stress as st
    import os
    old = os.environ.get("GRAPHC_DEBUG_SCHEDULE")
    try:
        os.environ["GRAPHC_DEBUG_SCHEDULE"] = "bogus"
        with pytest.raises(ValueError, match="GRAPHC_DEBUG_SCHEDULE"):
            st.mode()
        os.environ["GRAPHC_DEBUG_SCHEDULE"] = "shuffle"
        assert st.mode() == "shuffle"
        os.environ["GRAPHC_DEBUG_SCHEDULE"] = "0"
        assert st.mode() is None
    finally:
        if old is None:
            os.environ.pop("GRAPHC_DEBUG_SCHEDULE", None)
        else:
            os.environ["GRAPHC_DEBUG_SCHEDULE"] = old


def _compile_fresh(monkeypatch, build, nt, shuffle=False):
    """Compile build()'s graph at nt threads with the cache off (a cache hit skips code
    generation, and with it the static check); returns the function."""
    inputs, outs, feeds = build()
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    if not shuffle:
        monkeypatch.delenv("GRAPHC_DEBUG_SCHEDULE", raising=False)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(nt))
    f = gc.compile(inputs, outs, backend="llvm")
    f(*feeds)
    return f


def test_static_check_passes_on_the_issue_graph(monkeypatch):
    # compile_program runs racecheck on every multi-threaded entry it generates (the
    # stress tests above run it too when their compiles miss the cache)
    assert gllvm.runners(_compile_fresh(monkeypatch, issue_graph, 3))[0].nthreads == 3


def test_entry_in_parts_under_stress(monkeypatch):
    # A long program's entry is split into parts with a barrier between them
    # (runtime.ENTRY_PART_KERNELS); the static check must see those phases and the
    # results stay bit-identical.
    from graphc.backends.llvm import runtime
    monkeypatch.setattr(runtime, "ENTRY_PART_KERNELS", 4)
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    bad = stress(monkeypatch, issue_graph, (3,), 30)
    assert not any(bad.values()), bad


def test_static_check_refuses_per_site_workspace_strides(monkeypatch):
    """The pre-fix addressing (each GEMM site's thread slices at its own size) on the
    issue graph: thread 1's slice of the conv GEMM lies inside thread 0's slice of the
    matmul, which runs in the same phase."""
    from llvmlite import ir
    from graphc.backends.llvm import gemm
    from graphc.backends.llvm.codegen import I64
    real = gemm.workspace

    def per_site(mb, dtype, per_thread):
        gv, _ = real(mb, dtype, per_thread)
        st = ir.GlobalVariable(mb.module, I64, name=f"site_stride_{len(mb.module.globals)}")
        st.linkage = "internal"
        st.global_constant = True
        st.initializer = ir.Constant(I64, per_thread)
        return gv, st

    monkeypatch.setattr(gemm, "workspace", per_site)
    with pytest.raises(gc.GraphcError, match=r"k0_matmul \(thread 0\) and k1_conv2d "
                                             r"\(thread 1\).*graphc_ws_float32"):
        _compile_fresh(monkeypatch, issue_graph, 2)


def test_racecheck_phases_and_conflicts():
    from graphc.backends.llvm import racecheck
    assert racecheck.phases({0, 2}, 4) == [[0, 1], [2, 3]]
    # kernel 0 (all threads) writes slot 5 [0, 64); kernel 1 (thread 0) reads [32, 96):
    # threads 1.. of kernel 0 race with thread 0 of kernel 1; no barrier between them
    ranges = [([], [(5, 0, 64)]), ([(5, 32, 96)], [])]
    found = racecheck.conflicts([[0, 1]], [True, False], 2, ranges, {})
    assert [(a, ta, b, tb) for a, ta, b, tb, *_ in found] == [(0, 1, 1, 0)]
    assert racecheck.conflicts([[0], [1]], [True, False], 2, ranges, {}) == []
    # scratch: slices of one kernel's threads overlap when the stride is short
    ws = {0: [("ws", 100, 80)]}
    found = racecheck.conflicts([[0]], [True], 2, [([], [])], ws)
    assert found and found[0][4:] == (("ws", "ws"), 80, 100)
    assert racecheck.conflicts([[0]], [True], 2, [([], [])], {0: [("ws", 100, 100)]}) == []


def _kernel(body_fn):
    from graphc.kernel import ir as K
    x = K.Buffer("x", np.float32, 100)
    out = K.Buffer("out", np.float32, 101)
    tmp = K.Buffer("tmp", np.float32, 100)
    return K.Kernel("k", [x, out, tmp], body_fn(K, x, out, tmp))


def test_chunk_check_finds_chunks_that_touch_each_others_elements():
    from graphc.backends.llvm import racecheck

    def loop(K, body):
        i = K.Var("i")
        return K.Loop(i, 100, body(i), "parallel")

    def ok(K, x, out, tmp):                      # out[i] = x[i]
        return [loop(K, lambda i: [K.Store(out, i, K.Load(x, i))])]

    def shifted(K, x, out, tmp):                 # out[i + 1] = out[i]: a neighbour's
        return [loop(K, lambda i: [K.Store(out, K.add(i, 1), K.Load(out, i))])]

    def reversed_(K, x, out, tmp):               # tmp[i] = x[i]; out[i] = tmp[99 - i]
        return [loop(K, lambda i: [K.Store(tmp, i, K.Load(x, i))]),
                loop(K, lambda i: [K.Store(out, i, K.Load(tmp, K.add(K.mul(i, -1), 99)))])]

    def same_chunks(K, x, out, tmp):             # tmp[i] = x[i]; out[i] = tmp[i]: fine
        return [loop(K, lambda i: [K.Store(tmp, i, K.Load(x, i))]),
                loop(K, lambda i: [K.Store(out, i, K.Load(tmp, i))])]

    def gather(K, x, out, tmp):                  # out[x[i]]: a data-dependent write
        return [loop(K, lambda i: [K.Store(out, K.Cast(K.Load(x, i), K.INDEX),
                                           K.Const(1.0, np.float32))])]

    for nt in (2, 3, 8):
        assert racecheck.chunk_conflicts(_kernel(ok), nt, {}) == []
        assert racecheck.chunk_conflicts(_kernel(same_chunks), nt, {}) == []
        found = racecheck.chunk_conflicts(_kernel(shifted), nt, {})
        lo1 = racecheck.chunk_bounds(100, 1, nt)[0]
        assert ("out", 0, 1, lo1) in found        # chunk 0 writes chunk 1's first element
        assert racecheck.chunk_conflicts(_kernel(reversed_), nt, {})
        assert racecheck.chunk_conflicts(_kernel(gather), nt, {})
    # the formula matches the generated code's chunking: contiguous, covering, aligned
    for extent, nt in ((7, 3), (1000, 8), (5000, 3)):
        b = [racecheck.chunk_bounds(extent, t, nt) for t in range(nt)]
        assert b[0][0] == 0 and b[-1][1] == extent
        assert all(b[t][1] == b[t + 1][0] for t in range(nt - 1))


def test_chunk_check_runs_on_stress_builds(monkeypatch):
    # Stress builds enumerate every shared kernel's chunks; the issue graph's all fit.
    monkeypatch.setenv("GRAPHC_DEBUG_SCHEDULE", "shuffle")
    r = gllvm.runners(_compile_fresh(monkeypatch, issue_graph, 3, shuffle=True))[0]
    assert r.chunks_unchecked == []
    assert sum(1 for k in range(len(r.prog.kernels)) if r.prog.kernels[k].body) > 5


def long_run(seconds, threads=range(2, 9), chunk=25, graphs=None):
    """Compile the three graphs at every thread count, with and without the stress
    schedule, then call them round-robin (`chunk` calls each) until `seconds` have
    passed; {(graph, shuffle, threads): (calls, wrong calls)}."""
    import os
    import time
    env = dict(os.environ)
    fns = []
    try:
        for build in graphs or (issue_graph, residual_graph, lenet_graph):
            inputs, outs, feeds = build()
            os.environ.pop("GRAPHC_DEBUG_SCHEDULE", None)
            os.environ["GRAPHC_NUM_THREADS"] = "1"
            want = gc.compile(inputs, outs, backend="llvm")(*feeds)
            for shuffle in (True, False):
                if shuffle:
                    os.environ["GRAPHC_DEBUG_SCHEDULE"] = "shuffle"
                else:
                    os.environ.pop("GRAPHC_DEBUG_SCHEDULE", None)
                for nt in threads:
                    os.environ["GRAPHC_NUM_THREADS"] = str(nt)
                    f = gc.compile(inputs, outs, backend="llvm")
                    f(*feeds)
                    fns.append(((build.__name__, shuffle, nt), f, feeds, want))
    finally:
        os.environ.clear()
        os.environ.update(env)
    totals = {key: [0, 0] for key, *_ in fns}
    end = time.time() + seconds
    while time.time() < end:
        for key, f, feeds, want in fns:
            for _ in range(chunk):
                got = f(*feeds)
                totals[key][1] += any(not np.array_equal(u, v) for u, v in zip(want, got))
            totals[key][0] += chunk
    return totals


if __name__ == "__main__":
    # The long run: python tests/test_llvm_race.py SECONDS [GRAPH,...]
    # (GRAPH: issue_graph, residual_graph, lenet_graph; default all three)
    import sys
    import time
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
    graphs = [globals()[g] for g in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
    t0 = time.time()
    totals = long_run(seconds, graphs=graphs)
    print(f"{time.time() - t0:.0f} s (compiles included)")
    for (name, shuffle, nt), (calls, wrong) in sorted(totals.items()):
        print(f"{name:15} {'shuffle' if shuffle else 'plain  '} threads={nt}: "
              f"{wrong} wrong of {calls} calls")
    print(f"total: {sum(w for _, w in totals.values())} wrong of "
          f"{sum(c for c, _ in totals.values())} calls")
    sys.exit(1 if any(w for _, w in totals.values()) else 0)
