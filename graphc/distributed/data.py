"""Sharded data loading: each rank reads a disjoint part of every global batch.

The epoch order is graphc.data's: a permutation drawn from ``(seed, epoch)``,
the same on every rank with no communication.  Each *global* batch of
`batch_size` samples is cut into `size` contiguous pieces (sizes differ by at
most one when it does not divide) and rank r takes piece r.  So

* the ranks' pieces of an epoch are disjoint and together cover it exactly
  once, reshuffled every epoch;
* every rank runs the same number of steps per epoch (a rank whose piece of a
  short last batch is empty still takes part in the step, contributing no
  samples);
* N ranks with global batch B train exactly like one process with batch B
  (`DistributedStep` averages the gradients weighted by sample counts).
"""
from __future__ import annotations

import math

import numpy as np

from ..data import batches
from .env import get_comm

__all__ = ["shard_bounds", "shard_batches", "DistributedLoader"]


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous piece when n items are split over size ranks."""
    q, r = divmod(int(n), int(size))
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def _arrays(arrays):
    if isinstance(arrays, np.ndarray):
        raise TypeError("arrays must be a tuple of arrays, e.g. (images, labels) or (x,)")
    arrays = tuple(np.asarray(a) for a in arrays)
    if not arrays:
        raise ValueError("arrays must contain at least one array")
    lengths = [len(a) if a.ndim else None for a in arrays]
    if None in lengths or len(set(lengths)) > 1:
        raise ValueError(f"arrays must all have the same leading length, got shapes "
                         f"{[a.shape for a in arrays]}")
    return arrays


def shard_batches(arrays, batch_size: int, shuffle: bool = True, seed: int = 0,
                  drop_last: bool = False, epoch: int = 0, comm=None, rank=None, size=None):
    """Yield this rank's piece of every global batch of one epoch.

    batch_size is the *global* batch (all ranks together).  rank/size default
    to the communicator's; pass them to compute another rank's shards.
    """
    arrays = _arrays(arrays)
    if rank is None or size is None:
        c = get_comm(comm)
        rank = c.Get_rank() if rank is None else rank
        size = c.Get_size() if size is None else size
    if not 0 <= rank < size:
        raise ValueError(f"shard_batches: rank {rank} is not in [0, {size})")
    # The index batches of graphc.data.batches: the same (seed, epoch) order as a
    # single process sees, validated the same way.
    index_batches = batches((np.arange(len(arrays[0])),), batch_size,
                            shuffle=shuffle, seed=seed, drop_last=drop_last, epoch=epoch)
    for (idx,) in index_batches:
        lo, hi = shard_bounds(len(idx), rank, size)
        mine = idx[lo:hi]
        yield tuple(a[mine] for a in arrays)


class DistributedLoader:
    """Re-iterable `shard_batches` (like graphc.data.DataLoader): each iter() is an epoch.

    Works with graphc.train.fit (it has set_epoch and len).
    """

    def __init__(self, arrays, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, comm=None):
        self.arrays = _arrays(arrays)
        self.num_samples = len(self.arrays[0])
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        c = get_comm(comm)
        self.rank, self.size = c.Get_rank(), c.Get_size()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return shard_batches(self.arrays, self.batch_size, self.shuffle, self.seed,
                             self.drop_last, epoch, rank=self.rank, size=self.size)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __repr__(self):
        return (f"DistributedLoader(num_samples={self.num_samples}, global batch_size="
                f"{self.batch_size}, rank {self.rank} of {self.size}, seed={self.seed})")
