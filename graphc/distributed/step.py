"""`DistributedStep`: a data-parallel, synchronous training step over MPI.

Where ``optimizer.compile_step`` compiles forward + backward + update into
one callable, the data-parallel step compiles two:

1. the *gradient function*: this rank's loss, extra outputs and the gradient
   of every parameter on its shard of the batch (plus the model's own state
   updates: batch-norm running statistics, dropout keys);
2. the *update function*: one ``gc.input`` per parameter holding the summed
   gradient, and a scalar ``1 / Σ samples``; it applies the optimizer's own
   update rule (``Optimizer._rule``: the same graph nodes, the same state
   buffers, the same step counter) to the averaged gradients.

Between them the gradients are averaged across ranks with bucketed
allreduces (see buckets.py).  Every rank then applies the identical update to
identical parameters, so the ranks stay bit-identical without ever
re-broadcasting weights.  At construction the ranks check that they built the
same model (a hash of parameter names, shapes and dtypes), and rank 0's
initial parameters and optimizer state are broadcast to all.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np

from ..ir import dtypes as dt
from ..ir.graph import toposort
from ..ir.node import Node, role, user_location
from ..ops import elementwise as E
from ..tensor import Parameter
from .buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from .env import (DistributedError, abort, get_comm, install_exit_check, note_progress,
                  wait)

__all__ = ["DistributedStep", "structure_signature", "check_structure", "broadcast_parameters",
           "apply_gradients"]


# ------------------------------------------------------------------ consistency checks
def _param_name(p: Parameter) -> str:
    # Node ids ("%123") depend on how many nodes a process built before; only
    # real names are comparable across ranks.
    return p.name or "<unnamed>"


def structure_signature(params, extra=()) -> tuple[str, list[str]]:
    """(sha256 hex, per-parameter descriptions) of names, shapes and dtypes
    (and the strings in `extra`, e.g. the optimizer's repr)."""
    desc = [f"{i}: {_param_name(p)} {tuple(p.shape)} {p.dtype}" for i, p in enumerate(params)]
    desc += [str(e) for e in extra]
    h = hashlib.sha256("\n".join(desc).encode()).hexdigest()
    return h, desc


def check_structure(params, comm=None, what: str = "model", extra=()) -> str:
    """Raise DistributedError on every rank unless all ranks hold the same structure.

    All ranks take part (an allgather), and all of them raise together, so
    a mismatch never leaves a rank waiting.
    """
    comm = get_comm(comm)
    h, desc = structure_signature(params, extra)
    hashes = comm.allgather(h)
    if len(set(hashes)) == 1:
        return h
    descs = comm.allgather(desc)
    r = comm.Get_rank()
    bad = [k for k, hk in enumerate(hashes) if hk != hashes[0]]
    k = bad[0]
    a, b = descs[0], descs[k]
    if len(a) != len(b):
        detail = f"rank 0 has {len(a)} entries, rank {k} has {len(b)}"
    else:
        j = next(j for j in range(len(a)) if a[j] != b[j])
        detail = f"first difference: rank 0 has [{a[j]}], rank {k} has [{b[j]}]"
    raise DistributedError(
        f"the {what} structure differs between ranks (this is rank {r}): ranks {bad} "
        f"disagree with rank 0; {detail}. Every rank must build the same model "
        "(same layers, sizes, dtypes, in the same order).")


def broadcast_parameters(params, comm=None, root: int = 0) -> None:
    """Overwrite `params` on every rank with root's values (one message per dtype)."""
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        return
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault(np.dtype(p.value.dtype), []).append(p)
    for dtype, ps in sorted(by_dtype.items(), key=lambda kv: kv[0].str):
        flat = np.empty(sum(p.value.size for p in ps), dtype=dtype)
        if comm.Get_rank() == root:
            off = 0
            for p in ps:
                flat[off:off + p.value.size] = p.value.ravel()
                off += p.value.size
        wait([comm.Ibcast(flat, root=root)], comm, "a parameter broadcast")
        off = 0
        for p in ps:
            p.set_value(flat[off:off + p.value.size].reshape(p.value.shape))
            off += p.value.size


# ------------------------------------------------------------------ the optimizer's rule
def apply_gradients(optimizer, grads: dict) -> dict:
    """{Parameter: new value} from the optimizer's update rule fed `grads`
    ({index in optimizer.params: gradient node}); see Optimizer.apply_gradients."""
    return optimizer.apply_gradients(grads)


# ------------------------------------------------------------------ the step
class DistributedStep:
    """A synchronous data-parallel training step; call it with this rank's shard.

        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = DistributedStep(opt, lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
        for xb, yb in distributed.shard_batches((X, Y), 64, seed=0, epoch=e):
            loss = step(xb, yb)     # the loss over the whole global batch, on every rank

    The loss function must be a *mean* over the samples of the batch: the
    gradients are averaged weighted by each rank's number of samples (the
    leading dimension of the first input), so the result equals one process
    training on the concatenated global batch.  The call returns that global
    mean loss (identical on every rank), or (loss, *extras) where extras are
    this rank's local extra outputs.

    comm: an mpi4py communicator (default: COMM_WORLD under mpiexec, else a
    one-rank stand-in).  bucket_bytes: the gradient-bucket size.
    broadcast_buffers: after each step copy rank 0's model state (batch-norm
    running statistics, dropout keys) to all ranks, as PyTorch's DDP does.
    abort_on_error: an exception in this rank's part of the step prints the
    error and aborts the whole job (the other ranks are blocked in the
    allreduce waiting for it); single-rank runs just raise.
    """

    def __init__(self, optimizer, loss_fn, *inputs, comm=None, backend="numpy", optimize=2,
                 outputs=(), bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 broadcast_buffers: bool = True, abort_on_error: bool = True, name=None):
        from ..optim.optimizer import trace_loss
        loc = user_location()
        loss, extras, state_updates = trace_loss(loss_fn, inputs, outputs, "DistributedStep", loc)
        self._build(optimizer, loss, extras, list(inputs), list(state_updates.items()), comm,
                    backend, optimize, bucket_bytes, broadcast_buffers, abort_on_error, name,
                    loc)

    @classmethod
    def from_train_step(cls, step, comm=None, **kwargs) -> "DistributedStep":
        """Make a data-parallel step from a compiled `TrainStep` (optimizer.compile_step).

        The step's loss, extras, inputs, backend and model-state updates are
        reused; the optimizer update is rebuilt on averaged gradients.
        """
        fn, opt = step.function, step.optimizer
        own = {p.id for p in opt.params} | {p.id for p in opt.state_buffers()}
        state = [(p, v) for p, v in fn.updates if p.id not in own]
        self = cls.__new__(cls)
        kwargs.setdefault("backend", fn.backend_name)
        kwargs.setdefault("optimize", fn.optimize)
        self._build(opt, fn.outputs[0], list(fn.outputs[1:]), list(fn.inputs), state, comm,
                    kwargs.pop("backend"), kwargs.pop("optimize"),
                    kwargs.pop("bucket_bytes", DEFAULT_BUCKET_BYTES),
                    kwargs.pop("broadcast_buffers", True), kwargs.pop("abort_on_error", True),
                    kwargs.pop("name", None), user_location())
        if kwargs:
            raise TypeError(f"from_train_step: unexpected arguments {sorted(kwargs)}")
        return self

    # ------------------------------------------------------------ building
    def _build(self, optimizer, loss, extras, inputs, state_updates, comm, backend, optimize,
               bucket_bytes, broadcast_buffers, abort_on_error, name, loc):
        from ..autodiff import grad
        from ..function import compile as gc_compile
        self.optimizer = optimizer
        self.comm = get_comm(comm)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.abort_on_error = abort_on_error
        self.broadcast_buffers = broadcast_buffers
        self.n_extra = len(extras)
        if not isinstance(loss, Node) or loss.shape != () or not dt.is_float(loss.dtype):
            raise ValueError(f"DistributedStep: the loss must be a float scalar tensor, got "
                             f"{getattr(loss, 'type', type(loss).__name__)} (at {loc})")
        self._loss_dtype = np.dtype(str(loss.dtype))
        reachable = {n.id for n in toposort([loss])}
        self.used = [i for i, p in enumerate(optimizer.params) if p.id in reachable]
        if not self.used:
            raise ValueError(f"DistributedStep: the loss depends on none of the optimizer's "
                             f"parameters (at {loc})")
        params = [optimizer.params[i] for i in self.used]
        own = {p.id for p in optimizer.params} | {p.id for p in optimizer.state_buffers()}
        for p, _ in state_updates:
            if p.id in own:
                raise ValueError(f"DistributedStep: {p.label()} is both optimized and updated "
                                 f"as model state (at {loc})")
        self.state_buffers = [p for p, _ in state_updates]

        # The ranks must agree before any collective on gradients is sized: the
        # model's parameters and buffers, the optimizer's state buffers and its
        # hyperparameters (a different momentum would diverge silently).
        state = list(optimizer.params) + self.state_buffers + optimizer.state_buffers()
        self.signature = check_structure(state, self.comm, what="model/optimizer",
                                         extra=[repr(optimizer)])
        install_exit_check(self.comm)
        broadcast_parameters(state, self.comm)

        base = name or f"{type(optimizer).__name__.lower()}_step"
        grads = grad(loss, params)
        self.grad_fn = gc_compile(inputs, [loss] + extras + list(grads),
                                  updates=dict(state_updates), backend=backend,
                                  optimize=optimize, name=f"{base}_grad")
        from .. import input as gc_input
        g_inputs = [gc_input(f"grad_{k}", p.shape, dtype=p.dtype) for k, p in enumerate(params)]
        scale = gc_input("inv_samples", (), dtype="float64")   # 1 / Σ samples
        avg = {}
        for i, p, g in zip(self.used, params, g_inputs):
            with role("update"):
                avg[i] = g * E.cast(scale, p.dtype)
        self.update_fn = gc_compile(g_inputs + [scale], [], updates=apply_gradients(optimizer, avg),
                                    backend=backend, optimize=optimize, name=f"{base}_update")
        self.buckets = GradientBuckets([(p.shape, p.dtype) for p in params], self.comm,
                                       bucket_bytes)
        self._first_input = inputs[0].name
        self.steps = 0
        self.last_timing: dict = {}

    # ------------------------------------------------------------ running
    def _local(self, args, kwargs):
        a = args[0] if args else kwargs.get(self._first_input)
        n = int(np.shape(a)[0]) if a is not None and np.ndim(a) else 1
        if n == 0:
            return 0, None, 0.0, [None] * self.n_extra
        outs = self.grad_fn(*args, **kwargs)
        loss = float(np.asarray(outs[0]))
        extras = outs[1:1 + self.n_extra]
        return n, outs[1 + self.n_extra:], loss, extras

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            n, grads, loss, extras = self._local(args, kwargs)
        except Exception as e:
            if self.abort_on_error and self.size > 1:
                abort(f"{type(e).__name__} in step {self.steps + 1} (computing this rank's "
                      f"gradients): {e}", self.comm, e)
            raise
        t1 = time.perf_counter()
        views, total, loss_sum = self.buckets.reduce(
            grads, n, loss, what=f"the gradient allreduce of step {self.steps + 1}")
        t2 = time.perf_counter()
        if total <= 0:
            raise DistributedError("DistributedStep: no rank had any samples in this step")
        try:
            self.update_fn(*views, np.float64(1.0 / total))
        except Exception as e:
            if self.abort_on_error and self.size > 1:
                abort(f"{type(e).__name__} in step {self.steps + 1} (applying the update): {e}",
                      self.comm, e)
            raise
        if self.broadcast_buffers and self.state_buffers:
            broadcast_parameters(self.state_buffers, self.comm)
        self.steps += 1
        note_progress(self.comm, self.steps)
        # Seconds of the last step: this rank's forward+backward, the gradient
        # allreduce (packing included; it also absorbs waiting for slower
        # ranks), the update (+ buffer broadcast).
        self.last_timing = {"compute": t1 - t0, "allreduce": t2 - t1,
                            "update": time.perf_counter() - t2}
        global_loss = np.asarray(loss_sum / total, dtype=self._loss_dtype)[()]
        if self.n_extra:
            return (global_loss, *extras)
        return global_loss

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank hands to the allreduce per step (gradients + 2 meta values)."""
        return self.buckets.nbytes

    @property
    def function(self):
        return self.grad_fn

    @property
    def graph(self):
        return getattr(self.grad_fn, "graph", None)

    def __repr__(self):
        return (f"DistributedStep({self.optimizer!r}, rank {self.rank} of {self.size}, "
                f"{self.buckets.describe()}, backend={self.grad_fn.backend_name!r})")
