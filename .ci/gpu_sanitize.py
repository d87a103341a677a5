"""A small workload for compute-sanitizer (memcheck, racecheck): the LeNet-5 step
(convolutions, the max-pool kernels with shared-memory scratch and their
gradients), an overlapping max-pool with padding and its gradient, reductions split over blocks, and an LSTM
forward and backward through time, each compared with the NumPy backend."""
import sys

import numpy as np

import graphc as gc
from graphc import models, nn


def check(name, got, want, tol):
    for g, w in zip(got, want):
        err = float(np.max(np.abs(np.asarray(g, np.float64) - w))) if np.size(w) else 0.0
        scale = float(np.max(np.abs(w))) if np.size(w) else 1.0
        print(f"{name}: max |diff| {err:.2e} (scale {scale:.2e})", flush=True)
        if err > tol * max(scale, 1.0):
            sys.exit(f"{name}: mismatch")


def both(ins, outs, feeds):
    return (gc.compile(ins, outs, backend="cuda")(*feeds),
            gc.compile(ins, outs, backend="numpy")(*feeds))


rng = np.random.default_rng(0)
B = 16
m = models.lenet5(rng=np.random.default_rng(0))
x, y = gc.input("x", (B, 1, 28, 28)), gc.input("y", (B,), dtype="int64")
loss = gc.cross_entropy(m(x), y)
grads = gc.grad(loss, list(m.parameters()))
check("lenet step", *both([x, y], [loss] + grads,
                          [rng.standard_normal((B, 1, 28, 28)).astype(np.float32),
                           rng.integers(0, 10, B)]), 1e-3)

xp = gc.input("xp", (2, 3, 11, 9))
p = gc.max_pool2d(xp, 3, 2, 1)
check("max_pool 3/2/1 + grad", *both([xp], [p] + gc.grad(gc.sum(p * p), [xp]),
                                     [rng.standard_normal((2, 3, 11, 9)).astype(np.float32)]),
      1e-5)

xr = gc.input("xr", (256, 3, 7, 13))       # rows long enough to be split over blocks
red = [gc.sum(xr, axis=(0, 2, 3)), gc.max(xr, axis=(0, 2, 3))]
check("split reductions", *both([xr], red, [rng.standard_normal((256, 3, 7, 13))
                                            .astype(np.float32)]), 1e-4)

layer = nn.LSTM(8, 16, rng=np.random.default_rng(1))
xs = gc.input("xs", (6, 3, 8))
out = layer(xs)[0]
l2 = gc.sum(out * out)
check("lstm fwd+bwd", *both([xs], [l2] + gc.grad(l2, [xs] + list(layer.parameters())),
                            [rng.standard_normal((6, 3, 8)).astype(np.float32)]), 1e-3)
# GEMMs with ragged edges (the wide tiles' guarded loads and stores), and one big
# enough for the automatic choice to take a wide tile; GRAPHC_CUDA_GEMM_TILE forces one.
for (M, K, N) in [(257, 129, 130), (7, 300, 1), (512, 256, 640)]:
    a, b = gc.input("a", (M, K)), gc.input("b", (K, N))
    mm = a @ b
    av = rng.standard_normal((M, K)).astype(np.float32)
    bv = rng.standard_normal((K, N)).astype(np.float32)
    got = gc.compile([a, b], [mm] + gc.grad(gc.sum(mm * mm), [a, b]), backend="cuda")(av, bv)
    c = av.astype(np.float64) @ bv.astype(np.float64)
    check(f"matmul {M}x{K}x{N} + grads", got, [c, 2 * c @ bv.T.astype(np.float64),
                                              2 * av.T.astype(np.float64) @ c], 1e-4)

# a computed out-of-range index must raise on the GPU too (never a clamped row)
t, i = gc.input("t", (10, 4)), gc.input("i", (2,), dtype="int64")
f = gc.compile([t, i], gc.take(t, i + 1), backend="cuda")
try:
    f(np.zeros((10, 4), np.float32), np.array([9, 0]))
    sys.exit("take(t, i + 1) with i = 9 on 10 rows did not raise on the GPU")
except gc.IndexOutOfRangeError as e:
    print("computed index check on the GPU:", str(e).splitlines()[0], flush=True)
print("sanitizer workload done", flush=True)
