"""One launch per recurrence: a `TimeLoop`'s kernels fused into a single kernel.

A recurrence step (the body of a `scan` loop region) is generated like any
other code: thread kernels, block kernels and tiled GEMMs, several launches per
step.  Here those kernels become `__device__` functions that take their block
and thread coordinates as arguments (`gc_vb`, `gc_vt`, `gc_vd` instead of
`blockIdx`, `threadIdx`, `blockDim`), and one `__global__` *step kernel*, a
single block of 256 threads, calls them in the plan's order:

* a part without barriers (thread kernels): its grid x block virtual threads are
  spread over the 256 real ones (a block-stride loop);
* a part with barriers (block kernels, GEMMs; all generated with exactly 256
  threads inside a time loop): the block runs its virtual blocks one after
  another, every thread calling the function so that its `__syncthreads` are
  reached by the whole block;
* `__syncthreads()` between parts stands in for the launch boundary: with one
  block, a block barrier *is* a grid barrier (global writes before it are
  visible to every thread after it);
* host loops inside the step become loops in the kernel, their variables
  passed on to the parts.

Where every view buffer of the loop is a plain slice of a buffer outside it
(the case for `scan` today), the loop over t moves into the kernel too — a
*sequence kernel*, one launch for the whole loop, each view's pointer computed
as parent + base + t * step in the kernel, `__syncthreads()` ending every step.
Otherwise (`SEQUENCE_KERNELS = False`, or a view of a view) the step kernel is
launched once per step and the runtime moves the views as before.  Both are
single-block kernels declared `__launch_bounds__(256, 1)`: ptxas must not cap
registers for an occupancy that one block never has.

The input projection is not part of the step: graphc/nn/rnn.py computes it for
all time steps with one matmul before the scan.  A step kernel is one block, so
it suits the small steps of recurrent layers (hidden sizes up to a few hundred
at modest batch); a step whose parts would need more than `MAX_ROUNDS`
block-rounds per thread, or more static shared memory than `MAX_SMEM`, keeps
its separate launches (several per step), as does a step with a nested time
loop (its inner loop is fused instead).
"""
from __future__ import annotations

from .cexpr import ctype
from .codegen import THREADS, HostLoop, Launch, TimeLoop

MAX_ROUNDS = 256           # sum over parts of the virtual blocks one real block works through
MAX_SMEM = 40 * 1024       # static shared memory of all parts together (48 KiB limit)
SEQUENCE_KERNELS = True    # a whole loop in one launch where its views allow it
MAX_PARAMS = 400           # kernel parameters (pointers; CUDA's limit is 4 KiB of them)


def fuse_time_loops(gen, steps):
    for k, st in enumerate(steps):
        if isinstance(st, HostLoop):
            fuse_time_loops(gen, st.steps)
        elif isinstance(st, TimeLoop):
            if any(isinstance(x, TimeLoop) for x in _walk(st.steps)):
                fuse_time_loops(gen, st.steps)
                continue
            fused = fuse_step(gen, st)
            if fused is not None and fused.time_loop is not None:
                steps[k] = fused          # the whole loop in one launch
            elif fused is not None:
                st.steps = [fused]


def _walk(steps):
    for s in steps:
        yield s
        if isinstance(s, (HostLoop, TimeLoop)):
            yield from _walk(s.steps)


def _rounds(steps):
    n = 0
    for s in steps:
        if isinstance(s, HostLoop):
            n += s.extent * _rounds(s.steps)
        else:
            nb = s.grid[0] * s.grid[1] * s.grid[2]
            nt = s.block[0] * s.block[1] * s.block[2]
            n += nb if s.sync else -(-nb * nt // THREADS)
    return n


def fuse_step(gen, tl):
    parts = [s for s in _walk(tl.steps) if isinstance(s, Launch)]
    if not parts:
        return None
    bound = {id(s.var) for s in _walk(tl.steps) if isinstance(s, HostLoop)}
    for la in parts:
        if la.sync and la.block[0] * la.block[1] * la.block[2] != THREADS:
            return None
        if any(kind == "var" and id(obj) not in bound for kind, obj in la.params):
            return None
    if _rounds(tl.steps) > MAX_ROUNDS or sum(la.smem for la in parts) > MAX_SMEM:
        return None

    # the step kernel's parameters: every buffer any part touches, in first-use order
    bufs, written = [], set()
    for la in parts:
        _, sig, _, _ = gen.emitted[la.name]
        for (kind, obj), decl in zip(la.params, sig):
            if kind == "buf":
                if all(b is not obj for b in bufs):
                    bufs.append(obj)
                if not decl.startswith("const "):
                    written.add(id(obj))
    if len(bufs) > MAX_PARAMS:
        return None
    pname = {id(b): f"p{k}" for k, b in enumerate(bufs)}
    hname = {}

    # the parts, re-rendered as device functions
    for la in parts:
        idx, sig, head, lines = gen.emitted[la.name]
        body = [ln.replace("blockIdx.", "gc_vb.").replace("threadIdx.", "gc_vt.")
                .replace("blockDim.", "gc_vd.") for ln in lines]
        text = head + ["//   (a part of a fused time step: a device function)",
                       f"static __device__ __forceinline__ void {la.name}(const uint3 gc_vb, const uint3 gc_vt, "
                       f"const uint3 gc_vd, {', '.join(sig)}) {{"] + body + ["}"]
        gen.chunks[idx] = "\n".join(text) + "\n"

    r = tl.region
    seq = _sequence_params(gen, r, bufs, written)
    if seq is not None:
        return _sequence_kernel(gen, tl, parts, bufs, pname, seq)
    name = f"k{parts[0].name.split('_', 1)[0][1:]}_time_step"
    what = (f"time step of a {'reversed ' if r.reverse else ''}loop of {r.length}: "
            f"{len(parts)} kernels fused, one block of {THREADS} threads")
    lines = [f"// {name}: {what}",
             "//   one launch per step; __syncthreads() between the parts replaces the launch",
             "//   boundaries (one block: a block barrier is a grid barrier)",
             f'extern "C" __global__ void __launch_bounds__({THREADS}, 1) {name}(' + ", ".join(
                 f"{'' if id(b) in written else 'const '}{ctype(b.dtype)}* {pname[id(b)]}"
                 for b in bufs) + ") {",
             "  const unsigned gc_tid = threadIdx.x;"]
    _emit_steps(tl.steps, lines, pname, hname, 1)
    lines.append("}")
    gen.chunks.append("\n".join(lines) + "\n")

    ids = {id(la) for la in parts}
    gen.launches = [la for la in gen.launches if id(la) not in ids]
    gen.parts += parts
    fused = Launch(name, (1, 1, 1), (THREADS, 1, 1), [("buf", b) for b in bufs], True,
                   parts[0].node, what)
    fused.parts = parts
    fused.smem = sum(la.smem for la in parts)
    gen.launches.append(fused)
    return fused


def _sequence_params(gen, r, bufs, written):
    """For a whole-sequence kernel: (kernel parameter buffers, {id: name}, written ids),
    the views of this loop replaced by their parents; None where a view of the loop
    is not a plain slice of a buffer of its own type outside the loop."""
    if not SEQUENCE_KERNELS:
        return None
    views = getattr(gen.prog, "views", {}) or {}
    kparams, kname, kwritten = [], {}, set()
    for b in bufs:
        v = views.get(id(b))
        if v is not None and v.loop is r:
            if id(v.parent) in views and views[id(v.parent)].loop is r or \
                    v.parent.dtype != b.dtype:
                return None
            b2 = v.parent
        else:
            b2 = b
        if id(b2) not in kname:
            kname[id(b2)] = f"q{len(kparams)}"
            kparams.append(b2)
        if id(b) in written:
            kwritten.add(id(b2))
    if len(kparams) > MAX_PARAMS:
        return None
    return kparams, kname, kwritten


def _sequence_kernel(gen, tl, parts, bufs, pname, seq):
    """One launch for the whole loop: the step's parts inside a loop over t, each
    view of the loop a pointer moved to parent + base + t * step in the kernel."""
    kparams, kname, kwritten = seq
    r = tl.region
    views = gen.prog.views
    name = f"k{parts[0].name.split('_', 1)[0][1:]}_sequence"
    what = (f"whole {'reversed ' if r.reverse else ''}loop of {r.length} steps: "
            f"{len(parts)} kernels fused, one block of {THREADS} threads")
    L = r.length
    lines = [f"// {name}: {what}",
             "//   one launch per sequence; __syncthreads() between the parts replaces the",
             "//   launch boundaries (one block: a block barrier is a grid barrier)",
             f'extern "C" __global__ void __launch_bounds__({THREADS}, 1) {name}(' + ", ".join(
                 f"{'' if id(b) in kwritten else 'const '}{ctype(b.dtype)}* {kname[id(b)]}"
                 for b in kparams) + ") {",
             "  const unsigned gc_tid = threadIdx.x;",
             f"  for (long long gc_s = 0; gc_s < {L}LL; ++gc_s) {{",
             f"    const long long gc_time = {f'{L - 1}LL - gc_s' if r.reverse else 'gc_s'};"]
    # views of the loop: the pointer expression goes straight into each call (pointers
    # held across the whole step would only add live registers)
    names = {}
    for b in bufs:
        v = views.get(id(b))
        if v is not None and v.loop is r:
            names[id(b)] = f"{kname[id(v.parent)]} + ({v.base}LL + gc_time * {v.step}LL)"
            lines.append(f"    // {b.name} (view) = {names[id(b)]}")
        else:
            names[id(b)] = kname[id(b)]
    # (__launch_bounds__(256, 1): one block runs on the whole GPU, so ptxas need not
    # cap registers for occupancy; without it it spilled at 32 registers)
    _emit_steps(tl.steps, lines, names, {}, 2)
    lines += ["  }", "}"]
    gen.chunks.append("\n".join(lines) + "\n")

    ids = {id(la) for la in parts}
    gen.launches = [la for la in gen.launches if id(la) not in ids]
    gen.parts += parts
    fused = Launch(name, (1, 1, 1), (THREADS, 1, 1), [("buf", b) for b in kparams], True,
                   parts[0].node, what)
    fused.parts = parts
    fused.smem = sum(la.smem for la in parts)
    fused.time_loop = r
    gen.launches.append(fused)
    return fused


def _emit_steps(steps, lines, pname, hname, depth):
    pad = "  " * depth
    for s in steps:
        if isinstance(s, HostLoop):
            v = f"h{len(hname)}"
            hname[id(s.var)] = v
            lines.append(f"{pad}for (long long {v} = 0; {v} < {s.extent}LL; ++{v}) {{  "
                         f"// host loop {s.var.name}")
            _emit_steps(s.steps, lines, pname, hname, depth + 1)
            lines.append(f"{pad}}}")
            continue
        gx, gy, gz = s.grid
        bx, by, bz = s.block
        nb, nt = gx * gy * gz, bx * by * bz
        args = ", ".join(pname[id(o)] if k == "buf" else hname[id(o)] for k, o in s.params)
        vb, vt = _coords("gc_b", gx, gy, gz), _coords("gc_t", bx, by, bz)
        vd = f"{{{bx}u, {by}u, {bz}u}}"
        lines.append(f"{pad}// {s.name}: {s.what}")
        if nb == 0:
            continue
        if s.sync:   # every thread takes part: the part's barriers are block-wide
            lines += [f"{pad}for (unsigned gc_b = 0; gc_b < {nb}u; ++gc_b) {{",
                      f"{pad}  const unsigned gc_t = gc_tid;",
                      f"{pad}  {s.name}({vb}, {vt}, {vd}, {args});",
                      f"{pad}  __syncthreads();",
                      f"{pad}}}"]
        else:
            lines += [f"{pad}for (unsigned gc_v = gc_tid; gc_v < {nb * nt}u; gc_v += {THREADS}u) {{",
                      f"{pad}  const unsigned gc_b = gc_v / {nt}u, gc_t = gc_v % {nt}u;",
                      f"{pad}  {s.name}({vb}, {vt}, {vd}, {args});",
                      f"{pad}}}",
                      f"{pad}__syncthreads();"]


def _coords(v, nx, ny, nz):
    """{x, y, z} of the linear index v in an nx x ny x nz box (x fastest), folded
    where an extent is 1."""
    x = "0u" if nx == 1 else (v if ny == nz == 1 else f"{v} % {nx}u")
    if ny == 1:
        y = "0u"
    else:
        y = v if nx == 1 else f"{v} / {nx}u"
        y = y if nz == 1 else f"{y} % {ny}u"
    z = "0u" if nz == 1 else (v if nx * ny == 1 else f"{v} / {nx * ny}u")
    return f"{{{x}, {y}, {z}}}"
