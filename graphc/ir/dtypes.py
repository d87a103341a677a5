"""The dtypes graphc knows, and the rule that promotes mixed dtypes.

graphc uses NumPy's dtype objects directly (so values interoperate with NumPy
without translation) but admits only five of them.
"""
from __future__ import annotations

import numpy as np

float32 = np.dtype("float32")
float64 = np.dtype("float64")
int32 = np.dtype("int32")
int64 = np.dtype("int64")
bool_ = np.dtype("bool")

SUPPORTED = (float32, float64, int32, int64, bool_)
# Promotion order: a binary op on two dtypes yields the later one.  Unlike
# NumPy, int64 + float32 stays float32 (as in PyTorch and JAX): float32 is the
# working precision of neural networks and must not silently widen.
_RANK = {bool_: 0, int32: 1, int64: 2, float32: 3, float64: 4}


def as_dtype(d) -> np.dtype:
    """Normalize a dtype spec ("float32", np.float32, np.dtype) or raise TypeError."""
    if d is None:
        return float32
    if d is bool or d == "bool":
        return bool_
    try:
        dt = np.dtype(d)
    except TypeError as exc:
        raise TypeError(f"unknown dtype {d!r}; graphc supports "
                        f"{', '.join(str(s) for s in SUPPORTED)}") from exc
    if dt not in _RANK:
        raise TypeError(f"dtype {dt} is not supported; graphc supports "
                        f"{', '.join(str(s) for s in SUPPORTED)}")
    return dt


def promote(*dtypes) -> np.dtype:
    """The dtype a binary/n-ary elementwise op on these dtypes produces."""
    return max((as_dtype(d) for d in dtypes), key=_RANK.__getitem__)


def is_float(d) -> bool:
    return as_dtype(d).kind == "f"


def is_int(d) -> bool:
    return as_dtype(d).kind == "i"
