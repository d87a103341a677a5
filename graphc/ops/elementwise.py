"""Elementwise arithmetic with NumPy broadcasting: + - * / ** neg abs exp log
sqrt maximum minimum, comparisons, where and cast.

Binary and unary ops are declared from small tables: each row gives the
NumPy reference and the gradient rule as graph code.
"""
from __future__ import annotations

import numpy as np

from ..ir import dtypes as dt
from ..ir.node import Node, TensorType
from ..ir.shapes import broadcast_shapes
from .base import Op, apply, register

__all__ = ["add", "sub", "mul", "div", "pow", "neg", "abs", "exp", "log", "sqrt", "sign",
           "square", "reciprocal", "maximum", "minimum", "less", "less_equal", "greater",
           "greater_equal", "equal", "not_equal", "logical_not", "where", "cast", "zeros_like",
           "ones_like", "unbroadcast", "sum_to"]


# ------------------------------------------------------------------ helpers
def unbroadcast(g: Node, target) -> Node:
    """Sum a broadcast cotangent back to the shape of `target` (a node or a shape).

    When a symbolic dimension met a concrete one in the forward broadcast (x of
    shape (N, 3) against a (4, 3) constant), the reduction depends on the size
    N takes at run time; given the node, this emits `sum_to`, which the
    compiled function turns into concrete sums once N is known.
    """
    from .reduce import sum as rsum
    from .shape import reshape
    shape = tuple(target.shape) if isinstance(target, Node) else tuple(target)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    mixed = any(isinstance(d, str) != isinstance(gd, str)
                for d, gd in zip(shape, g.shape[lead:]) if d != 1 and gd != 1)
    if mixed and isinstance(target, Node):
        return apply("sum_to", [g, target])
    axes = list(range(lead))
    for i, d in enumerate(shape):
        gd = g.shape[lead + i]
        if d == 1 and gd != 1:
            axes.append(lead + i)
    out = rsum(g, axis=tuple(axes), keepdims=True) if axes else g
    if tuple(out.shape) != shape:
        out = reshape(out, shape)
    return out


@register
class SumToOp(Op):
    """sum_to(g, like): g summed over its broadcast axes down to like's shape.

    Only built by gradient rules when the reduced axes depend on a symbolic
    size; once shapes are concrete it is replaced by plain sums (`concretize`).
    """
    name = "sum_to"
    arity = 2

    def infer(self, types):
        g, like = types
        return TensorType(g.dtype, like.shape)

    def evaluate(self, g, like):
        lead = g.ndim - like.ndim
        axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(like.shape)
                                          if d == 1 and g.shape[lead + i] != 1)
        return np.sum(g, axis=axes, keepdims=True).reshape(like.shape).astype(g.dtype)

    def vjp(self, node, gg):
        from .shape import broadcast_to
        return [broadcast_to(gg, node.inputs[0].shape), None]

    def concretize(self, inputs, attrs):
        g, like = inputs
        return unbroadcast(g, tuple(like.shape))


def _float_dtype(d):
    return d if dt.is_float(d) else dt.float32


# ------------------------------------------------------------------ binary
class BinaryOp(Op):
    arity = 2
    elementwise = True
    out_bool = False  # comparisons produce bool

    def infer(self, types, **attrs):
        a, b = types
        shape = broadcast_shapes(a.shape, b.shape)
        dtype = dt.bool_ if self.out_bool else dt.promote(a.dtype, b.dtype)
        return TensorType(dtype, shape)


def _binary(name, np_fn, grad=None, out_bool=False, doc=""):
    cls = type(name.capitalize() + "Op", (BinaryOp,), {
        "name": name, "out_bool": out_bool, "differentiable": grad is not None, "__doc__": doc})

    def evaluate(self, a, b):
        out = np_fn(a, b)
        return np.asarray(out, dtype=dt.bool_ if out_bool else dt.promote(a.dtype, b.dtype))
    cls.evaluate = evaluate
    if grad is not None:
        def vjp(self, node, g):
            a, b = node.inputs
            ga, gb = grad(node, g, a, b)
            return [unbroadcast(ga, a) if ga is not None and dt.is_float(a.dtype) else None,
                    unbroadcast(gb, b) if gb is not None and dt.is_float(b.dtype) else None]
        cls.vjp = vjp
    register(cls)

    def user_fn(a, b):
        return apply(name, [a, b])
    user_fn.__name__ = name
    user_fn.__doc__ = doc
    return user_fn


def _pow_grad(node, g, a, b):
    ga = g * b * pow(a, b - 1)
    # d/db a**b = a**b * log(a); defined where a > 0 (0 where a == 0 and b > 0)
    safe_log = log(where(greater(a, 0), a, 1))
    gb = g * node * safe_log
    return ga, gb


add = _binary("add", np.add, lambda n, g, a, b: (g, g), doc="a + b")
sub = _binary("sub", np.subtract, lambda n, g, a, b: (g, neg(g)), doc="a - b")
mul = _binary("mul", np.multiply, lambda n, g, a, b: (g * b, g * a), doc="a * b")
div = _binary("div", lambda a, b: np.divide(a, b) if np.result_type(a, b).kind == "f"
              else np.floor_divide(a, b), lambda n, g, a, b: (g / b, neg(g * n / b)),
              doc="a / b (floor division for integer tensors)")
pow = _binary("pow", np.power, _pow_grad, doc="a ** b")
maximum = _binary("maximum", np.maximum,
                  lambda n, g, a, b: (where(greater_equal(a, b), g, 0.0),
                                      where(greater_equal(a, b), 0.0, g)),
                  doc="elementwise max; ties send the gradient to the first input")
minimum = _binary("minimum", np.minimum,
                  lambda n, g, a, b: (where(less_equal(a, b), g, 0.0),
                                      where(less_equal(a, b), 0.0, g)),
                  doc="elementwise min; ties send the gradient to the first input")
less = _binary("less", np.less, out_bool=True, doc="a < b")
less_equal = _binary("less_equal", np.less_equal, out_bool=True, doc="a <= b")
greater = _binary("greater", np.greater, out_bool=True, doc="a > b")
greater_equal = _binary("greater_equal", np.greater_equal, out_bool=True, doc="a >= b")
equal = _binary("equal", np.equal, out_bool=True, doc="a == b")
not_equal = _binary("not_equal", np.not_equal, out_bool=True, doc="a != b")


# ------------------------------------------------------------------ unary
class UnaryOp(Op):
    arity = 1
    elementwise = True
    float_only = True  # exp/log/... promote int inputs to float32

    def infer(self, types, **attrs):
        (a,) = types
        return TensorType(_float_dtype(a.dtype) if self.float_only else a.dtype, a.shape)


def _unary(name, np_fn, grad=None, float_only=True, doc=""):
    cls = type("".join(p.capitalize() for p in name.split("_")) + "Op", (UnaryOp,), {
        "name": name, "float_only": float_only, "differentiable": grad is not None,
        "__doc__": doc})

    def evaluate(self, a):
        out_dtype = _float_dtype(a.dtype) if float_only else a.dtype
        with np.errstate(all="ignore"):
            return np.asarray(np_fn(a.astype(out_dtype, copy=False)), dtype=out_dtype)
    cls.evaluate = evaluate
    if grad is not None:
        def vjp(self, node, g):
            (a,) = node.inputs
            return [grad(node, g, a) if dt.is_float(a.dtype) else None]
        cls.vjp = vjp
    register(cls)

    def user_fn(a):
        return apply(name, [a])
    user_fn.__name__ = name
    user_fn.__doc__ = doc
    return user_fn


neg = _unary("neg", np.negative, lambda n, g, a: neg(g), float_only=False, doc="-a")
abs = _unary("abs", np.abs, lambda n, g, a: g * sign(a), float_only=False, doc="|a|")
sign = _unary("sign", np.sign, None, float_only=False, doc="-1, 0 or 1 (no gradient)")
exp = _unary("exp", np.exp, lambda n, g, a: g * n, doc="e ** a")
log = _unary("log", np.log, lambda n, g, a: g / a, doc="natural logarithm")
sqrt = _unary("sqrt", np.sqrt, lambda n, g, a: g / (n * 2.0), doc="square root")
square = _unary("square", np.square, lambda n, g, a: g * a * 2.0, float_only=False, doc="a * a")
reciprocal = _unary("reciprocal", np.reciprocal, lambda n, g, a: neg(g * n * n), doc="1 / a")


@register
class LogicalNotOp(Op):
    """not a (bool)"""
    name = "logical_not"
    arity = 1
    elementwise = True
    differentiable = False

    def infer(self, types):
        return TensorType(dt.bool_, types[0].shape)

    def evaluate(self, a):
        return np.logical_not(a)


def logical_not(a):
    return apply("logical_not", [a])


# ------------------------------------------------------------------ where / cast
@register
class WhereOp(Op):
    """where(cond, a, b): a where cond is true, else b (broadcasting all three)."""
    name = "where"
    arity = 3
    elementwise = True

    def infer(self, types):
        c, a, b = types
        if c.dtype != dt.bool_:
            raise TypeError(f"condition must be bool, got {c.dtype}")
        return TensorType(dt.promote(a.dtype, b.dtype), broadcast_shapes(c.shape, a.shape, b.shape))

    def evaluate(self, c, a, b):
        return np.where(c, a, b).astype(dt.promote(a.dtype, b.dtype), copy=False)

    def vjp(self, node, g):
        c, a, b = node.inputs
        return [None,
                unbroadcast(where(c, g, 0.0), a) if dt.is_float(a.dtype) else None,
                unbroadcast(where(c, 0.0, g), b) if dt.is_float(b.dtype) else None]


def where(cond, a, b):
    # Lift scalars against the tensor branch's dtype, not the bool condition's.
    like = next((x for x in (a, b) if isinstance(x, Node)), None)
    from .base import as_node
    if like is not None:
        a, b = as_node(a, like.dtype), as_node(b, like.dtype)
    return apply("where", [cond, a, b])


@register
class CastOp(Op):
    """Convert to another dtype (float→int truncates toward zero)."""
    name = "cast"
    arity = 1
    elementwise = True

    def check(self, dtype):
        return {"dtype": str(dt.as_dtype(dtype))}

    def infer(self, types, dtype):
        return TensorType(dtype, types[0].shape)

    def evaluate(self, a, dtype):
        return a.astype(dtype)

    def vjp(self, node, g):
        (a,) = node.inputs
        if dt.is_float(a.dtype) and dt.is_float(node.dtype):
            return [cast(g, a.dtype)]
        return [None]


def cast(a, dtype):
    a_dt = a.dtype if isinstance(a, Node) else None
    if a_dt is not None and a_dt == dt.as_dtype(dtype):
        return a
    return apply("cast", [a], dtype=dtype)


def zeros_like(a: Node, dtype=None) -> Node:
    from .shape import broadcast_to
    from .base import constant
    return broadcast_to(constant(0, dtype or a.dtype), a.shape)


def ones_like(a: Node, dtype=None) -> Node:
    from .shape import broadcast_to
    from .base import constant
    return broadcast_to(constant(1, dtype or a.dtype), a.shape)


def sum_to(g, like):
    """Sum `g` over the axes along which `like` was broadcast to g's shape."""
    return unbroadcast(g, like)
