"""The NumPy backend's BLAS thread policy (graphc/backends/numpy/blas.py):
one BLAS thread while a graph runs, the user's setting back afterwards, for
every entry point (a compiled Function, train.fit), not only the CLI."""
import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import graphc as gc
from graphc.backends.numpy import blas, interpreter


@pytest.fixture
def two_blas_threads():
    """BLAS on two threads for the test's duration (the suite itself runs on one)."""
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if not blas.current_threads() or max(blas.current_threads()) < 2:
            pytest.skip("BLAS here cannot run two threads")
        yield


def _spy(monkeypatch):
    seen = []
    real = interpreter.eval_graph

    def spying(graph, feeds):
        seen.append(blas.current_threads())
        return real(graph, feeds)
    monkeypatch.setattr(interpreter, "eval_graph", spying)
    return seen


def test_function_call_runs_on_one_blas_thread_and_restores(two_blas_threads, monkeypatch):
    seen = _spy(monkeypatch)
    x = gc.input("x", (None, 5))
    w = gc.Parameter(np.arange(15, dtype=np.float32).reshape(5, 3), name="w")
    f = gc.compile([x], x @ w)
    a = np.ones((4, 5), np.float32)
    np.testing.assert_allclose(f(a), a.astype(np.float64) @ w.value.astype(np.float64))
    assert seen and all(max(s) == 1 for s in seen)
    assert max(blas.current_threads()) == 2          # the user's setting is back


def test_fit_runs_on_one_blas_thread(two_blas_threads, monkeypatch):
    from graphc import models, optim, train
    seen = _spy(monkeypatch)
    model = models.mlp(in_features=4, hidden=(3,), num_classes=2)
    x = gc.input("x", (None, 1, 2, 2)); y = gc.input("y", (None,), dtype="int64")
    step = optim.SGD(model.parameters(), lr=0.1).compile_step(
        lambda a, b: gc.cross_entropy(model(a), b), x, y)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 1, 2, 2)).astype(np.float32); Y = rng.integers(0, 2, 8)
    train.fit(model, step, (X, Y), epochs=1, batch_size=4, progress=False)
    assert len(seen) >= 2 and all(max(s) == 1 for s in seen)
    assert max(blas.current_threads()) == 2


def test_nested_and_concurrent_runs_restore_once(two_blas_threads):
    with blas.limited:
        with blas.limited:
            assert max(blas.current_threads()) == 1
        assert max(blas.current_threads()) == 1      # the outer run is still going
    assert max(blas.current_threads()) == 2


def test_env_override(two_blas_threads, monkeypatch):
    monkeypatch.setenv("GRAPHC_NUMPY_BLAS_THREADS", "0")     # leave BLAS alone
    with blas.limited:
        assert max(blas.current_threads()) == 2
    monkeypatch.setenv("GRAPHC_NUMPY_BLAS_THREADS", "many")
    with pytest.raises(ValueError, match="GRAPHC_NUMPY_BLAS_THREADS"):
        with blas.limited:
            pass
    assert max(blas.current_threads()) == 2
