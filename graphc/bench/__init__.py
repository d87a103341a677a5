"""Benchmarks: graphc's LLVM backend against NumPy and PyTorch (when installed).

    python -m graphc.bench [--threads 2] [--repeat 15] [--only matmul,conv,lenet]
    graphc bench ...                       (the CLI forwards here)

Every workload is timed in one process with its peers *interleaved* (one run
of each implementation per round, after warm-up), so machine noise hits all of
them alike; the table shows medians and the ratio peer_time / graphc_time
(> 1: graphc is faster).  Compile times (cold, and warm from the disk cache
when a second compile hits it) are reported separately.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


# ------------------------------------------------------------------ timing
_SOLO_ALL = False     # --solo: every implementation in rounds of its own
SETTLE = 0.015        # --settle: untimed calls before each timed one in a round (s)


def interleaved(impls: dict, repeat: int, warmup: int = 2, solo=None,
                min_time: float = 2e-3, settle: float = None) -> dict:
    """{name: fn} -> {name: median seconds per call} over `repeat` rounds; each round
    times every fn in turn (interleaved, so slow drifts of the machine hit all alike).

    In a round, each fn first runs untimed for `settle` seconds (default SETTLE,
    15 ms; at least one call), then is timed.  Thread pools keep spinning after a
    call and take a CPU from whatever runs next: measured on the 2-CPU VM,
    graphc's 1024^3 matmul right after PyTorch's took 19.1 ms, 13.6 ms 5 ms later
    and 11.3 ms 10 ms later (PyTorch's own time: 11.3-12.8 ms); graphc's workers
    spin only ~4000 `pause` rounds.  Pausing instead (sleeping between calls) is
    no fairer: PyTorch's parked threads then wake slowly on this VM (its batch-1
    LeNet step: 1.0 ms back to back, 2-13 ms after a 20-ms sleep).  The untimed
    calls absorb the switch from the other framework; the timed ones see each
    framework in its steady state, as a loop that calls only it would.

    Calls shorter than `min_time` are timed in blocks of back-to-back calls lasting
    about min_time (block size from the warm-up, per fn; the block's mean is one
    sample), as timeit does.

    solo: names timed in rounds of their own after the interleaved ones (default:
    the NumPy-based ones; all with --solo).  NumPy's OpenBLAS threads busy-wait
    after each call too (PyTorch's LeNet step took 12 ms right after graphc's NumPy
    interpreter instead of 4.5 ms), and those peers are context, not targets."""
    if solo is None:
        solo = list(impls) if _SOLO_ALL else [k for k in impls if "numpy" in k]
    together = {k: fn for k, fn in impls.items() if k not in solo}
    settle = SETTLE if settle is None else settle
    times = {k: [] for k in impls}
    for group in [together] + [{k: impls[k]} for k in solo]:
        block = {}
        for k, fn in group.items():
            for _ in range(max(warmup - 1, 0)):
                fn()
            t = time.perf_counter()
            fn()
            once = time.perf_counter() - t
            block[k] = max(1, min(1000, int(min_time / max(once, 1e-7))))
        for _ in range(repeat):
            for k, fn in group.items():
                if len(group) > 1:
                    t0 = time.perf_counter()
                    fn()
                    while time.perf_counter() - t0 < settle:
                        fn()
                n = block[k]
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                times[k].append((time.perf_counter() - t) / n)
    return {k: statistics.median(times[k]) for k in impls}


def _torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


# ------------------------------------------------------------------ workloads
def bench_matmul(n, threads, repeat, torch):
    import graphc as gc
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    x, y = gc.input("a", (n, n)), gc.input("b", (n, n))
    t0 = time.perf_counter()
    f = gc.compile([x, y], x @ y, backend="llvm")
    f(a, b)
    compile_s = time.perf_counter() - t0
    impls = {"graphc-llvm": lambda: f(a, b), "numpy": lambda: a @ b}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        impls["torch"] = lambda: torch.mm(ta, tb)
    return f"matmul {n}x{n}x{n}", 2.0 * n ** 3, interleaved(impls, repeat), compile_s


def bench_conv(threads, repeat, torch, backward=False, batch=32):
    import graphc as gc
    rng = np.random.default_rng(0)
    shape = (batch, 64, 56, 56)
    xv = rng.standard_normal(shape, dtype=np.float32)
    wv = (rng.standard_normal((64, 64, 3, 3), dtype=np.float32) * 0.05)
    x = gc.input("x", shape)
    w = gc.input("w", (64, 64, 3, 3))
    y = gc.conv2d(x, w, padding=1)
    outs = [y]
    flops = 2.0 * batch * 64 * 56 * 56 * 64 * 9
    if backward:
        loss = gc.sum(y * y) * 0.5
        outs = [loss] + list(gc.grad(loss, [x, w]))
        flops *= 3
    t0 = time.perf_counter()
    f = gc.compile([x, w], outs, backend="llvm")
    f(xv, wv)
    compile_s = time.perf_counter() - t0
    fn = gc.compile([x, w], outs, backend="numpy")
    impls = {"graphc-llvm": lambda: f(xv, wv), "graphc-numpy": lambda: fn(xv, wv)}
    if torch is not None:
        tx = torch.from_numpy(xv)
        tw = torch.from_numpy(wv)
        if backward:
            def step():
                xx = tx.clone().requires_grad_(True)
                ww = tw.clone().requires_grad_(True)
                yy = torch.nn.functional.conv2d(xx, ww, padding=1)
                (0.5 * (yy * yy).sum()).backward()
            impls["torch"] = step
        else:
            def fwd():
                with torch.no_grad():
                    torch.nn.functional.conv2d(tx, tw, padding=1)
            impls["torch"] = fwd
    name = f"conv2d {'fwd+bwd' if backward else 'fwd'} N={batch} 64->64 56x56 3x3"
    return name, flops, interleaved(impls, repeat, warmup=1), compile_s


LENET_SHAPES = [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (400, 120), (120,), (120, 84), (84,),
                (84, 10), (10,)]


def _lenet_graph(batch, backend, lr=0.01):
    """LeNet-5 (28x28 input) training step as a compiled graphc function."""
    import graphc as gc
    rng = np.random.default_rng(0)
    params = [gc.Parameter((rng.standard_normal(s) * 0.1).astype(np.float32))
              for s in LENET_SHAPES]
    c1, c1b, c2, c2b, f1, f1b, f2, f2b, f3, f3b = params
    x = gc.input("x", (batch, 1, 28, 28))
    y = gc.input("y", (batch,), dtype="int64")
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, c1, c1b, padding=2)), 2)
    h = gc.max_pool2d(gc.relu(gc.conv2d(h, c2, c2b)), 2)
    h = gc.reshape(h, (batch, 400))
    h = gc.relu(h @ f1 + f1b)
    h = gc.relu(h @ f2 + f2b)
    loss = gc.cross_entropy(h @ f3 + f3b, y)
    grads = gc.grad(loss, params)
    f = gc.compile([x, y], loss, updates={p: p - lr * g for p, g in zip(params, grads)},
                   backend=backend)
    return f, [p.value.copy() for p in params]


def _torch_lenet(torch, batch, init, lr=0.01):
    ps = [torch.tensor(v, requires_grad=True) for v in init]
    F = torch.nn.functional

    def step(xb, yb):
        c1, c1b, c2, c2b, f1, f1b, f2, f2b, f3, f3b = ps
        h = F.max_pool2d(F.relu(F.conv2d(xb, c1, c1b, padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, c2, c2b)), 2)
        h = h.reshape(batch, 400)
        h = F.relu(h @ f1 + f1b)
        h = F.relu(h @ f2 + f2b)
        loss = F.cross_entropy(h @ f3 + f3b, yb)
        for p in ps:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in ps:
                p -= lr * p.grad
        return loss
    return step


def bench_lenet(batch, threads, repeat, torch):
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    yb = rng.integers(0, 10, batch)
    t0 = time.perf_counter()
    f, init = _lenet_graph(batch, "llvm")
    f(xb, yb)
    compile_s = time.perf_counter() - t0
    # The same model built again: graph building, optimizer, lowering and a disk-cache hit.
    t0 = time.perf_counter()
    f2, _ = _lenet_graph(batch, "llvm")
    f2(xb, yb)
    warm_s = time.perf_counter() - t0
    print(f"LeNet-5 batch {batch}: cold compile {compile_s:.2f} s (a disk-cache hit if this "
          f"model was compiled before), second compile {warm_s:.3f} s", flush=True)
    fn, _ = _lenet_graph(batch, "numpy")
    impls = {"graphc-llvm": lambda: f(xb, yb), "graphc-numpy": lambda: fn(xb, yb)}
    if torch is not None:
        step = _torch_lenet(torch, batch, init)
        tx, ty = torch.from_numpy(xb), torch.from_numpy(yb)
        impls["torch"] = lambda: step(tx, ty)
    flops = 3 * 2.0 * batch * (6 * 784 * 25 + 16 * 100 * 150 + 400 * 120 + 120 * 84 + 840)
    return f"LeNet-5 train step batch {batch}", flops, interleaved(impls, repeat), compile_s


def bench_onnx_resnet50(threads, repeat, size=224, batch=1):
    """A ResNet-50-sized ONNX model (graphc.onnx.zoo.resnet50: 25.6M parameters) on
    graphc's LLVM backend against onnxruntime (CPU provider, `threads` intra-op threads)
    and graphc's NumPy interpreter, interleaved; prints how far the outputs agree."""
    import graphc as gc
    from ..onnx.zoo import resnet50
    proto = resnet50(num_classes=1000, input_size=size)
    xv = np.random.default_rng(3).standard_normal((batch, 3, size, size)).astype(np.float32)
    t0 = time.perf_counter()
    model = gc.onnx.load(proto)
    f = model.compile(backend="llvm")
    (got,) = f(xv)
    compile_s = time.perf_counter() - t0
    impls = {"graphc-llvm": lambda: f(xv)}
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        want = sess.run(None, {"x": xv})[0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"ResNet-50 {size}x{size}: graphc-llvm vs onnxruntime max |diff| / max |out| = "
              f"{err:.1e}", flush=True)
        impls["onnxruntime"] = lambda: sess.run(None, {"x": xv})
    fn = model.compile(backend="numpy")
    impls["graphc-numpy"] = lambda: fn(xv)
    # ResNet-50's multiply-adds scale with the image area (4.1 GMAC at 224x224)
    flops = 2 * 4.1e9 * batch * (size / 224) ** 2
    return (f"ONNX ResNet-50 inference batch {batch} {size}x{size}", flops,
            interleaved(impls, repeat, warmup=1), compile_s)


# ------------------------------------------------------------------ memory
def _proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _memory_child(framework, batch, steps, threads) -> dict:
    """Runs in a fresh process: the peak memory of `steps` LeNet-5 training steps.

    Baseline: after importing the framework and loading its native library (libtorch
    for PyTorch; graphc plus libllvmlite with the host target initialised), with the
    data already in memory.  Then the model is built and one step runs (graphc
    compiles here; the compile's own transient peak is reported separately as
    setup_peak).  The kernel's high-water mark is reset (/proc/self/clear_refs) and
    the loop runs.  loop_peak: VmHWM over the loop minus the baseline RSS (parameters,
    gradients, activations, workspace, and whatever the setup left resident, compiled
    code included).  loop_peak_anon: the same for anonymous memory alone (the heap:
    data the process owns, without file-backed library code pages), estimated as
    VmHWM - RssFile - RssShmem at the end of the loop (the loop touches no new code
    after the warm-up step) minus the baseline RssAnon.
    """
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    yb = rng.integers(0, 10, batch)
    if framework == "torch":
        torch = _torch(threads)
    else:
        os.environ["GRAPHC_NUM_THREADS"] = str(threads)
        import graphc  # noqa: F401
        from ..backends.llvm import runtime
        runtime._target()
        from .. import autodiff, passes  # noqa: F401  (imports are not memory of the loop)
        from ..kernel import lower  # noqa: F401
    base = _proc_status()
    if framework == "torch":
        rng0 = np.random.default_rng(0)
        init = [(rng0.standard_normal(s) * 0.1).astype(np.float32) for s in LENET_SHAPES]
        step = _torch_lenet(torch, batch, init)
        tx, ty = torch.from_numpy(xb), torch.from_numpy(yb)

        def run():
            step(tx, ty)
    else:
        f, _ = _lenet_graph(batch, framework)

        def run():
            f(xb, yb)
    run()
    setup = _proc_status()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")       # reset VmHWM to the current RSS
    for _ in range(steps):
        run()
    end = _proc_status()
    return {"framework": framework, "batch": batch, "steps": steps,
            "setup_peak": setup["VmHWM"] - base["VmRSS"],
            "loop_peak": end["VmHWM"] - base["VmRSS"],
            "loop_peak_anon": end["VmHWM"] - end["RssFile"] - end.get("RssShmem", 0)
            - base["RssAnon"],
            "end_anon": end["RssAnon"] - base["RssAnon"]}


def bench_memory(batch, threads, steps, torch,
                 frameworks=("llvm-cold", "llvm-warm", "numpy", "torch")):
    """Each framework in its own fresh subprocess (peak memory is per process).

    llvm-cold compiles into an empty disk cache (the LLVM optimizer and code generator
    run in the process); llvm-warm is a second process that finds the object code in
    that cache (the usual case after the first run)."""
    import json
    import subprocess
    import sys
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphc-bench-cache-") as cache_dir:
        for fw in frameworks:
            if fw == "torch" and torch is None:
                continue
            env = dict(os.environ, GRAPHC_CACHE_DIR=cache_dir, GRAPHC_CACHE="1")
            child = "llvm" if fw.startswith("llvm") else fw
            code = (f"import json; from graphc.bench import _memory_child; "
                    f"print(json.dumps(_memory_child({child!r}, {batch}, {steps}, {threads})))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=env)
            if r.returncode != 0:
                print(f"memory child {fw} failed:\n{r.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["framework"] = fw
            rows.append(row)
    return rows


def format_memory(rows) -> str:
    mib = 1 / 2 ** 20
    lines = ["| framework | batch | steps | loop peak RSS growth MiB | loop peak heap (anon) "
             "MiB | setup peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["framework"]
        name = "graphc-" + name if name != "torch" else name
        lines.append(f"| {name} | {r['batch']} | {r['steps']} | {r['loop_peak'] * mib:.1f} | "
                     f"{r['loop_peak_anon'] * mib:.1f} | {r['setup_peak'] * mib:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from ..backends.llvm import host_description
    return (f"{cpu}; {os.cpu_count()} logical CPUs; LLVM target {host_description()}; "
            f"Python {platform.python_version()}, NumPy {np.__version__}")


def format_rows(results) -> str:
    lines = ["| workload | impl | median ms | GFLOP/s | peer time / graphc time |",
             "|---|---|---|---|---|"]
    for name, flops, times, compile_s in results:
        g = times["graphc-llvm"]
        for impl, t in times.items():
            ratio = "—" if impl == "graphc-llvm" else f"{t / g:.2f}"
            ms = f"{t * 1e3:.2f}" if t >= 1e-3 else f"{t * 1e3:.4f}"
            lines.append(f"| {name} | {impl} | {ms} | {flops / t / 1e9:.1f} | {ratio} |")
        lines.append(f"| {name} | (graphc cold compile) | {compile_s * 1e3:.0f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    # `--backend cuda` hands every other argument to the GPU bench, which has its own
    # workloads and options (`graphc bench --backend cuda --help` lists them)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=("llvm", "cuda"), default="llvm")
    known, rest = pre.parse_known_args(argv)
    if known.backend == "cuda":
        from ..backends.cuda import bench as cuda_bench
        cuda_bench.main(rest, prog="graphc bench --backend cuda")
        return 0
    ap = argparse.ArgumentParser(prog="graphc bench", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("llvm", "cuda"), default="llvm",
                    help="llvm (default): this CPU bench against PyTorch CPU and "
                         "onnxruntime; cuda: the GPU bench against PyTorch CUDA, with its "
                         "own options (graphc bench --backend cuda --help)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("GRAPHC_NUM_THREADS", 2)),
                    help="threads for graphc's LLVM backend and for each peer (PyTorch, "
                         "onnxruntime) (default: GRAPHC_NUM_THREADS or 2)")
    ap.add_argument("--repeat", type=int, default=11,
                    help="timed rounds per workload; the table reports their median "
                         "(default 11; some workloads use a fraction of it)")
    ap.add_argument("--conv-batch", type=int, default=32, help="batch size of the conv "
                    "workloads (default 32)")
    ap.add_argument("--only", default="matmul,conv,lenet,onnx,memory",
                    help="comma-separated subset of: matmul, conv, convbwd, lenet, rnn, onnx, "
                         "memory")
    ap.add_argument("--sizes", default="256,1024,2048", help="square matmul sizes n (n x n @ n x n), comma-separated")
    ap.add_argument("--onnx-size", type=int, default=224, help="ResNet-50 image size")
    ap.add_argument("--solo", action="store_true",
                    help="time each implementation in rounds of its own (steady state, "
                         "nothing else between its calls) instead of interleaving them")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="ms of untimed calls before each timed one in an interleaved round, "
                         "so the previous framework's spinning threads have parked "
                         "(default 15)")
    args = ap.parse_args(argv)
    global _SOLO_ALL, SETTLE
    _SOLO_ALL = args.solo
    SETTLE = args.settle / 1e3
    os.environ["GRAPHC_NUM_THREADS"] = str(args.threads)
    torch = _torch(args.threads)
    only = set(args.only.split(","))
    print(f"machine: {machine()}")
    print(f"threads: {args.threads}; torch: {torch.__version__ if torch else 'not installed'}")
    results = []

    def run(res):
        results.append(res)
        name, flops, times, cs = res
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.4g} ms" for k, v in times.items())
              + f"; compile {cs:.2f} s", flush=True)
    if "matmul" in only:
        for n in (int(s) for s in args.sizes.split(",")):
            run(bench_matmul(n, args.threads, args.repeat, torch))
    if "conv" in only:
        run(bench_conv(args.threads, max(3, args.repeat // 2), torch, batch=args.conv_batch))
    if "convbwd" in only:
        run(bench_conv(args.threads, max(3, args.repeat // 3), torch, backward=True,
                       batch=args.conv_batch))
    if "lenet" in only:
        run(bench_lenet(64, args.threads, args.repeat, torch))
        run(bench_lenet(1, args.threads, args.repeat * 5, torch))
    if "rnn" in only:   # recurrent networks (bench/rnn.py)
        from .rnn import run_all
        run_all(args.threads, args.repeat, torch, run)
    if "onnx" in only:
        run(bench_onnx_resnet50(args.threads, max(3, args.repeat // 2), size=args.onnx_size))
    mem = []
    if "memory" in only:
        for batch, steps in ((64, 50), (1, 200)):
            rows = bench_memory(batch, args.threads, steps, torch)
            mem += rows
            for r in rows:
                print(f"memory {r['framework']} batch {batch}: loop peak "
                      f"{r['loop_peak'] / 2 ** 20:.1f} MiB (heap "
                      f"{r['loop_peak_anon'] / 2 ** 20:.1f} MiB)", flush=True)
    print()
    print(format_rows(results))
    if mem:
        print()
        print(format_memory(mem))
    return 0
