"""Seeded weight initializers with PyTorch's conventions.

Every initializer draws from a NumPy ``Generator``: pass ``rng=`` explicitly,
or let it use the module-level default generator, which ``manual_seed(s)``
resets.  A fresh interpreter starts from ``manual_seed(0)``, so models built in
the same order get the same weights run after run.

Two forms of each initializer:

- ``kaiming_uniform(shape, ...)`` returns a new array;
- ``kaiming_uniform_(target, ...)`` fills ``target`` (a ``gc.Parameter`` or a
  NumPy array) in place and returns it, like ``torch.nn.init.kaiming_uniform_``.

Fans follow PyTorch: for a weight of shape (out, in, *kernel),
fan_in = in * prod(kernel) and fan_out = out * prod(kernel).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["manual_seed", "default_rng", "calculate_gain", "calculate_fan_in_and_fan_out",
           "uniform", "normal", "constant", "zeros", "ones",
           "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
           "uniform_", "normal_", "constant_", "zeros_", "ones_",
           "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"]

_default = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the default generator used by layers built without ``rng=``."""
    global _default
    _default = np.random.default_rng(seed)
    return _default


def default_rng() -> np.random.Generator:
    return _default


def _rng(rng):
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)  # an int seed


def calculate_gain(nonlinearity: str = "leaky_relu", param=None) -> float:
    """The recommended gain for a nonlinearity (torch.nn.init.calculate_gain)."""
    linear = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise ValueError(f"negative_slope {slope!r} is not a number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def calculate_fan_in_and_fan_out(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shaped (out, in, *receptive_field)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a tensor with at least 2 dimensions, "
                         f"got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fan(shape, mode):
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


# ------------------------------------------------------------------ array-returning forms
def uniform(shape, a=0.0, b=1.0, rng=None, dtype="float32") -> np.ndarray:
    return _rng(rng).uniform(a, b, size=tuple(shape)).astype(dtype)


def normal(shape, mean=0.0, std=1.0, rng=None, dtype="float32") -> np.ndarray:
    return _rng(rng).normal(mean, std, size=tuple(shape)).astype(dtype)


def constant(shape, val, dtype="float32") -> np.ndarray:
    return np.full(tuple(shape), val, dtype=dtype)


def zeros(shape, dtype="float32") -> np.ndarray:
    return np.zeros(tuple(shape), dtype=dtype)


def ones(shape, dtype="float32") -> np.ndarray:
    return np.ones(tuple(shape), dtype=dtype)


def kaiming_uniform(shape, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None,
                    dtype="float32") -> np.ndarray:
    """U(-bound, bound) with bound = gain * sqrt(3 / fan).

    With a=sqrt(5) (PyTorch's Linear/Conv default) the bound is 1/sqrt(fan_in).
    """
    gain = calculate_gain(nonlinearity, a)
    bound = gain * math.sqrt(3.0 / _fan(shape, mode))
    return uniform(shape, -bound, bound, rng, dtype)


def kaiming_normal(shape, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None,
                   dtype="float32") -> np.ndarray:
    """N(0, std²) with std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(shape, mode))
    return normal(shape, 0.0, std, rng, dtype)


def xavier_uniform(shape, gain=1.0, rng=None, dtype="float32") -> np.ndarray:
    """U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, -bound, bound, rng, dtype)


def xavier_normal(shape, gain=1.0, rng=None, dtype="float32") -> np.ndarray:
    """N(0, std²) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return normal(shape, 0.0, std, rng, dtype)


# ------------------------------------------------------------------ in-place forms
def _fill(target, make):
    """Fill a Parameter or ndarray with make(shape, dtype); return the target."""
    from ..tensor import Parameter
    if isinstance(target, Parameter):
        target.set_value(make(target.value.shape, target.value.dtype))
    elif isinstance(target, np.ndarray):
        target[...] = make(target.shape, target.dtype)
    else:
        raise TypeError(f"initializers fill a gc.Parameter or a NumPy array, "
                        f"got {type(target).__name__}")
    return target


def uniform_(t, a=0.0, b=1.0, rng=None):
    return _fill(t, lambda s, d: uniform(s, a, b, rng, d))


def normal_(t, mean=0.0, std=1.0, rng=None):
    return _fill(t, lambda s, d: normal(s, mean, std, rng, d))


def constant_(t, val):
    return _fill(t, lambda s, d: constant(s, val, d))


def zeros_(t):
    return _fill(t, zeros)


def ones_(t):
    return _fill(t, ones)


def kaiming_uniform_(t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    return _fill(t, lambda s, d: kaiming_uniform(s, a, mode, nonlinearity, rng, d))


def kaiming_normal_(t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    return _fill(t, lambda s, d: kaiming_normal(s, a, mode, nonlinearity, rng, d))


def xavier_uniform_(t, gain=1.0, rng=None):
    return _fill(t, lambda s, d: xavier_uniform(s, gain, rng, d))


def xavier_normal_(t, gain=1.0, rng=None):
    return _fill(t, lambda s, d: xavier_normal(s, gain, rng, d))
