"""CUDA code generation and compilation, without a GPU: the mapping of kernel-IR
loops to threads/blocks, the generated source's readability (the graph node
in a comment), NVRTC/nvcc compilation to PTX and cubin, the disk cache, the
compile-error report, and `ptxas -v` resource limits for every kernel of an
MLP and a LeNet-5 training step."""
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import compiler, gemm
from graphc.backends.cuda.codegen import HostLoop
from graphc.ir.errors import NotLoweredError
from graphc.ir.graph import Graph

HAVE_NVRTC = compiler.nvrtc_version() is not None
HAVE_NVCC = compiler.nvcc_path() is not None
needs_compiler = pytest.mark.skipif(not (HAVE_NVRTC or HAVE_NVCC),
                                    reason="neither NVRTC (cuda-bindings + nvidia-cuda-nvrtc) "
                                           "nor nvcc is installed")
needs_ptxas = pytest.mark.skipif(compiler.ptxas_path() is None, reason="ptxas not found")

# sm_90 (H100) limits
MAX_SMEM_PER_BLOCK = 48 * 1024     # static shared memory
MAX_REGS = 255


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cuda-cache"))


def gen(inputs, outputs, optimize=2):
    from graphc.passes import optimize as opt
    g, _ = opt(Graph(list(outputs), list(inputs)), optimize)
    return C.generate_cuda(g)


def launch_of(cprog, prefix):
    return [la for la in cprog.launches if la.name.split("_", 1)[1].startswith(prefix)]


def kernel_text(cprog, name):
    src = cprog.source
    start = src.index(f"// {name}:")
    end = src.find("\n// k", start + 1)
    return src[start:end if end > 0 else None]


# ------------------------------------------------------------------ mapping
def test_elementwise_is_one_thread_per_element_with_a_guard():
    x = gc.input("x", (7, 13))
    cp = gen([x], [gc.relu(x) * 2.0 + 1.0], optimize=0)
    for la in cp.launches:
        assert la.block[0] * la.grid[0] >= 91 and la.block[0] % 32 == 0
        text = kernel_text(cp, la.name)
        assert "if (gid >= 91LL) return;" in text
        assert "__syncthreads" not in text


def test_each_kernel_names_its_graph_node_and_line():
    x = gc.input("x", (4, 5))
    y = gc.softmax(gc.tanh(x), axis=-1)
    cp = gen([x], [y], optimize=0)
    assert len(cp.launches) == 2
    for la in cp.launches:
        text = kernel_text(cp, la.name)
        assert "test_cuda_codegen.py:" in text.splitlines()[1]
        assert la.node is not None


def test_long_reduction_uses_a_block_tree_in_shared_memory():
    x = gc.input("x", (3, 1000))
    cp = gen([x], [gc.sum(x, axis=1)], optimize=0)
    (la,) = cp.launches
    assert la.grid == (3, 1, 1) and la.block == (256, 1, 1) and la.sync
    text = kernel_text(cp, la.name)
    assert "__shared__ float gc_red_float32[256];" in text
    assert "__syncthreads();" in text and "blockDim.x / 2" in text


def test_whole_array_reduction_is_one_block():
    x = gc.input("x", (5000,))
    cp = gen([x], [gc.max(x)], optimize=0)
    (la,) = cp.launches
    assert la.grid == (1, 1, 1) and la.block == (256, 1, 1)


def test_few_long_rows_reduce_in_two_launches_that_fill_the_gpu():
    # a bias gradient: 6 rows of 256*28*28; a block per row would leave 126 of 132
    # SMs idle: each row is split over many blocks (partials), then combined
    x = gc.input("x", (256, 6, 28, 28))
    cp = gen([x], [gc.sum(x, axis=(0, 2, 3))], optimize=0)
    first, second = cp.launches
    assert first.grid[0] >= 132 and first.grid[0] % 6 == 0 and first.mapping["split"] > 1
    assert second.grid == (6, 1, 1)
    (part,) = cp.extra_buffers
    assert part.size == first.grid[0] and part.name in kernel_text(cp, second.name)


def test_short_rows_reduce_in_one_thread_each():
    x = gc.input("x", (300, 10))
    cp = gen([x], [gc.softmax(x, axis=1)], optimize=0)
    (la,) = cp.launches
    assert la.block[0] * la.grid[0] >= 300 and not la.sync


def test_matmul_is_a_shared_memory_tiled_gemm():
    a, b = gc.input("a", (2, 33, 17)), gc.input("b", (2, 17, 40))
    cp = gen([a, b], [a @ b], optimize=0)
    (la,) = cp.launches
    assert la.block == (16, 16, 1)
    assert la.grid == (3, 3, 2)           # N tiles, M tiles, batch on blockIdx.z
    text = kernel_text(cp, la.name)
    assert "__shared__ float As[16][17];" in text and text.count("__syncthreads();") == 2


def test_conv_batch_runs_at_once_with_per_image_scratch():
    x, w = gc.input("x", (3, 2, 6, 6)), gc.input("w", (4, 2, 3, 3))
    cp = gen([x, w], [gc.conv2d(x, w, padding=1)], optimize=0)
    assert cp.launch_count() == 2         # (the group loop, of 1, stays on the host)
    im2col, gemm = cp.launches
    assert "thread per (n, " in im2col.what
    assert gemm.grid[2] == 3 and "batched over (n)" in gemm.what
    (scratch,) = cp.extra_buffers                  # im2col columns, one copy per image
    assert scratch.size == 3 * (2 * 3 * 3) * (6 * 6)


def test_conv_loops_stay_on_the_host_when_scratch_is_too_big(monkeypatch):
    from graphc.backends.cuda import transform
    monkeypatch.setattr(transform, "PRIVATE_LIMIT_BYTES", 0)
    x, w = gc.input("x", (3, 2, 6, 6)), gc.input("w", (4, 2, 3, 3))
    cp = gen([x, w], [gc.conv2d(x, w, padding=1)], optimize=0)
    loops = [s for s in cp.steps if isinstance(s, HostLoop)]
    assert loops and loops[0].extent == 3
    assert cp.launch_count() == 3 * 2     # im2col + GEMM per image
    # the loop variable is a kernel parameter
    assert any(kind == "var" for la in cp.launches for kind, _ in la.params)


def test_serial_loop_around_a_gemm_is_a_host_loop():
    from graphc.kernel import ir as K
    from graphc.kernel.lower import Program
    A, B, Cb = K.Buffer("A", "float32", 12), K.Buffer("B", "float32", 6), \
        K.Buffer("C", "float32", 8)
    n = K.Var("n")
    # C[n] (+)= A[n] @ B, iterations in order (accumulating into one C): not batchable
    g = K.Gemm(2, 2, 3, (A, K.mul(n, 6), 3, 1), (B, K.idx(0), 2, 1), (Cb, K.idx(0), 2, 1),
               accumulate=True)
    prog = Program()
    prog.kernels.append(K.Kernel("acc", [Cb, A, B], [K.Loop(n, 2, [g])]))
    prog.kernel_nodes.append(None)
    cp = C.codegen.generate(prog)
    (loop,) = cp.steps
    assert isinstance(loop, HostLoop) and loop.extent == 2
    assert cp.launches[0].params[-1] == ("var", n)


def test_scatter_adds_become_atomics():
    x = gc.input("x", (2, 3, 9, 9))
    y = gc.max_pool2d(x, 3, 2)
    dx, = gc.grad(gc.sum(y * y), [x])
    cp = gen([x], [dx], optimize=0)
    assert "atomicAdd(&" in cp.source


def test_unlowered_op_is_reported(monkeypatch):
    # every registered op lowers today: pretend two do not
    from graphc.kernel import lower
    monkeypatch.delitem(lower.LOWER, "tanh")
    monkeypatch.delitem(lower.LOWER, "exp")
    x = gc.input("x", (3, 4))
    y = gc.exp(gc.tanh(x))
    with pytest.raises(NotLoweredError, match="exp, tanh"):
        gen([x], [y], optimize=0)
    C.set_options(emulate=True)
    try:
        with pytest.raises(NotLoweredError, match="cuda backend"):
            gc.compile([x], [y], backend="cuda", optimize=0)(np.ones((3, 4), np.float32))
    finally:
        C.set_options(emulate=None)


# ------------------------------------------------------------------ compiling
def _mlp_step():
    rng = np.random.default_rng(0)
    x, y = gc.input("x", (32, 64)), gc.input("y", (32,), dtype="int64")
    ps = [gc.Parameter(rng.standard_normal(s).astype(np.float32), name=n)
          for n, s in (("w1", (64, 128)), ("b1", (128,)), ("w2", (128, 10)), ("b2", (10,)))]
    loss = gc.cross_entropy(gc.relu(x @ ps[0] + ps[1]) @ ps[2] + ps[3], y)
    grads = gc.grad(loss, ps)
    return [x, y], [loss] + [p - 0.1 * g for p, g in zip(ps, grads)]


def _lenet_step():
    from graphc import models, optim
    m = models.lenet5(rng=np.random.default_rng(0))
    x, y = gc.input("x", (64, 1, 28, 28)), gc.input("y", (64,), dtype="int64")
    opt = optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loss = gc.cross_entropy(m(x), y)
    ups = opt.updates(loss)
    return [x, y], [loss] + list(ups.values())


def _lstm_step():
    from graphc import nn, optim
    rng = np.random.default_rng(0)
    lstm, head = nn.LSTM(16, 32, rng=rng), nn.Linear(32, 10, rng=rng)
    x, y = gc.input("x", (12, 8, 16)), gc.input("y", (8,), dtype="int64")
    out = lstm(x)
    h = out[0] if isinstance(out, tuple) else out
    loss = gc.cross_entropy(head(h[-1]), y)
    opt = optim.SGD(list(lstm.parameters()) + list(head.parameters()), lr=0.1)
    return [x, y], [loss] + list(opt.updates(loss).values())


def _gru_step():
    from graphc import nn, optim
    rng = np.random.default_rng(1)
    gru, head = nn.GRU(5, 13, num_layers=2, rng=rng), nn.Linear(13, 3, rng=rng)
    x, y = gc.input("x", (7, 3, 5)), gc.input("y", (3,), dtype="int64")
    h = gru(x)[0]
    loss = gc.cross_entropy(head(h[-1]), y)
    opt = optim.SGD(list(gru.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    return [x, y], [loss] + list(opt.updates(loss).values())


@needs_compiler
@needs_ptxas
@pytest.mark.parametrize("make", [_mlp_step, _lenet_step, _lstm_step, _gru_step],
                         ids=["mlp", "lenet5", "lstm", "gru2"])
def test_training_step_kernels_compile_and_fit_resources(make):
    ins, outs = make()
    cp = gen(ins, outs)
    comp = compiler.compile_cuda(cp.source)
    assert comp.ptx.startswith(b"//") and b".target sm_90" in comp.ptx
    assert comp.cubin[:4] == b"\x7fELF"
    report = compiler.ptxas_report(comp.ptx)
    names = {la.name for la in cp.launches}
    assert names == set(report)           # every kernel was compiled by ptxas
    for name, r in report.items():
        assert r.spill_stores == 0 and r.spill_loads == 0, (name, r.lines)
        assert r.shared_bytes <= MAX_SMEM_PER_BLOCK, (name, r.lines)
        assert 0 < r.registers <= MAX_REGS, (name, r.lines)
    gemms = [n for n in names if "GEMM" in next(la.what for la in cp.launches if la.name == n)]
    # 16x16, 64x64 or a wide tile (gemm.wide_tile_smem): the plan's figure is ptxas's
    wide = {gemm.wide_tile_smem(bm, bn) for bm in (64, 128) for bn in (64, 128)}
    assert gemms and all(report[n].shared_bytes in {2 * 16 * 17 * 4, 2 * 16 * 65 * 4} | wide
                         for n in gemms)
    assert all(report[la.name].shared_bytes == la.smem for la in cp.launches if la.name in gemms)
    assert all(report[n].barriers >= 1 for n in gemms)
    if make in (_lstm_step, _gru_step):
        # forward and BPTT loops: each whole loop is one fused kernel (checked above by
        # ptxas like the rest: no spills, registers and shared memory within limits)
        from graphc.backends.cuda.codegen import TimeLoop
        assert not [s for s in cp.steps if isinstance(s, TimeLoop)]
        seqs = [la for la in cp.steps if getattr(la, "time_loop", None) is not None]
        assert {la.time_loop.reverse for la in seqs} == {False, True}
        for la in seqs:
            assert la.parts and report[la.name].barriers >= 1
            assert report[la.name].stack_bytes == 0, report[la.name].lines


@needs_compiler
def test_compile_cache_and_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    x = gc.input("x", (10,))
    src = gen([x], [gc.exp(x)]).source
    first = compiler.compile_cuda(src, arch="sm_80")
    second = compiler.compile_cuda(src, arch="sm_80")
    assert not first.cached and second.cached
    assert second.ptx == first.ptx and b".target sm_80" in first.ptx
    assert len(list(tmp_path.glob("*.cubin"))) == 1
    compiler.compile_cuda(src, arch="sm_90")
    assert len(list(tmp_path.glob("*.cubin"))) == 2
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    assert not compiler.compile_cuda(src, arch="sm_80").cached


@needs_compiler
def test_compile_error_quotes_the_generated_line():
    src = ('extern "C" __global__ void k(float* a) {\n'
           '  a[threadIdx.x] = undefined_thing + 1.0f;\n'
           '}\n')
    with pytest.raises(compiler.CudaCompileError) as e:
        compiler.compile_cuda(src)
    msg = str(e.value)
    assert "undefined_thing" in msg
    assert ">    2 |   a[threadIdx.x] = undefined_thing + 1.0f;" in msg


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not installed")
def test_nvcc_fallback_gives_the_same_kernels(monkeypatch):
    x = gc.input("x", (10,))
    src = gen([x], [gc.sigmoid(x)]).source
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: None)
    comp = compiler.compile_cuda(src, prefer="nvcc")
    assert comp.compiler.startswith("nvcc") and comp.cubin[:4] == b"\x7fELF"
    assert b".entry k0_sigmoid" in comp.ptx


def test_ptxas_output_parser():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k3_sum' for 'sm_90'
ptxas info    : Function properties for k3_sum
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function 'k4_relu' for 'sm_90'
ptxas info    : Function properties for k4_relu
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 368 bytes cmem[0]
"""
    r = compiler.parse_ptxas(text)
    assert set(r) == {"k3_sum", "k4_relu"}
    s = r["k3_sum"]
    assert (s.registers, s.spill_stores, s.spill_loads, s.stack_bytes, s.shared_bytes,
            s.barriers) == (40, 4, 4, 8, 1024, 1)
    assert (r["k4_relu"].registers, r["k4_relu"].shared_bytes) == (8, 0)


def test_dump_writes_source_and_kernel_ir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_DUMP_CUDA", str(tmp_path))
    C.set_options(emulate=True)
    try:
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            pytest.skip("no host C++ compiler for the emulator")
        x = gc.input("x", (3,))
        f = gc.compile([x], gc.exp(x), backend="cuda")
        np.testing.assert_allclose(f(np.zeros(3, np.float32)), np.ones(3))
    finally:
        C.set_options(emulate=None)
    src = (tmp_path / "graphc_kernels.cu").read_text()
    assert 'extern "C" __global__' in src and "expf(" in src
    assert "kernel " in (tmp_path / "graphc.kernels.txt").read_text()


@needs_compiler
@needs_ptxas
def test_every_kind_of_kernel_compiles_for_the_gpu():
    """NVRTC (not only the emulator's host compiler) accepts kernels of every lowered
    op family: int32/int64/bool/float64 arithmetic, hashing, atomics, indexing."""
    x = gc.input("x", (6, 9))
    d = gc.input("d", (6, 9), dtype="float64")
    i = gc.input("i", (6, 9), dtype="int32")
    ids = gc.input("ids", (4,), dtype="int64")
    wt = gc.Parameter(np.ones((10, 9), np.float32), name="wt")
    key = gc.Parameter(np.array(7, np.int64), name="key")
    loss = (gc.sum(gc.dropout(x, 0.2, key) * gc.embedding(ids, wt).sum())
            + gc.sum(gc.pad(x, ((1, 1), (0, 2)))) + gc.logsumexp(x)
            + gc.sum(gc.cast(gc.argmax(x, axis=1), "float32")))
    outs = [loss] + gc.grad(loss, [x, wt]) + [
        i * i + gc.div(i, 3), gc.cast(gc.less(i, 2), "float64") * gc.exp(d), gc.max(d, axis=0),
        gc.one_hot(ids, 10), gc.concatenate([x, gc.sqrt(gc.abs(x))], axis=0)]
    cp = gen([x, d, i, ids], outs)
    comp = compiler.compile_cuda(cp.source)
    report = compiler.ptxas_report(comp.ptx)
    assert set(report) == {la.name for la in cp.launches}
    assert all(r.spill_stores == 0 for r in report.values())
    assert "atomicAdd(&" in cp.source and "gc_lshr(" in cp.source and "gc_wmul(" in cp.source


@needs_compiler
@needs_ptxas
def test_per_step_fused_kernels_fit_resources(monkeypatch):
    """The other fusion mode (one launch per time step, used where a loop's views do not
    allow a whole-sequence kernel) also compiles without spills."""
    from graphc.backends.cuda import fuse
    from graphc.backends.cuda.codegen import TimeLoop
    monkeypatch.setattr(fuse, "SEQUENCE_KERNELS", False)
    ins, outs = _lstm_step()
    cp = gen(ins, outs)
    report = compiler.ptxas_report(compiler.compile_cuda(cp.source).ptx)
    loops = [s for s in cp.steps if isinstance(s, TimeLoop)]
    assert len(loops) == 2
    for s in loops:
        (la,) = s.steps
        r = report[la.name]
        assert la.parts and r.spill_stores == r.spill_loads == r.stack_bytes == 0, r.lines
        assert 0 < r.registers <= MAX_REGS and r.shared_bytes <= MAX_SMEM_PER_BLOCK


def test_ptxas_parser_ignores_device_functions():
    # libdevice helpers that Adam's pow pulls in are reported by ptxas too; their
    # figures belong to no kernel and must not show up as a 0-register "kernel".
    from graphc.backends.cuda.compiler import parse_ptxas
    text = """ptxas info    : Function properties for __internal_accurate_pow
    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k0' for 'sm_90'
ptxas info    : Function properties for k0
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
"""
    r = parse_ptxas(text)
    assert list(r) == ["k0"]
    k = r["k0"]
    assert (k.registers, k.barriers, k.shared_bytes) == (30, 1, 1024)
    assert (k.stack_bytes, k.spill_stores, k.spill_loads) == (8, 4, 4)
