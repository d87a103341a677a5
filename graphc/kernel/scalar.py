"""Scalar expressions of the elementwise ops, built from kernel-IR primitives.

`SCALAR[op_name](args, attrs, out_dtype)` returns the Expr computing one
element of the op's output from one element of each input (args already cast
to the dtype the op computes in, see `compute_dtype`).  Composite activations
(sigmoid, tanh, gelu, ...) are written here once, in the numerically stable
forms the NumPy references use, so every backend inherits them.
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import dtypes as dt
from .ir import BOOL, BinOp, Cast, Const, Select, UnOp


def c(v, dtype):
    return Const(v, dtype)


def _isnan(a):
    return UnOp("isnan", a) if a.dtype.kind == "f" else Const(False, BOOL)


def b_or(a, b):
    return BinOp("or", a, b)


def nan_max(a, b):
    """NumPy's maximum: NaN if either is NaN."""
    return Select(b_or(_isnan(a), BinOp("ge", a, b)), a, b)


def nan_min(a, b):
    return Select(b_or(_isnan(a), BinOp("le", a, b)), a, b)


def select_nan(x, value):
    """`value`, but x itself where x is NaN (keeps NaN flowing through clamps)."""
    return Select(_isnan(x), x, value) if x.dtype.kind == "f" else value


def sigmoid(x):
    d = x.dtype
    e = UnOp("exp", UnOp("neg", UnOp("abs", x)))
    one = c(1.0, d)
    den = BinOp("add", one, e)
    return Select(BinOp("ge", x, c(0.0, d)), BinOp("div", one, den), BinOp("div", e, den))


def tanh(x):
    d = x.dtype
    ax = BinOp("min", UnOp("abs", x), c(20.0 if d == dt.float32 else 40.0, d))
    e = UnOp("expm1", BinOp("mul", c(2.0, d), ax))
    t = BinOp("div", e, BinOp("add", e, c(2.0, d)))
    return select_nan(x, Select(BinOp("lt", x, c(0.0, d)), UnOp("neg", t), t))


def softplus_core(z):
    """max(z, 0) + log1p(e^-|z|)."""
    d = z.dtype
    return BinOp("add", Select(BinOp("gt", z, c(0.0, d)), z, c(0.0, d)),
                 UnOp("log1p", UnOp("exp", UnOp("neg", UnOp("abs", z)))))


def _relu(x):
    d = x.dtype
    return Select(b_or(_isnan(x), BinOp("gt", x, c(0.0, d))), x, c(0.0, d))


def _gelu(x, approximate):
    d = x.dtype
    half = c(0.5, d)
    if approximate == "tanh":
        k, cc = math.sqrt(2.0 / math.pi), 0.044715
        x3 = BinOp("mul", BinOp("mul", x, x), x)
        inner = BinOp("mul", c(k, d), BinOp("add", x, BinOp("mul", c(cc, d), x3)))
        return BinOp("mul", BinOp("mul", half, x), BinOp("add", c(1.0, d), tanh(inner)))
    phi = BinOp("mul", half, BinOp("add", c(1.0, d),
                                    UnOp("erf", BinOp("mul", x, c(1 / math.sqrt(2.0), d)))))
    return BinOp("mul", x, phi)


def _sign(a):
    d = a.dtype
    one, zero = c(1, d), c(0, d)
    return Select(BinOp("gt", a, zero), one,
                  Select(BinOp("lt", a, zero), c(-1, d), a))


def _pow(a, b):
    if a.dtype.kind == "f":
        return BinOp("pow", a, b)
    # Integer power through float64 (exact while the result fits in 2**53).
    f = BinOp("pow", Cast(a, dt.float64), Cast(b, dt.float64))
    return Cast(f, a.dtype)


def _bce(args):
    """max(x, 0) - x t + log1p(e^-|x|); with pos_weight p: p t softplus(-x) + (1-t) softplus(x)."""
    x, t = args[0], args[1]
    d = x.dtype
    if len(args) == 2:
        return BinOp("sub", softplus_core(x), BinOp("mul", x, t))
    p = args[2]
    return BinOp("add", BinOp("mul", BinOp("mul", p, t), softplus_core(UnOp("neg", x))),
                 BinOp("mul", BinOp("sub", c(1.0, d), t), softplus_core(x)))


SCALAR = {
    "bce_with_logits": lambda a, at, d: _bce(a),
    "add": lambda a, at, d: BinOp("add", *a),
    "sub": lambda a, at, d: BinOp("sub", *a),
    "mul": lambda a, at, d: BinOp("mul", *a),
    "div": lambda a, at, d: BinOp("div", *a),
    "pow": lambda a, at, d: _pow(*a),
    "maximum": lambda a, at, d: nan_max(*a),
    "minimum": lambda a, at, d: nan_min(*a),
    "less": lambda a, at, d: BinOp("lt", *a),
    "less_equal": lambda a, at, d: BinOp("le", *a),
    "greater": lambda a, at, d: BinOp("gt", *a),
    "greater_equal": lambda a, at, d: BinOp("ge", *a),
    "equal": lambda a, at, d: BinOp("eq", *a),
    "not_equal": lambda a, at, d: BinOp("ne", *a),
    "neg": lambda a, at, d: UnOp("neg", a[0]),
    "abs": lambda a, at, d: UnOp("abs", a[0]),
    "sign": lambda a, at, d: _sign(a[0]),
    "exp": lambda a, at, d: UnOp("exp", a[0]),
    "log": lambda a, at, d: UnOp("log", a[0]),
    "sqrt": lambda a, at, d: UnOp("sqrt", a[0]),
    "square": lambda a, at, d: BinOp("mul", a[0], a[0]),
    "reciprocal": lambda a, at, d: BinOp("div", c(1.0, d), a[0]),
    "logical_not": lambda a, at, d: UnOp("not", a[0]),
    "where": lambda a, at, d: Select(*a),
    "cast": lambda a, at, d: a[0] if a[0].dtype == d else Cast(a[0], d),
    "broadcast_to": lambda a, at, d: a[0],
    "relu": lambda a, at, d: _relu(a[0]),
    "leaky_relu": lambda a, at, d: Select(BinOp("gt", a[0], c(0.0, d)), a[0],
                                          BinOp("mul", a[0], c(at["negative_slope"], d))),
    "sigmoid": lambda a, at, d: sigmoid(a[0]),
    "tanh": lambda a, at, d: tanh(a[0]),
    "elu": lambda a, at, d: Select(
        BinOp("gt", a[0], c(0.0, d)), a[0],
        BinOp("mul", c(at["alpha"], d), UnOp("expm1", BinOp("min", a[0], c(0.0, d))))),
    "gelu": lambda a, at, d: _gelu(a[0], at["approximate"]),
    "softplus": lambda a, at, d: Select(
        BinOp("gt", BinOp("mul", a[0], c(at["beta"], d)), c(at["threshold"], d)), a[0],
        BinOp("div", softplus_core(BinOp("mul", a[0], c(at["beta"], d))), c(at["beta"], d))),
    "erf": lambda a, at, d: UnOp("erf", a[0]),
    "silu": lambda a, at, d: BinOp("mul", a[0], sigmoid(a[0])),
    "log_sigmoid": lambda a, at, d: BinOp(
        "sub", Select(BinOp("lt", a[0], c(0.0, d)), a[0], c(0.0, d)),
        UnOp("log1p", UnOp("exp", UnOp("neg", UnOp("abs", a[0]))))),
}

_COMPARE = {"less", "less_equal", "greater", "greater_equal", "equal", "not_equal"}


def compute_dtype(op_name, in_dtypes, out_dtype) -> list:
    """The dtype each input is cast to before the scalar expression sees it."""
    if op_name == "cast" or op_name == "logical_not":
        return list(in_dtypes)
    if op_name in _COMPARE:
        p = dt.promote(*in_dtypes)
        return [p, p]
    if op_name == "where":
        return [BOOL, out_dtype, out_dtype]
    return [out_dtype] * len(in_dtypes)


def scalar_expr(op_name, attrs, args, out_dtype):
    """Expr for one element; `args` are Exprs of the input elements (any dtype)."""
    want = compute_dtype(op_name, [a.dtype for a in args], out_dtype)
    args = [a if a.dtype == w else Cast(a, w) for a, w in zip(args, want)]
    e = SCALAR[op_name](args, attrs, np.dtype(out_dtype))
    if e.dtype != out_dtype:
        e = Cast(e, out_dtype)
    return e
