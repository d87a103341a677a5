"""Python operator overloading on graph nodes (x + y, x @ w, x[0, :3], x.T …)."""
from __future__ import annotations

from ..ir.node import Node
from . import elementwise as E
from . import indexing as I
from . import linalg as L
from . import reduce as R
from . import shape as S


def _r(fn):
    return lambda self, other: fn(other, self)


_METHODS = {
    "__add__": E.add, "__radd__": _r(E.add),
    "__sub__": E.sub, "__rsub__": _r(E.sub),
    "__mul__": E.mul, "__rmul__": _r(E.mul),
    "__truediv__": E.div, "__rtruediv__": _r(E.div),
    "__pow__": E.pow, "__rpow__": _r(E.pow),
    "__matmul__": L.matmul, "__rmatmul__": _r(L.matmul),
    "__neg__": E.neg, "__abs__": E.abs,
    "__lt__": E.less, "__le__": E.less_equal, "__gt__": E.greater, "__ge__": E.greater_equal,
    "sum": R.sum, "mean": R.mean, "max": R.max, "min": R.min, "argmax": R.argmax,
    "var": R.var, "reshape": lambda self, *shape: S.reshape(
        self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape),
    "transpose": S.transpose, "permute": S.permute, "flatten": S.flatten,
    "__getitem__": I.getitem,
    "astype": E.cast, "exp": E.exp, "log": E.log, "sqrt": E.sqrt,
}


def install():
    for name, fn in _METHODS.items():
        setattr(Node, name, fn)
    Node.T = property(lambda self: S.transpose(self))
