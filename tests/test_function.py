"""gc.compile: calling conventions, input validation, specialization on
symbolic dims, and parameter updates."""
import numpy as np
import pytest

import graphc as gc


def _affine():
    x = gc.input("x", (None, 3), "float32")
    b = gc.input("b", (3,), "float32")
    return x, b, x * 2.0 + b


# --------------------------------------------------------------- calling
def test_positional_and_keyword_arguments():
    x, b, y = _affine()
    f = gc.compile([x, b], y)
    xv = np.arange(6, dtype=np.float32).reshape(2, 3)
    bv = np.array([1.0, -1.0, 0.5], np.float32)
    want = xv * 2 + bv
    for out in (f(xv, bv), f(x=xv, b=bv), f(b=bv, x=xv), f(xv, b=bv)):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_array_equal(out, want)


def test_single_output_vs_list():
    x = gc.input("x", (2,), "float64")
    xv = np.array([1.0, 2.0])
    single = gc.compile([x], x * 3.0)(xv)
    assert isinstance(single, np.ndarray)
    listed = gc.compile([x], [x * 3.0])(xv)
    assert isinstance(listed, list) and len(listed) == 1
    np.testing.assert_array_equal(listed[0], single)
    two = gc.compile(x, [x + 1.0, gc.sum(x)])(xv)       # a lone input need not be a list
    assert two[1].shape == () and two[1] == 3.0


def test_scalar_inputs_and_no_inputs():
    s = gc.input("s", (), "float64")
    out = gc.compile([s], s * s + 1.0)(np.float64(3.0))
    assert out.shape == () and out == 10.0
    assert gc.compile([s], s * 2.0)(2.5) == 5.0                 # a Python float is accepted
    w = gc.Parameter(np.array([1.0, 2.0]), name="w")
    np.testing.assert_array_equal(gc.compile([], w * 2.0)(), [2.0, 4.0])


def test_missing_unknown_and_extra_arguments():
    x, b, y = _affine()
    f = gc.compile([x, b], y)
    xv = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"missing(.|\n)*'b'"):
        f(xv)
    with pytest.raises(TypeError, match="no input named 'z'"):
        f(xv, np.zeros(3, np.float32), z=1)
    with pytest.raises(TypeError, match="given twice"):
        f(xv, np.zeros(3, np.float32), x=xv)
    with pytest.raises(TypeError, match="takes 2 inputs, got 3"):
        f(xv, xv, xv)


def test_wrong_dtype_names_the_input():
    i = gc.input("labels", (3,), "int64")
    f = gc.compile([i], i * 2)
    with pytest.raises(TypeError, match=r"'labels'(.|\n)*int64(.|\n)*float64"):
        f(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="labels"):
        f(np.array(["a", "b", "c"]))
    # an int32 array is the same kind: accepted and converted
    out = f(np.array([1, 2, 3], np.int32))
    assert out.dtype == np.int64 and out.tolist() == [2, 4, 6]


def test_same_kind_cast_float64_to_float32_accepted():
    x = gc.input("x", (3,), "float32")
    f = gc.compile([x], x + 0.0)
    with pytest.warns(gc.InputCastWarning, match="input 'x' expects float32, got float64"):
        out = f(np.array([0.1, 0.2, 0.3]))               # float64 in: warned, cast
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.1, 0.2, 0.3], np.float32))
    out = f([1, 2, 3])                                   # a list of ints works too
    assert out.dtype == np.float32 and out.tolist() == [1.0, 2.0, 3.0]


def test_wrong_shape_names_input_expected_and_given():
    x, b, y = _affine()
    f = gc.compile([x, b], y)
    with pytest.raises(ValueError, match=r"'b'(.|\n)*\(3,\)(.|\n)*\(4,\)"):
        f(np.zeros((2, 3), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"'x'(.|\n)*\(N, 3\)(.|\n)*\(2, 4\)"):
        f(np.zeros((2, 4), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"'x'(.|\n)*\(N, 3\)(.|\n)*\(6,\)"):
        f(np.zeros(6, np.float32), np.zeros(3, np.float32))


def test_inconsistent_symbolic_dims_between_inputs():
    x = gc.input("x", (None, 3), "float64")
    y = gc.input("y", (None,), "float64")
    f = gc.compile([x, y], gc.sum(x, axis=1) + y)
    np.testing.assert_allclose(f(np.ones((4, 3)), np.arange(4.0)), 3 + np.arange(4.0))
    with pytest.raises(ValueError, match=r"'y'(.|\n)*N=5(.|\n)*N=4"):
        f(np.ones((4, 3)), np.zeros(5))


def test_named_symbols_bind_independently():
    a = gc.input("a", ("B", "T"), "float64")
    c = gc.input("c", ("T",), "float64")
    f = gc.compile([a, c], a * c)
    out = f(np.ones((2, 5)), np.arange(5.0))
    np.testing.assert_array_equal(out, np.tile(np.arange(5.0), (2, 1)))
    with pytest.raises(ValueError, match="T="):
        f(np.ones((2, 5)), np.arange(4.0))


def test_specialization_cache_two_batch_sizes():
    x = gc.input("x", (None, 2), "float64")
    w = gc.Parameter(np.array([[1.0, -1.0], [2.0, 0.5]]), name="w")
    y = gc.mean(gc.relu(x @ w), axis=0)
    f = gc.compile([x], [y, gc.grad(gc.sum(y), w)])
    rng = np.random.default_rng(0)
    xs = {n: rng.normal(size=(n, 2)) for n in (2, 5)}
    results = {}
    for n in (2, 5, 2):
        results[n] = f(xs[n])
        h = xs[n] @ w.value
        np.testing.assert_allclose(results[n][0], np.maximum(h, 0).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(results[n][1], xs[n].T @ (h > 0) / n, rtol=1e-12)
    assert len(f._cache) == 2


def test_outputs_depending_on_unlisted_input_is_an_error():
    x, b, y = _affine()
    with pytest.raises(ValueError, match=r"'b'(.|\n)*not in the inputs(.|\n)*test_function"):
        gc.compile([x], y)


def test_bad_inputs_list():
    x = gc.input("x", (2,), "float32")
    with pytest.raises(TypeError, match="gc.input"):
        gc.compile([x * 2.0], x)
    x2 = gc.input("x", (2,), "float32")
    with pytest.raises(ValueError, match="two inputs are named 'x'"):
        gc.compile([x, x2], x + x2)
    with pytest.raises(ValueError, match="unknown backend"):
        gc.compile([x], x, backend="tpu")


# --------------------------------------------------------------- updates
def test_update_value_equals_manual_sgd_step():
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(3, 2))
    w = gc.Parameter(w0.copy(), name="w")
    x = gc.input("x", (None, 3), "float64")
    t = gc.input("t", (None, 2), "float64")
    loss = gc.mean((x @ w - t) ** 2)
    g = gc.grad(loss, w)
    step = gc.compile([x, t], [loss, g], updates={w: w - 0.1 * g})
    xv, tv = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    loss_v, g_v = step(xv, tv)
    r = xv @ w0 - tv
    g_manual = 2 * xv.T @ r / r.size
    assert loss_v == pytest.approx((r ** 2).mean(), rel=1e-12)   # computed with the old w
    np.testing.assert_allclose(g_v, g_manual, rtol=1e-12)
    np.testing.assert_allclose(w.value, w0 - 0.1 * g_manual, rtol=1e-12)
    # a second step starts from the updated value
    step(xv, tv)
    w1 = w0 - 0.1 * g_manual
    r1 = xv @ w1 - tv
    np.testing.assert_allclose(w.value, w1 - 0.1 * 2 * xv.T @ r1 / r1.size, rtol=1e-12)


def test_every_output_sees_the_old_value():
    w = gc.Parameter(np.array([1.0, 2.0]), name="w")
    v = gc.Parameter(np.array([5.0, 7.0]), name="v")
    outs = [w, gc.reshape(w, (2, 1)), w * 1.0, w + 0.0, gc.sum(w), v * w]
    f = gc.compile([], outs, updates={w: w * 10.0, v: v + w})
    res = f()
    np.testing.assert_array_equal(res[0], [1.0, 2.0])
    np.testing.assert_array_equal(res[1], [[1.0], [2.0]])
    np.testing.assert_array_equal(res[2], [1.0, 2.0])
    np.testing.assert_array_equal(res[3], [1.0, 2.0])
    assert res[4] == 3.0
    np.testing.assert_array_equal(res[5], [5.0, 14.0])
    np.testing.assert_array_equal(w.value, [10.0, 20.0])
    np.testing.assert_array_equal(v.value, [6.0, 9.0])      # v's update read the old w
    # outputs from the first call are not changed by the second
    f()
    np.testing.assert_array_equal(res[0], [1.0, 2.0])
    np.testing.assert_array_equal(w.value, [100.0, 200.0])


def test_updates_are_simultaneous_swap():
    a = gc.Parameter(np.array([1.0, 2.0]), name="a")
    b = gc.Parameter(np.array([3.0, 4.0]), name="b")
    f = gc.compile([], [], updates=[(a, b), (b, a)])
    f()
    np.testing.assert_array_equal(a.value, [3.0, 4.0])
    np.testing.assert_array_equal(b.value, [1.0, 2.0])


def test_update_with_constant_and_counter():
    step = gc.Parameter(np.array([0], np.int64), name="step")
    w = gc.Parameter(np.ones(2, np.float32), name="w")
    f = gc.compile([], step * 1, updates={step: step + 1, w: np.zeros(2, np.float32)})
    assert f()[0] == 0 and f()[0] == 1 and step.value[0] == 2
    assert step.value.dtype == np.int64
    np.testing.assert_array_equal(w.value, [0.0, 0.0])


def test_scalar_parameter_counter():
    step = gc.Parameter(np.array(0, np.int64), name="step")
    assert step.value.shape == ()
    f = gc.compile([], step * 1, updates={step: step + 1})
    assert f() == 0 and f() == 1 and step.value == 2


def test_update_errors():
    w = gc.Parameter(np.ones((2, 2)), name="w")
    x = gc.input("x", (2, 2), "float64")
    with pytest.raises(TypeError, match="Parameter"):
        gc.compile([x], x, updates={x: x * 2.0})
    with pytest.raises(ValueError, match=r"shape(.|\n)*test_function"):
        gc.compile([x], x, updates={w: gc.sum(x, axis=0)})
    with pytest.raises(ValueError, match="twice"):
        gc.compile([x], x, updates=[(w, w * 2.0), (w, w * 3.0)])
    with pytest.raises(ValueError, match=r"'x'(.|\n)*not in the inputs"):
        gc.compile([], w, updates={w: w + x})


def test_parameter_value_checks():
    w = gc.Parameter(np.ones(3, np.float32), name="w")
    w.set_value(np.array([1.0, 2.0, 3.0]))
    assert w.value.dtype == np.float32 and w.value.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="shape"):
        w.set_value(np.ones(4))
    p = gc.Parameter([1.5, 2.5])
    assert p.dtype == np.float32 and p.value.dtype == np.float32


# --------------------------------------------------------------- threads
def _counter_from_threads(backend, sizes, steps=1000):
    """Threads (one per size in `sizes`) each call a `p += 1 + sum(x)` step `steps`
    times with x = zeros(size); returns p."""
    import sys
    import threading
    p = gc.Parameter(np.zeros((), np.float64), name="p")
    x = gc.input("x", ("n",), "float64")
    f = gc.compile([x], p * 1.0, updates={p: p + 1.0 + gc.sum(x)}, backend=backend)
    start = threading.Barrier(len(sizes))
    errors = []

    def work(n):
        try:
            zeros = np.zeros(n)
            start.wait()
            for _ in range(steps):
                f(zeros)
        except Exception as e:    # reported by the main thread
            errors.append(e)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible: races show up
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    return float(p.value)


def test_updates_from_two_threads_lose_no_step():
    # Each call reads p, computes p + 1 and writes it: two threads interleaving those
    # on the NumPy backend lost updates (p = 1085 after 2 x 1000 steps).
    assert _counter_from_threads("numpy", [4, 4]) == 2000.0
    assert _counter_from_threads("numpy", [3, 5]) == 2000.0


def test_updates_from_two_threads_of_two_shapes_llvm():
    # Two input sizes: two native runners, each with its own lock; the Function's
    # lock serializes the steps across them.
    assert _counter_from_threads("llvm", [3, 5], steps=2000) == 4000.0


# --------------------------------------------------------------- float32 range
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_float64_input_beyond_float32_range_is_refused(backend):
    # float64 -> float32 used to turn 1e39 into inf silently: refused, naming the input
    x = gc.input("x", (2, 3), "float32")
    f = gc.compile([x], x * 2.0, backend=backend, name="double")
    v = np.zeros((2, 3))
    v[1, 2] = -1e39
    with pytest.raises(ValueError, match=r"double: input 'x': float64 value -1e\+39 at index "
                                         r"\(1, 2\) is beyond the float32 range.*-inf"):
        f(v)
    big = float(np.finfo(np.float32).max)
    ok = np.array([[big, -big, np.inf], [np.nan, 1e-50, 0.1]])  # rounding is no error
    with pytest.warns(gc.InputCastWarning):
        got = f(ok)
    with np.errstate(over="ignore"):
        want = ok.astype(np.float32) * np.float32(2)
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got[0, :2]).all()          # overflow computed in float32 is the graph's
