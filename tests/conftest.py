"""Suite-wide settings.

BLAS threads: the tests multiply small matrices; on a loaded 2-core machine a
multi-threaded OpenBLAS spends far longer synchronizing than computing (a
32×400 @ 400×120 product went from 0.08 ms to 33 ms), so the suite runs BLAS
on one thread.  Results do not depend on it.
"""
try:
    from threadpoolctl import threadpool_limits
    _limits = threadpool_limits(limits=1, user_api="blas")
except ImportError:  # threadpoolctl is in the test extra; without it, nothing changes
    _limits = None
