"""The LeNet-5 training graph (forward, cross-entropy, backward, SGD update)
through the optimizer: same loss, gradients and training as unoptimized, and
the numbers docs/optimizer.md records.

Run `python tests/test_passes_lenet.py` to print the report for batch 64.
"""
import numpy as np

import graphc as gc
from graphc.backends.numpy import run
from graphc.ir.graph import Graph
from graphc.passes import optimize


def lenet_params(seed=0):
    rng = np.random.default_rng(seed)

    def p(*shape, name):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return gc.Parameter((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
                            .astype(np.float32), name=name)
    return [p(6, 1, 5, 5, name="conv1.w"), p(6, name="conv1.b"),
            p(16, 6, 5, 5, name="conv2.w"), p(16, name="conv2.b"),
            p(120, 400, name="fc1.w"), p(120, name="fc1.b"),
            p(84, 120, name="fc2.w"), p(84, name="fc2.b"),
            p(10, 84, name="fc3.w"), p(10, name="fc3.b")]


def lenet_forward(x, params):
    c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b, f3w, f3b = params
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, c1w, c1b, padding=2)), 2)
    h = gc.max_pool2d(gc.relu(gc.conv2d(h, c2w, c2b)), 2)
    h = gc.flatten(h)
    h = gc.relu(gc.linear(h, f1w, f1b))
    h = gc.relu(gc.linear(h, f2w, f2b))
    return gc.linear(h, f3w, f3b)


def lenet_training_graph(batch=64, lr=0.05, seed=0):
    """(Graph([loss] + updated params, [x, y]), feeds by input id, number of updates)."""
    params = lenet_params(seed)
    x = gc.input("x", (batch, 1, 28, 28))
    y = gc.input("y", (batch,), dtype="int64")
    loss = gc.cross_entropy(lenet_forward(x, params), y)
    grads = gc.grad(loss, params)
    updates = [p - lr * g for p, g in zip(params, grads)]
    rng = np.random.default_rng(seed + 1)
    feeds = {x.id: rng.standard_normal((batch, 1, 28, 28)).astype(np.float32),
             y.id: rng.integers(0, 10, batch)}
    return Graph([loss] + updates, [x, y]), feeds, len(updates)


def test_lenet_optimized_graph_computes_the_same_loss_and_grads():
    params = lenet_params(1)
    x = gc.input("x", (8, 1, 28, 28))
    y = gc.input("y", (8,), dtype="int64")
    loss = gc.cross_entropy(lenet_forward(x, params), y)
    grads = gc.grad(loss, params)
    rng = np.random.default_rng(2)
    xv = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    yv = rng.integers(0, 10, 8)
    f0 = gc.compile([x, y], [loss] + grads, optimize=0)
    f2 = gc.compile([x, y], [loss] + grads, optimize=2)
    r0, r2 = f0(xv, yv), f2(xv, yv)
    assert f2.report().kernels_after <= 0.6 * f0.report().kernels_after   # 62 -> 33
    for a, b in zip(r0, r2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_lenet_training_steps_match_between_levels():
    """SGD updates run inside the compiled step; both levels follow the same path."""
    from graphc.data import load_digits
    xs, ys = load_digits("train", size=28)
    xt, yt = load_digits("test", size=28)
    batch = 16
    results = []
    for level in (0, 2):
        params = lenet_params(3)
        x = gc.input("x", (None, 1, 28, 28))
        y = gc.input("y", (None,), dtype="int64")
        logits = lenet_forward(x, params)
        loss = gc.cross_entropy(logits, y)
        grads = gc.grad(loss, params)
        step = gc.compile([x, y], loss, updates={p: p - 0.1 * g for p, g in zip(params, grads)},
                          optimize=level)
        predict = gc.compile([x], gc.argmax(logits, axis=1), optimize=level)
        losses = [float(step(xs[k:k + batch], ys[k:k + batch]))
                  for k in range(0, 36 * batch, batch)]
        acc = float(np.mean(predict(xt) == yt))
        results.append((losses, acc, [p.value.copy() for p in params]))
    (l0, a0, p0), (l2, a2, p2) = results
    np.testing.assert_allclose(l2, l0, rtol=1e-3, atol=1e-4)
    assert np.mean(l0[-6:]) < 0.6 * np.mean(l0[:6])        # it learns
    assert abs(a0 - a2) <= 0.01 and a0 > 0.5
    for u, v in zip(p0, p2):
        np.testing.assert_allclose(v, u, rtol=1e-3, atol=1e-4)


def test_lenet_report_numbers():
    graph, feeds, n_updates = lenet_training_graph(batch=16)
    g, rep = optimize(graph, 2, n_updates=n_updates)
    assert (rep.kernels_before, rep.kernels_after) == (83, 35)      # docs/optimizer.md
    assert rep.kernels_after * 2 <= rep.kernels_before
    kinds = {k for k, _, _ in rep.fused}
    assert {"conv_epilogue", "matmul_epilogue", "elementwise", "reduce"} <= kinds
    labels = {lbl for _, lbl, _ in rep.fused}
    # the loss is one kernel, its gradient one, each bias gradient one with its update
    assert {"softmax_cross_entropy+mean", "softmax+equal+cast+sub+mul", "sum+mul+sub"} <= labels
    assert rep.memory_plan.arena_bytes < 0.75 * rep.memory_plan.total_bytes
    by_pos = {o.id: feeds[i.id] for i, o in zip(graph.inputs, g.inputs)}
    for a, b in zip(run(graph, feeds), run(g, by_pos)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    graph, feeds, n_updates = lenet_training_graph(batch=64)
    g1, rep1 = optimize(graph, 1, n_updates=n_updates)
    g, rep = optimize(graph, 2, n_updates=n_updates)
    print(rep)
    print(f"\nunoptimized: {rep.nodes_before} nodes, {rep.kernels_before} kernels; "
          f"optimize=1: {rep1.nodes_after} nodes, {rep1.kernels_after} kernels; "
          f"optimize=2: {rep.nodes_after} nodes, {rep.kernels_after} kernels")
    p = rep.memory_plan
    print(f"planned peak {p.arena_bytes} B, sum of intermediates {p.total_bytes} B, "
          f"live lower bound {p.live_peak_bytes} B")
    print(sorted(set(label for _, label, _ in rep.fused)))
