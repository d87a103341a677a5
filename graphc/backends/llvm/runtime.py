"""JIT compilation and the Python side of a compiled graph.

`compile_program(prog)` generates one LLVM module (every kernel plus
`entry(ptr table)`), optimizes it at O3 for the host CPU, JIT-compiles it with
MCJIT and returns a `Runner`.  The table holds one pointer per external buffer
(inputs, parameters, constants, the index checks' records), then the arena
base, then the error record.  Calling the runner validates every array, fills
the table with current pointers (parameters may have been replaced), resets the
index checks' records, crosses into native code once through ctypes, which
releases the GIL for the call, and raises the error of a bad index a check
kernel recorded (kernel/checks.py) before handing anything back.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
from llvmlite import ir

from ...ir.errors import GraphcError
from .codegen import I64, PTR, ModuleBuilder
from . import objgen, pool, server, stress
from .layout import plan_arena
from ...kernel.checks import first_error, initial_record

_libc = {}


def _target():
    return objgen.target()


def host_description() -> str:
    s = _target()
    return f"{s['cpu']} ({'AVX-512' if s['avx512'] else 'no AVX-512'})"


def fn_attrs() -> dict:
    s = _target()
    attrs = {"target-cpu": s["cpu"], "target-features": s["features"]}
    if s["avx512"]:
        attrs["prefer-vector-width"] = "512"
        attrs["min-legal-vector-width"] = "512"
    return attrs


def bounds_error_fn(mb: ModuleBuilder):
    """Debug builds: an internal function recording (kernel, index, size) in the error slot."""
    if mb.error_fn is None:
        gv = ir.GlobalVariable(mb.module, PTR, name="graphc_err")
        gv.linkage = "internal"
        gv.initializer = ir.Constant(PTR, None)
        mb.err_global = gv
        fnty = ir.FunctionType(ir.VoidType(), [I64, I64, I64])
        fn = ir.Function(mb.module, fnty, name="graphc_bounds_error")
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block())
        rec = b.load(gv, typ=PTR)
        for k, a in enumerate(fn.args):
            b.store(a, b.gep(rec, [ir.Constant(I64, k + 1)], source_etype=I64))
        b.store(ir.Constant(I64, 1), b.gep(rec, [ir.Constant(I64, 0)], source_etype=I64))
        b.ret_void()
        mb.error_fn = fn
    return mb.error_fn


def optimize_module(mod):
    objgen.optimize(mod)


def jit(ir_text: str, dump_dir=None, name="graphc", keep_object=None, entry="entry"):
    """Compile `ir_text` for the host; returns (engine, address of `entry`).

    The optimization and code generation run in the compile server (server.py)
    when one can be used, else here; dumps (dump_dir) are always made here.
    keep_object: a cache key; the object code is then stored in the disk cache."""
    if not dump_dir:
        data = server.compile(ir_text)
        if data is not None:
            if keep_object is not None:
                from . import cache
                cache.store(keep_object, data)
            hit = objgen.load_object(data, entry)
            if hit is not None:
                return hit
    s = _target()
    ctx, mod = objgen.parse(ir_text)
    optimize_module(mod)
    if dump_dir:
        with open(os.path.join(dump_dir, f"{name}.opt.ll"), "w") as f:
            f.write(str(mod))
        with open(os.path.join(dump_dir, f"{name}.s"), "w") as f:
            f.write(s["tm"].emit_assembly(mod))
    engine, objects = objgen.codegen(mod)
    if keep_object is not None and objects:
        from . import cache
        cache.store(keep_object, objects[0])
    if len(objects) == 1:
        # The engine keeps the optimized module (tens of MB of IR for a training step)
        # for as long as it lives: swap it for an engine holding only the machine code,
        # and hand the compiler's freed heap back to the OS.
        lean = objgen.load_object(objects[0], entry)
        if lean is not None:
            engine.close()
            del engine, mod, ctx
            release_heap()
            return lean
    return engine, engine.get_function_address(entry)


def release_heap():
    """Return free heap pages to the OS (glibc's malloc_trim); a no-op elsewhere."""
    try:
        libc = _libc.get("libc")
        if libc is None:
            libc = _libc["libc"] = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _debug_bounds() -> bool:
    return os.environ.get("GRAPHC_DEBUG_BOUNDS", "") not in ("", "0")


# Environment variables in which MPI launchers give the number of ranks on this node
# (MPICH/Hydra, Open MPI).
_LOCAL_RANKS_ENV = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def num_threads() -> int:
    """GRAPHC_NUM_THREADS, else the CPUs this process may use, shared out among the MPI
    ranks on this node when a launcher says how many there are (`mpiexec -n 2` on 2
    CPUs: one thread per rank, not two ranks of two threads spinning at barriers on
    the same CPUs)."""
    v = os.environ.get("GRAPHC_NUM_THREADS")
    if v:
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"GRAPHC_NUM_THREADS must be an integer >= 1, got {v!r}")
        return n
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cpus = os.cpu_count() or 1
    for var in _LOCAL_RANKS_ENV:
        try:
            ranks = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if ranks > 1:
            return max(1, cpus // ranks)
    return cpus


# Table layout after the external buffers: arena base, error record, barrier state,
# profile counters.
N_EXTRA = 4


class Runner:
    """Calls the native entry; one instance per compiled (shape-specialized) graph.

    With nthreads > 1, the process's native worker pool (pool.py) runs
    `entry(table, tid)` on threads 1..nthreads-1 while the caller runs tid 0
    (ctypes drops the GIL); they meet at native barriers between kernels, so no
    thread needs the GIL per kernel or per call.
    """

    FRESH_OUTPUTS = True  # __call__ returns copies: outputs never alias parameters
    chunks_unchecked = None  # stress builds: shared kernels racecheck could not enumerate
    WRITES_UPDATES = True  # __call__(arrays, params) writes the trailing outputs into params

    def __init__(self, prog, engine, addr, n_inputs, offsets, arena_bytes, debug_bounds,
                 nthreads, out_nodes, profile=False, stress_schedule=False):
        self.prog = prog
        self.engine = engine   # keeps the code alive
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(addr)
        self._addr = addr
        self.n_inputs = n_inputs
        self.nthreads = nthreads
        self.arena = np.empty(max(arena_bytes, 64) + 64, dtype=np.uint8)
        base = self.arena.ctypes.data
        self._shift = (-base) % 64    # align the arena base to 64 bytes
        self.offsets = offsets
        ext = prog.externals
        self.table = np.zeros(len(ext) + N_EXTRA, dtype=np.uint64)
        self.err = np.zeros(4, dtype=np.int64)
        self.barrier = np.zeros(32, dtype=np.int64)   # count and generation, 128 B apart
        # the stress schedule's per-call seed (barrier[stress.SEED], stress.py)
        self._stress_rng = np.random.default_rng() if stress_schedule else None
        self.prof = np.zeros(max(len(prog.kernels), 1), dtype=np.int64)
        self.table[len(ext):] = [base + self._shift, self.err.ctypes.data,
                                 self.barrier.ctypes.data, self.prof.ctypes.data]
        self.debug_bounds = debug_bounds
        self.profiling = profile
        self.calls = 0
        self._out_nodes = out_nodes
        self._out_shapes = [tuple(int(d) for d in node.shape) for node in out_nodes]
        self._bound = {}
        self._table_addr = self.table.ctypes.data
        self._lock = threading.Lock()   # the arena is shared state: one call at a time
        self.kernel_names = [f"k{i}_{k.name}" for i, k in enumerate(prog.kernels)]
        self._prepare()
        if nthreads > 1:
            pool.get(nthreads)      # start the workers now, not in the first call

    def _call(self):
        """One run of the entry on every thread, then the index checks' verdict."""
        if self._stress_rng is not None:
            self.barrier[stress.SEED] = self._stress_rng.integers(1 << 62)
        rec = self._check_rec
        if rec is not None:
            np.copyto(rec, self._check_init)
        if self.nthreads > 1:
            pool.get(self.nthreads).run(self._addr, self._table_addr, self.nthreads)
        else:
            self._fn(self._table_addr, 0)
        if rec is not None:
            err = first_error(self.prog.checks, rec)
            if err is not None:
                raise err

    def _view(self, buf):
        off = self.offsets[id(buf)] + self._shift
        n = buf.size * buf.dtype.itemsize
        return self.arena[off:off + n].view(buf.dtype)

    def _prepare(self):
        """Per-call tables, built once: which table slot each input fills, the external
        arrays behind parameters/constants, the index checks' records, and where each
        output is read from (a fixed view of the arena, or an external array)."""
        prog = self.prog
        self._check_rec = None
        self._in_slots = []                      # (slot, buffer, input position)
        self._state_slots = []                   # (slot, buffer, kind, node or array)
        slot_of = {}
        for slot, (buf, (kind, what)) in enumerate(prog.externals):
            slot_of[id(buf)] = slot
            if kind == "input":
                self._in_slots.append((slot, buf, what))
            elif kind == "check":
                # the index checks' records (kernel/checks.py): ours, reset every call
                self._check_rec = initial_record(buf.size)
                self._check_init = self._check_rec.copy()
                self.table[slot] = self._check_rec.ctypes.data
            else:
                self._state_slots.append((slot, buf, kind, what))
        self._slot_of = slot_of
        self._out_src = []                       # (slot or None, arena view or None, shape)
        for buf, shape in zip(prog.outputs, self._out_shapes):
            if id(buf) in slot_of:
                self._out_src.append((slot_of[id(buf)], None, shape))
            else:
                self._out_src.append((None, self._view(buf).reshape(shape), shape))

    def kernels(self) -> list:
        """(name, FLOPs) of every kernel, in the order the entry runs them."""
        return [(n, k.flops) for n, k in zip(self.kernel_names, self.prog.kernels)]

    def profile(self) -> list:
        """(name, FLOPs, seconds per call) per kernel; needs GRAPHC_PROFILE=1 at compile."""
        if not self.profiling:
            raise GraphcError("compile with GRAPHC_PROFILE=1 to collect kernel times")
        scale = 1.0 / _cycles_per_second() / max(self.calls, 1)
        return [(n, f, int(c) * scale) for (n, f), c in zip(self.kernels(), self.prof)]

    def _bind_external(self, slot, buf, kind, a):
        """Check one external array and put its address in the table; returns the array."""
        a = np.asarray(a)
        if a.dtype != buf.dtype or a.size != buf.size:
            raise GraphcError(f"{kind} buffer {buf.name}: expected {buf.size} elements of "
                              f"{buf.dtype}, got {a.dtype}{a.shape}")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        self.table[slot] = a.ctypes.data if a.size else self.arena.ctypes.data
        return a

    def _bind_states(self, cur):
        """Bind parameters and constants into `cur` {slot: array}.  Parameters may be
        replaced between calls: re-check only when the array object changed (set_value
        and in-place updates keep it)."""
        bound = self._bound          # slot -> the array whose address the table holds
        for slot, buf, kind, what in self._state_slots:
            a = what if kind == "array" else what.value
            if bound.get(slot) is not a:
                orig = a
                a = self._bind_external(slot, buf, kind, a)
                bound[slot] = a if a is orig else None
            cur[slot] = a

    def _bind_all(self, arrays):
        """Validate and bind every external array; returns {slot: array}."""
        if len(arrays) != self.n_inputs:
            raise GraphcError(f"expected {self.n_inputs} inputs, got {len(arrays)}")
        cur = {}
        for slot, buf, pos in self._in_slots:
            cur[slot] = self._bind_external(slot, buf, "input", arrays[pos])
        self._bind_states(cur)
        return cur

    def _run(self):
        if self.debug_bounds:
            self.err[:] = 0
        self._call()
        self.calls += 1
        if self.debug_bounds and self.err[0]:
            k, i, n = (int(v) for v in self.err[1:])
            node = self.prog.kernel_nodes[k] if k < len(self.prog.kernel_nodes) else None
            where_ = f" ({node.op.name} built at {node.loc})" if node is not None else ""
            raise GraphcError(f"bounds check failed in kernel {self.kernel_names[k]}{where_}: "
                              f"index {i} outside a buffer of {n} elements")

    def __call__(self, arrays, updates=None):
        """Run the graph on `arrays`; returns fresh copies of every output.

        updates: optional list of Parameters for the last len(updates) outputs; those
        results are then copied straight into the parameters' arrays (after the whole
        graph has run, so every reader saw the old values) instead of being returned;
        only the other outputs are returned."""
        with self._lock:
            # Fast path (streaming steps: many calls on small arrays): inputs of at most
            # 4096 elements are copied into staging arrays the table points to for
            # good (a copy is cheaper than reading a fresh array's address), parameters
            # whose array object is unchanged are not re-checked.
            fast = self.__dict__.get("_fast")
            if fast is None:
                fast = self._fast = []
                ok = not self.debug_bounds and len(self._in_slots) == self.n_inputs
                for slot, buf, pos in self._in_slots if ok else ():
                    if buf.size == 0 or buf.size > 4096:
                        ok = False
                        break
                    fast.append((slot, pos, buf.dtype, buf.size, np.empty(buf.size, buf.dtype),
                                 {}))
                if not ok or not fast:   # (no inputs: nothing to stage)
                    fast.clear()
                    fast.append(None)
                self._fast_live = False
            cur = None
            if fast[0] is not None and len(arrays) == self.n_inputs:
                cur = {}
                for slot, pos, dt, size, stage, shaped in fast:
                    a = arrays[pos]
                    if type(a) is not np.ndarray or a.dtype != dt or a.size != size:
                        cur = None
                        break
                    v = shaped.get(a.shape)
                    if v is None:
                        v = shaped[a.shape] = stage.reshape(a.shape)
                    np.copyto(v, a)
                    cur[slot] = v
                if cur is not None:
                    if not self._fast_live:
                        for slot, pos, dt, size, stage, shaped in fast:
                            self.table[slot] = stage.ctypes.data
                        self._fast_live = True
                    self._bind_states(cur)
                    self._call()
                    self.calls += 1
            if cur is None:
                self._fast_live = False     # _bind_all points the input slots elsewhere
                cur = self._bind_all(arrays)
                self._run()
            srcs = self._out_src
            n_out = len(srcs) - (len(updates) if updates else 0)
            outs = [(cur[slot].reshape(shape) if view is None else view).copy()
                    for slot, view, shape in srcs[:n_out]]
            if updates:
                usrc = srcs[n_out:]
                if any(view is None for _, view, _ in usrc):
                    # An update reads an external array (a parameter, e.g. a swap): stage
                    # every new value before writing any parameter.
                    staged = [(cur[slot].reshape(shape) if view is None else view).copy()
                              for slot, view, shape in usrc]
                    for p, new in zip(updates, staged):
                        p.set_value(new)
                else:
                    # Arena views: the parameters live outside the arena, so writing one
                    # cannot change another's new value.
                    for p, (_, view, _) in zip(updates, usrc):
                        dst = p.value
                        if dst.dtype == view.dtype and dst.shape == view.shape:
                            np.copyto(dst, view)
                        else:      # a cast: the checked path
                            p.set_value(view)
            return outs


_cps = []


def _cycles_per_second():
    """Calibrate llvm.readcyclecounter (the TSC on x86) against perf_counter once."""
    if not _cps:
        import time
        mb = ModuleBuilder()
        fn = ir.Function(mb.module, ir.FunctionType(I64, []), name="cycles")
        b = ir.IRBuilder(fn.append_basic_block())
        rc = ir.Function(mb.module, ir.FunctionType(I64, []), name="llvm.readcyclecounter")
        b.ret(b.call(rc, []))
        eng, _ = jit(mb.ir_text(), entry="cycles")
        f = ctypes.CFUNCTYPE(ctypes.c_int64)(eng.get_function_address("cycles"))
        c0, t0 = f(), time.perf_counter()
        time.sleep(0.05)
        c1, t1 = f(), time.perf_counter()
        _cps.append((c1 - c0) / (t1 - t0))
        _cps.append(eng)
    return _cps[0]


# Inside a native time loop the threads are already running and spinning at
# barriers, so a kernel is worth sharing from far less work than at the top level
# (an LSTM step's gate kernels, 32 x 256 elements: LSTM fwd+bwd 44.4 -> 40.4 ms).
LOOP_MIN_WORK = 1 << 13


def compile_program(prog, graph):
    from . import cache
    dump = os.environ.get("GRAPHC_DUMP_LLVM")
    debug = _debug_bounds()
    profile = os.environ.get("GRAPHC_PROFILE", "") not in ("", "0")
    nthreads = 1 if debug else num_threads()
    from ...kernel.ir import is_spmd
    if nthreads > 1 and not any(is_spmd(k) for k in prog.kernels):
        nthreads = 1      # nothing worth sharing: no worker threads, no barriers
    shuffle = nthreads > 1 and stress.mode() == "shuffle"
    offsets, arena_bytes = plan_arena(prog, nthreads)
    n_ext = len(prog.externals)
    slot_of = {id(b): k for k, (b, _) in enumerate(prog.externals)}
    if getattr(prog, "loops", None):   # native loops: view buffers move with t (loops.py)
        from .loops import loop_calls
        calls = loop_calls(prog, slot_of, offsets, n_ext)
    else:
        calls = [[(slot_of[id(b)], 0) if id(b) in slot_of else (n_ext, offsets[id(b)])
                  for b in kern.buffers] for kern in prog.kernels]
    key = None
    if not (dump or debug):
        key = cache.key(prog, calls, nthreads, profile, _target())
        if key is not None and shuffle:     # other code: never under the normal key
            import hashlib
            key = hashlib.sha256((key + "/stress-shuffle").encode()).hexdigest()
        hit = cache.load(key)
        if hit is not None:
            engine, addr = hit
            return Runner(prog, engine, addr, len(graph.inputs), offsets, arena_bytes, debug,
                          nthreads, list(graph.outputs), profile, shuffle)
    if not dump:
        server.prestart()      # its start-up overlaps with building the IR below
    mb = ModuleBuilder(fn_attrs=fn_attrs(), debug_bounds=debug, nthreads=nthreads)
    if shuffle:
        mb.stress = stress.Stress(mb.module, nthreads, "x86" in _target()["triple"])
    fns, spmd, shared = [], [], {}
    in_loop = {k for r in getattr(prog, "loops", None) or () for k in range(r.start, r.end)}
    for k, kern in enumerate(prog.kernels):
        # Structurally identical kernels (same loops and shapes over other buffers)
        # share one function: less IR to optimize.
        sk = None if debug else _structure_key(kern)
        if sk not in shared or sk is None:
            shared[sk] = mb.kernel(kern, k)
        fns.append(shared[sk])
        spmd.append(nthreads > 1 and is_spmd(kern, LOOP_MIN_WORK if k in in_loop else 1 << 18))
    if getattr(prog, "loops", None):
        from .loops import loop_entry
        loop_entry(mb, fns, calls, spmd, n_ext, nthreads, profile, prog)
    else:
        ranges = _access_ranges(prog, calls, n_ext, nthreads)
        _entry(mb, fns, calls, spmd, n_ext, nthreads, profile, ranges)
        if nthreads > 1:
            check_phases(prog, mb, fns, spmd, nthreads, ranges)
    unchecked = check_chunks(prog, mb, fns, spmd, nthreads) if shuffle else None
    text = mb.ir_text()
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, "graphc.kernels.txt"), "w") as f:
            f.write(prog.format())
        with open(os.path.join(dump, "graphc.ll"), "w") as f:
            f.write(text)
    engine, addr = jit(text, dump, keep_object=key)
    # llvmlite's IR objects form reference cycles: free them (and the heap they used)
    # now rather than at some later collection, so they do not add to the caller's peak.
    del mb, text, fns, shared
    import gc as _pygc
    _pygc.collect()
    release_heap()
    runner = Runner(prog, engine, addr, len(graph.inputs), offsets, arena_bytes, debug,
                    nthreads, list(graph.outputs), profile, shuffle)
    runner.chunks_unchecked = unchecked
    return runner


def _structure_key(kern) -> str:
    import re
    names = {b.name: f"P{i}" for i, b in enumerate(kern.buffers)}
    text = kern.format()
    text = re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b",
                  lambda m: names[m.group(1)], text) if names else text
    return text.split("\n", 1)[-1] + repr([(b.dtype.str, b.size, b.scope) for b in kern.buffers])


def _declare(module, name, fnty):
    """The module's function `name`, declared on first use (the stress helpers use the
    same intrinsics)."""
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, fnty, name=name)


def _barrier_fn(mb):
    """A sense-reversing barrier over int64 state[0] (arrivals) and state[16] (generation).

    Spins with `pause`, then yields the CPU (sched_yield) when the wait is long, so an
    oversubscribed machine still makes progress.
    """
    fn = ir.Function(mb.module, ir.FunctionType(ir.VoidType(), [PTR, I64]), name="graphc_barrier")
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    state, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    gen_ptr = b.gep(state, [ir.Constant(I64, 16)], source_etype=I64)
    gen = b.load_atomic(gen_ptr, "acquire", 8, typ=I64)
    old = b.atomic_rmw("add", state, ir.Constant(I64, 1), "acq_rel")
    last = b.icmp_signed("==", old, b.sub(n, ir.Constant(I64, 1)))
    release = fn.append_basic_block("release")
    wait = fn.append_basic_block("wait")
    done = fn.append_basic_block("done")
    b.cbranch(last, release, wait)
    b.position_at_end(release)
    b.atomic_rmw("xchg", state, ir.Constant(I64, 0), "monotonic")
    b.atomic_rmw("xchg", gen_ptr, b.add(gen, ir.Constant(I64, 1)), "release")
    b.branch(done)
    b.position_at_end(wait)
    spins = b.phi(I64)
    spins.add_incoming(ir.Constant(I64, 0), fn.blocks[0])
    cur = b.load_atomic(gen_ptr, "acquire", 8, typ=I64)
    again = b.icmp_signed("==", cur, gen)
    body = fn.append_basic_block("spin")
    b.cbranch(again, body, done)
    b.position_at_end(body)
    pause = _declare(mb.module, "llvm.x86.sse2.pause", ir.FunctionType(ir.VoidType(), [])) \
        if "x86" in _target()["triple"] else None
    if pause is not None:
        b.call(pause, [])
    many = b.icmp_signed(">", spins, ir.Constant(I64, 2000))
    with b.if_then(many):
        yld = _declare(mb.module, "sched_yield", ir.FunctionType(ir.IntType(32), []))
        b.call(yld, [])
    spins.add_incoming(b.add(spins, ir.Constant(I64, 1)), b.block)
    b.branch(wait)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _access_ranges(prog, calls, n_ext, nthreads):
    """Per kernel, (reads, writes): lists of (slot, lo, hi) byte ranges it may touch.
    Arena buffers are their planned ranges (every thread's copy of a thread-scoped
    one); external buffers all count as one range."""
    from ...kernel import ir as K
    from ...kernel.ir import Gemm, Load, Store
    out = []
    for kern, args in zip(prog.kernels, calls):
        where = {}
        for buf, (slot, off) in zip(kern.buffers, args):
            n = buf.size * buf.dtype.itemsize * (nthreads if buf.scope == "thread" else 1)
            # (external arrays may alias one another: one range for all of them, except
            # the index checks' records, which the runner owns)
            where[id(buf)] = ((slot, off, off + n) if slot == n_ext else
                              (slot, 0, n) if buf is prog.check_buf else (-1, 0, 1 << 62))
        reads, writes = set(), set()

        def walk(node):
            if isinstance(node, list):
                for x in node:
                    walk(x)
            elif isinstance(node, Gemm):
                reads.update((id(node.a[0]), id(node.b[0])))
                writes.add(id(node.c[0]))
                if node.accumulate:
                    reads.add(id(node.c[0]))
                for op in (node.a, node.b, node.c):
                    walk(op[1])
            elif isinstance(node, Load):
                reads.add(id(node.buf))
                walk(node.index)
            elif isinstance(node, Store):
                writes.add(id(node.buf))
                walk(node.index)
                walk(node.value)
            elif isinstance(node, K.Loop):
                walk(node.body)
            elif isinstance(node, K.If):
                walk(node.cond)
                walk(node.body)
            elif isinstance(node, K.Assign):
                walk(node.value)
            elif isinstance(node, (K.BinOp, K.Select, K.UnOp, K.Cast)):
                for name in ("a", "b", "cond"):
                    if hasattr(node, name):
                        walk(getattr(node, name))
            elif not isinstance(node, (K.Const, K.Var, K.Local)):
                raise _Unknown
        try:
            walk(kern.body)
        except _Unknown:              # a statement this does not know: touches everything
            reads, writes = set(), {id(b) for b in kern.buffers}
        writes.update(id(b) for b in kern.buffers if id(b) not in reads | writes)
        out.append(([where[i] for i in reads if i in where],
                    [where[i] for i in writes if i in where]))
    return out


def check_phases(prog, mb, fns, spmd, nthreads, ranges):
    """Refuse an entry in which two threads may touch the same bytes, one writing,
    between two barriers (racecheck.py): an internal error, never a wrong result."""
    from . import racecheck
    # the scratch each kernel's GEMMs use: (buffer, slice, thread stride), the stride
    # as finally emitted (it grows while sites are added)
    ws = {k: [(gv.name, size, st.initializer.constant)
              for gv, size, st in mb.gemm_sites.get(fn.name, ())]
          for k, fn in enumerate(fns)}
    names = {k: f"k{k}_{kern.name}" for k, kern in enumerate(prog.kernels)}
    before = set()
    for j, ks in enumerate(entry_parts(len(spmd))):
        before |= barrier_plan(ranges, spmd, ks) | ({ks.start} if j else set())
    found = racecheck.conflicts(racecheck.phases(before, len(spmd)),
                                spmd, nthreads, ranges, ws, names)
    if found:
        lines = [f"  {a} (thread {ta}) and {b} (thread {tb}) both touch {place} "
                 f"bytes/elements [{lo}, {hi})" for a, ta, b, tb, place, lo, hi in found[:5]]
        raise GraphcError("internal error: the multi-threaded schedule lets two threads "
                          "touch the same memory between barriers:\n" + "\n".join(lines))


def check_chunks(prog, mb, fns, spmd, nthreads):
    """Stress builds: refuse a shared kernel one of whose chunks writes what another
    chunk reads or writes (racecheck.chunk_conflicts); returns the indices of the
    shared kernels too large to enumerate (left unchecked)."""
    from . import racecheck
    done, unchecked = set(), []
    for k, (kern, fn, par) in enumerate(zip(prog.kernels, fns, spmd)):
        if not par or fn.name in done:
            continue          # (structurally identical kernels share one function)
        done.add(fn.name)
        found = racecheck.chunk_conflicts(kern, nthreads, mb.gemm_split)
        if found is None:
            unchecked.append(k)
        elif found:
            name, t, u, i = found[0]
            raise GraphcError(f"internal error: in the multi-threaded kernel k{k}_{kern.name} "
                              f"chunk {t} may write element {i} of {name}, which chunk {u} "
                              f"may also touch ({len(found)} such pairs; an index that "
                              f"depends on loaded data counts as the whole buffer)")
    return unchecked


class _Unknown(Exception):
    pass


def _overlap(xs, ys) -> bool:
    return any(sa == sb and la < hb and lb < ha for sa, la, ha in xs for sb, lb, hb in ys)


def entry_prologue(mb, n_ext, nthreads, profile, name="entry"):
    """Start `void entry(i8** table, i64 tid)`: load the table's slots, set up the
    barrier, the cycle counter (profiling) and the error flag.  Shared by the
    straight-line entry (_entry), its parts, and the one with native loops (loops.py)."""
    fnty = ir.FunctionType(ir.VoidType(), [PTR, I64])
    fn = ir.Function(mb.module, fnty, name=name)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    table, tid = fn.args
    slots = [b.load(b.gep(table, [ir.Constant(I64, s)], source_etype=PTR), typ=PTR)
             for s in range(n_ext + N_EXTRA)]
    err, bar, prof = slots[n_ext + 1], slots[n_ext + 2], slots[n_ext + 3]
    known = mb.module.globals
    barrier = (known.get("graphc_barrier") or _barrier_fn(mb)) if nthreads > 1 else None
    rc = (known.get("llvm.readcyclecounter")
          or ir.Function(mb.module, ir.FunctionType(I64, []), name="llvm.readcyclecounter")) \
        if profile else None
    if mb.error_fn is not None:
        b.store(err, mb.err_global)
    if mb.stress is not None:
        mb.stress.publish(b, bar)
    nt = ir.Constant(I64, nthreads)
    is_main = b.icmp_signed("==", tid, ir.Constant(I64, 0))
    return b, tid, slots, err, bar, prof, barrier, rc, nt, is_main


# Kernels per entry function.  The entry of a graph with thousands of kernels was
# one function with thousands of calls and branches, on which LLVM's SimplifyCFG
# gave up ("Iterative simplification didn't converge!": the compile server died on
# a 5k-node training step).  Above this many kernels the entry calls parts of at
# most this many kernels each, with a barrier between parts.
ENTRY_PART_KERNELS = 256


def entry_parts(n) -> list:
    """The kernel ranges of the entry's parts (one part up to ENTRY_PART_KERNELS)."""
    return [range(s, min(s + ENTRY_PART_KERNELS, n)) for s in range(0, n, ENTRY_PART_KERNELS)]


def barrier_plan(ranges, spmd, ks=None) -> set:
    """The kernels of `ks` (default: all) a barrier goes before: one that touches what a
    kernel since the last barrier wrote, or writes what one read (ranges:
    _access_ranges); a kernel all threads run is also ordered after thread 0's
    single-threaded ones.  The first of `ks` starts with nothing recorded (the entry
    puts a barrier between parts)."""
    before = set()
    # accesses since the last barrier: of kernels all threads ran, of thread 0's alone
    shared_r, shared_w, main_r, main_w = [], [], [], []
    for k in (range(len(spmd)) if ks is None else ks):
        par = spmd[k]
        r, w = ranges[k]
        need = (_overlap(w, shared_r + shared_w) or _overlap(r, shared_w)
                or (par and (_overlap(w, main_r + main_w) or _overlap(r, main_w))))
        if need:
            before.add(k)
            shared_r, shared_w, main_r, main_w = [], [], [], []
        if par:
            shared_r, shared_w = shared_r + r, shared_w + w
        else:
            main_r, main_w = main_r + r, main_w + w
    return before


def _entry(mb, fns, calls, spmd, n_ext, nthreads, profile, ranges=None):
    """The entry: every kernel in order (in parts of ENTRY_PART_KERNELS)."""
    n = len(fns)
    if n <= ENTRY_PART_KERNELS:
        _entry_part(mb, fns, calls, spmd, n_ext, nthreads, profile, ranges, range(n), "entry")
        return
    parts = []
    for j, ks in enumerate(entry_parts(n)):
        fn = _entry_part(mb, fns, calls, spmd, n_ext, nthreads, profile, ranges, ks,
                         f"entry_part{j}")
        fn.linkage = "internal"
        fn.attributes.add("noinline")   # inlined back, the entry would be one function again
        parts.append(fn)
    b, tid, slots, err, bar, prof, barrier, rc, nt, is_main = entry_prologue(
        mb, n_ext, nthreads, profile)
    table = b.function.args[0]
    for j, part in enumerate(parts):
        if j and nthreads > 1:
            # a part starts with no record of what the previous one touched
            b.call(barrier, [bar, nt])
        b.call(part, [table, tid])
        if mb.error_fn is not None:
            flag = b.load(err, typ=I64)
            with b.if_then(b.icmp_unsigned("!=", flag, ir.Constant(I64, 0)), likely=False):
                b.ret_void()
    b.ret_void()


def _entry_part(mb, fns, calls, spmd, n_ext, nthreads, profile, ranges, ks, name):
    """A function running kernels `ks` in order.  With several threads, a barrier goes
    only before a kernel that touches what a kernel since the last barrier wrote, or
    writes what one read (ranges: _access_ranges); independent kernels share an
    interval."""
    b, tid, slots, err, bar, prof, barrier, rc, nt, is_main = entry_prologue(
        mb, n_ext, nthreads, profile, name)
    dirty = False     # thread 0 ran single-threaded kernels since the last barrier
    before = barrier_plan(ranges, spmd, ks) if ranges is not None and nthreads > 1 else set()
    for k in ks:
        kfn, args, par = fns[k], calls[k], spmd[k]
        ptrs = [slots[s] if off == 0 and s != n_ext else
                b.gep(slots[s], [ir.Constant(I64, off)], source_etype=ir.IntType(8))
                for s, off in args]
        if ranges is not None and nthreads > 1:
            if k in before:
                b.call(barrier, [bar, nt])
            dirty = False
        elif par and dirty:
            b.call(barrier, [bar, nt])
            dirty = False
        if mb.stress is not None:
            mb.stress.delay(b, k, tid, 0)
        t0 = b.call(rc, []) if profile else None
        if par:
            b.call(kfn, ptrs + [tid, nt])
            if ranges is None:
                b.call(barrier, [bar, nt])
        else:
            with b.if_then(is_main):
                b.call(kfn, ptrs + [ir.Constant(I64, 0), ir.Constant(I64, 1)])
            dirty = True
        if profile:
            with b.if_then(is_main):
                slot = b.gep(prof, [ir.Constant(I64, k)], source_etype=I64)
                b.store(b.add(b.load(slot, typ=I64), b.sub(b.call(rc, []), t0)), slot)
        if mb.error_fn is not None:
            flag = b.load(err, typ=I64)
            with b.if_then(b.icmp_unsigned("!=", flag, ir.Constant(I64, 0)), likely=False):
                b.ret_void()
    b.ret_void()
    return b.function
