"""The LLVM compile server (graphc/backends/llvm/server.py, objgen.py): modules are
optimized and compiled in a child process; results equal in-process compiles; LLVM
errors and a crashed server give clear errors; a forked child compiles on its own."""
import os
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.backends.llvm import server
from graphc.ir.errors import GraphcError

RNG = np.random.default_rng(5)


def _model():
    x = gc.input("x", (7, 33))
    w = gc.input("w", (33, 19))
    y = gc.sum(gc.tanh(x @ w) * gc.sigmoid(x @ w), axis=1)
    feeds = [RNG.standard_normal((7, 33)).astype(np.float32),
             RNG.standard_normal((33, 19)).astype(np.float32)]
    return [x, w], y, feeds


def test_server_and_in_process_compiles_agree(monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    inputs, y, feeds = _model()
    got = gc.compile(inputs, y, backend="llvm")(*feeds)
    assert server._server["proc"] is not None and server._server["proc"].poll() is None
    monkeypatch.setenv("GRAPHC_COMPILE_SERVER", "0")
    here = gc.compile(inputs, y, backend="llvm")(*feeds)
    np.testing.assert_array_equal(got, here)     # the same object code either way
    x, w = (v.astype(np.float64) for v in feeds)
    np.testing.assert_allclose(got, (np.tanh(x @ w) / (1 + np.exp(-(x @ w)))).sum(1),
                               rtol=1e-5, atol=1e-5)


def test_parent_process_never_runs_the_optimizer(tmp_path):
    code = (
        "import numpy as np, graphc as gc\n"
        "from graphc.backends.llvm import objgen\n"
        "x = gc.input('x', (64, 64))\n"
        "f = gc.compile([x], gc.relu(x @ x) + 1.0, backend='llvm')\n"
        "v = np.eye(64, dtype=np.float32)\n"
        "assert np.array_equal(f(v), v + 1.0)\n"
        "print('pb' in objgen._state)\n")
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_llvm_error_in_the_server_is_raised_here():
    with pytest.raises(RuntimeError, match="expected"):
        server.compile("this is not LLVM IR")
    # the server survived the error
    inputs, y, feeds = _model()
    gc.compile(inputs, y, backend="llvm")(*feeds)


def test_crashed_server_gives_a_clear_error_then_restarts(monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    server.prestart()
    proc = server._server["proc"]
    proc.kill()
    proc.wait()
    inputs, y, feeds = _model()
    with pytest.raises(GraphcError, match="compile server ended"):
        gc.compile(inputs, y, backend="llvm")(*feeds)
    f = gc.compile(inputs, y, backend="llvm")      # a new server
    x, w = (v.astype(np.float64) for v in feeds)
    np.testing.assert_allclose(f(*feeds), (np.tanh(x @ w) / (1 + np.exp(-(x @ w)))).sum(1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_compiles_with_its_own_server(monkeypatch, in_fork):
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    inputs, y, feeds = _model()
    want = gc.compile(inputs, y, backend="llvm")(*feeds)
    parent_server = server._server["proc"]

    def child():
        got = gc.compile(inputs, y * 2.0, backend="llvm")(*feeds)
        return bool(np.allclose(got, 2 * want, rtol=1e-6)) and \
            server._server["proc"] not in (None, parent_server)
    assert in_fork(child)
    assert server._server["proc"] is parent_server and parent_server.poll() is None
    np.testing.assert_array_equal(gc.compile(inputs, y, backend="llvm")(*feeds), want)


def test_server_that_cannot_start_falls_back_to_compiling_here(monkeypatch):
    """sys.executable that is not a working Python (an embedding program, say): the
    server never says it is ready, graphc compiles in process from then on."""
    monkeypatch.setenv("GRAPHC_CACHE", "0")
    saved = dict(server._server)
    old = server._server["proc"]
    if old is not None:
        server._stop(old)
    monkeypatch.setattr(server.sys, "executable", "/bin/true")
    try:
        inputs, y, feeds = _model()
        got = gc.compile(inputs, y, backend="llvm")(*feeds)
        assert server._server["failed"] and server._server["proc"] is None
        x, w = (v.astype(np.float64) for v in feeds)
        np.testing.assert_allclose(got, (np.tanh(x @ w) / (1 + np.exp(-(x @ w)))).sum(1),
                                   rtol=1e-5, atol=1e-5)
    finally:
        server._server.clear()
        server._server.update(saved, proc=None, failed=False, ready=False)
