"""Activation ops: forward against independent scalar formulas (math module,
element by element), gradients against finite differences, and second
derivatives of the smooth ones against closed forms."""
import math

import numpy as np
import pytest

import graphc as gc
from graphc.ops.base import REGISTRY

# --------------------------------------------------------------- references
# Written per element with the math module so they share nothing with the ops.


def _sigmoid(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def _softplus(v, beta=1.0, threshold=20.0):
    z = beta * v
    if z > threshold:
        return v
    # log(1 + e^z) computed as z + log(1 + e^-z) for z > 0 to avoid overflow
    return (z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))) / beta


def _log_sigmoid(v):
    if v >= 0:
        return -math.log1p(math.exp(-v))
    return v - math.log1p(math.exp(v))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


REFS = {
    "relu": (gc.relu, lambda v: v if v > 0 else 0.0),
    "leaky_relu": (gc.leaky_relu, lambda v: v if v > 0 else 0.01 * v),
    "leaky_relu_0.2": (lambda x: gc.leaky_relu(x, negative_slope=0.2),
                       lambda v: v if v > 0 else 0.2 * v),
    "sigmoid": (gc.sigmoid, _sigmoid),
    "tanh": (gc.tanh, math.tanh),
    "elu": (gc.elu, lambda v: v if v > 0 else math.expm1(v)),
    "elu_0.5": (lambda x: gc.elu(x, alpha=0.5), lambda v: v if v > 0 else 0.5 * math.expm1(v)),
    "gelu": (gc.gelu, lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))),
    "gelu_tanh": (lambda x: gc.gelu(x, approximate="tanh"), _gelu_tanh),
    "softplus": (gc.softplus, _softplus),
    "softplus_b2_t5": (lambda x: gc.softplus(x, beta=2.0, threshold=5.0),
                       lambda v: _softplus(v, 2.0, 5.0)),
    "erf": (gc.erf, math.erf),
    "silu": (gc.silu, lambda v: v * _sigmoid(v)),
    "log_sigmoid": (gc.log_sigmoid, _log_sigmoid),
}

XS = np.array([-1000.0, -60.0, -21.0, -3.7, -1.25, -0.5, -1e-3, 0.0, 2e-4, 0.3, 0.9,
               1.7, 2.5, 4.2, 19.0, 21.0, 45.0, 1000.0])


def _run(fn, xs, dtype):
    x = gc.input("x", xs.shape, dtype)
    return gc.compile([x], fn(x))(xs.astype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(REFS))
def test_forward_matches_scalar_reference(name, dtype):
    fn, ref = REFS[name]
    xs = XS.astype(dtype)
    out = _run(fn, XS, dtype)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == XS.shape
    assert np.all(np.isfinite(out)), out
    want = np.array([ref(float(v)) for v in xs])  # reference on the (rounded) inputs
    if dtype == "float64":
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-300)
    else:
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-37)


def test_extreme_inputs_exact_values():
    xs = np.array([-1000.0, 1000.0])
    out = {n: _run(REFS[n][0], xs, "float32") for n in REFS}
    np.testing.assert_array_equal(out["sigmoid"], [0.0, 1.0])
    np.testing.assert_array_equal(out["softplus"], [0.0, 1000.0])
    np.testing.assert_array_equal(out["log_sigmoid"], [-1000.0, 0.0])
    np.testing.assert_array_equal(out["tanh"], [-1.0, 1.0])
    np.testing.assert_array_equal(out["erf"], [-1.0, 1.0])
    np.testing.assert_array_equal(out["gelu"], [0.0, 1000.0])
    np.testing.assert_array_equal(out["gelu_tanh"], [0.0, 1000.0])
    np.testing.assert_array_equal(out["silu"], [0.0, 1000.0])
    np.testing.assert_array_equal(out["elu"], [-1.0, 1000.0])


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "log_sigmoid", "silu", "elu", "gelu",
                                  "erf", "tanh", "gelu_tanh"])
def test_reference_raises_no_overflow(name):
    # The NumPy reference itself must be stable, not rely on the interpreter
    # silencing floating-point errors.  (Underflow to 0 is fine.)
    fn, _ = REFS[name]
    x = gc.input("x", (4,), "float32")
    node = fn(x)
    xs = np.array([-1000.0, -88.0, 88.0, 1000.0], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        out = REGISTRY[node.op.name].evaluate(xs, **node.attrs)
    assert np.all(np.isfinite(out))


def test_erf_agrees_with_math_erf_to_1e12():
    rng = np.random.default_rng(1)
    xs = np.concatenate([np.linspace(-7, 7, 2801), rng.normal(0, 3, 500),
                         [0.0, -0.0, 1e-300, 5e-9, 2.5, np.nextafter(2.5, 0), 6.0, 27.0, 1e5]])
    out = _run(gc.erf, xs, "float64")
    want = np.array([math.erf(v) for v in xs])
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-15)
    # tiny arguments keep full relative accuracy (erf(x) ~ 2x/sqrt(pi))
    assert out[-8] == pytest.approx(2e-300 / math.sqrt(math.pi), rel=1e-14)


def test_erf_odd_and_nan():
    out = _run(gc.erf, np.array([np.nan, np.inf, -np.inf, 0.7, -0.7]), "float64")
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:3], [1.0, -1.0])
    assert out[3] == -out[4]


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "gelu", "softplus", "erf", "silu",
                                  "log_sigmoid", "elu"])
def test_integer_input_promotes_to_float32(name):
    fn, ref = REFS[name]
    x = gc.input("x", (5,), "int64")
    y = fn(x)
    assert y.dtype == np.float32
    xs = np.array([-3, -1, 0, 2, 5])
    out = gc.compile([x], y)(xs)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [ref(float(v)) for v in xs], rtol=2e-6)


def test_activations_are_elementwise_and_keep_shape():
    x = gc.input("x", (None, 3, 2), "float32")
    for name, (fn, _) in REFS.items():
        y = fn(x)
        assert y.op.elementwise, name
        assert y.shape == ("N", 3, 2) and y.dtype == np.float32


def test_bad_attributes_raise_with_user_location():
    x = gc.input("x", (3,), "float32")
    with pytest.raises(gc.GraphBuildError, match=r"approximate(.|\n)*test_ops_activations\.py"):
        gc.gelu(x, approximate="fast")
    with pytest.raises(gc.GraphBuildError, match=r"negative_slope(.|\n)*test_ops_activations"):
        gc.leaky_relu(x, negative_slope="big")
    with pytest.raises(gc.GraphBuildError, match="beta"):
        gc.softplus(x, beta=0)


# --------------------------------------------------------------- gradients
# Inputs kept away from kinks (0 for relu/leaky_relu/elu, the softplus threshold).
GRAD_X = np.array([[-2.3, -0.71, 0.35], [1.2, -1.05, 2.9], [0.6, -4.1, 3.7]])


@pytest.mark.parametrize("name", sorted(REFS))
def test_gradient_matches_finite_differences(name):
    fn, _ = REFS[name]
    gc.check_grad(fn, [GRAD_X])


def test_gradients_closed_form_values():
    xs = np.array([-3.0, -0.5, 0.25, 1.5, 30.0])
    x = gc.input("x", xs.shape, "float64")
    names = ["relu", "leaky_relu", "sigmoid", "tanh", "elu", "gelu", "softplus", "erf",
             "silu", "log_sigmoid", "gelu_tanh"]
    outs = gc.compile([x], [gc.grad(gc.sum(REFS[n][0](x)), x) for n in names])(xs)
    got = dict(zip(names, outs))
    s = np.array([_sigmoid(v) for v in xs])
    pdf = np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi)
    cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in xs])
    k = math.sqrt(2 / math.pi)
    t = np.tanh(k * (xs + 0.044715 * xs ** 3))
    want = {
        "relu": (xs > 0).astype(float),
        "leaky_relu": np.where(xs > 0, 1.0, 0.01),
        "sigmoid": s * (1 - s),
        "tanh": 1 / np.cosh(xs) ** 2,
        "elu": np.where(xs > 0, 1.0, np.exp(xs)),
        "gelu": cdf + xs * pdf,
        "softplus": np.where(xs > 20, 1.0, s),
        "erf": 2 / math.sqrt(math.pi) * np.exp(-xs ** 2),
        "silu": s + xs * s * (1 - s),
        "log_sigmoid": 1 - s,
        "gelu_tanh": 0.5 * (1 + t) + 0.5 * xs * (1 - t ** 2) * k * (1 + 3 * 0.044715 * xs ** 2),
    }
    for n in names:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-12, atol=1e-15, err_msg=n)


def test_gradients_finite_at_extremes():
    xs = np.array([-1000.0, 1000.0], np.float32)
    x = gc.input("x", (2,), "float32")
    names = ["sigmoid", "tanh", "softplus", "log_sigmoid", "silu", "gelu", "erf", "elu"]
    outs = gc.compile([x], [gc.grad(gc.sum(REFS[n][0](x)), x) for n in names])(xs)
    want = {"sigmoid": [0, 0], "tanh": [0, 0], "softplus": [0, 1], "log_sigmoid": [1, 0],
            "silu": [0, 1], "gelu": [0, 1], "erf": [0, 0], "elu": [0, 1]}
    for n, o in zip(names, outs):
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o, want[n], err_msg=n)


def test_integer_input_has_no_gradient_path():
    x = gc.input("x", (3,), "float32")
    i = gc.input("i", (3,), "int64")
    y = gc.sum(gc.sigmoid(i) * x)
    gx = gc.grad(y, x)
    out = gc.compile([x, i], gx)(np.ones(3, np.float32), np.array([-1, 0, 2]))
    np.testing.assert_allclose(out, [_sigmoid(v) for v in (-1, 0, 2)], rtol=1e-6)


# --------------------------------------------------------------- second derivatives
SECOND = {
    # name: (fn, d²/dx² closed form)
    "sigmoid": (gc.sigmoid, lambda v: _sigmoid(v) * (1 - _sigmoid(v)) * (1 - 2 * _sigmoid(v))),
    "tanh": (gc.tanh, lambda v: -2 * math.tanh(v) * (1 - math.tanh(v) ** 2)),
    "softplus": (gc.softplus, lambda v: _sigmoid(v) * (1 - _sigmoid(v))),
    "softplus_b3": (lambda x: gc.softplus(x, beta=3.0),
                    lambda v: 3 * _sigmoid(3 * v) * (1 - _sigmoid(3 * v))),
    "silu": (gc.silu, lambda v: _sigmoid(v) * (1 - _sigmoid(v)) * (2 + v * (1 - 2 * _sigmoid(v)))),
    "erf": (gc.erf, lambda v: -4 * v / math.sqrt(math.pi) * math.exp(-v * v)),
    "log_sigmoid": (gc.log_sigmoid, lambda v: -_sigmoid(v) * (1 - _sigmoid(v))),
    "gelu": (gc.gelu, lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi) * (2 - v * v)),
}


@pytest.mark.parametrize("name", sorted(SECOND))
def test_second_derivative_closed_form(name):
    fn, d2 = SECOND[name]
    xs = np.array([-2.7, -0.8, -0.1, 0.45, 1.3, 3.1])
    x = gc.input("x", xs.shape, "float64")
    g1 = gc.grad(gc.sum(fn(x)), x)          # elementwise: g1[i] = f'(x[i])
    g2 = gc.grad(gc.sum(g1), x)             # g2[i] = f''(x[i])
    out = gc.compile([x], g2)(xs)
    np.testing.assert_allclose(out, [d2(v) for v in xs], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "softplus"])
def test_second_derivative_matches_finite_differences(name):
    fn, _ = SECOND[name]
    gc.check_grad(lambda x: gc.grad(gc.sum(fn(x) * x), x), [GRAD_X])
