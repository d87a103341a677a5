"""End-to-end training with the NumPy backend on the bundled digits: real
models reaching real accuracy on the held-out split, plus the fit helper's
behaviour (progress bar, history, early stop on NaN)."""
import contextlib

import numpy as np
import pytest

import graphc as gc
from graphc import data, models, nn, optim
from graphc.train import TrainingDiverged, accuracy, evaluate, fit, predict


@pytest.fixture(autouse=True)
def single_threaded_blas():
    # These graphs multiply small matrices; on a shared 2-core machine a
    # multi-threaded BLAS spends far longer synchronizing than computing.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        ctx = contextlib.nullcontext()
    else:
        ctx = threadpool_limits(limits=1, user_api="blas")
    with ctx:
        yield


def digits(size):
    return data.load_digits("train", size=size), data.load_digits("test", size=size)


def make_step(model, opt_cls, shape, **kw):
    x = gc.input("x", (None,) + shape)
    y = gc.input("y", (None,), dtype="int64")
    opt = opt_cls(model.parameters(), **kw)
    return opt, opt.compile_step(lambda a, b: gc.cross_entropy(model(a), b), x, y)


def test_mlp_reaches_95_percent_on_digits():
    (xtr, ytr), (xte, yte) = digits(8)
    nn.manual_seed(0)
    model = models.mlp()
    opt, step = make_step(model, optim.Adam, (1, 8, 8), lr=3e-3)
    hist = fit(model, step, (xtr, ytr), epochs=8, batch_size=32, eval_data=(xte, yte),
               seed=0, progress=False)
    assert hist["accuracy"][-1] >= 0.95, hist["accuracy"]
    assert hist["loss"][-1] < 0.3 * hist["loss"][0]
    assert len(hist["loss"]) == len(hist["time"]) == len(hist["samples_per_s"]) == 8
    assert evaluate(model, (xte, yte)) == hist["accuracy"][-1]


def test_lenet5_reaches_97_percent_on_digits_28x28():
    (xtr, ytr), (xte, yte) = digits(28)
    nn.manual_seed(0)
    model = models.lenet5()
    opt, step = make_step(model, optim.Adam, (1, 28, 28), lr=5e-3)
    sched = optim.CosineAnnealingLR(opt, T_max=8)
    hist = fit(model, step, (xtr, ytr), epochs=8, batch_size=32, eval_data=(xte, yte),
               seed=0, progress=False, scheduler=sched)
    assert hist["accuracy"][-1] >= 0.97, hist["accuracy"]
    assert hist["lr"][0] == 5e-3 and hist["lr"][-1] < 5e-4   # the schedule ran
    assert opt.step_count == 8 * int(np.ceil(len(xtr) / 32))
    # the compiled step specialized once for full batches and once for the last one
    assert len(step.function._cache) == 2


def test_nan_loss_stops_with_a_clear_error():
    (xtr, ytr), _ = digits(8)
    nn.manual_seed(0)
    model = models.mlp()
    opt, step = make_step(model, optim.SGD, (1, 8, 8), lr=1e6)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ .*learning rate") as ei:
        fit(model, step, (xtr, ytr), epochs=3, batch_size=64, progress=False)
    assert isinstance(ei.value, FloatingPointError)
    assert "nan" in str(ei.value) or "inf" in str(ei.value)


def test_progress_bar_shows_loss_and_throughput(capsys):
    (xtr, ytr), (xte, yte) = digits(8)
    nn.manual_seed(1)
    model = models.mlp(hidden=(16,))
    _, step = make_step(model, optim.SGD, (1, 8, 8), lr=0.1, momentum=0.9)
    fit(model, step, (xtr[:200], ytr[:200]), epochs=1, batch_size=50, eval_data=(xte, yte),
        progress=True)
    err = capsys.readouterr()
    text = err.err + err.out
    assert "epoch 1/1" in text and "loss=" in text and "samples_s=" in text
    assert "accuracy" in text


def test_on_epoch_can_stop_and_history_collects_eval_fn_metrics():
    (xtr, ytr), (xte, yte) = digits(8)
    nn.manual_seed(2)
    model = models.mlp(hidden=(32,))
    _, step = make_step(model, optim.Adam, (1, 8, 8), lr=1e-2)
    seen = []

    def on_epoch(epoch, record):
        seen.append((epoch, record["val_acc"]))
        return epoch == 2
    hist = fit(model, step, (xtr, ytr), epochs=5, batch_size=64, progress=False,
               eval_fn=lambda m: {"val_acc": evaluate(m, (xte, yte), batch_size=100)},
               on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2]
    assert hist["val_acc"] == [a for _, a in seen] and len(hist["loss"]) == 2


def test_dropout_and_batchnorm_state_advances_inside_fit():
    (xtr, ytr), (xte, yte) = digits(8)
    nn.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Dropout(0.2), nn.Linear(32, 10))
    opt, step = make_step(model, optim.SGD, (1, 8, 8), lr=0.05, momentum=0.9)
    key0 = int(model[4].key.value)
    fit(model, step, (xtr[:256], ytr[:256]), epochs=2, batch_size=64, progress=False)
    assert int(model[4].key.value) == key0 + 8          # 4 steps per epoch
    assert np.abs(model[2].running_mean.value).max() > 0  # running stats moved
    assert model.training                                # evaluate restores the mode
    acc = evaluate(model, (xte, yte))
    assert model.training and 0.0 <= acc <= 1.0
    assert acc > 0.5


def test_predict_handles_partial_batches_and_accuracy_helper():
    _, (xte, yte) = digits(8)
    nn.manual_seed(4)
    model = models.mlp(hidden=(8,))
    full = predict(model, xte, batch_size=len(xte))
    parts = predict(model, xte, batch_size=97)          # 360 = 3·97 + 69
    np.testing.assert_allclose(parts, full, rtol=1e-6, atol=1e-6)
    manual = np.mean(np.argmax(full, axis=1) == yte)
    assert accuracy(full, yte) == manual
    assert accuracy(np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([1, 1])) == 0.5
    with pytest.raises(ValueError, match="do not match"):
        accuracy(full, yte[:-1])


def test_fit_accepts_a_dataloader_with_the_same_batches():
    (xtr, ytr), _ = digits(8)
    results = []
    for use_loader in (False, True):
        nn.manual_seed(5)
        model = models.mlp(hidden=(16,))
        _, step = make_step(model, optim.SGD, (1, 8, 8), lr=0.1)
        train = data.DataLoader((xtr[:300], ytr[:300]), 64, seed=9) if use_loader \
            else (xtr[:300], ytr[:300])
        hist = fit(model, step, train, epochs=2, batch_size=64, seed=9, progress=False)
        results.append((hist["loss"], model.state_dict()))
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        np.testing.assert_array_equal(v, results[1][1][k])
