"""Stochastic gradient descent with momentum, Nesterov and weight decay.

The update is PyTorch's documented algorithm (torch.optim.SGD), per step t:

    g ← ∇θ + λ·θ                               (weight_decay λ)
    if μ ≠ 0:                                  (momentum μ, dampening τ)
        b ← g                     if t = 1
        b ← μ·b + (1 − τ)·g       otherwise
        g ← g + μ·b  if nesterov  else  b
    θ ← θ − γ·g                                (learning rate γ)
"""
from __future__ import annotations

from ..ops import elementwise as E
from .optimizer import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        super().__init__(params, lr)
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires momentum > 0 and dampening = 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay, self.dampening = float(weight_decay), float(dampening)

    def _init_state(self):
        if self.momentum:
            for i, p in enumerate(self.params):
                self._buffer(i, "momentum_buffer", p)

    def _rule(self, i, p, g, lr, t):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self._buffer(i, "momentum_buffer", p)
            if self.dampening:
                # First step: b = g; later: (1 - τ)·g.  b starts at 0, so μ·b vanishes then.
                first = E.cast(E.equal(t, 1), p.dtype)
                coef = 1.0 - self.dampening * (1.0 - first)
                b = self.momentum * buf + coef * g
            else:
                b = self.momentum * buf + g
            self._set(buf, b)
            g = g + self.momentum * b if self.nesterov else b
        return p - lr * g

    def __repr__(self):
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay}, dampening={self.dampening})")
