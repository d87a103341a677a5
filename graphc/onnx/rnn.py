"""ONNX RNN, GRU and LSTM as gc.scan loops, in ONNX's own layout.

ONNX stacks the gate weights per direction: W [D, G·H, I], R [D, G·H, H],
B [D, 2·G·H] = [Wb; Rb], with gate order i,o,f,c for LSTM and z,r,h for GRU
(unlike PyTorch's i,f,g,o and r,z,n).  The input projection X·Wᵀ + Wb is
hoisted out of the loop; the loop carries h (and c).  With sequence_lens,
steps past a sequence's length keep its state and emit zeros, which also
gives the reverse direction its per-sequence start.
"""
from __future__ import annotations

import numpy as np

import graphc as gc

from ..ir.node import Node
from .op_table import op

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _activation(ctx, name, alpha, beta):
    n = name.lower()
    if n == "sigmoid":
        return gc.sigmoid
    if n == "tanh":
        return gc.tanh
    if n == "relu":
        return gc.relu
    if n == "leakyrelu":
        a = 0.01 if alpha is None else alpha
        return lambda x: gc.leaky_relu(x, a)
    if n == "hardsigmoid":
        a = 0.2 if alpha is None else alpha
        b = 0.5 if beta is None else beta
        return lambda x: gc.minimum(gc.maximum(x * a + b, 0.0), 1.0)
    if n == "affine":
        return lambda x: x * alpha + beta
    if n == "scaledtanh":
        return lambda x: gc.tanh(x * beta) * alpha
    raise ctx.error(f"recurrent activation {name!r} is not supported")


def _recurrence(ctx, kind, args, attrs):
    x, w, r = ctx.node(args[0]), ctx.node(args[1]), ctx.node(args[2])
    b = args[3] if len(args) > 3 else None
    seq_lens = args[4] if len(args) > 4 else None
    h0 = args[5] if len(args) > 5 else None
    c0 = args[6] if len(args) > 6 and kind == "LSTM" else None
    peep = args[7] if len(args) > 7 and kind == "LSTM" else None
    hidden = int(attrs["hidden_size"]) if "hidden_size" in attrs else int(r.shape[2])
    direction = attrs.get("direction", "forward")
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    layout = int(attrs.get("layout", 0))
    clip = attrs.get("clip")
    g = _GATES[kind]
    acts = attrs.get("activations") or _DEFAULT_ACTS[kind] * len(dirs)
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    per = len(_DEFAULT_ACTS[kind])
    if kind == "LSTM" and attrs.get("input_forget", 0):
        raise ctx.error("LSTM input_forget=1 is not supported")
    if layout:
        x = gc.transpose(x, (1, 0, 2))
        if h0 is not None:
            h0 = gc.transpose(ctx.node(h0), (1, 0, 2))
        if c0 is not None:
            c0 = gc.transpose(ctx.node(c0), (1, 0, 2))
    t_len = x.shape[0]
    if isinstance(t_len, str):
        raise ctx.error("the sequence length must be concrete; specialize the model")
    mask = None
    if seq_lens is not None:
        if isinstance(seq_lens, Node):
            lens = seq_lens
        else:
            arr = np.asarray(seq_lens)
            lens = None if (arr == t_len).all() else gc.constant(arr.astype(np.int64),
                                                                   dtype="int64")
        if lens is not None:
            ctx.check_size((t_len,), np.int64, "the RNN's time steps")
            steps = gc.constant(np.arange(t_len, dtype=np.int64).reshape(t_len, 1), dtype="int64")
            mask = gc.unsqueeze(gc.cast(gc.less(steps, gc.cast(lens, "int64")), x.dtype), 2)
    zeros_bh = gc.matmul(gc.zeros_like(x[0]), gc.constant(np.zeros((x.shape[2], hidden),
                                                                   x.dtype), dtype=x.dtype))
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(dirs):
        k = d * per
        fs = [_activation(ctx, acts[k + j], alphas[k + j] if k + j < len(alphas) else None,
                          betas[k + j] if k + j < len(betas) else None) for j in range(per)]
        wd, rd = w[d], r[d]  # (G·H, I), (G·H, H)
        xw = gc.matmul(x, gc.transpose(wd))  # (T, B, G·H)
        rb = None
        if b is not None:
            bd = ctx.node(b)[d]
            wb, rb = bd[:g * hidden], bd[g * hidden:]
            if kind == "GRU" and attrs.get("linear_before_reset", 0):
                # Rb's h-gate part stays inside r ⊙ (·) below.
                xw = xw + wb + gc.concat([rb[:2 * hidden],
                                          gc.zeros_like(rb[2 * hidden:])], axis=0)
            else:
                xw = xw + wb + rb
        rt = gc.transpose(rd)  # (H, G·H)
        h_init = ctx.node(h0)[d] if h0 is not None else zeros_bh
        c_init = (ctx.node(c0)[d] if c0 is not None else zeros_bh) if kind == "LSTM" else None
        p = ctx.node(peep)[d] if peep is not None else None
        lbr = bool(attrs.get("linear_before_reset", 0))

        def gate(v, j):
            return v[:, j * hidden:(j + 1) * hidden]

        def clipped(v):
            return v if clip is None else gc.minimum(gc.maximum(v, -float(clip)), float(clip))

        def cell(h, c, xt):
            if kind == "RNN":
                return fs[0](clipped(xt + gc.matmul(h, rt))), None
            if kind == "GRU":
                hr = gc.matmul(h, rt[:, :2 * hidden])
                z = fs[0](clipped(gate(xt, 0) + gate(hr, 0)))
                rr = fs[0](clipped(gate(xt, 1) + gate(hr, 1)))
                rh = rt[:, 2 * hidden:]
                if lbr:
                    hh = gc.matmul(h, rh)
                    if rb is not None:
                        hh = hh + rb[2 * hidden:]
                    n = fs[1](clipped(gate(xt, 2) + rr * hh))
                else:
                    n = fs[1](clipped(gate(xt, 2) + gc.matmul(rr * h, rh)))
                return (1.0 - z) * n + z * h, None
            pre = xt + gc.matmul(h, rt)  # LSTM, gate order i, o, f, c
            pi, po, pf, pc = (gate(pre, j) for j in range(4))
            if p is not None:
                pi = pi + p[:hidden] * c
                pf = pf + p[2 * hidden:] * c
            i_ = fs[0](clipped(pi))
            f_ = fs[0](clipped(pf))
            cc = fs[1](clipped(pc))
            c_new = f_ * c + i_ * cc
            if p is not None:
                po = po + p[hidden:2 * hidden] * c_new
            o_ = fs[0](clipped(po))
            return o_ * fs[2](c_new), c_new

        def step(carry, xs):
            h, c = carry if kind == "LSTM" else (carry, None)
            xt, m = xs if mask is not None else (xs, None)
            h_new, c_new = cell(h, c, xt)
            if m is not None:
                y = h_new * m
                h_new = y + h * (1.0 - m)
                if c_new is not None:
                    c_new = c_new * m + c * (1.0 - m)
            else:
                y = h_new
            return ((h_new, c_new) if kind == "LSTM" else h_new), y

        init = (h_init, c_init) if kind == "LSTM" else h_init
        seq = (xw, mask) if mask is not None else xw
        final, y = gc.scan(step, init, seq, reverse=reverse)
        if kind == "LSTM":
            hs.append(final[0])
            cs.append(final[1])
        else:
            hs.append(final)
        ys.append(y)  # (T, B, H)
    y_all = gc.stack(ys, axis=1)  # (T, D, B, H)
    h_all = gc.stack(hs, axis=0)  # (D, B, H)
    c_all = gc.stack(cs, axis=0) if kind == "LSTM" else None
    if layout:
        y_all = gc.transpose(y_all, (2, 0, 1, 3))
        h_all = gc.transpose(h_all, (1, 0, 2))
        if c_all is not None:
            c_all = gc.transpose(c_all, (1, 0, 2))
    return [y_all, h_all] + ([c_all] if kind == "LSTM" else [])


@op("RNN")
def _rnn(ctx, args, attrs):
    return _recurrence(ctx, "RNN", args, attrs)


@op("GRU")
def _gru(ctx, args, attrs):
    return _recurrence(ctx, "GRU", args, attrs)


@op("LSTM")
def _lstm(ctx, args, attrs):
    return _recurrence(ctx, "LSTM", args, attrs)
