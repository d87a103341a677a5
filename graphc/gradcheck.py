"""Finite-difference gradient checking in float64, for users and tests."""
from __future__ import annotations

import numpy as np

from .autodiff import grad
from .function import compile
from .ops import elementwise as E
from .ops import reduce as R
from .ops.base import constant
from .tensor import input

__all__ = ["check_grad"]


def check_grad(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0, max_entries=64,
               raise_on_fail=True):
    """Compare gc.grad of `fn` with central finite differences.

    fn: takes one symbolic tensor per entry of `args` and returns a tensor.
    args: NumPy arrays.  Float arrays become float64 inputs and are checked;
      integer/bool arrays (labels, masks) are fed unchanged and not checked.
    The output is projected onto a random direction (s = sum(fn(...) * r)),
    so any output shape works.  For each checked input at most `max_entries`
    randomly chosen entries are perturbed.  An entry fails only when both the
    absolute and the relative error exceed their tolerances.

    Returns the largest (absolute error, relative error) seen; raises
    AssertionError naming the input and entry on failure (if raise_on_fail).
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(a) for a in args]
    for k, a in enumerate(arrays):
        if a.dtype.kind == "f":
            arrays[k] = a.astype(np.float64)
    ins = [input(f"arg{k}", a.shape, a.dtype) for k, a in enumerate(arrays)]
    y = fn(*ins)
    r = rng.standard_normal(y.shape)
    s = R.sum(E.mul(E.cast(y, "float64"), constant(r, "float64")))
    checked = [k for k, a in enumerate(arrays) if a.dtype.kind == "f"]
    gs = grad(s, [ins[k] for k in checked])
    f_val = compile(ins, s, optimize=0)
    f_grad = compile(ins, gs, optimize=0)
    analytic = f_grad(*arrays)
    worst = (0.0, 0.0)
    for k, g in zip(checked, analytic):
        a = arrays[k]
        flat_idx = np.arange(a.size)
        if a.size > max_entries:
            flat_idx = rng.choice(a.size, max_entries, replace=False)
        for j in flat_idx:
            idx = np.unravel_index(j, a.shape)
            orig = a[idx]
            a[idx] = orig + eps
            fp = float(f_val(*arrays))
            a[idx] = orig - eps
            fm = float(f_val(*arrays))
            a[idx] = orig
            num = (fp - fm) / (2 * eps)
            ana = float(g[idx])
            abs_err = abs(num - ana)
            rel_err = abs_err / max(abs(num), abs(ana), 1e-300)
            worst = (max(worst[0], abs_err), max(worst[1], rel_err if abs_err > atol else 0.0))
            if abs_err > atol and rel_err > rtol and raise_on_fail:
                raise AssertionError(
                    f"gradient mismatch for argument {k} (shape {a.shape}) at index {idx}: "
                    f"analytic {ana:.8g}, finite difference {num:.8g} "
                    f"(abs err {abs_err:.3g}, rel err {rel_err:.3g})")
    return worst
