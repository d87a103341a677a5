"""Adam and AdamW, as PyTorch documents them (torch.optim.Adam / AdamW).

Per step t (1-based, read from the optimizer's in-graph step counter):

    Adam:   g ← ∇θ + λ·θ                       (L2 weight decay λ, folded into g)
    AdamW:  θ ← θ − γ·λ·θ                      (decoupled weight decay)
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²
    m̂ ← m / (1 − β1^t)
    v̂ ← v / (1 − β2^t)        (amsgrad: v_max ← max(v_max, v);  v̂ ← v_max / (1 − β2^t))
    θ ← θ − γ·m̂ / (√v̂ + ε)

The bias corrections are computed in float64 from the step counter and then
cast to the parameter's dtype.
"""
from __future__ import annotations

from ..ir import dtypes as dt
from ..ops import elementwise as E
from .optimizer import Optimizer

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        super().__init__(params, lr)
        b1, b2 = (float(b) for b in betas)
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{type(self).__name__}: {name} must be in [0, 1), got {b}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: eps and weight_decay must be >= 0")
        self.betas, self.eps = (b1, b2), float(eps)
        self.weight_decay, self.amsgrad = float(weight_decay), bool(amsgrad)

    def _init_state(self):
        for i, p in enumerate(self.params):
            self._buffer(i, "exp_avg", p)
            self._buffer(i, "exp_avg_sq", p)
            if self.amsgrad:
                self._buffer(i, "max_exp_avg_sq", p)

    def _rule(self, i, p, g, lr, t):
        b1, b2 = self.betas
        tf = E.cast(t, dt.float64)
        bc1 = E.cast(1.0 - b1 ** tf, p.dtype)
        bc2 = E.cast(1.0 - b2 ** tf, p.dtype)
        base = p
        if self.weight_decay:
            if self._decoupled:
                base = p - lr * self.weight_decay * p
            else:
                g = g + self.weight_decay * p
        m = self._set(self._buffer(i, "exp_avg", p),
                      b1 * self._buffer(i, "exp_avg", p) + (1.0 - b1) * g)
        v = self._set(self._buffer(i, "exp_avg_sq", p),
                      b2 * self._buffer(i, "exp_avg_sq", p) + (1.0 - b2) * E.square(g))
        if self.amsgrad:
            vmax_buf = self._buffer(i, "max_exp_avg_sq", p)
            v = self._set(vmax_buf, E.maximum(vmax_buf, v))
        m_hat = m / bc1
        v_hat = v / bc2
        return base - lr * m_hat / (E.sqrt(v_hat) + self.eps)

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, amsgrad={self.amsgrad})")


class AdamW(Adam):
    """Adam with decoupled weight decay (default λ = 0.01, as in PyTorch)."""
    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
