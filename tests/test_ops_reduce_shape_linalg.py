"""Reductions, core shape ops and matrix products: forward values against
loop-based references, gradients against finite differences, and type-rule
errors that name the user's file."""
import itertools

import numpy as np
import pytest

import graphc as gc

RNG = np.random.default_rng(3)


def run(fn, *arrays):
    ins = [gc.input(f"a{k}", np.shape(a), np.asarray(a).dtype) for k, a in enumerate(arrays)]
    return gc.compile(ins, fn(*ins))(*arrays)


# --------------------------------------------------------------- loop references
def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(a % ndim for a in axis))


def loop_reduce(a, axis, keepdims, combine):
    """Reduce by grouping elements by their index on the kept axes (pure Python)."""
    axes = _norm_axes(axis, a.ndim)
    groups = {}
    for idx in itertools.product(*(range(n) for n in a.shape)):
        key = tuple(i for d, i in enumerate(idx) if d not in axes)
        groups.setdefault(key, []).append(float(a[idx]))
    kept_shape = tuple(n for d, n in enumerate(a.shape) if d not in axes)
    out = np.empty(kept_shape)
    for key, vals in groups.items():
        out[key] = combine(vals)
    if keepdims:
        out = out.reshape(tuple(1 if d in axes else n for d, n in enumerate(a.shape)))
    return out


def _mean(v):
    return sum(v) / len(v)


def _var(v):
    m = _mean(v)
    return sum((x - m) ** 2 for x in v) / len(v)


REDUCERS = {"sum": (gc.sum, sum), "mean": (gc.mean, _mean), "max": (gc.max, max),
            "min": (gc.min, min), "var": (gc.var, _var)}
AXES = [None, 0, 1, -1, (0, 2), (-1, 0), (0, 1, 2)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_reduction_forward(name, axis, keepdims):
    fn, comb = REDUCERS[name]
    a = RNG.normal(size=(2, 3, 4))
    out = run(lambda x: fn(x, axis=axis, keepdims=keepdims), a)
    want = loop_reduce(a, axis, keepdims, comb)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("axis", [None, 1, -1, (0, 2)], ids=str)
@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_reduction_gradient(name, axis):
    fn, _ = REDUCERS[name]
    a = RNG.normal(size=(2, 3, 4))  # continuous values: no ties for max/min
    gc.check_grad(lambda x: fn(x, axis=axis), [a])
    gc.check_grad(lambda x: fn(x, axis=axis, keepdims=True), [a])


def test_reduction_dtypes():
    i = np.array([[1, 2], [3, 5]], np.int64)
    b = np.array([[True, False], [True, True]])
    s = run(gc.sum, i)
    assert s.dtype == np.int64 and s == 11
    s = run(lambda x: gc.sum(x, axis=0), b)
    assert s.dtype == np.int64
    np.testing.assert_array_equal(s, [2, 1])
    m = run(gc.mean, i)
    assert m.dtype == np.float32 and m == pytest.approx(2.75)
    assert run(gc.max, i).dtype == np.int64
    f = run(lambda x: gc.mean(x, axis=1), i.astype(np.float32))
    assert f.dtype == np.float32


def test_var_correction():
    a = np.array([[1.0, 2.0, 4.0], [0.0, -3.0, 3.0]])
    out = run(lambda x: gc.var(x, axis=1, correction=1), a)
    want = [sum((v - sum(r) / 3) ** 2 for v in r) / 2 for r in a]
    np.testing.assert_allclose(out, want)


def test_max_ties_split_gradient_equally():
    a = np.array([[3.0, 1.0, 3.0, 3.0], [2.0, 5.0, 5.0, -1.0]])
    x = gc.input("x", (2, 4), "float64")
    g_all = gc.grad(gc.max(x), x)                      # global max 5 is tied twice
    g_row = gc.grad(gc.sum(gc.max(x, axis=1)), x)      # row 0: 3 tied three times
    g_min = gc.grad(gc.sum(gc.min(x, axis=0) * np.array([1.0, 2.0, 3.0, 4.0])), x)
    out = gc.compile([x], [g_all, g_row, g_min])(a)
    np.testing.assert_allclose(out[0], [[0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    np.testing.assert_allclose(out[1], [[1 / 3, 0, 1 / 3, 1 / 3], [0, 0.5, 0.5, 0]])
    np.testing.assert_allclose(out[2], [[0, 2, 3, 0], [1, 0, 0, 4]])


def test_mean_gradient_with_symbolic_batch():
    x = gc.input("x", (None, 3), "float64")
    g = gc.grad(gc.mean(x), x)
    f = gc.compile([x], g)
    np.testing.assert_allclose(f(np.ones((2, 3))), np.full((2, 3), 1 / 6))
    np.testing.assert_allclose(f(np.ones((5, 3))), np.full((5, 3), 1 / 15))


@pytest.mark.parametrize("name,fn,pick", [("argmax", gc.argmax, max), ("argmin", gc.argmin, min)])
def test_arg_reductions(name, fn, pick):
    a = np.array([[1.0, 7.0, 7.0, 0.0], [4.0, -2.0, 4.0, -2.0], [0.5, 0.5, 9.0, 8.0]])
    x = gc.input("x", a.shape, "float64")
    outs = gc.compile([x], [fn(x), fn(x, axis=1), fn(x, axis=0), fn(x, axis=-1, keepdims=True),
                            fn(x, keepdims=True)])(a)
    assert all(o.dtype == np.int64 for o in outs)
    flat = list(a.ravel())
    assert outs[0].shape == () and outs[0] == flat.index(pick(flat))  # first on ties
    rows = [list(r).index(pick(r)) for r in a]
    cols = [list(a[:, j]).index(pick(a[:, j])) for j in range(4)]
    np.testing.assert_array_equal(outs[1], rows)
    np.testing.assert_array_equal(outs[2], cols)
    np.testing.assert_array_equal(outs[3], np.array(rows).reshape(3, 1))
    assert outs[4].shape == (1, 1) and outs[4][0, 0] == outs[0]


def test_reduction_axis_errors_name_file():
    x = gc.input("x", (2, 3), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"out of range(.|\n)*test_ops_reduce_shape"):
        gc.sum(x, axis=2)
    with pytest.raises(gc.GraphBuildError, match="repeated"):
        gc.mean(x, axis=(1, -1))


# --------------------------------------------------------------- reshape & co.
def test_reshape_forward_and_minus_one():
    a = np.arange(24.0).reshape(2, 3, 4)
    x = gc.input("x", (2, 3, 4), "float64")
    outs = gc.compile([x], [gc.reshape(x, (6, 4)), gc.reshape(x, (-1,)), x.reshape(4, -1),
                            x.reshape((3, 2, -1)), gc.reshape(x, (2, 3, 4))])(a)
    flat = [a[i, j, k] for i in range(2) for j in range(3) for k in range(4)]
    assert outs[0].shape == (6, 4) and outs[0].ravel().tolist() == flat
    assert outs[1].shape == (24,) and outs[1].tolist() == flat
    assert outs[2].shape == (4, 6) and outs[2].ravel().tolist() == flat
    assert outs[3].shape == (3, 2, 4)
    assert gc.reshape(x, (2, 3, 4)) is x
    gc.check_grad(lambda v: gc.reshape(v, (4, -1)) * np.arange(6.0), [a])


def test_reshape_errors():
    x = gc.input("x", (2, 3, 4), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"(.|\n)*test_ops_reduce_shape_linalg\.py"):
        gc.reshape(x, (5, 5))
    with pytest.raises(gc.GraphBuildError, match="more than one -1"):
        gc.reshape(x, (-1, -1))
    with pytest.raises(gc.GraphBuildError, match="cannot reshape"):
        gc.reshape(x, (5, -1))


def test_reshape_symbolic_batch():
    x = gc.input("x", (None, 2, 3), "float64")
    y = gc.reshape(x, (-1, 6))
    assert y.shape == ("N", 6)
    z = x.reshape("N", 6)
    f = gc.compile([x], [y, z])
    a = np.arange(30.0).reshape(5, 2, 3)
    for o in f(a):
        np.testing.assert_array_equal(o, a.reshape(5, 6))


def test_reshape_merges_symbolic_dims_into_products():
    """(T, N, V) -> (-1, V) gives ("N*T", V); back to (T, N, V) and (N, T*V)-style
    targets resolve through the products; gradients flow through; every backend
    specializes the product from the bound symbols."""
    from graphc.ir.shapes import dim_factors, make_dim, substitute
    assert dim_factors("3*N*T") == (3, ["N", "T"]) and make_dim(1, ["T", "N"]) == "N*T"
    assert substitute(("N*T", "2*N", 4), {"N": 3, "T": 5}) == (15, 6, 4)
    assert substitute(("N*T",), {"N": 3}) == ("3*T",)
    x = gc.input("x", ("T", None, 4), "float64")
    flat = gc.reshape(x, (-1, 4))
    assert flat.shape == ("N*T", 4)
    assert gc.reshape(x, (-1,)).shape == ("4*N*T",)
    assert gc.reshape(x, ("T", -1)).shape == ("T", "4*N")
    back = gc.reshape(flat, ("T", "N", 4))
    assert back.shape == ("T", "N", 4)
    w = gc.input("w", (4, 3), "float64")
    loss = gc.sum(gc.tanh(flat @ w))
    gx, gw = gc.grad(loss, [x, w])
    assert gx.shape == x.shape
    rng = np.random.default_rng(3)
    for backend in ("numpy", "llvm"):
        f = gc.compile([x, w], [flat, back, loss, gx, gw], backend=backend)
        for t, n in ((2, 3), (5, 1)):
            xv, wv = rng.standard_normal((t, n, 4)), rng.standard_normal((4, 3))
            fl, bk, lv, gxv, gwv = f(xv, wv)
            np.testing.assert_array_equal(fl, xv.reshape(t * n, 4))
            np.testing.assert_array_equal(bk, xv)
            th = np.tanh(xv.reshape(-1, 4) @ wv)
            np.testing.assert_allclose(lv, th.sum(), rtol=1e-12)
            np.testing.assert_allclose(gwv, xv.reshape(-1, 4).T @ (1 - th ** 2), rtol=1e-12)
            np.testing.assert_allclose(gxv, ((1 - th ** 2) @ wv.T).reshape(t, n, 4),
                                       rtol=1e-12)
    with pytest.raises(gc.GraphBuildError, match="symbol 'S' is not a dimension"):
        gc.reshape(x, ("S", -1))
    with pytest.raises(gc.GraphBuildError, match="sizes differ"):
        gc.reshape(flat, ("T", 4, 4))
    with pytest.raises(gc.GraphBuildError, match="cannot reshape"):
        gc.reshape(x, (3, -1))        # 4*N*T is not known to be a multiple of 3


def test_broadcast_to_forward_grad_and_errors():
    a = np.array([[1.0], [2.0]])
    out = run(lambda x: gc.broadcast_to(x, (3, 2, 4)), a)
    assert out.shape == (3, 2, 4)
    for i, j, k in itertools.product(range(3), range(2), range(4)):
        assert out[i, j, k] == a[j, 0]
    gc.check_grad(lambda x: gc.broadcast_to(x, (3, 2, 4)), [a])
    x = gc.input("x", (2, 3), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"\(2, 3\)(.|\n)*\(4, 3\)(.|\n)*test_ops_reduce"):
        gc.broadcast_to(x, (4, 3))
    with pytest.raises(gc.GraphBuildError, match="fewer"):
        gc.broadcast_to(x, (3,))


def test_transpose_permute_T():
    a = RNG.normal(size=(2, 3, 4))
    x = gc.input("x", a.shape, "float64")
    outs = gc.compile([x], [gc.transpose(x), x.permute(1, 2, 0), x.permute((2, 0, 1)),
                            gc.transpose(x, (0, 2, 1)), x.T, gc.transpose(x, (-1, 0, 1))])(a)
    for (i, j, k) in itertools.product(range(2), range(3), range(4)):
        assert outs[0][k, j, i] == a[i, j, k]
        assert outs[1][j, k, i] == a[i, j, k]
        assert outs[2][k, i, j] == a[i, j, k]
        assert outs[3][i, k, j] == a[i, j, k]
        assert outs[4][k, j, i] == a[i, j, k]
        assert outs[5][k, i, j] == a[i, j, k]
    gc.check_grad(lambda v: v.permute(1, 2, 0), [a])
    with pytest.raises(gc.GraphBuildError, match="permutation"):
        gc.transpose(x, (0, 0, 1))
    m = gc.input("m", (2, 5), "float32")
    assert m.T.shape == (5, 2)


def test_flatten():
    a = np.arange(120.0).reshape(2, 3, 4, 5)
    x = gc.input("x", a.shape, "float64")
    outs = gc.compile([x], [gc.flatten(x), x.flatten(0), gc.flatten(x, 1, 2),
                            gc.flatten(x, start_dim=2)])(a)
    assert outs[0].shape == (2, 60) and outs[0][1].tolist() == a[1].ravel().tolist()
    assert outs[1].shape == (120,)
    assert outs[2].shape == (2, 12, 5)
    assert outs[3].shape == (2, 3, 20)
    b = gc.input("b", (None, 3, 4), "float32")
    assert gc.flatten(b).shape == ("N", 12)


# --------------------------------------------------------------- matmul & linear
def loop_matmul(a, b):
    m, k = a.shape
    k2, n = b.shape
    assert k == k2
    return np.array([[sum(a[i, p] * b[p, j] for p in range(k)) for j in range(n)]
                     for i in range(m)])


def test_matmul_2d():
    a, b = RNG.normal(size=(3, 5)), RNG.normal(size=(5, 2))
    out = run(gc.matmul, a, b)
    np.testing.assert_allclose(out, loop_matmul(a, b), rtol=1e-12)
    gc.check_grad(gc.matmul, [a, b])


def test_matmul_batched_and_broadcast_batch():
    a, b = RNG.normal(size=(4, 2, 3)), RNG.normal(size=(4, 3, 5))
    out = run(gc.matmul, a, b)
    assert out.shape == (4, 2, 5)
    for i in range(4):
        np.testing.assert_allclose(out[i], loop_matmul(a[i], b[i]), rtol=1e-12)
    gc.check_grad(gc.matmul, [a, b])
    # batch dims broadcast: (2, 1, 3, 4) @ (5, 4, 2) -> (2, 5, 3, 2)
    a, b = RNG.normal(size=(2, 1, 3, 4)), RNG.normal(size=(5, 4, 2))
    out = run(gc.matmul, a, b)
    assert out.shape == (2, 5, 3, 2)
    for i, j in itertools.product(range(2), range(5)):
        np.testing.assert_allclose(out[i, j], loop_matmul(a[i, 0], b[j]), rtol=1e-12)
    gc.check_grad(gc.matmul, [a, b])
    # a 2-D matrix against a batch
    a, b = RNG.normal(size=(3, 4)), RNG.normal(size=(2, 4, 2))
    gc.check_grad(gc.matmul, [a, b])


def test_matmul_vectors():
    m, v, w = RNG.normal(size=(3, 4)), RNG.normal(size=4), RNG.normal(size=3)
    mv = run(gc.matmul, m, v)
    assert mv.shape == (3,)
    np.testing.assert_allclose(mv, [sum(m[i, k] * v[k] for k in range(4)) for i in range(3)])
    wm = run(gc.matmul, w, m)
    assert wm.shape == (4,)
    np.testing.assert_allclose(wm, [sum(w[i] * m[i, k] for i in range(3)) for k in range(4)])
    vv = run(gc.matmul, v, v)
    assert vv.shape == () and vv == pytest.approx(sum(t * t for t in v))
    bm = RNG.normal(size=(2, 3, 4))
    bv = run(gc.matmul, bm, v)
    assert bv.shape == (2, 3)
    np.testing.assert_allclose(bv, np.einsum("bik,k->bi", bm, v))
    for args in ([m, v], [w, m], [v, v], [bm, v]):
        gc.check_grad(gc.matmul, args)


def test_matmul_errors_name_file_and_shapes():
    a = gc.input("a", (3, 4), "float32")
    b = gc.input("b", (5, 2), "float32")
    with pytest.raises(gc.GraphBuildError) as ei:
        a @ b  # noqa: B018
    msg = str(ei.value)
    assert "(3, 4)" in msg and "(5, 2)" in msg and "test_ops_reduce_shape_linalg.py" in msg
    v = gc.input("v", (5,), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"inner(.|\n)*test_ops_reduce_shape_linalg"):
        gc.matmul(a, v)
    i = gc.input("i", (4, 2), "int64")
    with pytest.raises(gc.GraphBuildError, match="float"):
        gc.matmul(a, i)
    with pytest.raises(gc.GraphBuildError, match=r"cannot be broadcast|broadcast"):
        gc.matmul(gc.input("p", (2, 3, 4), "float32"), gc.input("q", (3, 4, 2), "float32"))


def test_linear_with_and_without_bias():
    x, w, bias = RNG.normal(size=(5, 3)), RNG.normal(size=(4, 3)), RNG.normal(size=4)
    y = run(gc.linear, x, w, bias)
    want = np.array([[sum(x[n, i] * w[o, i] for i in range(3)) + bias[o] for o in range(4)]
                     for n in range(5)])
    np.testing.assert_allclose(y, want, rtol=1e-12)
    y = run(gc.linear, x, w)
    np.testing.assert_allclose(y, want - bias, rtol=1e-12)
    gc.check_grad(gc.linear, [x, w, bias])
    gc.check_grad(gc.linear, [x, w])
    # symbolic batch
    xb = gc.input("xb", (None, 3), "float64")
    wp = gc.Parameter(w, name="w")
    f = gc.compile([xb], gc.linear(xb, wp))
    np.testing.assert_allclose(f(x[:2]), (want - bias)[:2], rtol=1e-12)


def test_linear_errors():
    x = gc.input("x", (5, 3), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"test_ops_reduce_shape_linalg"):
        gc.linear(x, gc.input("w", (4, 2), "float32"))


def test_build_errors_outside_type_rules_also_name_the_file():
    x = gc.input("x", (2, 3), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"argmax(.|\n)*int(.|\n)*test_ops_reduce_shape"):
        gc.argmax(x, axis=(0, 1))
    with pytest.raises(gc.GraphBuildError, match=r"start_dim(.|\n)*test_ops_reduce_shape"):
        gc.flatten(x, 1, 0)
    with pytest.raises(gc.GraphBuildError, match=r"scalars(.|\n)*test_ops_reduce_shape"):
        gc.matmul(x, 2.0)
    with pytest.raises(gc.GraphBuildError, match=r"2-D(.|\n)*test_ops_reduce_shape"):
        gc.linear(x, gc.input("w", (3,), "float32"))
    b = gc.input("b", (None, "T", 2), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"symbolic(.|\n)*test_ops_reduce_shape"):
        gc.flatten(b, 0, 1)
