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
