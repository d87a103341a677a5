"""The CUDA runner's host-side moves (hostcopy.py): chunked over threads, exact."""
import numpy as np
import pytest

from graphc.backends.cuda import hostcopy as H


@pytest.fixture(params=["one thread", "chunked"])
def mode(request, monkeypatch):
    if request.param == "chunked":      # small chunks: many tasks over the pool
        monkeypatch.setattr(H, "PARALLEL_MIN", 1)
        monkeypatch.setattr(H, "CHUNK", 1000)
    return request.param


def test_copy_many_copies_every_byte(mode):
    r = np.random.default_rng(0)
    srcs = [r.standard_normal(n).astype(np.float32) for n in (0, 1, 999, 4321)]
    dsts = [np.zeros_like(s) for s in srcs]
    H.copy_many(list(zip(dsts, srcs)))
    for d, s in zip(dsts, srcs):
        np.testing.assert_array_equal(d, s)


def test_differ_many_finds_a_single_changed_byte_anywhere(mode):
    r = np.random.default_rng(1)
    a = r.standard_normal(5000).astype(np.float32)
    for pos in (0, 2500, 4999):          # first, middle, last chunk
        b = a.copy()
        b.view(np.uint8)[pos * 4 + 3] ^= 1
        same = a.copy()
        assert H.differ_many([(a, b), (a, same), (a[:0], a[:0]), (a[:10], a[:11])]) == \
            [True, False, False, True]


def test_a_forked_child_gets_its_own_pool(monkeypatch):
    import os
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    monkeypatch.setattr(H, "PARALLEL_MIN", 1)
    monkeypatch.setattr(H, "CHUNK", 1000)
    a = np.arange(5000, dtype=np.float32)
    b = np.zeros_like(a)
    H.copy_many([(b, a)])                  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                           # the child: must not wait on dead threads
        c = np.zeros_like(a)
        H.copy_many([(c, a)])
        os._exit(0 if np.array_equal(c, a) else 1)
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the parent's thread pool")


def test_address_jobs(mode):
    a = np.arange(3000, dtype=np.int32)
    b = np.zeros_like(a)
    H.copy_jobs([(b.ctypes.data, a.ctypes.data, a.nbytes)])
    np.testing.assert_array_equal(a, b)
    b[2999] += 1
    assert H.differ_jobs([(a.ctypes.data, b.ctypes.data, a.nbytes),
                          (a.ctypes.data, b.ctypes.data, 100),
                          (a.ctypes.data, b.ctypes.data, 0)]) == [True, False, False]
