"""LLVM kernels for pools whose windows tile the input (two-phase, row segments
then columns, thread-private scratch) and collapsed contiguous loop pairs
(`schedule.collapse_loops`): values against independent NumPy loops, NaN and
tie handling, 1 and 2 threads identical, bounds-checked runs."""
import numpy as np
import pytest

import graphc as gc
from graphc.kernel import ir as K
from graphc.kernel.schedule import collapse_loops


def _ref_pool(x, kh, kw):
    """Max and first-argmax (row-major within the window, first NaN wins) by loops."""
    N, C, H, W = x.shape
    OH, OW = H // kh, W // kw
    y = np.empty((N, C, OH, OW), x.dtype)
    arg = np.empty((N, C, OH, OW, 2), np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    best, pos = None, None
                    for k in range(kh):
                        for l in range(kw):
                            v = x[n, c, i * kh + k, j * kw + l]
                            if best is None or (np.isnan(v) and not np.isnan(best)) or v > best:
                                best, pos = v, (i * kh + k, j * kw + l)
                    y[n, c, i, j] = best
                    arg[n, c, i, j] = pos
    return y, arg


def _ref_pool_grad(x, g, kh, kw):
    _, arg = _ref_pool(x, kh, kw)
    dx = np.zeros_like(x)
    N, C, OH, OW = g.shape
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    a, b = arg[n, c, i, j]
                    dx[n, c, a, b] += g[n, c, i, j]
    return dx


def _data(shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    # few distinct values: many ties inside windows (as after a relu)
    x = rng.integers(-2, 3, shape).astype(dtype)
    x.flat[::7] = rng.standard_normal(x.size // 7 + (x.size % 7 > 0)).astype(dtype)
    x.flat[3::97] = np.nan
    x.flat[5::89] = -np.inf
    return x


@pytest.mark.parametrize("shape,k", [((2, 3, 28, 28), 2), ((1, 2, 10, 10), 2), ((3, 1, 2, 2), 2),
                                     ((2, 2, 9, 6), 3), ((1, 3, 6, 34), (3, 2)),
                                     ((1, 1, 4, 7), (2, 1)), ((2, 5, 14, 15), (1, 3))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_max_pool_and_grad_match_loops(shape, k, dtype):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = gc.input("x", shape, dtype=dtype)
    gshape = (shape[0], shape[1], shape[2] // kh, shape[3] // kw)
    g = gc.input("g", gshape, dtype=dtype)
    f = gc.compile([x, g], [gc.max_pool2d(x, k), gc.max_pool2d_grad(x, g, k)], backend="llvm")
    xv = _data(shape, 0, dtype)
    gv = np.random.default_rng(1).standard_normal(gshape).astype(dtype)
    y, dx = f(xv, gv)
    ry, _ = _ref_pool(xv, kh, kw)
    np.testing.assert_array_equal(y, ry)      # max selects a value: exact, NaN included
    np.testing.assert_array_equal(dx, _ref_pool_grad(xv, gv, kh, kw))


def test_tiled_pool_kernel_form_and_bounds(monkeypatch):
    monkeypatch.setenv("GRAPHC_DEBUG_BOUNDS", "1")
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    shape = (2, 3, 12, 10)
    x = gc.input("x", shape)
    g = gc.input("g", (2, 3, 6, 5))
    f = gc.compile([x, g], [gc.max_pool2d(x, 2), gc.max_pool2d_grad(x, g, 2)], backend="llvm")
    xv, gv = _data(shape, 2), np.random.default_rng(3).standard_normal((2, 3, 6, 5)).astype(np.float32)
    y, dx = f(xv, gv)
    np.testing.assert_array_equal(y, _ref_pool(xv, 2, 2)[0])
    np.testing.assert_array_equal(dx, _ref_pool_grad(xv, gv, 2, 2))
    from graphc.backends.llvm import runners
    (r,) = runners(f)
    text = "\n".join(str(k) for k in r.prog.kernels)
    # the tiled form: thread-private row-segment scratch, no per-window scatter
    assert "prow" in text and "pgrad" in text and "pcol" in text


@pytest.mark.parametrize("threads", ["1", "2"])
def test_tiled_pool_and_collapsed_loops_identical_across_threads(monkeypatch, tmp_path, threads):
    # large enough (>= 2^18 elements) that the kernels are shared between threads
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    shape = (8, 9, 62, 60)
    rng = np.random.default_rng(4)
    xv = _data(shape, 4)
    bv = rng.standard_normal(9).astype(np.float32)
    gv = rng.standard_normal((8, 9, 31, 30)).astype(np.float32)
    x, b, g = gc.input("x", shape), gc.input("b", (9,)), gc.input("g", (8, 9, 31, 30))
    h = gc.relu(x + gc.reshape(b, (1, 9, 1, 1)))
    outs = [gc.max_pool2d(h, 2), gc.max_pool2d_grad(h, g, 2), gc.sum(h, axis=(0, 2, 3))]
    results = {}
    for nt in ("1", threads):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        results[nt] = gc.compile([x, b, g], outs, backend="llvm")(xv, bv, gv)
    hv = np.where(np.isnan(xv + bv[:, None, None]) | (xv + bv[:, None, None] > 0),
                  xv + bv[:, None, None], 0).astype(np.float32)
    y, dx, s = results[threads]
    np.testing.assert_array_equal(y, _ref_pool(hv, 2, 2)[0])
    np.testing.assert_array_equal(dx, _ref_pool_grad(hv, gv, 2, 2))
    fin = np.where(np.isfinite(hv), hv, 0).astype(np.float64)
    ref_s = fin.sum(axis=(0, 2, 3))
    has_nan = np.isnan(hv).any(axis=(0, 2, 3))
    has_inf = np.isinf(hv).any(axis=(0, 2, 3))
    n = 8 * 62 * 60
    ok = ~(has_nan | has_inf)
    np.testing.assert_allclose(s[ok], ref_s[ok], rtol=4 * n * np.finfo(np.float32).eps / 10,
                               atol=1e-3)
    assert np.all(np.isnan(s[has_nan]))
    for a, c in zip(results["1"], results[threads]):
        np.testing.assert_array_equal(a, c)


# ------------------------------------------------------------------ collapse_loops (IR level)
def _fmt(body):
    lines = []
    K._fmt(body, lines, 0)
    return "\n".join(lines)


def test_collapse_merges_contiguous_pairs_only():
    x = K.Buffer("x", "float32", 5 * 7 * 3)
    o = K.Buffer("o", "float32", 5 * 7 * 3)
    p = K.Buffer("p", "float32", 7)
    body = K.loop_nest((5, 7, 3), lambda v: [K.Store(o, K.affine(v, (21, 3, 1)), K.BinOp(
        "add", K.Load(x, K.affine(v, (21, 3, 1))), K.Load(p, v[1])))])
    out = collapse_loops(body)
    # d1 is read alone (p[d1]): d1, d2 stay apart; d0 and d1 would need p's index
    # to be contiguous too, so nothing merges
    assert _fmt(out).count("for ") == 3
    body2 = K.loop_nest((5, 7, 3), lambda v: [K.Store(o, K.affine(v, (21, 3, 1)), K.BinOp(
        "add", K.Load(x, K.affine(v, (21, 3, 1))), K.Load(p, v[0])))])
    out2 = collapse_loops(body2)
    text = _fmt(out2)
    assert text.count("for ") == 2 and "0..21:  # vector" in text
    # a loop variable used as a value (not an index) blocks merging
    body3 = K.loop_nest((5, 7), lambda v: [K.Store(o, K.affine(v, (7, 1)), K.Cast(v[1], "float32"))])
    assert _fmt(collapse_loops(body3)).count("for ") == 2
    # a transposed access blocks merging
    body4 = K.loop_nest((5, 7), lambda v: [K.Store(o, K.affine(v, (7, 1)),
                                                   K.Load(x, K.affine(v, (1, 5))))])
    assert _fmt(collapse_loops(body4)).count("for ") == 2
    # a parallel outer loop is kept as it is (its chunks are split between threads)
    body5 = K.loop_nest((5, 7), lambda v: [K.Store(o, K.affine(v, (7, 1)), K.Load(x, K.affine(
        v, (7, 1))))], outer_kind="parallel")
    assert _fmt(collapse_loops(body5)).count("for ") == 2


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 1, 1, 13), (4, 6, 28, 28)])
def test_bias_relu_and_channel_sum_with_collapsed_loops(shape):
    rng = np.random.default_rng(5)
    xv = rng.standard_normal(shape).astype(np.float32)
    bv = rng.standard_normal(shape[1]).astype(np.float32)
    x, b = gc.input("x", shape), gc.input("b", (shape[1],))
    y = gc.relu(x + gc.reshape(b, (1, shape[1], 1, 1)))
    f = gc.compile([x, b], [y, gc.sum(y, axis=(0, 2, 3))], backend="llvm")
    yv, sv = f(xv, bv)
    ref = np.maximum(xv + bv[None, :, None, None], 0)
    np.testing.assert_array_equal(yv, ref)
    n = shape[0] * shape[2] * shape[3]
    ref_s = ref.astype(np.float64).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(sv, ref_s, rtol=n * np.finfo(np.float32).eps, atol=1e-6)


# ------------------------------------------------------------------ barriers only where needed
def _entry_barriers(dump_dir):
    text = open(dump_dir / "graphc.ll").read()
    entry = text[text.index('@"entry"'):]
    entry = entry[:entry.index("\n}")]
    return entry.count("@graphc_barrier")


def test_independent_kernels_share_a_barrier_interval(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    n = 1 << 19                         # large enough to be shared between threads
    rng = np.random.default_rng(6)
    xv, yv = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    x, y = gc.input("x", (n,)), gc.input("y", (n,))
    # two independent kernels, then one reading both
    a, b = gc.relu(x) * 3.0, gc.exp(y * 0.5)
    c = gc.sum(a * b)
    results = {}
    for nt in ("1", "2"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        d = tmp_path / nt
        monkeypatch.setenv("GRAPHC_DUMP_LLVM", str(d))
        f = gc.compile([x, y], [a, b, c], backend="llvm")
        results[nt] = f(xv, yv)
        if nt == "2":
            (r,) = __import__("graphc.backends.llvm", fromlist=["runners"]).runners(f)
            kernels = r.kernels()
            barriers = _entry_barriers(d)
    ra, rb = np.maximum(xv, 0) * 3.0, np.exp(yv * 0.5)
    np.testing.assert_array_equal(results["2"][0], ra.astype(np.float32))
    np.testing.assert_allclose(results["2"][1], rb, rtol=4 * np.finfo(np.float32).eps)
    for u, v in zip(results["1"], results["2"]):
        np.testing.assert_array_equal(u, v)
    # a barrier before the kernel that reads what the two wrote, none between them
    assert len(kernels) >= 3
    assert barriers < len(kernels) - 1, (barriers, kernels)
