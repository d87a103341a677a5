"""Metrics reduced across ranks, rank-0 checkpoints, and the hooks a CLI calls."""
from __future__ import annotations

import numpy as np

from .env import get_comm, guard, is_distributed, wait
from .data import DistributedLoader, shard_bounds

__all__ = ["allreduce_sum", "allreduce_mean", "reduce_metrics", "evaluate", "save_checkpoint",
           "barrier", "maybe_wrap", "maybe_shard"]


def allreduce_sum(values, comm=None) -> np.ndarray:
    """Element-wise sum over ranks of a float array (float64)."""
    comm = get_comm(comm)
    buf = np.array(values, dtype=np.float64)
    out = np.empty_like(buf)
    wait([comm.Iallreduce(buf, out)], comm, "a metrics allreduce")
    return out


def allreduce_mean(value, weight: float = 1.0, comm=None) -> float:
    """Σ_r weight_r · value_r / Σ_r weight_r (e.g. a loss weighted by sample counts)."""
    s = allreduce_sum([float(value) * weight, weight], comm)
    return float(s[0] / s[1]) if s[1] else float("nan")


def reduce_metrics(metrics: dict, weight: float = 1.0, comm=None) -> dict:
    """Weighted means over ranks of a dict of scalar metrics (one message).

    Every rank must pass the same keys.
    """
    keys = sorted(metrics)
    s = allreduce_sum([float(metrics[k]) * weight for k in keys] + [weight], comm)
    return {k: (float(v / s[-1]) if s[-1] else float("nan")) for k, v in zip(keys, s[:-1])}


def evaluate(model, data, batch_size: int = 256, backend: str = "numpy", comm=None) -> float:
    """Accuracy on data = (images, labels), each rank scoring a disjoint slice."""
    from ..train import predict
    comm = get_comm(comm)
    X, Y = (np.asarray(a) for a in data)
    lo, hi = shard_bounds(len(X), comm.Get_rank(), comm.Get_size())
    correct = 0
    if hi > lo:
        logits = predict(model, X[lo:hi], batch_size=batch_size, backend=backend)
        correct = int(np.sum(np.argmax(logits, axis=-1) == Y[lo:hi]))
    c, n = allreduce_sum([correct, hi - lo], comm)
    return float(c / n)


def barrier(comm=None, what: str = "a barrier") -> None:
    """Wait until every rank gets here (aborting if a rank ends the program instead)."""
    comm = get_comm(comm)
    wait([comm.Ibarrier()], comm, what)


def save_checkpoint(model, path, optimizer=None, comm=None):
    """Rank 0 writes model (+ optimizer) state to `path`; all ranks wait for it.

    Returns the path on rank 0, None on the others.  (The ranks' parameters
    are identical, so one copy is the whole state.)
    """
    comm = get_comm(comm)
    written = None
    if comm.Get_rank() == 0:
        with guard(comm):
            if optimizer is not None:
                model.save(path, optimizer=optimizer)
            else:
                model.save(path)
        written = str(path)
    barrier(comm, f"the barrier after saving {path}")   # nobody reads a partial checkpoint
    return written


def maybe_wrap(step, **kwargs):
    """`step` (a compiled TrainStep) as a DistributedStep when launched under
    mpiexec with several ranks; `step` itself otherwise.  kwargs go to
    DistributedStep.from_train_step (bucket_bytes, ...)."""
    if not is_distributed():
        return step
    from .step import DistributedStep
    return DistributedStep.from_train_step(step, **kwargs)


def maybe_shard(arrays, batch_size: int, seed: int = 0, shuffle: bool = True,
                drop_last: bool = False):
    """A DistributedLoader over `arrays` (batch_size = global batch) under
    mpiexec; the arrays tuple unchanged otherwise (for graphc.train.fit)."""
    if not is_distributed():
        return tuple(arrays)
    return DistributedLoader(arrays, batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last)
