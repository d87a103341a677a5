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


def check_float_range(src: np.ndarray, cast: np.ndarray, what: str) -> None:
    """Raise ValueError when casting `src` to a narrower float dtype gave `cast` an
    infinity where `src` held a finite value (float64 1e39 -> float32 inf).

    graphc refuses such values where they enter from outside (a compiled
    function's inputs, a state dict or .npz file) rather than computing with an
    infinity nobody wrote; rounding to the nearest float32 is not an error, and NaN
    and infinities pass through unchanged.  `what` names the value for the message.
    """
    if not (src.dtype.kind == "f" and cast.dtype.kind == "f"
            and cast.dtype.itemsize < src.dtype.itemsize):
        return
    bad = np.isinf(cast)
    if not bad.any():
        return
    bad &= np.isfinite(src)
    if not bad.any():
        return
    flat = int(np.flatnonzero(bad)[0])
    where = tuple(int(i) for i in np.unravel_index(flat, src.shape)) if src.ndim else ()
    value = float(src.reshape(-1)[flat])
    big = np.finfo(cast.dtype).max
    raise ValueError(
        f"{what}: {src.dtype} value {value!r} at index {where} is beyond the {cast.dtype} "
        f"range (largest {big:.8g}) and would become {'-' if value < 0 else ''}inf "
        f"({int(bad.sum())} such value(s)); clip or rescale it (np.clip), or use a "
        f"{src.dtype} graph")


def check_int_range(src: np.ndarray, dtype, what: str) -> None:
    """Raise ValueError when `src` holds an integer that `dtype` (an integer dtype)
    cannot represent: the cast would wrap it (a uint64 label 2**63 becomes a negative
    int64, an int64 index 2**40 the valid int32 index 0), a wrong answer nobody
    asked for.  `what` names the value for the message."""
    dtype = np.dtype(dtype)
    if not (src.dtype.kind in "iu" and dtype.kind in "iu") or src.size == 0:
        return
    info = np.iinfo(dtype)
    if int(src.min()) >= info.min and int(src.max()) <= info.max:
        return
    bad = (src > info.max) if src.dtype.kind == "u" else (src < info.min) | (src > info.max)
    flat = int(np.flatnonzero(bad)[0])
    where = tuple(int(i) for i in np.unravel_index(flat, src.shape)) if src.ndim else ()
    value = int(src.reshape(-1)[flat])
    raise ValueError(
        f"{what}: {src.dtype} value {value} at index {where} is outside the {dtype} range "
        f"({info.min}..{info.max}) and would wrap ({int(bad.sum())} such value(s))")


def cast_checked(a: np.ndarray, dtype, what: str) -> np.ndarray:
    """`a` cast to `dtype`, refusing finite values that would overflow to inf
    (check_float_range) and integers that would wrap (check_int_range)."""
    check_int_range(a, dtype, what)
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    check_float_range(a, out, what)
    return out
