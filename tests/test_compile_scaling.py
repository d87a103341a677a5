"""Compile time grows linearly with the graph's size (issue 13, item 11).

Graphs of thousands of nodes used to compile in quadratic time: every rewrite
re-sorted the rewritten node's whole ancestry (adopt_provenance), and every
call compared each output with each parameter for shared memory.  These tests
count operations (Python function calls, as cProfile counts them: a
deterministic measure, unlike wall-clock time) for a deep chain network and its
gradient at two sizes, and require the work to grow like the size.
"""
from __future__ import annotations

import cProfile
import pstats

import numpy as np
import pytest

import graphc as gc
from graphc.ir.graph import Graph


def chain_net(layers, width=4, batch=3, seed=0):
    """An MLP of `layers` tiny layers (alternating relu/tanh, a residual), its loss and
    the gradient for every weight and bias: ~20 nodes per layer."""
    rng = np.random.default_rng(seed)
    x = gc.input("x", (batch, width), "float32")
    params, h = [], x
    for i in range(layers):
        w = gc.Parameter((rng.standard_normal((width, width)) * 0.5).astype(np.float32),
                         name=f"w{i}")
        b = gc.Parameter(np.full(width, 0.1, np.float32), name=f"b{i}")
        params += [w, b]
        z = gc.matmul(h, w) + b
        h = 0.5 * h + (gc.tanh(z) if i % 2 else gc.relu(z))
    loss = gc.mean(h * h)
    return x, params, [loss] + list(gc.grad(loss, params))


def _calls(fn):
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return pstats.Stats(prof).total_calls


def _compile_and_call_work(layers):
    x, _, outs = chain_net(layers)
    xv = np.ones((3, 4), np.float32)
    f = gc.compile([x], outs, backend="numpy")
    f(xv)   # warm the imports and caches a first call touches, at a tiny size
    x, _, outs = chain_net(layers)
    nodes = len(Graph(outs, [x]))
    f = gc.compile([x], outs, backend="numpy")
    first = _calls(lambda: f(xv))   # the first call optimizes, plans and runs
    return nodes, first, _calls(lambda: f(xv))


def test_compile_work_grows_linearly_with_graph_size():
    _compile_and_call_work(4)
    n1, w1, c1 = _compile_and_call_work(40)
    n2, w2, c2 = _compile_and_call_work(160)
    assert n2 > 3.5 * n1 and n2 > 3000
    # linear work: 4x the nodes cost about 4x the calls (quadratic was ~6x at these sizes)
    assert w2 / w1 < 1.25 * n2 / n1, ("compile", n1, w1, n2, w2)
    # ... and so does a later call (it compared every output with every parameter)
    assert c2 / c1 < 1.25 * n2 / n1, ("call", n1, c1, n2, c2)


def test_many_node_graph_matches_reference():
    """The compiled chain of a few thousand nodes computes the right loss and gradients
    (checked against an independent float64 NumPy forward/backward)."""
    layers = 120
    x, params, outs = chain_net(layers)
    xv = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    res = gc.compile([x], outs, backend="numpy")(xv)
    assert len(Graph(outs, [x])) > 2000
    ref = _reference(xv, [p.value for p in params], layers)
    for got, want in zip(res, ref):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def _reference(xv, pv, layers):
    h = xv.astype(np.float64)
    tape = []
    for i in range(layers):
        w, b = pv[2 * i].astype(np.float64), pv[2 * i + 1].astype(np.float64)
        z = h @ w + b
        a = np.tanh(z) if i % 2 else np.maximum(z, 0)
        tape.append((h, z, a))
        h = 0.5 * h + a
    loss = np.mean(h * h)
    gh = 2 * h / h.size
    grads = [None] * (2 * layers)
    for i in reversed(range(layers)):
        hin, z, a = tape[i]
        gz = gh * ((1 - a * a) if i % 2 else (z > 0))
        grads[2 * i] = hin.T @ gz
        grads[2 * i + 1] = gz.sum(0)
        gh = 0.5 * gh + gz @ pv[2 * i].astype(np.float64).T
    return [loss] + grads


# ---------------------------------------------------------------- LLVM: big entry functions
def _llvm_run(monkeypatch, layers, threads, part=None, env=()):
    pytest.importorskip("llvmlite")
    from graphc.backends.llvm import runtime
    monkeypatch.setenv("GRAPHC_CACHE", "0")        # compile, do not load a cached object
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    for k, v in env:
        monkeypatch.setenv(k, v)
    built = []
    if part is not None:
        monkeypatch.setattr(runtime, "ENTRY_PART_KERNELS", part)
        one = runtime._entry_part
        monkeypatch.setattr(runtime, "_entry_part",
                            lambda *a: built.append(a[-1]) or one(*a))
    x, params, outs = chain_net(layers)
    xv = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    f = gc.compile([x], outs, backend="llvm")
    res = [np.asarray(r) for r in f(xv)]
    if part is not None:
        assert len(built) > 2 and built[0] == "entry_part0", built   # really in parts
    return f, xv, res, params


@pytest.mark.parametrize("threads", [1, 3])
def test_llvm_entry_in_parts_matches_one_entry(monkeypatch, threads):
    """The entry split into parts of 5 kernels (barriers between parts) computes
    exactly what the single entry computes, and the float64 reference."""
    layers = 6
    _, _, whole, params = _llvm_run(monkeypatch, layers, threads)
    f, xv, parts, _ = _llvm_run(monkeypatch, layers, threads, part=5)
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a, b)
    ref = _reference(xv, [p.value for p in params], layers)
    for a, b in zip(parts, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for _ in range(5):   # repeated calls (threads meeting at the part barriers) agree
        for a, b in zip(f(xv), parts):
            np.testing.assert_array_equal(a, b)


def test_llvm_entry_in_parts_with_profiling_and_bounds_checks(monkeypatch):
    layers = 4
    _, xv, base, params = _llvm_run(monkeypatch, layers, 2)
    for env in ((("GRAPHC_PROFILE", "1"),), (("GRAPHC_DEBUG_BOUNDS", "1"),)):
        _, _, got, _ = _llvm_run(monkeypatch, layers, 2, part=3, env=env)
        for a, b in zip(got, base):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_llvm_compiles_a_5k_node_training_step(monkeypatch):
    """A 5k-node forward+backward graph: its single entry function made LLVM's
    SimplifyCFG give up (the compile server died); in parts it compiles and matches
    the NumPy backend and the float64 reference."""
    layers = 250
    f, xv, got, params = _llvm_run(monkeypatch, layers, 2)
    x, _, outs = chain_net(layers)
    assert len(Graph(outs, [x])) > 5000
    ref = _reference(xv, [p.value for p in params], layers)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
