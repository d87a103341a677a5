"""Small ONNX model builders: CNNs of the kinds people deploy, built with onnx.helper.

Used by the tests (graphc vs onnxruntime) and by benchmarks: `resnet50()` is a
ResNet-50-sized graph (bottleneck blocks 3-4-6-3, 25.6M parameters) with
He-initialized random weights, in the operator patterns torch.onnx emits
(Conv without bias + BatchNormalization + Relu, residual Add, MaxPool,
GlobalAveragePool, the Shape/Gather/Unsqueeze/Concat/Reshape flatten chain,
Gemm).  The other builders are scaled-down ResNet-, VGG-, Inception-,
DenseNet- and SqueezeNet-style graphs.  Each returns an onnx.ModelProto whose
single input "x" has a symbolic batch "N".
"""
from __future__ import annotations

import numpy as np

from .errors import require_onnx

__all__ = ["Builder", "resnet50", "resnet_like", "vgg_like", "inception_like",
           "densenet_like", "squeezenet_like", "MODELS"]


class Builder:
    """Tiny helper that names tensors and collects nodes and He-initialized weights."""

    def __init__(self, seed):
        require_onnx("gc.onnx.zoo")          # explains the missing extra up front
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def weight(self, shape, scale=None):
        from onnx import numpy_helper
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else np.sqrt(2.0 / fan_in)
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * s).astype(np.float32), n))
        return n

    def const(self, arr):
        from onnx import numpy_helper
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type, inputs, n_out=1, **attrs):
        from onnx import helper
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, c_in, c_out, k, stride=1, pad=None, group=1, bias=True):
        pad = k // 2 if pad is None else pad
        ins = [x, self.weight((c_out, c_in // group, k, k))]
        if bias:
            ins.append(self.weight((c_out,), 0.1))
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=group)

    def bn(self, x, c):
        r = self.rng
        ins = [x] + [self.const(v.astype(np.float32)) for v in (
            r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1,
            r.uniform(0.5, 1.5, c))]
        return self.op("BatchNormalization", ins, epsilon=1e-5)

    def cbr(self, x, c_in, c_out, k, stride=1):
        return self.op("Relu", [self.bn(self.conv(x, c_in, c_out, k, stride, bias=False), c_out)])

    def gemm(self, x, f_in, f_out):
        return self.op("Gemm", [x, self.weight((f_out, f_in)), self.weight((f_out,), 0.1)],
                       transB=1)

    def model(self, x_shape, y, opset=13, n_out=10):
        from onnx import TensorProto, helper
        g = helper.make_graph(self.nodes, "net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", n_out])],
                              initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def _flatten_chain(b, x):
    """The Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain of torch.onnx."""
    s = b.op("Shape", [x])
    n = b.op("Gather", [s, b.const(np.array(0, np.int64))], axis=0)
    n1 = b.op("Unsqueeze", [n, b.const(np.array([0], np.int64))])
    tgt = b.op("Concat", [n1, b.const(np.array([-1], np.int64))], axis=0)
    return b.op("Reshape", [x, tgt])


def resnet_like():
    b = Builder(0)
    x = b.cbr("x", 3, 16, 3)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 16
    for c_out, stride in ((16, 1), (32, 2), (64, 2)):
        h = b.cbr(x, c, c_out, 3, stride)
        h = b.bn(b.conv(h, c_out, c_out, 3, bias=False), c_out)
        skip = x if stride == 1 and c == c_out else \
            b.bn(b.conv(x, c, c_out, 1, stride, pad=0, bias=False), c_out)
        x = b.op("Relu", [b.op("Add", [h, skip])])
        c = c_out
    x = _flatten_chain(b, b.op("GlobalAveragePool", [x]))
    return b.model(["N", 3, 32, 32], b.gemm(x, 64, 10))


def vgg_like():
    b = Builder(1)
    x, c = "x", 3
    for c_out in (16, 32):
        x = b.op("Relu", [b.conv(x, c, c_out, 3)])
        x = b.op("Relu", [b.conv(x, c_out, c_out, 3)])
        x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        c = c_out
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Dropout", [b.op("Relu", [b.gemm(x, 32 * 4 * 4, 64)])], ratio=0.5)
    return b.model(["N", 3, 16, 16], b.op("Softmax", [b.gemm(x, 64, 10)], axis=1), opset=11)


def inception_like():
    b = Builder(2)
    x = b.cbr("x", 3, 16, 3, 2)
    br1 = b.op("Relu", [b.conv(x, 16, 8, 1)])
    br2 = b.op("Relu", [b.conv(b.op("Relu", [b.conv(x, 16, 8, 1)]), 8, 12, 3)])
    br3 = b.op("Relu", [b.conv(b.op("Relu", [b.conv(x, 16, 4, 1)]), 4, 6, 5)])
    pool = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    br4 = b.op("Relu", [b.conv(pool, 16, 6, 1)])
    x = b.op("Concat", [br1, br2, br3, br4], axis=1)  # 32 channels
    x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             count_include_pad=0)
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    return b.model(["N", 3, 32, 32], b.gemm(x, 32, 10), opset=17)


def densenet_like():
    b = Builder(3)
    x, c = b.conv("x", 3, 16, 3, bias=False), 16
    for _ in range(3):  # dense block, growth 8
        h = b.conv(b.op("Relu", [b.bn(x, c)]), c, 8, 3, bias=False)
        x, c = b.op("Concat", [x, h], axis=1), c + 8
    x = b.conv(b.op("Relu", [b.bn(x, c)]), c, 20, 1, pad=0, bias=False)  # transition
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.bn(x, 20)])])])
    return b.model(["N", 3, 16, 16], b.gemm(x, 20, 10), opset=15)


def squeezenet_like():
    b = Builder(4)
    x = b.op("Relu", [b.conv("x", 3, 32, 3, 2, pad=0)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    c = 32
    for sq, ex in ((8, 16), (8, 16)):  # fire modules
        s = b.op("Relu", [b.conv(x, c, sq, 1)])
        e1 = b.op("Relu", [b.conv(s, sq, ex, 1)])
        e3 = b.op("Relu", [b.conv(s, sq, ex, 3)])
        x, c = b.op("Concat", [e1, e3], axis=1), 2 * ex
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    x = b.op("Relu", [b.conv(x, c, 10, 1)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    return b.model(["N", 3, 40, 40], b.op("Softmax", [x], axis=1), opset=18)


MODELS = {"resnet": resnet_like, "vgg": vgg_like, "inception": inception_like,
          "densenet": densenet_like, "squeezenet": squeezenet_like}


def resnet50(num_classes=1000, input_size=224, seed=0):
    """A ResNet-50-sized ONNX graph (bottleneck blocks 3-4-6-3, width 64..2048)."""
    b = Builder(seed)
    x = b.cbr("x", 3, 64, 7, 2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for k in range(blocks):
            s = stride if k == 0 else 1
            out = 4 * width
            h = b.cbr(x, c, width, 1)
            h = b.cbr(h, width, width, 3, s)
            h = b.bn(b.conv(h, width, out, 1, pad=0, bias=False), out)
            skip = x if (s == 1 and c == out) else \
                b.bn(b.conv(x, c, out, 1, s, pad=0, bias=False), out)
            x = b.op("Relu", [b.op("Add", [h, skip])])
            c = out
    x = _flatten_chain(b, b.op("GlobalAveragePool", [x]))
    return b.model(["N", 3, input_size, input_size], b.gemm(x, c, num_classes), n_out=num_classes)
