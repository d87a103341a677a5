"""Fused nodes made by the optimizer, compiled by the LLVM backend, against the
NumPy interpreter (which runs the same optimized graph op by op through the
fused node's inner graph), and against the unoptimized graph.

Tolerances: elementwise chains of a few float32 ops, each within a few ulp:
rtol 64 eps.  Fused reductions: 2 K eps sum|terms| (see test_llvm_ops.py).
"""
import numpy as np
import pytest

import graphc as gc

RNG = np.random.default_rng(11)
EPS = np.finfo(np.float32).eps


def kinds(f):
    return sorted({n.attrs["kind"] for n in f.graph.nodes if n.op.name == "fused"})


def test_elementwise_and_reduce_fusion():
    x = gc.input("x", (9, 31))
    b = gc.input("b", (31,))
    e = gc.exp(x - gc.max(x, axis=1, keepdims=True))
    outs = [gc.sigmoid(x * 2.0 + b) - gc.tanh(x),                      # elementwise group
            gc.sum(gc.square(x - b), axis=1),                           # reduce group
            gc.mean(gc.abs(x) * 3.0, axis=0),                           # reduce, kept inner axis
            e / gc.sum(e, axis=1, keepdims=True)]
    vx = RNG.standard_normal((9, 31)).astype(np.float32)
    vb = RNG.standard_normal(31).astype(np.float32)
    f = gc.compile([x, b], outs, backend="llvm")
    got = f(vx, vb)
    assert "elementwise" in kinds(f) and "reduce" in kinds(f)
    want = gc.compile([x, b], outs, backend="numpy", optimize=0)(vx, vb)
    np.testing.assert_allclose(got[0], want[0], rtol=64 * EPS, atol=64 * EPS)
    sq = (vx - vb) ** 2
    err = np.abs(got[1].astype(np.float64) - want[1])
    assert np.all(err <= 2 * 31 * EPS * sq.sum(axis=1) * 1.01 + 1e-30)
    np.testing.assert_allclose(got[2], want[2], rtol=2 * 9 * EPS)
    np.testing.assert_allclose(got[3], want[3], rtol=64 * EPS, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_random_elementwise_chains(seed):
    r = np.random.default_rng(seed)
    shapes = [(5, 1, 7), (1, 4, 7), (7,), (5, 4, 1)]
    ins = [gc.input(f"x{i}", s) for i, s in enumerate(shapes)]
    vals = list(ins)
    unary = [gc.tanh, gc.sigmoid, gc.relu, gc.neg, lambda v: gc.abs(v) + 0.5, gc.silu]
    binary = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b, gc.maximum,
              lambda a, b: gc.where(gc.greater(a, b), a, b * 0.5)]
    for _ in range(8):
        if r.random() < 0.5:
            vals.append(unary[r.integers(len(unary))](vals[r.integers(len(vals))]))
        else:
            a, b = (vals[r.integers(len(vals))] for _ in range(2))
            vals.append(binary[r.integers(len(binary))](a, b))
    out = vals[-1] + gc.sum(vals[-2]) if vals[-2].ndim else vals[-1]
    feeds = [r.standard_normal(s).astype(np.float32) for s in shapes]
    got = gc.compile(ins, out, backend="llvm")(*feeds)
    want = gc.compile(ins, out, backend="numpy", optimize=0)(*feeds)
    # <= 9 float32 ops of O(1) values (a few ulp each) plus, sometimes, a sum of <= 140
    # such values: 1e-5 is ~80 eps, above the worst case of the op chain.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
