"""Gradient buckets: many small gradient arrays fused into few large allreduces.

A model has one gradient array per parameter, many of them tiny (biases).
One MPI message each would pay the per-message latency dozens of times per
step, so gradients are packed into a few contiguous buffers ("buckets", at
most `bucket_bytes` each, one dtype each) and every bucket is reduced with a
single non-blocking ``Iallreduce`` started as soon as the bucket is packed:
while the network moves bucket k, this rank packs bucket k+1.  Buckets are
filled in reverse parameter order (the order a backward pass produces
gradients, output layer first), as PyTorch's DDP and Horovod do.

Averaging is by samples, not by ranks: each rank packs ``n_local · g_local``
and adds ``n_local`` and ``n_local · loss_local`` to the last bucket, so
after the sum ``g = Σ n_r g_r / Σ n_r`` -- exactly the gradient of the mean
loss over the concatenated global batch, even when the shards have unequal
sizes (a last, short batch), at no extra message.

After the reduction the per-parameter gradients are *views* into the bucket
buffers (no unpacking copy); they are valid until the next `reduce`.
"""
from __future__ import annotations

import sys

import numpy as np

from .env import wait

__all__ = ["GradientBuckets"]

DEFAULT_BUCKET_BYTES = 1 << 20   # 1 MiB: LeNet-5's 62k float32 gradients fit in one


class _Bucket:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.members: list = []      # (param index, offset, size, shape)
        self.size = 0                # elements, before the meta slots
        self.meta = 0                # 2 when it carries [Σ n·loss, Σ n]
        self.buffer = None

    @property
    def nbytes(self) -> int:
        return (self.size + self.meta) * self.dtype.itemsize


class GradientBuckets:
    """Plan and run the bucketed, sample-weighted gradient allreduce.

    specs: [(shape, dtype)] of the gradients, in parameter order.
    """

    def __init__(self, specs, comm, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.comm = comm
        self.bucket_bytes = int(bucket_bytes)
        self.specs = [(tuple(s), np.dtype(d)) for s, d in specs]
        self.buckets: list[_Bucket] = []
        cur = None
        for i in reversed(range(len(self.specs))):          # backward order
            shape, dtype = self.specs[i]
            n = int(np.prod(shape, dtype=np.int64))
            if (cur is None or cur.dtype != dtype
                    or (cur.size and (cur.size + n) * dtype.itemsize > self.bucket_bytes)):
                cur = _Bucket(dtype)
                self.buckets.append(cur)
            cur.members.append((i, cur.size, n, shape))
            cur.size += n
        # The sample count and weighted loss ride in the last bucket when its
        # dtype holds them well; otherwise in a small float64 bucket of their own.
        if self.buckets and self.buckets[-1].dtype in (np.float32, np.float64):
            self._meta_bucket = self.buckets[-1]
        else:
            self._meta_bucket = _Bucket(np.float64)
            self.buckets.append(self._meta_bucket)
        self._meta_bucket.meta = 2
        self.views: list = [None] * len(self.specs)
        for b in self.buckets:
            b.buffer = np.zeros(b.size + b.meta, dtype=b.dtype)
            for i, off, n, shape in b.members:
                self.views[i] = b.buffer[off:off + n].reshape(shape)
        mpi = sys.modules.get("mpi4py.MPI")
        self._in_place = None if getattr(comm, "local", False) or mpi is None else mpi.IN_PLACE

    # ------------------------------------------------------------ facts
    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def nbytes(self) -> int:
        """Bytes this rank contributes to the allreduce per step (the payload)."""
        return sum(b.nbytes for b in self.buckets)

    def describe(self) -> str:
        return (f"{len(self.specs)} gradients in {len(self.buckets)} bucket(s) of "
                f"{[b.nbytes for b in self.buckets]} bytes")

    # ------------------------------------------------------------ the reduction
    def reduce(self, grads, weight: float, loss: float, what: str = "the gradient allreduce"):
        """Sum `weight · grads` and (`weight · loss`, `weight`) over all ranks.

        grads: arrays in parameter order (None = this rank has no samples:
        contributes zeros).  Returns (gradient views, total weight, weighted
        loss sum); the views hold Σ_r weight_r · grads_r (the caller divides
        by the total weight -- the update graph does it, fused).
        """
        reqs = []
        for b in self.buckets:
            for i, off, n, shape in b.members:
                view = self.views[i]
                g = None if grads is None else grads[i]
                if g is None or weight == 0:
                    view[...] = 0
                elif weight == 1:
                    np.copyto(view, g, casting="same_kind")
                else:
                    np.multiply(g, weight, out=view, casting="same_kind")
            if b.meta:
                b.buffer[b.size] = weight * loss if weight else 0.0
                b.buffer[b.size + 1] = weight
            send = self._in_place if self._in_place is not None else b.buffer
            reqs.append(self.comm.Iallreduce(send, b.buffer))   # starts now; next bucket packs
        wait(reqs, self.comm, what)
        m = self._meta_bucket.buffer[self._meta_bucket.size:]
        return self.views, float(m[1]), float(m[0])
