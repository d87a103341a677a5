"""Whole CNNs of the kinds people deploy, built with onnx.helper, imported into graphc
and compared with onnxruntime (or onnx's reference evaluator when it is absent).

The graphs use the operator patterns real exporters emit: Conv+BatchNormalization+
Relu stems, residual Adds with strided 1x1 projections (ResNet), stacked 3x3 convs
and Gemm heads with Dropout (VGG), parallel branches joined by Concat with padded
pools (Inception), dense Concat growth with AveragePool transitions (DenseNet), fire
modules with ceil-mode pooling (SqueezeNet), and the Shape/Gather/Concat/Reshape
flatten chain.  Channel counts are scaled down so the suite stays fast.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphc as gc  # noqa: E402


class Builder:
    """Tiny helper that names tensors and collects nodes and He-initialized weights."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def weight(self, shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else np.sqrt(2.0 / fan_in)
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * s).astype(np.float32), n))
        return n

    def const(self, arr):
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type, inputs, n_out=1, **attrs):
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

    def model(self, x_shape, y, opset=13):
        g = helper.make_graph(self.nodes, "net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])],
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


def _reference(model, x):
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        return ReferenceEvaluator(model).run(None, {"x": x})[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cnn_matches_onnxruntime(kind):
    proto = MODELS[kind]()
    onnx.checker.check_model(proto)
    model = gc.onnx.load(proto)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(11).standard_normal([2] + shape).astype(np.float32)
    want = _reference(proto, x)
    (got,) = model(x)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_resnet_like_on_llvm_backend():
    pytest.importorskip("llvmlite")
    from graphc.ir.errors import NotLoweredError
    proto = resnet_like()
    model = gc.onnx.load(proto)
    x = np.random.default_rng(12).standard_normal((1, 3, 32, 32)).astype(np.float32)
    try:
        f = model.compile("llvm")
        (got,) = f(x)
    except NotLoweredError as e:
        pytest.skip(f"llvm backend cannot lower this model yet: {str(e).splitlines()[0]}")
    np.testing.assert_allclose(got, model(x)[0], rtol=1e-4, atol=1e-5)


def test_imported_resnet_is_fine_tunable():
    # a few SGD steps on the imported parameters lower the loss on a fixed batch
    proto = resnet_like()
    model = gc.onnx.load(proto, dims={"N": 4})
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = np.array([1, 3, 5, 7])
    labels = gc.input("labels", (4,), dtype="int64")
    loss = gc.cross_entropy(model.outputs[0], labels)
    params = [p for p in model.parameters if p.value.ndim > 1]  # conv and fc weights
    grads = gc.grad(loss, params)
    lr = 2e-3
    step = gc.compile(model.inputs + [labels], loss,
                      updates={p: p - lr * g for p, g in zip(params, grads)})
    losses = [float(step(x, y)) for _ in range(4)]
    assert losses[-1] < losses[0] * 0.9, losses
