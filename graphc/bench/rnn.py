"""Recurrent-network benchmarks: graphc.nn.RNN / LSTM on the LLVM backend (native time
loops) against PyTorch's CPU nn.RNN / nn.LSTM, interleaved in one process.

    python -m graphc.bench --only rnn          (or: python -m graphc.bench.rnn)

Workloads (issue 6's targets): input 64, hidden 256, T=100, batch 32,
forward + backward (loss = sum of the output sequence; gradients of every
weight) for RNN(tanh) and LSTM; and one streaming step of that LSTM at batch 1
(state in, state out).  The same weights go to both sides.  PyTorch is
optional: without it only graphc's times are shown.
"""
from __future__ import annotations

import time

import numpy as np

from . import interleaved

IN, HID, T, BATCH = 64, 256, 100, 32


def _torch_module(torch, cls, m):
    tm = getattr(torch.nn, cls)(IN, HID)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.copy_(torch.from_numpy(getattr(m, name).value))
    return tm


def _flops_fwd(gates):
    # input projection + recurrent matmul, per step and batch row
    return 2.0 * T * BATCH * gates * HID * (IN + HID)


def bench_seq(cls, threads, repeat, torch):
    """Forward + backward of a whole sequence."""
    import graphc as gc
    from ..nn.rnn import LSTM, RNN
    mod = {"RNN": RNN, "LSTM": LSTM}[cls]
    gates = 4 if cls == "LSTM" else 1
    m = mod(IN, HID, rng=0)
    params = list(m.parameters())
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((T, BATCH, IN), dtype=np.float32)
    x = gc.input("x", (T, BATCH, IN))
    out, _ = m(x)
    loss = gc.sum(out)
    grads = gc.grad(loss, params)
    t0 = time.perf_counter()
    f = gc.compile([x], [loss] + list(grads), backend="llvm")
    f(xv)
    compile_s = time.perf_counter() - t0
    impls = {"graphc-llvm": lambda: f(xv)}
    if torch is not None:
        tm = _torch_module(torch, cls, m)
        tx = torch.from_numpy(xv)

        def step():
            tm.zero_grad(set_to_none=True)
            y, _ = tm(tx)
            y.sum().backward()
        impls["torch"] = step
        # Same numbers on both sides (a check that the comparison is fair).
        step()
        ref = [p.grad.numpy() for p in tm.parameters()]
        got = f(xv)[1:]
        names = [n for n, _ in tm.named_parameters()]
        mine = dict(zip([n for n, _ in m.named_parameters()], got))
        err = max(float(np.abs(mine[n] - r).max() / (np.abs(r).max() + 1e-6))
                  for n, r in zip(names, ref))
        if err > 1e-3:
            raise AssertionError(f"{cls}: gradients differ from PyTorch's (rel {err:.2e})")
    flops = 3 * _flops_fwd(gates)
    name = f"{cls} in {IN} hidden {HID} T={T} batch {BATCH} fwd+bwd"
    return name, flops, interleaved(impls, repeat), compile_s


def bench_stream(threads, repeat, torch):
    """One LSTM step at batch 1 with the state carried in and out."""
    import graphc as gc
    from ..nn.rnn import LSTM
    m = LSTM(IN, HID, rng=0)
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((1, IN), dtype=np.float32)
    hv = rng.standard_normal((1, 1, HID), dtype=np.float32) * 0.1
    cv = rng.standard_normal((1, 1, HID), dtype=np.float32) * 0.1
    x = gc.input("x", (1, IN))
    h = gc.input("h", (1, 1, HID))
    c = gc.input("c", (1, 1, HID))
    y, (h2, c2) = m.step(x, (h, c))
    t0 = time.perf_counter()
    f = gc.compile([x, h, c], [y, h2, c2], backend="llvm")
    f(xv, hv, cv)
    compile_s = time.perf_counter() - t0
    impls = {"graphc-llvm": lambda: f(xv, hv, cv)}
    if torch is not None:
        tm = _torch_module(torch, "LSTM", m)
        tx = torch.from_numpy(xv).reshape(1, 1, IN)
        th, tc = torch.from_numpy(hv), torch.from_numpy(cv)

        def step():
            with torch.no_grad():
                return tm(tx, (th, tc))
        impls["torch"] = step
        ty, (_, tc2) = step()
        got = f(xv, hv, cv)
        err = max(float(np.abs(got[0] - ty.numpy().reshape(1, HID)).max()),
                  float(np.abs(got[2] - tc2.numpy()).max()))
        if err > 1e-4:
            raise AssertionError(f"streaming step differs from PyTorch's ({err:.2e})")
    flops = 2.0 * 4 * HID * (IN + HID)
    return f"LSTM streaming step batch 1 (in {IN}, hidden {HID})", flops, \
        interleaved(impls, repeat, warmup=20), compile_s


def run_all(threads, repeat, torch, report):
    report(bench_seq("RNN", threads, repeat, torch))
    report(bench_seq("LSTM", threads, repeat, torch))
    report(bench_stream(threads, repeat * 2, torch))


def main(argv=None) -> int:
    from . import main as bench_main
    return bench_main(["--only", "rnn"] + list(argv or []))


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
