"""CUDA benchmarks: graphc's CUDA backend against PyTorch CUDA (when installed).

    python -m graphc.backends.cuda.bench [--only matmul,conv,lenet] [--skip resnet32] [--repeat 20]
    python -m graphc.backends.cuda.bench --static            # per-kernel model, no GPU
    python -m graphc.backends.cuda.bench --emulate --small     # a smoke run on the CPU
    python -m graphc.backends.cuda.bench --only matmul,conv --gemm-tiles 64,128,128:2,auto

Workloads (the issue's): a 4096^3 float32 matmul, a ResNet-style 3x3 conv layer
(batch 32, 64->64 channels, 56x56), the LeNet-5 training step at batch 256, a
tanh RNN and an LSTM (input 64, hidden 256, T=100, batch 32) forward and
backward, and ResNet-50 inference at batch 1 and 32 (`resnet50_graph`: built
from graphc ops, no `onnx` needed; the PyTorch peer is the same net in torch.nn).  `--skip resnet32,...` leaves workloads out;
`--static` prints the static per-kernel report (report.py) without a GPU.
For graphc three times are reported: *device* (inputs already on the device,
every kernel of the graph launched, then a synchronize), *device graph* (the
same kernels captured once as a CUDA graph, replayed), *call* (the whole
Python call in the default mode: the inputs copied into pinned staging
buffers, one cuGraphLaunch of the captured step -- input copies, kernels,
parameter refresh, output copies -- one synchronize, the outputs copied out)
and *call nograph* (the same call with the step launched op by op, as with
GRAPHC_CUDA_GRAPHS=0; absent when graphs are off).  Each workload also prints
issue 15's goal for the call: device time + the input and output bytes at
20 GB/s.  PyTorch is timed the same way as *device* (tensors on the GPU, then
torch.cuda.synchronize()).  Implementations run interleaved, after warm-up;
medians are printed with the ratio torch/graphc.  Measured numbers:
docs/performance.md ("CUDA on an H200").
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _runner(fn):
    """The shape-specialized runner behind a compiled Function (after one call)."""
    return next(iter(fn._cache.values()))


def _graphc_impls(r, call) -> dict:
    """graphc's timed variants of one runner: *device* (launches + synchronize, data
    already there), *device graph* (the same kernels as one CUDA graph launch),
    *call* (the whole call in the default mode: one CUDA graph launch unless
    GRAPHC_CUDA_GRAPHS=0) and *call nograph* (the same call launched op by op)."""
    graphs = r.use_graphs

    def with_graph():
        r.use_graphs = graphs
        call()

    def without():
        r.use_graphs = False
        call()
        r.use_graphs = graphs
    impls = {"graphc device": r.launch_all}
    if graphs:
        impls["graphc device graph"] = r.launch_all_graph
    impls["graphc call"] = with_graph
    if graphs:
        impls["graphc call nograph"] = without
    impls["_moved"] = sum(a.nbytes for a in r._in_stage + r._out_stage)
    return impls


def _median_times(impls: dict, repeat: int, warmup: int = 2) -> dict:
    impls = dict(impls)
    moved = impls.pop("_moved", None)
    for _ in range(warmup):
        for f in impls.values():
            f()
    times = {k: [] for k in impls}
    for _ in range(repeat):
        for k, f in impls.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    if moved is not None:
        out["_moved"] = moved
    return out


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def bench_matmul(n, repeat, torch):
    import graphc as gc
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    x, y = gc.input("a", (n, n)), gc.input("b", (n, n))
    f = gc.compile([x, y], x @ y, backend="cuda")
    out = f(a, b)
    r = _runner(f)
    impls = _graphc_impls(r, lambda: f(a, b))
    if torch is not None:
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        ref = (ta @ tb).cpu().numpy()
        assert np.allclose(out, ref, rtol=1e-3, atol=1e-2 * np.sqrt(n))

        def tm():
            ta @ tb
            torch.cuda.synchronize()
        impls["torch"] = tm
    return f"matmul {n}x{n}x{n} ({_gemm_tiles(r)})", 2.0 * n ** 3, _median_times(impls, repeat)


def bench_conv(batch, ch, hw, repeat, torch):
    import graphc as gc
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((batch, ch, hw, hw), dtype=np.float32)
    wv = rng.standard_normal((ch, ch, 3, 3), dtype=np.float32) * 0.05
    x, w = gc.input("x", xv.shape), gc.input("w", wv.shape)
    f = gc.compile([x, w], gc.conv2d(x, w, padding=1), backend="cuda")
    out = f(xv, wv)
    r = _runner(f)
    impls = _graphc_impls(r, lambda: f(xv, wv))
    if torch is not None:
        tx, tw = torch.from_numpy(xv).cuda(), torch.from_numpy(wv).cuda()
        tf32 = torch.backends.cudnn.allow_tf32       # the check is fp32 against fp32; the
        torch.backends.cudnn.allow_tf32 = False      # timing keeps torch's default
        try:
            ref = torch.nn.functional.conv2d(tx, tw, padding=1).cpu().numpy()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        assert np.allclose(out, ref, rtol=1e-3, atol=1e-3), float(np.abs(out - ref).max())

        def tm():
            torch.nn.functional.conv2d(tx, tw, padding=1)
            torch.cuda.synchronize()
        impls["torch"] = tm
    flops = 2.0 * batch * ch * hw * hw * ch * 9
    return (f"conv 3x3 {ch}->{ch} {hw}x{hw} batch {batch} ({_gemm_tiles(r)})", flops,
            _median_times(impls, repeat))


def bench_lenet(batch, repeat, torch):
    import graphc as gc
    from graphc import models, optim
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    yb = rng.integers(0, 10, batch)
    m = models.lenet5(rng=np.random.default_rng(0))
    x, y = gc.input("x", (batch, 1, 28, 28)), gc.input("y", (batch,), dtype="int64")
    step = optim.SGD(m.parameters(), lr=0.01, momentum=0.9).compile_step(
        lambda a, b: gc.cross_entropy(m(a), b), x, y, backend="cuda")
    step(xb, yb)
    r = _runner(step.function)
    impls = _graphc_impls(r, lambda: step(xb, yb))
    if torch is not None:
        nn = torch.nn
        net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                            nn.Linear(84, 10)).cuda()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        tx, ty = torch.from_numpy(xb).cuda(), torch.from_numpy(yb).cuda()

        def tm():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(tx), ty).backward()
            opt.step()
            torch.cuda.synchronize()
        impls["torch"] = tm
    flops = 3 * 2.0 * batch * (6 * 784 * 25 + 16 * 100 * 150 + 400 * 120 + 120 * 84 + 840)
    return f"LeNet-5 train step batch {batch}", flops, _median_times(impls, repeat)


def bench_rnn(cell, T, batch, inp, hidden, repeat, torch):
    """A one-layer RNN (tanh) or LSTM, forward and backward through time (the loss
    sum(y^2)/2, gradients of the input and every weight), against cuDNN's."""
    import graphc as gc
    from graphc import nn
    rng = np.random.default_rng(2)
    xv = rng.standard_normal((T, batch, inp), dtype=np.float32)
    layer = getattr(nn, cell)(inp, hidden, rng=np.random.default_rng(0))
    x = gc.input("x", xv.shape)
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = gc.sum(y * y) * 0.5
    params = list(layer.parameters())
    f = gc.compile([x], [loss] + gc.grad(loss, [x] + params), backend="cuda")
    f(xv)
    r = _runner(f)
    impls = _graphc_impls(r, lambda: f(xv))
    if torch is not None:
        net = getattr(torch.nn, cell)(inp, hidden).cuda()
        with torch.no_grad():
            for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(net, n).copy_(torch.from_numpy(np.asarray(getattr(layer, n).value)))
        tx = torch.from_numpy(xv).cuda().requires_grad_()

        def tm():
            yy = net(tx)[0]
            (yy * yy).sum().mul(0.5).backward()
            torch.cuda.synchronize()
        impls["torch"] = tm
    gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[cell]
    flops = 3 * 2.0 * T * batch * gates * hidden * (inp + hidden)
    return (f"{cell} in {inp} hidden {hidden} T={T} batch {batch} fwd+bwd", flops,
            _median_times(impls, repeat))


# ResNet-50: (width, blocks, stride) of its four stages of bottleneck blocks
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def resnet50_graph(batch, size=224, seed=0):
    """ResNet-50 inference (widths and depth of graphc.onnx.zoo.resnet50, the same
    ops as its import: convolutions without bias, batch norm with running
    statistics, ReLU, the residual adds) built from graphc ops, so that no `onnx`
    package is needed.  Returns (input, logits)."""
    import graphc as gc
    rng = np.random.default_rng(seed)

    def param(shape, scale):
        return gc.Parameter((rng.standard_normal(shape) * scale).astype(np.float32))

    def chan(v):
        return gc.reshape(v, (-1, 1, 1))

    def bn(x, c):
        mean, var = param((c,), 0.1), gc.Parameter(rng.uniform(0.5, 1.5, c).astype(np.float32))
        gamma = gc.Parameter(rng.uniform(0.5, 1.5, c).astype(np.float32))
        beta = param((c,), 0.1)
        inv = gc.reciprocal(gc.sqrt(var + 1e-5))
        return (x - chan(mean)) * chan(inv) * chan(gamma) + chan(beta)

    def conv(x, cin, cout, k, stride=1):
        w = param((cout, cin, k, k), (2.0 / (cin * k * k)) ** 0.5)
        return gc.conv2d(x, w, stride=stride, padding=k // 2)

    def cbr(x, cin, cout, k, stride=1):
        return gc.relu(bn(conv(x, cin, cout, k, stride), cout))

    xin = gc.input("x", (batch, 3, size, size))
    x = gc.max_pool2d(cbr(xin, 3, 64, 7, 2), 3, 2, 1)
    c = 64
    for width, blocks, stride in RESNET50_STAGES:
        for k in range(blocks):
            s = stride if k == 0 else 1
            out = 4 * width
            h = cbr(cbr(x, c, width, 1), width, width, 3, s)
            h = bn(conv(h, width, out, 1), out)
            skip = x if (s == 1 and c == out) else bn(conv(x, c, out, 1, s), out)
            x = gc.relu(h + skip)
            c = out
    feat = gc.mean(x, axis=(2, 3))
    logits = feat @ gc.transpose(param((1000, c), c ** -0.5)) + param((1000,), 0.1)
    return xin, logits


def _torch_resnet50(torch):
    """The same architecture in torch.nn (no torchvision needed), eval mode."""
    nn = torch.nn

    def cbr(cin, cout, k, stride=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            out = 4 * width
            self.body = nn.Sequential(*cbr(cin, width, 1), *cbr(width, width, 3, stride),
                                      nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
            self.skip = nn.Identity() if (stride == 1 and cin == out) else nn.Sequential(
                nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers, c = [*cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in RESNET50_STAGES:
        for k in range(blocks):
            layers.append(Bottleneck(c, width, stride if k == 0 else 1))
            c = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000)]
    return nn.Sequential(*layers).cuda().eval()


def bench_resnet50(batch, repeat, torch, size=224):
    """ResNet-50 inference (resnet50_graph) against the same network in torch.nn."""
    import graphc as gc
    xv = np.random.default_rng(3).standard_normal((batch, 3, size, size)).astype(np.float32)
    x, logits = resnet50_graph(batch, size)
    t0 = time.perf_counter()
    f = gc.compile([x], [logits], backend="cuda")
    f(xv)
    print(f"  (ResNet-50 batch {batch}: compiled and ran once in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    r = _runner(f)
    impls = _graphc_impls(r, lambda: f(xv))
    if torch is not None:
        net = _torch_resnet50(torch)
        tx = torch.from_numpy(xv).cuda()

        def tm():
            with torch.no_grad():
                net(tx)
            torch.cuda.synchronize()
        impls["torch"] = tm
    flops = 2 * 4.1e9 * batch * (size / 224) ** 2
    return f"ResNet-50 inference batch {batch} {size}x{size}", flops, _median_times(
        impls, repeat, warmup=1)


def static_report(only, small) -> str:
    """The static per-kernel report (report.py) of the workloads, no GPU needed."""
    import graphc as gc
    from graphc import models, optim
    from graphc.ir.graph import Graph
    from graphc.passes import optimize
    from . import generate_cuda
    from . import report as R
    from .compiler import CudaCompileError, compile_cuda, ptxas_report
    out = []

    def one(title, inputs, outputs):
        g, _ = optimize(Graph(list(outputs), list(inputs)), 2)
        cp = generate_cuda(g)
        try:
            res = ptxas_report(compile_cuda(cp.source).ptx)
        except (CudaCompileError, OSError) as e:   # no NVRTC/ptxas: the rest still holds
            print(f"  (no ptxas figures: {str(e).splitlines()[0]})", flush=True)
            res = None
        text = R.format_report(R.estimate(cp, resources=res), title=title)
        print(text, flush=True)
        out.append(text)
    if "matmul" in only:       # the GEMM tile chosen (GRAPHC_CUDA_GEMM_TILE), its registers
        n = 64 if small else 4096
        a, b = gc.input("a", (n, n)), gc.input("b", (n, n))
        one(f"matmul {n}x{n}x{n}", [a, b], [a @ b])
    if "conv" in only:
        B, ch, hw = (2, 8, 12) if small else (32, 64, 56)
        x, w = gc.input("x", (B, ch, hw, hw)), gc.input("w", (ch, ch, 3, 3))
        one(f"conv 3x3 {ch}->{ch} {hw}x{hw} batch {B}", [x, w], [gc.conv2d(x, w, padding=1)])
    if "lenet" in only:
        B = 8 if small else 256
        m = models.lenet5(rng=np.random.default_rng(0))
        x, y = gc.input("x", (B, 1, 28, 28)), gc.input("y", (B,), dtype="int64")
        loss = gc.cross_entropy(m(x), y)
        opt = optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        one(f"LeNet-5 SGD step batch {B}", [x, y], [loss] + list(opt.updates(loss).values()))
    for cell in ("rnn", "lstm"):
        if cell in only:
            from graphc import nn
            T, N, I, H = (5, 2, 4, 8) if small else (100, 32, 64, 256)
            layer = getattr(nn, cell.upper())(I, H, rng=np.random.default_rng(0))
            x = gc.input("x", (T, N, I))
            yv = layer(x)[0]
            loss = gc.sum(yv * yv) * 0.5
            one(f"{cell.upper()} hidden {H} T={T} batch {N} fwd+bwd", [x],
                [loss] + gc.grad(loss, [x] + list(layer.parameters())))
    for b in (1, 32):
        if f"resnet{b}" in only:
            size = 64 if small else 224
            x, logits = resnet50_graph(b, size)
            one(f"ResNet-50 inference batch {b} {size}x{size}", [x], [logits])
    return "\n".join(out)


def _gemm_tiles(r) -> str:
    """The GEMM kernels' tiles in a compiled runner: "16x16", "64x64", "128x128 wide"."""
    out = []
    for la in r.cprog.launches:
        t = (la.mapping or {}).get("tile")
        name = None if t is None else f"{t[0]}x{t[1]} wide" if isinstance(t, tuple) else f"{t}x{t}"
        if name and name not in out:
            out.append(name)
    return "GEMM tiles: " + (", ".join(out) or "none")


def with_gemm_tile(tile, bench, *args):
    """Run `bench` with GRAPHC_CUDA_GEMM_TILE set while it compiles: `tile` is a value
    of it, optionally with `:N` for GRAPHC_CUDA_GEMM_MINBLOCKS (128:2); None: as set."""
    import os

    from .gemm import MINBLOCKS_ENV, TILE_ENV
    if tile is None:
        return bench(*args)
    value, _, mb = tile.partition(":")
    env = {TILE_ENV: value, MINBLOCKS_ENV: mb or None}
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        name, flops, times = bench(*args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    label = f"{TILE_ENV}={value}" + (f" {MINBLOCKS_ENV}={mb}" if mb else "")
    return f"{name} [{label}]", flops, times


GOAL_BYTES_PER_S = 20e9   # issue 15: call <= device + the bytes moved at 20 GB/s


def report(name, flops, times) -> str:
    lines = [name]
    times = dict(times)
    moved = times.pop("_moved", None)
    base = times.get("graphc device")
    for k, t in times.items():
        ratio = f"  torch/graphc-device {t / base:.2f}" if k == "torch" and base else ""
        lines.append(f"  {k:19s} {t * 1e3:9.3f} ms  {flops / t / 1e9:9.1f} GFLOP/s{ratio}")
    if moved is not None and base:
        goal = base + moved / GOAL_BYTES_PER_S
        call = times.get("graphc call")
        lines.append(f"  (inputs+outputs {moved / 1e6:.1f} MB; call goal <= device + bytes at "
                     f"20 GB/s = {goal * 1e3:.3f} ms" +
                     (f"; call/goal {call / goal:.2f})" if call else ")"))
    return "\n".join(lines)


def main(argv=None, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="matmul,conv,lenet,rnn,lstm,resnet1,resnet32",
                    help="comma-separated workloads (matmul, conv, lenet, rnn, lstm, "
                         "resnet1, resnet32)")
    ap.add_argument("--skip", default="", help="workloads to leave out (e.g. resnet32)")
    ap.add_argument("--static", action="store_true",
                    help="no GPU: print the static per-kernel report (report.py) instead")
    ap.add_argument("--gemm-tiles", default="",
                    help="comma-separated GRAPHC_CUDA_GEMM_TILE values (auto, 16, 64, 128, "
                         "64x128, ...; 128:2 also sets GRAPHC_CUDA_GEMM_MINBLOCKS=2): "
                         "matmul and conv are run once per value (A/B)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--emulate", action="store_true", help="run on the CPU emulator")
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) - set(args.skip.split(","))
    if args.static:
        return static_report(only, args.small)
    from . import select_runtime, set_options
    set_options(emulate=True if args.emulate else None)
    rt = select_runtime()
    torch = None if args.emulate else _torch_cuda()
    from .runtime import graphs_enabled
    graphs = "on" if (graphs_enabled() and rt.graphs) else "off"
    print(f"graphc CUDA backend on {type(rt).__name__} ({rt.arch}); CUDA graphs {graphs}; "
          f"PyTorch CUDA: {'yes' if torch is not None else 'not available'}", flush=True)
    out = []
    tiles = [t for t in args.gemm_tiles.split(",") if t] or [None]
    for tile in tiles:
        if "matmul" in only:
            out.append(with_gemm_tile(tile, bench_matmul, 64 if args.small else 4096,
                                      args.repeat, torch))
            print(report(*out[-1]), flush=True)
        if "conv" in only:
            out.append(with_gemm_tile(tile, bench_conv,
                                      *((2, 8, 12) if args.small else (32, 64, 56)),
                                      args.repeat, torch))
            print(report(*out[-1]), flush=True)
    if "lenet" in only:
        out.append(bench_lenet(8 if args.small else 256, args.repeat, torch))
        print(report(*out[-1]), flush=True)
    for cell in ("rnn", "lstm"):
        if cell in only:
            sizes = (5, 2, 4, 8) if args.small else (100, 32, 64, 256)
            out.append(bench_rnn(cell.upper(), *sizes, args.repeat, torch))
            print(report(*out[-1]), flush=True)
    for b in (1, 32):
        if f"resnet{b}" in only and not args.small:
            out.append(bench_resnet50(b, max(3, args.repeat // 4), torch))
            print(report(*out[-1]), flush=True)
    print("summary:", flush=True)
    text = "\n".join(report(*o) for o in out)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
