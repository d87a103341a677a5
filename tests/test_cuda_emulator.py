"""The CUDA backend's generated source, run on the CPU emulator, against the NumPy
interpreter (the reference): every lowered op on small and awkward shapes (1,
primes, sizes that are not a multiple of a block), and training steps.

The emulator compiles the exact CUDA source with the host C++ compiler and
runs every thread of a block, switching threads at __syncthreads, so shared
memory tiling, block reductions and atomics are exercised as written.  Many
outputs share one compiled graph to keep the C++ compiles few.
"""
import ctypes
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda.codegen import Launch
from graphc.backends.cuda.runtime import EmulatorRuntime

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="the CUDA emulator needs a host C++ compiler (g++/clang++), none found")

RNG = np.random.default_rng(7)
EPS32 = np.finfo(np.float32).eps


@pytest.fixture(autouse=True)
def emulate():
    C.set_options(emulate=True)
    yield
    C.set_options(emulate=None)


def both(inputs, outputs, feeds, optimize=0):
    got = gc.compile(inputs, outputs, backend="cuda", optimize=optimize)(*feeds)
    want = gc.compile(inputs, outputs, backend="numpy", optimize=optimize)(*feeds)
    return got, want


def close(got, want, rtol, atol):
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (k, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"output {k}")


# ------------------------------------------------------------------ the emulator itself
BARRIER_SRC = r"""
extern "C" __global__ void reverse_block(float* out, const float* in, const long long n) {
  __shared__ float tile[64];
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? in[i] : -1.0f;
  __syncthreads();
  if (i < n) out[i] = tile[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void bad_barrier(float* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = 1.0f;
}
"""


class _Prog:
    def __init__(self, source, launches):
        self.source, self.launches = source, launches


def test_emulator_barriers_and_shared_memory():
    from graphc.kernel.ir import Buffer, Var
    out_b, in_b = Buffer("out", "float32", 128), Buffer("in", "float32", 128)
    n = Var("n")
    rev = Launch("reverse_block", (2, 1, 1), (64, 1, 1),
                 [("buf", out_b), ("buf", in_b), ("var", n)], True, None, "")
    bad = Launch("bad_barrier", (1, 1, 1), (8, 1, 1), [("buf", out_b)], True, None, "")
    rt = EmulatorRuntime()
    fns = rt.load(_Prog(BARRIER_SRC, [rev, bad]))
    x = np.arange(128, dtype=np.float32)
    din, dout = rt.alloc(x.nbytes), rt.alloc(x.nbytes)
    rt.copy_htod(din, x)
    rt.launch(fns["reverse_block"], rev.grid, rev.block,
              [ctypes.c_void_p(dout), ctypes.c_void_p(din), ctypes.c_longlong(128)])
    y = np.empty_like(x)
    rt.copy_dtoh(y, dout)
    want = np.concatenate([x[:64][::-1], x[64:][::-1]])
    np.testing.assert_array_equal(y, want)
    with pytest.raises(gc.GraphcError, match="__syncthreads"):
        rt.launch(fns["bad_barrier"], bad.grid, bad.block, [ctypes.c_void_p(dout)])


def test_no_gpu_without_emulation_is_a_clear_error(monkeypatch):
    C.set_options(emulate=None)
    monkeypatch.delenv("GRAPHC_CUDA_EMULATE", raising=False)
    ok, _ = C.gpu_available()
    if ok:
        pytest.skip("a GPU is present: the driver path is used")
    x = gc.input("x", (3,))
    with pytest.raises(gc.GraphcError, match="GRAPHC_CUDA_EMULATE=1"):
        gc.compile([x], [gc.relu(x)], backend="cuda")(np.ones(3, np.float32))


def test_env_variable_selects_emulator(monkeypatch):
    C.set_options(emulate=None)
    monkeypatch.setenv("GRAPHC_CUDA_EMULATE", "1")
    x = gc.input("x", (5,))
    v = np.array([-2, -0.5, 0, 0.5, 3], np.float32)
    np.testing.assert_array_equal(gc.compile([x], gc.relu(x), backend="cuda")(v),
                                  np.maximum(v, 0))


def test_empty_tensors_aliases_and_integer_outputs():
    x = gc.input("x", (0, 3))
    y = gc.input("y", (4,), dtype="int32")
    w = gc.Parameter(np.arange(4, dtype=np.float32), name="w")
    yf = gc.cast(y, "float64")
    outs = [gc.relu(x), gc.sum(x, axis=0), x, y, w, gc.reshape(y * 2, (2, 2)),
            yf @ gc.reshape(yf, (4, 1))]
    vy = np.array([1, -2, 3, 4], np.int32)
    got, want = both([x, y], outs, [np.zeros((0, 3), np.float32), vy])
    for g, w_ in zip(got, want):
        assert g.shape == w_.shape and g.dtype == w_.dtype
        np.testing.assert_array_equal(g, w_)
    assert got[6][0] == 30.0 and got[1].tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------ elementwise
UNARY = ["neg", "abs", "sign", "exp", "log", "sqrt", "square", "reciprocal", "relu", "sigmoid",
         "tanh", "elu", "gelu", "softplus", "erf", "silu", "log_sigmoid", "leaky_relu"]


@pytest.mark.parametrize("dtype,shape", [("float32", (1,)), ("float32", (3, 7, 13)),
                                         ("float64", (257,))])
def test_unary_ops(dtype, shape):
    x = gc.input("x", shape, dtype=dtype)
    pos = {"log", "sqrt", "reciprocal"}
    outs = [getattr(gc, op)(gc.abs(x) + 0.5 if op in pos else x) for op in UNARY]
    outs.append(gc.gelu(x, approximate="tanh"))
    v = (RNG.standard_normal(shape) * 3).astype(dtype)
    v.reshape(-1)[0] = 0.0
    got, want = both([x], outs, [v])
    tol = (2e-6, 1e-6) if dtype == "float32" else (1e-13, 1e-14)
    close(got, want, *tol)


def test_binary_broadcast_compare_where_cast():
    a = gc.input("a", (3, 1, 5))
    b = gc.input("b", (4, 1))
    i = gc.input("i", (4, 5), dtype="int64")
    j = gc.input("j", (5,), dtype="int64")
    outs = [a + b, a - b, a * b, a / b, gc.maximum(a, b), gc.minimum(a, b), gc.abs(a) ** b,
            gc.less(a, b), gc.greater_equal(a, b), gc.equal(a, b), gc.not_equal(a, b),
            gc.where(gc.greater(a, b), a, b), gc.cast(a, "int32"), gc.cast(i, "float32"),
            i + j, i * j, i - j, gc.maximum(i, j), gc.logical_not(gc.less(i, j)),
            gc.cast(gc.less_equal(a, b), "float64")]
    va = RNG.standard_normal((3, 1, 5)).astype(np.float32)
    vb = RNG.standard_normal((4, 1)).astype(np.float32)
    va[0, 0, 0] = np.nan
    vb[1, 0] = va[1, 0, 2]   # an equal pair
    vi = RNG.integers(-9, 9, (4, 5))
    vj = RNG.integers(-9, 9, (5,))
    got, want = both([a, b, i, j], outs, [va, vb, vi, vj])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=0, equal_nan=True)


def test_integer_floor_division_semantics():
    a = gc.input("a", (12,), dtype="int64")
    b = gc.input("b", (12,), dtype="int64")
    va = np.array([7, -7, 7, -7, 0, 5, -5, 9, -9, 1, 3, -3])
    vb = np.array([2, 2, -2, -2, 3, 1, 1, -1, -1, 7, -5, 5])
    got, want = both([a, b], [gc.div(a, b)], [va, vb])
    np.testing.assert_array_equal(got[0], want[0])


def test_integer_overflow_wraps_like_numpy():
    a, b = gc.input("a", (4,), dtype="int32"), gc.input("b", (4,), dtype="int32")
    va = np.array([2**31 - 1, -2**31, 65536, 7], np.int32)
    vb = np.array([1, -1, 65536, -3], np.int32)
    got, want = both([a, b], [a + b, a - b, a * b], [va, vb])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ------------------------------------------------------------------ reductions
REDUCE_CASES = [((1,), None), ((7,), 0), ((3, 130), 1), ((130, 3), 0), ((13, 1, 5), (0, 2)),
                ((1000,), None), ((2, 3, 67), -1), ((5, 4, 3), 1)]


def test_reductions():
    # all cases in one graph (one compile); 130/1000/67-long rows take block reductions
    ins, outs, feeds = [], [], []
    for k, (shape, axis) in enumerate(REDUCE_CASES):
        x = gc.input(f"x{k}", shape)
        ins.append(x)
        feeds.append(RNG.standard_normal(shape).astype(np.float32))
        outs += [gc.sum(x, axis=axis), gc.mean(x, axis=axis), gc.max(x, axis=axis),
                 gc.min(x, axis=axis)]
        if not isinstance(axis, tuple):
            outs += [gc.argmax(x, axis=axis), gc.argmin(x, axis=axis)]
    got, want = both(ins, outs, feeds)
    pos = 0
    for (shape, axis), v in zip(REDUCE_CASES, feeds):
        n_out = 4 if isinstance(axis, tuple) else 6
        n = v.size if axis is None else int(np.prod([shape[a] for a in np.atleast_1d(axis)]))
        bound = n * EPS32 * np.abs(v).sum()
        for k in range(n_out):
            g, w = got[pos + k], want[pos + k]
            assert g.dtype == w.dtype and g.shape == w.shape, (shape, axis, k)
            if k < 2:   # the order of additions differs (block-level trees)
                np.testing.assert_allclose(g, w, rtol=0, atol=bound, err_msg=f"{shape} {axis}")
            else:       # max, min, argmax, argmin are exact
                np.testing.assert_array_equal(g, w, err_msg=f"{shape} {axis} {k}")
        pos += n_out


def test_split_reductions_of_few_long_rows():
    # rows of 256*7*13 = 23296 elements, 2 or 3 of them: split over many blocks
    # (partial results, then a combining kernel), sum, max with NaN, mean, a full sum
    x = gc.input("x", (256, 3, 7, 13))
    outs = [gc.sum(x, axis=(0, 2, 3)), gc.max(x, axis=(0, 2, 3)), gc.mean(x * x, axis=(0, 2, 3)),
            gc.sum(x[:, :2], axis=(0, 2, 3))]
    cp = C.generate_cuda(gc.Graph(outs, [x]))
    assert sum(1 for la in cp.launches if la.mapping.get("split")) >= 3
    v = RNG.standard_normal((256, 3, 7, 13)).astype(np.float32)
    v[17, 1, 2, 5] = np.nan
    got, want = both([x], outs, [v])
    np.testing.assert_array_equal(got[1], want[1])
    absv = np.abs(v.astype(np.float64))
    for g, w, bound in ((got[0], want[0], absv.sum(axis=(0, 2, 3))),
                        (got[2], want[2], (absv ** 2).mean(axis=(0, 2, 3))),
                        (got[3], want[3], absv[:, :2].sum(axis=(0, 2, 3)))):
        ok = ~np.isnan(w)
        assert np.array_equal(np.isnan(g), np.isnan(w))
        assert np.all(np.abs(g - w)[ok] <= 64 * EPS32 * bound[ok])


def test_max_reductions_propagate_nan():
    x = gc.input("x", (4, 200))
    v = RNG.standard_normal((4, 200)).astype(np.float32)
    v[1, 150] = np.nan
    v[3, 0] = np.nan
    got, want = both([x], [gc.max(x, axis=1), gc.min(x, axis=1), gc.argmax(x, axis=1)], [v])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ------------------------------------------------------------------ matmul
MATMUL_CASES = [((1, 1), (1, 1)), ((7, 13), (13, 5)), ((17, 33), (33, 19)), ((2, 3, 17), (17, 4)),
                ((2, 1, 3, 5), (4, 5, 6)), ((5,), (5, 3)), ((65, 33), (33, 130)),
                ((2, 64, 16), (16, 64))]


def test_matmul():
    ins, outs, feeds = [], [], []
    for k, (sa, sb) in enumerate(MATMUL_CASES):
        a, b = gc.input(f"a{k}", sa), gc.input(f"b{k}", sb)
        ins += [a, b]
        outs.append(a @ b)
        feeds += [RNG.standard_normal(sa).astype(np.float32),
                  RNG.standard_normal(sb).astype(np.float32)]
    got, want = both(ins, outs, feeds)
    for k, (sa, sb) in enumerate(MATMUL_CASES):
        va, vb = feeds[2 * k], feeds[2 * k + 1]
        bound = 2 * sa[-1] * EPS32 * (np.abs(va) @ np.abs(vb))
        assert got[k].shape == want[k].shape
        assert np.all(np.abs(got[k] - want[k]) <= bound + 1e-30), (sa, sb)


def test_register_blocked_gemm_with_strided_operands_and_accumulation(monkeypatch):
    # conv2d's gradients multiply by transposed (strided) operands, grad_weight
    # accumulates: with 70 output channels and 8*3*3 = 72 columns both take the
    # 64x64 register-blocked kernel, reading A and B along either axis (at these
    # sizes only when a GPU of one SM is the target: 64x64 tiles are kept for GEMMs
    # with a tile per SM)
    from graphc.backends.cuda import codegen
    monkeypatch.setattr(codegen, "TARGET_SMS", 1)
    x, w, g = gc.input("x", (2, 8, 12, 12)), gc.input("w", (70, 8, 3, 3)), \
        gc.input("g", (2, 70, 10, 10))
    outs = [gc.conv2d(x, w), gc.conv2d_grad_input(g, w, (12, 12)),
            gc.conv2d_grad_weight(x, g, (3, 3))]
    feeds = [RNG.standard_normal(s).astype(np.float32) for s in
             ((2, 8, 12, 12), (70, 8, 3, 3), (2, 70, 10, 10))]
    cp = C.generate_cuda(gc.Graph(outs, [x, w, g]))
    assert sum("register-blocked" in la.what for la in cp.launches) == 3
    got, want = both([x, w, g], outs, feeds)
    absv = gc.compile([x, w, g], outs, backend="numpy")(*[np.abs(f) for f in feeds])
    for gv, wv, bd, k in zip(got, want, absv, (72, 70, 200)):
        assert np.all(np.abs(gv - wv) <= 2 * k * EPS32 * bd + 1e-30)


def test_matmul_float64_and_linear():
    x = gc.input("x", (6, 11), dtype="float64")
    w = gc.Parameter(RNG.standard_normal((3, 11)), name="w")
    b = gc.Parameter(RNG.standard_normal(3), name="b")
    got, want = both([x], [gc.linear(x, w, b)], [RNG.standard_normal((6, 11))])
    close(got, want, 1e-13, 1e-13)


# ------------------------------------------------------------------ conv / pooling
CONV_CASES = [
    ((2, 3, 9, 8), (4, 3, 3, 2), (2, 2), ((1, 1), (1, 0)), (1, 1), 1),
    ((1, 4, 7, 7), (6, 2, 3, 3), (1, 1), ((1, 1), (1, 1)), (2, 1), 2),
    ((3, 5, 6, 5), (7, 5, 1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
    ((1, 1, 5, 13), (1, 1, 5, 5), (1, 3), ((2, 2), (0, 1)), (1, 1), 1),
    ((18, 2, 5, 4), (3, 2, 3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),   # image groups
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
def test_conv2d_and_gradients(xs, ws, stride, padding, dilation, groups):
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y_shape = gc.conv2d(gc.input("x", xs), gc.input("w", ws), **a).shape
    x, w, g = gc.input("x", xs), gc.input("w", ws), gc.input("g", y_shape)
    outs = [gc.conv2d(x, w, **a), gc.conv2d_grad_input(g, w, xs[2:], **a),
            gc.conv2d_grad_weight(x, g, ws[2:], **a)]
    feeds = [RNG.standard_normal(s).astype(np.float32) for s in (xs, ws, y_shape)]
    got, want = both([x, w, g], outs, feeds)
    absf = gc.compile([x, w, g], outs, backend="numpy")(*[np.abs(f) for f in feeds])
    ks = (ws[1] * ws[2] * ws[3], ws[0] // groups * ws[2] * ws[3],
          xs[0] * y_shape[2] * y_shape[3])
    for gv, wv, bd, k in zip(got, want, absf, ks):
        assert gv.shape == wv.shape and gv.dtype == wv.dtype
        assert np.all(np.abs(gv - wv) <= 2 * k * EPS32 * bd + 1e-30)


def test_conv_on_host_loops_when_scratch_is_not_privatized(monkeypatch):
    from graphc.backends.cuda import transform
    monkeypatch.setattr(transform, "PRIVATE_LIMIT_BYTES", 0)
    test_conv2d_and_gradients(*CONV_CASES[0])


POOL_CASES = [((2, 3, 8, 7), 2, None, 0, False), ((1, 2, 9, 9), 3, 2, 1, True),
              ((1, 1, 11, 6), (3, 2), (2, 1), (1, 0), False)]


@pytest.mark.parametrize("xs,k,s,p,ceil", POOL_CASES)
def test_pooling_and_gradients(xs, k, s, p, ceil):
    x = gc.input("x", xs)
    ym = gc.max_pool2d(x, k, s, p, ceil_mode=ceil)
    ya = gc.avg_pool2d(x, k, s, p, ceil_mode=ceil)
    ya2 = gc.avg_pool2d(x, k, s, p, count_include_pad=False, ceil_mode=ceil)
    gm = gc.input("gm", ym.shape)
    loss = gc.sum(ym * gm) + gc.sum(ya * gm) + gc.sum(ya2 * gm)
    dx, = gc.grad(loss, [x])
    v = RNG.standard_normal(xs).astype(np.float32)
    v.reshape(-1)[3] = v.reshape(-1)[4]   # a tie inside a window
    vg = RNG.standard_normal(ym.shape).astype(np.float32)
    got, want = both([x, gm], [ym, ya, ya2, dx], [v, vg])
    np.testing.assert_array_equal(got[0], want[0])
    close(got[1:], want[1:], 1e-6, 1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_tiled_max_pool_scratch_per_iteration(shared, monkeypatch):
    # windows that tile the input (2x2 on 6x8, 3x3 stride 3 on 9x12): the lowering's
    # per-plane scratch (row maxima, argmax columns) is private to an iteration of
    # its parallel loop; a block per plane keeps it in shared memory, or, when it
    # does not fit (shared=False), it is privatized per plane in global memory and
    # the loop split into a kernel per phase.  Ties and NaN as in NumPy.
    from graphc.backends.cuda import codegen
    if not shared:
        monkeypatch.setattr(codegen, "SHARED_SCRATCH_BYTES", 0)
    for xs, k in (((3, 5, 6, 8), 2), ((2, 3, 9, 12), 3)):
        x = gc.input("x", xs)
        y = gc.max_pool2d(x, k)
        gy = gc.input("gy", y.shape)
        dx, = gc.grad(gc.sum(y * gy), [x])
        cp = C.generate_cuda(gc.Graph([y, dx], [x, gy]))
        pools = [la for la in cp.launches if "max_pool2d" in la.name]
        if shared:
            assert len(pools) == 2 and all("in shared memory" in la.what for la in pools)
        else:
            assert len(pools) >= 4 and not any("shared memory" in la.what for la in pools)
            assert all(la.grid[0] * la.block[0] >= xs[0] * xs[1] for la in pools)
        v = RNG.standard_normal(xs).astype(np.float32)
        flat = v.reshape(-1)
        flat[1] = flat[0]                      # a tie in the first window's row
        flat[xs[3]] = flat[0]                  # and in its column
        flat[7 * k] = np.nan                   # a NaN window
        vg = RNG.standard_normal(y.shape).astype(np.float32)
        got, want = both([x, gy], [y, dx], [v, vg])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_shape_ops_numel_and_pool_gather_directly():
    x, h = gc.input("x", (2, 3, 7, 5)), gc.input("h", (2, 3, 7, 5))
    g = gc.input("g", (2, 3, 4, 3))
    b, p = gc.input("b", (3, 1, 5)), gc.input("p", (5,))
    outs = [gc.transpose(x, (3, 1, 0, 2)), gc.broadcast_to(b, (2, 3, 7, 5)),
            gc.numel(x, (0, 2)), gc.max_pool2d_gather(x, h, 3, 2, 1),
            gc.max_pool2d_grad(x, g, 3, 2, 1), gc.avg_pool2d_grad(g, (7, 5), 3, 2, 1),
            gc.pow(gc.abs(x) + 0.1, p)]
    feeds = [RNG.standard_normal(s).astype(np.float32) for s in
             ((2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 4, 3), (3, 1, 5), (5,))]
    got, want = both([x, h, g, b, p], outs, feeds)
    assert float(got[2]) == 14.0
    close(got, want, 1e-6, 1e-6)


def test_indexing_ops_and_their_gradients():
    # slice, pad, concat, take (embedding) and its scatter-add gradient, one_hot
    x = gc.input("x", (5, 7))
    ids = gc.input("ids", (3, 4), dtype="int64")
    wt = gc.input("wt", (11, 6))
    emb = gc.embedding(ids, wt)
    sl = gc.getitem(x, (slice(1, 5, 2), slice(None, None, 3)))
    pd = gc.pad(x, ((1, 0), (2, 3)), value=-1.5)
    cc = gc.concatenate([x, gc.tanh(x)], axis=1)
    oh = gc.one_hot(ids, 11)
    gemb, = gc.grad(gc.sum(emb * emb), [wt])
    gx, = gc.grad(gc.sum(sl * sl) + gc.sum(pd * pd) + gc.sum(cc * cc), [x])
    vx = RNG.standard_normal((5, 7)).astype(np.float32)
    vids = RNG.integers(0, 11, (3, 4))
    vids[0, :2] = 3                       # repeated ids: the gradient adds up
    vwt = RNG.standard_normal((11, 6)).astype(np.float32)
    got, want = both([x, ids, wt], [emb, sl, pd, cc, oh, gemb, gx], [vx, vids, vwt])
    close(got, want, 1e-6, 1e-6)
    f = gc.compile([x, ids, wt], [emb], backend="cuda")
    with pytest.raises(IndexError, match="index out of range"):
        f(vx, np.full((3, 4), 11), vwt)


def test_dropout_matches_the_reference_hash_bit_for_bit():
    x = gc.input("x", (7, 129))
    key = gc.Parameter(np.array(123456789, np.int64), name="key")
    y = gc.dropout(x, 0.3, key)
    v = RNG.standard_normal((7, 129)).astype(np.float32)
    got, want = both([x], [y, gc.dropout(x, 0.5, key, stream=3)], [v])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert 0.2 < np.mean(got[0] == 0) < 0.4


def test_losses_logsumexp_nll_bce():
    z = gc.input("z", (6, 5))
    y = gc.input("y", (6,), dtype="int64")
    t = gc.input("t", (6, 5))
    outs = [gc.logsumexp(z, axis=1), gc.logsumexp(z), gc.nll_loss(gc.log_softmax(z, axis=1), y),
            gc.nll_loss(gc.log_softmax(z, axis=1), y, ignore_index=1, reduction="sum"),
            gc.binary_cross_entropy_with_logits(z, t),
            gc.binary_cross_entropy_with_logits(z, t, pos_weight=gc.constant(
                np.linspace(0.5, 2, 5).astype(np.float32)), reduction="none")]
    outs += gc.grad(outs[2] + outs[4], [z])
    vz = (RNG.standard_normal((6, 5)) * 4).astype(np.float32)
    vy = RNG.integers(0, 5, 6)
    vt = RNG.uniform(0, 1, (6, 5)).astype(np.float32)
    got, want = both([z, y, t], outs, [vz, vy, vt], optimize=2)
    close(got, want, 2e-6, 1e-6)


def test_long_fused_chains_compile_quickly():
    # activations use their argument several times: the expression is a DAG that
    # must not be expanded into a tree (3**40 nodes) anywhere in code generation
    x = gc.input("x", (9,))
    y = x
    for k in range(40):
        y = gc.relu(y) if k % 2 else gc.sigmoid(y) - 0.3
    v = RNG.standard_normal(9).astype(np.float32)
    got, want = both([x], [y], [v], optimize=2)
    close(got, want, 1e-6, 1e-7)


# ------------------------------------------------------------------ softmax family
def test_softmax_log_softmax():
    cases = [((1, 1), -1), ((5, 11), -1), ((3, 70), 1), ((4, 3, 2), 1)]
    ins, outs, feeds = [], [], []
    for k, (shape, axis) in enumerate(cases):
        x = gc.input(f"x{k}", shape)
        ins.append(x)
        outs += [gc.softmax(x, axis=axis), gc.log_softmax(x, axis=axis)]
        feeds.append((RNG.standard_normal(shape) * 5).astype(np.float32))
    got, want = both(ins, outs, feeds)
    close(got, want, 1e-5, 1e-6)


@pytest.mark.parametrize("smoothing,ignore", [(0.0, None), (0.1, 2)])
def test_cross_entropy_and_gradient(smoothing, ignore):
    logits = gc.input("z", (13, 7))
    y = gc.input("y", (13,), dtype="int64")
    loss = gc.cross_entropy(logits, y, label_smoothing=smoothing, ignore_index=ignore)
    dz, = gc.grad(loss, [logits])
    vz = (RNG.standard_normal((13, 7)) * 3).astype(np.float32)
    vy = RNG.integers(0, 7, 13)
    vy[:3] = 2
    got, want = both([logits, y], [loss, dz], [vz, vy], optimize=2)
    close(got, want, 1e-5, 1e-6)


# ------------------------------------------------------------------ training
def _mlp_losses(backend, steps=6):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((29, 17)).astype(np.float32)
    Y = rng.integers(0, 5, 29)
    w1 = gc.Parameter((rng.standard_normal((17, 31)) * 0.3).astype(np.float32), name="w1")
    b1 = gc.Parameter(np.zeros(31, np.float32), name="b1")
    w2 = gc.Parameter((rng.standard_normal((31, 5)) * 0.3).astype(np.float32), name="w2")
    b2 = gc.Parameter(np.zeros(5, np.float32), name="b2")
    x, y = gc.input("x", (29, 17)), gc.input("y", (29,), dtype="int64")
    loss = gc.cross_entropy(gc.tanh(x @ w1 + b1) @ w2 + b2, y)
    params = [w1, b1, w2, b2]
    grads = gc.grad(loss, params)
    step = gc.compile([x, y], loss, updates={p: p - 0.5 * g for p, g in zip(params, grads)},
                      backend=backend)
    losses = [float(step(X, Y)) for _ in range(steps)]
    return losses, [p.value.copy() for p in params], step


def test_mlp_training_matches_numpy_backend():
    got, gparams, step = _mlp_losses("cuda")
    want, wparams, _ = _mlp_losses("numpy")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[-1] < got[0] * 0.8       # it really trains
    for g, w in zip(gparams, wparams):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    runner = next(iter(step._cache.values()))
    # parameters were uploaded once; later steps found them on the device
    assert runner.uploads == 4


@pytest.mark.slow
def test_lenet_trains_on_digits_like_numpy_backend():
    """30 SGD steps of LeNet-5 on 480 real digit images (batch 16): the emulated CUDA
    backend's loss curve is the NumPy backend's, and it really learns."""
    from graphc import models, optim
    from graphc.data.digits import load_digits
    X, Y = load_digits("train", size=28)
    B, steps = 16, 30

    def curve(backend):
        m = models.lenet5(rng=np.random.default_rng(0))
        x = gc.input("x", (B, 1, 28, 28))
        y = gc.input("y", (B,), dtype="int64")
        step = optim.SGD(m.parameters(), lr=0.1, momentum=0.9).compile_step(
            lambda xb, yb: gc.cross_entropy(m(xb), yb), x, y, backend=backend)
        return np.array([float(step(X[k * B:(k + 1) * B], Y[k * B:(k + 1) * B]))
                         for k in range(steps)])

    got, want = curve("cuda"), curve("numpy")
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert got[-5:].mean() < got[:5].mean() - 0.3


def test_lenet_avg_pool_tanh_adam_steps_match_numpy():
    from graphc import models, optim
    rng = np.random.default_rng(4)
    X = rng.standard_normal((5, 1, 32, 32)).astype(np.float32)
    Y = rng.integers(0, 10, 5)

    def curve(backend):
        m = models.lenet5(rng=np.random.default_rng(1), activation="tanh", pool="avg",
                          input_size=32)
        x, y = gc.input("x", (5, 1, 32, 32)), gc.input("y", (5,), dtype="int64")
        step = optim.Adam(m.parameters(), lr=1e-3).compile_step(
            lambda xb, yb: gc.cross_entropy(m(xb), yb, label_smoothing=0.1), x, y,
            backend=backend)
        return [float(step(X, Y)) for _ in range(3)]

    np.testing.assert_allclose(curve("cuda"), curve("numpy"), rtol=2e-5)


def test_cuda_benchmark_script_runs_on_the_emulator(capsys):
    from graphc.backends.cuda import bench
    text = bench.main(["--emulate", "--small", "--repeat", "1"])
    assert "matmul 64x64x64" in text and "LeNet-5 train step batch 8" in text
    assert "RNN in 4 hidden 8 T=5" in text and "LSTM in 4 hidden 8 T=5" in text
    assert text.count("graphc device") == 5 and "torch" not in text


def test_graphc_bench_backend_cuda_runs_the_gpu_bench(capsys):
    # `graphc bench --backend cuda` is the GPU bench with its own options (issue 15)
    from graphc import cli
    assert cli.main(["bench", "--backend", "cuda", "--emulate", "--small", "--only",
                     "matmul", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graphc CUDA backend on EmulatorRuntime")
    assert "matmul 64x64x64" in out and "graphc device" in out   # the result, then a summary
    assert "LeNet" not in out and "ResNet" not in out and "conv" not in out


def test_two_python_threads_share_a_compiled_graph():
    import threading
    x = gc.input("x", (3, 300))
    f = gc.compile([x], [gc.softmax(x, axis=1), gc.sum(x, axis=1)], backend="cuda")
    vs = [RNG.standard_normal((3, 300)).astype(np.float32) for _ in range(4)]
    want = [gc.compile([x], [gc.softmax(x, axis=1), gc.sum(x, axis=1)])(v) for v in vs]
    errors = []

    def work(k):
        try:
            for _ in range(5):
                got = f(vs[k])
                np.testing.assert_allclose(got[0], want[k][0], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(got[1], want[k][1], rtol=1e-4, atol=1e-4)
        except Exception as e:   # reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


def test_random_shapes_broadcasting_and_reductions():
    """Random shapes with 1s, primes and sizes around a block (one compiled graph):
    broadcast binary ops and reductions over random axis sets."""
    rng = np.random.default_rng(99)
    sizes = [1, 2, 3, 5, 7, 13, 31, 64, 67, 130]
    ins, outs, feeds, meta = [], [], [], []
    for k in range(12):
        nd = int(rng.integers(1, 4))
        shape = tuple(int(rng.choice(sizes)) for _ in range(nd))
        while np.prod(shape) > 20000:
            shape = shape[1:]
        other = tuple(1 if rng.integers(0, 3) == 0 else d for d in shape[int(rng.integers(0, nd)):])
        a, b = gc.input(f"a{k}", shape), gc.input(f"b{k}", other)
        ins += [a, b]
        feeds += [RNG.standard_normal(shape).astype(np.float32),
                  RNG.standard_normal(other).astype(np.float32)]
        axes = tuple(sorted({int(x) for x in rng.integers(0, len(shape), int(rng.integers(1, 3)))}))
        z = a * b - gc.maximum(a, b)
        outs += [z, gc.sum(z, axis=axes), gc.max(z, axis=axes), gc.mean(a, axis=axes)]
        meta.append(int(np.prod([shape[x] for x in axes])))
    got, want = both(ins, outs, feeds)
    for k in range(12):
        z_g, s_g, m_g, a_g = got[4 * k:4 * k + 4]
        z_w, s_w, m_w, a_w = want[4 * k:4 * k + 4]
        np.testing.assert_array_equal(z_g, z_w)
        np.testing.assert_array_equal(m_g, m_w)
        n = meta[k]
        np.testing.assert_allclose(s_g, s_w, rtol=0, atol=n * EPS32 * np.abs(z_w).sum() + 1e-6)
        np.testing.assert_allclose(a_g, a_w, rtol=0, atol=n * EPS32 * np.abs(feeds[2 * k]).max()
                                   + 1e-6)


# ------------------------------------------------------------------ recurrences (scan)
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_layers_and_backprop_through_time(cell):
    """scan's loop region: the body's kernels run once per time step with per-step
    views into the stacked buffers; backprop runs a reversed loop."""
    from graphc import nn
    layer = getattr(nn, cell)(5, 7)
    x = gc.input("x", (6, 3, 5))
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = gc.sum(y * y)
    ps = list(layer.parameters())
    outs = [y, loss] + gc.grad(loss, [x] + ps)
    v = RNG.standard_normal((6, 3, 5)).astype(np.float32)
    f = gc.compile([x], outs, backend="cuda")
    got = f(v)
    want = gc.compile([x], outs, backend="numpy")(v)
    close(got, want, 2e-5, 2e-6)
    cp = next(iter(f._cache.values())).cprog
    # each time loop became one launch (fuse.py; tests/test_cuda_rnn.py covers more)
    loops = [s.time_loop for s in cp.steps if isinstance(s, Launch) and s.time_loop]
    assert len(loops) == 2 and {r.reverse for r in loops} == {False, True}
    assert all(r.length == 6 for r in loops)
