"""Property tests: on random graphs built from the op library, the optimized
graph computes what the unoptimized one computes, at every level, including
on inputs holding NaN, inf and -inf.

The generator never applies log to a sigmoid or softmax: those are the stable
rewrites, which deliberately change the values where the naive form
overflows (tested on their own in test_passes.py).
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc
from graphc.backends.numpy import run
from graphc.ir.graph import Graph
from graphc.passes import optimize

INPUT_SHAPES = [(2, 3), (3,), (2, 1), (), (3, 2)]

UNARY = [gc.neg, gc.abs, gc.exp, gc.log, gc.sqrt, gc.square, gc.relu, gc.sigmoid, gc.tanh,
         gc.reciprocal, lambda x: gc.neg(gc.neg(x)), lambda x: gc.softmax(x, axis=-1)
         if x.ndim else x, lambda x: gc.transpose(x), lambda x: gc.transpose(gc.transpose(x)),
         lambda x: gc.reshape(x, (-1,)), lambda x: gc.reshape(gc.reshape(x, (-1,)), x.shape),
         lambda x: gc.broadcast_to(x, (2, 3)), lambda x: gc.broadcast_to(x, (4,) + x.shape),
         lambda x: gc.sum(x), lambda x: gc.sum(x, axis=0, keepdims=True) if x.ndim else x,
         lambda x: gc.mean(x, axis=-1) if x.ndim else x, lambda x: gc.max(x),
         lambda x: gc.min(x, axis=0) if x.ndim else x,
         lambda x: x + 0.0, lambda x: x * 1.0, lambda x: 1.0 * x - 0.0, lambda x: x / 1.0,
         lambda x: x * -1.0, lambda x: x ** 2.0, lambda x: x * 2.5,
         lambda x: gc.where(gc.greater(x, 0.0), x, 0.0),
         lambda x: gc.sum(gc.broadcast_to(x, (3,) + x.shape), axis=0),
         lambda x: gc.log_softmax(x, axis=-1) if x.ndim else x,
         lambda x: gc.reshape(gc.sum(x, axis=0, keepdims=True), x.shape[1:]) if x.ndim else x,
         lambda x: x - gc.mean(x, axis=-1, keepdims=True) if x.ndim else x,
         lambda x: x * gc.sum(gc.square(x), axis=-1, keepdims=True) if x.ndim else x]
BINARY = [gc.add, gc.sub, gc.mul, gc.div, gc.maximum, gc.minimum, gc.matmul,
          lambda a, b: gc.where(gc.less(a, b), a, b), lambda a, b: a + gc.neg(b),
          lambda a, b: gc.transpose(gc.matmul(gc.transpose(a), b))]


@st.composite
def random_graphs(draw, max_steps=16):
    """(graph, dtype): a random DAG over 2..4 inputs of small shapes."""
    dtype = draw(st.sampled_from(["float64", "float32"]))
    n_in = draw(st.integers(2, 4))
    shapes = [draw(st.sampled_from(INPUT_SHAPES)) for _ in range(n_in)]
    inputs = [gc.input(f"x{k}", s, dtype=dtype) for k, s in enumerate(shapes)]
    pool = list(inputs)
    def pick():   # biased towards recent nodes, so chains get deep
        return pool[len(pool) - 1 - draw(st.integers(0, len(pool) - 1))]
    for _ in range(draw(st.integers(3, max_steps))):
        if draw(st.booleans()):
            fn = draw(st.sampled_from(UNARY))
            a = pick()
            if fn is gc.log and a.op.name in ("sigmoid", "softmax"):
                continue
            args = (a,)
        else:
            fn = draw(st.sampled_from(BINARY))
            args = (pick(), pick())
        try:
            node = fn(*args)
        except (gc.GraphBuildError, ValueError):
            continue
        if node is not args[0] and node not in pool:
            pool.append(node)
    built = [n for n in pool if n.inputs]
    if not built:
        built = [gc.exp(inputs[0])]
    extra = draw(st.lists(st.sampled_from(built), max_size=2))
    outputs = [built[-1]] + extra
    return Graph(outputs, inputs), dtype


def random_feeds(graph, seed, special):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in graph.inputs:
        v = rng.standard_normal(i.shape) * 2.0
        if special and v.size:
            v = np.asarray(v)
            flat = v.reshape(-1)
            for k in rng.choice(flat.size, size=min(2, flat.size), replace=False):
                flat[k] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
            v = flat.reshape(i.shape)
        feeds[i.id] = np.asarray(v, dtype=i.dtype)
    return feeds


def assert_same(got, ref, dtype):
    tol = 1e-9 if dtype == "float64" else 2e-5
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        finite = r[np.isfinite(r)]
        scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * scale, equal_nan=True)


def check_levels(graph, dtype, seed, special):
    feeds = random_feeds(graph, seed, special)
    ref = run(graph, feeds)
    for lvl in (0, 1, 2):
        og, rep = optimize(graph, lvl)
        by_pos = {o.id: feeds[i.id] for i, o in zip(graph.inputs, og.inputs)}
        got = run(og, by_pos)
        assert_same(got, ref, dtype)
        if lvl == 2:
            assert rep.kernels_after <= rep.kernels_before


SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(random_graphs(), st.integers(0, 2 ** 31 - 1))
def test_optimized_equals_unoptimized_on_random_inputs(gd, seed):
    graph, dtype = gd
    check_levels(graph, dtype, seed, special=False)


@SETTINGS
@given(random_graphs(), st.integers(0, 2 ** 31 - 1))
def test_optimized_equals_unoptimized_with_nan_and_inf(gd, seed):
    graph, dtype = gd
    check_levels(graph, dtype, seed, special=True)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.integers(0, 2 ** 31 - 1))
def test_llvm_backend_runs_every_fused_group_it_is_given(gd, seed):
    """The optimized graph (all fusion kinds) compiled by the LLVM backend gives the
    unoptimized graph's values, NaN and inf included."""
    graph, dtype = gd
    feeds = random_feeds(graph, seed, special=seed % 2 == 1)
    ref = run(graph, feeds)
    f = gc.compile(graph.inputs, graph.outputs, backend="llvm")
    got = f(*(feeds[i.id] for i in graph.inputs))
    assert_same(got if isinstance(got, (list, tuple)) else [got], ref, dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(random_graphs(max_steps=20), st.integers(0, 2 ** 31 - 1))
def test_optimized_gradient_graphs_agree(gd, seed):
    """Backward graphs (what the optimizer mostly sees) through the same check."""
    graph, dtype = gd
    y = gc.sum(graph.outputs[0] * 0.5)
    grads = gc.grad(y, graph.inputs)
    check_levels(Graph([y] + grads, graph.inputs), dtype, seed, special=False)
