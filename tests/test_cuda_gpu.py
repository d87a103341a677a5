"""The CUDA backend on a real GPU (driver API), against the NumPy interpreter.

Marked `gpu`: skipped with the reason when no CUDA device/driver is usable
(most development machines).  Everything these tests exercise except the
driver calls themselves is also covered without a GPU by test_cuda_emulator.py
and test_cuda_codegen.py.
"""
import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C

_OK, _WHY = C.gpu_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _OK, reason=f"no usable CUDA GPU: {_WHY}")]

RNG = np.random.default_rng(11)
EPS32 = np.finfo(np.float32).eps


@pytest.fixture(autouse=True)
def real_gpu():
    C.set_options(emulate=False)
    yield
    C.set_options(emulate=None)


def both(inputs, outputs, feeds, optimize=2):
    got = gc.compile(inputs, outputs, backend="cuda", optimize=optimize)(*feeds)
    want = gc.compile(inputs, outputs, backend="numpy", optimize=optimize)(*feeds)
    return got, want


def test_driver_runtime_targets_the_device_architecture():
    rt = C.select_runtime()
    assert isinstance(rt, C.DriverRuntime) and rt.arch.startswith("sm_")


def test_elementwise_and_reductions_on_gpu():
    x = gc.input("x", (37, 1031))
    outs = [gc.tanh(x) * 2.0 + gc.sigmoid(x), gc.sum(x, axis=1), gc.max(x, axis=0), gc.mean(x),
            gc.softmax(x, axis=1), gc.argmax(x, axis=1)]
    v = RNG.standard_normal((37, 1031)).astype(np.float32)
    got, want = both([x], outs, [v])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    # per-row bound of a float32 sum's rounding (NumPy 2.5's assert_allclose formats
    # atol with :g, so an array atol raised TypeError there: compare explicitly)
    np.testing.assert_array_less(np.abs(got[1] - want[1]),
                                 1031 * EPS32 * np.abs(v).sum(1) * (1 + 1e-6))
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[3], want[3], rtol=1e-5)
    np.testing.assert_allclose(got[4], want[4], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[5], want[5])


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (127, 65, 33), (512, 512, 512)])
def test_matmul_on_gpu(M, K, N):
    a, b = gc.input("a", (M, K)), gc.input("b", (K, N))
    va = RNG.standard_normal((M, K)).astype(np.float32)
    vb = RNG.standard_normal((K, N)).astype(np.float32)
    got, want = both([a, b], [a @ b], [va, vb])
    assert np.all(np.abs(got[0] - want[0]) <= 2 * K * EPS32 * (np.abs(va) @ np.abs(vb)) + 1e-30)


def test_conv_and_pool_gradients_on_gpu():
    x, w = gc.input("x", (4, 3, 13, 11)), gc.Parameter(
        RNG.standard_normal((5, 3, 3, 3)).astype(np.float32), name="w")
    y = gc.max_pool2d(gc.relu(gc.conv2d(x, w, padding=1)), 2)
    dx, dw = gc.grad(gc.sum(y * y), [x, w])
    v = RNG.standard_normal((4, 3, 13, 11)).astype(np.float32)
    got, want = both([x], [y, dx, dw], [v])
    for g, wv in zip(got, want):
        np.testing.assert_allclose(g, wv, rtol=1e-4, atol=1e-4 * np.abs(wv).max())


def test_lenet_training_steps_on_gpu_match_numpy_and_keep_parameters_on_device():
    from graphc import models, optim
    from graphc.data.digits import load_digits
    X, Y = load_digits("train", size=28)
    B = 256

    def curve(backend):
        m = models.lenet5(rng=np.random.default_rng(0))
        x, y = gc.input("x", (B, 1, 28, 28)), gc.input("y", (B,), dtype="int64")
        step = optim.SGD(m.parameters(), lr=0.05, momentum=0.9).compile_step(
            lambda xb, yb: gc.cross_entropy(m(xb), yb), x, y, backend=backend)
        losses = [float(step(X[k * B:(k + 1) * B], Y[k * B:(k + 1) * B])) for k in range(4)]
        return losses, step

    got, step = curve("cuda")
    want, _ = curve("numpy")
    np.testing.assert_allclose(got, want, rtol=1e-4)
    runner = next(iter(step.function._cache.values()))
    n_params = sum(1 for _, src in runner.prog.externals if src[0] == "param")
    assert runner.uploads == n_params      # uploaded on the first step only


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_layers_with_fused_time_steps_on_gpu(cell):
    """Each time loop one fused kernel launch (fuse.py), forward and BPTT, for real."""
    from graphc import nn
    from graphc.backends.cuda.codegen import TimeLoop
    layer = getattr(nn, cell)(6, 13, num_layers=2, rng=np.random.default_rng(0))
    x = gc.input("x", (9, 5, 6))
    y = layer(x)[0]
    loss = gc.sum(y * y)
    outs = [y, loss] + gc.grad(loss, [x] + list(layer.parameters()))
    v = RNG.standard_normal((9, 5, 6)).astype(np.float32)
    f = gc.compile([x], outs, backend="cuda")
    got = f(v)
    want = gc.compile([x], outs, backend="numpy")(v)
    for k, (g, w) in enumerate(zip(got, want)):   # FMA contraction on the GPU: tolerances
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"output {k}")
    cp = next(iter(f._cache.values())).cprog
    assert not [s for s in cp.steps if isinstance(s, TimeLoop)]
    loops = [s for s in cp.steps if getattr(s, "time_loop", None) is not None]
    assert len(loops) == 4 and all(s.parts for s in loops)   # one launch per loop
