"""The CUDA backend's recurrent time loop: one fused kernel launch per time step.

Runs on the CPU emulator (no GPU needed): LSTM and GRU forward outputs against
explicit NumPy loops written here, backpropagation through time against the
NumPy backend, on awkward sizes (hidden 1, primes, batch 1); the launch plan
makes at most one launch per step in the forward and the reversed loop; the
fallback (separate launches) still computes the same values.
"""
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc import nn
from graphc.backends import cuda as C
from graphc.backends.cuda import fuse
from graphc.backends.cuda.codegen import HostLoop, Launch, TimeLoop

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="the CUDA emulator needs a host C++ compiler (g++/clang++), none found")


@pytest.fixture(autouse=True)
def emulate():
    C.set_options(emulate=True)
    yield
    C.set_options(emulate=None)


def sig(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference(cell, layer, x):
    """Explicit per-step loops over PyTorch's equations (float64)."""
    W = {n: np.asarray(getattr(layer, n + "_l0").value, np.float64)
         for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    T, N, _ = x.shape
    H = layer.hidden_size
    h, c = np.zeros((N, H)), np.zeros((N, H))
    ys = np.zeros((T, N, H))
    for t in range(T):
        for n in range(N):
            a = W["weight_ih"] @ x[t, n] + W["bias_ih"]
            b = W["weight_hh"] @ h[n] + W["bias_hh"]
            if cell == "LSTM":
                s = a + b
                i, f, g, o = sig(s[:H]), sig(s[H:2 * H]), np.tanh(s[2 * H:3 * H]), sig(s[3 * H:])
                c[n] = f * c[n] + i * g
                ys[t, n] = o * np.tanh(c[n])
            else:
                r, z = sig(a[:H] + b[:H]), sig(a[H:2 * H] + b[H:2 * H])
                m = np.tanh(a[2 * H:] + r * b[2 * H:])
                ys[t, n] = (1 - z) * m + z * h[n]
        h = ys[t].copy()
    return ys


def build(cell, T, N, I, H, seed):
    layer = getattr(nn, cell)(I, H, rng=np.random.default_rng(seed))
    x = gc.input("x", (T, N, I))
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = gc.sum(y * y * 0.5) + gc.sum(y)
    return layer, x, [y, loss] + gc.grad(loss, [x] + list(layer.parameters()))


def count(steps):
    return sum(s.extent * count(s.steps) if isinstance(s, (HostLoop, TimeLoop)) else 1
               for s in steps)


def recurrences(cp):
    """(loop region, launches the whole loop makes, its fused launch or None) for every
    time loop of the plan, whether it stayed a TimeLoop or became one launch."""
    out = []

    def walk(steps):
        for s in steps:
            if isinstance(s, Launch) and s.time_loop is not None:
                out.append((s.time_loop, 1, s))
            elif isinstance(s, TimeLoop):
                one = s.steps[0] if len(s.steps) == 1 and isinstance(s.steps[0], Launch) else None
                out.append((s.region, s.extent * count(s.steps), one))
                walk(s.steps)
            elif isinstance(s, HostLoop):
                walk(s.steps)
    walk(cp.steps)
    return out


CASES = [("LSTM", 4, 1, 3, 1),      # hidden 1, batch 1
         ("GRU", 4, 1, 3, 1),
         ("LSTM", 5, 3, 2, 13),     # primes
         ("GRU", 3, 2, 5, 7)]


@pytest.mark.parametrize("mode,cell,T,N,I,H", [("sequence",) + c for c in CASES] +
                         [("step",) + c for c in CASES[1:3]])
def test_forward_and_bptt_match_numpy_with_one_launch_per_step(mode, cell, T, N, I, H,
                                                               monkeypatch):
    """sequence: each whole loop is one launch; step: one launch per time step."""
    monkeypatch.setattr(fuse, "SEQUENCE_KERNELS", mode == "sequence")
    layer, x, outs = build(cell, T, N, I, H, seed=H)
    v = np.random.default_rng(T * N).standard_normal((T, N, I)).astype(np.float32)
    f = gc.compile([x], outs, backend="cuda")
    got = f(v)
    want = gc.compile([x], outs, backend="numpy")(v)
    np.testing.assert_allclose(got[0], reference(cell, layer, v.astype(np.float64)),
                               rtol=1e-5, atol=1e-6)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=f"output {k}")
    assert np.abs(got[2]).max() > 1e-3          # the input gradient is not trivially zero

    cp = next(iter(f._cache.values())).cprog
    loops = recurrences(cp)
    assert sorted(r.reverse for r, _, _ in loops) == [False, True]   # forward and BPTT loops
    for r, n, la in loops:
        assert r.length == T and n == (1 if mode == "sequence" else T)
        assert la.grid == (1, 1, 1) and la.parts and len(la.parts) > 1
        assert (la.time_loop is r) == (mode == "sequence")
    # the kernels fused into steps are device functions, not launchable kernels
    assert cp.source.count('extern "C" __global__') == len(cp.launches)
    assert all(f"static __device__ __forceinline__ void {p.name}(" in cp.source for _, _, la in loops
               for p in la.parts)


def test_input_projection_is_hoisted_out_of_the_step():
    layer, x, outs = build("LSTM", 6, 4, 16, 8, seed=0)
    from graphc.ir.graph import Graph
    cp = C.generate_cuda(Graph(outs, [x]))
    (fwd,) = [la for r, _, la in recurrences(cp) if not r.reverse]
    gemms = [p.mapping["gemm"] for p in fwd.parts if p.mapping and "gemm" in p.mapping]
    # only h_{t-1} W_hh^T (K = hidden) inside the step; W_ih x (K = 16) runs before the loop
    assert gemms and all(g.K == 8 for g in gemms)
    outside = [la.mapping["gemm"] for la in cp.launches if la.mapping and "gemm" in la.mapping]
    assert any(g.K == 16 for g in outside)


def test_large_steps_fall_back_to_separate_launches(monkeypatch):
    monkeypatch.setattr(fuse, "MAX_ROUNDS", 0)
    layer, x, outs = build("GRU", 3, 2, 3, 5, seed=1)
    v = np.random.default_rng(1).standard_normal((3, 2, 3)).astype(np.float32)
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    f = gc.compile([x], outs, backend="cuda")
    got = f(v)
    want = gc.compile([x], outs, backend="numpy")(v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    cp = next(iter(f._cache.values())).cprog
    loops = recurrences(cp)
    assert len(loops) == 2
    for r, n, la in loops:
        assert n > r.length and la is None


def test_stacked_bidirectional_lstm_with_lengths():
    """Two layers, both directions (forward loops run reversed too), variable lengths."""
    layer = nn.LSTM(3, 5, num_layers=2, bidirectional=True, rng=np.random.default_rng(3))
    x = gc.input("x", (4, 3, 3))
    lengths = gc.input("lengths", (3,), dtype="int64")
    y, (h, c) = layer(x, lengths=lengths)
    loss = gc.sum(y * y) + gc.sum(h * c)
    outs = [y, h, c, loss] + gc.grad(loss, [x] + list(layer.parameters()))
    v = np.random.default_rng(5).standard_normal((4, 3, 3)).astype(np.float32)
    ln = np.array([4, 1, 3])
    f = gc.compile([x, lengths], outs, backend="cuda")
    got = f(v, ln)
    want = gc.compile([x, lengths], outs, backend="numpy")(v, ln)
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=f"output {k}")
    assert np.all(got[0][1:, 1] == 0)            # past the second sequence's end
    loops = recurrences(next(iter(f._cache.values())).cprog)
    assert len(loops) == 8 and sum(r.reverse for r, _, _ in loops) == 4
    assert all(n == 1 and la.time_loop is r for r, n, la in loops)
