"""The stress schedule: native code that makes data races between threads likely.

GRAPHC_DEBUG_SCHEDULE=shuffle at compile time builds a multi-threaded runner
whose generated code, on every call,

  * hands out the chunks of each shared kernel in a shuffled order: thread t
    runs chunk perm[t] of every top-level parallel loop and GEMM band, perm a
    random permutation of 0..nthreads-1 drawn per kernel run (kernels keep
    their chunk boundaries, so a correct program computes exactly what it
    computes on one thread, bit for bit);
  * makes each thread spin for a random time (log-uniform, 0 to ~4000 `pause`
    rounds, and now and then a `sched_yield`) before every kernel and before
    every chunk, so that every ordering the barriers allow -- a thread racing
    ahead into the next kernel of its interval while another is still in the
    previous one, a late writer, an early reader -- comes up within a few
    hundred calls.

The randomness comes from a seed the Runner writes into the barrier state
before each call (slot SEED) mixed with the barrier generation (the same for
every thread between two barriers, different after each), the kernel and,
for delays, the thread and the chunk: every thread draws the same permutation
for one kernel run without talking to the others.  Thread-scoped buffers and
the GEMM workspace stay indexed by the thread id: only the work moves.

A stress build is never stored in the disk cache under a normal key (see
runtime.compile_program).  It is a debugging aid: its delays cost time.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir

from .codegen import I32, I64, PTR
from .gemm import counted_loop

SEED = 8        # int64 slot of the barrier state the Runner writes per call (runtime.py)
GEN = 16        # the barrier's generation slot (runtime._barrier_fn)
N_PERMS = 64    # random permutations of the thread ids compiled into the module
MAX_SHIFT = 13  # delays are below 2**(0..12) pause rounds


def mode() -> str | None:
    """'shuffle' when GRAPHC_DEBUG_SCHEDULE asks for the stress schedule, else None."""
    v = os.environ.get("GRAPHC_DEBUG_SCHEDULE", "").strip().lower()
    if v in ("", "0", "off", "no", "false"):
        return None
    if v in ("shuffle", "1", "on", "yes", "true"):
        return "shuffle"
    raise ValueError(f"GRAPHC_DEBUG_SCHEDULE must be 'shuffle' or unset, got {v!r}")


def _c(v):
    v &= (1 << 64) - 1
    return ir.Constant(I64, v - (1 << 64) if v >= 1 << 63 else v)


def _mix(b, z):
    """splitmix64's finalizer: a well-spread 64-bit hash of z."""
    z = b.mul(b.xor(z, b.lshr(z, _c(30))), _c(0xBF58476D1CE4E5B9))
    z = b.mul(b.xor(z, b.lshr(z, _c(27))), _c(0x94D049BB133111EB))
    return b.xor(z, b.lshr(z, _c(31)))


def _declare(module, name, fnty):
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, fnty, name=name)


class Stress:
    """The module's stress helpers; ModuleBuilder.stress holds one (or None)."""

    def __init__(self, module: ir.Module, nthreads: int, x86: bool):
        self.module = module
        self.nthreads = nthreads
        self.bar = ir.GlobalVariable(module, I64, name="graphc_stress_bar")   # a pointer
        self.bar.linkage = "internal"
        self.bar.initializer = ir.Constant(I64, 0)
        rng = np.random.default_rng(12345)
        perms = [int(v) for _ in range(N_PERMS) for v in rng.permutation(nthreads)]
        ty = ir.ArrayType(I64, len(perms))
        self.perms = ir.GlobalVariable(module, ty, name="graphc_stress_perms")
        self.perms.linkage = "internal"
        self.perms.global_constant = True
        self.perms.initializer = ir.Constant(ty, perms)
        self._pause = _declare(module, "llvm.x86.sse2.pause",
                               ir.FunctionType(ir.VoidType(), [])) if x86 else None
        self._yield = _declare(module, "sched_yield", ir.FunctionType(I32, []))
        self._hash = self._hash_fn()
        self._part = self._part_fn()
        self._delay = self._delay_fn()

    # -- at the top of the entry: every thread publishes the same pointer
    def publish(self, b, bar_ptr):
        b.atomic_rmw("xchg", self.bar, b.ptrtoint(bar_ptr, I64), "monotonic")

    def _hash_fn(self):
        """hash(k, salt): this call's seed, the barrier generation, k and salt mixed."""
        fn = ir.Function(self.module, ir.FunctionType(I64, [I64, I64]), name="graphc_stress_hash")
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block())
        k, salt = fn.args
        bar = b.inttoptr(b.load_atomic(self.bar, "monotonic", 8, typ=I64), PTR)
        seed = b.load_atomic(b.gep(bar, [_c(SEED)], source_etype=I64), "monotonic", 8, typ=I64)
        gen = b.load_atomic(b.gep(bar, [_c(GEN)], source_etype=I64), "monotonic", 8, typ=I64)
        h = _mix(b, b.xor(seed, b.mul(gen, _c(0x9E3779B97F4A7C15))))
        h = _mix(b, b.add(h, b.mul(k, _c(0xD1B54A32D192ED03))))
        b.ret(_mix(b, b.add(h, salt)))
        return fn

    def _part_fn(self):
        """part(k, tid, nt): the chunk thread `tid` runs in this run of kernel k."""
        fn = ir.Function(self.module, ir.FunctionType(I64, [I64, I64, I64]),
                         name="graphc_stress_part")
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block())
        k, tid, nt = fn.args
        one = b.function.append_basic_block("one")
        many = b.function.append_basic_block("many")
        b.cbranch(b.icmp_signed("==", nt, _c(self.nthreads)), many, one)
        b.position_at_end(one)
        b.ret(tid)           # a kernel run on thread 0 alone: nothing to shuffle
        b.position_at_end(many)
        h = b.call(self._hash, [k, _c(0)])
        row = b.urem(h, _c(N_PERMS))
        at = b.add(b.mul(row, _c(self.nthreads)), tid)
        b.ret(b.load(b.gep(self.perms, [_c(0), at], inbounds=True), typ=I64))
        return fn

    def _delay_fn(self):
        """delay(k, salt): spin a random, log-uniform number of `pause` rounds."""
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [I64, I64]),
                         name="graphc_stress_delay")
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        k, salt = fn.args
        h = b.call(self._hash, [k, salt])
        shift = b.urem(h, _c(MAX_SHIFT))
        mask = b.sub(b.shl(_c(1), shift), _c(1))
        n = b.and_(b.lshr(h, _c(16)), mask)
        with b.if_then(b.icmp_unsigned("==", b.lshr(h, _c(59)), _c(0))):    # 1 in 32
            b.call(self._yield, [])
        with counted_loop(b, fn, 0, n, name="spin"):
            if self._pause is not None:
                b.call(self._pause, [])
            else:   # keep the loop: an empty one would be deleted
                b.load_atomic(self.bar, "monotonic", 8, typ=I64)
        b.ret_void()
        return fn

    # -- used by the entry and the kernels
    def part(self, b, k: int, tid, nt):
        return b.call(self._part, [_c(k), tid, nt])

    def delay(self, b, k: int, tid, salt: int):
        """Spin before kernel/chunk `salt` of kernel k; each thread draws its own time."""
        self.delay_salted(b, k, b.add(b.mul(tid, _c(1 << 20)), _c(salt)))

    def delay_salted(self, b, k: int, salt):
        """The same, the caller mixing what tells the threads apart into `salt`."""
        b.call(self._delay, [_c(k), salt])
