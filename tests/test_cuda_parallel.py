"""The generated CUDA kernels are parallel: no launch leaves a long loop nest to one
thread, and every launch with enough work fills the GPU (at least one block per SM).

CPU only: the CUDA source and launch plan of real workloads (LeNet-5's training
step at batch 256, ResNet-50 inference at batch 1 and 32, an LSTM training step,
an attention block with its gradients) are generated and read through the static
report (graphc/backends/cuda/report.py), which counts the statements each thread
of a launch runs in a row (loop nest leaves times their loops' extents).  On an H200 the LeNet step's serial max-pool
kernels (one thread each) took 234 of its 235 ms.
"""
from math import sqrt

import numpy as np
import pytest

import graphc as gc
from graphc import models, nn, optim
from graphc.backends import cuda as C
from graphc.backends.cuda import report as R
from graphc.ir.graph import Graph
from graphc.passes import optimize

SERIAL_MAX = 4096      # statements one thread may run in a row (GEMMs: tile steps)


def generate(inputs, outputs):
    g, _ = optimize(Graph(list(outputs), list(inputs)), 2)
    return C.generate_cuda(g)


def lenet_step(B):
    m = models.lenet5(rng=np.random.default_rng(0))
    x, y = gc.input("x", (B, 1, 28, 28)), gc.input("y", (B,), dtype="int64")
    loss = gc.cross_entropy(m(x), y)
    opt = optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    return [x, y], [loss] + list(opt.updates(loss).values())


def resnet50(B, size):
    from graphc.backends.cuda.bench import resnet50_graph
    x, logits = resnet50_graph(B, size)
    return [x], [logits]


def lstm_step(T=12, N=8, I=16, H=32):
    layer = nn.LSTM(I, H, rng=np.random.default_rng(0))
    x = gc.input("x", (T, N, I))
    y = layer(x)[0]
    loss = gc.sum(y * y)
    return [x], [loss] + gc.grad(loss, list(layer.parameters()))


def attention(B=8, L=128, D=64):
    q, k, v = (gc.input(n, (B, L, D)) for n in "qkv")
    a = gc.softmax((q @ gc.transpose(k, (0, 2, 1))) * (1.0 / sqrt(D)), axis=-1) @ v
    loss = gc.sum(a * a)
    return [q, k, v], [loss] + gc.grad(loss, [q, k, v])


def check_parallel(cp, device=R.H200):
    ests = R.estimate(cp, device)
    assert ests
    for e in ests:
        # a fused recurrence runs its time steps in order: bound each step's share
        per_launch = e.serial
        la = next(la for la in cp.launches if la.name == e.name)
        if la.time_loop is not None:
            per_launch = e.serial // la.time_loop.length
        assert per_launch <= SERIAL_MAX, (e.name, e.what, e.serial)
        if e.work >= R.ENOUGH_WORK and la.parts is None:
            # at least a block per SM; a GEMM at least a thread per output element
            # (more would need a split reduction dimension)
            outputs = la.mapping["gemm"].M * la.mapping["gemm"].N * e.blocks // max(
                la.grid[0] * la.grid[1], 1) if e.gemm else 0
            assert e.blocks >= device.sms or (e.gemm and e.threads >= outputs), \
                (e.name, e.what, e.grid, e.work)
    return ests


def test_lenet_step_batch_256_is_parallel():
    cp = generate(*lenet_step(256))
    check_parallel(cp)
    pools = [la for la in cp.launches if "max_pool2d" in la.name]
    assert len(pools) == 4
    for la in pools:          # a block per (n, c) plane, the row maxima in shared memory
        assert la.grid[0] in (256 * 6, 256 * 16) and la.block[0] >= 64, la
        assert la.mapping["private"] and "shared memory" in la.what


@pytest.mark.parametrize("batch", [1, 32])
def test_resnet50_inference_is_parallel(batch):
    # real widths and depth on a 64x64 image: the same kernels as at 224x224 (the
    # epilogues of batch 1 were 48 serial kernels), a quarter of the generation time
    cp = generate(*resnet50(batch, 64))
    ests = check_parallel(cp)
    assert not [e for e in ests if e.threads == 1]


def test_lstm_training_step_is_parallel():
    check_parallel(generate(*lstm_step()))


def test_attention_block_with_gradients_is_parallel():
    check_parallel(generate(*attention()))


def test_static_report_of_the_lenet_step():
    B = 256
    ins, outs = lenet_step(B)
    g, _ = optimize(Graph(list(outs), list(ins)), 2)
    cp = C.generate_cuda(g)
    ests = R.estimate(cp)
    tot = R.total_time(ests)
    # independently: the step's FLOPs are dominated by its convolutions and linear
    # layers (forward, input gradient and weight gradient: 3 x 2 x MACs) ...
    macs = B * (6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10)
    assert 0.8 * 6 * macs <= tot["flops"] <= 1.5 * 6 * macs, tot["flops"]
    # ... and its traffic every tensor of the graph written once, plus the column
    # matrices (im2col) the convolutions write and read: per image 25x784 (conv1)
    # and 150x100 (conv2) for the forward and the weight gradients, conv2's for its
    # input gradient; within a factor 2 (re-reads of inputs and weights)
    tensor_bytes = sum(int(np.prod(n.shape)) * n.dtype.itemsize for n in g.nodes
                       if n.op.name not in ("input", "parameter", "constant"))
    cols_bytes = B * 4 * 2 * (2 * (25 * 784 + 150 * 100) + 150 * 100)
    want = tensor_bytes + cols_bytes
    assert want / 2 <= tot["bytes"] <= 2 * want, (want, tot["bytes"])
    bound = max(want / R.H200.hbm_bytes_per_s, 6 * macs / R.H200.fp32_flops_per_s)
    assert bound / 2 <= tot["roofline_s"] <= 2 * bound, (bound, tot["roofline_s"])
    # no launch is left to a lone thread's latency: the kernels' estimate stays within
    # a few times the roofline (the serial pools made it ~4000x)
    assert tot["kernels_s"] <= 4 * tot["roofline_s"] + 50e-6, tot
    text = R.format_report(ests, title="LeNet-5 step")
    assert "k2_max_pool2d" in text and f"total: {len(ests)} launches" in text.splitlines()[-1]


@pytest.mark.parametrize("make", [lambda: lenet_step(256), attention], ids=["lenet256", "attention"])
def test_kernels_do_not_spill(make):
    from graphc.backends.cuda import compiler
    if compiler.ptxas_path() is None or not (compiler.nvrtc_version() or compiler.nvcc_path()):
        pytest.skip("needs ptxas and NVRTC or nvcc")
    comp = compiler.compile_cuda(generate(*make()).source)
    report = compiler.ptxas_report(comp.ptx)
    assert report
    for name, r in report.items():
        assert r.spill_stores == 0 and r.spill_loads == 0, (name, r.lines)
        assert r.shared_bytes <= 48 * 1024, (name, r.lines)
