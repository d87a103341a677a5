"""graphc.distributed: synchronous data-parallel training over MPI (mpi4py).

Run the same script on every rank with ``mpiexec -n N python train.py``:

    import graphc as gc
    from graphc import distributed as dist, models, optim

    model = models.lenet5(rng=np.random.default_rng(dist.rank()))  # rank 0's weights win
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = gc.input("x", (None, 1, 28, 28)); y = gc.input("y", (None,), dtype="int64")
    step = dist.DistributedStep(opt, lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    for epoch in range(E):
        for xb, yb in dist.shard_batches((X, Y), 64, seed=0, epoch=epoch):
            loss = step(xb, yb)                 # global mean loss, same on every rank
        acc = dist.evaluate(model, (X_test, Y_test))
        dist.save_checkpoint(model, "ckpt.npz", optimizer=opt)   # rank 0 writes

Without an MPI launcher everything runs as a single rank (no mpi4py needed).
See docs/distributed.md.  Install the MPI pieces with ``pip install 'graphc[mpi]'``.
"""
from .env import (DistributedError, LocalComm, abort, get_comm, guard, install_abort_handler,
                  install_exit_check, is_distributed, is_root, launched_size, note_progress,
                  rank, size, wait)
from .buckets import GradientBuckets
from .step import (DistributedStep, apply_gradients, broadcast_parameters, check_structure,
                   structure_signature)
from .data import DistributedLoader, shard_batches, shard_bounds
from .utils import (allreduce_mean, allreduce_sum, barrier, evaluate, maybe_shard, maybe_wrap,
                    reduce_metrics, save_checkpoint)

__all__ = [
    "DistributedError", "LocalComm", "abort", "get_comm", "guard", "install_abort_handler",
    "install_exit_check", "is_distributed", "note_progress", "wait", "is_root", "launched_size", "rank", "size",
    "GradientBuckets",
    "DistributedStep", "apply_gradients", "broadcast_parameters", "check_structure",
    "structure_signature",
    "DistributedLoader", "shard_batches", "shard_bounds",
    "allreduce_mean", "allreduce_sum", "barrier", "evaluate", "maybe_shard", "maybe_wrap",
    "reduce_metrics", "save_checkpoint",
]
