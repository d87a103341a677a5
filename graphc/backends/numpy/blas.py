"""The NumPy backend's BLAS thread policy: one BLAS thread while a graph runs.

A training step of the models graphc trains on a CPU (LeNet-5, MLPs, small
RNNs) is hundreds of small matmuls: a few million flops each.  With more than
one BLAS thread, OpenBLAS spends longer waking and synchronizing its threads
than computing, and its threads busy-wait: with any other busy process on the
machine they spin against it and a step runs 3-10x slower (docs/user_guide.md,
"How fast").  So every NumPy-backend run limits BLAS to one thread and puts the
user's setting back afterwards; whole-machine parallelism is the LLVM backend's
job (its own thread pool).

`GRAPHC_NUMPY_BLAS_THREADS=N` sets the count used while a graph runs (0: leave
BLAS alone).  The limit is a process-wide setting of the BLAS library, so
concurrent runs from several Python threads share one limit, counted: the first
run to start sets it, the last to finish restores the previous value.

threadpoolctl (a dependency of graphc) finds the BLAS libraries NumPy loaded;
without it (a broken install) runs are correct, only unlimited.
"""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_depth = 0
_saved: list = []            # (library controller, its thread count before the limit)
_controllers = None          # BLAS library controllers, found once


def _threads_wanted() -> int:
    raw = os.environ.get("GRAPHC_NUMPY_BLAS_THREADS", "1").strip()
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"GRAPHC_NUMPY_BLAS_THREADS must be a whole number (0: leave BLAS "
                         f"alone), got {raw!r}") from None
    if n < 0:
        raise ValueError(f"GRAPHC_NUMPY_BLAS_THREADS must be >= 0, got {raw!r}")
    return n


def _blas_controllers() -> list:
    global _controllers
    if _controllers is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controllers = []
        else:
            _controllers = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _controllers


class _Limited:
    """Context: BLAS limited to the policy's thread count (re-entrant, thread-aware)."""

    __slots__ = ()

    def __enter__(self):
        global _depth
        with _lock:
            if _depth == 0:
                n = _threads_wanted()
                if n > 0:
                    for lib in _blas_controllers():
                        before = lib.get_num_threads()
                        if before != n:
                            lib.set_num_threads(n)
                            _saved.append((lib, before))
            _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _saved:
                    lib, before = _saved.pop()
                    lib.set_num_threads(before)
        return False


limited = _Limited()


def current_threads() -> list:
    """The thread count of each BLAS library NumPy loaded (for tests and reports)."""
    return [lib.get_num_threads() for lib in _blas_controllers()]
