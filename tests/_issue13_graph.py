"""Issue 13's graph, shared by the runtime and race tests (and the long stress run,
which runs tests/test_llvm_race.py as a script): a conv and a matmul, their
gradients and several outputs -- two independent GEMM kernels in one phase."""
import numpy as np

import graphc as gc


def issue13_graph(rng):
    """(inputs, outputs, feeds) with feeds drawn from `rng`."""
    x = gc.input("x", (6, 5, 11, 10))
    w = gc.input("w", (16, 5, 3, 3))
    a = gc.input("a", (70, 300))
    b = gc.input("b", (300, 90))
    y = gc.relu(gc.conv2d(x, w, padding=1))
    loss = gc.sum(y * y) + gc.sum(gc.tanh(a @ b))
    gx, gw, ga = gc.grad(loss, [x, w, a])
    outs = [loss, y, gx, gw, ga, gc.softmax(a @ b), gc.max(a, axis=0)]
    feeds = [rng.standard_normal(s).astype(np.float32) for s in
             ((6, 5, 11, 10), (16, 5, 3, 3), (70, 300), (300, 90))]
    return [x, w, a, b], outs, feeds
