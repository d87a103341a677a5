"""How a compiled Function converts an array fed to an input of another dtype.

The rule (NumPy's casting levels):

* a **safe** cast (the input's dtype holds every value of the array's dtype:
  int32 → int64, uint8/int16/bool/float16 → float32, int64 → float64) happens
  silently;
* a **same_kind** cast that may lose information (float64 → float32 rounds,
  int64/int32 → float32 rounds above 2**24, int64 → int32 wraps) happens with
  an `InputCastWarning`, once per input of each Function, naming the input
  and how to avoid it; finite values beyond the target's range (float64
  above 3.4e38 into float32) are a ValueError instead (ir/dtypes.py
  `cast_checked`);
* anything else (float → int, complex, strings, objects) is a TypeError.

Until the reduced-precision work settles a wider rule, this keeps the common
case (NumPy's float64 defaults fed to float32 models) working while saying
that values were rounded.
"""
from __future__ import annotations

import warnings

import numpy as np

from .ir.dtypes import cast_checked
from .ir.node import user_stacklevel


class InputCastWarning(UserWarning):
    """An array fed to a compiled function was cast to the input's dtype with possible loss."""


def convert(fn_name: str, node, a: np.ndarray, warned: set) -> np.ndarray:
    """`a` as `node`'s dtype by the rule above; `warned` holds the input names already warned."""
    want = node.dtype
    if a.dtype.kind not in "biuf" or not np.can_cast(a.dtype, want, "same_kind"):
        raise TypeError(f"{fn_name}: input {node.name!r} expects dtype {want}, got {a.dtype} "
                        f"(graphc casts only within a kind, e.g. float64 -> float32; convert "
                        f"with .astype(np.{want}) if that is what you mean)")
    # finite values beyond the target's range are refused, not turned into inf
    out = cast_checked(a, want, f"{fn_name}: input {node.name!r}")
    if not np.can_cast(a.dtype, want, "safe") and node.name not in warned:
        warned.add(node.name)
        # an integer narrowing never changes a value (cast_checked refused any out of
        # range); a cast to a narrower float, or an integer to a float, may round
        effect = (f"values outside {want}'s range are refused" if a.dtype.kind in "biu"
                  and want.kind in "biu" else "which may round values")
        warnings.warn(f"{fn_name}: input {node.name!r} expects {want}, got {a.dtype}: cast to "
                      f"{want}, {effect} (warned once per input; pass {want} "
                      f"arrays, e.g. x.astype(np.{want}), to avoid the cast)",
                      InputCastWarning, stacklevel=user_stacklevel())
    return out

