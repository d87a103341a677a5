"""2-D convolution (NCHW, cross-correlation as in deep-learning libraries) and
its two gradient ops.

Three ops, each the adjoint of another in one argument, so derivatives of any
order stay inside this family:

    conv2d(x, w)                          y[n,o,i,j] = sum_{c,k,l} xpad[n, g*Cg+c,
                                                  i*sh + k*dh, j*sw + l*dw] * w[o,c,k,l]
    conv2d_grad_input(g, w; input_size)   dx = (d conv2d / dx)^T g   ("transposed conv")
    conv2d_grad_weight(x, g; kernel_size) dw = (d conv2d / dw)^T g

The bias is *not* an input of the op: the user function `conv2d` adds it with
an ordinary broadcast add (`y + b.reshape(1, C_out, 1, 1)`), so the op stays
two-input, the bias gradient (the sum of g over N, H, W) falls out of the
add's own rule, and a fusion pass sees the bias as a plain elementwise
epilogue.

Attributes (all ops, normalized by `check`):
    stride   (sh, sw)               ints >= 1
    padding  ((top, bottom), (left, right))   ints >= 0; "same" and "valid"
             are resolved by the user function `conv2d` (it knows the kernel)
    dilation (dh, dw)               ints >= 1
    groups   int >= 1
Only the batch dimension N may be symbolic.

NumPy references use im2col: a strided window view of the padded input is
copied into a (groups, N*OH*OW, C_in/groups*kH*kW) matrix and multiplied with
the weights in one batched matmul, so they run at BLAS speed.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..ir import dtypes as dt
from ..ir.errors import GraphBuildError
from ..ir.node import Node, TensorType, user_location
from ..ir.shapes import shape_str
from .base import Op, apply, register

__all__ = ["conv2d", "conv2d_grad_input", "conv2d_grad_weight"]


# ------------------------------------------------------------------ attribute helpers
def pair(v, what: str, minimum: int) -> tuple:
    """An int or a pair of ints -> (a, b), each >= minimum."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v), int(v))
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}") from None
    out = []
    for d in (a, b):
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool):
            raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
        if d < minimum:
            raise ValueError(f"{what} must be >= {minimum}, got {v!r}")
        out.append(int(d))
    return tuple(out)


def normalize_padding(p) -> tuple:
    """int | (ph, pw) | ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    if isinstance(p, str):
        raise ValueError(f"padding {p!r} must be resolved to numbers before building the op "
                         "(gc.conv2d does this)")
    if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(q, (tuple, list))
                                                         for q in p):
        return (pair(tuple(p[0]), "padding", 0), pair(tuple(p[1]), "padding", 0))
    ph, pw = pair(p, "padding", 0)
    return ((ph, ph), (pw, pw))


def out_size(size: int, k: int, stride: int, pad: tuple, dilation: int, axis: str,
             ceil_mode: bool = False) -> int:
    """Number of window positions along one axis; raises if no window fits.

    With ceil_mode (pools), PyTorch's rule: ceil((padded - extent) / stride) + 1
    windows, where the last one may hang over the bottom/right edge -- even when
    the kernel is larger than the padded input (avg_pool2d(k=2, s=2) of H = 1
    gives one window) -- but is dropped if it starts in the right padding."""
    extent = dilation * (k - 1) + 1
    padded = size + pad[0] + pad[1]
    span = padded - extent
    n = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (n - 1) * stride >= size + pad[0]:
        n -= 1  # the last window must start inside the input or its left padding
    if n < 1:
        raise ValueError(f"kernel extent {extent} (kernel {k}, dilation {dilation}) is larger "
                         f"than the padded input {axis} {padded} (input {size} + padding "
                         f"{pad[0]}+{pad[1]})" + (" even with ceil_mode" if ceil_mode else ""))
    return n


def concrete_dims(shape, which: str, start: int = 1) -> None:
    """Only the batch dim (index 0) may be symbolic."""
    for d in shape[start:]:
        if isinstance(d, str):
            raise ValueError(f"{which} {shape_str(shape)} has a symbolic dimension {d!r}; only "
                             "the batch dimension may be symbolic")


def same_batch(a, b, what: str) -> None:
    if type(a) is type(b) and a != b:
        raise ValueError(f"batch sizes differ: {what}")


def windows(xp: np.ndarray, kernel, stride, dilation, out_hw) -> np.ndarray:
    """View (N, C, OH, OW, kH, kW) of the padded array xp: window (i, j) element (k, l)
    is xp[:, :, i*sh + k*dh, j*sw + l*dw]."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    v = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return v[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, ::dh, ::dw]


def im2col(x: np.ndarray, padding, kernel, stride, dilation, out_hw, groups) -> np.ndarray:
    """Windows of padded x as a (G, Cg*kH*kW, N*OH*OW) matrix.

    This layout keeps the source's contiguous (OH, OW) run innermost, which makes the
    copy several times faster than the classic (N*OH*OW, C*kH*kW) one."""
    n = x.shape[0]
    (kh, kw), (oh, ow), cg = kernel, out_hw, x.shape[1] // groups
    win = windows(pad_nchw(x, padding), kernel, stride, dilation, out_hw)
    return (win.reshape(n, groups, cg, oh, ow, kh, kw).transpose(1, 2, 5, 6, 0, 3, 4)
            .reshape(groups, cg * kh * kw, n * oh * ow))


def scatter_windows(cols: np.ndarray, padded_hw, stride, dilation) -> np.ndarray:
    """Adjoint of `windows`: cols (A, B, kH, kW, OH, OW) summed into a padded (A, B, Hp, Wp)
    (A, B are N, C or C, N: whichever order the caller's data is laid out in)."""
    n, c, kh, kw, oh, ow = cols.shape
    (sh, sw), (dh, dw) = stride, dilation
    out = np.zeros((n, c) + tuple(padded_hw), dtype=cols.dtype)
    for k in range(kh):
        for m in range(kw):
            # For fixed (k, m) the windows hit distinct positions, so += on a slice is exact.
            out[:, :, k * dh:k * dh + (oh - 1) * sh + 1:sh,
                m * dw:m * dw + (ow - 1) * sw + 1:sw] += cols[:, :, k, m]
    return out


def pad_nchw(x: np.ndarray, padding, value=0.0) -> np.ndarray:
    (pt, pb), (pl, pr) = padding
    if not (pt or pb or pl or pr):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def crop(xp: np.ndarray, padding, hw) -> np.ndarray:
    (pt, _), (pl, _) = padding
    return xp[:, :, pt:pt + hw[0], pl:pl + hw[1]]


def _float_out(a, b) -> np.dtype:
    if not (dt.is_float(a) and dt.is_float(b)):
        raise TypeError(f"needs float operands, got {a} and {b}")
    return dt.promote(a, b)


# ------------------------------------------------------------------ the ops
class _ConvBase(Op):
    arity = 2

    def _check_common(self, stride, padding, dilation, groups) -> dict:
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        return {"stride": pair(stride, "stride", 1), "padding": normalize_padding(padding),
                "dilation": pair(dilation, "dilation", 1), "groups": int(groups)}

    def _check_weight(self, w, c_in, groups, what_x) -> None:
        if w.ndim != 4:
            raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got "
                             f"{shape_str(w.shape)}")
        concrete_dims(w.shape, "weight", 0)
        c_out, cg = w.shape[0], w.shape[1]
        if c_out % groups:
            raise ValueError(f"weight {shape_str(w.shape)} has C_out={c_out} output channels, "
                             f"not divisible by groups={groups}")
        if c_in != cg * groups:
            raise ValueError(f"channel mismatch: {what_x} has C_in={c_in} channels but weight "
                             f"{shape_str(w.shape)} with groups={groups} expects "
                             f"{cg}*{groups}={cg * groups}")

    @staticmethod
    def _out_hw(hw, khw, stride, padding, dilation):
        return tuple(out_size(hw[a], khw[a], stride[a], padding[a], dilation[a], ("H", "W")[a])
                     for a in (0, 1))


@register
class Conv2dOp(_ConvBase):
    """y = conv2d(x, w): x (N, C_in, H, W), w (C_out, C_in/groups, kH, kW) -> (N, C_out, OH, OW)."""
    name = "conv2d"

    def check(self, stride=1, padding=0, dilation=1, groups=1):
        return self._check_common(stride, padding, dilation, groups)

    def infer(self, types, stride, padding, dilation, groups):
        x, w = types
        dtype = _float_out(x.dtype, w.dtype)
        if x.ndim != 4:
            raise ValueError(f"input must be 4-D (N, C, H, W), got {shape_str(x.shape)}")
        concrete_dims(x.shape, "input")
        self._check_weight(w, x.shape[1], groups, f"input {shape_str(x.shape)}")
        oh, ow = self._out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
        return TensorType(dtype, (x.shape[0], w.shape[0], oh, ow))

    def evaluate(self, x, w, stride, padding, dilation, groups):
        dtype = dt.promote(x.dtype, w.dtype)
        x, w = x.astype(dtype, copy=False), w.astype(dtype, copy=False)
        n, c, h, wd = x.shape
        c_out, cg, kh, kw = w.shape
        gs, og = groups, c_out // groups
        oh, ow = self._out_hw((h, wd), (kh, kw), stride, padding, dilation)
        cols = im2col(x, padding, (kh, kw), stride, dilation, (oh, ow), gs)  # (G, K, P)
        y = np.matmul(w.reshape(gs, og, cg * kh * kw), cols)                   # (G, Og, P)
        y = y.reshape(gs * og, n, oh, ow).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(y, dtype=dtype)

    def vjp(self, node, g):
        x, w = node.inputs
        a = node.attrs
        return [conv2d_grad_input(g, w, x.shape[2:], **a) if dt.is_float(x.dtype) else None,
                conv2d_grad_weight(x, g, w.shape[2:], **a) if dt.is_float(w.dtype) else None]


@register
class Conv2dGradInputOp(_ConvBase):
    """dx = conv2d_grad_input(g, w): the adjoint of conv2d in x (a transposed convolution).

    g (N, C_out, OH, OW), w (C_out, C_in/groups, kH, kW) -> (N, C_in, H, W) where
    (H, W) = `input_size` (with stride > 1 several input sizes give the same OH, OW).
    """
    name = "conv2d_grad_input"

    def check(self, input_size, stride=1, padding=0, dilation=1, groups=1):
        attrs = self._check_common(stride, padding, dilation, groups)
        attrs["input_size"] = pair(tuple(input_size), "input_size", 1)
        return attrs

    def infer(self, types, input_size, stride, padding, dilation, groups):
        g, w = types
        dtype = _float_out(g.dtype, w.dtype)
        if g.ndim != 4:
            raise ValueError(f"output gradient must be 4-D (N, C_out, OH, OW), got "
                             f"{shape_str(g.shape)}")
        concrete_dims(g.shape, "output gradient")
        c_in = w.shape[1] * groups if w.ndim == 4 and isinstance(w.shape[1], int) else None
        self._check_weight(w, c_in, groups, "the input")
        if g.shape[1] != w.shape[0]:
            raise ValueError(f"output gradient {shape_str(g.shape)} has {g.shape[1]} channels, "
                             f"weight {shape_str(w.shape)} has C_out={w.shape[0]}")
        ohw = self._out_hw(input_size, w.shape[2:], stride, padding, dilation)
        if ohw != tuple(g.shape[2:]):
            raise ValueError(f"an input of size {input_size} gives outputs of size {ohw}, but the "
                             f"output gradient is {shape_str(g.shape)}")
        return TensorType(dtype, (g.shape[0], c_in) + tuple(input_size))

    def evaluate(self, g, w, input_size, stride, padding, dilation, groups):
        dtype = dt.promote(g.dtype, w.dtype)
        g, w = g.astype(dtype, copy=False), w.astype(dtype, copy=False)
        n, c_out, oh, ow = g.shape
        _, cg, kh, kw = w.shape
        gs, og = groups, c_out // groups
        gm = g.reshape(n, gs, og, oh * ow).transpose(1, 2, 0, 3).reshape(gs, og, n * oh * ow)
        wm = w.reshape(gs, og, cg * kh * kw)
        cols = np.matmul(wm.transpose(0, 2, 1), gm)             # (G, Cg*kH*kW, N*OH*OW)
        # scatter in (C, N, ...) order, which is how the columns are laid out
        cols = cols.reshape(gs * cg, kh, kw, n, oh, ow).transpose(0, 3, 1, 2, 4, 5)
        (pt, pb), (pl, pr) = padding
        h, wd = input_size
        dxp = scatter_windows(cols, (h + pt + pb, wd + pl + pr), stride, dilation)
        dx = crop(dxp, padding, input_size).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(dx, dtype=dtype)

    def vjp(self, node, h):
        # dx = A_w^T g  =>  <h, dx> = <conv2d(h, w), g>
        g, w = node.inputs
        a = {k: v for k, v in node.attrs.items() if k != "input_size"}
        return [conv2d_op(h, w, **a) if dt.is_float(g.dtype) else None,
                conv2d_grad_weight(h, g, w.shape[2:], **a) if dt.is_float(w.dtype) else None]


@register
class Conv2dGradWeightOp(_ConvBase):
    """dw = conv2d_grad_weight(x, g): the adjoint of conv2d in w.

    x (N, C_in, H, W), g (N, C_out, OH, OW) -> (C_out, C_in/groups, kH, kW) where
    (kH, kW) = `kernel_size`.
    """
    name = "conv2d_grad_weight"

    def check(self, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        attrs = self._check_common(stride, padding, dilation, groups)
        attrs["kernel_size"] = pair(tuple(kernel_size), "kernel_size", 1)
        return attrs

    def infer(self, types, kernel_size, stride, padding, dilation, groups):
        x, g = types
        dtype = _float_out(x.dtype, g.dtype)
        for t, what in ((x, "input (N, C_in, H, W)"), (g, "output gradient (N, C_out, OH, OW)")):
            if t.ndim != 4:
                raise ValueError(f"{what} must be 4-D, got {shape_str(t.shape)}")
            concrete_dims(t.shape, what.split(" (")[0])
        same_batch(x.shape[0], g.shape[0], f"input {shape_str(x.shape)}, output gradient "
                                           f"{shape_str(g.shape)}")
        c_in, c_out = x.shape[1], g.shape[1]
        if c_in % groups or c_out % groups:
            raise ValueError(f"channels C_in={c_in} (input {shape_str(x.shape)}) and C_out="
                             f"{c_out} (output gradient {shape_str(g.shape)}) must be "
                             f"divisible by groups={groups}")
        ohw = self._out_hw(x.shape[2:], kernel_size, stride, padding, dilation)
        if ohw != tuple(g.shape[2:]):
            raise ValueError(f"input {shape_str(x.shape)} with kernel {kernel_size} gives outputs "
                             f"of size {ohw}, but the output gradient is {shape_str(g.shape)}")
        return TensorType(dtype, (c_out, c_in // groups) + tuple(kernel_size))

    def evaluate(self, x, g, kernel_size, stride, padding, dilation, groups):
        dtype = dt.promote(x.dtype, g.dtype)
        x, g = x.astype(dtype, copy=False), g.astype(dtype, copy=False)
        n, c_in, _, _ = x.shape
        _, c_out, oh, ow = g.shape
        kh, kw = kernel_size
        gs = groups
        cg, og = c_in // gs, c_out // gs
        cols = im2col(x, padding, (kh, kw), stride, dilation, (oh, ow), gs)  # (G, K, P)
        gm = g.reshape(n, gs, og, oh * ow).transpose(1, 2, 0, 3).reshape(gs, og, n * oh * ow)
        dw = np.matmul(gm, cols.transpose(0, 2, 1))                           # (G, Og, K)
        return np.ascontiguousarray(dw.reshape(c_out, cg, kh, kw), dtype=dtype)

    def vjp(self, node, h):
        # dw = B_x^T g  =>  <h, dw> = <conv2d(x, h), g>
        x, g = node.inputs
        a = {k: v for k, v in node.attrs.items() if k != "kernel_size"}
        return [conv2d_grad_input(g, h, x.shape[2:], **a) if dt.is_float(x.dtype) else None,
                conv2d_op(x, h, **a) if dt.is_float(g.dtype) else None]


# ------------------------------------------------------------------ user functions
def conv2d_op(x, weight, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """The bare conv2d op (no bias, numeric padding only)."""
    return apply("conv2d", [x, weight], stride=stride, padding=padding, dilation=dilation,
                 groups=groups)


def _resolve_padding(padding, weight, stride, dilation):
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    if padding != "same":
        raise GraphBuildError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got "
                              f"{padding!r}\n  at {user_location()}")
    try:
        st, dil = pair(stride, "stride", 1), pair(dilation, "dilation", 1)
    except (TypeError, ValueError) as e:
        raise GraphBuildError(f"conv2d: {e}\n  at {user_location()}") from None
    if st != (1, 1):
        raise GraphBuildError(f"conv2d: padding='same' needs stride 1, got stride {stride!r} "
                              f"(weight {shape_str(weight.shape)})\n  at {user_location()}")
    if weight.ndim != 4 or any(isinstance(d, str) for d in weight.shape):
        return padding  # let the type rule report the bad weight
    pads = []
    for a in (0, 1):
        total = dil[a] * (weight.shape[2 + a] - 1)
        pads.append((total // 2, total - total // 2))  # odd total: the extra row/col at the end
    return tuple(pads)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) of NCHW `x` with OIHW `weight`.

    stride, dilation: int or (h, w).  padding: int, (h, w), ((top, bottom),
    (left, right)), "valid" (no padding) or "same" (output size = input size;
    stride 1 only; for even kernels the extra row/column goes at the bottom/
    right, as in PyTorch).  groups: split channels into independent groups
    (groups = C_in = C_out is a depthwise convolution).  bias: (C_out,) added
    per channel by a broadcast add.
    """
    if isinstance(padding, str):
        from .base import as_node
        weight = as_node(weight, x.dtype if isinstance(x, Node) else None)
        padding = _resolve_padding(padding, weight, stride, dilation)
    y = apply("conv2d", [x, weight], stride=stride, padding=padding, dilation=dilation,
              groups=groups)
    if bias is not None:
        from .base import as_node
        from .shape import reshape
        bias = as_node(bias, y.dtype)
        if bias.shape != (y.shape[1],):
            raise GraphBuildError(f"conv2d: bias must have shape ({y.shape[1]},) (one per output "
                                  f"channel), got {shape_str(bias.shape)}\n  at {user_location()}")
        y = y + reshape(bias, (1, y.shape[1], 1, 1))
    return y


def conv2d_grad_input(g, weight, input_size, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its input (a transposed convolution)."""
    return apply("conv2d_grad_input", [g, weight], input_size=tuple(input_size), stride=stride,
                 padding=padding, dilation=dilation, groups=groups)


def conv2d_grad_weight(x, g, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its weight."""
    return apply("conv2d_grad_weight", [x, g], kernel_size=tuple(kernel_size), stride=stride,
                 padding=padding, dilation=dilation, groups=groups)
