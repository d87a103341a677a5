"""ONNX convolution and pooling operators → graphc's 2-D conv2d / pool ops.

1-D data (N, C, L) is lifted to 2-D as (N, C, 1, L).  ONNX pads are per side
and may be asymmetric or exceed half the kernel; graphc's pools take one pad
per axis, so those cases pad explicitly and crop to ONNX's output size.
"""
from __future__ import annotations

import numpy as np

import graphc as gc

from .op_table import _concrete, op


def _spatial_to_2d(ctx, x, what):
    """(x as 4-D, whether a 1-D layout was lifted)."""
    if x.ndim == 4:
        return x, False
    if x.ndim == 3:
        return gc.unsqueeze(x, 2), True
    raise ctx.error(f"{what} supports 1-D, 2-D (and for Conv and pools 3-D) spatial data, "
                    f"got shape {tuple(x.shape)}")


def _pads_2d(ctx, attrs, in_hw, k_hw, strides, dilations, lifted, transposed=False):
    """((top, bottom), (left, right)) from ONNX pads/auto_pad."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i, s, k, d in zip(in_hw, strides, k_hw, dilations):
            if isinstance(i, str):
                raise ctx.error("auto_pad SAME needs concrete spatial sizes")
            out = -(-i // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - i, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return tuple(pads)
    if auto == "VALID":
        return ((0, 0), (0, 0))
    p = list(attrs.get("pads", [0] * (2 * (1 if lifted else 2))))
    if lifted:
        return ((0, 0), (p[0], p[1]))
    return ((p[0], p[2]), (p[1], p[3]))


def _lift_attr(attrs, name, default, lifted, n=2):
    v = list(attrs.get(name, [default] * (1 if lifted else n)))
    return tuple([default] + v) if lifted else tuple(v)


@op("Conv")
def _conv(ctx, args, attrs):
    x, w = ctx.node(args[0]), ctx.node(args[1])
    if x.ndim == 5:
        return _conv3d(ctx, x, w, args[2] if len(args) > 2 else None, attrs)
    x, lifted = _spatial_to_2d(ctx, x, "Conv")
    if lifted:
        w = gc.unsqueeze(w, 2)
    k_hw = tuple(w.shape[2:])
    strides = _lift_attr(attrs, "strides", 1, lifted)
    dil = _lift_attr(attrs, "dilations", 1, lifted)
    pads = _pads_2d(ctx, attrs, x.shape[2:], k_hw, strides, dil, lifted)
    y = gc.conv2d(x, w, stride=strides, padding=pads, dilation=dil,
                  groups=int(attrs.get("group", 1)))
    if len(args) > 2 and args[2] is not None:
        b = ctx.node(args[2])
        y = y + gc.reshape(b, (1, b.shape[0], 1, 1))
    return gc.squeeze(y, 2) if lifted else y


@op("ConvTranspose")
def _conv_transpose(ctx, args, attrs):
    x, w = ctx.node(args[0]), ctx.node(args[1])
    x, lifted = _spatial_to_2d(ctx, x, "ConvTranspose")
    if lifted:
        w = gc.unsqueeze(w, 2)
    groups = int(attrs.get("group", 1))
    in_hw = _concrete(ctx, x.shape[2:], "ConvTranspose's input")
    k_hw = tuple(w.shape[2:])
    strides = _lift_attr(attrs, "strides", 1, lifted)
    dil = _lift_attr(attrs, "dilations", 1, lifted)
    out_pad = _lift_attr(attrs, "output_padding", 0, lifted)
    natural = [s * (i - 1) + op_ + (k - 1) * d + 1
               for i, s, k, d, op_ in zip(in_hw, strides, k_hw, dil, out_pad)]
    auto = attrs.get("auto_pad", "NOTSET")
    want = None
    if "output_shape" in attrs:
        want = list(attrs["output_shape"])[-(1 if lifted else 2):]
        want = ([1] + want) if lifted else want
    if want is not None and auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for nat, o in zip(natural, want):
            total = nat - o
            if auto == "SAME_UPPER":
                pads.append((total // 2, total - total // 2))
            else:
                pads.append((total - total // 2, total // 2))
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for nat, i, s in zip(natural, in_hw, strides):
            total = nat - i * s
            if auto == "SAME_UPPER":
                pads.append((total // 2, total - total // 2))
            else:
                pads.append((total - total // 2, total // 2))
    elif auto == "VALID":
        pads = [(0, 0), (0, 0)]
    else:
        p = list(attrs.get("pads", [0] * (2 if lifted else 4)))
        pads = [(0, 0), (p[0], p[1])] if lifted else [(p[0], p[2]), (p[1], p[3])]
    # Negative padding (an output_shape beyond the natural size) adds zero rows/columns.
    grow = [(max(-b, 0), max(-a, 0)) for b, a in pads]
    pads = tuple((max(b, 0), max(a, 0)) for b, a in pads)
    out_hw = tuple(n - b - a for n, (b, a) in zip(natural, pads))
    y = gc.conv2d_grad_input(x, w, out_hw, stride=strides, padding=pads, dilation=dil,
                             groups=groups)
    if want is not None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        # NOTSET with output_shape: explicit pads, the output extended (or cut) at the end
        for a, (o, have) in enumerate(zip(want, out_hw)):
            b, e = grow[a]
            grow[a] = (b, e + max(o - have - b - e, 0))
            if o < have:
                idx = [slice(None)] * 4
                idx[2 + a] = slice(0, o)
                y = y[tuple(idx)]
    if any(g != (0, 0) for g in grow):
        y = gc.pad(y, ((0, 0), (0, 0)) + tuple(grow))
    if len(args) > 2 and args[2] is not None:
        b = ctx.node(args[2])
        y = y + gc.reshape(b, (1, b.shape[0], 1, 1))
    return gc.squeeze(y, 2) if lifted else y


def _pool_geometry(ctx, attrs, x, lifted):
    k = _lift_attr(attrs, "kernel_shape", 1, lifted)
    strides = _lift_attr(attrs, "strides", 1, lifted)
    dil = _lift_attr(attrs, "dilations", 1, lifted)
    pads = _pads_2d(ctx, attrs, x.shape[2:], k, strides, dil, lifted)
    return k, strides, dil, pads


def _onnx_pool_out(i, k, s, d, pads, ceil_mode):
    span = i + pads[0] + pads[1] - ((k - 1) * d + 1)
    if ceil_mode:
        o = -(-span // s) + 1
        if (o - 1) * s >= i + pads[0]:
            o -= 1
        return o
    return span // s + 1


def _pool(ctx, args, attrs, kind):
    x = ctx.node(args[0])
    if x.ndim == 5:
        return _pool3d(ctx, x, attrs, kind)
    x, lifted = _spatial_to_2d(ctx, x, kind)
    k, strides, dil, pads = _pool_geometry(ctx, attrs, x, lifted)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    symmetric = all(b == a and 2 * b <= kk for (b, a), kk in zip(pads, k))
    if kind == "AveragePool" and any(d != 1 for d in dil):
        y = _avg_pool_dilated(ctx, x, k, strides, dil, pads, ceil_mode,
                              bool(attrs.get("count_include_pad", 0)))
        return gc.squeeze(y, 2) if lifted else y
    if symmetric:
        p = tuple(b for b, _ in pads)
        if kind == "MaxPool":
            y = gc.max_pool2d(x, k, strides, p, dil, ceil_mode)
        else:
            y = gc.avg_pool2d(x, k, strides, p, bool(attrs.get("count_include_pad", 0)),
                              ceil_mode)
    else:
        hw = _concrete(ctx, x.shape[2:], kind)
        width = ((0, 0), (0, 0)) + tuple(pads)
        if kind == "MaxPool":
            y = gc.max_pool2d(gc.pad(x, width, value=-np.inf), k, strides, 0, dil, ceil_mode)
        else:
            xp = gc.pad(x, width)
            y = gc.avg_pool2d(xp, k, strides, 0, False, ceil_mode)
            if not attrs.get("count_include_pad", 0):
                ctx.check_size((1, 1) + tuple(y.shape[2:]), x.dtype, "AveragePool's count")
                ctx.check_size((1, 1) + tuple(xp.shape[2:]), x.dtype, "AveragePool's mask")
                ones = gc.pad(gc.constant(np.ones((1, 1) + hw, x.dtype), dtype=x.dtype), width)
                y = y / gc.avg_pool2d(ones, k, strides, 0, False, ceil_mode)
        want = tuple(_onnx_pool_out(i, kk, s, d, p, ceil_mode)
                     for i, kk, s, d, p in zip(hw, k, strides, dil, pads))
        if tuple(y.shape[2:]) != want:
            y = y[:, :, :want[0], :want[1]]
    return gc.squeeze(y, 2) if lifted else y


def _avg_pool_dilated(ctx, x, k, strides, dil, pads, ceil_mode, count_include_pad):
    """A dilated average pool as a depthwise convolution with a ones kernel, divided by
    the number of counted positions (a convolution of the padding mask)."""
    hw = _concrete(ctx, x.shape[2:], "AveragePool with dilations")
    c = x.shape[1]
    if isinstance(c, str):
        raise ctx.error("AveragePool with dilations needs a concrete channel count")
    want = [_onnx_pool_out(i, kk, s, d, p, ceil_mode)
            for i, kk, s, d, p in zip(hw, k, strides, dil, pads)]
    # extra zeros at the end so the last (ceil-mode) window fits; never counted
    extra = [max(0, (o - 1) * s + (kk - 1) * d + 1 - (i + p[0] + p[1]))
             for o, s, kk, d, i, p in zip(want, strides, k, dil, hw, pads)]
    width = tuple((b, a + e) for (b, a), e in zip(pads, extra))
    dtype = x.dtype

    def window_sum(v, channels):
        w = gc.constant(np.ones((channels, 1) + tuple(k), dtype), dtype=dtype)
        return gc.conv2d(v, w, stride=strides, dilation=dil, groups=channels)
    total = window_sum(gc.pad(x, ((0, 0), (0, 0)) + width), c)
    ctx.check_size((1, 1) + tuple(h + b + a for h, (b, a) in zip(hw, width)), dtype,
                   "AveragePool's padding mask")
    ctx.check_size((c if isinstance(c, int) else 1, 1) + tuple(k), dtype, "AveragePool's window")
    if count_include_pad:
        inside = np.ones((1, 1) + tuple(i + p[0] + p[1] for i, p in zip(hw, pads)), dtype)
        mask = np.pad(inside, ((0, 0), (0, 0)) + tuple((0, e) for e in extra))
    else:
        mask = np.pad(np.ones((1, 1) + hw, dtype), ((0, 0), (0, 0)) + width)
    count = window_sum(gc.constant(mask, dtype=dtype), 1)
    y = total / count
    if tuple(y.shape[2:]) != tuple(want):
        y = y[:, :, :want[0], :want[1]]
    return y


@op("MaxPool")
def _max_pool(ctx, args, attrs):
    if attrs.get("storage_order", 0):
        raise ctx.error("MaxPool storage_order=1 is not supported")
    return [_pool(ctx, args, attrs, "MaxPool"), None]


@op("AveragePool")
def _avg_pool(ctx, args, attrs):
    return _pool(ctx, args, attrs, "AveragePool")


@op("GlobalAveragePool")
def _global_avg_pool(ctx, args, attrs):
    x = ctx.node(args[0])
    return gc.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@op("GlobalMaxPool")
def _global_max_pool(ctx, args, attrs):
    x = ctx.node(args[0])
    return gc.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


# ---------------------------------------------------------------- 3-D (volumetric) data
# graphc's conv/pool ops are 2-D; 3-D ones are built from them: the depth axis is
# unrolled over the kernel's depth taps (strided depth slices), the 2-D op runs on
# each, and the taps are summed (Conv), maxed (MaxPool) or summed and divided by
# the number of counted positions (AveragePool).
def _pads_nd(ctx, attrs, sizes, k, strides, dil):
    auto = attrs.get("auto_pad", "NOTSET")
    n = len(sizes)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i, s_, kk, d in zip(_concrete(ctx, sizes, "auto_pad SAME"), strides, k, dil):
            total = max((-(-i // s_) - 1) * s_ + (kk - 1) * d + 1 - i, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    p = list(attrs.get("pads", [0] * (2 * n)))
    return [(p[i], p[i + n]) for i in range(n)]


def _depth_taps(x, taps, dilation, stride, count):
    """For each depth tap j: x[:, :, j·dilation :: stride][:count] (N, C, count, H, W)."""
    return [x[:, :, j * dilation: j * dilation + stride * (count - 1) + 1: stride]
            for j in range(taps)]


def _conv3d(ctx, x, w, b, attrs):
    n, c = x.shape[:2]
    if isinstance(n, str):
        raise ctx.error("3-D Conv needs a concrete batch size; specialize with dims=")
    size = _concrete(ctx, x.shape[2:], "3-D Conv")
    k = tuple(w.shape[2:])
    strides = tuple(attrs.get("strides", [1, 1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1, 1]))
    pads = _pads_nd(ctx, attrs, size, k, strides, dil)
    if pads[0] != (0, 0):
        x = gc.pad(x, ((0, 0), (0, 0), pads[0], (0, 0), (0, 0)))
    dp = size[0] + sum(pads[0])
    d_out = (dp - ((k[0] - 1) * dil[0] + 1)) // strides[0] + 1
    total = None
    for j, sl in enumerate(_depth_taps(x, k[0], dil[0], strides[0], d_out)):
        flat = gc.reshape(gc.transpose(sl, (0, 2, 1, 3, 4)), (n * d_out, c) + size[1:])
        y = gc.conv2d(flat, w[:, :, j], stride=strides[1:], padding=tuple(pads[1:]),
                      dilation=dil[1:], groups=int(attrs.get("group", 1)))
        total = y if total is None else total + y
    o = w.shape[0]
    y = gc.transpose(gc.reshape(total, (n, d_out, o) + tuple(total.shape[2:])), (0, 2, 1, 3, 4))
    if b is not None:
        y = y + gc.reshape(ctx.node(b), (1, o, 1, 1, 1))
    return y


def _pool3d(ctx, x, attrs, kind):
    c = x.shape[1]
    size = _concrete(ctx, x.shape[2:], f"3-D {kind}")
    if isinstance(c, str):
        raise ctx.error(f"3-D {kind} needs a concrete channel count")
    k = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", [1, 1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1, 1]))
    pads = _pads_nd(ctx, attrs, size, k, strides, dil)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    want = [_onnx_pool_out(i, kk, s_, d, p, ceil_mode)
            for i, kk, s_, d, p in zip(size, k, strides, dil, pads)]
    extra = [max(0, (o - 1) * s_ + (kk - 1) * d + 1 - (i + p[0] + p[1]))
             for o, s_, kk, d, i, p in zip(want, strides, k, dil, size, pads)]
    width = ((0, 0), (0, 0)) + tuple((b, a + e) for (b, a), e in zip(pads, extra))
    padded = tuple(i + b + a for i, (b, a) in zip(size, width[2:]))

    def planes(v, channels):  # (M, channels, want_d, H, W) -> (M, channels·want_d, H, W)
        return gc.reshape(v, (v.shape[0], channels * want[0]) + padded[1:])

    def crop(y, channels):  # (M, C·want_d, h, w) -> (M, C, want_d, want_h, want_w)
        y = y[:, :, :want[1], :want[2]]
        return gc.reshape(y, (y.shape[0], channels, want[0]) + tuple(want[1:]))
    if kind == "MaxPool":
        taps = _depth_taps(gc.pad(x, width, value=-np.inf), k[0], dil[0], strides[0], want[0])
        m = taps[0]
        for t in taps[1:]:
            m = gc.maximum(m, t)
        return crop(gc.max_pool2d(planes(m, c), k[1:], strides[1:], 0, dil[1:], False), c)

    def window_sum(v, channels):
        taps = _depth_taps(v, k[0], dil[0], strides[0], want[0])
        total = taps[0]
        for t in taps[1:]:
            total = total + t
        ones = gc.constant(np.ones((channels * want[0], 1) + k[1:], x.dtype), dtype=x.dtype)
        return crop(gc.conv2d(planes(total, channels), ones, stride=strides[1:],
                              dilation=dil[1:], groups=channels * want[0]), channels)
    ctx.check_size((1, 1) + padded, x.dtype, f"3-D {kind}'s padding mask")
    ctx.check_size((c * want[0], 1) + k[1:], x.dtype, f"3-D {kind}'s window")
    total = window_sum(gc.pad(x, width), c)
    if attrs.get("count_include_pad", 0):
        inside = np.ones((1, 1) + tuple(i + p[0] + p[1] for i, p in zip(size, pads)), x.dtype)
        mask = np.pad(inside, ((0, 0), (0, 0)) + tuple((0, e) for e in extra))
    else:
        mask = np.pad(np.ones((1, 1) + size, x.dtype), width)
    return total / window_sum(gc.constant(mask, dtype=x.dtype), 1)
