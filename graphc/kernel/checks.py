"""Run-time index checks in native code.

Indices read from memory (take, take_grad, one_hot, class labels) may come from
outside the graph or be computed inside it (`idx + 1`, a cast, ONNX Gather's
wrapping of negative indices).  The kernels that use them clamp every address
into range, so a bad index never reads or writes out of bounds; a *check
kernel* before them scans the same index buffer and records what it found, and
the runtime turns a non-empty record into the reference's error after the call
(before any output or parameter update is handed back).

The record lives in one int64 buffer per program (`Program.check_buf`, an
external buffer of kind "check" that the runtime owns and resets before every
call).  Each check owns `blocks` records of `REC` fields:

    [count, lowest bad value, highest bad value, first bad position, its value]

Block b of a check scans positions [b*BLOCK, (b+1)*BLOCK) and writes only its
own record, so the blocks form a parallel loop with no shared writes and the
result does not depend on how threads or CUDA blocks share them out.  A block
that finds nothing writes nothing.  Inside a native time loop the same block
runs once per step and only the first step that finds a bad index writes (the
reference stops at the first failing step; exact when the per-step index array
fits one block), which is why the runtime resets the records before each call.
"""
from __future__ import annotations

from .ir import (INDEX, Assign, BinOp, Buffer, Cast, If, Kernel, Load, Local, Loop, Select, Store,
                 Var, idx)

BLOCK = 4096          # index positions per record
REC = 5               # fields per record
I64_MAX, I64_MIN = (1 << 63) - 1, -(1 << 63)
INIT = (0, I64_MAX, I64_MIN, I64_MAX, 0)   # a record that has seen nothing


class IndexCheck:
    """One checked index array: where its records are and how to word its error."""

    def __init__(self, op, size, kind, what, ignore, shape, loc, offset, blocks):
        self.op, self.size, self.kind, self.what, self.ignore = op, size, kind, what, ignore
        self.shape, self.loc, self.offset, self.blocks = tuple(shape), loc, offset, blocks

    def error(self, records):
        """The IndexOutOfRangeError for this check's `records` ((blocks, REC) ints), or
        None when they hold no bad index."""
        from ..ir.errors import index_out_of_range
        hit = [r for r in records if int(r[0])]
        if not hit:
            return None
        return index_out_of_range(
            self.op, self.size, shape=self.shape, count=sum(int(r[0]) for r in hit),
            lo=min(int(r[1]) for r in hit), hi=max(int(r[2]) for r in hit),
            first_pos=int(hit[0][3]), first_value=int(hit[0][4]), kind=self.kind,
            what=self.what, ignore=self.ignore, loc=self.loc)


def record_buffer(prog, n_fields) -> tuple:
    """(the program's check buffer, offset of n_fields new fields in it)."""
    buf = prog.check_buf
    if buf is None:
        buf = prog.check_buf = Buffer("checks", INDEX, 0)
        prog.externals.append((buf, ("check", prog.checks)))
    off = buf.size
    buf.size += n_fields      # (final before any backend sees the program)
    return buf, off


def checks_mark(prog) -> tuple:
    """Where the program's checks end now (for checks_rollback)."""
    return len(prog.checks), 0 if prog.check_buf is None else prog.check_buf.size


def checks_rollback(prog, mark):
    """Forget the checks added since `mark`: a lowering that made check kernels and
    then gave up (another lowering of the same node will make its own)."""
    n, size = mark
    del prog.checks[n:]
    buf = prog.check_buf
    if buf is not None:
        buf.size = size
        if size == 0:            # made during the attempt: no buffer at all
            prog.externals[:] = [e for e in prog.externals if e[0] is not buf]
            prog.check_buf = None


def _imin(a, b):
    return BinOp("min", a, b)


def _imax(a, b):
    return BinOp("max", a, b)


def check_kernels(lw, node, src: Buffer, size: int, shape, *, op=None, kind="index", what="",
                  ignore=None) -> list:
    """A kernel checking that every value of `src` (int32/int64 indices shaped `shape`)
    lies in [0, size) or equals `ignore`; the error names `op` (default: node's op)
    and `node`'s line.  [] for an empty index array."""
    m = src.size
    if m == 0:
        return []
    bs = min(BLOCK, m)
    blocks = -(-m // bs)
    R, off = record_buffer(lw.prog, blocks * REC)
    lw.prog.checks.append(IndexCheck(op or node.op.name, int(size), kind, what, ignore, shape,
                                     node.loc, off, blocks))
    b = Var("cb")
    ragged = blocks * bs != m        # the last block runs past the end

    def position(j):
        """(position, its value, whether it is bad) at offset j of block b."""
        p = BinOp("add", BinOp("mul", b, idx(bs)), j)
        v = Cast(Load(src, _imin(p, idx(m - 1)) if ragged else p), INDEX)
        bad = BinOp("or", BinOp("lt", v, idx(0)), BinOp("ge", v, idx(size)))
        if ignore is not None:          # (an int64: the ops' check() makes sure)
            bad = BinOp("and", bad, BinOp("ne", v, idx(ignore)))
        if ragged:
            bad = BinOp("and", bad, BinOp("lt", p, idx(m)))
        return p, v, bad

    cnt, lo, hi, first = (Local(INDEX, n) for n in ("bad_n", "bad_lo", "bad_hi", "bad_at"))
    top, bottom = idx(I64_MAX), idx(I64_MIN)
    # Branch-free reductions, one loop each: a CPU vectorizes them (the block is in its
    # cache after the first), a GPU runs each as a block-wide reduction.
    scan = []
    for acc, update in ((cnt, lambda p, v, bad: BinOp("add", cnt, Cast(bad, INDEX))),
                        (lo, lambda p, v, bad: _imin(lo, Select(bad, v, top))),
                        (hi, lambda p, v, bad: _imax(hi, Select(bad, v, bottom))),
                        (first, lambda p, v, bad: _imin(first, Select(bad, p, top)))):
        j = Var("cj")
        scan.append(Loop(j, bs, [Assign(acc, update(*position(j)))], "vector"))
    base = BinOp("add", BinOp("mul", b, idx(REC)), idx(off))
    at = lambda k: BinOp("add", base, idx(k))
    first_value = Cast(Load(src, _imin(first, idx(m - 1))), INDEX)
    # (inside a time loop: only the first step that finds a bad index in this block
    # records, as the reference stops at the first failing step)
    merge = [If(BinOp("eq", Load(R, at(0)), idx(0)), [
        Store(R, at(0), cnt), Store(R, at(1), lo), Store(R, at(2), hi), Store(R, at(3), first),
        Store(R, at(4), first_value)])]
    # the count alone when all is well; the extremes and the first position only for a
    # block that holds a bad index
    body = [Assign(cnt, idx(0)), Assign(lo, top), Assign(hi, bottom), Assign(first, top),
            scan[0], If(BinOp("gt", cnt, idx(0)), scan[1:] + merge)]
    return [Kernel(f"check_{op or node.op.name}", [R, src], [Loop(b, blocks, body, "parallel")],
                   flops=m)]


def label_checks(lw, node, labels, n_classes) -> list:
    """The check kernels of a label loss's labels (graph node `labels`): each in
    [0, n_classes) or equal to the loss's ignore_index."""
    return check_kernels(lw, node, lw.buf(labels), n_classes, tuple(int(d) for d in labels.shape),
                         kind="label", what=f"{n_classes} classes",
                         ignore=node.attrs["ignore_index"])


def first_error(checks, record):
    """The error of the first check (in program order) whose records hold a bad index,
    or None.  `record`: the check buffer's values (a flat int64 array)."""
    if not record[0::REC].any():
        return None
    for c in checks:
        rows = record[c.offset:c.offset + c.blocks * REC].reshape(c.blocks, REC)
        err = c.error(rows)
        if err is not None:
            return err
    return None


def initial_record(n_fields):
    """The check buffer's contents before a call: every record empty."""
    import numpy as np
    return np.tile(np.array(INIT, dtype=np.int64), n_fields // REC)
