"""max/avg pooling and their gradient ops against independent loop references."""
import itertools

import numpy as np
import pytest

import graphc as gc


# ------------------------------------------------------------------ independent references
def pool_out(size, k, s, p, d, ceil_mode):
    """PyTorch's output-size formula, written out."""
    num = size + 2 * p - d * (k - 1) - 1
    o = (num + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= size + p:
        o -= 1
    return o


def naive_max_pool(x, k, s, p, d, ceil_mode):
    """Returns (y, argmax positions as (row, col) per output) by direct loops."""
    n_, c_, h, w = x.shape
    oh, ow = pool_out(h, k[0], s[0], p[0], d[0], ceil_mode), pool_out(w, k[1], s[1], p[1], d[1],
                                                                        ceil_mode)
    y = np.empty((n_, c_, oh, ow))
    arg = np.empty((n_, c_, oh, ow, 2), dtype=int)
    for n in range(n_):
        for c in range(c_):
            for i in range(oh):
                for j in range(ow):
                    best, where = -np.inf, None
                    for a in range(k[0]):
                        for b in range(k[1]):
                            r, q = i * s[0] - p[0] + a * d[0], j * s[1] - p[1] + b * d[1]
                            if 0 <= r < h and 0 <= q < w and x[n, c, r, q] > best:
                                best, where = x[n, c, r, q], (r, q)   # strict: first max wins
                    y[n, c, i, j] = best
                    arg[n, c, i, j] = where
    return y, arg


def naive_max_pool_grad(x, g, k, s, p, d, ceil_mode):
    _, arg = naive_max_pool(x, k, s, p, d, ceil_mode)
    dx = np.zeros_like(x, dtype=np.float64)
    for n, c, i, j in np.ndindex(*g.shape):
        r, q = arg[n, c, i, j]
        dx[n, c, r, q] += g[n, c, i, j]
    return dx


def naive_avg_pool(x, k, s, p, ceil_mode, count_include_pad):
    n_, c_, h, w = x.shape
    oh, ow = pool_out(h, k[0], s[0], p[0], 1, ceil_mode), pool_out(w, k[1], s[1], p[1], 1,
                                                                     ceil_mode)
    y = np.empty((n_, c_, oh, ow))
    for n in range(n_):
        for c in range(c_):
            for i in range(oh):
                for j in range(ow):
                    r0, q0 = i * s[0] - p[0], j * s[1] - p[1]
                    r1, q1 = min(r0 + k[0], h + p[0]), min(q0 + k[1], w + p[1])
                    divisor = (r1 - r0) * (q1 - q0)
                    total, real = 0.0, 0
                    for r in range(r0, r1):
                        for q in range(q0, q1):
                            if 0 <= r < h and 0 <= q < w:
                                total += x[n, c, r, q]
                                real += 1
                    y[n, c, i, j] = total / (divisor if count_include_pad else real)
    return y


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def compile1(fn, shape, dtype="float64"):
    x = gc.input("x", shape, dtype)
    return gc.compile([x], fn(x))


# ------------------------------------------------------------------ forward
def _pool_cases():
    sizes = [(7, 7), (5, 8), (1, 1), (11, 6), (4, 13)]
    cases = []
    for idx, (k, s, p, ceil) in enumerate(itertools.product(
            [1, 2, 3, (3, 2)], [None, 1, 2, (2, 3)], [0, 1], [False, True])):
        kk = pair(k)
        if p and any(2 * p > kd for kd in kk):
            continue   # padding > kernel/2 is an error, tested below
        h, w = sizes[idx % len(sizes)]
        h, w = max(h, kk[0]), max(w, kk[1])
        cases.append(dict(k=k, s=s, p=p, ceil=ceil, hw=(h, w),
                          dtype=np.float32 if idx % 3 else np.float64))
    return cases


def _id(c):
    return f"k{c['k']}-s{c['s']}-p{c['p']}-ceil{int(c['ceil'])}-{c['hw']}".replace(" ", "")


@pytest.mark.parametrize("c", _pool_cases(), ids=_id)
def test_max_pool_forward(c):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3) + c["hw"]).astype(c["dtype"])
    out = compile1(lambda t: gc.max_pool2d(t, c["k"], c["s"], c["p"], ceil_mode=c["ceil"]),
                   x.shape, c["dtype"])(x)
    k = pair(c["k"])
    ref, _ = naive_max_pool(x, k, pair(c["s"] or c["k"]), pair(c["p"]), (1, 1), c["ceil"])
    assert out.dtype == c["dtype"]
    np.testing.assert_array_equal(out, ref.astype(c["dtype"]))


@pytest.mark.parametrize("c", _pool_cases(), ids=_id)
@pytest.mark.parametrize("include_pad", [True, False])
def test_avg_pool_forward(c, include_pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2) + c["hw"]).astype(c["dtype"])
    out = compile1(lambda t: gc.avg_pool2d(t, c["k"], c["s"], c["p"], ceil_mode=c["ceil"],
                                           count_include_pad=include_pad), x.shape, c["dtype"])(x)
    ref = naive_avg_pool(x.astype(np.float64), pair(c["k"]), pair(c["s"] or c["k"]),
                         pair(c["p"]), c["ceil"], include_pad)
    assert out.dtype == c["dtype"]
    tol = 1e-12 if c["dtype"] == np.float64 else 1e-6
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("k, s, p, d, ceil", [
    (3, 1, 1, 2, False), ((2, 3), (1, 2), (1, 0), (2, 1), True), (2, 2, 0, 3, True)])
def test_max_pool_dilation(k, s, p, d, ceil):
    x = np.random.default_rng(2).standard_normal((1, 2, 9, 10))
    out = compile1(lambda t: gc.max_pool2d(t, k, s, p, dilation=d, ceil_mode=ceil), x.shape)(x)
    ref, _ = naive_max_pool(x, pair(k), pair(s), pair(p), pair(d), ceil)
    np.testing.assert_array_equal(out, ref)


def test_ceil_mode_shapes_match_pytorch_rule():
    # 5 wide, kernel 2, stride 2: floor -> 2, ceil -> 3 (the last window holds column 4 only)
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    out = compile1(lambda t: gc.max_pool2d(t, 2, ceil_mode=True), x.shape)(x)
    np.testing.assert_array_equal(out[0, 0], [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    avg = compile1(lambda t: gc.avg_pool2d(t, 2, ceil_mode=True), x.shape)(x)
    assert avg[0, 0, 2, 2] == 24.0            # a 1x1 remnant window averages one element
    assert avg[0, 0, 0, 2] == (4 + 9) / 2
    # a window that would start in the right padding is dropped: 4 wide, k 2, s 2, p 1
    y = gc.max_pool2d(gc.input("x", (1, 1, 4, 4)), 2, 2, 1, ceil_mode=True)
    assert y.shape == (1, 1, 3, 3)


def test_avg_pool_count_include_pad_values():
    x = np.ones((1, 1, 3, 3))
    inc = compile1(lambda t: gc.avg_pool2d(t, 3, 1, 1), x.shape)(x)
    exc = compile1(lambda t: gc.avg_pool2d(t, 3, 1, 1, count_include_pad=False), x.shape)(x)
    np.testing.assert_allclose(inc[0, 0], [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9],
                                           [4 / 9, 6 / 9, 4 / 9]], rtol=1e-15)
    np.testing.assert_array_equal(exc, np.ones((1, 1, 3, 3)))


# ------------------------------------------------------------------ gradients
def distinct(shape, seed):
    """Values far apart (no ties within 1), so max pooling is smooth at the point."""
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64) * 0.5


GRAD_CASES = [(2, None, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
              ((2, 3), (1, 2), (1, 1), (2, 1), True), (3, 1, 0, 1, False)]


@pytest.mark.parametrize("k, s, p, d, ceil", GRAD_CASES)
def test_max_pool_gradient(k, s, p, d, ceil):
    x = distinct((2, 2, 7, 6), 3)
    gc.check_grad(lambda t: gc.max_pool2d(t, k, s, p, dilation=d, ceil_mode=ceil), [x],
                  max_entries=40)


@pytest.mark.parametrize("k, s, p, d, ceil", GRAD_CASES)
def test_max_pool_grad_op_against_loops_with_ties(k, s, p, d, ceil):
    # Small integers: many ties, so this pins down the first-max rule and accumulation.
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3, (2, 2, 7, 6)).astype(np.float64)
    g = rng.standard_normal(gc.max_pool2d(gc.input("x", x.shape, "float64"), k, s, p,
                                          dilation=d, ceil_mode=ceil).shape)
    xi, gi = gc.input("x", x.shape, "float64"), gc.input("g", g.shape, "float64")
    y = gc.max_pool2d(xi, k, s, p, dilation=d, ceil_mode=ceil)
    dx = gc.grad(y, xi, grad_output=gi)
    out = gc.compile([xi, gi], dx)(x, g)
    ref = naive_max_pool_grad(x, g, pair(k), pair(s or k), pair(p), pair(d), ceil)
    np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-14)


def test_max_pool_tie_rule_first_max():
    # All equal: every window sends its gradient to its top-left element.
    x = np.ones((1, 1, 3, 3))
    xi = gc.input("x", x.shape, "float64")
    dx = gc.grad(gc.sum(gc.max_pool2d(xi, 2, stride=1)), xi)
    np.testing.assert_array_equal(gc.compile([xi], dx)(x)[0, 0],
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    # Ties later in the window: [[0, 7, 0], [7, 7, 0], [0, 0, 0]] with 2x2 windows, stride 1:
    # window (0,0) = [[0, 7], [7, 7]] picks (0, 1), the row-major first 7, not (1, 0) or
    # (1, 1); window (0,1) = [[7, 0], [7, 0]] also picks (0, 1); window (1,0) = [[7, 7],
    # [0, 0]] picks (1, 0); window (1,1) picks (1, 1).
    x2 = np.array([[[[0.0, 7.0, 0.0], [7.0, 7.0, 0.0], [0.0, 0.0, 0.0]]]])
    np.testing.assert_array_equal(gc.compile([xi], dx)(x2)[0, 0],
                                  [[0, 2, 0], [1, 1, 0], [0, 0, 0]])
    # overlapping windows both choosing the same element accumulate
    x3 = np.zeros((1, 1, 3, 3))
    x3[0, 0, 1, 1] = 5.0
    np.testing.assert_array_equal(gc.compile([xi], dx)(x3)[0, 0],
                                  [[0, 0, 0], [0, 4, 0], [0, 0, 0]])


@pytest.mark.parametrize("k, s, p, ceil, inc", [(2, None, 0, False, True), (3, 2, 1, True, True),
                                                (3, 2, 1, True, False), ((2, 3), (3, 1), (1, 0),
                                                                         False, False)])
def test_avg_pool_gradient(k, s, p, ceil, inc):
    x = np.random.default_rng(5).standard_normal((2, 2, 7, 6))
    gc.check_grad(lambda t: gc.avg_pool2d(t, k, s, p, count_include_pad=inc, ceil_mode=ceil),
                  [x], max_entries=40)


def test_second_derivatives_through_pools():
    x = distinct((1, 2, 6, 6), 6)
    for pool in (lambda t: gc.max_pool2d(t, 3, 2, 1, ceil_mode=True),
                 lambda t: gc.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False)):
        # d/dx of grad(sum(pool(x)^2)) exercises the gradient ops' own gradient rules
        gc.check_grad(lambda t: gc.grad(gc.sum(pool(t) * pool(t)), t), [x], max_entries=24)


# ------------------------------------------------------------------ global average pooling
def test_global_avg_pool():
    x = np.random.default_rng(7).standard_normal((3, 4, 5, 7))
    xi = gc.input("x", (None, 4, 5, 7), "float64")
    y = gc.global_avg_pool2d(xi)
    assert y.shape == ("N", 4, 1, 1)
    out = gc.compile([xi], y)(x)
    ref = np.array([[[[x[n, c].sum() / 35.0]] for c in range(4)] for n in range(3)])
    np.testing.assert_allclose(out, ref, rtol=1e-13)
    gc.check_grad(gc.global_avg_pool2d, [x], max_entries=20)


def test_symbolic_batch_pools():
    xi = gc.input("x", (None, 2, 6, 6), "float64")
    y = gc.max_pool2d(xi, 2) + gc.avg_pool2d(xi, 2)
    assert y.shape == ("N", 2, 3, 3)
    dx = gc.grad(gc.sum(y), xi)
    f = gc.compile([xi], [y, dx])
    for n in (1, 3):
        x = distinct((n, 2, 6, 6), n)
        yv, dxv = f(x)
        ref = naive_max_pool(x, (2, 2), (2, 2), (0, 0), (1, 1), False)[0] + naive_avg_pool(
            x, (2, 2), (2, 2), (0, 0), False, True)
        np.testing.assert_allclose(yv, ref, rtol=1e-14)
        assert dxv.shape == (n, 2, 6, 6)
        # each 2x2 block: 1 for its max, plus 1/4 everywhere from the average
        assert dxv.sum() == pytest.approx(n * 2 * 9 * 2.0)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("fn, pattern", [
    (lambda x: gc.max_pool2d(x, 2, padding=2), r"padding \(2, 2\) must be at most half"),
    (lambda x: gc.avg_pool2d(x, 3, padding=(1, 2)), r"at most half the kernel size \(3, 3\)"),
    (lambda x: gc.max_pool2d(x, 9), r"larger than the padded input H 8"),
    (lambda x: gc.max_pool2d(x, 2, stride=0), r"stride must be >= 1"),
])
def test_pool_errors(fn, pattern):
    x = gc.input("x", (1, 1, 8, 8))
    with pytest.raises(gc.GraphBuildError, match=pattern) as e:
        fn(x)
    assert "test_ops_pool.py" in str(e.value)
    assert "(1, 1, 8, 8)" in str(e.value)


def test_pool_rank_and_dtype_errors():
    with pytest.raises(gc.GraphBuildError, match=r"4-D .* got \(8, 8\)") as e:
        gc.max_pool2d(gc.input("x", (8, 8)), 2)
    assert "test_ops_pool.py" in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="float"):
        gc.avg_pool2d(gc.input("x", (1, 1, 4, 4), "int64"), 2)
    with pytest.raises(gc.GraphBuildError, match=r"4-D") as e:
        gc.global_avg_pool2d(gc.input("x", (2, 3)))
    assert "test_ops_pool.py" in str(e.value)


# ------------------------------------------------------------------ optional oracle
def test_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(8).standard_normal((2, 3, 11, 9))
    xt = torch.from_numpy(x)
    for k, s, p, ceil in [(3, 2, 1, True), (2, None, 0, False), ((3, 2), (2, 1), (1, 1), True)]:
        mp = compile1(lambda t: gc.max_pool2d(t, k, s, p, ceil_mode=ceil), x.shape)(x)
        np.testing.assert_array_equal(mp, F.max_pool2d(xt, k, s, p, ceil_mode=ceil).numpy())
        for inc in (True, False):
            ap = compile1(lambda t: gc.avg_pool2d(t, k, s, p, ceil_mode=ceil,
                                                  count_include_pad=inc), x.shape)(x)
            ref = F.avg_pool2d(xt, k, s, p, ceil_mode=ceil, count_include_pad=inc).numpy()
            np.testing.assert_allclose(ap, ref, rtol=1e-12, atol=1e-12)


def test_max_pool_propagates_nan():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 0] = np.nan
    out = compile1(lambda t: gc.max_pool2d(t, 2), x.shape, "float32")(x)
    assert np.isnan(out[0, 0, 0, 0])
    np.testing.assert_array_equal(out[0, 0, 0, 1], 7.0)
    np.testing.assert_array_equal(out[0, 0, 1], [13.0, 15.0])


def test_all_minus_inf_window_routes_gradient_into_the_input():
    # The window at the top-left holds padding and real -inf values: PyTorch picks the
    # first real element, so the gradient is not lost in the padding.
    x = np.full((1, 1, 2, 2), -np.inf)
    xi = gc.input("x", x.shape, "float64")
    y = gc.max_pool2d(xi, 2, stride=2, padding=1)
    dx = gc.grad(gc.sum(y), xi)
    yv, dxv = gc.compile([xi], [y, dx])(x)
    assert np.all(yv == -np.inf)
    np.testing.assert_array_equal(dxv[0, 0], [[1, 1], [1, 1]])


# ------------------------------------------------------------------ ceil_mode overhang
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_ceil_mode_window_larger_than_the_input(backend):
    """ceil_mode keeps a window that starts inside the input even when the kernel is
    larger than the (padded) input: avg_pool2d(k=2, s=2, ceil_mode=True) on H = 1 gives
    one row, as PyTorch does (it raised GraphBuildError).  Values written out by hand
    from PyTorch's rules: windows clipped to the padded extent for the divisor."""
    if backend == "llvm":
        pytest.importorskip("llvmlite")
    v = np.array([1.0, 5.0, 2.0, 4.0])
    g = np.array([0.5, -2.0, 3.0])

    def run(fn, x, gy=None):
        xi = gc.input("x", x.shape, "float64")
        y = fn(xi)
        outs = [y]
        if gy is not None:
            gi = gc.input("g", gy.shape, "float64")
            outs.append(gc.grad(gc.sum(y * gi), [xi])[0])
            return gc.compile([xi, gi], outs, backend=backend)(x, gy)
        return gc.compile([xi], outs, backend=backend)(x)

    # H = 1, W = 3, k = 2, s = 2: rows [0, 2) clipped to [0, 1); columns [0, 2), [2, 4) -> [2, 3)
    x = np.array([[[[1.0, 2.0, 3.0]]]])
    y, = run(lambda t: gc.avg_pool2d(t, 2, 2, ceil_mode=True), x)
    np.testing.assert_array_equal(y, [[[[1.5, 3.0]]]])
    y, = run(lambda t: gc.max_pool2d(t, 2, 2, ceil_mode=True), x)
    np.testing.assert_array_equal(y, [[[[2.0, 3.0]]]])
    # 1x1 input, k = 2, s = 2: one window holding the one element
    one = np.array([[[[7.0]]]])
    for pool in (gc.avg_pool2d, gc.max_pool2d):
        y, dx = run(lambda t: pool(t, 2, 2, ceil_mode=True), one, np.array([[[[3.0]]]]))
        np.testing.assert_array_equal(y, [[[[7.0]]]])
        np.testing.assert_array_equal(dx, [[[[3.0]]]])

    # H = 1, W = 4, k = 3, s = 2, p = 1: one row window (rows -1..1; row 1 is padding),
    # columns -1..1, 1..3, 3..4 (the last clipped to the padded width 5)
    x = v.reshape(1, 1, 1, 4)
    gy = g.reshape(1, 1, 1, 3)
    y, dx = run(lambda t: gc.avg_pool2d(t, 3, 2, 1, ceil_mode=True), x, gy)
    np.testing.assert_allclose(y[0, 0, 0], [(1 + 5) / 9, (5 + 2 + 4) / 9, 4 / 6], rtol=1e-15)
    np.testing.assert_allclose(dx[0, 0, 0], [0.5 / 9, 0.5 / 9 - 2 / 9, -2 / 9, -2 / 9 + 3 / 6],
                               rtol=1e-15)
    y, dx = run(lambda t: gc.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                x, gy)
    np.testing.assert_allclose(y[0, 0, 0], [(1 + 5) / 2, (5 + 2 + 4) / 3, 4.0], rtol=1e-15)
    np.testing.assert_allclose(dx[0, 0, 0], [0.25, 0.25 - 2 / 3, -2 / 3, -2 / 3 + 3],
                               rtol=1e-15)
    y, dx = run(lambda t: gc.max_pool2d(t, 3, 2, 1, ceil_mode=True), x, gy)
    np.testing.assert_array_equal(y[0, 0, 0], [5.0, 5.0, 4.0])
    np.testing.assert_array_equal(dx[0, 0, 0], [0.0, 0.5 - 2.0, 0.0, 3.0])


def test_ceil_mode_still_refuses_windows_that_start_past_the_input():
    # k = 3, s = 2 on H = 1 without padding: ceil((1 - 3) / 2) + 1 = 0 windows (PyTorch:
    # "output size is too small"); k = 3, s = 1: -1 windows
    for k, s in ((3, 2), (3, 1)):
        for pool in (gc.max_pool2d, gc.avg_pool2d):
            with pytest.raises(gc.GraphBuildError, match="larger than the padded input H 1 "
                                                         r"\(input 1 \+ padding 0\+0\) even "
                                                         "with ceil_mode"):
                pool(gc.input("x", (1, 1, 1, 4)), k, s, ceil_mode=True)
    assert gc.max_pool2d(gc.input("x", (1, 1, 1, 4)), 2, 2, ceil_mode=True).shape == (1, 1, 1, 2)


OVERHANG = [((1, 3), 2, 2, 0, 1), ((2, 1), (3, 2), 2, 1, 1), ((1, 1), 3, 3, 1, 1),
            ((3, 2), (2, 3), (3, 2), 1, (2, 1)), ((1, 5), (2, 3), (2, 2), (1, 1), 1),
            ((1, 2), (4, 2), 3, (1, 0), 1), ((2, 2), 2, 4, 0, (3, 1))]  # extent > padded


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("hw, k, s, p, d", OVERHANG)
def test_ceil_mode_overhang_against_loops(backend, hw, k, s, p, d):
    """Kernels larger than the input along an axis, ceil_mode: forward values and the
    max-pool gradient against the loop references (PyTorch's rules written out)."""
    if backend == "llvm":
        pytest.importorskip("llvmlite")
    x = distinct((2, 2) + hw, 7)
    xi = gc.input("x", x.shape, "float64")
    y = gc.max_pool2d(xi, k, s, p, dilation=d, ceil_mode=True)
    g = np.random.default_rng(8).standard_normal(y.shape)
    gi = gc.input("g", g.shape, "float64")
    dx = gc.grad(y, xi, grad_output=gi)
    outs = [y, dx]
    if pair(d) == (1, 1):
        for inc in (True, False):
            outs.append(gc.avg_pool2d(xi, k, s, p, ceil_mode=True, count_include_pad=inc))
    got = gc.compile([xi, gi], outs, backend=backend)(x, g)
    ref, _ = naive_max_pool(x, pair(k), pair(s), pair(p), pair(d), True)
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_allclose(got[1], naive_max_pool_grad(x, g, pair(k), pair(s), pair(p),
                                                           pair(d), True), rtol=1e-14)
    for out, inc in zip(got[2:], (True, False)):
        np.testing.assert_allclose(out, naive_avg_pool(x, pair(k), pair(s), pair(p), True, inc),
                                   rtol=1e-14)
    if backend == "numpy":
        gc.check_grad(lambda t: gc.avg_pool2d(t, k, s, p, ceil_mode=True), [x], max_entries=20)
