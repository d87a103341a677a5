"""The native worker pool (graphc/backends/llvm/pool.py): every thread runs each
call, calls from several Python threads take turns, a forked child gets its own
pool, the workers are bound to CPUs unless told not to, and a process using the
pool exits cleanly."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import graphc as gc
from graphc.backends import llvm as gllvm
from graphc.backends.llvm import pool

RNG = np.random.default_rng(11)


def _fn(monkeypatch, tmp_path, n=300, threads="2"):
    """A 2-thread function whose kernels are big enough to be shared (SPMD)."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    a, b = gc.input("a", (n, n)), gc.input("b", (n, n))
    f = gc.compile([a, b], [gc.tanh(a @ b), gc.sum(a * b, axis=1)], backend="llvm")
    return f


def _ref(a, b):
    return [np.tanh(a.astype(np.float64) @ b), (a.astype(np.float64) * b).sum(axis=1)]


def _check(got, a, b):
    for g, w in zip(got, _ref(a, b)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def _feeds(n=300):
    return [RNG.standard_normal((n, n)).astype(np.float32) / 8 for _ in range(2)]


def test_native_pool_runs_every_thread(monkeypatch, tmp_path):
    f = _fn(monkeypatch, tmp_path)
    a, b = _feeds()
    for _ in range(3):              # the first call specializes and compiles
        _check(f(a, b), a, b)
    r = gllvm.runners(f)[0]
    assert r.nthreads == 2 and pool.get(2).size >= 2
    # every worker thread is alive and parked in native code
    assert all(t.is_alive() for t in pool.get(2).threads)
    # back-to-back calls (workers still spinning) and calls after the workers slept
    import time
    for k in range(20):
        if k % 5 == 0:
            time.sleep(0.02)
        a, b = _feeds()
        _check(f(a, b), a, b)


def test_concurrent_calls_from_python_threads(monkeypatch, tmp_path):
    f1 = _fn(monkeypatch, tmp_path)
    f2 = _fn(monkeypatch, tmp_path, n=260)
    feeds1 = [_feeds() for _ in range(4)]
    feeds2 = [_feeds(260) for _ in range(4)]
    errors = []

    def work(f, feeds):
        try:
            for _ in range(5):
                for a, b in feeds:
                    _check(f(a, b), a, b)
        except Exception as e:        # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=work, args=(f1, feeds1)),
          threading.Thread(target=work, args=(f2, feeds2)),
          threading.Thread(target=work, args=(f1, feeds1[::-1]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a call hung"
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_pool(monkeypatch, tmp_path, in_fork):
    f = _fn(monkeypatch, tmp_path)
    a, b = _feeds()
    _check(f(a, b), a, b)
    # child: the parent's workers do not exist there
    assert in_fork(lambda: _check(f(a, b), a, b))
    _check(f(a, b), a, b)      # the parent's pool still works


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs and the affinity API")
@pytest.mark.parametrize("pin", ["1", "0"])
def test_workers_bound_to_cpus_unless_disabled(tmp_path, pin):
    code = (
        "import os, numpy as np, graphc as gc\n"
        "from graphc.backends.llvm import pool\n"
        "a = gc.input('a', (300, 300))\n"
        "f = gc.compile([a], gc.tanh(a @ a), backend='llvm')\n"
        "f(np.ones((300, 300), np.float32))\n"
        "cpus = sorted(os.sched_getaffinity(0))\n"
        "w = pool.get(2).threads[0]\n"
        "print(len(os.sched_getaffinity(w.native_id)) == 1)\n")
    env = dict(os.environ, GRAPHC_NUM_THREADS="2", GRAPHC_PIN_THREADS=pin,
               GRAPHC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("True" if pin == "1" else "False")


def test_process_with_pool_exits_cleanly(tmp_path):
    code = (
        "import numpy as np, graphc as gc\n"
        "a = gc.input('a', (300, 300))\n"
        "f = gc.compile([a], gc.sum(gc.tanh(a @ a)), backend='llvm')\n"
        "v = np.full((300, 300), 0.01, np.float32)\n"
        "print(float(f(v)))\n")
    env = dict(os.environ, GRAPHC_NUM_THREADS="2", GRAPHC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    want = 300 * 300 * np.tanh(300 * 0.01 * 0.01)
    assert abs(float(out.stdout) - want) < 1e-3 * want


@pytest.mark.parametrize("m,n,k", [(1, 1024, 256), (3, 1023, 64), (2, 257, 300), (1, 5, 16),
                                   (1, 66, 1000), (6, 25, 784), (8, 63, 100), (5, 700, 96)])
def test_matrix_vector_rows_shared_between_threads(monkeypatch, tmp_path, m, n, k):
    """x @ W.T with few rows (up to 8) runs as dot products along W's rows, four rows at a time,
    the rows shared out among threads: same bits for 1 and 2 threads, and equal to
    float64 NumPy within the float32 bound for a length-k sum."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    x, w, c = gc.input("x", (m, k)), gc.input("w", (n, k)), gc.input("c", (m, n))
    xv = RNG.standard_normal((m, k)).astype(np.float32)
    wv = RNG.standard_normal((n, k)).astype(np.float32)
    cv = RNG.standard_normal((m, n)).astype(np.float32)
    outs = [x @ gc.transpose(w), c + x @ gc.transpose(w)]
    got = []
    for nt in ("1", "2"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        f = gc.compile([x, w, c], outs, backend="llvm")
        got.append(f(xv, wv, cv))
        if n * k >= 1 << 16:     # big enough to be shared
            assert gllvm.runners(f)[0].nthreads == int(nt)
    ref = xv.astype(np.float64) @ wv.T.astype(np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(xv) @ np.abs(wv.T) + np.abs(cv))
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(got[0][0] - ref) <= bound)
    assert np.all(np.abs(got[0][1] - (cv + ref)) <= bound)


@pytest.mark.parametrize("m,n,k", [(200, 40, 300), (512, 49, 96), (130, 7, 64)])
def test_narrow_gemm_rows_shared_between_threads(monkeypatch, tmp_path, m, n, k):
    """A product with few columns and many rows (a late ResNet conv at batch 1) is
    split among threads by bands of rows: same bits for 1, 2 and 3 threads, and
    equal to float64 NumPy within the float32 bound for a length-k sum."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    a, b = gc.input("a", (m, k)), gc.input("b", (k, n))
    av = RNG.standard_normal((m, k)).astype(np.float32)
    bv = RNG.standard_normal((k, n)).astype(np.float32)
    got = []
    for nt in ("1", "2", "3"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", nt)
        f = gc.compile([a, b], a @ b, backend="llvm")
        got.append(f(av, bv))
        if m * n * k >= 1 << 18:
            assert gllvm.runners(f)[0].nthreads == int(nt)
    for other in got[1:]:
        np.testing.assert_array_equal(got[0], other)
    ref = av.astype(np.float64) @ bv.astype(np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(av) @ np.abs(bv))
    assert np.all(np.abs(got[0] - ref) <= bound)


def test_default_thread_count_shares_cpus_among_local_mpi_ranks(monkeypatch):
    from graphc.backends.llvm.runtime import num_threads
    for var in ("GRAPHC_NUM_THREADS", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert num_threads() == cpus
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")            # mpiexec -n 2 (MPICH/Hydra)
    assert num_threads() == max(1, cpus // 2)
    monkeypatch.delenv("MPI_LOCALNRANKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(4 * cpus))   # oversubscribed
    assert num_threads() == 1
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "3")           # explicit wins
    assert num_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="GRAPHC_NUM_THREADS"):
            num_threads()
