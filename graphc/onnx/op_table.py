"""ONNX operators → graphc ops: one small function per operator type.

Each converter is `f(ctx, args, attrs) -> output value or list of outputs`,
where args are the node's inputs in order (None for an omitted optional
input), each a NumPy array (known at load time) or a graphc node, and attrs
the node's attributes as Python values.  `ctx.opset` is the model's default
opset version, which selects the operator version's semantics (e.g. Softmax
before opset 13 flattens to 2-D; Squeeze's axes moved from an attribute to an
input in opset 13).

`SYMBOLIC` holds the few shape-arithmetic operators that also run on shape
values holding symbolic dimensions (object arrays of ints and symbol names).
"""
from __future__ import annotations

from math import prod

import numpy as np

import graphc as gc

from ..ir import dtypes as dt
from ..ir.node import Node
from ..ir.shapes import broadcast_shapes
from .importer import elem_dtype

OPS: dict = {}
SYMBOLIC: dict = {}


def op(*names):
    def deco(f):
        for n in names:
            OPS[n] = f
        return f
    return deco


def sym(*names):
    def deco(f):
        for n in names:
            SYMBOLIC[n] = f
        return f
    return deco


def _dtype(v):
    return v.dtype if isinstance(v, Node) else np.asarray(v).dtype


def _shape(v):
    return tuple(v.shape) if isinstance(v, Node) else np.shape(v)


def _concrete(ctx, shape, what):
    if any(isinstance(d, str) for d in shape):
        raise ctx.error(f"{what} needs concrete sizes, got {shape}; specialize the model with "
                        "gc.onnx.load(..., dims={symbol: size})")
    return tuple(shape)


def _const_like(value, like: Node):
    return gc.constant(np.asarray(value, dtype=like.dtype), dtype=like.dtype)


# ================================================================ elementwise
def _binary(fn):
    def conv(ctx, args, attrs):
        a, b = ctx.node(args[0]), ctx.node(args[1])
        if ctx.opset < 7 and attrs.get("broadcast", 0) and "axis" in attrs:
            # legacy broadcasting: b's dims align with a's starting at `axis`
            axis = attrs["axis"] % a.ndim
            b = gc.reshape(b, tuple(b.shape) + (1,) * (a.ndim - axis - b.ndim))
        return fn(a, b)
    return conv


op("Add")(_binary(gc.add))
op("Sub")(_binary(gc.sub))
op("Mul")(_binary(gc.mul))
op("Equal")(_binary(gc.equal))
op("Less")(_binary(gc.less))
op("LessOrEqual")(_binary(gc.less_equal))
op("Greater")(_binary(gc.greater))
op("GreaterOrEqual")(_binary(gc.greater_equal))


def _trunc_div(a, b):
    if a.dtype.kind == "f":
        return gc.div(a, b)
    # ONNX integer division truncates toward zero; graphc's div floors.
    q = gc.div(a, b)
    inexact = gc.not_equal(q * b, a)
    signs_differ = gc.not_equal(gc.less(a, 0), gc.less(b, 0))
    fix = gc.cast(inexact, a.dtype) * gc.cast(signs_differ, a.dtype)
    return q + fix


op("Div")(_binary(_trunc_div))


@op("Pow")
def _pow(ctx, args, attrs):
    a, b = ctx.node(args[0]), ctx.node(args[1])
    if b.dtype != a.dtype:
        b = gc.cast(b, a.dtype)
    return gc.pow(a, b)


def _variadic(fn):
    def conv(ctx, args, attrs):
        nodes = [ctx.node(a) for a in args if a is not None]
        out = nodes[0]
        for n in nodes[1:]:
            out = fn(out, n)
        return out
    return conv


op("Max")(_variadic(gc.maximum))
op("Min")(_variadic(gc.minimum))
op("Sum")(_variadic(gc.add))


@op("Mean")
def _mean(ctx, args, attrs):
    nodes = [a for a in args if a is not None]
    return _variadic(gc.add)(ctx, nodes, attrs) / float(len(nodes))


def _unary(fn):
    def conv(ctx, args, attrs):
        return fn(ctx.node(args[0]))
    return conv


for _name, _fn in {"Relu": gc.relu, "Sigmoid": gc.sigmoid, "Tanh": gc.tanh, "Exp": gc.exp,
                   "Log": gc.log, "Sqrt": gc.sqrt, "Neg": gc.neg, "Abs": gc.abs, "Erf": gc.erf,
                   "Reciprocal": gc.reciprocal, "Not": gc.logical_not,
                   "Sign": gc.sign}.items():
    op(_name)(_unary(_fn))


@op("Identity")
def _identity(ctx, args, attrs):
    return args[0]


@sym("Identity")
def _identity_sym(ctx, args, attrs):
    return args[0]


@op("LeakyRelu")
def _leaky_relu(ctx, args, attrs):
    return gc.leaky_relu(ctx.node(args[0]), float(attrs.get("alpha", 0.01)))


@op("Elu")
def _elu(ctx, args, attrs):
    return gc.elu(ctx.node(args[0]), float(attrs.get("alpha", 1.0)))


@op("Gelu")
def _gelu(ctx, args, attrs):
    return gc.gelu(ctx.node(args[0]), approximate=attrs.get("approximate", "none"))


@op("Clip")
def _clip(ctx, args, attrs):
    x = ctx.node(args[0])
    if ctx.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo = args[1] if len(args) > 1 else None
        hi = args[2] if len(args) > 2 else None
    if lo is not None:
        x = gc.maximum(x, lo if isinstance(lo, Node) else _const_like(lo, x))
    if hi is not None:
        x = gc.minimum(x, hi if isinstance(hi, Node) else _const_like(hi, x))
    return x


@op("Where")
def _where(ctx, args, attrs):
    return gc.where(ctx.node(args[0]), ctx.node(args[1]), ctx.node(args[2]))


@op("Cast")
def _cast(ctx, args, attrs):
    to = elem_dtype(int(attrs["to"]), "Cast's target type")
    if attrs.get("saturate", 1) != 1 and to.kind == "f":
        pass  # saturate only affects float8 targets
    x = ctx.node(args[0])
    if x.dtype == to:
        return x
    return gc.cast(x, to)


@sym("Cast")
def _cast_sym(ctx, args, attrs):
    to = elem_dtype(int(attrs["to"]), "Cast's target type")
    if to.kind != "i":
        raise ctx.error("a shape with symbolic dimensions cannot be cast to non-integers")
    return args[0]


@op("CastLike")
def _cast_like(ctx, args, attrs):
    x, like = ctx.node(args[0]), args[1]
    to = _dtype(like)
    return x if x.dtype == to else gc.cast(x, to)


# ================================================================ constants & shapes
@op("Constant")
def _constant(ctx, args, attrs):
    if "value" in attrs:
        arr = np.asarray(attrs["value"])
    elif "value_float" in attrs:
        arr = np.array(attrs["value_float"], np.float32)
    elif "value_floats" in attrs:
        arr = np.array(attrs["value_floats"], np.float32)
    elif "value_int" in attrs:
        arr = np.array(attrs["value_int"], np.int64)
    elif "value_ints" in attrs:
        arr = np.array(attrs["value_ints"], np.int64)
    else:
        raise ctx.error(f"unsupported Constant attribute(s) {sorted(attrs)}")
    if arr.dtype not in dt.SUPPORTED:
        raise ctx.error(f"constant of dtype {arr.dtype} is not supported by graphc")
    return arr


@op("Shape")
def _shape_op(ctx, args, attrs):
    shape = _shape(args[0])
    n = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", n)
    sl = list(shape)[slice(start, end)]
    if any(isinstance(d, str) for d in sl):
        return np.array(sl, dtype=object)
    return np.array(sl, dtype=np.int64)


SYMBOLIC["Shape"] = _shape_op


@op("Size")
def _size(ctx, args, attrs):
    shape = _concrete(ctx, _shape(args[0]), "Size")
    return np.array(prod(shape), np.int64)


@op("ConstantOfShape")
def _constant_of_shape(ctx, args, attrs):
    shape = ctx.ints(args[0], "ConstantOfShape's shape")
    val = np.asarray(attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    if val.dtype not in dt.SUPPORTED:
        raise ctx.error(f"value of dtype {val.dtype} is not supported by graphc")
    ctx.check_size(shape, val.dtype, "ConstantOfShape's output")
    return np.full(shape, val[0], dtype=val.dtype)


@op("Range")
def _range(ctx, args, attrs):
    s, l, d = (ctx.static(a, "Range's bounds") for a in args)
    if np.ndim(s) or np.ndim(l) or np.ndim(d):
        raise ctx.error(f"Range's start, limit and delta must be scalars, got shapes "
                        f"{np.shape(s)}, {np.shape(l)}, {np.shape(d)}")
    if d == 0:
        raise ctx.error("Range's delta is 0")
    # ONNX: max(ceil((limit - start) / delta), 0) elements (exact for integers)
    if np.asarray(s).dtype.kind in "iu":
        n = max(-(-(int(l) - int(s)) // int(d)), 0)
    else:
        n = max(int(np.ceil((float(l) - float(s)) / float(d))), 0)
    ctx.check_size((n,), np.asarray(s).dtype, "Range's output")
    return np.arange(s, l, d).astype(np.asarray(s).dtype)


# ================================================================ linear algebra
@op("MatMul")
def _matmul(ctx, args, attrs):
    return gc.matmul(ctx.node(args[0]), ctx.node(args[1]))


@op("Gemm")
def _gemm(ctx, args, attrs):
    a, b = ctx.node(args[0]), ctx.node(args[1])
    if attrs.get("transA", 0):
        a = gc.transpose(a)
    if attrs.get("transB", 0):
        b = gc.transpose(b)
    y = gc.matmul(a, b)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if len(args) > 2 and args[2] is not None:
        c = ctx.node(args[2])
        y = y + (c * beta if beta != 1.0 else c)
    return y


# ================================================================ normalization
def _channel(v, ndim):
    return gc.reshape(v, (1, v.shape[0]) + (1,) * (ndim - 2))


@op("BatchNormalization")
def _batch_norm(ctx, args, attrs):
    x, scale, bias, mean, var = (ctx.node(a) for a in args[:5])
    eps = float(attrs.get("epsilon", 1e-5))
    training = bool(attrs.get("training_mode", 0)) if ctx.opset >= 14 else False
    if ctx.opset < 7 and not attrs.get("is_test", 0):
        training = True
    if ctx.opset < 9 and attrs.get("spatial", 1) == 0:
        raise ctx.error("BatchNormalization spatial=0 is not supported")
    if not training:
        y = (x - _channel(mean, x.ndim)) * _channel(gc.reciprocal(gc.sqrt(var + eps)), x.ndim)
        return y * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    momentum = float(attrs.get("momentum", 0.9))
    red = tuple(i for i in range(x.ndim) if i != 1)
    bm = gc.mean(x, axis=red, keepdims=True)
    bv = gc.mean(gc.square(x - bm), axis=red, keepdims=True)
    y = (x - bm) * gc.reciprocal(gc.sqrt(bv + eps))
    y = y * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    c = (x.shape[1],)
    run_mean = mean * momentum + gc.reshape(bm, c) * (1 - momentum)
    run_var = var * momentum + gc.reshape(bv, c) * (1 - momentum)
    return [y, run_mean, run_var]


@op("LayerNormalization")
def _layer_norm(ctx, args, attrs):
    x = ctx.node(args[0])
    axis = int(attrs.get("axis", -1)) % x.ndim
    eps = float(attrs.get("epsilon", 1e-5))
    axes = tuple(range(axis, x.ndim))
    # graphc computes in x's dtype (float32 or float64), which is what stash_type=1
    # (float32 statistics) gives for float32 inputs.
    mu = gc.mean(x, axis=axes, keepdims=True)
    xc = x - mu
    var = gc.mean(gc.square(xc), axis=axes, keepdims=True)
    inv = gc.reciprocal(gc.sqrt(var + eps))
    y = xc * inv
    y = y * ctx.node(args[1])
    if len(args) > 2 and args[2] is not None:
        y = y + ctx.node(args[2])
    return [y, mu, inv]


@op("Dropout")
def _dropout(ctx, args, attrs):
    x = ctx.node(args[0])
    training = False
    if ctx.opset >= 12 and len(args) > 2 and args[2] is not None:
        training = bool(ctx.static(args[2], "Dropout's training_mode"))
    elif ctx.opset < 7 and not attrs.get("is_test", 0):
        training = True
    if training:
        ratio = ctx.static(args[1], "Dropout's ratio") if len(args) > 1 and \
            args[1] is not None else attrs.get("ratio", 0.5)
        if float(ratio) != 0.0:
            raise ctx.error("Dropout in training mode is random; graphc imports it only for "
                            "inference (training_mode false)")
    return [x, gc.ones_like(x, dtype="bool")]


# ================================================================ shape manipulation
@op("Flatten")
def _flatten(ctx, args, attrs):
    x = ctx.node(args[0])
    axis = int(attrs.get("axis", 1))
    if axis < 0:
        axis += x.ndim
    lead, trail = x.shape[:axis], x.shape[axis:]
    lsym = [d for d in lead if isinstance(d, str)]
    tsym = [d for d in trail if isinstance(d, str)]
    if not lsym and not tsym:
        return gc.reshape(x, (prod(lead), prod(trail)))
    if not tsym:
        if len(lsym) == 1 and all(d == 1 for d in lead if not isinstance(d, str)):
            return gc.reshape(x, (lsym[0], prod(trail)))
        raise ctx.error(f"cannot flatten {x.shape} at axis {axis} with symbolic dimensions")
    if not lsym and len(tsym) == 1 and all(d == 1 for d in trail if not isinstance(d, str)):
        return gc.reshape(x, (prod(lead), tsym[0]))
    raise ctx.error(f"cannot flatten {x.shape} at axis {axis} with symbolic dimensions")


def _reshape_target(ctx, in_shape, target, allowzero):
    out = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise ctx.error(f"reshape target {target}: 0 at axis {i} copies a dimension "
                                f"the input {in_shape} lacks")
            out.append(in_shape[i])
        else:
            out.append(d)
    return tuple(out)


@op("Reshape")
def _reshape(ctx, args, attrs):
    if ctx.opset < 5:
        target = list(attrs["shape"])
    else:
        target = ctx.ints(args[1], "Reshape's shape", allow_symbols=True)
    x = args[0]
    tgt = _reshape_target(ctx, _shape(x), target, attrs.get("allowzero", 0))
    if not isinstance(x, Node) and not any(isinstance(d, str) for d in tgt):
        return np.asarray(x).reshape(tgt)
    return gc.reshape(ctx.node(x), tgt)


@sym("Reshape")
def _reshape_sym(ctx, args, attrs):
    target = ctx.ints(args[1], "Reshape's shape")
    return np.asarray(args[0]).reshape(_reshape_target(ctx, _shape(args[0]), target,
                                                       attrs.get("allowzero", 0)))


@op("Transpose")
def _transpose(ctx, args, attrs):
    x = ctx.node(args[0])
    perm = attrs.get("perm")
    return gc.transpose(x, tuple(perm) if perm is not None else None)


@op("Concat")
def _concat(ctx, args, attrs):
    nodes = [ctx.node(a) for a in args if a is not None]
    return gc.concat(nodes, axis=int(attrs["axis"])) if len(nodes) > 1 else nodes[0]


@sym("Concat")
def _concat_sym(ctx, args, attrs):
    return np.concatenate([np.asarray(a, dtype=object) for a in args if a is not None],
                          axis=int(attrs["axis"]))


def _slice_params(ctx, args, attrs, rank):
    if ctx.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = ctx.ints(args[1], "Slice's starts")
        ends = ctx.ints(args[2], "Slice's ends")
        axes = ctx.ints(args[3], "Slice's axes") if len(args) > 3 and args[3] is not None \
            else list(range(len(starts)))
        steps = ctx.ints(args[4], "Slice's steps") if len(args) > 4 and args[4] is not None \
            else [1] * len(starts)
    return starts, ends, [a % rank for a in axes], steps


def _onnx_range(start, end, step, dim):
    """The indices ONNX's Slice selects along an axis of size `dim`."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return range(start, end, step)


def _slice_index(ctx, shape, starts, ends, axes, steps):
    index = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        d = shape[a]
        if isinstance(d, str):
            if s == 0 and st == 1 and e >= 2 ** 31 - 1:
                continue
            raise ctx.error(f"cannot slice symbolic dimension {d!r}; specialize the model")
        r = _onnx_range(s, e, st, d)
        if len(r) == 0:
            index[a] = slice(0, 0)
        else:
            stop = r.start + r.step * len(r)
            index[a] = slice(r.start, None if stop < 0 else stop, r.step)
    return tuple(index)


@op("Slice")
def _slice(ctx, args, attrs):
    x = args[0]
    shape = _shape(x)
    idx = _slice_index(ctx, shape, *_slice_params(ctx, args, attrs, len(shape)))
    if not isinstance(x, Node):
        return np.asarray(x)[idx]
    return x[idx]


SYMBOLIC["Slice"] = _slice


def _axes_arg(ctx, args, attrs, since, index=1):
    """Axes from the attribute (opset < since) or the input (opset >= since); None if absent."""
    if ctx.opset < since:
        a = attrs.get("axes")
        return None if a is None else [int(v) for v in a]
    if len(args) > index and args[index] is not None:
        return ctx.ints(args[index], "axes")
    return None


@op("Squeeze")
def _squeeze(ctx, args, attrs):
    x = args[0]
    shape = _shape(x)
    axes = _axes_arg(ctx, args, attrs, 13)
    if axes is None:
        _concrete(ctx, shape, "Squeeze without axes")
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [a % len(shape) for a in axes]
    if not isinstance(x, Node):
        return np.squeeze(np.asarray(x), tuple(axes))
    return gc.squeeze(x, tuple(axes))


SYMBOLIC["Squeeze"] = _squeeze


@op("Unsqueeze")
def _unsqueeze(ctx, args, attrs):
    x = args[0]
    axes = _axes_arg(ctx, args, attrs, 13)
    nd = len(_shape(x)) + len(axes)
    axes = tuple(sorted(a % nd for a in axes))
    if not isinstance(x, Node):
        return np.expand_dims(np.asarray(x), axes)
    return gc.unsqueeze(x, axes)


SYMBOLIC["Unsqueeze"] = _unsqueeze


@op("Gather")
def _gather(ctx, args, attrs):
    x, idx = args[0], args[1]
    axis = int(attrs.get("axis", 0))
    shape = _shape(x)
    axis %= len(shape)
    dim = shape[axis]
    if not isinstance(idx, Node):
        idx = np.asarray(idx).astype(np.int64)
        if isinstance(dim, int):
            idx = np.where(idx < 0, idx + dim, idx)
        elif (idx < 0).any():
            raise ctx.error("negative Gather indices into a symbolic dimension")
        if not isinstance(x, Node):
            return np.take(np.asarray(x), idx, axis=axis)
        return gc.take(x, gc.constant(idx, dtype="int64"), axis=axis)
    x = ctx.node(x)
    if isinstance(dim, str):
        raise ctx.error("Gather with run-time indices into a symbolic dimension")
    wrapped = gc.where(gc.less(idx, 0), idx + dim, idx)
    return gc.take(x, wrapped, axis=axis)


SYMBOLIC["Gather"] = _gather


@op("Expand")
def _expand(ctx, args, attrs):
    x = ctx.node(args[0])
    target = ctx.ints(args[1], "Expand's shape", allow_symbols=True)
    try:
        out = broadcast_shapes(tuple(x.shape), tuple(target))
    except ValueError as e:
        raise ctx.error(str(e)) from None
    if x.ndim < len(out):
        x = gc.reshape(x, (1,) * (len(out) - x.ndim) + tuple(x.shape))
    if tuple(x.shape) == tuple(out):
        return x
    return gc.broadcast_to(x, out)


@op("Tile")
def _tile(ctx, args, attrs):
    return gc.tile(ctx.node(args[0]), tuple(ctx.ints(args[1], "Tile's repeats")))


@op("Pad")
def _pad(ctx, args, attrs):
    x = ctx.node(args[0])
    if ctx.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        axes = list(range(x.ndim))
    else:
        pads = ctx.ints(args[1], "Pad's pads")
        value = 0
        if len(args) > 2 and args[2] is not None:
            v = ctx.static(args[2], "Pad's constant_value")
            value = v.reshape(-1)[0].item() if v.size else 0
        axes = ctx.ints(args[3], "Pad's axes") if len(args) > 3 and args[3] is not None \
            else list(range(x.ndim))
    mode = attrs.get("mode", "constant")
    k = len(axes)
    width = [[0, 0] for _ in range(x.ndim)]
    for j, a in enumerate(axes):
        width[a % x.ndim] = [pads[j], pads[j + k]]
    # negative pads crop
    crop = tuple(slice(-b if b < 0 else 0, (a if a < 0 else None)) for b, a in width)
    if any(b < 0 or a < 0 for b, a in width):
        x = x[crop]
        width = [[max(b, 0), max(a, 0)] for b, a in width]
    if mode == "constant":
        return gc.pad(x, [tuple(w) for w in width], value=float(value))
    if mode in ("edge", "reflect", "wrap"):
        for a, (b, e) in enumerate(width):
            if b == e == 0:
                continue
            n = x.shape[a]
            if isinstance(n, str):
                raise ctx.error(f"cannot pad symbolic dimension {n!r}")
            parts = []
            def piece(i):
                idx = [slice(None)] * x.ndim
                idx[a] = slice(i, i + 1)
                return x[tuple(idx)]
            if mode == "edge":
                # the edge row broadcast to the pad width (a list of `b` copies was
                # O(pad width) nodes at load time, unbounded for a huge pad)
                def edge(i, count):
                    p = piece(i)
                    return gc.broadcast_to(p, tuple(count if k == a else d
                                                    for k, d in enumerate(p.shape)))
                parts = ([edge(0, b)] if b else []) + [x] + ([edge(n - 1, e)] if e else [])
            elif mode == "wrap":
                if b > n or e > n:
                    raise ctx.error("wrap padding wider than the axis")
                parts = [piece(i) for i in range(n - b, n)] + [x] + [piece(i) for i in range(e)]
            else:
                if b >= n or e >= n:
                    raise ctx.error("reflect padding wider than the axis")
                parts = [piece(i) for i in range(b, 0, -1)] + [x] + \
                    [piece(n - 2 - i) for i in range(e)]
            x = gc.concat(parts, axis=a)
        return x
    raise ctx.error(f"Pad mode {mode!r} is not supported")


# ================================================================ softmax & reductions
def _softmax_like(fn):
    def conv(ctx, args, attrs):
        x = ctx.node(args[0])
        if ctx.opset >= 13:
            return fn(x, int(attrs.get("axis", -1)))
        axis = int(attrs.get("axis", 1)) % x.ndim
        if axis == x.ndim - 1:
            return fn(x, -1)
        trail = _concrete(ctx, x.shape[axis:], "Softmax before opset 13 (2-D coercion)")
        y = fn(gc.reshape(x, tuple(x.shape[:axis]) + (prod(trail),)), -1)
        return gc.reshape(y, tuple(x.shape))
    return conv


op("Softmax")(_softmax_like(gc.softmax))
op("LogSoftmax")(_softmax_like(gc.log_softmax))


def _reduce(fn, since):
    def conv(ctx, args, attrs):
        x = ctx.node(args[0])
        axes = _axes_arg(ctx, args, attrs, since)
        keep = bool(attrs.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if attrs.get("noop_with_empty_axes", 0) and ctx.opset >= since:
                return x
            axes = list(range(x.ndim))
        axes = tuple(sorted({a % x.ndim for a in axes})) if x.ndim else ()
        if x.ndim == 0:
            return x
        if fn is gc.max and any(x.shape[a] == 0 for a in axes):
            out = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keep else \
                tuple(d for i, d in enumerate(x.shape) if i not in axes)
            fill = False if x.dtype == dt.bool_ else \
                np.iinfo(x.dtype).min if x.dtype.kind == "i" else -np.inf
            out = _concrete(ctx, out, "ReduceMax")
            ctx.check_size(out, x.dtype, "ReduceMax's output over an empty axis")
            return gc.constant(np.full(out, fill, x.dtype),
                               dtype=x.dtype)
        return fn(x, axis=axes, keepdims=keep)
    return conv


op("ReduceSum")(_reduce(gc.sum, 13))
op("ReduceMean")(_reduce(gc.mean, 18))
op("ReduceMax")(_reduce(gc.max, 18))
op("ReduceMin")(_reduce(gc.min, 18))
op("ReduceLogSumExp")(_reduce(gc.logsumexp, 18))


@op("Softplus")
def _softplus(ctx, args, attrs):
    return gc.softplus(ctx.node(args[0]))


# ================================================================ losses
def _one_hot(t, n, dtype):
    """t[..., None] == arange(n) as `dtype` (elementwise ops, which fuse with their
    users), t checked first: an index outside [0, n) raises IndexOutOfRangeError
    when the graph runs, as gc.one_hot's would, rather than giving a zero row."""
    from ..ops.indexing import index_check
    t = index_check(t, n, "one_hot", what=f"num_classes={n}")
    classes = gc.constant(np.arange(n, dtype=t.dtype), dtype=t.dtype)
    return gc.cast(gc.equal(gc.unsqueeze(t, -1), classes), dtype)


def _nll(ctx, logp, target, weight, attrs):
    reduction = attrs.get("reduction", "mean")
    ignore = attrs.get("ignore_index")
    c = logp.shape[1]
    if isinstance(c, str):
        raise ctx.error("the class dimension must be concrete")
    t = ctx.node(target)
    valid = None
    if ignore is not None:
        valid = gc.not_equal(t, ignore)
        t = gc.where(valid, t, gc.zeros_like(t))
    ctx.check_size((c,), t.dtype, "the class indices of the one-hot target")
    oh = _one_hot(t, c, logp.dtype)  # (N, d..., C)
    nd = logp.ndim
    if nd > 2:
        oh = gc.transpose(oh, (0, nd - 1) + tuple(range(1, nd - 1)))
    picked = gc.sum(logp * oh, axis=1)
    if weight is not None:
        w = gc.sum(oh * gc.reshape(ctx.node(weight), (1, c) + (1,) * (nd - 2)), axis=1)
    else:
        w = None
    if valid is not None:
        m = gc.cast(valid, logp.dtype)
        w = m if w is None else w * m
    loss = -picked if w is None else -(picked * w)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return gc.sum(loss)
    if reduction != "mean":
        raise ctx.error(f"unknown reduction {reduction!r}")
    if w is None:
        return gc.mean(loss)
    return gc.sum(loss) / gc.sum(w)


@op("NegativeLogLikelihoodLoss")
def _nll_loss(ctx, args, attrs):
    weight = args[2] if len(args) > 2 else None
    return _nll(ctx, ctx.node(args[0]), args[1], weight, attrs)


@op("SoftmaxCrossEntropyLoss")
def _sce_loss(ctx, args, attrs):
    scores = ctx.node(args[0])
    weight = args[2] if len(args) > 2 else None
    logp = gc.log_softmax(scores, axis=1)
    return [_nll(ctx, logp, args[1], weight, attrs), logp]


@op("GatherElements")
def _gather_elements(ctx, args, attrs):
    x, idx = ctx.node(args[0]), ctx.node(args[1])
    axis = int(attrs.get("axis", 0)) % x.ndim
    n = x.shape[axis]
    if isinstance(n, str):
        raise ctx.error("GatherElements along a symbolic dimension")
    idx = gc.where(gc.less(idx, 0), idx + n, idx)
    # x at idx along `axis`: one-hot over the axis, multiply and sum.
    if any(a != b for i, (a, b) in enumerate(zip(x.shape, idx.shape)) if i != axis):
        lead = tuple(slice(0, d) for d in idx.shape)
        x = x[tuple(s if i != axis else slice(None) for i, s in enumerate(lead))]
    ctx.check_size((n,), idx.dtype, "GatherElements' index range")
    oh = _one_hot(idx, n, x.dtype if x.dtype.kind == "f" else dt.int64)
    xe = gc.unsqueeze(gc.transpose(x, tuple(i for i in range(x.ndim) if i != axis) + (axis,)),
                      axis)
    # xe: x with `axis` moved last, then a size-1 axis at `axis` to meet idx's extent
    prodt = (gc.cast(xe, oh.dtype) if xe.dtype != oh.dtype else xe) * oh
    out = gc.sum(prodt, axis=-1)
    return out if out.dtype == x.dtype else gc.cast(out, x.dtype)


from . import conv_ops as _conv_ops  # noqa: E402,F401  (registers Conv, pools, ...)
from . import rnn as _rnn  # noqa: E402,F401  (registers RNN, LSTM, GRU)
