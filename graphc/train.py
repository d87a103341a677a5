"""Training-loop helpers: `fit`, `evaluate`, `predict`, `accuracy`.

The loop these helpers implement, spelled out (use it directly when you need
something `fit` does not do):

    import graphc as gc
    from graphc import data, models, optim

    model = models.mlp()
    x = gc.input("x", (None, 1, 8, 8)); y = gc.input("y", (None,), dtype="int64")
    opt = optim.Adam(model.parameters(), lr=1e-3)
    step = opt.compile_step(lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    for epoch in range(epochs):
        for xb, yb in data.batches((X, Y), 32, seed=0, epoch=epoch):
            loss = step(xb, yb)            # forward + backward + update, one call
        acc = evaluate(model, (X_test, Y_test))

A compiled step is specialized per batch size (and cached), so a smaller last
batch just works.  `fit` adds a tqdm progress bar (loss, samples/s), per-epoch
evaluation, a history, and stops with `TrainingDiverged` (a
FloatingPointError) naming the epoch and step when the loss is NaN or inf.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .data import batches

__all__ = ["fit", "evaluate", "predict", "accuracy", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax over the last axis equals the label."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"accuracy: logits {logits.shape} do not match labels {labels.shape} "
                         "(expected logits (..., C) and labels (...))")
    if labels.size == 0:
        raise ValueError("accuracy: no samples")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _structure_key(model):
    return tuple((id(m), m.__dict__.get("_version", 0)) for m in model.modules())


def _forward_fn(model, sample_shape, dtype, backend):
    """A compiled eval-mode forward for inputs (N, *sample_shape), cached on the model.

    The cache is dropped when a module or parameter is added, replaced or
    removed anywhere in the model; parameter values are read at each call.
    """
    from . import compile as gc_compile
    from . import input as gc_input
    cache = model.__dict__.setdefault("_forward_cache", {})
    key = (tuple(sample_shape), str(dtype), backend)
    sig = _structure_key(model)
    hit = cache.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    was_training = model.training
    model.eval()
    try:
        x = gc_input("x", (None,) + tuple(sample_shape), dtype=dtype)
        fn = gc_compile([x], model(x), backend=backend, name="predict")
    finally:
        model.train(was_training)
    cache[key] = (sig, fn)
    return fn


def predict(model, X, batch_size: int = 256, backend: str = "numpy") -> np.ndarray:
    """Eval-mode outputs of `model` on every row of X, batch by batch."""
    X = np.asarray(X)
    if X.ndim < 1 or len(X) == 0:
        raise ValueError(f"predict: need a non-empty batch of samples, got shape {X.shape}")
    fn = _forward_fn(model, X.shape[1:], X.dtype, backend)
    outs = [np.asarray(fn(X[i:i + batch_size])) for i in range(0, len(X), batch_size)]
    return np.concatenate(outs, axis=0)


def evaluate(model, data, batch_size: int = 256, backend: str = "numpy") -> float:
    """Accuracy of `model` (eval mode) on data = (images, labels)."""
    X, Y = data
    return accuracy(predict(model, X, batch_size, backend), Y)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)


def fit(model, step, train_data, epochs: int = 1, batch_size: int = 32, eval_data=None,
        eval_fn=None, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
        progress: bool = True, on_epoch=None, scheduler=None, backend: str = "numpy",
        eval_batch_size: int = 256) -> dict:
    """Train with a compiled `step` (from `optimizer.compile_step`) for `epochs`.

    train_data: a tuple of arrays fed to step batch by batch, e.g. (images, labels);
      batches are shuffled reproducibly from (seed, epoch).  A graphc.data.DataLoader
      is used as it is (its own batch size, shuffling and seed; epoch set per epoch).
    eval_data: (images, labels) scored with `evaluate` after every epoch, or
      eval_fn(model) → a float or a dict of metrics.
    on_epoch(epoch, record): called after each epoch with that epoch's record;
      returning True stops training early.
    scheduler: an optim LR scheduler, stepped after each epoch.

    Returns the history: {"loss": [mean training loss per epoch], "time":
    [seconds], "samples_per_s": [...], "lr": [...], plus "accuracy" (from
    eval_data) or eval_fn's metrics}.  Raises TrainingDiverged when a loss is
    NaN or inf (the parameters then hold that step's non-finite update).
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"fit: need epochs >= 0 and batch_size >= 1, got {epochs}, "
                         f"{batch_size}")
    loader = train_data if hasattr(train_data, "set_epoch") else None  # a data.DataLoader
    if loader is None:
        arrays = tuple(np.asarray(a) for a in train_data)
        n = len(arrays[0])
        n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    else:
        n_batches = len(loader)

    def epoch_batches(epoch):
        if loader is not None:
            loader.set_epoch(epoch)
            return iter(loader)
        return batches(arrays, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                       epoch=epoch)
    history: dict = {"loss": [], "time": [], "samples_per_s": [], "lr": []}
    opt = getattr(step, "optimizer", None)
    global_step = 0
    for epoch in range(epochs):
        bar = _progress(n_batches, f"epoch {epoch + 1}/{epochs}", progress)
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        try:
            for i, batch in enumerate(epoch_batches(epoch)):
                loss = float(np.asarray(step(*batch)))
                global_step += 1
                if not math.isfinite(loss):
                    lr = f" (learning rate {opt.lr:g})" if opt is not None else ""
                    raise TrainingDiverged(
                        f"fit: the training loss became {loss} at epoch {epoch + 1}, step "
                        f"{i + 1} of {n_batches} (global step {global_step}); stopping. The "
                        f"parameters now hold non-finite values. Lower the learning rate{lr} "
                        "or check the inputs for NaN/inf.")
                k = len(batch[0])
                total += loss * k
                seen += k
                if bar is not None:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{total / seen:.4f}", samples_s=f"{rate:.0f}",
                                    refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": total / max(seen, 1), "time": elapsed,
                  "samples_per_s": seen / max(elapsed, 1e-9),
                  "lr": opt.lr if opt is not None else None}
        if eval_fn is not None:
            res = eval_fn(model)
            record.update(res if isinstance(res, dict) else {"eval": float(res)})
        elif eval_data is not None:
            record["accuracy"] = evaluate(model, eval_data, eval_batch_size, backend)
        for k, v in record.items():
            if k != "epoch":
                history.setdefault(k, []).append(v)
        if progress:
            msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in record.items() if k not in ("time", "lr"))
            from tqdm.auto import tqdm
            tqdm.write(msg)
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None and on_epoch(epoch + 1, record):
            break
    return history
