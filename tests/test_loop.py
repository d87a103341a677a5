"""gc.scan: forward against explicit Python loops, BPTT against finite differences."""
import numpy as np
import pytest

import graphc as gc


def _rnn_ref(x, h0, W, U, b, reverse=False):
    h, ys = h0, np.zeros((x.shape[0],) + h0.shape)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h = np.tanh(x[t] @ W + h @ U + b)
        ys[t] = h
    return h, ys


def _rnn_graph(x, h0, W, U, b, reverse=False):
    def step(h, xt):
        hn = gc.tanh(xt @ W + h @ U + b)
        return hn, hn
    return gc.scan(step, h0, x, reverse=reverse)


def _args(rng, T=5, N=3, D=2, H=4):
    return [rng.standard_normal((T, N, D)), rng.standard_normal((N, H)),
            rng.standard_normal((D, H)) * 0.5, rng.standard_normal((H, H)) * 0.5,
            rng.standard_normal(H)]


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_forward_matches_python_loop(reverse):
    rng = np.random.default_rng(0)
    args = _args(rng)
    ins = [gc.input(f"a{i}", a.shape, "float64") for i, a in enumerate(args)]
    hT, ys = _rnn_graph(*ins, reverse=reverse)
    f = gc.compile(ins, [hT, ys])
    got_h, got_ys = f(*args)
    ref_h, ref_ys = _rnn_ref(*args, reverse=reverse)
    np.testing.assert_allclose(got_h, ref_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_ys, ref_ys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_bptt_matches_finite_differences(reverse):
    rng = np.random.default_rng(1)

    def loss(x, h0, W, U, b):
        hT, ys = _rnn_graph(x, h0, W, U, b, reverse=reverse)
        return gc.sum(ys * ys) + gc.sum(hT)
    gc.check_grad(loss, _args(rng))


def test_scan_two_carries_two_outputs_and_captured_parameter():
    rng = np.random.default_rng(2)
    W = gc.Parameter(rng.standard_normal((3, 4)), name="W")

    def f(x, h0, c0):
        def step(carry, xt):
            h, c = carry
            i = gc.sigmoid(xt @ W)
            c2 = c * 0.5 + i * gc.tanh(h)
            h2 = gc.tanh(c2) * i
            return (h2, c2), (h2, c2 * 2.0)
        (hT, cT), (hs, cs) = gc.scan(step, (h0, c0), x)
        return gc.sum(hs * cs) + gc.sum(hT * cT)

    args = [rng.standard_normal((4, 2, 3)), rng.standard_normal((2, 4)),
            rng.standard_normal((2, 4))]
    gc.check_grad(f, args)
    # gradient with respect to the captured parameter, against finite differences
    ins = [gc.input(f"a{i}", a.shape, "float64") for i, a in enumerate(args)]
    loss = f(*ins)
    fn = gc.compile(ins, [loss, gc.grad(loss, W)])
    _, g = fn(*args)
    eps, num = 1e-6, np.zeros_like(W.value)
    for idx in np.ndindex(W.value.shape):
        o = W.value[idx]
        W.value[idx] = o + eps
        lp = fn(*args)[0]
        W.value[idx] = o - eps
        lm = fn(*args)[0]
        W.value[idx] = o
        num[idx] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_scan_graph_stays_small_for_long_sequences():
    x = gc.input("x", (500, 2, 3))
    h0 = gc.input("h0", (2, 3))
    hT, _ = gc.scan(lambda h, xt: (gc.tanh(h + xt), None), h0, x)
    # one loop node, not 500 unrolled cells
    assert len(gc.Graph([hT])) < 10
    f = gc.compile([x, h0], hT)
    xv = np.random.default_rng(0).standard_normal((500, 2, 3)).astype(np.float32)
    h = np.zeros((2, 3), np.float32)
    for t in range(500):
        h = np.tanh(h + xv[t])
    np.testing.assert_allclose(f(xv, np.zeros((2, 3), np.float32)), h, rtol=1e-5, atol=1e-6)


def test_scan_symbolic_batch_and_length():
    x = gc.input("x", ("T", None, 2))
    h0 = gc.input("h0", (None, 2))
    hT, ys = gc.scan(lambda h, xt: (h * 0.5 + xt, h), h0, x)
    f = gc.compile([x, h0], [hT, ys])
    for T, N in [(3, 1), (6, 4)]:
        xv = np.ones((T, N, 2), np.float32)
        h, ref = np.zeros((N, 2), np.float32), []
        for t in range(T):
            ref.append(h)
            h = h * 0.5 + xv[t]
        got_h, got_ys = f(xv, np.zeros((N, 2), np.float32))
        np.testing.assert_allclose(got_h, h, rtol=1e-6)
        np.testing.assert_allclose(got_ys, np.stack(ref), rtol=1e-6)


def test_scan_errors_name_the_problem():
    x = gc.input("x", (4, 2, 3))
    h0 = gc.input("h0", (2, 3))
    with pytest.raises(ValueError, match="carry 0 enters the step as float32\\(2, 3\\)"):
        gc.scan(lambda h, xt: (gc.sum(h, axis=0), None), h0, x)
    with pytest.raises(TypeError, match="must return \\(carry, y\\)"):
        gc.scan(lambda h, xt: h, h0, x)
    with pytest.raises(ValueError, match="test_loop.py"):
        gc.scan(lambda h, xt: (h, None), h0, gc.input("s", ()))
