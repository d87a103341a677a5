"""The wide GEMM tiles (gemm.wide_tile_lines: BM x BN in {64, 128}^2, 256 threads,
an 8x8 / 8x4 / 4x8 / 4x4 register micro-tile, double-buffered shared memory, float4
loads where aligned) on the CPU emulator, forced by GRAPHC_CUDA_GEMM_TILE so that
small, awkward shapes (1, 7, 129, 130, 257: partial tiles in M, N and K) run
through them, against float64 NumPy products; the automatic choice; and ptxas's
resource report for the kernels (no spills) when ptxas is present."""
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import compiler, gemm

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="the CUDA emulator needs a host C++ compiler (g++/clang++), none found")

RNG = np.random.default_rng(11)
EPS32 = np.finfo(np.float32).eps


@pytest.fixture(autouse=True)
def emulate():
    C.set_options(emulate=True)
    yield
    C.set_options(emulate=None)


def _check(got, a, b, k):
    want = a.astype(np.float64) @ b.astype(np.float64)
    bound = 2 * k * EPS32 * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-30
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want)
    assert np.all(err <= bound), (a.shape, b.shape, float((err - bound).max()))


# (M, K, N): every edge case of a 128 tile in M, N (1, 7, 129, 130) and K (1, 7, 257),
# and multiples of 4 (132, 136, 260) that take the float4 loads and stores
SHAPES = [(130, 257, 129), (7, 129, 257), (129, 1, 130), (1, 7, 1), (132, 136, 260),
          (257, 12, 4)]


@pytest.mark.parametrize("tile", ["128", "64x128", "128x64", "16"])
def test_wide_tile_matmul_edges(tile, monkeypatch):
    monkeypatch.setenv(gemm.TILE_ENV, tile)
    ins, outs, feeds = [], [], []
    for k, (m, kk, n) in enumerate(SHAPES):
        a, b = gc.input(f"a{k}", (m, kk)), gc.input(f"b{k}", (kk, n))
        ins += [a, b]
        outs.append(a @ b)
        feeds += [RNG.standard_normal((m, kk)).astype(np.float32),
                  RNG.standard_normal((kk, n)).astype(np.float32)]
    bm, bn = {"128": (128, 128), "16": (16, 16)}.get(tile) or map(int, tile.split("x"))
    cp = C.generate_cuda(gc.Graph(outs, ins))
    gemms = [la for la in cp.launches if "GEMM" in la.what]
    assert len(gemms) == len(SHAPES)
    for la, (m, kk, n) in zip(gemms, SHAPES):
        assert la.mapping["tile"] in ((bm, bn), bm) and la.block == (16, 16, 1)
        assert la.grid[:2] == (-(-n // bn), -(-m // bm))
    got = gc.compile(ins, outs, backend="cuda")(*feeds)
    for k, (m, kk, n) in enumerate(SHAPES):
        _check(got[k], feeds[2 * k], feeds[2 * k + 1], kk)


def test_wide_tile_batched_matmul(monkeypatch):
    # a batch of 3 on blockIdx.z: each batch's operands start at their own offset
    monkeypatch.setenv(gemm.TILE_ENV, "128")
    a, b = gc.input("a", (3, 130, 68)), gc.input("b", (3, 68, 9))
    va = RNG.standard_normal((3, 130, 68)).astype(np.float32)
    vb = RNG.standard_normal((3, 68, 9)).astype(np.float32)
    cp = C.generate_cuda(gc.Graph([a @ b], [a, b]))
    assert any("128x128-tile" in la.what and la.grid[2] == 3 for la in cp.launches)
    got = gc.compile([a, b], [a @ b], backend="cuda")(va, vb)[0]
    for i in range(3):
        _check(got[i], va[i], vb[i], 68)


@pytest.mark.parametrize("tile", ["128", "16"])
def test_forced_tile_conv_gradients_transposed_operands_and_atomics(tile, monkeypatch):
    # conv2d's gradients multiply by transposed (strided) operands, grad_weight sums
    # its images' GEMMs into one result with atomicAdd (and accumulates): every GEMM
    # here runs the forced tile with A and B read along either axis
    monkeypatch.setenv(gemm.TILE_ENV, tile)
    xs, ws = (3, 5, 9, 8), (7, 5, 3, 2)
    x, w = gc.input("x", xs), gc.input("w", ws)
    ys = gc.conv2d(x, w, padding=((1, 1), (1, 0))).shape
    g = gc.input("g", ys)
    outs = [gc.conv2d(x, w, padding=((1, 1), (1, 0))),
            gc.conv2d_grad_input(g, w, xs[2:], padding=((1, 1), (1, 0))),
            gc.conv2d_grad_weight(x, g, ws[2:], padding=((1, 1), (1, 0)))]
    feeds = [RNG.standard_normal(s).astype(np.float32) for s in (xs, ws, ys)]
    cp = C.generate_cuda(gc.Graph(outs, [x, w, g]))
    gemms = [la for la in cp.launches if "GEMM" in la.what]
    assert len(gemms) >= 3 and all(la.mapping["tile"] == (128 if tile == "128" else 16)
                                   or la.mapping["tile"] == (128, 128) for la in gemms)
    # both operand layouts occur (the loads walk whichever axis is contiguous)
    assert {g.a[3] == 1 for g in (la.mapping["gemm"] for la in gemms)} == {True, False}
    assert {g.b[3] == 1 for g in (la.mapping["gemm"] for la in gemms)} == {True, False}
    got = gc.compile([x, w, g], outs, backend="cuda")(*feeds)
    want = gc.compile([x, w, g], outs, backend="numpy")(*feeds)
    absv = gc.compile([x, w, g], outs, backend="numpy")(*[np.abs(f) for f in feeds])
    # the reference is NumPy's float32 result (error <= k eps |a||b| itself)
    for gv, wv, bd, k in zip(got, want, absv, (30, 42, 3 * ys[2] * ys[3])):
        assert gv.shape == wv.shape
        assert np.all(np.abs(gv - wv) <= 2 * k * EPS32 * bd + 1e-30)


def test_tile_choice(monkeypatch):
    monkeypatch.delenv(gemm.TILE_ENV, raising=False)

    class G:
        def __init__(self, M, N, K, dtype="float32"):
            from graphc.kernel.ir import Buffer
            buf = Buffer("x", dtype, 1)
            self.M, self.N, self.K = M, N, K
            self.a, self.b, self.c = (buf, 0, K, 1), (buf, 0, N, 1), (buf, 0, N, 1)
    assert gemm.choose_tile(G(4096, 4096, 4096), 1, 132) == (128, 128)   # 1024 blocks
    assert gemm.choose_tile(G(64, 3136, 576), 32, 132) == (64, 128)      # the conv: M = 64
    assert gemm.choose_tile(G(1024, 2048, 64), 1, 132) == (128, 64)      # 128x128: 128 blocks
    assert gemm.choose_tile(G(1024, 1024, 64), 1, 132) == (64, 64)
    assert gemm.choose_tile(G(1024, 1024, 7), 1, 132) == 16              # K < 16: 16x16
    assert gemm.choose_tile(G(6, 25, 200704), 1, 132) == 16              # few outputs
    assert gemm.choose_tile(G(6, 25, 784), 256, 132) == 16               # LeNet's dW: 6 rows
    assert gemm.choose_tile(G(150, 100, 16), 256, 132) == (64, 128)      # least padding
    assert gemm.choose_tile(G(4096, 4096, 4096, "float64"), 1, 132) == 64
    monkeypatch.setenv(gemm.TILE_ENV, "64")
    assert gemm.choose_tile(G(4096, 4096, 4096), 1, 132) == 64
    monkeypatch.setenv(gemm.TILE_ENV, "16")
    assert gemm.choose_tile(G(4096, 4096, 4096), 1, 132) == 16
    monkeypatch.setenv(gemm.TILE_ENV, "128")
    assert gemm.choose_tile(G(5, 5, 5), 1, 132) == (128, 128)
    assert gemm.choose_tile(G(5, 5, 5, "float64"), 1, 132) == 64   # wide tiles: fp32 only
    monkeypatch.setenv(gemm.TILE_ENV, "96")
    with pytest.raises(ValueError, match="GRAPHC_CUDA_GEMM_TILE"):
        gemm.choose_tile(G(5, 5, 5), 1, 132)


@pytest.mark.skipif(compiler.ptxas_path() is None or compiler.nvrtc_version() is None,
                    reason="needs NVRTC and ptxas")
@pytest.mark.parametrize("tile,minblocks", [("128", "2"), ("128", "1"), ("64x128", "2"),
                                            ("128x64", "2"), ("64x64", "2")])
def test_wide_tile_ptxas_no_spills(tile, minblocks, monkeypatch):
    # the real sizes (vectorized paths: strides multiple of 4) and an edge shape
    monkeypatch.setenv(gemm.TILE_ENV, tile)
    monkeypatch.setenv(gemm.MINBLOCKS_ENV, minblocks)
    a, b = gc.input("a", (4096, 4096)), gc.input("b", (4096, 4096))
    c, d = gc.input("c", (130, 257)), gc.input("d", (257, 129))
    x, w = gc.input("x", (32, 64, 56, 56)), gc.input("w", (64, 64, 3, 3))
    outs = [a @ b, c @ d, gc.conv2d(x, w, padding=((1, 1), (1, 1)))]
    cp = C.generate_cuda(gc.Graph(outs, [a, b, c, d, x, w]))
    report = compiler.ptxas_report(compiler.compile_cuda(cp.source).ptx)
    gemms = [la for la in cp.launches if "GEMM" in la.what]
    assert len(gemms) == 3
    for la in gemms:
        r = report[la.name]
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_bytes == 0, r.lines
        assert 0 < r.registers <= 255 and r.barriers >= 1, r.lines
        assert r.shared_bytes == la.smem <= 48 * 1024, r.lines
        if tile == "128" and minblocks == "2":     # two blocks of 256 threads per SM
            assert r.registers <= 128, r.lines
    if tile == "128":
        bounds = f"__launch_bounds__(256{', 2' if minblocks == '2' else ''})"
        assert all(f"{bounds} {la.name}(" in cp.source for la in gemms)


def test_bench_runs_matmul_per_forced_tile(monkeypatch):
    monkeypatch.delenv(gemm.TILE_ENV, raising=False)
    monkeypatch.delenv(gemm.MINBLOCKS_ENV, raising=False)
    # the A/B knob of the benchmark: one matmul (and conv) run per tile value
    from graphc.backends.cuda import bench
    text = bench.main(["--emulate", "--small", "--repeat", "1", "--only", "matmul,conv",
                       "--gemm-tiles", "64,128,128:1"])
    assert "matmul 64x64x64 (GEMM tiles: 64x64) [GRAPHC_CUDA_GEMM_TILE=64]" in text
    assert "matmul 64x64x64 (GEMM tiles: 128x128 wide) [GRAPHC_CUDA_GEMM_TILE=128]" in text
    assert ("matmul 64x64x64 (GEMM tiles: 128x128 wide) [GRAPHC_CUDA_GEMM_TILE=128 "
            "GRAPHC_CUDA_GEMM_MINBLOCKS=1]") in text
    assert "batch 2 (GEMM tiles: 128x128 wide) [GRAPHC_CUDA_GEMM_TILE=128]" in text
    assert text.count("graphc device") == 6
    import os
    assert gemm.TILE_ENV not in os.environ and gemm.MINBLOCKS_ENV not in os.environ


def test_wide_tile_misaligned_operands_take_scalar_loads(monkeypatch):
    # strides that are multiples of 4 but operands that start 4 bytes past a 16-byte
    # boundary (a view at an odd offset): the run-time check must route every load
    # and store through the scalar path, with the same exact result
    import ctypes

    from graphc.backends.cuda.runtime import EmulatorRuntime
    monkeypatch.setenv(gemm.TILE_ENV, "128")
    m, k, n = 132, 136, 260
    a, b = gc.input("a", (m, k)), gc.input("b", (k, n))
    cp = C.generate_cuda(gc.Graph([a @ b], [a, b]))
    (la,) = [la for la in cp.launches if "GEMM" in la.what]
    assert "avec" in cp.source and "bvec" in cp.source and "cvec" in cp.source
    va = RNG.standard_normal((m, k)).astype(np.float32)
    vb = RNG.standard_normal((k, n)).astype(np.float32)
    g = la.mapping["gemm"]
    rt = EmulatorRuntime()
    fns = rt.load(cp)
    args, ptr = [], {}
    for kind, buf in la.params:
        assert kind == "buf"
        p = rt.alloc(buf.size * 4 + 16) + 4            # 16-byte aligned + 4
        assert p % 16 == 4
        ptr[id(buf)] = p
        args.append(ctypes.c_void_p(p))
    rt.copy_htod(ptr[id(g.a[0])], va)
    rt.copy_htod(ptr[id(g.b[0])], vb)
    rt.launch(fns[la.name], la.grid, la.block, args)
    got = np.empty((m, n), np.float32)
    rt.copy_dtoh(got, ptr[id(g.c[0])])
    _check(got, va, vb, k)


def test_emulator_faults_on_misaligned_float4():
    # a GPU faults on a misaligned vector access, an x86 CPU would not: the emulator's
    # GC_LD4 / GC_ST4 check, so a wrong alignment test in a kernel fails the launch
    import ctypes

    from graphc.backends.cuda.codegen import Launch
    from graphc.backends.cuda.runtime import EmulatorRuntime
    from graphc.kernel.ir import Buffer

    class Prog:
        source = ('extern "C" __global__ void ld4(float* out, const float* in, const long long off) {\n'
                  "  const float4 v = GC_LD4(in + off);\n"
                  "  GC_ST4(out + off, v);\n}\n")
    o, i = Buffer("out", "float32", 8), Buffer("in", "float32", 8)
    from graphc.kernel.ir import Var
    Prog.launches = [Launch("ld4", (1, 1, 1), (1, 1, 1), [("buf", o), ("buf", i), ("var", Var("off"))],
                            False, None, "")]
    rt = EmulatorRuntime()
    fns = rt.load(Prog)
    dout, din = rt.alloc(32), rt.alloc(32)
    rt.copy_htod(din, np.arange(8, dtype=np.float32))
    rt.launch(fns["ld4"], (1, 1, 1), (1, 1, 1),
              [ctypes.c_void_p(dout), ctypes.c_void_p(din), ctypes.c_longlong(4)])
    got = np.zeros(8, np.float32)
    rt.copy_dtoh(got, dout)
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 4, 5, 6, 7])
    with pytest.raises(gc.GraphcError, match=r"emulated launch failed \(-3\)"):
        rt.launch(fns["ld4"], (1, 1, 1), (1, 1, 1),
                  [ctypes.c_void_p(dout), ctypes.c_void_p(din), ctypes.c_longlong(1)])
