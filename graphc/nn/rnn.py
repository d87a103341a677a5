"""Recurrent layers: RNN (tanh/relu), LSTM and GRU, built on `gc.scan`.

Weight layout and gate order follow PyTorch, so weights move between the two
by name: for layer k (and suffix "_reverse" for the backward direction of a
bidirectional layer)

    weight_ih_l{k}  (G*H, input_size)     bias_ih_l{k}  (G*H,)
    weight_hh_l{k}  (G*H, H)              bias_hh_l{k}  (G*H,)

with G = 1 (RNN), 4 (LSTM, gates i, f, g, o) or 3 (GRU, gates r, z, n).
ONNX orders LSTM gates i, o, f, c and GRU gates z, r, h; `graphc.onnx`
reorders when importing.  The equations are the standard ones:

    RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh)
    LSTM: i, f, g, o = σ, σ, tanh, σ of (W_ih x + b_ih + W_hh h + b_hh);
          c' = f*c + i*g;  h' = o * tanh(c')
    GRU:  r, z = σ(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z});
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn));  h' = (1-z)*n + z*h

The input projection W_ih x + b_ih of every time step is computed before the
loop as one large matmul; only the recurrent part runs inside it.

Sequences: x is (T, N, input_size), or (N, T, input_size) with
batch_first=True; T may be symbolic, so one model serves every length.
Variable-length batches pass `lengths` (N,) int: outputs past a sequence's
end are zero, the final state is the state after its last valid step, and
no gradient flows through the padding.  `step()` runs a single time step on
a carried state, for inputs revealed one element at a time.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops as _ops  # noqa: F401  (registers ops, installs operators)
from ..ops import activations as A
from ..ops import elementwise as E
from ..ops import indexing as I
from ..ops import linalg as L
from ..ops import shape as S
from ..ops.loop import scan
from ..ops.reduce import numel
from . import init as _init
from .module import Module

__all__ = ["RNN", "LSTM", "GRU"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _project(x, w, b):
    """x @ w.T + b over a (T, N, in) sequence.  With concrete T and N it is one 2-D
    product of (T*N, in) rows (a single large GEMM, forward and for the weight's
    gradient) rather than a batch of T products."""
    T, N, F = x.shape
    if isinstance(T, int) and isinstance(N, int):
        y = L.linear(S.reshape(x, (T * N, F)), w, b)
        return S.reshape(y, (T, N, y.shape[-1]))
    return L.linear(x, w, b)


def _split_last(x, n):
    """Split the last axis into n equal parts."""
    size = x.shape[-1] // n
    return [x[..., k * size:(k + 1) * size] for k in range(n)]


class _RNNBase(Module):
    mode = "RNN_TANH"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, nonlinearity=None, rng=None, dtype="float32"):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:
            raise ValueError(f"{type(self).__name__}: input_size, hidden_size and num_layers "
                             f"must be positive, got {input_size}, {hidden_size}, {num_layers}")
        if nonlinearity is not None:
            if nonlinearity not in ("tanh", "relu"):
                raise ValueError(f"RNN nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
            self.mode = "RNN_" + nonlinearity.upper()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        G = _GATES[self.mode]
        bound = 1.0 / math.sqrt(hidden_size)
        rng = _init._rng(rng)
        dirs = ("", "_reverse") if bidirectional else ("",)
        for k in range(num_layers):
            in_k = input_size if k == 0 else hidden_size * len(dirs)
            for d in dirs:
                def param(shape, name):
                    v = rng.uniform(-bound, bound, size=shape).astype(dtype)
                    self.register_parameter(name, v)
                param((G * hidden_size, in_k), f"weight_ih_l{k}{d}")
                param((G * hidden_size, hidden_size), f"weight_hh_l{k}{d}")
                if bias:
                    param((G * hidden_size,), f"bias_ih_l{k}{d}")
                    param((G * hidden_size,), f"bias_hh_l{k}{d}")

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")

    # ---------------------------------------------------------------- one cell
    def _weights(self, k, d):
        g = lambda n: getattr(self, f"{n}_l{k}{d}") if self.bias or "weight" in n else None
        return g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh")

    def _cell(self, xp, state, w_hh, b_hh):
        """One step given the projected input xp = W_ih x + b_ih."""
        h = state[0] if self.mode == "LSTM" else state
        hp = L.linear(h, w_hh, b_hh)
        if self.mode == "RNN_TANH":
            return A.tanh(xp + hp)
        if self.mode == "RNN_RELU":
            return A.relu(xp + hp)
        if self.mode == "LSTM":
            c = state[1]
            i, f, g, o = _split_last(xp + hp, 4)
            c2 = A.sigmoid(f) * c + A.sigmoid(i) * A.tanh(g)
            return (A.sigmoid(o) * A.tanh(c2), c2)
        xr, xz, xn = _split_last(xp, 3)
        hr, hz, hn = _split_last(hp, 3)
        r = A.sigmoid(xr + hr)
        z = A.sigmoid(xz + hz)
        n = A.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h

    # ---------------------------------------------------------------- a direction
    def _run_direction(self, x, state0, k, d, lengths):
        w_ih, w_hh, b_ih, b_hh = self._weights(k, d)
        reverse = d == "_reverse"
        xp = _project(x, w_ih, b_ih)  # hoisted: every time step in one matmul
        lstm = self.mode == "LSTM"
        if lengths is None:
            def step(state, xp_t):
                new = self._cell(xp_t, state, w_hh, b_hh)
                return new, (new[0] if lstm else new)
            final, ys = scan(step, state0, xp, reverse=reverse)
            return ys, final
        # Variable lengths: carry the time index; steps past a sequence's end keep
        # the state and emit zeros, so no gradient flows through the padding.
        T = numel(x, (0,), dtype="float32")
        t0 = (T - 1.0) if reverse else E.zeros_like(T)
        lens = E.cast(lengths, "float32")

        def step(carry, xp_t):
            t, state = carry[0], (carry[1:] if lstm else carry[1])
            new = self._cell(xp_t, state, w_hh, b_hh)
            valid = S.reshape(E.less(t, lens), (lens.shape[0], 1))
            h_new = new[0] if lstm else new
            if lstm:
                kept = tuple(E.where(valid, a, b) for a, b in zip(new, state))
            else:
                kept = (E.where(valid, new, state),)
            nt = t - 1.0 if reverse else t + 1.0
            return (nt,) + kept, E.where(valid, h_new, 0.0)
        init = (t0,) + (tuple(state0) if lstm else (state0,))
        final, ys = scan(step, init, xp, reverse=reverse)
        final = final[1:] if lstm else final[1]
        return ys, (tuple(final) if lstm else final)

    def _zeros_state(self, x):
        return S.broadcast_to(_ops.constant(0, x.dtype),
                              (x.shape[1], self.hidden_size))

    def forward(self, x, state=None, lengths=None):
        """x: (T, N, input) [or (N, T, input) if batch_first]; state: initial
        hidden state(s) shaped (num_layers*num_directions, N, H) (a pair (h0, c0)
        for LSTM), zeros by default; lengths: optional (N,) ints.

        Returns (output, h_n) — for LSTM (output, (h_n, c_n)) — with output
        (T, N, num_directions*H) (batch-first if requested) and h_n stacked
        (num_layers*num_directions, N, H), as in PyTorch.
        """
        if x.ndim != 3:
            raise ValueError(f"{type(self).__name__} expects a 3-D input (T, N, features), got "
                             f"shape {x.shape}")
        if self.batch_first:
            x = S.transpose(x, (1, 0, 2))
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, the "
                             f"layer expects input_size={self.input_size}")
        lstm = self.mode == "LSTM"
        dirs = ("", "_reverse") if self.bidirectional else ("",)
        L_ = self.num_layers * len(dirs)
        if state is None:
            zero = self._zeros_state(x)
            h0 = [zero] * L_
            c0 = [zero] * L_
        else:
            hs, cs = state if lstm else (state, None)
            h0 = [hs[j] for j in range(L_)]
            c0 = [cs[j] for j in range(L_)] if lstm else None
        finals_h, finals_c = [], []
        out = x
        for k in range(self.num_layers):
            outs = []
            for j, d in enumerate(dirs):
                idx = k * len(dirs) + j
                s0 = (h0[idx], c0[idx]) if lstm else h0[idx]
                ys, final = self._run_direction(out, s0, k, d, lengths)
                outs.append(ys)
                if lstm:
                    finals_h.append(final[0])
                    finals_c.append(final[1])
                else:
                    finals_h.append(final)
            out = outs[0] if len(outs) == 1 else I.concat(outs, axis=-1)
        if self.batch_first:
            out = S.transpose(out, (1, 0, 2))
        h_n = I.stack(finals_h, axis=0)
        return (out, (h_n, I.stack(finals_c, axis=0))) if lstm else (out, h_n)

    def step(self, x_t, state):
        """One time step for streaming: x_t (N, input), state as forward returns it
        ((num_layers*num_directions, N, H), or (h, c) for LSTM).  Unidirectional only.
        Returns (y_t, new_state)."""
        if self.bidirectional:
            raise ValueError("step(): a bidirectional layer needs the whole sequence")
        lstm = self.mode == "LSTM"
        hs, cs = state if lstm else (state, None)
        inp, new_h, new_c = x_t, [], []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._weights(k, "")
            s = (hs[k], cs[k]) if lstm else hs[k]
            new = self._cell(L.linear(inp, w_ih, b_ih), s, w_hh, b_hh)
            inp = new[0] if lstm else new
            new_h.append(inp)
            if lstm:
                new_c.append(new[1])
        h_n = I.stack(new_h, axis=0)
        return inp, ((h_n, I.stack(new_c, axis=0)) if lstm else h_n)

    def initial_state(self, batch_size, dtype="float32"):
        """Zero state arrays for `step` (NumPy), shaped like forward's h_n."""
        L_ = self.num_layers * (2 if self.bidirectional else 1)
        z = np.zeros((L_, batch_size, self.hidden_size), dtype)
        return (z, z.copy()) if self.mode == "LSTM" else z


class RNN(_RNNBase):
    """Elman RNN with tanh (default) or relu: nonlinearity='tanh'|'relu'."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, bidirectional=False, rng=None, dtype="float32"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional,
                         nonlinearity=nonlinearity, rng=rng, dtype=dtype)


class LSTM(_RNNBase):
    """Long short-term memory (gates i, f, g, o as in PyTorch)."""
    mode = "LSTM"


class GRU(_RNNBase):
    """Gated recurrent unit (gates r, z, n as in PyTorch)."""
    mode = "GRU"
