"""The LLVM backend against the NumPy interpreter, op by op.

Tolerances.  Elementwise float ops: the NumPy references are correctly
rounded or within ~1 ulp; graphc's exp/log/erf are series evaluations within a
few ulp, and composites (tanh, gelu, softplus...) combine a handful of such
steps, so rtol = 16 eps (eps of the dtype) with an absolute floor of 16 eps
for results near 0 (e.g. tanh(x) for tiny x, erf near 0).
Reductions and matmul: the two backends add in different orders; both
results lie within (K - 1) eps sum|terms| of the exact sum (the standard
recursive-summation bound), so they differ by at most 2 K eps sum|terms|,
computed per output element from the data.
"""
import math

import numpy as np
import pytest

import graphc as gc
from graphc.ir.errors import NotLoweredError
from graphc.ops.base import Op, apply
from graphc.ir.node import TensorType

RNG = np.random.default_rng(0)


def both(inputs, outputs, feeds):
    f_llvm = gc.compile(inputs, outputs, backend="llvm")
    f_np = gc.compile(inputs, outputs, backend="numpy")
    return f_llvm(*feeds), f_np(*feeds)


def close_elementwise(got, want, dtype=np.float32):
    eps = np.finfo(dtype).eps
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_allclose(got, want, rtol=16 * eps, atol=16 * eps)


def close_sum(got, want, abs_terms_sum, k, dtype=np.float32):
    """|got - want| <= 2 K eps sum|terms| (+ a denormal-sized floor)."""
    eps = np.finfo(dtype).eps
    assert got.shape == want.shape and got.dtype == want.dtype
    bound = 2 * max(k, 1) * eps * abs_terms_sum + np.finfo(dtype).tiny
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.all(err <= bound), f"max err {err.max()} vs bound {bound.min()}"


UNARY = ["neg", "abs", "exp", "log", "sqrt", "sign", "square", "reciprocal", "relu", "sigmoid",
         "tanh", "erf", "silu", "log_sigmoid", "elu", "gelu", "softplus", "leaky_relu"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unary_ops(dtype):
    shape = (3, 37)   # 111 elements: not a multiple of any vector width
    x = gc.input("x", shape, dtype=dtype)
    outs = [getattr(gc, name)(x) for name in UNARY]
    outs.append(gc.gelu(x, approximate="tanh"))
    outs.append(gc.softplus(x, beta=2.0, threshold=5.0))
    v = RNG.standard_normal(shape) * 4
    v[0, :6] = [0.0, -0.0, 1e-6, -1e-6, 30.0, -30.0]
    v[1, :4] = [2.5, -2.5, 2.4999, 7.0]
    v = v.astype(dtype)
    pos = np.abs(v) + np.finfo(dtype).tiny
    got, want = both([x], outs, [v])
    for name, g, w in zip(UNARY + ["gelu_tanh", "softplus2"], got, want):
        if name in ("log", "sqrt"):
            continue   # checked on positive inputs below
        close_elementwise(g, w, dtype)
    got, want = both([x], [gc.log(x), gc.sqrt(x)], [pos])
    for g, w in zip(got, want):
        close_elementwise(g, w, dtype)


def test_special_values_float32():
    x = gc.input("x", (8,))
    v = np.array([np.inf, -np.inf, np.nan, 0.0, 1e-40, 100.0, -100.0, 88.0], np.float32)
    got, want = both([x], [gc.exp(x), gc.tanh(x), gc.sigmoid(x), gc.log(gc.abs(x)),
                           gc.erf(x), gc.relu(x)], [v])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=16 * np.finfo(np.float32).eps, atol=0,
                                   equal_nan=True)


def test_binary_broadcast_and_compare():
    a = gc.input("a", (4, 1, 13))
    b = gc.input("b", (5, 1))
    outs = [a + b, a - b, a * b, a / b, gc.maximum(a, b), gc.minimum(a, b), a ** 2.0,
            gc.less(a, b), gc.greater_equal(a, b), gc.equal(a, b),
            gc.where(gc.greater(a, b), a, b * 2.0)]
    va = RNG.standard_normal((4, 1, 13)).astype(np.float32)
    vb = RNG.standard_normal((5, 1)).astype(np.float32)
    vb[0, 0] = va[0, 0, 0]   # a tie for the comparisons
    got, want = both([a, b], outs, [va, vb])
    for g, w in zip(got, want):
        close_elementwise(g, w)


def test_integer_ops_and_casts():
    a = gc.input("a", (2, 11), dtype="int64")
    b = gc.input("b", (11,), dtype="int32")
    outs = [a + b, a * b, a / b, a - b, gc.maximum(a, b), gc.abs(a), gc.neg(a),
            gc.cast(a, "float32"), gc.cast(gc.cast(a, "float64") * 0.7, "int32"),
            gc.cast(gc.greater(a, 0), "float32"), gc.logical_not(gc.greater(a, b)),
            gc.cast(a, "bool")]
    va = RNG.integers(-50, 50, (2, 11)).astype(np.int64)
    vb = RNG.integers(-7, 8, (11,)).astype(np.int32)
    vb[vb == 0] = 3
    vb[0] = -1
    got, want = both([a, b], outs, [va, vb])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_integer_division_by_zero_does_not_trap():
    a = gc.input("a", (4,), dtype="int32")
    b = gc.input("b", (4,), dtype="int32")
    f = gc.compile([a, b], a / b, backend="llvm")
    out = f(np.array([7, -7, 5, np.iinfo(np.int32).min], np.int32),
            np.array([0, 2, -2, -1], np.int32))
    assert out[0] == 0 and out[1] == -4 and out[2] == -3   # floor division, as NumPy


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reductions(dtype):
    shape = (3, 1, 29, 5)
    x = gc.input("x", shape, dtype=dtype)
    specs = [("sum", None), ("sum", 3), ("sum", (0, 2)), ("mean", 2), ("mean", (1, 3)),
             ("max", 3), ("max", 0), ("min", (0, 2)), ("sum", (0, 1, 2))]
    outs = [getattr(gc, op)(x, axis=ax, keepdims=(k % 2 == 0)) for k, (op, ax) in
            enumerate(specs)]
    outs += [gc.argmax(x, axis=2), gc.argmin(x, axis=3), gc.argmax(x)]
    v = RNG.standard_normal(shape).astype(dtype)
    v[0, 0, 3, :] = v[0, 0, 4, :]   # ties for argmax along axis 2
    got, want = both([x], outs, [v])
    for k, ((op, ax), g, w) in enumerate(zip(specs, got, want)):
        if op in ("sum", "mean"):
            axes = tuple(range(4)) if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            kk = math.prod(shape[a] for a in axes)
            scale = np.sum(np.abs(v), axis=axes, keepdims=(k % 2 == 0))
            if op == "mean":
                scale = scale / kk
            close_sum(g, w, scale, kk, dtype)
        else:
            np.testing.assert_array_equal(g, w)
    for g, w in zip(got[len(specs):], want[len(specs):]):
        np.testing.assert_array_equal(g, w)


def test_bool_and_int_reductions():
    x = gc.input("x", (6, 7), dtype="int32")
    outs = [gc.sum(x, axis=1), gc.max(x, axis=0), gc.sum(gc.greater(x, 0)),
            gc.mean(x, axis=1), gc.argmax(x, axis=1)]
    v = RNG.integers(-9, 9, (6, 7)).astype(np.int32)
    got, want = both([x], outs, [v])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_shape_ops():
    x = gc.input("x", (2, 3, 5))
    outs = [gc.transpose(x, (2, 0, 1)), gc.reshape(x, (6, 5)), gc.broadcast_to(x, (4, 2, 3, 5)),
            gc.transpose(gc.reshape(x, (3, 10))), x]
    v = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    got, want = both([x], outs, [v])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # outputs are copies: the caller may keep them across calls
    assert not np.shares_memory(got[4], v)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 17), (33, 1, 5), (64, 48, 40),
                                   (3, 130, 97), (37, 300, 45), (150, 20, 70)])
def test_matmul_shapes(m, k, n):
    a = gc.input("a", (m, k))
    b = gc.input("b", (k, n))
    va = RNG.standard_normal((m, k)).astype(np.float32)
    vb = RNG.standard_normal((k, n)).astype(np.float32)
    got, want = both([a, b], [a @ b], [va, vb])
    close_sum(got[0], want[0], np.abs(va) @ np.abs(vb), k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batched_matmul(dtype):
    a = gc.input("a", (2, 3, 11, 7), dtype=dtype)
    b = gc.input("b", (3, 7, 19), dtype=dtype)
    va = RNG.standard_normal((2, 3, 11, 7)).astype(dtype)
    vb = RNG.standard_normal((3, 7, 19)).astype(dtype)
    got, want = both([a, b], [gc.matmul(a, b)], [va, vb])
    close_sum(got[0], want[0], np.matmul(np.abs(va), np.abs(vb)), 7, dtype)


def test_parameters_are_read_at_call_time():
    w = gc.Parameter(np.ones((3,), np.float32), name="w")
    x = gc.input("x", (3,))
    f = gc.compile([x], x * w, backend="llvm")
    np.testing.assert_array_equal(f(np.arange(3, dtype=np.float32)), [0, 1, 2])
    w.set_value(np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(f(np.arange(3, dtype=np.float32)), [0, 2, 4])
    w.value = np.full(3, 3.0, np.float32)   # a new array object
    np.testing.assert_array_equal(f(np.arange(3, dtype=np.float32)), [0, 3, 6])


class _UnloweredTestOp(Op):
    """An op with a reference implementation but no lowering (test only; it is
    applied as an object, not registered, so the op registry stays clean)."""
    name = "_test_unlowered"
    arity = 1

    def infer(self, types):
        return TensorType(types[0].dtype, types[0].shape)

    def evaluate(self, a):
        return a


def test_not_lowered_error_lists_ops_and_lines():
    x = gc.input("x", (3,))
    y = apply(_UnloweredTestOp(), [gc.exp(x)])
    f = gc.compile([x], y * 2.0, backend="llvm")
    with pytest.raises(NotLoweredError, match="_test_unlowered") as info:
        f(np.ones(3, np.float32))
    assert "test_llvm_ops.py" in str(info.value)
    # the numpy backend runs the same graph
    np.testing.assert_allclose(gc.compile([x], y * 2.0)(np.zeros(3, np.float32)), 2.0)


def test_large_full_reductions_split_in_chunks():
    shape = (32, 50, 41)      # 65600 elements: reduced in 16 parallel chunks
    x = gc.input("x", shape)
    v = RNG.standard_normal(shape).astype(np.float32)
    got, want = both([x], [gc.sum(x), gc.mean(x), gc.max(x), gc.min(x * 2.0),
                           gc.sum(gc.square(x))], [v])
    n = v.size
    close_sum(got[0], want[0], np.sum(np.abs(v)), n)
    close_sum(got[1], want[1], np.mean(np.abs(v)), n)
    assert got[2] == want[2] and got[3] == want[3]
    close_sum(got[4], want[4], np.sum(v * v), n)


def test_bool_extrema_and_empty_tensors():
    b = gc.input("b", (3, 4), dtype="bool")
    e = gc.input("e", (0, 5))
    got, want = both([b, e], [gc.max(b, axis=1), gc.min(b, axis=0), gc.sum(e, axis=0),
                              gc.exp(e), gc.max(gc.cast(b, "int32"), axis=1)],
                     [RNG.random((3, 4)) > 0.5, np.zeros((0, 5), np.float32)])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
