"""Running a generated CUDA program: one `Runtime` interface, two implementations.

* `DriverRuntime` — a real GPU through the CUDA driver API
  (`cuda.bindings.driver`): primary context, cubin module, device buffers,
  `cuLaunchKernel`; every call's status is checked.
* `EmulatorRuntime` — the same generated source built for the CPU with the
  emulator header (gc_cuda_emu.h) and called through ctypes; "device" memory
  is host memory.

Both take kernel arguments the way `cuLaunchKernel` does: an array of
pointers, one per parameter, each pointing at the parameter's value.
`Runner` executes a `CudaProgram`'s plan on either.
"""
from __future__ import annotations

import ctypes
import os
import threading
from abc import ABC, abstractmethod

import numpy as np

from ...ir.errors import GraphcError
from ...kernel.checks import first_error, initial_record
from .codegen import HostLoop, TimeLoop
from .compiler import build_emulator, compile_cuda, load_library


class CudaRuntimeError(GraphcError):
    pass


class Runtime(ABC):
    @abstractmethod
    def load(self, cprog):
        """Compile/load the program's module; returns {kernel name: launchable handle}."""

    @abstractmethod
    def alloc(self, nbytes) -> int: ...

    def free(self, dptr):
        pass

    def activate(self):
        """Make this runtime usable from the calling thread (the driver's context)."""

    @abstractmethod
    def copy_htod(self, dptr, array): ...

    @abstractmethod
    def copy_dtoh(self, array, dptr): ...

    @abstractmethod
    def copy_dtod(self, dst, src, nbytes): ...

    @abstractmethod
    def launch(self, kernel, grid, block, args): ...

    def synchronize(self):
        pass


def _argv(args):
    """cuLaunchKernel-style parameter array (and the objects it points into)."""
    arr = (ctypes.c_void_p * max(len(args), 1))(*[ctypes.addressof(a) for a in args])
    return arr


# ------------------------------------------------------------------ emulator
def emulator_stubs(launches) -> str:
    """C++ entry points `gc_launch_<kernel>(grid, block, args)` for the emulator."""
    from .cexpr import ctype
    out = ["", "// ---- emulator launch stubs (not part of the CUDA source) ----"]
    for la in launches:
        casts = []
        for k, (kind, obj) in enumerate(la.params):
            if kind == "buf":
                casts.append(f"*({ctype(obj.dtype)}**)a[{k}]")
            else:
                casts.append(f"*(long long*)a[{k}]")
        out.append(f"static void gc_thread_{la.name}(void** a) {{ {la.name}({', '.join(casts)}); }}")
        out.append(f'extern "C" int gc_launch_{la.name}(const unsigned* g, const unsigned* b, '
                   f"void** a) {{ return gc_emu_launch(gc_thread_{la.name}, g, b, a, "
                   f"{int(la.sync)}); }}")
    return "\n".join(out) + "\n"


_EMU_LOCK = threading.Lock()   # the emulator's CUDA built-ins are process-wide state


class EmulatorRuntime(Runtime):
    name = "emulator"

    def __init__(self):
        self._mem = {}
        self.arch = "emulated"

    def load(self, cprog):
        stubs = emulator_stubs(cprog.launches)
        # The library's bytes (a cache entry only if it verified: compiler.py), loaded
        # from a private copy, so what runs is exactly what was verified.
        try:
            lib = load_library(build_emulator(cprog.source, stubs))
        except OSError:            # an entry that verifies but does not load: rebuild it
            lib = load_library(build_emulator(cprog.source, stubs, reuse=False))
        self._lib = lib   # keep loaded
        fns = {}
        for la in cprog.launches:
            f = getattr(lib, f"gc_launch_{la.name}")
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fns[la.name] = f
        return fns

    def alloc(self, nbytes):
        a = np.zeros(max(int(nbytes), 1) + 64, dtype=np.uint8)
        ptr = a.ctypes.data + (-a.ctypes.data) % 64
        self._mem[ptr] = a
        return ptr

    def free(self, dptr):
        self._mem.pop(dptr, None)

    def copy_htod(self, dptr, array):
        ctypes.memmove(dptr, array.ctypes.data, array.nbytes)

    def copy_dtoh(self, array, dptr):
        ctypes.memmove(array.ctypes.data, dptr, array.nbytes)

    def copy_dtod(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def launch(self, kernel, grid, block, args):
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        argv = _argv(args)
        with _EMU_LOCK:
            rc = kernel(ctypes.addressof(g), ctypes.addressof(b), ctypes.addressof(argv))
        if rc == -2:
            raise CudaRuntimeError("emulated launch failed: no memory for thread stacks")
        if rc != 0:
            raise CudaRuntimeError(f"emulated launch failed ({rc}): threads of a block "
                                   "disagreed about __syncthreads")


# ------------------------------------------------------------------ real GPU
def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


def gpu_available() -> tuple:
    """(True, description) if a CUDA device and driver are usable, else (False, why)."""
    cu = _driver()
    if cu is None:
        return False, "cuda-bindings is not installed (pip install 'graphc[cuda]')"
    try:
        (err,) = cu.cuInit(0)
    except Exception as e:   # libcuda.so missing
        return False, f"no CUDA driver ({e})"
    if int(err) != 0:
        return False, f"cuInit failed: {err!r} (no GPU or no driver)"
    err, n = cu.cuDeviceGetCount()
    if int(err) != 0 or n == 0:
        return False, "no CUDA device"
    return True, f"{n} CUDA device(s)"


class DriverRuntime(Runtime):
    name = "driver"

    def __init__(self, device=0, arch=None):
        cu = _driver()
        if cu is None:
            raise CudaRuntimeError("cuda-bindings is not installed")
        self.cu = cu
        self._check(cu.cuInit(0), "cuInit")
        self.dev = self._check(cu.cuDeviceGet(device), "cuDeviceGet")
        self.ctx = self._check(cu.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._check(cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        if arch is None:
            A = cu.CUdevice_attribute
            ma = self._check(cu.cuDeviceGetAttribute(
                A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "cuDeviceGetAttribute")
            mi = self._check(cu.cuDeviceGetAttribute(
                A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "cuDeviceGetAttribute")
            arch = f"sm_{ma}{mi}"
        self.arch = arch
        self._allocs = {}
        self._modules = []

    def _check(self, result, what):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, name = self.cu.cuGetErrorName(err)
            raise CudaRuntimeError(f"{what} failed: {name.decode() if name else err}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def activate(self):
        self._check(self.cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def load(self, cprog):
        comp = compile_cuda(cprog.source, self.arch)
        self.activate()
        module = self._check(self.cu.cuModuleLoadData(comp.cubin), "cuModuleLoadData")
        self._modules.append(module)
        return {la.name: self._check(self.cu.cuModuleGetFunction(module, la.name.encode()),
                                     f"cuModuleGetFunction({la.name})")
                for la in cprog.launches}

    def alloc(self, nbytes):
        p = self._check(self.cu.cuMemAlloc(max(int(nbytes), 1)), "cuMemAlloc")
        self._allocs[int(p)] = p
        return int(p)

    def free(self, dptr):
        p = self._allocs.pop(dptr, None)
        if p is not None:
            self._check(self.cu.cuMemFree(p), "cuMemFree")

    def copy_htod(self, dptr, array):
        self._check(self.cu.cuMemcpyHtoD(dptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def copy_dtoh(self, array, dptr):
        self._check(self.cu.cuMemcpyDtoH(array.ctypes.data, dptr, array.nbytes), "cuMemcpyDtoH")

    def copy_dtod(self, dst, src, nbytes):
        self._check(self.cu.cuMemcpyDtoD(dst, src, nbytes), "cuMemcpyDtoD")

    def launch(self, kernel, grid, block, args):
        argv = _argv(args)
        self._check(self.cu.cuLaunchKernel(kernel, *grid, *block, 0, 0, ctypes.addressof(argv), 0),
                    "cuLaunchKernel")

    def synchronize(self):
        self._check(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")

    def __del__(self):
        cu = getattr(self, "cu", None)
        if cu is None:
            return
        try:
            for p in self._allocs.values():
                cu.cuMemFree(p)
            for m in self._modules:
                cu.cuModuleUnload(m)
            cu.cuDevicePrimaryCtxRelease(self.dev)
        except Exception:
            pass


# ------------------------------------------------------------------ arena
def plan_arena(prog, align=256):
    """{id(buffer): byte offset} for temporaries from kernel lifetimes, and the size."""
    first, last = {}, {}
    for k, kern in enumerate(prog.kernels):
        for b in kern.buffers:
            first.setdefault(id(b), k)
            last[id(b)] = k
    for b in prog.outputs:
        last[id(b)] = len(prog.kernels)
    temps = sorted((b for b in prog.temps if id(b) in first),
                   key=lambda b: -b.size * b.dtype.itemsize)
    placed, offsets, top = [], {}, 0
    for b in temps:
        n = -(-b.size * b.dtype.itemsize // align) * align
        lo, hi = first[id(b)], last[id(b)]
        busy = sorted((o, m) for o, m, f, l in placed if not (l < lo or f > hi))
        off = 0
        for o, m in busy:
            if o - off >= n:
                break
            off = max(off, o + m)
        placed.append((off, n, lo, hi))
        offsets[id(b)] = off
        top = max(top, off + n)
    return offsets, top


# ------------------------------------------------------------------ runner
class Runner:
    """A compiled graph on a runtime: device buffers persist across calls."""

    def __init__(self, cprog, graph, runtime: Runtime):
        self.cprog, self.rt = cprog, runtime
        prog = cprog.prog
        self.prog = prog
        self.views = dict(getattr(prog, "views", {}) or {})
        self._owned = []
        self.fns = runtime.load(cprog)
        self.n_inputs = len(graph.inputs)
        self.out_shapes = [tuple(int(d) for d in o.shape) for o in graph.outputs]
        plan = getattr(graph, "memory_plan", None)
        self.n_updates = getattr(plan, "n_updates", 0) or 0
        offsets, size = plan_arena(prog)
        self.arena = self._alloc(size)
        self.ptr = {id(b): self.arena + off for b in prog.temps if id(b) in offsets
                    for off in [offsets[id(b)]]}
        self.shadow = {}
        for b, src in prog.externals:
            self.ptr[id(b)] = self._alloc(b.size * b.dtype.itemsize)
            if src[0] == "array":
                self._upload(b, np.asarray(src[1]))
            elif src[0] == "const":
                self._upload(b, np.asarray(src[1].value))
        if prog.check_buf is not None:
            self._check_init = initial_record(prog.check_buf.size)
        for b in getattr(cprog, "extra_buffers", []):   # privatized scratch
            self.ptr[id(b)] = self._alloc(b.size * b.dtype.itemsize)
        for b in prog.temps:   # temporaries no kernel touches (never read) still need storage
            self.ptr.setdefault(id(b), self.arena)
        self._last_outputs = []
        self._lock = threading.Lock()
        self.uploads = 0   # parameter uploads host -> device (for tests and profiles)

    def _alloc(self, nbytes):
        p = self.rt.alloc(nbytes)
        self._owned.append(p)
        return p

    def __del__(self):
        rt = getattr(self, "rt", None)
        for p in getattr(self, "_owned", ()):
            try:
                rt.free(p)
            except Exception:   # interpreter shutdown, context gone
                pass

    def _upload(self, buf, a):
        a = np.ascontiguousarray(a, dtype=buf.dtype).reshape(-1)
        if a.size != buf.size:
            raise GraphcError(f"buffer {buf.name}: expected {buf.size} elements, got {a.size}")
        if a.size:
            self.rt.copy_htod(self.ptr[id(buf)], a)

    def _sync_param(self, buf, value):
        """Keep the device copy of a parameter equal to its host value, moving data
        only when it changed (and on the device when an update output holds it)."""
        a = np.ascontiguousarray(value, dtype=buf.dtype).reshape(-1)
        old = self.shadow.get(id(buf))
        raw = a.view(np.uint8)
        if old is not None and np.array_equal(old, raw):
            return
        for ob, host in self._last_outputs:
            if host.dtype == a.dtype and host.size == a.size and \
                    np.array_equal(host.reshape(-1).view(np.uint8), raw):
                self.rt.copy_dtod(self.ptr[id(buf)], self.ptr[id(ob)], a.nbytes)
                self.shadow[id(buf)] = raw.copy()
                return
        self._upload(buf, a)
        self.uploads += 1
        self.shadow[id(buf)] = raw.copy()

    def _buf_ptr(self, buf, env):
        """Device address of a buffer; a view (inside a time loop) moves with t."""
        v = self.views.get(id(buf))
        if v is None:
            return self.ptr[id(buf)]
        t = env[("loop", v.loop.index)]
        return self._buf_ptr(v.parent, env) + (v.base + t * v.step) * buf.dtype.itemsize

    def _run(self, steps, env):
        for st in steps:
            if isinstance(st, HostLoop):
                for v in range(st.extent):
                    env[id(st.var)] = v
                    self._run(st.steps, env)
                continue
            if isinstance(st, TimeLoop):
                r = st.region
                for t in (range(r.length - 1, -1, -1) if r.reverse else range(r.length)):
                    env[("loop", r.index)] = t
                    self._run(st.steps, env)
                continue
            if 0 in st.grid:
                continue          # an empty tensor: nothing to launch (CUDA rejects grid 0)
            args = [ctypes.c_void_p(self._buf_ptr(obj, env)) if kind == "buf"
                    else ctypes.c_longlong(env[id(obj)]) for kind, obj in st.params]
            self.rt.launch(self.fns[st.name], st.grid, st.block, args)

    def _reset_checks(self):
        """Empty the index checks' records (kernel/checks.py) before the launches."""
        buf = self.prog.check_buf
        if buf is not None:
            self._upload(buf, self._check_init)

    def _raise_check_errors(self):
        """After the launches: a bad index (fed or computed) that a check kernel recorded
        raises the reference's error (the kernels clamped it: nothing out of bounds)."""
        buf = self.prog.check_buf
        if buf is not None:
            rec = np.empty(buf.size, dtype=buf.dtype)
            self.rt.copy_dtoh(rec, self.ptr[id(buf)])
            err = first_error(self.prog.checks, rec)
            if err is not None:
                raise err

    def launch_all(self):
        """Launch every kernel on the data already on the device, then synchronize
        (device-side timing; no transfers)."""
        with self._lock:
            self.rt.activate()
            self._run(self.cprog.steps, {})
            self.rt.synchronize()

    def __call__(self, arrays):
        if len(arrays) != self.n_inputs:
            raise GraphcError(f"expected {self.n_inputs} inputs, got {len(arrays)}")
        with self._lock:
            self.rt.activate()
            for b, src in self.prog.externals:
                kind, what = src
                if kind == "input":
                    a = np.asarray(arrays[what])
                    if a.dtype != b.dtype or a.size != b.size:
                        raise GraphcError(f"input buffer {b.name}: expected {b.size} elements "
                                          f"of {b.dtype}, got {a.dtype}{a.shape}")
                    self._upload(b, a)
                elif kind == "param":
                    self._sync_param(b, what.value)
            self._reset_checks()
            self._run(self.cprog.steps, {})
            self.rt.synchronize()
            self._raise_check_errors()
            outs = []
            for b, shape in zip(self.prog.outputs, self.out_shapes):
                h = np.empty(b.size, dtype=b.dtype)
                self.rt.copy_dtoh(h, self.ptr[id(b)])
                n = int(np.prod(shape)) if shape else 1
                outs.append(h[:n].reshape(shape))
            first_update = len(outs) - self.n_updates if self.n_updates else 0
            self._last_outputs = [(b, h.copy()) for b, h in
                                  list(zip(self.prog.outputs, outs))[first_update:]]
            return outs
