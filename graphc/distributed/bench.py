"""Measure the data-parallel LeNet-5 training step and the allreduce it needs.

    mpiexec -n N python -m graphc.distributed.bench [--backend llvm] [--batch 32]
                                                    [--steps 30] [--json out.json]

Every rank runs `steps` timed DistributedSteps (after warm-up) on its own
`--batch` samples of the digits at 28×28 (weak scaling: the global batch is
N·batch), timing per step this rank's forward+backward, the bucketed gradient
allreduce and the update.  Then it times bare ``Allreduce`` calls of several
message sizes and fits the latency-bandwidth model t(m) = α + m/β to them.
Rank 0 prints a summary (and writes it as JSON); docs/distributed.md is built
from these numbers.  ``python -m graphc.distributed.bench project run.json``
prints the projected scaling table from a 1-rank summary.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _median(xs):
    return float(np.median(np.asarray(xs)))


def time_allreduce(comm, sizes, reps: int = 30):
    """Median seconds of one float32 Allreduce per message size (bytes)."""
    out = {}
    for nbytes in sizes:
        a = np.ones(max(nbytes // 4, 1), dtype=np.float32)
        b = np.empty_like(a)
        for _ in range(3):
            comm.Allreduce(a, b)
        ts = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(a, b)
            ts.append(time.perf_counter() - t0)
        # the slowest rank bounds the collective
        ts = comm.allgather(_median(ts))
        out[int(a.nbytes)] = max(ts)
    return out


def fit_alpha_beta(samples: dict):
    """Least squares t = α + m/β over (bytes m, seconds t); returns (α s, β bytes/s)."""
    m = np.array(list(samples), dtype=np.float64)
    t = np.array(list(samples.values()), dtype=np.float64)
    A = np.stack([np.ones_like(m), m], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, t, rcond=None)
    return float(alpha), float(1.0 / inv_beta) if inv_beta > 0 else float("inf")


# Assumed links for the projection (not measured here: this machine has no network
# peers).  (name, α seconds per message step, β bytes per second)
LINKS = (("10 GbE (TCP)", 25e-6, 1.25e9), ("25 GbE (RoCE)", 5e-6, 3.125e9),
         ("100 Gb/s InfiniBand", 2e-6, 12.5e9))


def allreduce_model_s(nbytes: float, n: int, alpha: float, beta: float) -> float:
    """Seconds of an allreduce of nbytes over n ranks: reduce-scatter + allgather
    (recursive halving/doubling: 2·log2 n latency steps, 2(n-1)/n·nbytes moved
    per rank), what MPICH uses for messages of this size."""
    if n <= 1:
        return 0.0
    return 2 * np.ceil(np.log2(n)) * alpha + 2 * (n - 1) / n * nbytes / beta


def projection(summary: dict, ranks=(2, 8, 64, 512), links=LINKS) -> str:
    """Markdown table: projected weak-scaling throughput from a measured 1-rank run.

    step(n) = compute + update + allreduce(n) (no overlap: the backward pass is
    one compiled call, so the allreduce starts after it).
    """
    med = summary["median_s"]
    local = med["compute"] + med["update"]
    b = summary["batch_per_rank"]
    nbytes = summary["allreduce_payload_bytes"]
    lines = ["| link (assumed α, β) | ranks | allreduce ms | step ms | samples/s | "
             "efficiency |", "|---|---|---|---|---|---|"]
    for name, alpha, beta in links:
        for n in ranks:
            c = allreduce_model_s(nbytes, n, alpha, beta)
            step = local + c
            lines.append(f"| {name} ({alpha * 1e6:g} µs, {beta / 1e9:g} GB/s) | {n} | "
                         f"{c * 1e3:.2f} | {step * 1e3:.2f} | {n * b / step:,.0f} | "
                         f"{local / step:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["project"]:          # python -m graphc.distributed.bench project run.json
        with open(argv[1]) as f:
            print(projection(json.load(f)))
        return
    ap = argparse.ArgumentParser(prog="python -m graphc.distributed.bench")
    ap.add_argument("--backend", default="numpy", choices=("numpy", "llvm"))
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write rank 0's summary here")
    args = ap.parse_args(argv)

    import graphc as gc
    from graphc import data, models, optim
    from . import DistributedStep, get_comm, shard_batches

    comm = get_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    model = models.lenet5(rng=np.random.default_rng(0))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = gc.input("x", (None, 1, 28, 28))
    y = gc.input("y", (None,), dtype="int64")
    t0 = time.perf_counter()
    step = DistributedStep(opt, lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y,
                           backend=args.backend)
    X, Y = data.load_digits("train", size=28)
    batches = []
    epoch = 0
    while len(batches) < args.warmup + args.steps:
        batches += [b for b in shard_batches((X, Y), args.batch * size, seed=0, epoch=epoch,
                                             drop_last=True)]
        epoch += 1
    for xb, yb in batches[:args.warmup]:
        step(xb, yb)
    build_s = time.perf_counter() - t0
    rows = []
    comm.Barrier()
    t_all = time.perf_counter()
    for xb, yb in batches[args.warmup:args.warmup + args.steps]:
        s0 = time.perf_counter()
        step(xb, yb)
        rows.append((time.perf_counter() - s0, step.last_timing["compute"],
                     step.last_timing["allreduce"], step.last_timing["update"]))
    wall = time.perf_counter() - t_all
    rows = np.array(rows)
    med = {k: _median(rows[:, i]) for i, k in enumerate(("step", "compute", "allreduce",
                                                         "update"))}
    per_rank = comm.allgather(med)
    sizes = [8, 1 << 10, 1 << 14, 1 << 16, step.bytes_per_step, 1 << 20, 1 << 22]
    ar = time_allreduce(comm, sorted(set(sizes))) if size > 1 else {}
    n_params = sum(p.value.size for p in model.parameters())
    if rank == 0:
        summary = {
            "backend": args.backend, "ranks": size, "batch_per_rank": args.batch,
            "global_batch": args.batch * size, "steps": args.steps,
            "threads_env": {k: os.environ.get(k) for k in ("GRAPHC_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS",
                                                           "OMP_NUM_THREADS")},
            "parameters": int(n_params), "allreduce_payload_bytes": step.bytes_per_step,
            "buckets": step.buckets.num_buckets,
            "ring_bytes_sent_per_rank": 2 * (size - 1) / size * step.bytes_per_step,
            "median_s": med, "median_s_per_rank": per_rank,
            "samples_per_s_median": args.batch * size / max(r["step"] for r in per_rank),
            "samples_per_s_wall": args.batch * size * args.steps / wall,
            "build_and_warmup_s": build_s,
            "allreduce_s_by_bytes": ar,
        }
        if ar:
            summary["alpha_s"], summary["beta_bytes_per_s"] = fit_alpha_beta(ar)
        print(json.dumps(summary, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
