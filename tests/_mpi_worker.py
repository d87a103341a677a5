"""One rank of the MPI jobs that tests/test_distributed_mpi.py launches.

    mpiexec -n N python tests/_mpi_worker.py MODE OUT_DIR [--steps K] [--bucket-bytes B]

MODE
  train       K data-parallel SGD-momentum steps of a float64 MLP on the digits,
              global batch 16·N (or --global-batch) from graphc.distributed.shard_batches; each rank
              starts from different weights (seeded by its rank: rank 0's must win
              through the broadcast) and writes rank<r>.npz with its parameters,
              optimizer state and losses, plus metrics and a rank-0 checkpoint.
  fit         the `graphc train` path: maybe_wrap(compile_step) + maybe_shard +
              graphc.train.fit for one epoch on 256 samples, then save_checkpoint.
  exit        like train, but rank 1 dies (os._exit(7)) before step 3.
  raise       like train, but rank 1 raises RuntimeError before step 3.
  step_error  like train, but rank 1 feeds a malformed batch at step 3 (the error
              is raised inside DistributedStep, while rank 0 waits in the allreduce).
  mismatch    rank 1 builds a wider hidden layer: the structure check must fail.
  uneven      rank 1 takes one step fewer and ends normally, while rank 0 waits in the
              allreduce of its last step: rank 0 must see rank 1's exit notice.
  uneven_raw  rank 1 ends normally after training while rank 0 waits in a plain
              mpi4py Barrier: rank 1's exit timeout must end the job.
"""
import argparse
import os
import sys
from collections import OrderedDict

import numpy as np

import graphc as gc
from graphc import data, nn, optim
from graphc import distributed as dist

PER_RANK_BATCH = 16
LR, MOMENTUM = 0.1, 0.9


def build_mlp(seed, hidden=24):
    rng = np.random.default_rng(seed)
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, hidden, dtype="float64", rng=rng)),
        ("act1", nn.ReLU()),
        ("fc2", nn.Linear(hidden, 10, dtype="float64", rng=rng)),
    ]))


def digits():
    X, Y = data.load_digits("train")
    return X.astype(np.float64), Y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bucket-bytes", type=int, default=1 << 20)
    ap.add_argument("--expect-size", type=int, required=True)
    ap.add_argument("--global-batch", type=int, default=0, help="default 16 per rank")
    a = ap.parse_args()

    comm = dist.get_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != a.expect_size:
        # e.g. an mpiexec from another MPI library than the one mpi4py loaded:
        # every process then believes it is a singleton.
        print(f"WRONG_WORLD_SIZE: expected {a.expect_size} ranks, got {size}", file=sys.stderr)
        sys.exit(3)
    X, Y = digits()
    if a.mode == "fit":
        return run_fit(a, rank, size, X, Y)

    model = build_mlp(seed=100 + rank, hidden=25 if (a.mode == "mismatch" and rank == 1) else 24)
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = gc.input("x", (None, 1, 8, 8), dtype="float64")
    y = gc.input("y", (None,), dtype="int64")
    step = dist.DistributedStep(opt, lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y,
                                bucket_bytes=a.bucket_bytes)
    losses = []
    batches = dist.shard_batches((X, Y), a.global_batch or PER_RANK_BATCH * size, seed=0,
                                 epoch=0)
    steps = a.steps - 1 if (a.mode == "uneven" and rank == 1) else a.steps
    for k in range(steps):
        xb, yb = next(batches)
        if k == 2 and rank == 1:
            if a.mode == "exit":
                os._exit(7)
            if a.mode == "raise":
                raise RuntimeError("injected failure on rank 1")
            if a.mode == "step_error":
                xb = xb[:, :, :4, :]          # wrong image size: the gradient function rejects it
        losses.append(step(xb, yb))
    if a.mode in ("uneven", "uneven_raw") and rank == 1:
        return                              # a normal end (one step short for "uneven")
    if a.mode == "uneven_raw":
        comm.Barrier()                      # never completes: rank 1 has left

    # Metrics reduced across ranks, and a checkpoint written by rank 0 only.
    acc = dist.evaluate(model, (X[:300], Y[:300]))
    mean_rank = dist.allreduce_mean(rank, weight=rank + 1)       # Σ r(r+1) / Σ (r+1)
    metrics = dist.reduce_metrics({"a": rank, "b": 2.0 * rank})
    ckpt = dist.save_checkpoint(model, os.path.join(a.out, "ckpt.npz"), optimizer=opt)
    state = {f"param.{k}": v for k, v in model.state_dict().items()}
    state.update({f"opt.{k}": v for k, v in opt.state_dict().items()})
    np.savez(os.path.join(a.out, f"rank{rank}.npz"), losses=np.array(losses), acc=acc,
             mean_rank=mean_rank, metric_a=metrics["a"], metric_b=metrics["b"],
             wrote_ckpt=ckpt is not None, buckets=step.buckets.num_buckets,
             bytes_per_step=step.bytes_per_step, **state)


def run_fit(a, rank, size, X, Y):
    from graphc.train import fit
    X, Y = X[:256], Y[:256]
    model = build_mlp(seed=100 + rank)
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = gc.input("x", (None, 1, 8, 8), dtype="float64")
    y = gc.input("y", (None,), dtype="int64")
    # What `graphc train` does, plus the two calls that make it data-parallel.
    step = dist.maybe_wrap(opt.compile_step(lambda xb, yb: gc.cross_entropy(model(xb), yb),
                                            x, y))
    assert isinstance(step, dist.DistributedStep), step
    train_data = dist.maybe_shard((X, Y), 32, seed=5)
    with dist.guard():
        hist = fit(model, step, train_data, epochs=1, batch_size=32, seed=5, progress=False)
    dist.save_checkpoint(model, os.path.join(a.out, "fit.npz"), optimizer=opt)
    np.savez(os.path.join(a.out, f"fit_rank{rank}.npz"), loss=hist["loss"][-1],
             **{f"param.{k}": v for k, v in model.state_dict().items()})


if __name__ == "__main__":
    main()
