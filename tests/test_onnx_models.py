"""Whole CNNs of the kinds people deploy (graphc/onnx/zoo.py builds them with
onnx.helper), imported into graphc and compared with onnxruntime (or onnx's
reference evaluator when it is absent).

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

import graphc as gc  # noqa: E402
from graphc.onnx.zoo import MODELS, resnet50, resnet_like  # noqa: E402


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


def test_resnet50_sized_model_matches_onnxruntime():
    # real ResNet-50 widths and depth (25.6M parameters) on a small image to stay fast
    ort = pytest.importorskip("onnxruntime")
    proto = resnet50(num_classes=1000, input_size=32)
    model = gc.onnx.load(proto)
    n_params = sum(p.value.size for p in model.parameters)
    assert 25_000_000 < n_params < 26_000_000, n_params
    x = np.random.default_rng(14).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (got,) = model(x)
    assert got.shape == (1, 1000)
    # float32 sums over ~50 layers: compare relative to the output scale (~4e3 here)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
