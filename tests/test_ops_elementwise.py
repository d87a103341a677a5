"""Elementwise ops: forward against NumPy with broadcasting, dtype promotion,
integer division, gradients through broadcasting, Python operators, and
type-rule errors that point at this file."""
import math
import operator

import numpy as np
import pytest

import graphc as gc

RNG = np.random.default_rng(0)


def run(fn, *arrays):
    """Compile fn over inputs shaped/typed like `arrays` and run it on them."""
    ins = [gc.input(f"a{k}", np.shape(a), np.asarray(a).dtype) for k, a in enumerate(arrays)]
    return gc.compile(ins, fn(*ins))(*arrays)


SHAPE_PAIRS = [
    ((2, 3), (2, 3)),
    ((2, 3), (3,)),
    ((3,), (2, 3)),
    ((2, 1), (1, 3)),
    ((), (2, 3)),
    ((2, 3), ()),
    ((4, 1, 3), (5, 1)),
    ((1,), (3, 1)),
    ((2, 1, 1, 3), (2, 1, 1)),
]


def _positive(shape):
    return RNG.uniform(0.5, 2.0, shape)


def _any(shape):
    return RNG.uniform(-2.0, 2.0, shape)


# name, graphc function, independent reference, generators for (a, b)
BINARY = [
    ("add", gc.add, lambda a, b: a + b, _any, _any),
    ("sub", gc.sub, lambda a, b: a - b, _any, _any),
    ("mul", gc.mul, lambda a, b: a * b, _any, _any),
    ("div", gc.div, lambda a, b: a / b, _any, _positive),
    ("pow", gc.pow, lambda a, b: np.exp(b * np.log(a)), _positive, _any),
    ("maximum", gc.maximum, lambda a, b: np.where(a > b, a, b), _any, _any),
    ("minimum", gc.minimum, lambda a, b: np.where(a < b, a, b), _any, _any),
]


@pytest.mark.parametrize("sa,sb", SHAPE_PAIRS)
@pytest.mark.parametrize("name,fn,ref,ga,gb", BINARY, ids=[b[0] for b in BINARY])
def test_binary_forward_broadcasting(name, fn, ref, ga, gb, sa, sb):
    a, b = ga(sa), gb(sb)
    out = run(fn, a, b)
    want = ref(a, b)
    assert out.shape == np.broadcast_shapes(sa, sb)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("sa,sb", SHAPE_PAIRS)
@pytest.mark.parametrize("name,fn,ref,ga,gb", BINARY, ids=[b[0] for b in BINARY])
def test_binary_gradient_sums_back_to_input_shape(name, fn, ref, ga, gb, sa, sb):
    a, b = ga(sa), gb(sb)
    x, y = gc.input("x", sa, "float64"), gc.input("y", sb, "float64")
    gx, gy = gc.grad(gc.sum(fn(x, y)), [x, y])
    assert gx.shape == sa and gy.shape == sb
    gc.check_grad(fn, [a, b])


def test_broadcast_gradient_values_explicit():
    # d/da sum(a * b) with a (2, 1) and b (1, 3): each a[i] meets every b[j].
    a = np.array([[1.5], [-2.0]])
    b = np.array([[0.5, 1.0, 4.0]])
    x, y = gc.input("x", (2, 1), "float64"), gc.input("y", (1, 3), "float64")
    gx, gy = gc.compile([x, y], gc.grad(gc.sum(x * y), [x, y]))(a, b)
    np.testing.assert_allclose(gx, [[5.5], [5.5]])
    np.testing.assert_allclose(gy, [[-0.5, -0.5, -0.5]])


def test_max_min_ties_send_gradient_to_first_input():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([1.0, 5.0, 0.0])
    x, y = gc.input("x", (3,), "float64"), gc.input("y", (3,), "float64")
    out = gc.compile([x, y], gc.grad(gc.sum(gc.maximum(x, y)), [x, y])
                     + gc.grad(gc.sum(gc.minimum(x, y)), [x, y]))(a, b)
    np.testing.assert_array_equal(out[0], [1, 0, 1])
    np.testing.assert_array_equal(out[1], [0, 1, 0])
    np.testing.assert_array_equal(out[2], [1, 1, 0])
    np.testing.assert_array_equal(out[3], [0, 0, 1])


UNARY = [
    ("neg", gc.neg, lambda v: -v, _any),
    ("abs", gc.abs, lambda v: v if v >= 0 else -v, _any),
    ("exp", gc.exp, math.exp, _any),
    ("log", gc.log, math.log, _positive),
    ("sqrt", gc.sqrt, math.sqrt, _positive),
    ("square", gc.square, lambda v: v * v, _any),
    ("reciprocal", gc.reciprocal, lambda v: 1.0 / v, _positive),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,fn,ref,gen", UNARY, ids=[u[0] for u in UNARY])
def test_unary_forward(name, fn, ref, gen, dtype):
    a = gen((3, 4)).astype(dtype)
    out = run(fn, a)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4)
    want = np.array([ref(float(v)) for v in a.ravel()]).reshape(3, 4)
    np.testing.assert_allclose(out, want, rtol=1e-12 if dtype == "float64" else 1e-6)


@pytest.mark.parametrize("name,fn,ref,gen", UNARY, ids=[u[0] for u in UNARY])
def test_unary_gradient(name, fn, ref, gen):
    a = gen((3, 4))
    if name == "abs":
        a = np.where(np.abs(a) < 0.1, 0.5, a)  # away from the kink
    gc.check_grad(fn, [a])


def test_unary_int_dtype_rules():
    i = np.array([-3, 0, 4], np.int64)
    # exp/log/sqrt/reciprocal promote to float32; neg/abs/square keep int64
    assert run(gc.exp, i).dtype == np.float32
    np.testing.assert_allclose(run(gc.sqrt, np.array([4, 9])), [2.0, 3.0])
    assert run(gc.sqrt, np.array([4, 9])).dtype == np.float32
    for fn, want in [(gc.neg, [3, 0, -4]), (gc.abs, [3, 0, 4]), (gc.square, [9, 0, 16])]:
        out = run(fn, i)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, want)


def test_sign():
    out = run(gc.sign, np.array([-2.5, 0.0, 3.0]))
    np.testing.assert_array_equal(out, [-1.0, 0.0, 1.0])


# --------------------------------------------------------------- dtype promotion
@pytest.mark.parametrize("da,db,want", [
    ("int64", "float32", "float32"),
    ("float32", "int64", "float32"),
    ("int32", "int64", "int64"),
    ("float32", "float64", "float64"),
    ("bool", "int32", "int32"),
    ("int32", "float32", "float32"),
    ("bool", "float64", "float64"),
])
def test_binary_dtype_promotion(da, db, want):
    a = np.array([1, 0, 3]).astype(da)
    b = np.array([2, 1, 1]).astype(db)
    out = run(gc.add, a, b)
    assert out.dtype == np.dtype(want)
    np.testing.assert_array_equal(out, (a.astype(np.float64) + b.astype(np.float64)))


def test_python_scalars_are_weak():
    f32 = gc.input("f", (3,), "float32")
    f64 = gc.input("d", (3,), "float64")
    i64 = gc.input("i", (3,), "int64")
    i32 = gc.input("j", (3,), "int32")
    assert (f32 + 2).dtype == np.float32
    assert (f32 * 2.5).dtype == np.float32
    assert (2.5 - f32).dtype == np.float32
    assert (f64 + 1.0).dtype == np.float64
    assert (i64 * 3).dtype == np.int64
    assert (i32 + 3).dtype == np.int32
    assert (i32 + 2.5).dtype == np.float32   # a float scalar makes an int tensor float32
    assert (i64 / 2.0).dtype == np.float32
    f = gc.compile([i32, f32], [i32 + 3, i32 * 0.5, f32 - 1])
    a, b, c = f(np.array([1, -2, 7], np.int32), np.array([0.5, 1.0, 2.0], np.float32))
    np.testing.assert_array_equal(a, [4, 1, 10])
    np.testing.assert_allclose(b, [0.5, -1.0, 3.5])
    np.testing.assert_allclose(c, [-0.5, 0.0, 1.0])


def test_numpy_array_operand_keeps_its_dtype():
    x = gc.input("x", (3,), "float32")
    assert (np.ones(3, np.float32) + x).dtype == np.float32
    assert (np.ones(3) + x).dtype == np.float64  # arrays are not weak


# --------------------------------------------------------------- integer division
def test_integer_division_floors_like_python():
    a = np.array([-7, 7, -8, 7, 0, -1, 9], np.int64)
    b = np.array([2, -2, 3, 2, 5, 3, -4], np.int64)
    out = run(gc.div, a, b)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [int(p) // int(q) for p, q in zip(a, b)])


def test_int_divided_by_float_is_true_division():
    a = np.array([-7, 7, 1], np.int64)
    b = np.array([2.0, -2.0, 4.0], np.float32)
    out = run(gc.div, a, b)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-3.5, -3.5, 0.25])
    # int tensor / python float also divides truly
    i = gc.input("i", (3,), "int64")
    np.testing.assert_array_equal(gc.compile([i], i / 2.0)(a), [-3.5, 3.5, 0.5])


# --------------------------------------------------------------- comparisons, where, cast
CMP = [(gc.less, operator.lt), (gc.less_equal, operator.le), (gc.greater, operator.gt),
       (gc.greater_equal, operator.ge), (gc.equal, operator.eq), (gc.not_equal, operator.ne)]


@pytest.mark.parametrize("fn,pyop", CMP, ids=[c[0].__name__ for c in CMP])
def test_comparisons_broadcast_to_bool(fn, pyop):
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    b = np.array([2.0, 2.0, 2.0])
    out = run(fn, a, b)
    assert out.dtype == np.bool_ and out.shape == (2, 3)
    want = [[pyop(a[i, j], b[j]) for j in range(3)] for i in range(2)]
    np.testing.assert_array_equal(out, want)


def test_comparisons_have_no_gradient_and_logical_not():
    a = np.array([1.0, -1.0, 0.0])
    out = run(lambda x: gc.logical_not(x > 0), a)
    np.testing.assert_array_equal(out, [False, True, True])
    x = gc.input("x", (3,), "float64")
    g = gc.grad(gc.sum(gc.where(x > 0, x, x * 3.0)), x)
    np.testing.assert_array_equal(gc.compile([x], g)(a), [1.0, 3.0, 3.0])


def test_where_broadcasts_three_ways_and_gradient():
    c = np.array([[True], [False]])
    a = RNG.normal(size=(1, 3))
    b = RNG.normal(size=(2, 1))
    out = run(gc.where, c, a, b)
    want = [[a[0, j] if c[i, 0] else b[i, 0] for j in range(3)] for i in range(2)]
    np.testing.assert_array_equal(out, want)
    gc.check_grad(gc.where, [c, a, b])


def test_where_with_scalar_branch_keeps_tensor_dtype():
    x = gc.input("x", (4,), "float32")
    y = gc.where(x > 0, x, 0.0)
    assert y.dtype == np.float32
    out = gc.compile([x], y)(np.array([-1.0, 2.0, -3.0, 4.0], np.float32))
    np.testing.assert_array_equal(out, [0.0, 2.0, 0.0, 4.0])


def test_where_needs_bool_condition():
    x = gc.input("x", (3,), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"bool(.|\n)*test_ops_elementwise\.py"):
        gc.where(x, x, 0.0)


def test_cast_truncates_toward_zero_and_gradient():
    a = np.array([-2.7, -0.5, 0.5, 2.7])
    out = run(lambda x: gc.cast(x, "int64"), a)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [math.trunc(v) for v in a])
    out = run(lambda x: gc.cast(x, gc.float32), a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a.astype(np.float32))
    x = gc.input("x", (4,), "float64")
    assert gc.cast(x, "float64") is x
    assert x.astype("float32").dtype == np.float32
    g = gc.grad(gc.sum(gc.cast(x, "float32") * 3.0), x)
    assert g.dtype == np.float64
    np.testing.assert_array_equal(gc.compile([x], g)(a), [3.0] * 4)


def test_cast_bool_and_int_have_no_gradient_path():
    x = gc.input("x", (3,), "float64")
    y = gc.sum(gc.cast(gc.cast(x, "int64"), "float64") * x)
    # gradient only flows through the second factor
    g = gc.compile([x], gc.grad(y, x))(np.array([1.5, -2.5, 3.9]))
    np.testing.assert_array_equal(g, [1.0, -2.0, 3.0])


def test_zeros_ones_like():
    x = gc.input("x", (2, 3), "float32")
    z, o = gc.compile([x], [gc.zeros_like(x), gc.ones_like(x, "int64")])(np.ones((2, 3), "f4"))
    assert z.dtype == np.float32 and o.dtype == np.int64
    np.testing.assert_array_equal(z, np.zeros((2, 3)))
    np.testing.assert_array_equal(o, np.ones((2, 3)))


# --------------------------------------------------------------- operators
def test_operators_forward_with_scalars_and_arrays():
    a = np.array([[0.5, 1.5, 2.0], [1.0, 3.0, 0.25]])
    w = np.array([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]])
    arr = np.array([2.0, 0.5, 4.0])
    x = gc.input("x", (2, 3), "float64")
    m = gc.input("m", (3, 2), "float64")
    exprs = {
        "x+1": (x + 1, a + 1), "1+x": (1 + x, 1 + a), "x-1": (x - 1, a - 1),
        "1-x": (1 - x, 1 - a), "2*x": (2 * x, 2 * a), "x/2": (x / 2, a / 2),
        "2/x": (2 / x, 2 / a), "x**2": (x ** 2, a * a), "2**x": (2 ** x, np.exp2(a)),
        "x**0.5": (x ** 0.5, np.sqrt(a)),
        "-x": (-x, -a), "abs(-x)": (abs(-x), a), "x@m": (x @ m, np.einsum("ik,kj->ij", a, w)),
        "arr+x": (arr + x, arr + a), "arr-x": (arr - x, arr - a), "arr*x": (arr * x, arr * a),
        "arr/x": (arr / x, arr / a), "arr**x": (arr ** x, np.exp(a * np.log(arr))),
        "x<1": (x < 1, a < 1), "x>1": (x > 1, a > 1), "x<=2": (x <= 2, a <= 2),
        "x>=2": (x >= 2, a >= 2), "1<x": (1 < x, a > 1), "arr<x": (arr < x, arr < a),
        "arr>x": (arr > x, arr > a),
    }
    keys = list(exprs)
    outs = gc.compile([x, m], [exprs[k][0] for k in keys])(a, w)
    for k, o in zip(keys, outs):
        want = np.asarray(exprs[k][1])
        assert o.shape == want.shape, k
        assert o.dtype == want.dtype, k
        np.testing.assert_allclose(o, want, rtol=1e-14, err_msg=k)


def test_reversed_matmul_with_numpy_array_on_left():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    x = gc.input("x", (2, 3), "float64")
    a = np.arange(6.0).reshape(2, 3)
    out = gc.compile([x], w @ x)(a)
    want = [[sum(w[i, k] * a[k, j] for k in range(2)) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(out, want)


def test_equality_operator_is_identity_not_elementwise():
    x = gc.input("x", (3,), "float32")
    y = gc.input("y", (3,), "float32")
    assert (x == x) is True and (x == y) is False
    assert len({x, y, x}) == 2


def test_node_has_no_truth_value():
    x = gc.input("x", (3,), "float32")
    with pytest.raises(TypeError, match="where"):
        if x > 0:
            pass


# --------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [gc.add, gc.mul, gc.maximum, gc.less, gc.pow])
def test_incompatible_broadcast_names_shapes_and_line(fn):
    x = gc.input("x", (2, 3), "float32")
    y = gc.input("y", (4,), "float32")
    with pytest.raises(gc.GraphBuildError) as ei:
        fn(x, y)
    msg = str(ei.value)
    assert "(2, 3)" in msg and "(4,)" in msg
    assert "test_ops_elementwise.py" in msg
    assert fn.__name__ in msg


def test_operator_broadcast_error_points_at_this_line():
    x = gc.input("x", (5, 2), "float32")
    y = gc.input("y", (3, 1, 3), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"\(5, 2\)(.|\n)*\(3, 1, 3\)") as ei:
        x + y  # noqa: B018
    import inspect
    line = inspect.currentframe().f_lineno - 2
    assert f"test_ops_elementwise.py:{line}" in str(ei.value)


def test_unsupported_operand_type():
    x = gc.input("x", (3,), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"str(.|\n)*test_ops_elementwise"):
        gc.add(x, "abc")
