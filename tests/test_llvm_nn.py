"""The LLVM backend against the NumPy interpreter: conv2d and its gradients,
pooling, the softmax family and whole training steps.

Tolerance for conv/matmul-like outputs: both backends sum K products in
different orders, so they differ by at most 2 K eps sum|products| per element
(K = C_in/groups * kH * kW for the forward pass; see test_llvm_ops.py).  We
bound sum|products| with the same op applied to |inputs| (computed by the
NumPy backend, which is the reference and is exact enough in float64).
"""
import numpy as np
import pytest

import graphc as gc

RNG = np.random.default_rng(1)
EPS32 = np.finfo(np.float32).eps


def run_both(inputs, outputs, feeds):
    return (gc.compile(inputs, outputs, backend="llvm")(*feeds),
            gc.compile(inputs, outputs, backend="numpy")(*feeds))


def abs_bound(inputs, outputs, feeds):
    """The outputs evaluated on |feeds| in float64: sum of |products| per element."""
    f = gc.compile(inputs, outputs, backend="numpy")
    return f(*[np.abs(v).astype(np.float64) if v.dtype.kind == "f" else v for v in feeds])


CONV_CASES = [
    # x shape, w shape, stride, padding, dilation, groups
    ((2, 3, 9, 8), (4, 3, 3, 2), (2, 2), ((1, 1), (1, 0)), (1, 1), 1),
    ((1, 4, 7, 7), (6, 2, 3, 3), (1, 1), ((1, 1), (1, 1)), (2, 1), 2),
    ((3, 5, 6, 5), (7, 5, 1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),   # 1x1: direct GEMM
    ((1, 1, 5, 13), (1, 1, 5, 5), (1, 3), ((2, 2), (0, 1)), (1, 1), 1),
    ((2, 8, 12, 11), (16, 8, 3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # packed GEMM path
    # pixel-major columns for grad-weight (CKK >= 64, few output channels per group),
    # with stride, asymmetric padding, dilation and groups
    ((2, 16, 9, 10), (8, 8, 3, 3), (2, 1), ((1, 0), (2, 1)), (1, 2), 2),
    # grad-weight as dW^T = cols . dY^T (32 or more output channels per group)
    ((2, 6, 10, 9), (40, 6, 3, 3), (1, 2), ((1, 1), (0, 1)), (1, 1), 1),
    ((1, 8, 7, 8), (64, 4, 3, 2), (1, 1), ((1, 0), (1, 1)), (2, 1), 2),
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
def test_conv2d_and_gradients(xs, ws, stride, padding, dilation, groups):
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x64 = gc.input("x", xs, dtype="float64")
    w64 = gc.input("w", ws, dtype="float64")
    y_shape = gc.conv2d(x64, w64, **a).shape
    x, w, g = gc.input("x", xs), gc.input("w", ws), gc.input("g", y_shape)
    outs = [gc.conv2d(x, w, **a), gc.conv2d_grad_input(g, w, xs[2:], **a),
            gc.conv2d_grad_weight(x, g, ws[2:], **a)]
    feeds = [RNG.standard_normal(s).astype(np.float32) for s in (xs, ws, y_shape)]
    got, want = run_both([x, w, g], outs, feeds)
    xd, wd, gd = (gc.input(n, s, dtype="float64") for n, s in
                  (("x", xs), ("w", ws), ("g", y_shape)))
    bound = abs_bound([xd, wd, gd], [gc.conv2d(xd, wd, **a),
                                     gc.conv2d_grad_input(gd, wd, xs[2:], **a),
                                     gc.conv2d_grad_weight(xd, gd, ws[2:], **a)], feeds)
    k_fwd = ws[1] * ws[2] * ws[3]
    k_gi = ws[0] // groups * ws[2] * ws[3]
    k_gw = xs[0] * y_shape[2] * y_shape[3]
    for gv, wv, b, k in zip(got, want, bound, (k_fwd, k_gi, k_gw)):
        assert gv.shape == wv.shape and gv.dtype == wv.dtype
        err = np.abs(gv.astype(np.float64) - wv)
        assert np.all(err <= 2 * k * EPS32 * b + 1e-30), err.max()


def test_conv2d_float64_with_bias_relu():
    x = gc.input("x", (2, 3, 6, 6), dtype="float64")
    w = gc.Parameter(RNG.standard_normal((5, 3, 3, 3)), name="w")
    b = gc.Parameter(RNG.standard_normal(5), name="b")
    y = gc.relu(gc.conv2d(x, w, b, padding=1))
    v = RNG.standard_normal((2, 3, 6, 6))
    got, want = run_both([x], [y], [v])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)


POOL_CASES = [((2, 3, 8, 7), 2, None, 0, 1, False), ((3, 2, 6, 4), 2, None, 0, 1, False), ((1, 2, 9, 9), 3, 2, 1, 1, True),
              ((1, 1, 11, 6), (3, 2), (2, 1), (1, 0), (2, 1), False)]


@pytest.mark.parametrize("xs,k,s,p,d,ceil", POOL_CASES)
def test_pooling_and_gradients(xs, k, s, p, d, ceil):
    x = gc.input("x", xs)
    y = gc.max_pool2d(x, k, stride=s, padding=p, dilation=d, ceil_mode=ceil)
    g = gc.input("g", y.shape)
    h = gc.input("h", xs)
    av = gc.avg_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=False)
    av2 = gc.avg_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=True)
    ga = gc.input("ga", av.shape)
    outs = [y, gc.max_pool2d_grad(x, g, k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
            gc.max_pool2d_gather(x, h, k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
            av, av2, gc.avg_pool2d_grad(ga, xs[2:], k, stride=s, padding=p, ceil_mode=ceil,
                                        count_include_pad=False)]
    vx = RNG.standard_normal(xs).astype(np.float32)
    vx[0, 0, 0, :2] = 5.0    # a tie inside a window: the first maximum wins
    feeds = [vx, RNG.standard_normal(y.shape).astype(np.float32),
             RNG.standard_normal(xs).astype(np.float32),
             RNG.standard_normal(av.shape).astype(np.float32)]
    got, want = run_both([x, g, h, ga], outs, feeds)
    for gv, wv in zip(got, want):
        # sums of at most kH*kW terms (and overlapping windows): a few ulp
        np.testing.assert_allclose(gv, wv, rtol=32 * EPS32, atol=32 * EPS32)


@pytest.mark.parametrize("xs,k,s,p,d", [
    ((1, 1, 1, 2), (2, 1), (2, 1), (1, 0), (2, 1)),     # the case: all padding
    ((2, 1, 1, 5), (2, 1), (1, 1), (1, 0), (2, 1)),     # all padding, batch 2
    ((2, 1, 5, 3), (3, 1), (2, 1), (1, 0), (2, 1)),     # dilated, padded, none empty
])
def test_max_pool_window_entirely_in_padding(xs, k, s, p, d):
    """A dilated window can lie entirely in the padding: the reference gives -inf, no
    gradient from it and 0 for the gather; llvm routed its gradient to a clamped
    element (2 to x[0] in the first case)."""
    a = dict(stride=s, padding=p, dilation=d)
    x = gc.input("x", xs)
    y = gc.max_pool2d(x, k, **a)
    g = gc.input("g", y.shape)
    h = gc.input("h", xs)
    outs = [y, gc.max_pool2d_grad(x, g, k, **a), gc.max_pool2d_gather(x, h, k, **a)]
    vx = RNG.standard_normal(xs).astype(np.float32)
    vg = RNG.standard_normal(y.shape).astype(np.float32) + 3.0
    vh = RNG.standard_normal(xs).astype(np.float32)
    # independent reference: rows of each window (dilated, shifted by the padding)
    H = xs[2]
    OH = y.shape[2]
    want_y = np.full(y.shape, -np.inf, np.float32)
    want_dx = np.zeros(xs, np.float32)
    want_gather = np.zeros(y.shape, np.float32)
    for i in range(OH):
        rows = [i * s[0] - p[0] + t * d[0] for t in range(k[0])]
        rows = [r for r in rows if 0 <= r < H]
        if not rows:
            continue
        for nn in range(xs[0]):
            for j in range(xs[3]):
                col = vx[nn, 0, rows, j]
                r = rows[int(np.argmax(col))]
                want_y[nn, 0, i, j] = vx[nn, 0, r, j]
                want_dx[nn, 0, r, j] += vg[nn, 0, i, j]
                want_gather[nn, 0, i, j] = vh[nn, 0, r, j]
    got, ref = run_both([x, g, h], outs, [vx, vg, vh])
    for gv, rv, wv in zip(got, ref, [want_y, want_dx, want_gather]):
        np.testing.assert_allclose(rv, wv, rtol=1e-6)
        np.testing.assert_allclose(gv, wv, rtol=1e-6)


def test_softmax_family_and_cross_entropy():
    x = gc.input("x", (5, 11))
    x4 = gc.input("x4", (2, 3, 4, 5))
    y = gc.input("y", (5,), dtype="int64")
    outs = [gc.softmax(x), gc.log_softmax(x), gc.softmax(x4, axis=1), gc.log_softmax(x4, axis=2),
            gc.cross_entropy(x, y), gc.cross_entropy(x, y, label_smoothing=0.1)]
    vx = (RNG.standard_normal((5, 11)) * 5).astype(np.float32)
    vx[0, :] = 300.0       # large logits: stable
    feeds = [vx, RNG.standard_normal((2, 3, 4, 5)).astype(np.float32),
             RNG.integers(0, 11, 5)]
    got, want = run_both([x, x4, y], outs, feeds)
    for gv, wv in zip(got, want):
        # exp/log of O(10) values and sums of <= 11 terms: rtol 64 eps
        np.testing.assert_allclose(gv, wv, rtol=64 * EPS32, atol=64 * EPS32)


def _mlp(seed):
    r = np.random.default_rng(seed)
    w1 = gc.Parameter(r.standard_normal((13, 32)).astype(np.float32) * 0.3, name="w1")
    b1 = gc.Parameter(np.zeros(32, np.float32), name="b1")
    w2 = gc.Parameter(r.standard_normal((32, 7)).astype(np.float32) * 0.3, name="w2")
    b2 = gc.Parameter(np.zeros(7, np.float32), name="b2")
    return [w1, b1, w2, b2]


def _sgd_step(params, backend):
    w1, b1, w2, b2 = params
    x = gc.input("x", (None, 13))
    y = gc.input("y", (None,), dtype="int64")
    h = gc.tanh(x @ w1 + b1)
    logits = gc.relu(h) @ w2 + b2
    loss = gc.cross_entropy(logits, y)
    grads = gc.grad(loss, params)
    return gc.compile([x, y], loss, updates={p: p - 0.1 * g for p, g in zip(params, grads)},
                      backend=backend)


def test_mlp_training_matches_numpy_backend():
    p_llvm, p_np = _mlp(3), _mlp(3)
    f_llvm, f_np = _sgd_step(p_llvm, "llvm"), _sgd_step(p_np, "numpy")
    r = np.random.default_rng(4)
    for step in range(5):
        xb = r.standard_normal((17, 13)).astype(np.float32)
        yb = r.integers(0, 7, 17)
        l1, l2 = f_llvm(xb, yb), f_np(xb, yb)
        # the loss is a mean of 17 per-sample losses, each from 32-term dot products
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(p_llvm, p_np):
        # five SGD steps of float32 arithmetic: differences stay at the 1e-5 level
        np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-5)


def test_lenet_like_step_matches_numpy_backend():
    r = np.random.default_rng(5)

    def params():
        return [gc.Parameter(r2.standard_normal(s).astype(np.float32) * 0.2)
                for r2 in [np.random.default_rng(6)] for s in
                ((4, 1, 3, 3), (4,), (6, 4, 3, 3), (6 * 2 * 2, 10), (10,))]

    def step(ps, backend):
        cw1, cb1, cw2, w3, b3 = ps
        x = gc.input("x", (8, 1, 12, 12))
        y = gc.input("y", (8,), dtype="int64")
        h = gc.max_pool2d(gc.relu(gc.conv2d(x, cw1, cb1, padding=1)), 2)      # 6x6
        h = gc.avg_pool2d(gc.relu(gc.conv2d(h, cw2)), 2)                         # 4x4 -> 2x2
        logits = gc.reshape(h, (8, 24)) @ w3 + b3
        loss = gc.cross_entropy(logits, y)
        gs = gc.grad(loss, ps)
        return gc.compile([x, y], loss, updates={p: p - 0.05 * g for p, g in zip(ps, gs)},
                          backend=backend)
    pa, pb = params(), params()
    fa, fb = step(pa, "llvm"), step(pb, "numpy")
    for _ in range(3):
        xb = r.standard_normal((8, 1, 12, 12)).astype(np.float32)
        yb = r.integers(0, 10, 8)
        np.testing.assert_allclose(fa(xb, yb), fb(xb, yb), rtol=1e-5)
    for a, b in zip(pa, pb):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-5)
