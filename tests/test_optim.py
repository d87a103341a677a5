"""Optimizers against an independent NumPy re-implementation of PyTorch's
documented update rules, on a float64 linear-regression problem whose
gradient the reference computes analytically (not through gc.grad)."""
import math

import numpy as np
import pytest

import graphc as gc
from graphc import nn, optim

RNG = np.random.default_rng(7)
X = RNG.normal(size=(12, 3))
Y = X @ np.array([0.5, -1.0, 2.0]) + 0.3 + 0.1 * RNG.normal(size=12)
W0 = np.array([0.2, 0.1, -0.3])
B0 = np.array([0.05])


def analytic_grads(w, b):
    r = X @ w + b[0] - Y
    return [2.0 / len(Y) * X.T @ r, np.array([2.0 / len(Y) * r.sum()])]


def reference_sgd(steps, lrs, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD's documented algorithm, written out per step."""
    params = [W0.copy(), B0.copy()]
    bufs = [None, None]
    for t, lr in zip(range(1, steps + 1), lrs):
        grads = analytic_grads(*params)
        for i, (p, g) in enumerate(zip(params, grads)):
            if weight_decay != 0:
                g = g + weight_decay * p
            if momentum != 0:
                if t > 1:
                    bufs[i] = momentum * bufs[i] + (1 - dampening) * g
                else:
                    bufs[i] = g.copy()
                if nesterov:
                    g = g + momentum * bufs[i]
                else:
                    g = bufs[i]
            params[i] = p - lr * g
    return params


def reference_adam(steps, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                   decoupled=False):
    """torch.optim.Adam / AdamW's documented algorithm, written out per step."""
    b1, b2 = betas
    params = [W0.copy(), B0.copy()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    vmax = [np.zeros_like(p) for p in params]
    for t, lr in zip(range(1, steps + 1), lrs):
        grads = analytic_grads(*params)
        for i, (p, g) in enumerate(zip(params, grads)):
            if decoupled:
                p = p - lr * weight_decay * p
            elif weight_decay != 0:
                g = g + weight_decay * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1 ** t)
            if amsgrad:
                vmax[i] = np.maximum(vmax[i], v[i])
                vhat = vmax[i] / (1 - b2 ** t)
            else:
                vhat = v[i] / (1 - b2 ** t)
            params[i] = p - lr * mhat / (np.sqrt(vhat) + eps)
    return params


def build(make_opt):
    w = gc.Parameter(W0.copy(), name="w")
    b = gc.Parameter(B0.copy(), name="b")
    x = gc.input("x", (None, 3), dtype="float64")
    y = gc.input("y", (None,), dtype="float64")
    opt = make_opt([w, b])
    step = opt.compile_step(lambda xx, yy: gc.mean(gc.square(xx @ w + b - yy)), x, y)
    return w, b, opt, step


SGD_CASES = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, nesterov=True),
    dict(weight_decay=0.05),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(kw) or "plain")
def test_sgd_matches_pytorch_algorithm(kw):
    w, b, opt, step = build(lambda ps: optim.SGD(ps, lr=0.05, **kw))
    losses = [float(step(X, Y)) for _ in range(4)]
    ref_w, ref_b = reference_sgd(4, [0.05] * 4, **kw)
    np.testing.assert_allclose(w.value, ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.value, ref_b, rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]
    # the returned loss is the loss *before* that step's update
    assert losses[0] == pytest.approx(np.mean((X @ W0 + B0[0] - Y) ** 2), rel=1e-12)
    assert opt.step_count == 4


ADAM_CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(betas=(0.8, 0.99), eps=1e-6, amsgrad=True),
]


@pytest.mark.parametrize("kw", ADAM_CASES, ids=lambda kw: ",".join(kw) or "default")
def test_adam_matches_pytorch_algorithm(kw):
    w, b, opt, step = build(lambda ps: optim.Adam(ps, lr=0.02, **kw))
    for _ in range(5):
        step(X, Y)
    ref_w, ref_b = reference_adam(5, [0.02] * 5, **kw)
    np.testing.assert_allclose(w.value, ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.value, ref_b, rtol=1e-12, atol=1e-14)


def test_adamw_decoupled_weight_decay():
    w, b, opt, step = build(lambda ps: optim.AdamW(ps, lr=0.02, weight_decay=0.2))
    for _ in range(4):
        step(X, Y)
    ref_w, ref_b = reference_adam(4, [0.02] * 4, weight_decay=0.2, decoupled=True)
    np.testing.assert_allclose(w.value, ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.value, ref_b, rtol=1e-12, atol=1e-14)
    # and it differs from Adam's L2 form, so the test distinguishes the two
    l2_w, _ = reference_adam(4, [0.02] * 4, weight_decay=0.2)
    assert not np.allclose(w.value, l2_w, rtol=1e-9)
    assert optim.AdamW([gc.Parameter(np.zeros(2))]).weight_decay == 0.01


def test_lr_change_between_steps_without_recompiling():
    w, b, opt, step = build(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.5))
    lrs = [0.1, 0.1, 0.01, 0.3]
    for lr in lrs:
        opt.lr = lr
        step(X, Y)
    ref_w, ref_b = reference_sgd(4, lrs, momentum=0.5)
    np.testing.assert_allclose(w.value, ref_w, rtol=1e-12)
    np.testing.assert_allclose(b.value, ref_b, rtol=1e-12)
    assert len(step.function._cache) == 1  # one executable: lr is read, not baked in
    assert opt.lr == 0.3 and float(opt.lr_param.value) == 0.3


def test_lr_schedule_with_adam_float32_params():
    w = gc.Parameter(W0.astype(np.float32), name="w")
    x = gc.input("x", (None, 3))
    y = gc.input("y", (None,))
    opt = optim.Adam([w], lr=0.1)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    step = opt.compile_step(lambda xx, yy: gc.mean(gc.square(xx @ w - yy)), x, y)
    seen = []
    for _ in range(4):
        seen.append(opt.lr)
        step(X.astype(np.float32), Y.astype(np.float32))
        sched.step()
    assert seen == [0.1, 0.1, 0.05, 0.05]
    assert w.value.dtype == np.float32
    # reference in float64 with only w (bias fixed at 0): float32 run agrees to ~1e-5
    params = W0.copy()
    m = np.zeros(3)
    v = np.zeros(3)
    for t, lr in enumerate(seen, start=1):
        g = 2.0 / len(Y) * X.T @ (X @ params - Y)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        params = params - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(w.value, params, rtol=1e-5, atol=1e-6)


def test_schedulers_follow_their_formulas():
    opt = optim.SGD([gc.Parameter(np.zeros(2))], lr=1.0)
    cos = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.1)
    got = [cos.step() for _ in range(4)]
    want = [0.1 + 0.9 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert opt.lr == pytest.approx(0.1)
    opt.lr = 2.0
    ms = optim.MultiStepLR(opt, milestones=[2, 3], gamma=0.1)
    np.testing.assert_allclose([ms.step() for _ in range(3)], [2.0, 0.2, 0.02])


def test_optimizer_state_save_load_resumes_exactly(tmp_path):
    # uninterrupted: 4 steps
    w, b, opt, step = build(lambda ps: optim.Adam(ps, lr=0.05))
    for _ in range(4):
        step(X, Y)
    want = (w.value.copy(), b.value.copy())
    # interrupted: 2 steps, save, fresh params + optimizer, load, 2 more steps
    w1, b1, opt1, step1 = build(lambda ps: optim.Adam(ps, lr=0.05))
    step1(X, Y)
    step1(X, Y)
    opt1.save(tmp_path / "opt.npz")
    params_state = {"w": w1.value.copy(), "b": b1.value.copy()}
    w2, b2, opt2, step2 = build(lambda ps: optim.Adam(ps, lr=0.05))
    w2.set_value(params_state["w"])
    b2.set_value(params_state["b"])
    opt2.load(tmp_path / "opt.npz")
    assert opt2.step_count == 2
    step2(X, Y)
    step2(X, Y)
    np.testing.assert_array_equal(w2.value, want[0])
    np.testing.assert_array_equal(b2.value, want[1])
    sd = opt2.state_dict()
    assert set(sd) == {"lr", "step", "state.0.exp_avg", "state.0.exp_avg_sq",
                       "state.1.exp_avg", "state.1.exp_avg_sq"}


def test_optimizer_state_saves_with_the_model(tmp_path):
    def make():
        nn.manual_seed(3)
        model = nn.Linear(3, 1, dtype="float64")
        x = gc.input("x", (None, 3), dtype="float64")
        y = gc.input("y", (None, 1), dtype="float64")
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = opt.compile_step(lambda a, t: gc.mean(gc.square(model(a) - t)), x, y)
        return model, opt, step
    Y2 = Y[:, None]
    model, opt, step = make()
    for _ in range(4):
        step(X, Y2)
    want = model.weight.value.copy()
    model, opt, step = make()
    step(X, Y2)
    step(X, Y2)
    model.save(tmp_path / "ckpt.npz", optimizer=opt)
    model2, opt2, step2 = make()
    model2.load(tmp_path / "ckpt.npz", optimizer=opt2)
    np.testing.assert_array_equal(opt2.state_dict()["state.0.momentum_buffer"],
                                  opt.state_dict()["state.0.momentum_buffer"])
    step2(X, Y2)
    step2(X, Y2)
    np.testing.assert_array_equal(model2.weight.value, want)
    # a model-only load ignores the optimizer entries
    model3, _, _ = make()
    model3.load(tmp_path / "ckpt.npz")
    np.testing.assert_array_equal(model3.weight.value, model.weight.value)


def test_optimizer_load_rejects_mismatched_state():
    _, _, opt, _ = build(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9))
    sd = opt.state_dict()
    bad = dict(sd)
    del bad["state.1.momentum_buffer"]
    with pytest.raises(nn.StateDictError, match="state.1.momentum_buffer"):
        opt.load_state_dict(bad)
    bad = dict(sd, **{"state.0.momentum_buffer": np.zeros(4)})
    with pytest.raises(nn.StateDictError, match=r"state.0.momentum_buffer.*shape"):
        opt.load_state_dict(bad)


def test_updates_are_graph_nodes_with_update_role():
    w = gc.Parameter(np.ones(3), name="w")
    unused = gc.Parameter(np.ones(2), name="unused")
    opt = optim.SGD([w, unused], lr=0.1, momentum=0.9)
    loss = gc.sum(gc.square(w))
    ups = opt.updates(loss)
    assert w in ups and unused not in ups       # no gradient, no update (as in PyTorch)
    assert ups[w].role == "update"
    f = gc.compile([], loss, updates=ups)
    f()
    np.testing.assert_allclose(w.value, np.ones(3) - 0.1 * 2.0)
    np.testing.assert_array_equal(unused.value, np.ones(2))


def test_optimizer_argument_errors():
    p = gc.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD([p], lr=0.1).lr = float("nan")
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="scalar"):
        optim.SGD([p], lr=0.1).updates(p * 2.0)


def test_compile_step_returns_extra_outputs_from_the_same_build():
    nn.manual_seed(0)
    model = nn.Linear(3, 1, dtype="float64")
    x = gc.input("x", (None, 3), dtype="float64")
    y = gc.input("y", (None, 1), dtype="float64")
    opt = optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(a, t):
        pred = model(a)
        return gc.mean(gc.square(pred - t)), pred
    step = opt.compile_step(loss_fn, x, y, outputs=[gc.sum(x)])
    w0, b0 = model.weight.value.copy(), model.bias.value.copy()
    loss, pred, sx = step(X, Y[:, None])
    want = X @ w0.T + b0                            # outputs see the pre-update weights
    np.testing.assert_allclose(pred, want, rtol=1e-12)
    assert loss == pytest.approx(np.mean((want - Y[:, None]) ** 2), rel=1e-12)
    assert sx == pytest.approx(X.sum(), rel=1e-12)
    assert not np.array_equal(model.weight.value, w0)


@pytest.mark.parametrize("name, kw", [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.02, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.02, betas=(0.8, 0.95))),
])
def test_optimizers_match_torch_when_installed(name, kw):
    torch = pytest.importorskip("torch")
    w, b, opt, step = build(lambda ps: getattr(optim, name)(ps, **kw))
    tw = torch.tensor(W0.copy(), requires_grad=True)
    tb = torch.tensor(B0.copy(), requires_grad=True)
    topt = getattr(torch.optim, name)([tw, tb], **kw)
    tx, ty = torch.tensor(X), torch.tensor(Y)
    for _ in range(5):
        step(X, Y)
        topt.zero_grad()
        torch.mean((tx @ tw + tb - ty) ** 2).backward()
        topt.step()
    np.testing.assert_allclose(w.value, tw.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.value, tb.detach().numpy(), rtol=1e-10, atol=1e-12)
