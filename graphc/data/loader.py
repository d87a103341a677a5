"""Mini-batch iteration over aligned arrays (images, labels, ...).

Shuffling is seeded by ``(seed, epoch)``: the same pair always gives the same
order, on any machine, so a training run can be replayed exactly, while each
epoch still sees a fresh order.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Sequence

import numpy as np

__all__ = ["batches", "DataLoader"]


def _check(arrays, batch_size) -> tuple[tuple[np.ndarray, ...], int]:
    """Validate the inputs; return the arrays (as ndarrays) and their length."""
    if isinstance(arrays, np.ndarray):
        # tuple(ndarray) would silently iterate over rows: make the user say
        # what they mean.
        raise TypeError("arrays must be a tuple of arrays, e.g. (images, labels) or (x,)")
    arrays = tuple(np.asarray(a) for a in arrays)
    if not arrays:
        raise ValueError("arrays must contain at least one array")
    if any(a.ndim == 0 for a in arrays):
        raise ValueError("every array needs a leading sample axis; got a 0-d array")
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) > 1:
        raise ValueError(f"arrays must all have the same length, got lengths {lengths}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return arrays, lengths[0]


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _generate(arrays, n, batch_size, shuffle, seed, drop_last, epoch):
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else None
    for b in range(_num_batches(n, batch_size, drop_last)):
        start, stop = b * batch_size, min((b + 1) * batch_size, n)
        # Unshuffled batches are views (slices, no copy); shuffled ones gather.
        sel = slice(start, stop) if order is None else order[start:stop]
        yield tuple(a[sel] for a in arrays)


def batches(
    arrays: Sequence,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    epoch: int = 0,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield tuples of aligned mini-batches from *arrays*.

    Args:
        arrays: a tuple (or list) of arrays sharing their first dimension,
            e.g. ``(images, labels)``.
        batch_size: samples per batch (>= 1).
        shuffle: visit samples in the order of
            ``np.random.default_rng((seed, epoch)).permutation(n)``; otherwise
            in order.
        seed, epoch: together pick the shuffle order; the same pair gives the
            same order, different epochs give different orders.
        drop_last: drop the final batch if it is smaller than *batch_size*.

    Every sample appears exactly once per epoch (except those in a dropped
    last batch). Inputs are validated immediately, not at the first ``next``.
    """
    arrays, n = _check(arrays, batch_size)
    return _generate(arrays, n, int(batch_size), shuffle, seed, drop_last, epoch)


class DataLoader:
    """Re-iterable :func:`batches`: each ``iter()`` is a new epoch.

    ``for epoch in range(E): for x, y in loader: ...`` shuffles differently on
    every pass, reproducibly for a given *seed*. ``epoch`` holds the epoch the
    next iteration will use; :meth:`set_epoch` moves it (e.g. when resuming).
    """

    def __init__(self, arrays: Sequence, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.arrays, self.num_samples = _check(arrays, batch_size)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use *epoch*'s order."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        epoch = self.epoch
        self.epoch += 1
        return _generate(self.arrays, self.num_samples, self.batch_size,
                         self.shuffle, self.seed, self.drop_last, epoch)

    def __len__(self) -> int:
        """Batches per epoch."""
        return _num_batches(self.num_samples, self.batch_size, self.drop_last)

    def __repr__(self) -> str:
        return (f"DataLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"epoch={self.epoch})")
