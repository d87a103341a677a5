"""gc.grad: first and higher-order gradients as graphs, checked against closed
forms and finite differences."""
import numpy as np
import pytest

import graphc as gc
from graphc.ir import toposort

RNG = np.random.default_rng(7)


def f64(name, shape):
    return gc.input(name, shape, "float64")


def test_grad_of_scalar_closed_form():
    x = f64("x", (4,))
    w = f64("w", (4,))
    y = gc.sum(x * w + gc.exp(x) * 0.5)
    gx, gw = gc.grad(y, [x, w])
    a, b = RNG.normal(size=4), RNG.normal(size=4)
    out = gc.compile([x, w], [gx, gw])(a, b)
    np.testing.assert_allclose(out[0], b + 0.5 * np.exp(a), rtol=1e-14)
    np.testing.assert_allclose(out[1], a, rtol=1e-14)


def test_single_wrt_returns_node_list_returns_list():
    x = f64("x", (2,))
    y = gc.sum(x)
    g = gc.grad(y, x)
    assert isinstance(g, gc.Node) and g.shape == (2,)
    gs = gc.grad(y, [x])
    assert isinstance(gs, list) and len(gs) == 1


def test_grad_output_for_nonscalar_y():
    x = f64("x", (2, 3))
    v = f64("v", (2, 3))
    y = x * x
    g_sym = gc.grad(y, x, grad_output=v)
    g_arr = gc.grad(y, x, grad_output=np.full((2, 3), 3.0))
    a, b = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3))
    out = gc.compile([x, v], [g_sym, g_arr])(a, b)
    np.testing.assert_allclose(out[0], 2 * a * b, rtol=1e-14)
    np.testing.assert_allclose(out[1], 6 * a, rtol=1e-14)


def test_nonscalar_y_without_grad_output_is_an_error():
    x = f64("x", (2, 3))
    with pytest.raises(gc.GraphBuildError, match=r"\(2, 3\)(.|\n)*test_autodiff\.py"):
        gc.grad(x * 2.0, x)
    with pytest.raises(gc.GraphBuildError, match=r"grad_output"):
        gc.grad(x * 2.0, x, grad_output=np.ones((3, 2)))


def test_grad_of_y_with_respect_to_itself():
    x = f64("x", ())
    v = f64("v", (3,))
    out = gc.compile([x, v], [gc.grad(x, x), gc.grad(v, v, grad_output=v * 2.0)])(
        np.array(1.5), np.array([1.0, 2.0, 3.0]))
    assert out[0] == 1.0
    np.testing.assert_array_equal(out[1], [2.0, 4.0, 6.0])


def test_unused_wrt_gives_zeros_or_error():
    x = f64("x", (3,))
    z = gc.input("z", (2, 2), "float32")
    y = gc.sum(x * x)
    gx, gz = gc.grad(y, [x, z])
    assert gz.shape == (2, 2) and gz.dtype == np.float32
    out = gc.compile([x, z], [gx, gz])(np.array([1.0, 2.0, 3.0]), np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(out[0], [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))
    assert out[1].dtype == np.float32
    with pytest.raises(ValueError, match=r"does not depend on z(.|\n)*test_autodiff"):
        gc.grad(y, [x, z], allow_unused=False)


def test_dependence_only_through_integer_path_counts_as_unused():
    x = f64("x", (3,))
    y = gc.sum(gc.cast(gc.argmax(x), "float64") * 1.0 + gc.cast(x > 0, "float64"))
    g = gc.grad(y, x)
    np.testing.assert_array_equal(gc.compile([x], g)(np.array([1.0, -2.0, 3.0])), [0, 0, 0])


def test_type_errors():
    x = f64("x", (3,))
    i = gc.input("i", (3,), "int64")
    with pytest.raises(TypeError, match="int64"):
        gc.grad(gc.sum(x), i)
    with pytest.raises(TypeError, match="non-float"):
        gc.grad(gc.sum(i), x)
    with pytest.raises(TypeError):
        gc.grad(np.ones(3), x)


def test_accumulation_when_node_is_used_twice():
    x = f64("x", (3,))
    a = np.array([1.5, -2.0, 0.25])
    g1 = gc.grad(gc.sum(x * x), x)                       # 2x
    g2 = gc.grad(gc.sum(x + x + x * 3.0), x)             # 5
    h = gc.exp(x)
    g3 = gc.grad(gc.sum(h * h + h), x)                   # 2e^{2x} + e^x
    out = gc.compile([x], [g1, g2, g3])(a)
    np.testing.assert_allclose(out[0], 2 * a, rtol=1e-15)
    np.testing.assert_allclose(out[1], [5.0] * 3, rtol=1e-15)
    np.testing.assert_allclose(out[2], 2 * np.exp(2 * a) + np.exp(a), rtol=1e-14)


def test_grad_wrt_intermediate_node():
    x = f64("x", (3,))
    h = x * 2.0
    y = gc.sum(h * h * x)
    gh, gx = gc.grad(y, [h, x])
    a = np.array([1.0, -0.5, 2.0])
    out = gc.compile([x], [gh, gx])(a)
    np.testing.assert_allclose(out[0], 2 * (2 * a) * a)      # ∂y/∂h holding x fixed
    np.testing.assert_allclose(out[1], 12 * a * a)           # total: y = 4 x³


def test_grad_wrt_parameter_float32():
    w = gc.Parameter(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), name="w")
    x = gc.input("x", (2,), "float32")
    y = gc.sum(gc.matmul(w, x) ** 2)
    g = gc.grad(y, w)
    assert g.dtype == np.float32
    xv = np.array([1.0, -1.0], np.float32)
    out = gc.compile([x], g)(xv)
    r = w.value @ xv
    np.testing.assert_allclose(out, 2 * np.outer(r, xv), rtol=1e-6)


# --------------------------------------------------------------- higher order
def test_second_derivative_of_cubic():
    x = f64("x", (4,))
    for cube in (x ** 3, x * x * x):
        g1 = gc.grad(gc.sum(cube), x)
        g2 = gc.grad(gc.sum(g1), x)
        g3 = gc.grad(gc.sum(g2), x)
        a = np.array([-1.5, 0.0, 0.5, 2.0])
        out = gc.compile([x], [g1, g2, g3])(a)
        np.testing.assert_allclose(out[0], 3 * a * a, rtol=1e-14)
        np.testing.assert_allclose(out[1], 6 * a, rtol=1e-14)
        np.testing.assert_allclose(out[2], [6.0] * 4, rtol=1e-14)


def test_hessian_vector_product_of_quadratic_form():
    n = 4
    A = RNG.normal(size=(n, n))        # not symmetric: H = A + A^T
    x = f64("x", (n,))
    v = f64("v", (n,))
    Ac = gc.constant(A)
    f = gc.sum(x * gc.matmul(Ac, x))   # x^T A x
    g = gc.grad(f, x)
    hv = gc.grad(gc.sum(g * v), x)
    a, b = RNG.normal(size=n), RNG.normal(size=n)
    out = gc.compile([x, v], [g, hv])(a, b)
    np.testing.assert_allclose(out[0], (A + A.T) @ a, rtol=1e-12)
    np.testing.assert_allclose(out[1], (A + A.T) @ b, rtol=1e-12)
    # full Hessian, one basis vector at a time
    H = np.stack([gc.compile([x, v], hv)(a, e) for e in np.eye(n)])
    np.testing.assert_allclose(H, A + A.T, rtol=1e-12)


def test_second_order_matmul_closed_form():
    # f = sum((x W)^2):  ∂f/∂x = 2 x W W^T;  d/dW of sum(∂f/∂x · V) = 2 (x^T V W + V^T x W)
    x = f64("x", (3, 4))
    W = f64("W", (4, 2))
    V = f64("V", (3, 4))
    gx = gc.grad(gc.sum((x @ W) ** 2), x)
    gW2 = gc.grad(gc.sum(gx * V), W)
    a, w, vv = RNG.normal(size=(3, 4)), RNG.normal(size=(4, 2)), RNG.normal(size=(3, 4))
    out = gc.compile([x, W, V], [gx, gW2])(a, w, vv)
    np.testing.assert_allclose(out[0], 2 * a @ w @ w.T, rtol=1e-12)
    np.testing.assert_allclose(out[1], 2 * (a.T @ vv @ w + vv.T @ a @ w), rtol=1e-12)


@pytest.mark.parametrize("name,fn", [
    ("matmul", lambda x, w: gc.sum(gc.tanh(x @ w))),
    ("batched_matmul", lambda x, w: gc.sum(gc.matmul(gc.reshape(x, (3, 1, 2)), w) ** 2)),
    ("mean_var", lambda x, w: gc.mean(x * x, axis=0) @ gc.var(w, axis=1)),
    ("max", lambda x, w: gc.sum(gc.max(x @ w, axis=1) ** 2)),
    ("softmax_like", lambda x, w: gc.sum(gc.log(gc.sum(gc.exp(x @ w), axis=1)))),
    ("division", lambda x, w: gc.sum((x @ w) / (gc.sum(w * w) + 1.0))),
    ("broadcast", lambda x, w: gc.sum(gc.sigmoid(gc.reshape(x, (3, 2, 1)) * w))),
])
def test_grad_of_grad_matches_finite_differences(name, fn):
    # Differentiate the gradient function itself: check_grad compares gc.grad of
    # (x, w) -> ∂f/∂x with finite differences of that gradient.
    a = RNG.normal(size=(3, 2))
    w = RNG.normal(size=(2, 2))
    gc.check_grad(lambda x, W: gc.grad(fn(x, W), x), [a, w])
    gc.check_grad(lambda x, W: gc.grad(fn(x, W), W), [a, w])


# --------------------------------------------------------------- graph properties
def test_backward_nodes_carry_role_backward():
    x = f64("x", (3,))
    w = gc.Parameter(np.ones(3), name="w")
    y = gc.sum(gc.sigmoid(x * w))
    fwd = {n.id for n in toposort([y])}
    g = gc.grad(y, w)
    new = [n for n in toposort([g]) if n.id not in fwd]
    assert new, "grad built no nodes"
    assert all(n.role == "backward" for n in new), {n.op.name: n.role for n in new}
    assert all(n.role == "forward" for n in toposort([y]))
    # the backward graph reuses the forward sigmoid node (s(1 - s))
    assert any(n.op.name == "sigmoid" for n in toposort([g]))


def test_grad_nodes_keep_forward_scope():
    x = f64("x", (3,))
    with gc.name_scope("layer1"):
        h = gc.tanh(x)
    y = gc.sum(h)
    g = gc.grad(y, x)
    scopes = {n.scope for n in toposort([g]) if n.role == "backward" and n.op.name == "mul"}
    assert ("layer1",) in scopes


def test_grad_with_symbolic_batch_two_batch_sizes():
    wv = RNG.normal(size=(3, 2))
    w = gc.Parameter(wv, name="w")
    x = gc.input("x", (None, 3), "float64")
    loss = gc.mean(gc.sum((x @ w) ** 2, axis=1))
    gw, gx = gc.grad(loss, [w, x])
    assert gx.shape == ("N", 3)
    f = gc.compile([x], [loss, gw, gx])
    for n in (2, 5):
        a = RNG.normal(size=(n, 3))
        lv, gwv, gxv = f(a)
        r = a @ wv
        assert lv == pytest.approx((r ** 2).sum() / n, rel=1e-12)
        np.testing.assert_allclose(gwv, 2 * a.T @ r / n, rtol=1e-12)
        np.testing.assert_allclose(gxv, 2 * r @ wv.T / n, rtol=1e-12)


def test_grad_through_symbolic_broadcast():
    # x (N, 3) + b (3,): the gradient of b sums over the symbolic batch
    x = gc.input("x", (None, 3), "float64")
    b = gc.Parameter(np.zeros(3), name="b")
    gb = gc.grad(gc.sum((x + b) * (x + b)), b)
    f = gc.compile([x], gb)
    for n in (1, 4):
        a = RNG.normal(size=(n, 3))
        np.testing.assert_allclose(f(a), 2 * a.sum(axis=0), rtol=1e-12)


def test_gradient_when_a_symbolic_dim_broadcasts_against_a_concrete_one():
    # x (B, 3) * c (3, 3): B must be 1 or 3 at run time, and the gradient's
    # reduction over the broadcast axis depends on which (sum_to, made concrete
    # when the compiled function specializes).
    c_val = np.arange(9.0).reshape(3, 3).astype(np.float32)
    x = gc.input("x", ("B", 3))
    y = gc.sum(x * gc.constant(c_val))
    gx = gc.grad(y, x)
    for backend in ("numpy", "llvm"):
        f = gc.compile([x], [y, gx], backend=backend)
        _, g3 = f(np.ones((3, 3), np.float32))
        _, g1 = f(np.ones((1, 3), np.float32))
        np.testing.assert_array_equal(g3, c_val)
        np.testing.assert_array_equal(g1, c_val.sum(axis=0, keepdims=True))
