"""Static check of a multi-threaded entry: no two threads touch the same bytes
in one phase unless both only read them.

A phase is the stretch of kernels between two barriers (runtime._entry puts a
barrier only where the arena ranges of two kernels conflict).  Within a phase
every thread runs its part of each shared kernel and thread 0 also runs the
single-threaded ones, with nothing ordering one thread's kernels against
another's.  So for every pair of kernels a, b of a phase and every pair of
different threads ta (running a) and tb (running b), what ta may write must be
disjoint from what tb may read or write.  The places a kernel touches:

  * its arena buffers and external arrays (runtime._access_ranges; a
    thread-scoped buffer counts as every thread's copy, an external array as
    all of them);
  * hidden scratch that is not in the arena: each packed GEMM's slice of the
    module's workspace (gemm.workspace), which depends on the thread --
    thread t uses [t * stride, t * stride + slice) of `graphc_ws_<dtype>`.

Both come from what the code generator actually emitted (the module's
recorded GEMM sites and its workspace stride), so a change to either that
lets two threads share scratch fails here, at compile time, with the kernels
named -- not as a wrong number one call in a thousand.  The chunks of one
shared kernel are not compared with each other here: each writes the part
of its outputs its chunk index selects (codegen.KernelEmitter.chunk), which
the stress schedule (stress.py) exercises at run time.
"""
from __future__ import annotations


def phases(barrier_before, n_kernels):
    """Lists of kernel indices between barriers; barrier_before: set of k."""
    out, cur = [], []
    for k in range(n_kernels):
        if k in barrier_before and cur:
            out.append(cur)
            cur = []
        cur.append(k)
    if cur:
        out.append(cur)
    return out


def _touches(k, tid, ranges, ws):
    """(reads, writes) of kernel k on thread tid: lists of (place, lo, hi)."""
    reads, writes = ranges[k]
    reads = [(("slot", s), lo, hi) for s, lo, hi in reads]
    writes = [(("slot", s), lo, hi) for s, lo, hi in writes]
    for buf, size, stride in ws.get(k, ()):
        # packing writes the slice, the micro-kernel reads it back
        r = (("ws", buf), tid * stride, tid * stride + size)
        reads.append(r)
        writes.append(r)
    return reads, writes


def _meet(xs, ys):
    for pa, la, ha in xs:
        for pb, lb, hb in ys:
            if pa == pb and la < hb and lb < ha:
                return pa, max(la, lb), min(ha, hb)
    return None


def conflicts(phase_list, spmd, nthreads, ranges, ws, names=None):
    """Every (kernel a, thread, kernel b, thread, place, [lo, hi)) of one phase where one
    thread writes what another reads or writes.  spmd[k]: all threads run kernel k,
    else thread 0 alone; ws: {k: [(scratch buffer, slice elements, thread stride)]}."""
    names = names or {}
    found = []
    for ph in phase_list:
        actors = [(k, t) for k in ph for t in (range(nthreads) if spmd[k] else (0,))]
        touch = {a: _touches(a[0], a[1], ranges, ws) for a in actors}
        for i, a in enumerate(actors):
            ra, wa = touch[a]
            for b in actors[i + 1:]:
                if a[1] == b[1]:
                    continue     # one thread runs its kernels in order
                rb, wb = touch[b]
                if a[0] == b[0]:  # two chunks of one kernel: only their scratch (see above)
                    ra, wa, rb, wb = ([x for x in v if x[0][0] == "ws"]
                                      for v in (touch[a][0], touch[a][1], rb, wb))
                else:
                    ra, wa = touch[a]
                hit = _meet(wa, rb + wb) or _meet(wb, ra)
                if hit:
                    found.append((names.get(a[0], a[0]), a[1], names.get(b[0], b[0]), b[1])
                                 + hit)
    return found
