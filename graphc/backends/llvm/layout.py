"""Arena layout for temporaries: byte offsets from buffer lifetimes.

Kept apart from code generation so the optimizer's memory plan
(`graph.memory_plan`, when it exists) can replace it.  A temporary lives from
the first kernel that touches it to the last one (outputs: to the end); two
temporaries share bytes only if their lifetimes do not overlap, so a kernel's
output never overlaps one of its inputs.  Greedy best-fit over sorted sizes.
"""
from __future__ import annotations

import numpy as np

ALIGN = 64


def _round(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_arena(prog, nthreads=1):
    """{id(buffer): byte offset} and the arena size in bytes.

    A thread-scoped buffer gets one copy per thread, side by side."""
    first, last = {}, {}
    for k, kern in enumerate(prog.kernels):
        for b in kern.buffers:
            first.setdefault(id(b), k)
            last[id(b)] = k
    end = len(prog.kernels)
    for b in prog.outputs:
        last[id(b)] = end
    temps = [b for b in prog.temps if id(b) in first]
    temps.sort(key=lambda b: -b.size * b.dtype.itemsize * (nthreads if b.scope == "thread" else 1))
    # Placed temporaries as columns (offset, nbytes, first, last): which ones live at
    # the same time as the next is one vectorized test, not a Python loop over all of
    # them per temporary (quadratic in Python; the plan of a 50k-node graph).
    cols = np.zeros((4, max(len(temps), 1)), dtype=np.int64)
    offsets = {}
    top = 0
    for k, b in enumerate(temps):
        copies = nthreads if b.scope == "thread" else 1
        nbytes = _round(b.size * b.dtype.itemsize * copies)
        lo, hi = first[id(b)], last[id(b)]
        o_, n_, f_, l_ = cols[:, :k]
        live = (l_ >= lo) & (f_ <= hi)
        bo, bn = o_[live], n_[live]
        order = np.lexsort((bn, bo))      # by offset, then size (as sorted tuples)
        off, best = 0, None
        for o, n in zip(bo[order].tolist(), bn[order].tolist()):
            if o - off >= nbytes and (best is None or o - off < best[1]):
                best = (off, o - off)
            off = max(off, o + n)
        start = best[0] if best is not None else off
        cols[:, k] = (start, nbytes, lo, hi)
        offsets[id(b)] = start
        top = max(top, start + nbytes)
    return offsets, top
