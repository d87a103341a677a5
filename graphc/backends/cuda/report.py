"""A static per-kernel report of a generated CUDA program: steer work without a GPU.

For every launch of the plan: grid, block, registers and shared memory (from
ptxas when asked for), the work one thread does in a row (`serial`: loop
iterations; the longest chain of dependent work the launch waits for), the
bytes it must move and the FLOPs it does, and a time estimate on a device
model (an H200 by default):

    roofline = max(bytes / HBM bandwidth, flops / fp32 peak)
    serial   = serial iterations x SERIAL_S_PER_ITER (one thread's dependent loads)
    estimate = max(roofline, serial), plus LAUNCH_S per launch for the whole step

Serial work, in statements one thread executes in a row (the leaf statements of
its loop nest times their loops' extents): a thread kernel's per thread; a block kernel's
share of each distributed loop or reduction per thread; a GEMM's steps of
depth 16 (a tile of A and B staged in shared memory); a fused recurrence's
rounds over its parts, times the steps of its time loop.

The byte count is the compulsory traffic: each buffer a launch touches counted
once, but never more than the accesses its loops make (a slice of a big buffer
costs its slice).  Shared-memory scratch costs nothing.  FLOPs count the float
arithmetic nodes of each statement times the iterations that run it (GEMMs: 2MNK).
These are models, not measurements: the GPU bench says what is true.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from ...kernel import ir as K
from . import analysis as A
from .codegen import HostLoop, Launch, TimeLoop
from .gemm import TILE


@dataclass
class Device:
    name: str
    sms: int
    hbm_bytes_per_s: float
    fp32_flops_per_s: float
    # one statement of a lone thread's loop nest (latency bound: its loads wait on
    # the memory system): the four serial max-pool kernels of the LeNet step ran
    # 12.5M statements (3.2M loop iterations) in 234 ms on an H200
    serial_s_per_iter: float = 19e-9
    # a launch from Python through cuLaunchKernel, as the GPU sees the gap
    launch_s: float = 4e-6


H200 = Device("H200", sms=132, hbm_bytes_per_s=4.8e12, fp32_flops_per_s=60e12)
H100 = Device("H100 SXM", sms=132, hbm_bytes_per_s=3.35e12, fp32_flops_per_s=60e12)


@dataclass
class KernelEstimate:
    name: str
    what: str
    grid: tuple
    block: tuple
    launches: int          # times the plan launches it (host and time loops)
    serial: int            # loop iterations one thread runs in a row (per launch)
    work: int              # iterations (or multiply-adds) of all threads (per launch)
    bytes: float           # all launches
    flops: float           # all launches
    roofline_s: float      # all launches
    time_s: float          # all launches, without launch overhead
    registers: int = None
    shared_bytes: int = None
    spills: int = None
    gemm: bool = False
    bound: str = ""        # "memory", "compute" or "serial"

    @property
    def blocks(self):
        return prod(self.grid)

    @property
    def threads(self):
        return prod(self.grid) * prod(self.block)

# ------------------------------------------------------------------ counting
_FLOP_OPS = {"add", "sub", "mul", "div", "max", "min", "pow"}


def _flops_of(exprs) -> int:
    n, seen = 0, set()
    for e in exprs:
        for x in A.walk_exprs(e):
            if id(x) in seen:
                continue
            seen.add(id(x))
            if x.dtype.kind == "f" and (
                    (isinstance(x, K.BinOp) and x.op in _FLOP_OPS) or isinstance(x, K.UnOp)):
                n += 1
    return n


def _count(body, mult, acc, stats):
    """Accumulate, over `body` run `mult` times: accesses per buffer (acc: id ->
    [buffer, accesses]), float ops and leaf iterations (stats)."""
    for s in body:
        if isinstance(s, K.Loop):
            _count(s.body, mult * s.extent, acc, stats)
            continue
        if isinstance(s, K.If):
            _count(s.body, mult, acc, stats)
        exprs = A.stmt_exprs(s)
        stats["iters"] += mult
        stats["flops"] += mult * _flops_of(exprs)
        if isinstance(s, K.Store):
            acc.setdefault(id(s.buf), [s.buf, 0])[1] += mult
        seen = set()
        for e in exprs:
            for x in A.walk_exprs(e):
                if isinstance(x, K.Load) and id(x) not in seen:
                    seen.add(id(x))
                    acc.setdefault(id(x.buf), [x.buf, 0])[1] += mult


def _iters(body) -> int:
    """Leaf statements executed by one run of `body` (loops multiply)."""
    n = 0
    for s in body:
        if isinstance(s, K.Loop):
            n += s.extent * _iters(s.body)
        elif isinstance(s, K.If):
            n += 1 + _iters(s.body)
        else:
            n += 1
    return n


def _bytes(acc, private=()) -> float:
    return float(sum(min(b.size, n) * b.dtype.itemsize for b, n in acc.values()
                     if id(b) not in private and getattr(b, "scope", "global") != "thread"))


def launch_counts(la: Launch):
    """(serial iterations per thread, total work, bytes, flops) of one launch."""
    m = la.mapping or {}
    threads = prod(la.block)
    if la.parts is not None:                # a fused time step / whole sequence
        steps = la.time_loop.length if la.time_loop is not None else 1
        ser = work = nbytes = flops = 0
        for p in la.parts:
            s, w, b, f = launch_counts(p)
            nb, nt = prod(p.grid), prod(p.block)
            # the one block works through the part's virtual blocks (fuse.py)
            rounds = nb if p.sync else ceil(nb * nt / threads)
            ser += rounds * s
            work, nbytes, flops = work + w, nbytes + b, flops + f
        return ser * steps, work * steps, nbytes * steps, flops * steps
    if "gemm" in m:
        g = m["gemm"]
        batch = prod(l.extent for l in m["batch"] + m.get("reduce", []))
        acc = {}
        for op, n in ((g.a, g.M * g.K), (g.b, g.K * g.N), (g.c, g.M * g.N)):
            acc.setdefault(id(op[0]), [op[0], 0])[1] += n * batch
        # serial: the K-steps each thread goes through (loads staged in shared memory,
        # then `depth` (16, or 8 for the wide tiles) multiply-adds per output it holds)
        return ceil(g.K / m.get("depth", TILE)), g.M * g.N * g.K * batch, _bytes(acc), 2.0 * g.M * g.N * g.K * batch
    acc, stats = {}, {"iters": 0, "flops": 0}
    if "blocks" in m:                       # block kernels
        nblocks = prod(l.extent for l in m["blocks"])
        split = m.get("split", 1)     # a split reduction's blocks each cover 1/split
        _count(m["body"], nblocks // split, acc, stats)
        ser = 0
        for s, (kind, info) in zip(m["body"], m.get("kinds", [])):
            if kind == "distribute":
                inner = A.loop_chain(s)[1]
                ser += ceil(info.extent / threads) * _iters(inner) * prod(
                    l.extent for l in info.serial)
            elif kind == "reduce":
                chain = A.loop_chain(s)[0]
                pre = _iters(info[4]) if len(info) > 4 else 0
                ser += ceil(prod(l.extent for l in chain) / split / threads) * (1 + pre) + \
                    threads.bit_length()
            else:
                ser += _iters([s])
        return ser, stats["iters"], _bytes(acc, m.get("private", ())), float(stats["flops"])
    pv = m.get("threads", [])
    n = prod(l.extent for l in pv) if pv else 1
    _count(m.get("body", []), n, acc, stats)
    return _iters(m.get("body", [])), stats["iters"], _bytes(acc), float(stats["flops"])


def _walk(steps, mult=1):
    for s in steps:
        if isinstance(s, (HostLoop, TimeLoop)):
            yield from _walk(s.steps, mult * s.extent)
        else:
            yield s, mult


def estimate(cprog, device: Device = H200, resources=None) -> list:
    """KernelEstimate per launch of the plan (in plan order).  resources: ptxas's
    {kernel name: KernelResources} (compiler.ptxas_report), optional."""
    out = []
    for la, mult in _walk(cprog.steps):
        ser, work, nbytes, flops = launch_counts(la)
        roof = max(nbytes / device.hbm_bytes_per_s, flops / device.fp32_flops_per_s)
        t = max(roof, ser * device.serial_s_per_iter)
        r = (resources or {}).get(la.name)
        out.append(KernelEstimate(
            la.name, la.what, la.grid, la.block, mult, ser, work, nbytes * mult, flops * mult,
            roof * mult, t * mult, r.registers if r else None,
            r.shared_bytes if r else la.smem, (r.spill_stores + r.spill_loads) if r else None,
            gemm="gemm" in (la.mapping or {}),
            bound="serial" if t > roof * 1.0001 else "memory" if
            nbytes / device.hbm_bytes_per_s >= flops / device.fp32_flops_per_s else "compute"))
    return out


def total_time(ests, device: Device = H200) -> dict:
    launches = sum(e.launches for e in ests)
    kern = sum(e.time_s for e in ests)
    return dict(launches=launches, roofline_s=sum(e.roofline_s for e in ests), kernels_s=kern,
                launch_s=launches * device.launch_s, total_s=kern + launches * device.launch_s,
                bytes=sum(e.bytes for e in ests), flops=sum(e.flops for e in ests))


def format_report(ests, device: Device = H200, title="") -> str:
    tot = total_time(ests, device)
    lines = [f"static CUDA report{': ' + title if title else ''} (model: {device.name}, "
             f"{device.hbm_bytes_per_s / 1e12:.2f} TB/s, {device.fp32_flops_per_s / 1e12:.0f} "
             f"TFLOP/s fp32, {device.sms} SMs)",
             f"{'kernel':34s} {'grid':>16s} {'block':>12s} {'x':>4s} {'regs':>4s} {'smem':>6s} "
             f"{'serial':>8s} {'MB':>8s} {'MFLOP':>9s} {'roof us':>8s} {'est us':>8s}"]
    for e in ests:
        regs = "-" if e.registers is None else str(e.registers)
        lines.append(
            f"{e.name[:34]:34s} {str(e.grid):>16s} {str(e.block):>12s} {e.launches:4d} {regs:>4s} "
            f"{e.shared_bytes or 0:6d} {e.serial:8d} {e.bytes / 1e6:8.2f} {e.flops / 1e6:9.2f} "
            f"{e.roofline_s * 1e6:8.2f} {e.time_s * 1e6:8.2f}"
            + ("  SPILLS" if e.spills else "") + ("  <1 wave" if e.blocks < device.sms and
                                                  e.work >= ENOUGH_WORK else ""))
    lines.append(f"total: {tot['launches']} launches, {tot['bytes'] / 1e6:.1f} MB, "
                 f"{tot['flops'] / 1e9:.3f} GFLOP; roofline {tot['roofline_s'] * 1e3:.3f} ms, "
                 f"kernels {tot['kernels_s'] * 1e3:.3f} ms, + launches "
                 f"{tot['launch_s'] * 1e3:.3f} ms = {tot['total_s'] * 1e3:.3f} ms")
    return "\n".join(lines)


# a launch doing at least this much work (iterations or multiply-adds) should fill
# the GPU: at least one block per SM
ENOUGH_WORK = 1 << 20
