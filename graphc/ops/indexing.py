"""Indexing and shape manipulation: x[...], take/embedding, squeeze/unsqueeze,
concat/stack/split, pad, tile/repeat and one_hot.

Basic indexing (`x[1, ::2, None, ...]`) is resolved at build time into one
`slice` node, whose attribute `spec` holds, per input axis, either None (the
whole axis, which is how a symbolic dimension survives) or a normalized
`(start, step, count)` triple, followed by a `reshape` that drops the axes an
int index removed and inserts the new ones.  The gradient of `slice` is a
`pad` node: the cotangent placed at the same strided positions inside an
array of the input's shape filled with a constant, and the gradient of `pad`
is `slice` again, so derivatives of any order stay inside these two ops.

Integer-array ("advanced") indexing is `take(x, indices, axis)`, whose
gradient `take_grad` scatter-adds into zeros; indices are bounds-checked when
the graph runs and never wrap.
"""
from __future__ import annotations

import numbers
from math import prod

import numpy as np

from ..ir import dtypes as dt
from ..ir.errors import GraphBuildError, index_out_of_range
from ..ir.node import Node, TensorType, user_location
from ..ir.shapes import normalize_axis, normalize_shape, shape_str
from .base import Op, apply, as_node, register
from .shape import broadcast_to, reshape

__all__ = ["getitem", "take", "gather", "embedding", "squeeze", "unsqueeze", "expand_dims",
           "concat", "concatenate", "stack", "split", "pad", "tile", "repeat", "one_hot"]


# ------------------------------------------------------------------ helpers
def _build_error(op: str, msg: str, inputs=()) -> GraphBuildError:
    """A GraphBuildError for checks made outside `apply` (same format as apply's)."""
    desc = ", ".join(f"{n.label()}: {n.type}" for n in inputs if isinstance(n, Node))
    return GraphBuildError(f"{op}: {msg}\n  inputs: {desc}\n  at {user_location()}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_spec(spec) -> tuple:
    """Normalize a slice spec: per axis None or (start, step, count) ints."""
    out = []
    for s in spec:
        if s is None:
            out.append(None)
            continue
        start, step, count = (int(v) for v in s)
        if step == 0:
            raise ValueError("slice step cannot be zero")
        if count < 0:
            raise ValueError(f"slice count {count} is negative")
        out.append((start, step, count))
    return tuple(out)


def _spec_in_range(spec_axis, dim: int) -> bool:
    start, step, count = spec_axis
    if count == 0:
        return True
    last = start + step * (count - 1)
    return 0 <= start < dim and 0 <= last < dim


def _py_slices(spec) -> tuple:
    """NumPy slice objects selecting what `spec` selects."""
    out = []
    for s in spec:
        if s is None:
            out.append(slice(None))
            continue
        start, step, count = s
        if count == 0:
            out.append(slice(0, 0))
            continue
        stop = start + step * (count - 1) + (1 if step > 0 else -1)
        out.append(slice(start, None if stop < 0 else stop, step))
    return tuple(out)


def _canonical(spec, shape) -> tuple:
    """Replace axis specs that select a whole concrete axis in order by None."""
    out = []
    for s, d in zip(spec, shape):
        if s is not None and isinstance(d, int) and s == (0, 1, d):
            s = None
        elif s is not None and s[2] == 0:
            s = (0, 1, 0)
        out.append(s)
    return tuple(out)


def _slice(x: Node, spec) -> Node:
    spec = _canonical(spec, x.shape)
    if all(s is None for s in spec):
        return x
    return apply("slice", [x], spec=spec)


def _pad_node(x: Node, spec, shape, value=0.0) -> Node:
    spec = _canonical(spec, shape)
    if all(s is None for s in spec) and tuple(shape) == tuple(x.shape):
        return x
    return apply("pad", [x], spec=spec, shape=tuple(shape), value=value)


# ------------------------------------------------------------------ slice / pad ops
@register
class SliceOp(Op):
    """Strided slice: per axis None (whole axis) or (start, step, count)."""
    name = "slice"
    arity = 1

    def check(self, spec):
        return {"spec": _check_spec(spec)}

    def infer(self, types, spec):
        (x,) = types
        if len(spec) != x.ndim:
            raise ValueError(f"spec has {len(spec)} entries for a tensor of rank {x.ndim}")
        shape = []
        for axis, (s, d) in enumerate(zip(spec, x.shape)):
            if s is None:
                shape.append(d)
                continue
            if isinstance(d, str):
                raise ValueError(f"cannot slice symbolic dimension {d!r} (axis {axis}); only "
                                 "a full slice ':' keeps a symbolic dimension")
            if not _spec_in_range(s, d):
                raise ValueError(f"slice (start {s[0]}, step {s[1]}, count {s[2]}) is out of "
                                 f"range for axis {axis} of size {d}")
            shape.append(s[2])
        return TensorType(x.dtype, tuple(shape))

    def evaluate(self, x, spec):
        return x[_py_slices(spec)].copy()

    def vjp(self, node, g):
        (x,) = node.inputs
        if not dt.is_float(x.dtype):
            return [None]
        return [_pad_node(g, node.attrs["spec"], x.shape, 0.0)]


@register
class PadOp(Op):
    """Place x at the strided positions `spec` of a `value`-filled array of `shape`.

    Constant padding is the case of unit steps; with general steps this is the
    gradient of `slice` (and `slice` is its gradient).
    """
    name = "pad"
    arity = 1
    shape_attrs = ("shape",)

    def check(self, spec, shape, value=0.0):
        if not isinstance(value, numbers.Real) or isinstance(value, np.ndarray):
            raise TypeError(f"pad value must be a real number, got {value!r}")
        value = bool(value) if isinstance(value, (bool, np.bool_)) else (
            int(value) if _is_int(value) else float(value))
        return {"spec": _check_spec(spec), "shape": normalize_shape(shape), "value": value}

    def infer(self, types, spec, shape, value):
        (x,) = types
        if not (len(spec) == len(shape) == x.ndim):
            raise ValueError(f"spec and shape must have one entry per axis of the rank-{x.ndim} "
                             f"input, got {len(spec)} and {len(shape)}")
        if dt.is_int(x.dtype) and not float(value).is_integer():
            raise ValueError(f"pad value {value} cannot be stored in an {x.dtype} tensor")
        for axis, (s, d, out) in enumerate(zip(spec, x.shape, shape)):
            if s is None:
                if d != out and isinstance(d, int) and isinstance(out, int):
                    raise ValueError(f"axis {axis}: input size {d} != output size {out}")
                continue
            if isinstance(out, str):
                raise ValueError(f"cannot place values inside symbolic dimension {out!r} "
                                 f"(axis {axis})")
            if isinstance(d, int) and d != s[2]:
                raise ValueError(f"axis {axis}: input size {d} != slice count {s[2]}")
            if not _spec_in_range(s, out):
                raise ValueError(f"placement (start {s[0]}, step {s[1]}, count {s[2]}) is out "
                                 f"of range for axis {axis} of size {out}")
        return TensorType(x.dtype, tuple(shape))

    def evaluate(self, x, spec, shape, value):
        concrete = tuple(x.shape[i] if s is None else shape[i] for i, s in enumerate(spec))
        out = np.full(concrete, value, dtype=x.dtype)
        out[_py_slices(spec)] = x
        return out

    def vjp(self, node, g):
        (x,) = node.inputs
        if not dt.is_float(x.dtype):
            return [None]
        return [_slice(g, node.attrs["spec"])]


# ------------------------------------------------------------------ getitem
class IndexBuildError(GraphBuildError, IndexError):
    """An int index out of range.  Also an IndexError, so that iterating over a
    tensor (`a, b, c = x`) stops at the end of its first axis as in NumPy."""


def _index_error(msg, x, cls=GraphBuildError):
    err = _build_error("getitem", msg, [x])
    return err if cls is GraphBuildError else cls(str(err))


def getitem(x, index) -> Node:
    """Basic indexing x[index]: ints (negative too), slices (any step), None, Ellipsis.

    Integer arrays and boolean masks are not basic indexing: use gc.take.
    """
    x = as_node(x)
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, Node):
            raise _index_error("indexing with a tensor is not supported by x[...]; use "
                               "gc.take(x, indices, axis) for integer-array indexing", x)
        if isinstance(it, (bool, np.bool_)):
            raise _index_error(f"boolean index {it!r} is not supported", x)
        if not (it is None or it is Ellipsis or isinstance(it, slice) or _is_int(it)):
            raise _index_error(f"unsupported index {it!r} of type {type(it).__name__}; "
                               "x[...] takes ints, slices, None and ...; use gc.take for "
                               "integer arrays", x)
    if sum(1 for it in items if it is Ellipsis) > 1:
        raise _index_error("an index can only have a single ellipsis ('...')", x)
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    if consumed > x.ndim:
        raise _index_error(f"too many indices ({consumed}) for a tensor of rank {x.ndim}", x)
    if Ellipsis in items:
        k = next(i for i, it in enumerate(items) if it is Ellipsis)
        items = items[:k] + (slice(None),) * (x.ndim - consumed) + items[k + 1:]
    else:
        items = items + (slice(None),) * (x.ndim - consumed)

    spec, out_shape, axis = [], [], 0
    for it in items:
        if it is None:
            out_shape.append(1)
            continue
        d = x.shape[axis]
        if _is_int(it):
            i = int(it)
            if isinstance(d, str):
                raise _index_error(f"cannot index symbolic dimension {d!r} (axis {axis}) with "
                                   f"an int; only a full slice ':' keeps a symbolic dimension", x)
            if not -d <= i < d:
                raise _index_error(f"index {i} is out of range for axis {axis} of size {d}", x,
                                   IndexBuildError)
            spec.append((i % d, 1, 1))
        else:
            for part in (it.start, it.stop, it.step):
                if part is not None and not _is_int(part):
                    raise _index_error(f"slice bounds must be ints or None, got {it!r}", x)
            if isinstance(d, str):
                if it.start not in (None, 0) or it.stop is not None or it.step not in (None, 1):
                    raise _index_error(
                        f"cannot slice symbolic dimension {d!r} (axis {axis}) with "
                        f"{it.start}:{it.stop}:{it.step}; only a full slice ':' keeps a "
                        "symbolic dimension", x)
                spec.append(None)
                out_shape.append(d)
            else:
                if it.step == 0:
                    raise _index_error(f"slice step cannot be zero (axis {axis})", x)
                r = range(*it.indices(d))
                spec.append((r.start, r.step, len(r)) if len(r) else (0, 1, 0))
                out_shape.append(len(r))
        axis += 1
    y = _slice(x, spec)
    return reshape(y, tuple(out_shape))


# ------------------------------------------------------------------ take / take_grad
def check_index_range(op: str, values, size: int, what: str = "", kind: str = "index",
                      ignore=None):
    """Raise IndexOutOfRangeError if a value of `values` lies outside [0, size) (values
    equal to `ignore` are allowed).  The reference's check; the native backends run
    the same test in their check kernels and word the error the same way."""
    v = np.asarray(values)
    if v.size == 0:
        return
    flat = v.reshape(-1)
    if ignore is None and int(flat.min()) >= 0 and int(flat.max()) < size:
        return
    bad = (flat < 0) | (flat >= size)
    if ignore is not None:
        bad &= flat != ignore
    if not bad.any():
        return
    first = int(np.argmax(bad))
    badv = flat[bad]
    raise index_out_of_range(op, size, shape=v.shape, count=int(bad.sum()), lo=int(badv.min()),
                             hi=int(badv.max()), first_pos=first, first_value=int(flat[first]),
                             kind=kind, what=what, ignore=ignore)


def _check_index_dtype(t):
    if t.dtype not in (dt.int32, dt.int64):
        raise TypeError(f"indices must be int32 or int64, got {t.dtype}")


@register
class TakeOp(Op):
    """Integer-array indexing along one axis (out-of-range indices raise)."""
    name = "take"
    arity = 2

    def check(self, axis=0):
        if not _is_int(axis):
            raise TypeError(f"axis must be an int, got {axis!r}")
        return {"axis": int(axis)}

    def infer(self, types, axis):
        x, idx = types
        _check_index_dtype(idx)
        if not 0 <= axis < x.ndim:
            raise ValueError(f"axis {axis} is out of range for a tensor of rank {x.ndim}")
        return TensorType(x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:])

    def evaluate(self, x, indices, axis):
        check_index_range(self.name, indices, x.shape[axis], f"axis {axis} of size {x.shape[axis]}")
        return np.take(x, indices, axis=axis)

    def vjp(self, node, g):
        x, idx = node.inputs
        if not dt.is_float(x.dtype):
            return [None, None]
        return [apply("take_grad", [g, idx, x], axis=node.attrs["axis"]), None]


@register
class TakeGradOp(Op):
    """Scatter-add g into zeros shaped like `like` at `indices` along `axis`.

    The gradient of take.  `like` (take's x) only supplies the shape, read when
    the graph runs so that a symbolic size of the indexed axis works too.
    """
    name = "take_grad"
    arity = 3

    def check(self, axis):
        return {"axis": int(axis)}

    def infer(self, types, axis):
        g, idx, like = types
        _check_index_dtype(idx)
        shape = like.shape
        expect = shape[:axis] + idx.shape + shape[axis + 1:]
        if len(expect) != g.ndim or any(isinstance(a, int) and isinstance(b, int) and a != b
                                        for a, b in zip(expect, g.shape)):
            raise ValueError(f"cotangent shape {shape_str(g.shape)} does not match "
                             f"{shape_str(expect)}")
        return TensorType(g.dtype, shape)

    def evaluate(self, g, indices, like, axis):
        n = like.shape[axis]
        check_index_range(self.name, indices, n, f"axis {axis} of size {n}")
        out = np.zeros(like.shape, dtype=g.dtype)
        np.add.at(out, (slice(None),) * axis + (indices,), g)
        return out

    def vjp(self, node, g):
        _, idx, _ = node.inputs
        return [take(g, idx, axis=node.attrs["axis"]), None, None]


def take(x, indices, axis=0) -> Node:
    """x's entries at integer `indices` along `axis`.

    Output shape: x.shape[:axis] + indices.shape + x.shape[axis+1:].  Indices
    must lie in [0, x.shape[axis]); others raise IndexOutOfRangeError (a GraphcError
    and an IndexError) when the graph runs, on every backend, whether the indices are
    fed or computed in the graph (they never wrap).  The gradient scatter-adds, so
    repeated indices accumulate.
    """
    x = as_node(x)
    if not isinstance(indices, Node):
        indices = as_node(np.asarray(indices))
    if not _is_int(axis):
        raise _build_error("take", f"axis must be an int, got {axis!r}", [x, indices])
    if not -x.ndim <= axis < x.ndim:
        raise _build_error("take", f"axis {axis} is out of range for a tensor of rank "
                                   f"{x.ndim}", [x, indices])
    return apply("take", [x, indices], axis=int(axis) % x.ndim)


gather = take  # ONNX Gather semantics (not torch.gather)


def embedding(indices, weight) -> Node:
    """Rows of `weight` (num_embeddings, dim) picked by integer `indices`."""
    return take(weight, indices, axis=0)


# ------------------------------------------------------------------ squeeze / unsqueeze
def squeeze(x, axis=None) -> Node:
    """Remove size-1 axes (all concrete ones when axis is None)."""
    x = as_node(x)
    if axis is None:
        axes = {i for i, d in enumerate(x.shape) if d == 1}
    else:
        try:
            axes = {normalize_axis(a, x.ndim, "squeeze")
                    for a in ((axis,) if _is_int(axis) else tuple(axis))}
        except (TypeError, ValueError) as e:
            raise _build_error("squeeze", str(e).removeprefix("squeeze: "), [x]) from None
        for a in sorted(axes):
            if x.shape[a] != 1:
                raise _build_error("squeeze", f"cannot squeeze axis {a} of size {x.shape[a]!r}; "
                                              "only size-1 axes can be removed", [x])
    return reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def unsqueeze(x, axis) -> Node:
    """Insert size-1 axes at `axis` (int or tuple, positions in the result)."""
    x = as_node(x)
    axes = (axis,) if _is_int(axis) else tuple(axis)
    nd = x.ndim + len(axes)
    try:
        axes = {normalize_axis(a, nd, "unsqueeze") for a in axes}
    except (TypeError, ValueError) as e:
        raise _build_error("unsqueeze", str(e).removeprefix("unsqueeze: "), [x]) from None
    if len(axes) != nd - x.ndim:
        raise _build_error("unsqueeze", f"repeated axis in {axis}", [x])
    it = iter(x.shape)
    return reshape(x, tuple(1 if i in axes else next(it) for i in range(nd)))


expand_dims = unsqueeze


# ------------------------------------------------------------------ concat / stack / split
@register
class ConcatOp(Op):
    """Join tensors along an existing axis (dtypes promote)."""
    name = "concat"
    arity = None

    def check(self, axis=0):
        if not _is_int(axis):
            raise TypeError(f"axis must be an int, got {axis!r}")
        return {"axis": int(axis)}

    def infer(self, types, axis):
        if not types:
            raise ValueError("needs at least one input")
        first = types[0]
        if not 0 <= axis < first.ndim:
            raise ValueError(f"axis {axis} is out of range for a tensor of rank {first.ndim}")
        shape = list(first.shape)
        for k, t in enumerate(types[1:], 1):
            if t.ndim != first.ndim:
                raise ValueError(f"input {k} has rank {t.ndim} (shape {shape_str(t.shape)}), "
                                 f"input 0 has rank {first.ndim} (shape {shape_str(first.shape)})")
            for i, d in enumerate(t.shape):
                if i == axis:
                    continue
                if d != shape[i]:
                    if isinstance(d, str) and isinstance(shape[i], int):
                        continue  # re-checked once the symbol is bound
                    if isinstance(shape[i], str) and isinstance(d, int):
                        shape[i] = d
                        continue
                    raise ValueError(f"input {k} has shape {shape_str(t.shape)}, which does not "
                                     f"match input 0's {shape_str(first.shape)} on axis {i} "
                                     f"(only axis {axis}, the concatenation axis, may differ)")
        sizes = [t.shape[axis] for t in types]
        sym = [(k, d) for k, d in enumerate(sizes) if isinstance(d, str)]
        if sym:
            if len(types) == 1:
                shape[axis] = sym[0][1]
            else:
                raise ValueError(f"input {sym[0][0]} has symbolic size {sym[0][1]!r} on the "
                                 f"concatenation axis {axis}; concatenated sizes must be "
                                 "concrete")
        else:
            shape[axis] = sum(sizes)
        return TensorType(dt.promote(*(t.dtype for t in types)), tuple(shape))

    def evaluate(self, *arrays, axis):
        out_dtype = dt.promote(*(a.dtype for a in arrays))
        return np.concatenate([a.astype(out_dtype, copy=False) for a in arrays], axis=axis)

    def vjp(self, node, g):
        axis = node.attrs["axis"]
        grads, offset = [], 0
        for x in node.inputs:
            n = x.shape[axis]
            if dt.is_float(x.dtype):
                spec = [None] * x.ndim
                spec[axis] = (offset, 1, n) if n else (0, 1, 0)
                if len(node.inputs) == 1:
                    spec[axis] = None
                grads.append(_slice(g, spec))
            else:
                grads.append(None)
            offset += n if isinstance(n, int) else 0
        return grads


def _as_nodes(op, tensors):
    if isinstance(tensors, Node) or not isinstance(tensors, (list, tuple)):
        raise _build_error(op, f"expects a list or tuple of tensors, got "
                               f"{type(tensors).__name__}", [tensors] if isinstance(tensors, Node)
                           else [])
    if not tensors:
        raise _build_error(op, "needs at least one tensor")
    like = next((t.dtype for t in tensors if isinstance(t, Node)), None)
    return [as_node(t, like) for t in tensors]


def concat(tensors, axis=0) -> Node:
    """Join a list of tensors along an existing axis (negative axis allowed)."""
    nodes = _as_nodes("concat", tensors)
    nd = nodes[0].ndim
    if not _is_int(axis) or not -nd <= axis < max(nd, 1) or nd == 0:
        raise _build_error("concat", f"axis {axis!r} is out of range for tensors of rank {nd}",
                           nodes)
    return apply("concat", nodes, axis=int(axis) % nd)


concatenate = concat


def stack(tensors, axis=0) -> Node:
    """Join same-shaped tensors along a new axis."""
    nodes = _as_nodes("stack", tensors)
    nd = nodes[0].ndim
    if not _is_int(axis) or not -(nd + 1) <= axis <= nd:
        raise _build_error("stack", f"axis {axis!r} is out of range for a result of rank "
                                    f"{nd + 1}", nodes)
    for k, t in enumerate(nodes[1:], 1):
        # an int against a symbol is re-checked by concat once the symbol is bound
        if t.ndim != nd or any(a != b and type(a) is type(b)
                               for a, b in zip(t.shape, nodes[0].shape)):
            raise _build_error("stack", f"all inputs must have the same shape: input {k} has "
                                        f"{shape_str(t.shape)}, input 0 has "
                                        f"{shape_str(nodes[0].shape)}", nodes)
    axis = int(axis) % (nd + 1)
    return apply("concat", [unsqueeze(t, axis) for t in nodes], axis=axis)


def split(x, sizes_or_sections, axis=0) -> list:
    """Split along `axis`: an int n gives n equal parts, a list gives parts of those sizes."""
    x = as_node(x)
    try:
        ax = normalize_axis(axis, x.ndim, "split")
    except (TypeError, ValueError) as e:
        raise _build_error("split", str(e).removeprefix("split: "), [x]) from None
    d = x.shape[ax]
    if isinstance(d, str):
        raise _build_error("split", f"cannot split symbolic dimension {d!r} (axis {ax})", [x])
    if _is_int(sizes_or_sections):
        n = int(sizes_or_sections)
        if n <= 0 or d % n:
            raise _build_error("split", f"axis {ax} of size {d} cannot be split into {n} equal "
                                        "sections", [x])
        sizes = [d // n] * n
    else:
        sizes = [int(s) for s in sizes_or_sections]
        if any(s < 0 for s in sizes) or sum(sizes) != d:
            raise _build_error("split", f"sizes {sizes} must be non-negative and sum to the size "
                                        f"{d} of axis {ax}", [x])
    parts, offset = [], 0
    for s in sizes:
        parts.append(getitem(x, (slice(None),) * ax + (slice(offset, offset + s),)))
        offset += s
    return parts


# ------------------------------------------------------------------ pad / tile / repeat
def _pad_widths(pad_width, ndim):
    """numpy-style pad_width → tuple of (before, after) ints, one per axis."""
    if _is_int(pad_width):
        pairs = [(pad_width, pad_width)] * ndim
    else:
        pw = list(pad_width)
        if len(pw) == 2 and all(_is_int(p) for p in pw):
            pairs = [tuple(pw)] * ndim
        elif len(pw) == 1 and not _is_int(pw[0]):
            pairs = [tuple(pw[0])] * ndim
        else:
            pairs = [tuple(p) for p in pw]
    if len(pairs) != ndim or any(len(p) != 2 or not all(_is_int(v) for v in p) for p in pairs):
        raise ValueError(f"pad_width {pad_width!r} must be an int, a (before, after) pair, or "
                         f"{ndim} such pairs of ints")
    if any(v < 0 for p in pairs for v in p):
        raise ValueError(f"pad_width {pad_width!r} has a negative width")
    return tuple((int(b), int(a)) for b, a in pairs)


def pad(x, pad_width, value=0.0) -> Node:
    """Constant padding; pad_width as in numpy.pad (int, pair, or per-axis pairs)."""
    x = as_node(x)
    try:
        pairs = _pad_widths(pad_width, x.ndim)
    except ValueError as e:
        raise _build_error("pad", str(e), [x]) from None
    spec, shape = [], []
    for axis, ((b, a), d) in enumerate(zip(pairs, x.shape)):
        if b == a == 0:
            spec.append(None)
            shape.append(d)
        elif isinstance(d, str):
            raise _build_error("pad", f"cannot pad symbolic dimension {d!r} (axis {axis})", [x])
        else:
            spec.append((b, 1, d))
            shape.append(b + d + a)
    return _pad_node(x, spec, shape, value)


def tile(x, reps) -> Node:
    """Repeat the whole tensor `reps[i]` times along each axis (numpy.tile)."""
    x = as_node(x)
    reps = (reps,) if _is_int(reps) else tuple(reps)
    if any(not _is_int(r) or r < 0 for r in reps):
        raise _build_error("tile", f"reps {reps} must be non-negative ints", [x])
    if len(reps) < x.ndim:
        reps = (1,) * (x.ndim - len(reps)) + reps
    elif len(reps) > x.ndim:
        x = reshape(x, (1,) * (len(reps) - x.ndim) + tuple(x.shape))
    if all(r == 1 for r in reps):
        return x
    for i, (r, d) in enumerate(zip(reps, x.shape)):
        if r != 1 and isinstance(d, str):
            raise _build_error("tile", f"cannot tile symbolic dimension {d!r} (axis {i})", [x])
    inter = tuple(v for r, d in zip(reps, x.shape) for v in (1, d))
    wide = tuple(v for r, d in zip(reps, x.shape) for v in (r, d))
    y = broadcast_to(reshape(x, inter), wide)
    return reshape(y, tuple(d if r == 1 else r * d for r, d in zip(reps, x.shape)))


def repeat(x, repeats, axis=None) -> Node:
    """Repeat each element `repeats` times along `axis` (flattened when None), like numpy."""
    x = as_node(x)
    if not _is_int(repeats) or repeats < 0:
        raise _build_error("repeat", f"repeats must be a non-negative int, got {repeats!r}", [x])
    if axis is None:
        if x.ndim != 1:
            if any(isinstance(d, str) for d in x.shape):
                raise _build_error("repeat", "cannot flatten a tensor with symbolic dimensions",
                                   [x])
            x = reshape(x, (prod(x.shape),))
        axis = 0
    try:
        ax = normalize_axis(axis, x.ndim, "repeat")
    except (TypeError, ValueError) as e:
        raise _build_error("repeat", str(e).removeprefix("repeat: "), [x]) from None
    d = x.shape[ax]
    if repeats == 1:
        return x
    if isinstance(d, str):
        raise _build_error("repeat", f"cannot repeat along symbolic dimension {d!r}", [x])
    s = tuple(x.shape)
    y = broadcast_to(reshape(x, s[:ax + 1] + (1,) + s[ax + 1:]),
                     s[:ax + 1] + (repeats,) + s[ax + 1:])
    return reshape(y, s[:ax] + (d * repeats,) + s[ax + 1:])


# ------------------------------------------------------------------ one_hot
@register
class OneHotOp(Op):
    """indices → indices.shape + (num_classes,) with a 1 at each index (out of range raises)."""
    name = "one_hot"
    arity = 1
    differentiable = False

    def check(self, num_classes, dtype="float32"):
        if not _is_int(num_classes) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        return {"num_classes": int(num_classes), "dtype": str(dt.as_dtype(dtype))}

    def infer(self, types, num_classes, dtype):
        (idx,) = types
        _check_index_dtype(idx)
        return TensorType(dtype, idx.shape + (num_classes,))

    def evaluate(self, indices, num_classes, dtype):
        check_index_range(self.name, indices, num_classes, f"num_classes={num_classes}")
        return (indices[..., None] == np.arange(num_classes)).astype(dtype)

    def vjp(self, node, g):
        return [None]


# ------------------------------------------------------------------ index_check
@register
class IndexCheckOp(Op):
    """indices unchanged, after checking that each lies in [0, size) or equals `ignore`.

    For gradient rules that read indices through elementwise ops (cross-entropy's
    one-hot target): routed through this node, a graph that holds only the gradient
    checks them too, and an error names the op `for_op` (the loss), as that op's own
    check would.  Backends alias its output to its input and run only the check.
    """
    name = "index_check"
    arity = 1
    differentiable = False

    def check(self, size, for_op, kind="index", what="", ignore=None):
        if not _is_int(size) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if kind not in ("index", "label"):
            raise ValueError(f"kind must be 'index' or 'label', got {kind!r}")
        if ignore is not None and not _is_int(ignore):
            raise TypeError(f"ignore must be an int or None, got {ignore!r}")
        if ignore is not None and not -2 ** 63 <= ignore < 2 ** 63:
            raise ValueError(f"ignore {ignore} does not fit in int64")
        return {"size": int(size), "for_op": str(for_op), "kind": kind, "what": str(what),
                "ignore": None if ignore is None else int(ignore)}

    def infer(self, types, size, for_op, kind, what, ignore):
        (idx,) = types
        _check_index_dtype(idx)
        return idx

    def evaluate(self, indices, size, for_op, kind, what, ignore):
        check_index_range(for_op, indices, size, what, kind, ignore)
        return indices

    def vjp(self, node, g):
        return [None]


def index_check(indices, size, for_op, kind="index", what="", ignore=None) -> Node:
    """`indices`, checked when the graph runs to lie in [0, size) (or equal `ignore`);
    an error names `for_op`."""
    return apply("index_check", [as_node(indices)], size=size, for_op=for_op, kind=kind,
                 what=what, ignore=ignore)


def one_hot(indices, num_classes, dtype="float32") -> Node:
    if not isinstance(indices, Node):
        indices = as_node(np.asarray(indices))
    return apply("one_hot", [indices], num_classes=num_classes, dtype=dtype)
