"""LLVM backend call path and memory: parameter updates written by the runner, the
Function's fast argument path, GEMM scratch sized per product, arena layout."""
import numpy as np
import pytest

import graphc as gc
from graphc.backends import llvm as gllvm
from graphc.backends.llvm.layout import _round, plan_arena

RNG = np.random.default_rng(11)


def _sgd_model(backend, w0, b0):
    w = gc.Parameter(w0.copy(), name="w")
    b = gc.Parameter(b0.copy(), name="b")
    x = gc.input("x", (None, 4))
    loss = gc.sum(gc.tanh(x @ w + b) ** 2)
    gw, gb = gc.grad(loss, [w, b])
    f = gc.compile([x], [loss, w], updates={w: w - 0.1 * gw, b: b - 0.1 * gb},
                   backend=backend)
    return f, w, b


def test_updates_written_into_parameters_match_numpy_reference():
    w0 = RNG.standard_normal((4, 3)).astype(np.float32)
    b0 = RNG.standard_normal(3).astype(np.float32)
    xs = [RNG.standard_normal((n, 4)).astype(np.float32) for n in (5, 5, 2, 5)]
    f, w, b = _sgd_model("llvm", w0, b0)
    w_arr = w.value
    # Independent reference: explicit float64 SGD on tanh(xw+b)^2.
    rw, rb = w0.astype(np.float64), b0.astype(np.float64)
    for x in xs:
        loss, w_out = f(x)
        z = x.astype(np.float64) @ rw + rb
        t = np.tanh(z)
        gz = 2 * t * (1 - t * t)
        np.testing.assert_allclose(loss, np.sum(t * t), rtol=1e-5)
        # The returned parameter value is the one read before this call's update.
        np.testing.assert_allclose(w_out, rw, rtol=1e-5, atol=1e-6)
        rw, rb = rw - 0.1 * x.T.astype(np.float64) @ gz, rb - 0.1 * gz.sum(0)
        np.testing.assert_allclose(w.value, rw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.value, rb, rtol=1e-4, atol=1e-5)
    assert w.value is w_arr          # written in place: the same array object
    assert not np.shares_memory(w_out, w.value)


def test_swap_updates_read_old_values():
    a0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    b0 = -np.arange(6, dtype=np.float32).reshape(2, 3)
    a, b = gc.Parameter(a0.copy()), gc.Parameter(b0.copy())
    x = gc.input("x", (2, 3))
    f = gc.compile([x], gc.sum(a * x), updates={a: b, b: a + x}, backend="llvm")
    s = f(np.ones((2, 3), np.float32))
    assert s == pytest.approx(15.0)
    np.testing.assert_array_equal(a.value, b0)
    np.testing.assert_array_equal(b.value, a0 + 1)


def test_fast_path_still_validates_and_converts():
    x = gc.input("x", (None, 3))
    f = gc.compile([x], x * 2.0, backend="llvm")
    a = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(f(a), 2 * a)
    np.testing.assert_array_equal(f(a), 2 * a)                        # fast path
    with pytest.warns(gc.InputCastWarning, match="got int32"):
        np.testing.assert_array_equal(f(np.ones((4, 3), np.int32)), np.full((4, 3), 2.0))
    np.testing.assert_array_equal(f([[1, 2, 3]]), [[2, 4, 6]])
    nc = np.arange(12, dtype=np.float32).reshape(3, 4)[:, :3]          # not contiguous
    np.testing.assert_array_equal(f(nc), np.arange(12).reshape(3, 4)[:, :3] * 2)
    with pytest.raises(ValueError, match="expects shape"):
        f(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        f(np.ones((2, 3), np.complex64))


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("m,k,n", [(7, 300, 2100), (150, 20, 33), (5, 17, 40)])
def test_gemm_with_per_product_scratch(monkeypatch, tmp_path, threads, m, k, n):
    # Blocks past KC=256 and NC=2048, M past MC=144, and small products: each call's
    # scratch slice is sized to its own product.
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    a = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    c = RNG.standard_normal((n, 9)).astype(np.float32)
    x, y, z = gc.input("a", (m, k)), gc.input("b", (k, n)), gc.input("c", (n, 9))
    f = gc.compile([x, y, z], [x @ y, (x @ y) @ z], backend="llvm")
    p, q = f(a, b, c)
    ref = np.einsum("ik,kj->ij", a.astype(np.float64), b.astype(np.float64))
    tol = 4 * np.finfo(np.float32).eps * k
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    assert np.all(np.abs(p - ref) <= tol * scale + 1e-6)
    ref2 = np.einsum("ik,kj->ij", ref, c.astype(np.float64))
    scale2 = scale @ np.abs(c).astype(np.float64)
    assert np.all(np.abs(q - ref2) <= 4 * np.finfo(np.float32).eps * (k + n) * scale2 + 1e-5)


def test_arena_reaches_the_lifetime_lower_bound():
    """The layout never needs more bytes than the most bytes live during one kernel."""
    w1 = gc.Parameter(RNG.standard_normal((6, 1, 3, 3)).astype(np.float32))
    w2 = gc.Parameter(RNG.standard_normal((24, 10)).astype(np.float32))
    x = gc.input("x", (4, 1, 8, 8))
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, w1, padding=1)), 2)
    h = gc.reshape(h, (4, 96)) @ gc.reshape(gc.tile(w2, (4, 1)), (96, 10))
    loss = gc.sum(gc.tanh(h))
    g1, g2 = gc.grad(loss, [w1, w2])
    f = gc.compile([x], loss, updates={w1: w1 - 0.01 * g1, w2: w2 - 0.01 * g2},
                   backend="llvm")
    f(RNG.standard_normal((4, 1, 8, 8)).astype(np.float32))
    r = gllvm.runners(f)[0]
    prog, nt = r.prog, r.nthreads
    first, last = {}, {}
    for k, kern in enumerate(prog.kernels):
        for b in kern.buffers:
            first.setdefault(id(b), k)
            last[id(b)] = k
    for b in prog.outputs:
        last[id(b)] = len(prog.kernels)
    temps = [t for t in prog.temps if id(t) in first]

    def size(t):
        return _round(t.size * t.dtype.itemsize * (nt if t.scope == "thread" else 1))
    bound = max(sum(size(t) for t in temps if first[id(t)] <= k <= last[id(t)])
                for k in range(len(prog.kernels) + 1))
    offsets, top = plan_arena(prog, nt)
    assert top <= sum(size(t) for t in temps)
    assert top == bound
    # and no two buffers live at once overlap
    spans = [(offsets[id(t)], offsets[id(t)] + size(t), first[id(t)], last[id(t)])
             for t in temps]
    for i, (o1, e1, f1, l1) in enumerate(spans):
        for o2, e2, f2, l2 in spans[i + 1:]:
            if not (l1 < f2 or l2 < f1):
                assert e1 <= o2 or e2 <= o1


def test_conv_epilogue_is_one_kernel_after_the_conv():
    # conv2d + batch-norm-like affine + relu: the optimizer makes one conv_epilogue
    # group; the LLVM lowering runs the conv, then one in-place loop for the tail.
    x = gc.input("x", (2, 3, 7, 6))
    w = gc.Parameter(RNG.standard_normal((5, 3, 3, 3)).astype(np.float32))
    mean = gc.Parameter(RNG.standard_normal((5, 1, 1)).astype(np.float32))
    scale = gc.Parameter(RNG.standard_normal((5, 1, 1)).astype(np.float32))
    beta = gc.Parameter(RNG.standard_normal((5, 1, 1)).astype(np.float32))
    y = gc.relu((gc.conv2d(x, w, padding=1) - mean) * scale + beta)
    f = gc.compile([x], y, backend="llvm")
    xv = RNG.standard_normal((2, 3, 7, 6)).astype(np.float32)
    got = f(xv)
    kinds = [n.attrs.get("kind") for n in f.graph.nodes if n.op.name == "fused"]
    assert "conv_epilogue" in kinds
    names = [k for k, _ in gllvm.runners(f)[0].kernels()]
    assert sum("epilogue" in k for k in names) == 1, names
    # independent reference: explicit loops over the padded image in float64
    xp = np.pad(xv.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    wv = w.value.astype(np.float64)
    conv = np.zeros((2, 5, 7, 6))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 7, j:j + 6], wv[:, :, i, j])
    ref = np.maximum((conv - mean.value) * scale.value + beta.value, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ksize,pad,stride", [(3, 1, 1), (1, 0, 1), (3, 0, 2)])
def test_batch1_conv_shares_the_gemm_and_matches_across_threads(monkeypatch, tmp_path,
                                                                 ksize, pad, stride):
    # N = 1, one group: im2col kernel + a top-level GEMM split in column bands.
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    # (big enough to be shared: >= 2^22 FLOPs)
    xv = RNG.standard_normal((1, 32, 25, 29)).astype(np.float32)
    wv = RNG.standard_normal((128, 32, ksize, ksize)).astype(np.float32)
    results = []
    for nt in ("1", "2"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        x, w = gc.input("x", xv.shape), gc.input("w", wv.shape)
        f = gc.compile([x, w], gc.conv2d(x, w, padding=pad, stride=stride), backend="llvm")
        results.append(f(xv, wv))
        r = gllvm.runners(f)[0]
        assert r.nthreads == int(nt)
        if nt == "2":   # every thread works on the GEMM
            from graphc.kernel.ir import is_spmd
            assert all(is_spmd(k) for k in r.prog.kernels if k.name == "conv2d")
    np.testing.assert_array_equal(results[0], results[1])
    xp = np.pad(xv.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (25 + 2 * pad - ksize) // stride + 1
    ow = (29 + 2 * pad - ksize) // stride + 1
    ref = np.zeros((1, 128, oh, ow))
    for i in range(ksize):
        for j in range(ksize):
            patch = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            ref += np.einsum("nchw,oc->nohw", patch, wv[:, :, i, j].astype(np.float64))
    tol = 4 * np.finfo(np.float32).eps * 32 * ksize * ksize
    np.testing.assert_allclose(results[0], ref, rtol=tol, atol=tol * np.abs(ref).max())
