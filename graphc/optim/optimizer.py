"""The optimizer base: update rules as graph nodes, state as Parameters.

An optimizer turns a scalar loss into ``{Parameter: new value node}``
(``updates(loss)``): gradients come from ``gc.grad`` (the backward graph),
the update rule is more graph nodes (tagged role "update").
``compile_step`` compiles forward, backward, the parameter update and the
model's state updates (batch-norm running stats, dropout keys) into one
callable, so a training step is one call.

Its state lives in non-trainable Parameters that the compiled graph reads
and writes: the learning rate ``lr`` (a float64 scalar, so changing it
between steps needs no recompilation), a step counter, and per-parameter
buffers (momenta).  ``state_dict()`` names them

    "lr", "step", "state.<i>.<buffer>"   (i = index of the parameter)

and ``save``/``load`` (or ``model.save(path, optimizer=opt)``) keep them in
an .npz file next to the model.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..ir import dtypes as dt
from ..ir.graph import toposort
from ..ir.node import Node, role, user_location
from ..ops import elementwise as E
from ..tensor import Parameter
from ..nn.module import make_parameter

__all__ = ["Optimizer", "TrainStep"]


def trace_loss(loss_fn, inputs, outputs, who: str, loc: str):
    """Build the loss graph: (loss, extra output nodes, {buffer: new value}).

    loss_fn(*inputs) returns the loss or (loss, extra, ...); `outputs` adds
    extras; model state updates (batch-norm statistics, dropout keys) that the
    modules register while building are collected."""
    from ..nn.module import collect_state_updates
    if not inputs:
        raise TypeError(f"{who}: pass the graph inputs after loss_fn (at {loc})")
    with collect_state_updates() as state_updates:
        res = loss_fn(*inputs)
    if isinstance(res, (tuple, list)):
        loss, extras = res[0], list(res[1:])
    else:
        loss, extras = res, []
    return loss, extras + list(outputs), state_updates


class Optimizer:
    """Base class.  Subclasses implement `_rule(i, p, g, lr, t)` → new value of p."""

    def __init__(self, params, lr: float):
        if isinstance(params, Parameter):
            raise TypeError("optimizer params must be an iterable of Parameters (e.g. "
                            "model.parameters()), not a single Parameter")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        seen = set()
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"optimizer params must be gc.Parameter objects, got {p!r}")
            if not dt.is_float(p.dtype):
                raise TypeError(f"cannot optimize parameter {p.label()} of dtype {p.dtype}")
            if p.id in seen:
                raise ValueError(f"parameter {p.label()} appears twice in the optimizer's list")
            seen.add(p.id)
        self.params = params
        self._lr = make_parameter(np.array(self._check_lr(lr), dtype=np.float64), name="lr",
                                  trainable=False)
        self._step = make_parameter(np.array(0, dtype=np.int64), name="step", trainable=False)
        self._buffers: "OrderedDict[str, Parameter]" = OrderedDict()

    # ------------------------------------------------------------ hyperparameters
    @staticmethod
    def _check_lr(lr) -> float:
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        return lr

    @property
    def lr(self) -> float:
        return float(self._lr.value)

    @lr.setter
    def lr(self, value):
        self.set_lr(value)

    def set_lr(self, value) -> None:
        """Change the learning rate; compiled steps read it at their next call."""
        self._lr.set_value(np.array(self._check_lr(value), dtype=np.float64))

    @property
    def lr_param(self) -> Parameter:
        """The scalar Parameter holding the learning rate (read by compiled steps)."""
        return self._lr

    @property
    def step_count(self) -> int:
        """Number of compiled steps taken (the in-graph counter)."""
        return int(self._step.value)

    # ------------------------------------------------------------ state
    def _buffer(self, i: int, name: str, like: Parameter) -> Parameter:
        """The per-parameter buffer `name` of parameter i (created zero on first use)."""
        key = f"state.{i}.{name}"
        buf = self._buffers.get(key)
        if buf is None:
            label = f"{like.label()}.{name}"
            buf = make_parameter(np.zeros_like(like.value), name=label, trainable=False)
            self._buffers[key] = buf
        return buf

    def _init_state(self) -> None:
        """Create every buffer up front (so state_dict is complete before the first step)."""

    def _named_state(self):
        self._init_state()
        yield "lr", self._lr
        yield "step", self._step
        yield from self._buffers.items()

    def state_buffers(self) -> list:
        return [p for _, p in self._named_state()]

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        from ..nn.module import _value
        return OrderedDict((k, _value(p)) for k, p in self._named_state())

    def state_dict_check(self, state) -> list:
        """Validate `state` against this optimizer; return [(Parameter, array)] to write."""
        from ..nn.module import StateDictError, _checked_value
        own = OrderedDict(self._named_state())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = ([f"missing key(s) {missing}"] if missing else []) + (
                [f"unexpected key(s) {unexpected}"] if unexpected else [])
            raise StateDictError(f"{type(self).__name__}.load_state_dict: " + "; ".join(parts))
        return [(p, _checked_value(k, state[k], p)) for k, p in own.items()]

    def load_state_dict(self, state) -> None:
        from ..nn.module import _write
        for p, v in self.state_dict_check(state):
            _write(p, v)

    def save(self, path) -> None:
        from ..nn.module import save_npz
        save_npz(path, self.state_dict())

    def load(self, path) -> None:
        from ..nn.module import StateDictError, load_npz
        try:
            self.load_state_dict(load_npz(path))
        except StateDictError as e:
            if str(path) in str(e):
                raise
            raise StateDictError(f"{path}: {e}") from None

    # ------------------------------------------------------------ building updates
    def _rule(self, i: int, p: Parameter, g: Node, lr: Node, t: Node) -> Node:
        raise NotImplementedError

    def updates(self, loss: Node) -> dict:
        """{Parameter: new value node} for one step on `loss` (a float scalar).

        Parameters the loss does not depend on are left alone (as PyTorch
        skips parameters without a gradient).  The step counter advances.
        """
        from ..autodiff import grad
        loc = user_location()
        if not isinstance(loss, Node):
            raise TypeError(f"{type(self).__name__}.updates: loss must be a graph tensor, got "
                            f"{type(loss).__name__} (at {loc})")
        if loss.shape != () or not dt.is_float(loss.dtype):
            raise ValueError(f"{type(self).__name__}.updates: loss must be a float scalar, got "
                             f"{loss.type} (at {loc})")
        reachable = {n.id for n in toposort([loss])}
        used = [(i, p) for i, p in enumerate(self.params) if p.id in reachable]
        if not used:
            raise ValueError(f"{type(self).__name__}: the loss depends on none of the "
                             f"optimizer's parameters (at {loc})")
        grads = grad(loss, [p for _, p in used])
        return self.apply_gradients({i: g for (i, _), g in zip(used, grads)})

    def apply_gradients(self, grads: dict) -> dict:
        """{Parameter: new value node} from gradients given as graph nodes.

        grads: {index of the parameter in self.params: gradient node}.  This is
        `updates` without the gc.grad call: the same per-parameter rule,
        learning-rate cast, buffers and step counter.  Data-parallel training
        feeds it gradients averaged across processes.
        """
        ups: dict = {}
        with role("update"):
            t = self._step + 1                       # this step's number, 1-based
            lr_by_dtype: dict = {}
            for i, p in enumerate(self.params):
                if i not in grads:
                    continue
                lr = lr_by_dtype.get(p.dtype)
                if lr is None:
                    lr = lr_by_dtype[p.dtype] = E.cast(self._lr, p.dtype)
                self._rule_updates = ups
                ups[p] = self._rule(i, p, grads[i], lr, t)
            ups[self._step] = t
        return ups

    def _set(self, buf: Parameter, new: Node) -> Node:
        """Inside `_rule`: write `new` into buffer `buf` at the end of the step."""
        self._rule_updates[buf] = new
        return new

    def compile_step(self, loss_fn, *inputs, backend="numpy", optimize=2, outputs=(),
                     name=None) -> "TrainStep":
        """Compile one training step: forward, backward, update, state updates.

        loss_fn(*inputs) builds the loss (a float scalar); it may also return
        (loss, extra, ...) to get extra outputs back; `outputs` adds further
        nodes.  The returned TrainStep is called with arrays for `inputs` and
        returns the loss (a NumPy scalar), or (loss, *extras) when there are
        extras.
        """
        from ..function import compile as gc_compile
        loc = user_location()
        loss, extras, state_updates = trace_loss(loss_fn, inputs, outputs, "compile_step", loc)
        ups = self.updates(loss)
        for p, v in state_updates.items():
            if p in ups:
                raise ValueError(f"compile_step: {p.label()} is both optimized and updated as "
                                 f"model state (at {loc})")
            ups[p] = v
        fn = gc_compile(list(inputs), [loss] + extras, updates=ups, backend=backend,
                        optimize=optimize, name=name or f"{type(self).__name__.lower()}_step")
        return TrainStep(fn, self, len(extras))

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, {len(self.params)} parameters)"


class TrainStep:
    """A compiled training step: call it with a batch; returns the loss."""

    def __init__(self, function, optimizer: Optimizer, n_extra: int):
        self.function = function
        self.optimizer = optimizer
        self.n_extra = n_extra

    def __call__(self, *args, **kwargs):
        outs = self.function(*args, **kwargs)
        loss = np.asarray(outs[0])[()]
        if self.n_extra:
            return (loss, *outs[1:])
        return loss

    @property
    def graph(self):
        return getattr(self.function, "graph", None)

    def __repr__(self):
        return f"TrainStep({self.optimizer!r}, backend={self.function.backend_name!r})"
