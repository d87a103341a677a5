"""Suite-wide settings.

BLAS threads: the tests multiply small matrices; on a loaded 2-core machine a
multi-threaded OpenBLAS spends far longer synchronizing than computing (a
32×400 @ 400×120 product went from 0.08 ms to 33 ms), so the suite runs BLAS
on one thread.  Results do not depend on it.
"""
try:
    from threadpoolctl import threadpool_limits
    _limits = threadpool_limits(limits=1, user_api="blas")
except ImportError:  # threadpoolctl is a dependency of graphc; without it, nothing changes
    _limits = None

import os

import pytest


@pytest.fixture
def in_fork():
    """run(fn) -> bool: calls fn() in a forked child; True when it returned normally
    (an exception or a false result in the child gives False; the child never returns
    into pytest)."""
    def run(fn):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = b"0"
            try:
                if fn() is not False:
                    ok = b"1"
            finally:
                os.write(wfd, ok)
                os._exit(0)
        os.close(wfd)
        got = os.read(rfd, 1)
        os.close(rfd)
        os.waitpid(pid, 0)
        return got == b"1"
    return run
