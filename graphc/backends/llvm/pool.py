"""The native worker pool that runs a compiled entry on several threads.

A multi-threaded runner's entry is SPMD: every thread runs `entry(table, tid)`
and the threads meet at native barriers between kernels.  The pool starts the
other threads cheaply.  Its workers are Python daemon threads that enter a
native loop once (ctypes drops the GIL) and never return to Python while the
process runs:

    worker(state, tid):  wait until the epoch changes (spin with `pause` for
                         SPIN rounds, then sleep on a futex); run
                         fn(table, tid) if tid < nthreads; count itself done.
    run(state, fn, table, nthreads):
                         publish fn/table/nthreads, bump the epoch, wake the
                         sleepers (futex), run fn(table, 0), wait until every
                         worker is done.

A call while the workers still spin (the next step of a training loop or of a
stream) costs about a microsecond instead of an event wake-up and a GIL hand-
over per worker; idle workers sleep in the kernel and use no CPU.  The spin is
short (about 4000 `pause` rounds, tens of microseconds), so a program that does
other work between calls loses little to it.  Without a futex (not Linux) a
sleeping worker polls every 100 µs.  Workers are bound to CPUs away from the
caller's (see `Pool._bind`).

One pool per process, grown to the most threads any runner asked for.  Calls
are serialized by a lock (two runners called from two Python threads at once
take turns).  After `fork` the child makes a new pool (the parent's threads do
not exist there); at exit the workers are told to stop and are joined.

State (int64 slots, the hot ones on their own cache lines):
  [0]  epoch (the low 32 bits are the futex word)
  [8]  fn   [9] table   [10] nthreads
  [16] done count   [24] sleeping workers   [32] exit flag
"""
from __future__ import annotations

import atexit
import ctypes
import os
import threading

import numpy as np
from llvmlite import ir

from .codegen import I32, I64, PTR, ModuleBuilder

EPOCH, FN, TABLE, NTHREADS, DONE, SLEEPERS, EXIT, MAIN_CPU, PIN = 0, 8, 9, 10, 16, 24, 32, 40, 41
SPIN = 4000            # pause rounds before a worker sleeps
YIELD_AFTER = 20000    # rounds before the caller waiting for workers yields its CPU


def _futex_syscall(triple: str):
    if "linux" not in triple:
        return None
    if triple.startswith("x86_64"):
        return 202
    if triple.startswith("aarch64"):
        return 98
    return None


def _module(triple: str) -> str:
    mb = ModuleBuilder(name="graphc_pool")
    m = mb.module
    void = ir.VoidType()
    entry_ty = ir.FunctionType(void, [PTR, I64])
    x86 = "x86" in triple
    pause = ir.Function(m, ir.FunctionType(void, []), name="llvm.x86.sse2.pause") if x86 else None
    yld = ir.Function(m, ir.FunctionType(I32, []), name="sched_yield")
    nr = _futex_syscall(triple)
    sysc = ir.Function(m, ir.FunctionType(I64, [I64], var_arg=True), name="syscall") \
        if nr is not None else None
    usleep = ir.Function(m, ir.FunctionType(I32, [I32]), name="usleep") if nr is None else None

    def slot(b, state, k):
        return b.gep(state, [ir.Constant(I64, k)], source_etype=I64)

    def relax(b):
        if pause is not None:
            b.call(pause, [])

    # ---- worker(state, tid)
    fn = ir.Function(m, ir.FunctionType(void, [PTR, I64, I32]), name="graphc_pool_worker")
    state, tid, first = fn.args     # first: the epoch when the thread was started
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ts = b.alloca(ir.ArrayType(I64, 2))          # futex timeout: 100 ms (robustness only)
    b.store(ir.Constant(I64, 0), b.gep(ts, [ir.Constant(I32, 0), ir.Constant(I32, 0)]))
    b.store(ir.Constant(I64, 100_000_000), b.gep(ts, [ir.Constant(I32, 0), ir.Constant(I32, 1)]))
    epoch_p = slot(b, state, EPOCH)
    top = fn.append_basic_block("top")
    b.branch(top)
    # top: seen = phi; spin until epoch != seen
    b.position_at_end(top)
    seen = b.phi(I32)
    seen.add_incoming(first, fn.blocks[0])
    spin = fn.append_basic_block("spin")
    b.branch(spin)
    b.position_at_end(spin)
    rounds = b.phi(I64)
    rounds.add_incoming(ir.Constant(I64, 0), top)
    cur = b.load_atomic(epoch_p, "acquire", 8, typ=I32)
    changed = b.icmp_unsigned("!=", cur, seen)
    work = fn.append_basic_block("work")
    wait = fn.append_basic_block("wait")
    b.cbranch(changed, work, wait)
    b.position_at_end(wait)
    relax(b)
    nxt = b.add(rounds, ir.Constant(I64, 1))
    sleep = fn.append_basic_block("sleep")
    b.cbranch(b.icmp_unsigned(">", nxt, ir.Constant(I64, SPIN)), sleep, spin)
    rounds.add_incoming(nxt, wait)
    b.position_at_end(sleep)
    sl = slot(b, state, SLEEPERS)
    b.atomic_rmw("add", sl, ir.Constant(I64, 1), "seq_cst")
    again = b.load_atomic(epoch_p, "seq_cst", 8, typ=I32)
    with b.if_then(b.icmp_unsigned("==", again, seen)):
        if sysc is not None:     # FUTEX_WAIT_PRIVATE: sleeps only while the epoch is `seen`
            b.call(sysc, [ir.Constant(I64, nr), epoch_p, ir.Constant(I64, 128),
                          b.zext(seen, I64), ts, ir.Constant(I64, 0), ir.Constant(I64, 0)])
        else:
            b.call(usleep, [ir.Constant(I32, 100)])
    b.atomic_rmw("sub", sl, ir.Constant(I64, 1), "seq_cst")
    rounds.add_incoming(ir.Constant(I64, 0), b.block)
    b.branch(spin)
    # work: exit?  run fn(table, tid) when this thread takes part; count done
    b.position_at_end(work)
    ex = b.load_atomic(slot(b, state, EXIT), "acquire", 8, typ=I64)
    ret = fn.append_basic_block("ret")
    run = fn.append_basic_block("run")
    b.cbranch(b.icmp_unsigned("!=", ex, ir.Constant(I64, 0)), ret, run)
    b.position_at_end(run)
    nt = b.load(slot(b, state, NTHREADS), typ=I64)
    with b.if_then(b.icmp_signed("<", tid, nt)):
        f = b.inttoptr(b.load(slot(b, state, FN), typ=I64), entry_ty.as_pointer())
        table = b.inttoptr(b.load(slot(b, state, TABLE), typ=I64), PTR)
        b.call(f, [table, tid])
    b.atomic_rmw("add", slot(b, state, DONE), ir.Constant(I64, 1), "release")
    seen.add_incoming(cur, b.block)
    b.branch(top)
    b.position_at_end(ret)
    b.ret_void()

    # ---- run(state, fn, table, nthreads, nworkers) -> 0, or 1 when the caller is on
    # another CPU than at the last binding (nothing ran: rebind the workers, call again)
    fn = ir.Function(m, ir.FunctionType(I64, [PTR, I64, I64, I64, I64]), name="graphc_pool_run")
    state, f, table, nthreads, nworkers = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    getcpu = ir.Function(m, ir.FunctionType(I32, []), name="sched_getcpu") if nr else None
    if getcpu is not None:
        with b.if_then(b.icmp_unsigned("!=", b.load(slot(b, state, PIN), typ=I64),
                                       ir.Constant(I64, 0))):
            cpu = b.sext(b.call(getcpu, []), I64)
            with b.if_then(b.icmp_unsigned("!=", cpu, b.load(slot(b, state, MAIN_CPU), typ=I64)),
                           likely=False):
                b.ret(ir.Constant(I64, 1))
    b.store(f, slot(b, state, FN))
    b.store(table, slot(b, state, TABLE))
    b.store(nthreads, slot(b, state, NTHREADS))
    b.atomic_rmw("xchg", slot(b, state, DONE), ir.Constant(I64, 0), "release")
    epoch_p = slot(b, state, EPOCH)
    b.atomic_rmw("add", epoch_p, ir.Constant(I32, 1), "seq_cst")
    asleep = b.load_atomic(slot(b, state, SLEEPERS), "seq_cst", 8, typ=I64)
    if sysc is not None:
        with b.if_then(b.icmp_signed(">", asleep, ir.Constant(I64, 0))):
            # FUTEX_WAKE_PRIVATE, every waiter
            b.call(sysc, [ir.Constant(I64, nr), epoch_p, ir.Constant(I64, 129),
                          ir.Constant(I64, 0x7FFFFFFF)])
    fp = b.inttoptr(f, entry_ty.as_pointer())
    b.call(fp, [b.inttoptr(table, PTR), ir.Constant(I64, 0)])
    loop = fn.append_basic_block("wait")
    pre = b.block
    b.branch(loop)
    b.position_at_end(loop)
    k = b.phi(I64)
    k.add_incoming(ir.Constant(I64, 0), pre)
    done = b.load_atomic(slot(b, state, DONE), "acquire", 8, typ=I64)
    out = fn.append_basic_block("out")
    body = fn.append_basic_block("body")
    b.cbranch(b.icmp_signed(">=", done, nworkers), out, body)
    b.position_at_end(body)
    relax(b)
    with b.if_then(b.icmp_unsigned(">", k, ir.Constant(I64, YIELD_AFTER))):
        b.call(yld, [])
    k.add_incoming(b.add(k, ir.Constant(I64, 1)), b.block)
    b.branch(loop)
    b.position_at_end(out)
    b.ret(ir.Constant(I64, 0))
    return mb.ir_text()


class Pool:
    """The process's workers (tids 1..size-1) and the native functions that drive them."""

    def __init__(self, size: int):
        from . import cache, objgen
        from .runtime import _target, jit
        target = _target()
        triple = target["triple"]
        text = _module(triple)
        # From the disk cache when possible: running LLVM's optimizer and code
        # generator, even on this small module, makes the process touch tens of MB of
        # libLLVM's code (resident memory a warm start otherwise never pays).
        key = cache.text_key(text, target)
        data = cache.read(key) if key else None
        hit = objgen.load_object(data, "graphc_pool_worker") if data else None
        self.engine, self._worker_addr = hit or jit(text, keep_object=key,
                                                    entry="graphc_pool_worker")
        run_addr = self.engine.get_function_address("graphc_pool_run")
        self._run = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64)(run_addr)
        self._worker = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int32)(self._worker_addr)
        self.state = np.zeros(64, dtype=np.int64)
        self._addr = self.state.ctypes.data
        self.lock = threading.Lock()
        self._futex = _futex_syscall(triple)
        self.threads = []
        self.size = 1
        self.grow(size)

    def grow(self, size: int):
        while self.size < size:
            # Started under the lock: no run can bump the epoch before the worker has it.
            epoch = int(np.int64(self.state[EPOCH]).astype(np.uint32).astype(np.int32))
            t = threading.Thread(target=self._worker, args=(self._addr, self.size, epoch),
                                 daemon=True,
                                 name=f"graphc-worker-{self.size}")
            t.start()
            self.threads.append(t)
            self.size += 1
        self.state[PIN] = 0
        if (self._futex is not None and hasattr(os, "sched_setaffinity")
                and os.environ.get("GRAPHC_PIN_THREADS", "1") not in ("0", "", "no", "false")):
            try:
                self._libc = ctypes.CDLL(None)
                self.state[PIN] = int(size <= len(os.sched_getaffinity(0)))
                self.state[MAIN_CPU] = -1       # bind at the first run
            except (AttributeError, OSError):
                pass

    def _bind(self):
        """Bind the workers to CPUs other than the one the calling thread is on now.

        Without binding, a worker woken from its futex is often placed on the waking
        thread's CPU (the scheduler's wake-affine placement), or beside another
        library's spinning thread, and the two share one CPU until the load balancer
        moves one: on the 2-CPU VM a LeNet-5 batch-64 step after 10 ms idle took
        5.5 ms unbound, 2.35 ms bound (2.1 ms back to back either way).  Binding the
        workers to fixed CPUs is not enough, as the caller (never bound: it is the
        user's thread) then sometimes runs on a worker's CPU; so the native run
        checks the caller's CPU (sched_getcpu, a few ns) and, when it moved, returns
        before doing anything, and the workers are rebound around it here.  Only when
        there are at least as many CPUs as threads; GRAPHC_PIN_THREADS=0 turns it off.
        """
        st = self.state
        if not st[PIN]:
            return
        try:
            cpus = sorted(os.sched_getaffinity(0))
            here = self._libc.sched_getcpu()
            others = [c for c in cpus if c != here]
            for t, cpu in zip(self.threads, others):
                os.sched_setaffinity(t.native_id, {cpu})
            st[MAIN_CPU] = here
        except (AttributeError, OSError):
            st[PIN] = 0      # no affinity API: the scheduler places the threads

    def run(self, fn_addr: int, table_addr: int, nthreads: int):
        """fn(table, tid) on threads 0..nthreads-1 (0 is the caller); returns when all are done."""
        with self.lock:
            while self._run(self._addr, fn_addr, table_addr, nthreads, self.size - 1):
                self._bind()

    def stop(self, timeout=1.0):
        """Tell the workers to return (they see EXIT at the next epoch) and join them."""
        with self.lock:
            self.state[EXIT] = 1
            self.state[EPOCH] += 1       # only the lock holder writes the epoch
            if self.state[SLEEPERS] > 0 and self._futex is not None:
                libc = ctypes.CDLL(None)
                libc.syscall(ctypes.c_long(self._futex), ctypes.c_void_p(self._addr),
                             ctypes.c_long(129), ctypes.c_long(0x7FFFFFFF))
        for t in self.threads:
            t.join(timeout)


_POOL = None
_pool_lock = threading.Lock()


def get(size: int) -> Pool:
    """The process's pool, with at least `size` threads (the caller counted)."""
    global _POOL
    p = _POOL
    if p is None or p.size < size:
        with _pool_lock:
            if _POOL is None:
                _POOL = Pool(size)
            elif _POOL.size < size:
                with _POOL.lock:
                    _POOL.grow(size)
            p = _POOL
    return p


def _after_fork_in_child():
    # The parent's workers do not exist in the child: start afresh there (the old
    # state and code stay allocated, unused).
    global _POOL, _pool_lock
    _POOL = None
    _pool_lock = threading.Lock()


def _at_exit():
    p = _POOL
    if p is not None:
        p.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
