"""Arena layout for temporaries: byte offsets from buffer lifetimes.

Kept apart from code generation so the optimizer's memory plan
(`graph.memory_plan`, when it exists) can replace it.  A temporary lives from
the first kernel that touches it to the last one (outputs: to the end); two
temporaries share bytes only if their lifetimes do not overlap, so a kernel's
output never overlaps one of its inputs.  Greedy best-fit over sorted sizes.
"""
from __future__ import annotations

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
    placed = []   # (offset, nbytes, first, last)
    offsets = {}
    top = 0
    for b in temps:
        copies = nthreads if b.scope == "thread" else 1
        nbytes = _round(b.size * b.dtype.itemsize * copies)
        lo, hi = first[id(b)], last[id(b)]
        busy = sorted((o, n) for o, n, f, l in placed if not (l < lo or f > hi))
        off, best = 0, None
        for o, n in busy:
            if o - off >= nbytes and (best is None or o - off < best[1]):
                best = (off, o - off)
            off = max(off, o + n)
        start = best[0] if best is not None else off
        placed.append((start, nbytes, lo, hi))
        offsets[id(b)] = start
        top = max(top, start + nbytes)
    return offsets, top
