"""Neural-network ops: softmax, log_softmax, logsumexp, losses, dropout and
normalization.

Primitives (each with type rule, NumPy reference and gradient rule):
  softmax, log_softmax, logsumexp   numerically stable (the max is subtracted);
  softmax_cross_entropy             fused, stable per-sample cross-entropy;
  nll                               per-sample negative log-likelihood;
  bce_with_logits                   stable per-element binary cross-entropy;
  dropout                           counter-based hash mask (see `dropout`).

Composites (plain functions of other ops, so autodiff and fusion see through
them): cross_entropy, nll_loss, mse_loss, l1_loss,
binary_cross_entropy_with_logits, batch_norm, layer_norm, dropout_mask.

Label checks: a label (that is not `ignore_index`) outside [0, C) raises
IndexOutOfRangeError naming the op when the graph runs, on every backend, for
the loss and for its gradient alone (whose rule routes the labels through an
`index_check` node).
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import dtypes as dt
from ..ir.errors import GraphBuildError
from ..ir.node import Node, TensorType, user_location
from ..ir.shapes import broadcast_shapes, normalize_axes, normalize_axis, shape_str
from . import elementwise as E
from . import reduce as R
from . import shape as S
from .base import Op, apply, as_node, constant, register
from .indexing import check_index_range, index_check

__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "nll_loss", "mse_loss",
           "l1_loss", "binary_cross_entropy_with_logits", "dropout", "dropout_mask",
           "batch_norm", "layer_norm"]


# ------------------------------------------------------------------ helpers
def _require_float(t: TensorType, what: str):
    if not dt.is_float(t.dtype):
        raise TypeError(f"{what} must be a float tensor, got {t.dtype}")


def _check_axis_attr(axis):
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    return axis


def _norm_axis(axis, ndim):
    """A non-negative axis when it is valid; otherwise unchanged, for the type rule to reject."""
    if isinstance(axis, int) and not isinstance(axis, bool) and -ndim <= axis < ndim:
        return axis % ndim
    return axis


def _keepdims_shape(shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _build_error(msg: str) -> GraphBuildError:
    """An error for a composite's bad arguments, pointing at the user's line."""
    return GraphBuildError(f"{msg}\n  at {user_location()}")


def _same_dim(a, b) -> bool:
    """Equal, or at least one symbolic (re-checked once the symbol is bound)."""
    return a == b or isinstance(a, str) or isinstance(b, str)


# ------------------------------------------------------------------ softmax family
class _SoftmaxBase(Op):
    arity = 1

    def check(self, axis=-1):
        return {"axis": _check_axis_attr(axis)}

    def infer(self, types, axis):
        (x,) = types
        _require_float(x, "input")
        if x.ndim == 0:
            raise ValueError("input must have at least one dimension")
        normalize_axis(axis, x.ndim, self.name)
        return x


@register
class SoftmaxOp(_SoftmaxBase):
    """exp(x) / sum(exp(x)) along `axis`, computed as exp(x - max) / sum(...)."""
    name = "softmax"

    def evaluate(self, x, axis):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
        e = np.exp(x - m)
        return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype, copy=False)

    def vjp(self, node, g):
        ax = node.attrs["axis"]
        s = node
        return [s * (g - R.sum(g * s, axis=ax, keepdims=True))]


@register
class LogSoftmaxOp(_SoftmaxBase):
    """x - logsumexp(x) along `axis`, computed stably."""
    name = "log_softmax"

    def evaluate(self, x, axis):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
        z = x - m
        return (z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))).astype(x.dtype,
                                                                                  copy=False)

    def vjp(self, node, g):
        ax = node.attrs["axis"]
        return [g - E.exp(node) * R.sum(g, axis=ax, keepdims=True)]


def softmax(x, axis=-1):
    """Softmax along `axis` (stable: large logits give finite results)."""
    x = as_node(x)
    return apply("softmax", [x], axis=_norm_axis(axis, x.ndim))


def log_softmax(x, axis=-1):
    """log(softmax(x)) along `axis`, without overflow or log(0) for large logits."""
    x = as_node(x)
    return apply("log_softmax", [x], axis=_norm_axis(axis, x.ndim))


@register
class LogsumexpOp(Op):
    """log(sum(exp(x))) over axes, computed as max + log(sum(exp(x - max)))."""
    name = "logsumexp"
    arity = 1

    def check(self, axis=None, keepdims=False):
        if axis is not None and not isinstance(axis, int):
            axis = tuple(axis)
        return {"axis": axis, "keepdims": bool(keepdims)}

    def infer(self, types, axis, keepdims):
        (x,) = types
        _require_float(x, "input")
        axes = normalize_axes(axis, x.ndim, self.name)
        if keepdims:
            return TensorType(x.dtype, _keepdims_shape(x.shape, axes))
        return TensorType(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes))

    def evaluate(self, x, axis, keepdims):
        axes = normalize_axes(axis, x.ndim, self.name)
        m = np.max(x, axis=axes, keepdims=True) if x.size else np.zeros(
            _keepdims_shape(x.shape, axes), x.dtype)
        m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
        out = m + np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True))
        if not keepdims:
            out = np.squeeze(out, axis=axes)
        return np.asarray(out, dtype=x.dtype)

    def vjp(self, node, g):
        (x,) = node.inputs
        axes = normalize_axes(node.attrs["axis"], x.ndim, self.name)
        kshape = _keepdims_shape(x.shape, axes)
        out = S.reshape(node, kshape)
        g = S.reshape(g, kshape)
        return [g * E.exp(x - out)]


def logsumexp(x, axis=None, keepdims=False):
    """Stable log(sum(exp(x))) over `axis` (all axes by default)."""
    return apply("logsumexp", [x], axis=axis, keepdims=keepdims)


# ------------------------------------------------------------------ classification losses
def _class_axis(ndim: int) -> int:
    """Class axis of logits: 1 for (N, C, d1, ...), 0 for unbatched (C,)."""
    return 1 if ndim >= 2 else 0


def _label_shape(logits_shape, cax):
    return tuple(d for i, d in enumerate(logits_shape) if i != cax)


def _check_labels(name, values, labels, ignore_index, cax):
    """Run-time check: every label that is not ignore_index lies in [0, C)."""
    n_classes = values.shape[cax]
    check_index_range(name, labels, n_classes, f"{n_classes} classes", "label", ignore_index)


def _checked_labels(node) -> Node:
    """The labels of a label-loss node, routed through a run-time range check named
    after the loss: its gradient reads them only through elementwise ops (the one-hot
    target), so a graph holding the gradient and not the loss still checks them."""
    scores, labels = node.inputs
    n_classes = scores.shape[_class_axis(scores.ndim)]
    chk = index_check(labels, n_classes, node.op.name, "label", f"{n_classes} classes",
                      node.attrs["ignore_index"])
    chk.loc = node.loc     # reported at the loss's line, as the loss's own check is
    return chk


def _onehot(labels: Node, n_classes: int, cax: int, dtype) -> Node:
    """one-hot of integer labels as graph ops, with the class axis inserted at `cax`."""
    lshape = tuple(labels.shape)
    expanded = S.reshape(labels, lshape[:cax] + (1,) + lshape[cax:])
    ids_shape = (1,) * cax + (n_classes,) + (1,) * (len(lshape) - cax)
    ids = constant(np.arange(n_classes, dtype=labels.dtype).reshape(ids_shape))
    return E.cast(E.equal(expanded, ids), dtype)


def _valid_mask(labels: Node, ignore_index, dtype) -> Node:
    return E.cast(E.not_equal(labels, constant(ignore_index, labels.dtype)), dtype)


class _LabelLossOp(Op):
    """(scores (N, C, d...), integer labels (N, d...)) → per-sample loss (N, d...)."""
    arity = 2

    def check(self, ignore_index=None, label_smoothing=0.0):
        if ignore_index is not None:
            if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
                raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
            ignore_index = int(ignore_index)
            if not -2 ** 63 <= ignore_index < 2 ** 63:
                raise ValueError(f"ignore_index {ignore_index} does not fit in int64")
        label_smoothing = float(label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        return {"ignore_index": ignore_index, "label_smoothing": label_smoothing}

    @staticmethod
    def _picked_loss(logp, labels, ignore_index, label_smoothing, dtype):
        """-logp[label] (classes on the last axis of logp), smoothed, 0 where ignored."""
        valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
        safe = np.where(valid, labels, 0).astype(np.int64)
        loss = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * np.mean(logp, axis=-1)
        return np.where(valid, loss, 0).astype(dtype)

    @staticmethod
    def _target_and_cotangent(node, g):
        """The smoothed one-hot target and g (masked for ignored labels) shaped to
        broadcast over the class axis: both gradient rules are built from them."""
        scores = node.inputs[0]
        labels = _checked_labels(node)
        eps, ii = node.attrs["label_smoothing"], node.attrs["ignore_index"]
        cax = _class_axis(scores.ndim)
        n_classes = scores.shape[cax]
        target = _onehot(labels, n_classes, cax, scores.dtype)
        if eps:
            target = target * (1.0 - eps) + eps / n_classes
        if ii is not None:
            g = g * _valid_mask(labels, ii, g.dtype)
        return target, S.reshape(g, _keepdims_shape(scores.shape, (cax,))), cax

    def infer(self, types, ignore_index, label_smoothing):
        x, y = types
        _require_float(x, "scores (first input)")
        if y.dtype not in (dt.int32, dt.int64):
            raise TypeError(f"labels must be int32 or int64 class indices, got {y.dtype}")
        if x.ndim == 0:
            raise ValueError("scores must have a class dimension: (C,), (N, C) or (N, C, d1, ...)")
        cax = _class_axis(x.ndim)
        if isinstance(x.shape[cax], str):
            raise ValueError(f"the class dimension (axis {cax}) must be a concrete size, "
                             f"got symbol {x.shape[cax]!r}")
        want = _label_shape(x.shape, cax)
        if len(want) != y.ndim or not all(_same_dim(a, b) for a, b in zip(want, y.shape)):
            raise ValueError(f"labels of shape {shape_str(y.shape)} do not match scores of shape "
                             f"{shape_str(x.shape)}: expected labels of shape {shape_str(want)}")
        # Prefer the concrete size where one side is symbolic.
        return TensorType(x.dtype, tuple(b if isinstance(a, str) else a
                                         for a, b in zip(want, y.shape)))


@register
class SoftmaxCrossEntropyOp(_LabelLossOp):
    """Per-sample -log softmax(logits)[label], fused and stable.

    With label_smoothing ε the target is (1-ε)·onehot + ε/C (as in PyTorch).
    Samples whose label equals ignore_index get loss 0 and gradient 0.
    Gradient wrt logits: (softmax(logits) - target) · g.
    """
    name = "softmax_cross_entropy"

    def evaluate(self, logits, labels, ignore_index, label_smoothing):
        cax = _class_axis(logits.ndim)
        _check_labels(self.name, logits, labels, ignore_index, cax)
        z = np.moveaxis(logits, cax, -1)
        m = np.max(z, axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0).astype(z.dtype)
        logp = (z - m) - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        return self._picked_loss(logp, labels, ignore_index, label_smoothing, logits.dtype)

    def vjp(self, node, g):
        target, gx, cax = self._target_and_cotangent(node, g)
        return [(softmax(node.inputs[0], axis=cax) - target) * gx, None]


@register
class NllOp(_LabelLossOp):
    """Per-sample -log_probs[label] (label_smoothing: mix in -mean over classes)."""
    name = "nll"

    def evaluate(self, logp, labels, ignore_index, label_smoothing):
        cax = _class_axis(logp.ndim)
        _check_labels(self.name, logp, labels, ignore_index, cax)
        z = np.moveaxis(logp, cax, -1)
        return self._picked_loss(z, labels, ignore_index, label_smoothing, logp.dtype)

    def vjp(self, node, g):
        target, gx, _ = self._target_and_cotangent(node, g)
        return [E.neg(target) * gx, None]


_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise _build_error(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce_label_loss(loss, labels, reduction, ignore_index):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return R.sum(loss)
    if ignore_index is None:
        return R.mean(loss)
    # Like PyTorch: average over the samples whose label is not ignored (the count is a
    # graph value, so a symbolic batch works; all ignored gives 0/0 = nan, as in PyTorch).
    return R.sum(loss) / R.sum(_valid_mask(labels, ignore_index, loss.dtype))


def _as_labels(labels):
    # Python/NumPy integer labels become int64 constants; float labels are rejected
    # by the op's type rule.
    return labels if isinstance(labels, Node) else constant(np.asarray(labels))


def cross_entropy(logits, labels, reduction="mean", ignore_index=None, label_smoothing=0.0):
    """Cross-entropy between softmax(logits) and integer class labels.

    logits: (N, C), (N, C, d1, ...) or (C,); labels: int32/int64 of the same shape without
    the class axis.  reduction: "mean" (over non-ignored samples), "sum" or "none".
    A label outside [0, C) that is not `ignore_index` is a run-time error.
    """
    _check_reduction(reduction)
    labels = _as_labels(labels)
    loss = apply("softmax_cross_entropy", [logits, labels], ignore_index=ignore_index,
                 label_smoothing=label_smoothing)
    return _reduce_label_loss(loss, labels, reduction, ignore_index)


def nll_loss(log_probs, labels, reduction="mean", ignore_index=None):
    """Negative log-likelihood of integer labels under `log_probs` (e.g. log_softmax output)."""
    _check_reduction(reduction)
    labels = _as_labels(labels)
    loss = apply("nll", [log_probs, labels], ignore_index=ignore_index)
    return _reduce_label_loss(loss, labels, reduction, ignore_index)


# ------------------------------------------------------------------ regression / binary losses
def _reduce(loss, reduction):
    _check_reduction(reduction)
    if reduction == "mean":
        return R.mean(loss)
    if reduction == "sum":
        return R.sum(loss)
    return loss


def mse_loss(a, b, reduction="mean"):
    """(a - b)² reduced by `reduction` ("mean", "sum" or "none")."""
    _check_reduction(reduction)
    return _reduce(E.square(a - b), reduction)


def l1_loss(a, b, reduction="mean"):
    """|a - b| reduced by `reduction` ("mean", "sum" or "none")."""
    _check_reduction(reduction)
    return _reduce(E.abs(a - b), reduction)


def _softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
    return E.maximum(x, 0.0) + E.log(E.exp(E.neg(E.abs(x))) + 1.0)


def _np_softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


@register
class BceWithLogitsOp(Op):
    """Per-element binary cross-entropy on logits x with targets t (and pos_weight p):

        loss = p·t·softplus(-x) + (1 - t)·softplus(x)
             = max(x, 0) - x·t + log1p(exp(-|x|))          when p = 1

    Inputs (x, t) or (x, t, p), broadcast together.  Gradients:
    d/dx = (1 - t)·σ(x) - p·t·σ(-x); d/dt = p·softplus(-x) - softplus(x);
    d/dp = t·softplus(-x).
    """
    name = "bce_with_logits"
    arity = None
    elementwise = True

    def infer(self, types):
        if len(types) not in (2, 3):
            raise ValueError(f"takes (logits, targets[, pos_weight]), got {len(types)} inputs")
        for t, what in zip(types, ("logits", "targets", "pos_weight")):
            _require_float(t, what)
        return TensorType(dt.promote(*(t.dtype for t in types)),
                          broadcast_shapes(*(t.shape for t in types)))

    def evaluate(self, x, t, p=None):
        out_dtype = dt.promote(*(a.dtype for a in ((x, t) if p is None else (x, t, p))))
        x, t = x.astype(out_dtype), t.astype(out_dtype)
        if p is None:
            loss = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        else:
            loss = p.astype(out_dtype) * t * _np_softplus(-x) + (1 - t) * _np_softplus(x)
        return np.asarray(loss, dtype=out_dtype)

    def vjp(self, node, g):
        x, t = node.inputs[:2]
        p = node.inputs[2] if len(node.inputs) == 3 else None
        sig = E.reciprocal(E.exp(E.neg(x)) + 1.0)          # σ(x); exp overflow → σ = 0, fine
        sig_neg = E.reciprocal(E.exp(x) + 1.0)              # σ(-x)
        if p is None:
            gx = g * (sig - t)
            gt = g * E.neg(x)
            gp = None
        else:
            gx = g * ((1.0 - t) * sig - p * t * sig_neg)
            sp_neg = _softplus(E.neg(x))
            gt = g * (p * sp_neg - _softplus(x))
            gp = E.unbroadcast(g * t * sp_neg, p.shape)
        return [E.unbroadcast(gx, x.shape), E.unbroadcast(gt, t.shape), gp][:len(node.inputs)]


def binary_cross_entropy_with_logits(logits, targets, reduction="mean", pos_weight=None):
    """Stable binary cross-entropy of sigmoid(logits) against float targets in [0, 1].

    pos_weight (broadcast against the logits, e.g. shape (C,)) weighs the positive term
    as in PyTorch.  reduction: "mean", "sum" or "none".
    """
    _check_reduction(reduction)
    ins = [logits, targets] + ([pos_weight] if pos_weight is not None else [])
    return _reduce(apply("bce_with_logits", ins), reduction)


# ------------------------------------------------------------------ dropout
_U64 = (1 << 64) - 1
DROPOUT_GOLDEN = 0x9E3779B97F4A7C15
DROPOUT_MIX1 = 0xBF58476D1CE4E5B9
DROPOUT_MIX2 = 0x94D049BB133111EB
DROPOUT_STREAM_OFFSET = 0x632BE59BD9B4E019


def _mix64_int(z: int) -> int:
    """splitmix64's finalizer on a Python int (used for compile-time constants)."""
    z &= _U64
    z ^= z >> 30
    z = (z * DROPOUT_MIX1) & _U64
    z ^= z >> 27
    z = (z * DROPOUT_MIX2) & _U64
    z ^= z >> 31
    return z


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(DROPOUT_MIX1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(DROPOUT_MIX2)
    return z ^ (z >> np.uint64(31))


def dropout_keep_bits(key: int, stream: int, n: int) -> np.ndarray:
    """The 24-bit uniform draws r[0..n) of dropout's hash (see `DropoutOp`), as uint64."""
    with np.errstate(over="ignore"):
        salt = np.uint64(_mix64_int(stream + DROPOUT_STREAM_OFFSET))
        k = np.array([key], dtype=np.int64).view(np.uint64)
        s = _mix64_np(k ^ salt)
        i = np.arange(n, dtype=np.uint64)
        z = _mix64_np(s + i * np.uint64(DROPOUT_GOLDEN))
        return z >> np.uint64(40)


@register
class DropoutOp(Op):
    """Inverted dropout with a reproducible, backend-independent mask.

    Inputs: x (float) and key (int32/int64 scalar).  Attributes: p, stream, and the
    derived threshold T = floor(p · 2**24) and scale = 1 / (1 - p).

    The exact hash (all arithmetic on unsigned 64-bit integers, wrapping mod 2**64):

        mix64(z):  z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9
                   z ^= z >> 27;  z *= 0x94D049BB133111EB
                   z ^= z >> 31                       (splitmix64's finalizer)
        salt = mix64(stream + 0x632BE59BD9B4E019)     (a compile-time constant)
        s    = mix64(uint64(key) ^ salt)              (key as int64, two's complement)
        for the element at flat row-major index i of x (i = 0, 1, ...):
            z = mix64(s + i * 0x9E3779B97F4A7C15)
            r = z >> 40                               (24-bit uniform in [0, 2**24))
            keep = r >= T
            out[i] = x[i] * scale if keep else 0      (scale = dtype(1 / (1 - p)),
                                                       one multiply in x's dtype)

    The mask depends only on (key, stream, i, T), so every backend and the
    gradient (the same op applied to the cotangent) reproduce it bit-exactly.
    The op is NOT elementwise in the fusion sense: the output also depends on
    the element's flat index.
    """
    name = "dropout"
    arity = 2

    def check(self, p, stream=0, threshold=None, scale=None):
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
        if not isinstance(stream, (int, np.integer)) or isinstance(stream, bool):
            raise TypeError(f"stream must be an int, got {stream!r}")
        return {"p": p, "stream": int(stream), "threshold": math.floor(p * 2 ** 24),
                "scale": 1.0 / (1.0 - p)}

    def infer(self, types, p, stream, threshold, scale):
        x, key = types
        _require_float(x, "input")
        if key.dtype not in (dt.int32, dt.int64) or key.shape != ():
            raise TypeError(f"key must be an int32/int64 scalar, got {key}")
        return x

    def evaluate(self, x, key, p, stream, threshold, scale):
        # (ravel: tolerate a scalar key that arrives as shape (1,))
        r = dropout_keep_bits(int(np.asarray(key).ravel()[0]), stream, x.size).reshape(x.shape)
        keep = r >= np.uint64(threshold)
        return np.where(keep, x * x.dtype.type(scale), x.dtype.type(0)).astype(x.dtype, copy=False)

    def vjp(self, node, g):
        return [apply("dropout", [g, node.inputs[1]], **node.attrs), None]


def _as_key(key):
    if isinstance(key, Node):
        return key
    return constant(np.int64(key))


def dropout(x, p, key, training=True, stream=0):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    key: an int64 scalar tensor (a graph input or Parameter, so a training loop can
    feed or advance it; a Python int becomes a constant).  The same (key, stream)
    gives the same mask on every backend; use distinct `stream` values (or keys)
    for distinct dropout layers.  p = 0 or training=False → x unchanged (no op);
    p = 1 → zeros (as in PyTorch); p outside [0, 1] → error.  See `DropoutOp` for
    the exact hash.
    """
    if not training or p == 0:
        return x
    if p == 1:
        return E.zeros_like(x)
    return apply("dropout", [x, _as_key(key)], p=p, stream=stream)


def dropout_mask(key, like, p, stream=0):
    """The scaled mask dropout(x, p, key) multiplies x by (0 or 1/(1-p)), shaped like `like`."""
    return dropout(E.ones_like(like), p, key, stream=stream)


# ------------------------------------------------------------------ normalization
def _lift(v, x):
    """Arrays and lists given for per-channel tensors become constants of x's dtype."""
    return v if isinstance(v, Node) else constant(np.asarray(v), x.dtype)


def _channel_param(v, x, axis, what):
    """Reshape a (C,) per-channel tensor so it broadcasts along `axis` of x."""
    v = _lift(v, x)
    if v.ndim != 1 or not _same_dim(v.shape[0], x.shape[axis]):
        raise _build_error(f"batch_norm: {what} must have shape ({x.shape[axis]},) (the "
                           f"channels of x {shape_str(x.shape)} along axis {axis}), got "
                           f"{shape_str(v.shape)}")
    return S.reshape(v, tuple(v.shape[0] if i == axis else 1 for i in range(x.ndim)))


def batch_norm(x, gamma=None, beta=None, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5, axis=1):
    """Batch normalization over every axis but the channel axis `axis`.

    x: (N, C) or (N, C, H, W) (any rank ≥ 2); gamma, beta, running_mean, running_var: (C,).
    Returns the triple (y, new_running_mean, new_running_var):
      training=True:  y uses the batch mean and biased batch variance; the new running
        stats are (1 - momentum)·running + momentum·batch_stat with the UNBIASED batch
        variance (as in PyTorch); they are None when no running stats are given.
      training=False: y uses the running stats, which are returned unchanged.
    Built from mean/var/elementwise ops, so autodiff and fusion see through it.
    """
    x = as_node(x)
    if x.ndim < 2:
        raise _build_error(f"batch_norm: x must have rank >= 2, got shape {shape_str(x.shape)}")
    axis = normalize_axis(axis, x.ndim, "batch_norm")
    if running_mean is not None:
        running_mean = _lift(running_mean, x)
    if running_var is not None:
        running_var = _lift(running_var, x)
    red = tuple(i for i in range(x.ndim) if i != axis)
    if training:
        mu = R.mean(x, axis=red, keepdims=True)
        xc = x - mu
        var = R.mean(E.square(xc), axis=red, keepdims=True)
    else:
        if running_mean is None or running_var is None:
            raise _build_error("batch_norm: eval mode (training=False) needs running_mean and "
                               "running_var")
        mu = _channel_param(running_mean, x, axis, "running_mean")
        var = _channel_param(running_var, x, axis, "running_var")
        xc = x - mu
    y = xc * E.reciprocal(E.sqrt(var + eps))
    if gamma is not None:
        y = y * _channel_param(gamma, x, axis, "gamma")
    if beta is not None:
        y = y + _channel_param(beta, x, axis, "beta")
    if not training or running_mean is None or running_var is None:
        return y, running_mean, running_var
    c = x.shape[axis]
    n = R.numel(x, red, dtype=x.dtype)
    batch_mean = S.reshape(mu, (c,))
    unbiased = S.reshape(var, (c,)) * (n / (n - 1.0))
    new_mean = running_mean * (1.0 - momentum) + batch_mean * momentum
    new_var = running_var * (1.0 - momentum) + unbiased * momentum
    return y, new_mean, new_var


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalize over the trailing dims `normalized_shape` (an int or tuple), as in PyTorch.

    weight and bias (shape normalized_shape) scale and shift the result.
    """
    x = as_node(x)
    ns = (normalized_shape,) if isinstance(normalized_shape, (int, str)) else \
        tuple(normalized_shape)
    k = len(ns)
    if k == 0 or k > x.ndim or not all(_same_dim(a, b) for a, b in zip(ns, x.shape[x.ndim - k:])):
        raise _build_error(f"layer_norm: normalized_shape {ns} does not match the trailing "
                           f"dimensions of x with shape {shape_str(x.shape)}")
    axes = tuple(range(x.ndim - k, x.ndim))
    mu = R.mean(x, axis=axes, keepdims=True)
    xc = x - mu
    var = R.mean(E.square(xc), axis=axes, keepdims=True)
    y = xc * E.reciprocal(E.sqrt(var + eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
