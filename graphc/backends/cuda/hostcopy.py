"""Host-memory copies and comparisons of a CUDA call, split over threads.

A call of the CUDA backend moves every input into a page-locked staging buffer,
every output out of one into a new array, and compares every parameter's bytes
with what the device holds (docs/cuda.md, "Calls").  For large tensors (a
4096^2 matmul's 64 MiB operands, ResNet-50's 100 MB of weights) one thread's
memcpy/memcmp (~10-17 GB/s) costs more than the GPU's work, so those moves are
cut into chunks run by a small thread pool: `ctypes.memmove` and libc
`memcmp` drop the GIL while they run.  Small moves stay on the calling thread.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

CHUNK = 4 << 20         # bytes per task
PARALLEL_MIN = 8 << 20  # below this many bytes in one batch, the calling thread does it


def _libc_memcmp():
    try:
        f = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):   # no C library to ask (not on Linux/macOS)
        return None
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return f


_MEMCMP = _libc_memcmp()
_pool = None
_pool_lock = threading.Lock()


def _workers():
    global _pool
    n = min(8, os.cpu_count() or 1)
    if n < 2:
        return None
    with _pool_lock:
        # a forked child has the pool object but not its threads: make its own
        if _pool is None or _pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor
            _pool = (os.getpid(),
                     ThreadPoolExecutor(max_workers=n, thread_name_prefix="graphc-hostcopy"))
    return _pool[1]


def _chunks(jobs):
    """(tag, a, b, n) -> pieces of at most CHUNK bytes, each (tag, a + off, b + off, m)."""
    for tag, a, b, n in jobs:
        for off in range(0, n, CHUNK):
            yield tag, a + off, b + off, min(CHUNK, n - off)


def _run(fn, jobs):
    """fn(a, b, n) over every job; returns {tag: any result nonzero}."""
    jobs = [j for j in jobs if j[3] > 0]
    total = sum(j[3] for j in jobs)
    pool = _workers() if total >= PARALLEL_MIN else None
    out = {}
    if pool is None:
        for tag, a, b, n in jobs:
            out[tag] = out.get(tag, False) or bool(fn(a, b, n))
        return out
    # tasks of about CHUNK bytes: a large array is cut, small ones are packed together
    # (a task costs tens of microseconds; ResNet-50 has ~300 parameter arrays)
    tasks, cur, size = [], [], 0
    for piece in _chunks(jobs):
        cur.append(piece)
        size += piece[3]
        if size >= CHUNK:
            tasks.append(cur)
            cur, size = [], 0
    if cur:
        tasks.append(cur)

    def work(task):
        return [tag for tag, a, b, n in task if fn(a, b, n)]
    for tags in pool.map(work, tasks):
        for tag in tags:
            out[tag] = True
    return out


def _move(dst, src, n):
    ctypes.memmove(dst, src, n)
    return 0


def copy_jobs(jobs):
    """memmove(dst, src, n) for each (dst address, src address, n)."""
    _run(_move, [(k, d, s, n) for k, (d, s, n) in enumerate(jobs)])


def differ_jobs(jobs) -> list:
    """For each (address a, address b, n): do the n bytes differ?"""
    if _MEMCMP is None:
        def view(addr, n):
            return np.frombuffer((ctypes.c_uint8 * n).from_address(addr), np.uint8)
        return [n > 0 and not np.array_equal(view(a, n), view(b, n)) for a, b, n in jobs]
    res = _run(_MEMCMP, [(k, a, b, n) for k, (a, b, n) in enumerate(jobs)])
    return [res.get(k, False) for k in range(len(jobs))]


def copy_many(pairs):
    """np.copyto(dst, src) for each (dst, src) of C-contiguous arrays of equal nbytes."""
    jobs = []
    for k, (dst, src) in enumerate(pairs):
        assert dst.nbytes == src.nbytes and dst.flags.c_contiguous and src.flags.c_contiguous
        jobs.append((k, dst.ctypes.data, src.ctypes.data, dst.nbytes))
    _run(_move, jobs)


def differ_many(pairs) -> list:
    """For each (a, b) of C-contiguous arrays: do their bytes differ?"""
    if _MEMCMP is None:
        return [a.nbytes != b.nbytes or not np.array_equal(
            a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)) for a, b in pairs]
    jobs = [(k, a.ctypes.data, b.ctypes.data, a.nbytes) for k, (a, b) in enumerate(pairs)
            if a.nbytes == b.nbytes]
    res = _run(_MEMCMP, jobs)
    return [a.nbytes != b.nbytes or res.get(k, False) for k, (a, b) in enumerate(pairs)]
