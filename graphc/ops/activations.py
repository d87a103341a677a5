"""Activation functions: relu, leaky_relu, sigmoid, tanh, elu, gelu, softplus,
erf, silu and log_sigmoid.

Each is an elementwise (fusable) unary op that, like exp and log, promotes
integer inputs to float32.  The NumPy references are written to be stable over
the whole float range (no overflow for |x| = 1000), and every gradient rule is
built from graph ops -- mostly from the node itself (sigmoid' = s(1 - s),
tanh' = 1 - t²) -- so that second derivatives work too.
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import dtypes as dt
from .base import apply, register
from .elementwise import UnaryOp, _float_dtype, exp, greater, neg, where

__all__ = ["relu", "leaky_relu", "sigmoid", "tanh", "elu", "gelu", "softplus", "erf", "silu",
           "log_sigmoid"]

_SQRT_PI = math.sqrt(math.pi)
_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_K = math.sqrt(2.0 / math.pi)   # tanh approximation: tanh(k (x + c x³))
_GELU_C = 0.044715


# ------------------------------------------------------------------ NumPy helpers
def _stable_sigmoid(x):
    """1 / (1 + e^-x) without overflow: only e^-|x| (<= 1) is ever computed."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _softplus_ref(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): finite for every finite x."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _erf_ref(x):
    """erf in float64, accurate to a few ulp (no SciPy: NumPy has no erf).

    |x| < 2.5: erf(x) = 2/√π e^{-x²} Σ_n 2^n x^{2n+1} / (1·3·…·(2n+1)), a series
    of positive terms (no cancellation).  |x| >= 2.5: erfc from its continued
    fraction e^{-x²}/√π / (x + (1/2)/(x + (2/2)/(x + (3/2)/(x + …)))),
    evaluated backwards at a fixed depth.  Both agree with math.erf to ~1e-15.
    """
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    out = np.empty_like(ax)
    small = ax < 2.5           # NaN goes to the large branch and stays NaN

    xs = ax[small]
    x2 = xs * xs
    term = xs.copy()
    total = xs.copy()
    for n in range(1, 70):
        term = term * (2.0 * x2) / (2 * n + 1)
        total += term
    out[small] = (2.0 / _SQRT_PI) * np.exp(-x2) * total

    xl = np.minimum(ax[~small], 30.0)   # erfc(30) underflows; also tames inf
    k = np.zeros_like(xl)
    for n in range(60, 0, -1):
        k = (n / 2.0) / (xl + k)
    out[~small] = 1.0 - np.exp(-xl * xl) / _SQRT_PI / (xl + k)
    return np.copysign(out, x)


# ------------------------------------------------------------------ op machinery
class ActivationOp(UnaryOp):
    """An elementwise float op.  Subclasses define `ref` and `grad`.

    `ref(x, **attrs)` gets x already in the output float dtype; `grad(node, g,
    x, **attrs)` builds the input cotangent as graph code.
    """
    float_only = True

    def ref(self, x, **attrs):
        raise NotImplementedError

    def grad(self, node, g, x, **attrs):
        raise NotImplementedError

    def evaluate(self, a, **attrs):
        od = _float_dtype(a.dtype)
        return np.asarray(self.ref(a.astype(od, copy=False), **attrs), dtype=od)

    def vjp(self, node, g):
        (x,) = node.inputs
        if not dt.is_float(x.dtype):
            return [None]
        return [self.grad(node, g, x, **node.attrs)]


def _float_attr(op, name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: {name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


@register
class ReluOp(ActivationOp):
    """max(x, 0); the gradient at 0 is 0 (as in PyTorch)."""
    name = "relu"

    def ref(self, x):
        return np.maximum(x, 0)

    def grad(self, node, g, x):
        return where(greater(x, 0), g, 0.0)


@register
class LeakyReluOp(ActivationOp):
    """x for x > 0, negative_slope * x otherwise."""
    name = "leaky_relu"

    def check(self, negative_slope=0.01):
        return {"negative_slope": _float_attr(self.name, "negative_slope", negative_slope)}

    def ref(self, x, negative_slope):
        return np.where(x > 0, x, x * negative_slope)

    def grad(self, node, g, x, negative_slope):
        return where(greater(x, 0), g, g * negative_slope)


@register
class SigmoidOp(ActivationOp):
    """1 / (1 + e^-x)."""
    name = "sigmoid"

    def ref(self, x):
        return _stable_sigmoid(x)

    def grad(self, node, g, x):
        return g * (node * (1.0 - node))


@register
class TanhOp(ActivationOp):
    """Hyperbolic tangent."""
    name = "tanh"

    def ref(self, x):
        return np.tanh(x)

    def grad(self, node, g, x):
        return g * (1.0 - node * node)


@register
class EluOp(ActivationOp):
    """x for x > 0, alpha (e^x - 1) otherwise."""
    name = "elu"

    def check(self, alpha=1.0):
        return {"alpha": _float_attr(self.name, "alpha", alpha)}

    def ref(self, x, alpha):
        # expm1 of min(x, 0): accurate near 0 and never overflows for large x.
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))

    def grad(self, node, g, x, alpha):
        # For x <= 0: d/dx alpha (e^x - 1) = alpha e^x = elu(x) + alpha.
        return where(greater(x, 0), g, g * (node + alpha))


@register
class GeluOp(ActivationOp):
    """x Φ(x) (approximate="none", the exact erf form) or its tanh approximation."""
    name = "gelu"

    def check(self, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        return {"approximate": approximate}

    def ref(self, x, approximate):
        if approximate == "tanh":
            # x³ overflows float32 only beyond |x| ~ 7e12, where tanh is ±1 anyway.
            # 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation for very negative x.
            with np.errstate(over="ignore"):
                inner = _GELU_K * (x + _GELU_C * (x * x * x))
            return x * _stable_sigmoid(2.0 * inner)
        phi = 0.5 * (1.0 + _erf_ref(x.astype(np.float64) / _SQRT_2))
        return (x.astype(np.float64) * phi).astype(x.dtype)

    def grad(self, node, g, x, approximate):
        if approximate == "tanh":
            # With s = sigmoid(2u) = (1 + tanh u) / 2: d/dx x s = s + x 2 s (1 - s) u'.
            x2 = x * x
            s = sigmoid((x + x * x2 * _GELU_C) * (2.0 * _GELU_K))
            du = (x2 * (3.0 * _GELU_C) + 1.0) * (2.0 * _GELU_K)
            return g * (s + x * (s * (1.0 - s)) * du)
        # d/dx x Φ(x) = Φ(x) + x φ(x)
        cdf = (erf(x * (1.0 / _SQRT_2)) + 1.0) * 0.5
        pdf = exp(x * x * -0.5) * _INV_SQRT_2PI
        return g * (cdf + x * pdf)


@register
class SoftplusOp(ActivationOp):
    """log(1 + e^(beta x)) / beta; x itself where beta x > threshold (as PyTorch)."""
    name = "softplus"

    def check(self, beta=1.0, threshold=20.0):
        beta = _float_attr(self.name, "beta", beta)
        if beta == 0:
            raise ValueError("softplus: beta must be nonzero")
        return {"beta": beta, "threshold": _float_attr(self.name, "threshold", threshold)}

    def ref(self, x, beta, threshold):
        z = x * beta
        return np.where(z > threshold, x, _softplus_ref(z) / beta)

    def grad(self, node, g, x, beta, threshold):
        z = x * beta
        return where(greater(z, threshold), g, g * sigmoid(z))


@register
class ErfOp(ActivationOp):
    """The error function 2/√π ∫₀ˣ e^{-t²} dt."""
    name = "erf"

    def ref(self, x):
        return _erf_ref(x)

    def grad(self, node, g, x):
        return g * (exp(neg(x * x)) * (2.0 / _SQRT_PI))


@register
class SiluOp(ActivationOp):
    """x sigmoid(x) (also called swish)."""
    name = "silu"

    def ref(self, x):
        return x * _stable_sigmoid(x)

    def grad(self, node, g, x):
        s = sigmoid(x)
        return g * (s * (x * (1.0 - s) + 1.0))


@register
class LogSigmoidOp(ActivationOp):
    """log(sigmoid(x)) = -softplus(-x), stable for large |x|."""
    name = "log_sigmoid"

    def ref(self, x):
        return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))

    def grad(self, node, g, x):
        return g * sigmoid(neg(x))   # 1 - sigmoid(x), without cancellation


# ------------------------------------------------------------------ user functions
def relu(x):
    """max(x, 0)."""
    return apply("relu", [x])


def leaky_relu(x, negative_slope=0.01):
    """x for x > 0, negative_slope * x otherwise."""
    return apply("leaky_relu", [x], negative_slope=negative_slope)


def sigmoid(x):
    """The logistic function 1 / (1 + e^-x)."""
    return apply("sigmoid", [x])


def tanh(x):
    """Hyperbolic tangent."""
    return apply("tanh", [x])


def elu(x, alpha=1.0):
    """x for x > 0, alpha (e^x - 1) otherwise."""
    return apply("elu", [x], alpha=alpha)


def gelu(x, approximate="none"):
    """Gaussian error linear unit x Φ(x); approximate="tanh" for the tanh form."""
    return apply("gelu", [x], approximate=approximate)


def softplus(x, beta=1.0, threshold=20.0):
    """log(1 + e^(beta x)) / beta, linear where beta x > threshold."""
    return apply("softplus", [x], beta=beta, threshold=threshold)


def erf(x):
    """The error function."""
    return apply("erf", [x])


def silu(x):
    """x * sigmoid(x)."""
    return apply("silu", [x])


def log_sigmoid(x):
    """log(sigmoid(x)), stable for large |x|."""
    return apply("log_sigmoid", [x])
