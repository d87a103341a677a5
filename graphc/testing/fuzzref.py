"""The fuzzer's reference: every op the generator emits, written again in plain NumPy
float64, independently of graphc's own op implementations (graphc.ops.*.evaluate).

Each function takes float64 / int64 arrays and the step's attributes and returns
the value PyTorch's (and NumPy's) semantics give.  Written for clarity: loops over
kernel offsets and window positions, never a clever stride trick shared with graphc.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                    np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _softplus(x):
    # torch.nn.functional.softplus(beta=1, threshold=20)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


UNARY = {
    "neg": lambda x: -x,
    "abs": np.abs,
    "exp": np.exp,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.1 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                     * (x + 0.044715 * x ** 3))),
    "softplus": _softplus,
    "silu": lambda x: x * _sigmoid(x),
    "square": lambda x: x * x,
    "erf": _erf,
    "log_sigmoid": lambda x: -_softplus(-x),
    "sqrt_pos": lambda x: np.sqrt(x * x + 0.25),          # sqrt away from 0
    "log_pos": lambda x: np.log(x * x + 0.5),             # log away from 0
    "recip_pos": lambda x: 1.0 / (x * x + 1.0),
    "scale": lambda x, c: x * c,
}

BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div_pos": lambda a, b: a / (b * b + 0.5),
    "maximum": np.maximum,
    "minimum": np.minimum,
    "where_less": lambda a, b: np.where(a < b, a, b * 2.0),
    "pow_pos": lambda a, b: (np.abs(a) + 0.5) ** np.tanh(b),
}


def _axes(axis, ndim):
    return tuple(range(ndim)) if axis is None else tuple(a % ndim for a in axis)


def reduce(kind, x, axis, keepdims):
    ax = _axes(axis, x.ndim)
    if kind == "sum":
        return np.sum(x, axis=ax, keepdims=keepdims)
    if kind == "mean":
        return np.mean(x, axis=ax, keepdims=keepdims)
    if kind == "max":
        return np.max(x, axis=ax, keepdims=keepdims)
    if kind == "min":
        return np.min(x, axis=ax, keepdims=keepdims)
    if kind == "var":
        m = np.mean(x, axis=ax, keepdims=True)
        return np.mean((x - m) ** 2, axis=ax, keepdims=keepdims)
    if kind == "logsumexp":
        m = np.max(x, axis=ax, keepdims=True)
        r = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
        return r if keepdims else np.squeeze(r, axis=ax)
    raise KeyError(kind)


def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def conv2d(x, w, b, stride, padding, dilation, groups):
    """padding ((top, bottom), (left, right)); weight (Cout, Cin/groups, kH, kW)."""
    (pt, pb), (pl, pr) = padding
    (sh, sw), (dh, dw) = stride, dilation
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = co // groups
    out = np.zeros((n, co, oh, ow))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dh:i * dh + sh * (oh - 1) + 1:sh,
                           j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum(
                    "nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def pool_out(size, k, s, p, d, ceil_mode):
    """PyTorch's pooling output size (the last window starts inside input or left pad)."""
    span = size + 2 * p - d * (k - 1) - 1
    o = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= size + p:
        o -= 1
    return o


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    n, c, h, w = x.shape
    oh = pool_out(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_out(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    out = np.full((n, c, oh, ow), -np.inf)
    for a in range(oh):
        for b in range(ow):
            for i in range(kernel[0]):
                r = a * stride[0] - padding[0] + i * dilation[0]
                if not 0 <= r < h:
                    continue
                for j in range(kernel[1]):
                    q = b * stride[1] - padding[1] + j * dilation[1]
                    if 0 <= q < w:
                        out[:, :, a, b] = np.maximum(out[:, :, a, b], x[:, :, r, q])
    return out


def avg_pool2d(x, kernel, stride, padding, count_include_pad, ceil_mode):
    n, c, h, w = x.shape
    oh = pool_out(h, kernel[0], stride[0], padding[0], 1, ceil_mode)
    ow = pool_out(w, kernel[1], stride[1], padding[1], 1, ceil_mode)
    out = np.zeros((n, c, oh, ow))
    for a in range(oh):
        h0 = a * stride[0] - padding[0]
        h1 = min(h0 + kernel[0], h + padding[0])
        for b in range(ow):
            w0 = b * stride[1] - padding[1]
            w1 = min(w0 + kernel[1], w + padding[1])
            size = (h1 - h0) * (w1 - w0)
            r0, r1, q0, q1 = max(h0, 0), min(h1, h), max(w0, 0), min(w1, w)
            if not count_include_pad:
                size = (r1 - r0) * (q1 - q0)
            out[:, :, a, b] = x[:, :, r0:r1, q0:q1].sum(axis=(2, 3)) / size
    return out


def floor_mod(a, n):
    return a - (a // n) * n
