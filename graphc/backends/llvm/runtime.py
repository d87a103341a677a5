"""JIT compilation and the Python side of a compiled graph.

`compile_program(prog)` generates one LLVM module (every kernel plus
`entry(ptr table)`), optimizes it at O3 for the host CPU, JIT-compiles it with
MCJIT and returns a `Runner`.  The table holds one pointer per external buffer
(inputs, parameters, constants), then the arena base, then the error record.
Calling the runner validates every array, fills the table with current
pointers (parameters may have been replaced), and crosses into native code
once through ctypes, which releases the GIL for the call.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir

from ...ir.errors import GraphcError
from .codegen import I64, PTR, ModuleBuilder
from .layout import plan_arena

_init_lock = threading.Lock()
_state = {}


def _target():
    with _init_lock:
        if not _state:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            cpu = llvm.get_host_cpu_name()
            feats = llvm.get_host_cpu_features().flatten()
            target = llvm.Target.from_default_triple()
            tm = target.create_target_machine(cpu=cpu, features=feats, opt=3, jit=True)
            _state.update(layout=str(tm.target_data), target=target, cpu=cpu, features=feats, tm=tm, triple=llvm.get_process_triple(),
                          avx512="+avx512f" in feats.split(","), engines=[])
        return _state


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
    s = _target()
    # One pass builder per process (llvmlite's objects are not safe to re-create freely:
    # building a second one after the first was freed crashed here).
    with _init_lock:
        if "pb" not in s:
            pto = llvm.create_pipeline_tuning_options(speed_level=3)
            pto.loop_vectorization = True
            pto.slp_vectorization = True
            pto.loop_unrolling = True
            s["pto"] = pto
            s["pb"] = llvm.create_pass_builder(s["tm"], pto)
        pb = s["pb"]
        pm = pb.getModulePassManager()
        pm.run(mod, pb)


def jit(ir_text: str, dump_dir=None, name="graphc"):
    """Parse, optimize and JIT `ir_text`; returns (engine, address of entry)."""
    s = _target()
    mod = llvm.parse_assembly(ir_text)
    mod.triple = s["triple"]
    mod.data_layout = s["layout"]
    mod.verify()
    optimize_module(mod)
    if dump_dir:
        with open(os.path.join(dump_dir, f"{name}.opt.ll"), "w") as f:
            f.write(str(mod))
        with open(os.path.join(dump_dir, f"{name}.s"), "w") as f:
            f.write(s["tm"].emit_assembly(mod))
    # MCJIT takes ownership of its target machine (frees it with the engine): give each
    # engine its own.
    tm = s["target"].create_target_machine(cpu=s["cpu"], features=s["features"], opt=3,
                                           jit=True)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    return engine, engine.get_function_address("entry")


def _debug_bounds() -> bool:
    return os.environ.get("GRAPHC_DEBUG_BOUNDS", "") not in ("", "0")


class Runner:
    """Calls the native entry; one instance per compiled (shape-specialized) graph."""

    def __init__(self, prog, engine, addr, n_inputs, offsets, arena_bytes, debug_bounds):
        self.prog = prog
        self.engine = engine   # keeps the code alive
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)
        self.n_inputs = n_inputs
        self.arena = np.empty(max(arena_bytes, 64) + 64, dtype=np.uint8)
        base = self.arena.ctypes.data
        self._shift = (-base) % 64    # align the arena base to 64 bytes
        self.offsets = offsets
        ext = prog.externals
        self.table = np.zeros(len(ext) + 2, dtype=np.uint64)
        self.table[len(ext)] = base + self._shift
        self.err = np.zeros(4, dtype=np.int64)
        self.table[len(ext) + 1] = self.err.ctypes.data
        self.debug_bounds = debug_bounds
        self._lock = threading.Lock()   # the arena is shared state: one call at a time
        self.kernel_names = [f"k{i}_{k.name}" for i, k in enumerate(prog.kernels)]

    def _view(self, buf):
        src = self._where.get(id(buf))
        if src is not None:
            return src
        off = self.offsets[id(buf)] + self._shift
        n = buf.size * buf.dtype.itemsize
        return self.arena[off:off + n].view(buf.dtype)

    def __call__(self, arrays):
        prog = self.prog
        if len(arrays) != self.n_inputs:
            raise GraphcError(f"expected {self.n_inputs} inputs, got {len(arrays)}")
        with self._lock:
            self._where = {}
            keep = []
            for slot, (buf, src) in enumerate(prog.externals):
                kind, what = src
                a = (arrays[what] if kind == "input" else what if kind == "array"
                     else what.value)
                a = np.asarray(a)
                if a.dtype != buf.dtype or a.size != buf.size:
                    raise GraphcError(f"{kind} buffer {buf.name}: expected {buf.size} elements of "
                                      f"{buf.dtype}, got {a.dtype}{a.shape}")
                if not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                keep.append(a)
                self.table[slot] = a.ctypes.data if a.size else self.arena.ctypes.data
                self._where[id(buf)] = a.reshape(-1)
            self.err[:] = 0
            self._fn(self.table.ctypes.data)
            if self.err[0]:
                k, i, n = (int(v) for v in self.err[1:])
                node = prog.kernel_nodes[k] if k < len(prog.kernel_nodes) else None
                where = f" ({node.op.name} built at {node.loc})" if node is not None else ""
                raise GraphcError(f"bounds check failed in kernel {self.kernel_names[k]}{where}: "
                                  f"index {i} outside a buffer of {n} elements")
            outs = []
            for buf, node in zip(prog.outputs, self._out_nodes):
                outs.append(self._view(buf).copy().reshape(tuple(int(d) for d in node.shape)))
            return outs


def compile_program(prog, graph):
    dump = os.environ.get("GRAPHC_DUMP_LLVM")
    debug = _debug_bounds()
    offsets, arena_bytes = plan_arena(prog)
    mb = ModuleBuilder(fn_attrs=fn_attrs(), debug_bounds=debug)
    n_ext = len(prog.externals)
    slot_of = {id(b): k for k, (b, _) in enumerate(prog.externals)}
    fns, calls = [], []
    for k, kern in enumerate(prog.kernels):
        fns.append(mb.kernel(kern, k))
        calls.append([(slot_of[id(b)], 0) if id(b) in slot_of else (n_ext, offsets[id(b)])
                      for b in kern.buffers])
    _entry(mb, fns, calls, n_ext, debug)
    text = mb.ir_text()
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, "graphc.kernels.txt"), "w") as f:
            f.write(prog.format())
        with open(os.path.join(dump, "graphc.ll"), "w") as f:
            f.write(text)
    engine, addr = jit(text, dump)
    r = Runner(prog, engine, addr, len(graph.inputs), offsets, arena_bytes, debug)
    r._out_nodes = list(graph.outputs)
    return r


def _entry(mb, fns, calls, n_ext, debug):
    fnty = ir.FunctionType(ir.VoidType(), [PTR])
    fn = ir.Function(mb.module, fnty, name="entry")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    table = fn.args[0]
    slots = [b.load(b.gep(table, [ir.Constant(I64, s)], source_etype=PTR), typ=PTR)
             for s in range(n_ext + 2)]
    err = slots[n_ext + 1]
    if mb.error_fn is not None:
        b.store(err, mb.err_global)
    for kfn, args in zip(fns, calls):
        ptrs = [slots[s] if off == 0 and s != n_ext else
                b.gep(slots[s], [ir.Constant(I64, off)], source_etype=ir.IntType(8))
                for s, off in args]
        b.call(kfn, ptrs)
        if mb.error_fn is not None:
            flag = b.load(err, typ=I64)
            with b.if_then(b.icmp_unsigned("!=", flag, ir.Constant(I64, 0)), likely=False):
                b.ret_void()
    b.ret_void()
