"""The LLVM backend against the NumPy interpreter: slicing, padding,
concatenation, take and its gradient, one_hot, logsumexp, nll and binary
cross-entropy; index checks before native code runs.

These ops move values without arithmetic (exact), or combine a handful of
float32 operations (rtol 64 eps), or sum <= 13 exp terms (same bound)."""
import numpy as np
import pytest

import graphc as gc

RNG = np.random.default_rng(21)
EPS = np.finfo(np.float32).eps


def both(inputs, outputs, feeds):
    return (gc.compile(inputs, outputs, backend="llvm")(*feeds),
            gc.compile(inputs, outputs, backend="numpy")(*feeds))


def test_slice_pad_concat_take():
    x = gc.input("x", (5, 7, 3))
    i = gc.input("i", (4,), dtype="int64")
    z = gc.input("z", (5, 2, 3), dtype="int32")
    outs = [x[1:4, ::-2, :], x[::2, 3, 1:], gc.pad(x, ((1, 2), (0, 0), (3, 1)), value=-1.5),
            gc.concat([x, z], axis=1), gc.take(x, i, axis=1), gc.take(x, i, axis=0),
            gc.one_hot(i, 6)]
    vx = RNG.standard_normal((5, 7, 3)).astype(np.float32)
    vi = np.array([3, 0, 3, 4])
    vz = RNG.integers(-5, 5, (5, 2, 3)).astype(np.int32)
    got, want = both([x, i, z], outs, [vx, vi, vz])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_take_gradient_with_repeated_indices():
    x = gc.input("x", (6, 4))
    i = gc.input("i", (2, 3), dtype="int32")
    loss = gc.sum(gc.take(x, i, axis=0) * gc.take(x, i, axis=0))
    (gx,) = gc.grad(loss, [x])
    vx = RNG.standard_normal((6, 4)).astype(np.float32)
    vi = np.array([[1, 1, 5], [0, 1, 2]], np.int32)
    got, want = both([x, i], [gx], [vx, vi])
    np.testing.assert_allclose(got[0], want[0], rtol=4 * EPS)


def test_logsumexp_nll_bce():
    x = gc.input("x", (4, 13))
    x3 = gc.input("x3", (2, 5, 3))
    y = gc.input("y", (4,), dtype="int64")
    t = gc.input("t", (4, 13))
    pw = gc.input("pw", (13,))
    logp = gc.log_softmax(x)
    outs = [gc.logsumexp(x, axis=1), gc.logsumexp(x3, axis=(0, 2), keepdims=True),
            gc.logsumexp(x3), gc.nll_loss(logp, y), gc.nll_loss(logp, y, ignore_index=2),
            gc.binary_cross_entropy_with_logits(x, t),
            gc.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")]
    vx = (RNG.standard_normal((4, 13)) * 4).astype(np.float32)
    vx[1] = -np.inf                      # a row of -inf: logsumexp gives -inf, not NaN
    v3 = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    vy = np.array([2, 0, 12, 2])
    vt = RNG.random((4, 13)).astype(np.float32)
    vpw = (RNG.random(13) + 0.5).astype(np.float32)
    inputs, feeds = [x, x3, y, t, pw], [vx, v3, vy, vt, vpw]
    got, want = both(inputs, outs[:3], feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=64 * EPS, atol=64 * EPS)
    vx[1] = RNG.standard_normal(13)      # the losses on finite logits
    got, want = both(inputs, outs[3:], feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=64 * EPS, atol=64 * EPS)


def test_bad_labels_and_indices_raise_the_reference_error():
    x = gc.input("x", (3, 5))
    y = gc.input("y", (3,), "int64")
    f = gc.compile([x, y], gc.cross_entropy(x, y), backend="llvm")
    with pytest.raises(gc.IndexOutOfRangeError, match=r"softmax_cross_entropy: label out of "
                                                      r"range: label 5 at position \(1,\) is not "
                                                      r"in \[0, 5\)(.|\n)*test_llvm_index.py"):
        f(np.zeros((3, 5), np.float32), np.array([0, 5, 1]))
    i = gc.input("i", (2,), "int64")
    g = gc.compile([x, i], gc.take(x, i, axis=1), backend="llvm")
    with pytest.raises(IndexError, match="take: index out of range"):
        g(np.zeros((3, 5), np.float32), np.array([-1, 2]))
    np.testing.assert_array_equal(g(np.eye(3, 5, dtype=np.float32), np.array([1, 1])),
                                  np.eye(3, 5, dtype=np.float32)[:, [1, 1]])


def test_dropout_mask_is_bit_exact_with_the_reference():
    x = gc.input("x", (7, 129))
    key = gc.input("key", (), dtype="int64")
    y = gc.dropout(x, 0.3, key, stream=5)
    (gx,) = gc.grad(gc.sum(y * y), [x])
    vx = RNG.standard_normal((7, 129)).astype(np.float32)
    for k in (0, -3, 2 ** 40 + 7):
        got, want = both([x, key], [y, gx], [vx, np.int64(k)])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert 0.2 < np.mean(got[0] == 0) < 0.4
