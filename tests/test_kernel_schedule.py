"""Kernel-IR schedule transformations keep what a kernel computes (checked by
compiling the transformed kernels with the LLVM backend)."""
import numpy as np
import pytest

import graphc as gc
from graphc.backends.llvm.runtime import compile_program
from graphc.ir.graph import Graph
from graphc.kernel import schedule as S
from graphc.kernel.ir import Loop
from graphc.kernel.lower import lower_graph

RNG = np.random.default_rng(3)


def _program(shape):
    x = gc.input("x", shape)
    y = gc.input("y", shape[-1:])
    out = gc.tanh(x) * y + 1.0          # one elementwise kernel
    g = Graph([out], [x, y])
    return g, lower_graph(g)


def _run(g, prog, feeds):
    return compile_program(prog, g)(feeds)[0]


@pytest.mark.parametrize("factor", [1, 4, 7, 16, 200])
def test_split_any_factor(factor):
    g, prog = _program((5, 37))
    feeds = [RNG.standard_normal((5, 37)).astype(np.float32),
             RNG.standard_normal(37).astype(np.float32)]
    want = _run(g, lower_graph(g), feeds)
    loops = S.find_loops(prog.kernels[0].body)
    inner = [lp for lp in loops if not any(isinstance(s, Loop) for s in lp.body)][0]
    S.split(prog.kernels[0], inner, factor)
    text = prog.kernels[0].format()
    assert text.count("for ") == len(loops) + 1
    if 37 % factor:
        assert "if lt(" in text
    np.testing.assert_array_equal(_run(g, prog, feeds), want)


def test_reorder_and_tile_and_tags():
    x = gc.input("x", (48, 64))
    g = Graph([gc.transpose(x) * 2.0], [x])
    feeds = [RNG.standard_normal((48, 64)).astype(np.float32)]
    want = feeds[0].T * 2.0
    prog = lower_graph(g)
    k = prog.kernels[0]          # transpose (already tiled by its lowering)
    assert len(S.find_loops(k.body)) == 4
    np.testing.assert_array_equal(_run(g, prog, feeds)[...], np.ascontiguousarray(want))
    # an untiled 2-D nest: reorder, then tile, then tag
    prog = lower_graph(Graph([gc.exp(x)], [x]))
    k = prog.kernels[0]
    (only,) = S.find_loops(k.body)          # 48*64 collapses to one loop
    o, i = S.split(k, only, 64)
    o2, i2 = S.reorder(k, o)
    S.vectorize(o2)
    S.parallelize(i2)
    assert o2.kind == "vector" and i2.kind == "parallel"
    np.testing.assert_allclose(_run(Graph([gc.exp(x)], [x]), prog, feeds), np.exp(feeds[0]),
                               rtol=4e-7)
    with pytest.raises(ValueError, match="perfectly nested"):
        S.reorder(k, i2)
