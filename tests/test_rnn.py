"""RNN / LSTM / GRU layers against an independent NumPy implementation of the
standard equations (PyTorch's gate order), BPTT against finite differences,
variable-length batches and streaming."""
import numpy as np
import pytest

import graphc as gc
from graphc.nn.rnn import GRU, LSTM, RNN

T, N, I, H = 5, 3, 4, 6


def _sig(x):
    return 1 / (1 + np.exp(-x))


def reference(mode, m, xv, lengths=None, bidir=False, layers=1, nonlin="tanh"):
    """Straightforward loops over layers, directions and time steps, float64."""
    inp, hs, cs = xv.astype(np.float64), [], []
    for k in range(layers):
        dir_outs = []
        for d in (["", "_reverse"] if bidir else [""]):
            w = lambda n: getattr(m, f"{n}_l{k}{d}").value.astype(np.float64)
            Wih, Whh, bih, bhh = w("weight_ih"), w("weight_hh"), w("bias_ih"), w("bias_hh")
            h, c, ys = np.zeros((N, H)), np.zeros((N, H)), np.zeros((T, N, H))
            for t in (range(T - 1, -1, -1) if d else range(T)):
                a, b = inp[t] @ Wih.T + bih, h @ Whh.T + bhh
                cn = c
                if mode == "RNN":
                    hn = np.tanh(a + b) if nonlin == "tanh" else np.maximum(a + b, 0)
                elif mode == "LSTM":
                    i, f, g, o = np.split(a + b, 4, axis=1)
                    cn = _sig(f) * c + _sig(i) * np.tanh(g)
                    hn = _sig(o) * np.tanh(cn)
                else:
                    ar, az, an = np.split(a, 3, axis=1)
                    br, bz, bn = np.split(b, 3, axis=1)
                    r, z = _sig(ar + br), _sig(az + bz)
                    hn = (1 - z) * np.tanh(an + r * bn) + z * h
                if lengths is None:
                    h, c, ys[t] = hn, cn, hn
                else:
                    v = (t < lengths)[:, None]
                    h, c, ys[t] = np.where(v, hn, h), np.where(v, cn, c), np.where(v, hn, 0)
            dir_outs.append(ys)
            hs.append(h)
            cs.append(c)
        inp = np.concatenate(dir_outs, axis=-1)
    return inp, np.stack(hs), np.stack(cs)


CASES = [(RNN, "RNN"), (LSTM, "LSTM"), (GRU, "GRU")]


@pytest.mark.parametrize("cls,mode", CASES)
@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("bidir,layers", [(False, 1), (True, 2)])
def test_forward_matches_reference(cls, mode, variable, bidir, layers):
    rng = np.random.default_rng(0)
    m = cls(I, H, num_layers=layers, bidirectional=bidir, rng=0)
    x = gc.input("x", ("T", None, I))
    ln = gc.input("lengths", (None,), "int64")
    lengths = np.array([5, 2, 3]) if variable else None
    out, st = m(x, lengths=ln if variable else None)
    h_n = st[0] if mode == "LSTM" else st
    outs = [out, h_n] + ([st[1]] if mode == "LSTM" else [])
    f = gc.compile([x, ln] if variable else [x], outs)
    xv = rng.standard_normal((T, N, I)).astype(np.float32)
    got = f(xv, lengths) if variable else f(xv)
    ro, rh, rc = reference(mode, m, xv, lengths, bidir, layers)
    np.testing.assert_allclose(got[0], ro, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], rh, rtol=1e-5, atol=1e-6)
    if mode == "LSTM":
        np.testing.assert_allclose(got[2], rc, rtol=1e-5, atol=1e-6)
    if variable:  # padding is zero in the output
        assert np.all(got[0][2:, 1] == 0) and np.all(got[0][3:, 2] == 0)


def test_relu_rnn_and_batch_first():
    rng = np.random.default_rng(1)
    m = RNN(I, H, nonlinearity="relu", batch_first=True, rng=1)
    x = gc.input("x", (N, T, I))
    out, h = m(x)
    xv = rng.standard_normal((N, T, I)).astype(np.float32)
    got_o, got_h = gc.compile([x], [out, h])(xv)
    ro, rh, _ = reference("RNN", m, xv.transpose(1, 0, 2), nonlin="relu")
    np.testing.assert_allclose(got_o, ro.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_h, rh, rtol=1e-5, atol=1e-6)


def _param_grad_check(m, loss_of, feeds, inputs):
    """Analytic parameter gradients of a float64 model vs central differences."""
    loss = loss_of()
    params = m.parameters()
    f = gc.compile(inputs, [loss] + list(gc.grad(loss, params)))
    res = f(*feeds)
    rng = np.random.default_rng(0)
    for p, g in zip(params, res[1:]):
        for j in rng.choice(p.value.size, min(6, p.value.size), replace=False):
            idx = np.unravel_index(j, p.value.shape)
            o = p.value[idx]
            p.value[idx] = o + 1e-6
            lp = f(*feeds)[0]
            p.value[idx] = o - 1e-6
            lm = f(*feeds)[0]
            p.value[idx] = o
            num = (lp - lm) / 2e-6
            assert abs(num - g[idx]) <= 1e-6 + 1e-5 * abs(num), (p.name, idx, num, g[idx])


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
def test_bptt_parameter_gradients(cls):
    rng = np.random.default_rng(2)
    m = cls(3, 4, num_layers=2, bidirectional=True, rng=2, dtype="float64")
    x = gc.input("x", (4, 2, 3), "float64")
    xv = rng.standard_normal((4, 2, 3))
    r = rng.standard_normal((4, 2, 8))

    def loss_of():
        out, _ = m(x)
        return gc.sum(out * r)
    _param_grad_check(m, loss_of, [xv], [x])


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_variable_length_gradients_ignore_padding(cls):
    rng = np.random.default_rng(3)
    m = cls(3, 4, rng=3, dtype="float64")
    x = gc.input("x", (5, 2, 3), "float64")
    ln = gc.input("lengths", (2,), "int64")
    out, st = m(x, lengths=ln)
    h_n = st[0] if cls is LSTM else st
    loss = gc.sum(out * out) + gc.sum(h_n)
    gx = gc.grad(loss, x)
    f = gc.compile([x, ln], [loss, gx])
    xv, lengths = rng.standard_normal((5, 2, 3)), np.array([5, 2])
    l1, g = f(xv, lengths)
    assert np.all(g[2:, 1] == 0) and np.any(g[:2, 1] != 0)
    xv2 = xv.copy()
    xv2[2:, 1] = 100.0  # garbage in the padding changes nothing
    l2, _ = f(xv2, lengths)
    assert l1 == l2
    _param_grad_check(m, lambda: loss, [xv, lengths], [x, ln])


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_variable_length_batch_equals_each_sequence_alone(cls):
    rng = np.random.default_rng(6)
    m = cls(I, H, num_layers=2, bidirectional=True, rng=6)
    x = gc.input("x", (T, N, I))
    ln = gc.input("lengths", (N,), "int64")
    out, st = m(x, lengths=ln)
    h_n = st[0] if cls is LSTM else st
    batch = gc.compile([x, ln], [out, h_n])
    xs = gc.input("xs", ("T", 1, I))
    out1, st1 = m(xs)
    alone = gc.compile([xs], [out1, st1[0] if cls is LSTM else st1])
    xv = rng.standard_normal((T, N, I)).astype(np.float32)
    lengths = np.array([5, 2, 3])
    got_out, got_h = batch(xv, lengths)
    for i, L_i in enumerate(lengths):
        o, h = alone(xv[:L_i, i:i + 1])
        np.testing.assert_allclose(got_out[:L_i, i], o[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_h[:, i], h[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
def test_streaming_step_equals_whole_sequence(cls):
    rng = np.random.default_rng(4)
    m = cls(I, H, num_layers=2, rng=4)
    x = gc.input("x", (T, None, I))
    out, _ = m(x)
    whole = gc.compile([x], out)
    xt = gc.input("x_t", (None, I))
    if cls is LSTM:
        h, c = gc.input("h", (2, None, H)), gc.input("c", (2, None, H))
        y, (h2, c2) = m.step(xt, (h, c))
        step = gc.compile([xt, h, c], [y, h2, c2])
    else:
        h = gc.input("h", (2, None, H))
        y, h2 = m.step(xt, h)
        step = gc.compile([xt, h], [y, h2])
    xv = rng.standard_normal((T, N, I)).astype(np.float32)
    state = m.initial_state(N)
    ys = []
    for t in range(T):  # elements revealed one at a time
        res = step(xv[t], *(state if cls is LSTM else (state,)))
        ys.append(res[0])
        state = tuple(res[1:]) if cls is LSTM else res[1]
    np.testing.assert_allclose(np.stack(ys), whole(xv), rtol=1e-5, atol=1e-6)


def test_rnn_errors():
    m = LSTM(I, H)
    with pytest.raises(ValueError, match="input_size=4"):
        m(gc.input("x", (T, N, 7)))
    with pytest.raises(ValueError, match="3-D input"):
        m(gc.input("x", (T, I)))


def test_matches_pytorch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for cls, tcls in [(RNN, torch.nn.RNN), (LSTM, torch.nn.LSTM), (GRU, torch.nn.GRU)]:
        m = cls(I, H, num_layers=2, bidirectional=True, rng=5)
        tm = tcls(I, H, num_layers=2, bidirectional=True)
        with torch.no_grad():
            for name, p in tm.named_parameters():
                p.copy_(torch.from_numpy(getattr(m, name).value))
        xv = rng.standard_normal((T, N, I)).astype(np.float32)
        x = gc.input("x", (T, N, I))
        out, _ = m(x)
        got = gc.compile([x], out)(xv)
        want = tm(torch.from_numpy(xv))[0].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
