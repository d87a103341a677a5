"""Whole small models built from raw ops: the gradient of the loss with respect
to every parameter (and the input) passes the finite-difference check.

Smooth activations (tanh) and distinct random values keep the check away from
kinks; max pooling is smooth at such points.
"""
import numpy as np
import pytest

import graphc as gc


def softmax_cross_entropy(logits, onehot):
    """Mean cross-entropy written out from exp/log/sum/max (independent of gc.cross_entropy)."""
    m = gc.max(logits, axis=1, keepdims=True)
    lse = m + gc.log(gc.sum(gc.exp(logits - m), axis=1, keepdims=True))
    return gc.mean(gc.sum(gc.constant(onehot) * (lse - logits), axis=1))


def one_hot(labels, classes):
    out = np.zeros((len(labels), classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def dense(x, w, b):
    return gc.matmul(x, gc.transpose(w)) + b


def init(rng, *shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return rng.standard_normal(shape) / np.sqrt(fan_in)


# ------------------------------------------------------------------ MLP
def test_mlp_gradients_every_parameter():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6))
    labels = np.array([0, 2, 1, 2, 0])
    params = [init(rng, 8, 6), 0.1 * rng.standard_normal(8),
              init(rng, 7, 8), 0.1 * rng.standard_normal(7),
              init(rng, 3, 7), 0.1 * rng.standard_normal(3)]
    target = one_hot(labels, 3)

    def loss(x, w1, b1, w2, b2, w3, b3):
        h = gc.tanh(dense(x, w1, b1))
        h = gc.tanh(dense(h, w2, b2))
        return softmax_cross_entropy(dense(h, w3, b3), target)

    worst_abs, _ = gc.check_grad(loss, [x] + params, max_entries=16)
    assert worst_abs < 1e-6


# ------------------------------------------------------------------ LeNet-5-shaped CNN
def lenet_params(rng):
    return [init(rng, 3, 1, 3, 3), 0.1 * rng.standard_normal(3),     # conv1 1 -> 3, 3x3
            init(rng, 4, 3, 3, 3), 0.1 * rng.standard_normal(4),     # conv2 3 -> 4, 3x3
            init(rng, 10, 16), 0.1 * rng.standard_normal(10),        # fc1 4*2*2 -> 10
            init(rng, 8, 10), 0.1 * rng.standard_normal(8),          # fc2 10 -> 8
            init(rng, 5, 8), 0.1 * rng.standard_normal(5)]           # fc3 8 -> 5 classes


def lenet_logits(x, c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b, f3w, f3b):
    # (2,1,12,12) -conv pad 1-> (2,3,12,12) -pool-> (2,3,6,6) -conv-> (2,4,4,4) -pool-> (2,4,2,2)
    h = gc.max_pool2d(gc.tanh(gc.conv2d(x, c1w, c1b, padding=1)), 2)
    h = gc.max_pool2d(gc.tanh(gc.conv2d(h, c2w, c2b)), 2)
    h = gc.flatten(h)
    h = gc.tanh(dense(h, f1w, f1b))
    h = gc.tanh(dense(h, f2w, f2b))
    return dense(h, f3w, f3b)


def test_lenet_gradients_every_parameter():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 12, 12))
    target = one_hot(np.array([3, 1]), 5)

    def loss(x, *params):
        return softmax_cross_entropy(lenet_logits(x, *params), target)

    worst_abs, _ = gc.check_grad(loss, [x] + lenet_params(rng), max_entries=16)
    assert worst_abs < 1e-6


def test_lenet_with_library_cross_entropy():
    if not hasattr(gc, "cross_entropy"):
        pytest.skip("gc.cross_entropy is not available")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 1, 12, 12))
    labels = np.array([4, 0], dtype=np.int64)
    params = lenet_params(rng)

    # integer labels are fed to check_grad but not differentiated
    gc.check_grad(lambda x, y, *p: gc.cross_entropy(lenet_logits(x, *p), y),
                  [x, labels] + params, max_entries=16)
    # ...and the library loss equals the inline one at this point
    xi = gc.input("x", x.shape, "float64")
    ps = [gc.constant(p) for p in params]
    yi = gc.input("y", (2,), "int64")
    a, b = gc.compile([xi, yi], [gc.cross_entropy(lenet_logits(xi, *ps), yi),
                                 softmax_cross_entropy(lenet_logits(xi, *ps),
                                                       one_hot(labels, 5))])(x, labels)
    assert a == pytest.approx(b, rel=1e-12)


# ------------------------------------------------------------------ a CNN using the other ops
def test_strided_grouped_cnn_with_avg_pools():
    """Stride, groups, dilation, 'same' padding, avg pooling and global average pooling."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 9, 9))
    target = one_hot(np.array([1, 2]), 3)
    params = [init(rng, 4, 2, 3, 3), 0.1 * rng.standard_normal(4),   # 2 -> 4, stride 2
              init(rng, 4, 2, 2, 2), 0.1 * rng.standard_normal(4),   # grouped (2), dilated, same
              init(rng, 3, 4), 0.1 * rng.standard_normal(3)]

    def loss(x, c1w, c1b, c2w, c2b, fw, fb):
        h = gc.tanh(gc.conv2d(x, c1w, c1b, stride=2, padding=1))                 # (2,4,5,5)
        h = gc.avg_pool2d(h, 3, stride=2, padding=1, count_include_pad=False,
                          ceil_mode=True)                                          # (2,4,3,3)
        h = gc.tanh(gc.conv2d(h, c2w, c2b, padding="same", dilation=2, groups=2))  # (2,4,3,3)
        h = gc.reshape(gc.global_avg_pool2d(h), (2, 4))
        return softmax_cross_entropy(dense(h, fw, fb), target)

    worst_abs, _ = gc.check_grad(loss, [x] + params, max_entries=16)
    assert worst_abs < 1e-6
