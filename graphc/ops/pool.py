"""2-D pooling over NCHW tensors: max and average pooling, their gradient ops,
and global average pooling.

Ops (attributes normalized by `check`: kernel_size, stride, dilation as
(h, w) pairs; padding (ph, pw), applied on both sides; ceil_mode bool):

    max_pool2d(x)                 max over each window; padding counts as -inf
    max_pool2d_grad(x, g)         routes g[n,c,i,j] to the argmax of window (i, j) of x
                                  (the first maximum in row-major window order on
                                  ties, as PyTorch does; a NaN counts as the largest
                                  value, the first NaN on several, where PyTorch takes
                                  the last); overlapping windows add up
    max_pool2d_gather(x, h)       h read at the argmax of each window of x: the
                                  adjoint of max_pool2d_grad in g (second derivatives)
    avg_pool2d(x)                 mean over each window (count_include_pad chooses
                                  whether zero padding counts in the divisor)
    avg_pool2d_grad(g)            its adjoint; `input_size` fixes the input's (H, W)

With ceil_mode the output rounds up, so the last window may hang over the
bottom/right edge (even when the kernel is larger than the padded input:
avg_pool2d(k=2, s=2, ceil_mode=True) of H = 1 has one window); it must start
inside the input or its left padding (PyTorch's rule), and for the average the
part beyond the padding never counts.  Padding may be at most half the kernel
(again PyTorch's rule), so without dilation every window holds at least one
real element.  A dilated window can lie entirely in the padding (kernel 2,
padding 1, dilation 2 on a 1-pixel axis): its maximum is -inf and it routes no
gradient (it has no argmax; max_pool2d_gather reads 0 for it).

`global_avg_pool2d(x)` is the mean over H and W keeping them as size 1:
(N, C, H, W) -> (N, C, 1, 1), like AdaptiveAvgPool2d(1); it is built from
`mean`, so its gradient needs no op of its own.
"""
from __future__ import annotations

import numpy as np

from ..ir import dtypes as dt
from ..ir.node import TensorType
from ..ir.shapes import shape_str
from .base import Op, apply, register
from .conv import concrete_dims, crop, out_size, pad_nchw, pair, same_batch, scatter_windows

__all__ = ["max_pool2d", "avg_pool2d", "global_avg_pool2d", "max_pool2d_grad",
           "max_pool2d_gather", "avg_pool2d_grad"]


# ------------------------------------------------------------------ geometry
def _check_pool_attrs(kernel_size, stride, padding, dilation, ceil_mode) -> dict:
    k = pair(kernel_size, "kernel_size", 1)
    s = k if stride is None else pair(stride, "stride", 1)
    p = pair(padding, "padding", 0)
    d = pair(dilation, "dilation", 1)
    for a in (0, 1):
        if 2 * p[a] > k[a]:
            raise ValueError(f"padding {p} must be at most half the kernel size {k}")
    return {"kernel_size": k, "stride": s, "padding": p, "dilation": d,
            "ceil_mode": bool(ceil_mode)}


def _geometry(hw, kernel_size, stride, padding, dilation, ceil_mode):
    """(OH, OW) and the padding actually applied, ((top, bottom), (left, right)), where
    bottom/right grow so that ceil_mode's last window fits."""
    ohw, pads = [], []
    for a in (0, 1):
        k, s, p, d = kernel_size[a], stride[a], padding[a], dilation[a]
        o = out_size(hw[a], k, s, (p, p), d, ("H", "W")[a], ceil_mode)
        need = (o - 1) * s + d * (k - 1) + 1          # padded length the windows touch
        ohw.append(o)
        pads.append((p, max(p, need - hw[a] - p)))
    return tuple(ohw), tuple(pads)


def _pool_input_type(x, what="input"):
    if x.ndim != 4:
        raise ValueError(f"{what} must be 4-D (N, C, H, W), got {shape_str(x.shape)}")
    if not dt.is_float(x.dtype):
        raise TypeError(f"{what} must be a float tensor, got {x.dtype}")
    concrete_dims(x.shape, what)


def _offsets(kernel_size, stride, dilation, ohw):
    """For each kernel offset t = k*kW + m: the strided (rows, cols) slices of the padded
    input that hold element (k, m) of every window."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel_size, stride, dilation, ohw
    for k in range(kh):
        for m in range(kw):
            yield k * kw + m, (slice(k * dh, k * dh + (oh - 1) * sh + 1, sh),
                               slice(m * dw, m * dw + (ow - 1) * sw + 1, sw))


def _window_argmax(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Max of each window of x and the offset t = k*kW + m of its first maximum in row-major
    window order (NaN counts as the largest value, so it propagates); padding never wins.
    Also returns the output size and the applied padding."""
    ohw, pads = _geometry(x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
    xp = pad_nchw(x, pads, -np.inf)
    h, w = x.shape[2:]
    (pt, _), (pl, _) = pads
    has_nan = bool(np.isnan(x).any())
    best = np.full(x.shape[:2] + ohw, -np.inf, dtype=x.dtype)
    nk = kernel_size[0] * kernel_size[1]
    idx = np.zeros(best.shape, dtype=np.int16 if nk <= 2**15 else np.int64)
    found = np.zeros(best.shape, dtype=bool)
    all_found = False
    # A running maximum over the kernel offsets: kH*kW passes over strided slices, no
    # window copy.  Like PyTorch, a window's first real element is its initial candidate,
    # so an all -inf window still points into the input, never into the padding.
    for t, (rows, cols) in _offsets(kernel_size, stride, dilation, ohw):
        v = xp[:, :, rows, cols]
        r = np.arange(rows.start, rows.stop, rows.step) - pt
        c = np.arange(cols.start, cols.stop, cols.step) - pl
        r_ok, c_ok = (r >= 0) & (r < h), (c >= 0) & (c < w)
        real = None if r_ok.all() and c_ok.all() else np.logical_and.outer(r_ok, c_ok)
        upd = v > best
        if not all_found:
            upd |= ~found
        if has_nan:
            upd |= np.isnan(v) & ~np.isnan(best)
        if real is not None:
            upd &= real
        np.maximum(best, v, out=best)   # == where(upd, v, best) at real positions
        np.copyto(idx, t, where=upd)
        if not all_found:
            if real is None:
                all_found = True
            else:
                found |= real
    return best, idx, ohw, pads


class _PoolBase(Op):
    def check(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        return _check_pool_attrs(kernel_size, stride, padding, dilation, ceil_mode)


# ------------------------------------------------------------------ max pooling
@register
class MaxPool2dOp(_PoolBase):
    """Max over each (possibly dilated) window; -inf padding."""
    name = "max_pool2d"
    arity = 1

    def infer(self, types, kernel_size, stride, padding, dilation, ceil_mode):
        (x,) = types
        _pool_input_type(x)
        ohw, _ = _geometry(x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
        return TensorType(x.dtype, tuple(x.shape[:2]) + ohw)

    def evaluate(self, x, kernel_size, stride, padding, dilation, ceil_mode):
        # The value alone needs no argmax: a running np.maximum over the kernel offsets
        # (NaN propagates; -inf padding never beats a real element).
        ohw, pads = _geometry(x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
        xp = pad_nchw(x, pads, -np.inf)
        best = None
        for _, (rows, cols) in _offsets(kernel_size, stride, dilation, ohw):
            v = xp[:, :, rows, cols]
            best = v.copy() if best is None else np.maximum(best, v, out=best)
        return best

    def vjp(self, node, g):
        (x,) = node.inputs
        return [max_pool2d_grad(x, g, **node.attrs)]


class _MaxPoolPairOp(_PoolBase):
    """Shared type rule of the two ops that take (x, other)."""
    arity = 2
    other_is_pooled = True     # is `other` shaped like the pooled output (else like x)?

    def infer(self, types, kernel_size, stride, padding, dilation, ceil_mode):
        x, o = types
        _pool_input_type(x)
        _pool_input_type(o, "gradient")
        ohw, _ = _geometry(x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode)
        pooled = tuple(x.shape[:2]) + ohw
        want = pooled if self.other_is_pooled else tuple(x.shape)
        same_batch(x.shape[0], o.shape[0], f"input {shape_str(x.shape)}, second operand "
                                           f"{shape_str(o.shape)}")
        if tuple(o.shape[1:]) != tuple(want[1:]):
            raise ValueError(f"input {shape_str(x.shape)} pools to {shape_str(pooled)}; the "
                             f"second operand must have shape {shape_str(want)}, got "
                             f"{shape_str(o.shape)}")
        out = x.shape if self.other_is_pooled else pooled
        return TensorType(dt.promote(x.dtype, o.dtype), tuple(o.shape[:1]) + tuple(out[1:]))


@register
class MaxPool2dGradOp(_MaxPoolPairOp):
    """dx = max_pool2d_grad(x, g): g routed to each window's (first) argmax in x."""
    name = "max_pool2d_grad"
    other_is_pooled = True

    def evaluate(self, x, g, kernel_size, stride, padding, dilation, ceil_mode):
        dtype = dt.promote(x.dtype, g.dtype)
        _, idx, ohw, pads = _window_argmax(x, kernel_size, stride, padding, dilation, ceil_mode)
        n, c, h, w = x.shape
        g = g.astype(dtype, copy=False)
        dxp = np.zeros((n, c, h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]), dtype)
        for t, (rows, cols) in _offsets(kernel_size, stride, dilation, ohw):
            # for one offset the windows hit distinct positions: += on the slice is exact
            dxp[:, :, rows, cols] += (idx == t) * g
        return np.ascontiguousarray(crop(dxp, pads, (h, w)))

    def vjp(self, node, h):
        # Piecewise constant in x (the argmax pattern); linear in g.
        x, g = node.inputs
        return [None, max_pool2d_gather(x, h, **node.attrs)]


@register
class MaxPool2dGatherOp(_MaxPoolPairOp):
    """y = max_pool2d_gather(x, h): h (shaped like x) read at each window's argmax in x."""
    name = "max_pool2d_gather"
    other_is_pooled = False

    def evaluate(self, x, h, kernel_size, stride, padding, dilation, ceil_mode):
        dtype = dt.promote(x.dtype, h.dtype)
        _, idx, ohw, pads = _window_argmax(x, kernel_size, stride, padding, dilation, ceil_mode)
        hp = pad_nchw(h.astype(dtype, copy=False), pads)
        out = np.zeros(idx.shape, dtype)
        for t, (rows, cols) in _offsets(kernel_size, stride, dilation, ohw):
            np.copyto(out, hp[:, :, rows, cols], where=idx == t)
        return out

    def vjp(self, node, g):
        x, h = node.inputs
        return [None, max_pool2d_grad(x, g, **node.attrs)]


# ------------------------------------------------------------------ average pooling
def _divisor(hw, kernel_size, stride, padding, ohw, count_include_pad, dtype):
    """(OH, OW) array of how many elements each window averages over."""
    counts = []
    for a in (0, 1):
        start = np.arange(ohw[a]) * stride[a] - padding[a]
        end = np.minimum(start + kernel_size[a], hw[a] + padding[a])
        if count_include_pad:
            counts.append(end - start)
        else:
            counts.append(np.minimum(end, hw[a]) - np.maximum(start, 0))
    return np.multiply.outer(counts[0], counts[1]).astype(dtype)


@register
class AvgPool2dOp(Op):
    """Mean over each window; zero padding, counted in the divisor iff count_include_pad."""
    name = "avg_pool2d"
    arity = 1

    def check(self, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True):
        attrs = _check_pool_attrs(kernel_size, stride, padding, 1, ceil_mode)
        del attrs["dilation"]
        attrs["count_include_pad"] = bool(count_include_pad)
        return attrs

    def infer(self, types, kernel_size, stride, padding, ceil_mode, count_include_pad):
        (x,) = types
        _pool_input_type(x)
        ohw, _ = _geometry(x.shape[2:], kernel_size, stride, padding, (1, 1), ceil_mode)
        return TensorType(x.dtype, tuple(x.shape[:2]) + ohw)

    def evaluate(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
        ohw, pads = _geometry(x.shape[2:], kernel_size, stride, padding, (1, 1), ceil_mode)
        xp = pad_nchw(x, pads)
        total = np.zeros(x.shape[:2] + ohw, dtype=x.dtype)
        for _, (rows, cols) in _offsets(kernel_size, stride, (1, 1), ohw):
            total += xp[:, :, rows, cols]      # kH*kW strided adds beat a window-view sum
        div = _divisor(x.shape[2:], kernel_size, stride, padding, ohw, count_include_pad,
                       x.dtype)
        return np.ascontiguousarray(total / div, dtype=x.dtype)

    def vjp(self, node, g):
        (x,) = node.inputs
        return [avg_pool2d_grad(g, x.shape[2:], **node.attrs)]


@register
class AvgPool2dGradOp(Op):
    """dx = avg_pool2d_grad(g): each g[n,c,i,j] / divisor spread over window (i, j)."""
    name = "avg_pool2d_grad"
    arity = 1

    def check(self, input_size, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True):
        attrs = AvgPool2dOp.check(self, kernel_size, stride, padding, ceil_mode,
                                  count_include_pad)
        attrs["input_size"] = pair(tuple(input_size), "input_size", 1)
        return attrs

    def infer(self, types, input_size, kernel_size, stride, padding, ceil_mode,
              count_include_pad):
        (g,) = types
        _pool_input_type(g, "gradient")
        ohw, _ = _geometry(input_size, kernel_size, stride, padding, (1, 1), ceil_mode)
        if tuple(g.shape[2:]) != ohw:
            raise ValueError(f"an input of size {input_size} pools to {ohw}, but the gradient is "
                             f"{shape_str(g.shape)}")
        return TensorType(g.dtype, tuple(g.shape[:2]) + tuple(input_size))

    def evaluate(self, g, input_size, kernel_size, stride, padding, ceil_mode,
                 count_include_pad):
        ohw, pads = _geometry(input_size, kernel_size, stride, padding, (1, 1), ceil_mode)
        div = _divisor(input_size, kernel_size, stride, padding, ohw, count_include_pad, g.dtype)
        n, c = g.shape[:2]
        kh, kw = kernel_size
        cols = np.broadcast_to((g / div)[:, :, None, None], (n, c, kh, kw) + ohw)
        h, w = input_size
        padded = (h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1])
        dxp = scatter_windows(cols, padded, stride, (1, 1))
        return np.ascontiguousarray(crop(dxp, pads, input_size), dtype=g.dtype)

    def vjp(self, node, h):
        attrs = {k: v for k, v in node.attrs.items() if k != "input_size"}
        return [apply("avg_pool2d", [h], **attrs)]


# ------------------------------------------------------------------ user functions
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling of NCHW `x`; stride defaults to the kernel size."""
    return apply("max_pool2d", [x], kernel_size=kernel_size, stride=stride, padding=padding,
                 dilation=dilation, ceil_mode=ceil_mode)


def max_pool2d_grad(x, g, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Gradient of max_pool2d(x) for output cotangent g."""
    return apply("max_pool2d_grad", [x, g], kernel_size=kernel_size, stride=stride,
                 padding=padding, dilation=dilation, ceil_mode=ceil_mode)


def max_pool2d_gather(x, h, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """h (shaped like x) read at the argmax of each max_pool2d window of x."""
    return apply("max_pool2d_gather", [x, h], kernel_size=kernel_size, stride=stride,
                 padding=padding, dilation=dilation, ceil_mode=ceil_mode)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True, ceil_mode=False):
    """Average pooling of NCHW `x`; stride defaults to the kernel size."""
    return apply("avg_pool2d", [x], kernel_size=kernel_size, stride=stride, padding=padding,
                 ceil_mode=ceil_mode, count_include_pad=count_include_pad)


def avg_pool2d_grad(g, input_size, kernel_size, stride=None, padding=0, ceil_mode=False,
                    count_include_pad=True):
    """Gradient of avg_pool2d for output cotangent g and an input of spatial size input_size."""
    return apply("avg_pool2d_grad", [g], input_size=tuple(input_size), kernel_size=kernel_size,
                 stride=stride, padding=padding, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad)


def global_avg_pool2d(x):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1), like AdaptiveAvgPool2d(1)."""
    from .reduce import mean
    from ..ir.errors import GraphBuildError
    from ..ir.node import user_location
    if x.ndim != 4:
        raise GraphBuildError(f"global_avg_pool2d: input must be 4-D (N, C, H, W), got "
                              f"{shape_str(x.shape)}\n  at {user_location()}")
    return mean(x, axis=(2, 3), keepdims=True)
