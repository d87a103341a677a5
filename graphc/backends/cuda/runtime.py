"""Running a generated CUDA program: one `Runtime` interface, two implementations.

* `DriverRuntime` — a real GPU through the CUDA driver API
  (`cuda.bindings.driver`): primary context, cubin module, device buffers,
  streams, page-locked host memory, asynchronous copies, `cuLaunchKernel`,
  stream capture into CUDA graphs and `cuGraphLaunch`; every call's status is
  checked.
* `EmulatorRuntime` — the same generated source built for the CPU with the
  emulator header (gc_cuda_emu.h) and called through ctypes; "device" memory
  is host memory.

Both take kernel arguments the way `cuLaunchKernel` does: an array of
pointers, one per parameter, each pointing at the parameter's value.
`Runner` executes a `CudaProgram`'s plan on either: after the first call,
one CUDA graph launch per call where the runtime has graphs (docs/cuda.md,
"Calls: pinned staging and CUDA graphs").
"""
from __future__ import annotations

import atexit
import ctypes
import os
import threading
from abc import ABC, abstractmethod

import numpy as np

from ...ir.errors import GraphcError
from ...kernel.checks import first_error, initial_record
from .codegen import HostLoop, TimeLoop
from .compiler import build_emulator, compile_cuda, load_library
from .hostcopy import copy_jobs, differ_jobs


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
    def launch(self, kernel, grid, block, args, stream=None): ...

    def synchronize(self):
        pass

    # Streams, page-locked host memory, asynchronous copies and CUDA graphs.  The
    # defaults suit a runtime whose "device" is host memory and whose work runs
    # when it is issued (the emulator): a stream is None, copies are immediate.
    graphs = False          # can capture a stream into a CUDA graph and replay it

    def create_stream(self):
        return None

    def destroy_stream(self, stream):
        pass

    def host_alloc(self, nbytes) -> np.ndarray:
        """A host staging buffer (uint8 array of nbytes), page-locked where that exists."""
        return np.empty(max(int(nbytes), 1), dtype=np.uint8)

    def host_free(self, array):
        pass

    def copy_htod_async(self, dptr, hptr, nbytes, stream):
        ctypes.memmove(dptr, hptr, nbytes)

    def copy_dtoh_async(self, hptr, dptr, nbytes, stream):
        ctypes.memmove(hptr, dptr, nbytes)

    def copy_dtod_async(self, dst, src, nbytes, stream):
        ctypes.memmove(dst, src, nbytes)

    def stream_synchronize(self, stream):
        self.synchronize()

    def context_error(self):
        """The name of a sticky error that left the context unusable, else None."""
        return None

    def capture_begin(self, stream):
        raise CudaRuntimeError(f"the {self.name} runtime cannot capture CUDA graphs")

    def capture_end(self, stream):
        """End the capture; returns the instantiated executable graph."""
        raise CudaRuntimeError(f"the {self.name} runtime cannot capture CUDA graphs")

    def capture_abort(self, stream):
        pass

    def graph_launch(self, graph_exec, stream):
        raise CudaRuntimeError(f"the {self.name} runtime cannot launch CUDA graphs")

    def graph_free(self, graph_exec):
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


# At interpreter exit the objects holding driver resources are collected in no
# particular order: a Runner's graph or stream destroyed after its DriverRuntime
# released the context crashed the process in the driver (seen on an H200: the
# sanitizer workload finished, then SIGSEGV at exit).  The process is ending and
# the driver reclaims everything, so after this point nothing is freed.
_EXITING = []
atexit.register(_EXITING.append, True)


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

    def launch(self, kernel, grid, block, args, stream=None):
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
        self._pinned = {}
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

    def launch(self, kernel, grid, block, args, stream=None):
        argv = _argv(args)
        self._check(self.cu.cuLaunchKernel(kernel, *grid, *block, 0,
                                           0 if stream is None else stream,
                                           ctypes.addressof(argv), 0), "cuLaunchKernel")

    def synchronize(self):
        self._check(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")

    # ---- one stream per runner, pinned staging, graphs (see Runner)
    graphs = True

    def create_stream(self):
        # non-blocking (CU_STREAM_NON_BLOCKING): no implicit ordering with the legacy
        # default stream, whose use by another thread would otherwise invalidate a
        # capture; the Runner synchronizes once after its one-time legacy uploads
        return self._check(self.cu.cuStreamCreate(1), "cuStreamCreate")

    def destroy_stream(self, stream):
        self._check(self.cu.cuStreamDestroy(stream), "cuStreamDestroy")

    def host_alloc(self, nbytes):
        n = max(int(nbytes), 1)
        p = int(self._check(self.cu.cuMemHostAlloc(n, 0), f"cuMemHostAlloc({n} bytes)"))
        arr = np.frombuffer((ctypes.c_uint8 * n).from_address(p), dtype=np.uint8)
        self._pinned[arr.ctypes.data] = p
        return arr

    def host_free(self, array):
        p = self._pinned.pop(array.ctypes.data, None)
        if p is not None:
            self._check(self.cu.cuMemFreeHost(p), "cuMemFreeHost")

    def copy_htod_async(self, dptr, hptr, nbytes, stream):
        self._check(self.cu.cuMemcpyHtoDAsync(dptr, hptr, nbytes, stream), "cuMemcpyHtoDAsync")

    def copy_dtoh_async(self, hptr, dptr, nbytes, stream):
        self._check(self.cu.cuMemcpyDtoHAsync(hptr, dptr, nbytes, stream), "cuMemcpyDtoHAsync")

    def copy_dtod_async(self, dst, src, nbytes, stream):
        self._check(self.cu.cuMemcpyDtoDAsync(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")

    def stream_synchronize(self, stream):
        self._check(self.cu.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def context_error(self):
        err, = self.cu.cuCtxSynchronize()
        if int(err) == 0:
            return None
        _, name = self.cu.cuGetErrorName(err)
        return name.decode() if name else str(err)

    def capture_begin(self, stream):
        # thread-local: other threads' CUDA calls stay legal while this one captures
        mode = self.cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        self._check(self.cu.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")

    def capture_end(self, stream):
        graph = self._check(self.cu.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            return self._check(self.cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:   # the executable graph does not need the template
            self.cu.cuGraphDestroy(graph)

    def capture_abort(self, stream):
        err, graph = self.cu.cuStreamEndCapture(stream)
        if int(err) == 0 and graph is not None and int(graph) != 0:
            self.cu.cuGraphDestroy(graph)

    def graph_launch(self, graph_exec, stream):
        self._check(self.cu.cuGraphLaunch(graph_exec, stream), "cuGraphLaunch")

    def graph_free(self, graph_exec):
        self._check(self.cu.cuGraphExecDestroy(graph_exec), "cuGraphExecDestroy")

    def __del__(self):
        cu = getattr(self, "cu", None)
        if cu is None or _EXITING:
            return
        try:
            for p in self._allocs.values():
                cu.cuMemFree(p)
            for p in self._pinned.values():
                cu.cuMemFreeHost(p)
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
def graphs_enabled() -> bool:
    """GRAPHC_CUDA_GRAPHS=0 turns CUDA graphs off (every call launches kernel by kernel)."""
    return os.environ.get("GRAPHC_CUDA_GRAPHS", "1").strip().lower() not in ("0", "off", "false", "no")


def _node_comment(node):
    from .codegen import _node_comment as describe
    return describe(node)


class Runner:
    """A compiled graph on a runtime: device buffers persist across calls.

    A call (see docs/cuda.md, "Calls: pinned staging and CUDA graphs"):
    the inputs are copied into page-locked staging buffers (allocated once, this
    runner being specialized to one set of shapes); parameters whose host bytes
    changed since the device last got them are uploaded; then one sequence runs
    on the runner's stream -- input copies host->device, every kernel, the
    device-side refresh of updated parameters, output copies device->host --
    and one stream synchronize ends the call.  From the second call on, that
    sequence is a CUDA graph captured once and replayed with one cuGraphLaunch
    (GRAPHC_CUDA_GRAPHS=0 or `use_graphs = False`: launched op by op instead).
    """

    FRESH_OUTPUTS = True    # outputs are new arrays, never parameter memory
    WRITES_UPDATES = True   # __call__(arrays, params) writes the trailing outputs into params

    def __init__(self, cprog, graph, runtime: Runtime):
        self.cprog, self.rt = cprog, runtime
        prog = cprog.prog
        self.prog = prog
        self.views = dict(getattr(prog, "views", {}) or {})
        self._owned = []
        self._host_owned = []
        self.stream = None
        self._graph = None   # (refresh key, executable graph)
        self.fns = runtime.load(cprog)
        self.n_inputs = len(graph.inputs)
        self.out_shapes = [tuple(int(d) for d in o.shape) for o in graph.outputs]
        plan = getattr(graph, "memory_plan", None)
        self.n_updates = getattr(plan, "n_updates", 0) or 0
        offsets, size = plan_arena(prog)
        self.arena = self._alloc(size, "the arena of temporaries")
        self.ptr = {id(b): self.arena + off for b in prog.temps if id(b) in offsets
                    for off in [offsets[id(b)]]}
        # id(parameter node) -> a host copy of the bytes its device buffers hold (valid
        # when the key is in _valid); allocated once, so cached addresses stay good
        self._shadow = {}
        self._valid = set()
        self._pcache = {}    # id(parameter node) -> (its value array, flat view, address)
        self._update_plans = {}
        self._params = {}    # id(parameter node) -> (node, [its device buffers])
        self._inputs = []    # (buffer, input position)
        for b, src in prog.externals:
            self.ptr[id(b)] = self._alloc(b.size * b.dtype.itemsize, f"buffer {b.name}")
            if src[0] == "array":
                self._upload(b, np.asarray(src[1]))
            elif src[0] == "const":
                self._upload(b, np.asarray(src[1].value))
            elif src[0] == "param":
                self._params.setdefault(id(src[1]), (src[1], []))[1].append(b)
            elif src[0] == "input":
                self._inputs.append((b, src[1]))
        self._external_ids = {id(b) for b, _ in prog.externals}
        for key, (node, bufs) in self._params.items():
            self._shadow[key] = np.empty(bufs[0].size, dtype=bufs[0].dtype)
        self._shadow_addr = {k: a.ctypes.data for k, a in self._shadow.items()}
        self._refresh_plans = {}
        for b in getattr(cprog, "extra_buffers", []):   # privatized scratch
            self.ptr[id(b)] = self._alloc(b.size * b.dtype.itemsize, f"scratch buffer {b.name}")
        for b in prog.temps:   # temporaries no kernel touches (never read) still need storage
            self.ptr.setdefault(id(b), self.arena)
        self._lock = threading.Lock()
        self.uploads = 0          # parameter uploads host -> device (for tests and profiles)
        self.graph_launches = 0   # calls that ran as one cuGraphLaunch
        self.captures = 0         # CUDA graphs captured (a new one per refresh pattern)
        self.use_graphs = graphs_enabled() and runtime.graphs
        self.graphs_off_reason = None if self.use_graphs else (
            "GRAPHC_CUDA_GRAPHS=0" if runtime.graphs else f"the {runtime.name} runtime has none")
        self._last_key = None
        self.stream = runtime.create_stream()
        # staging buffers in host memory the device can reach by DMA, one per input and
        # output; without page-locked memory (none left) the copies still work, graphs not
        self._in_stage = [self._stage(b) for b, _ in self._inputs]
        self._out_stage = [self._stage(b) for b in prog.outputs]
        self._in_addr = [a.ctypes.data for a in self._in_stage]
        self._out_views = [st[:int(np.prod(shape)) if shape else 1].reshape(shape)
                           for st, shape in zip(self._out_stage, self.out_shapes)]
        self._out_addr = [v.ctypes.data for v in self._out_views]
        # index-check records (kernel/checks.py): reset from a staged initial record at
        # the start of every step, read back with the outputs, turned into the
        # reference's error after the synchronize
        cb = prog.check_buf
        if cb is not None:
            self._check_init = self._stage(cb)
            self._check_init[:] = initial_record(cb.size)
            self._check_rec = self._stage(cb)
        # the constants' uploads above went through the legacy stream, which the
        # runner's stream does not wait for: finish them now
        runtime.synchronize()

    def _alloc(self, nbytes, what):
        try:
            p = self.rt.alloc(nbytes)
        except CudaRuntimeError as e:
            raise CudaRuntimeError(f"allocating {int(nbytes)} bytes of device memory for "
                                   f"{what}: {e}") from None
        self._owned.append(p)
        return p

    def _stage(self, buf):
        nbytes = buf.size * buf.dtype.itemsize
        try:
            raw = self.rt.host_alloc(nbytes)
            self._host_owned.append(raw)
        except CudaRuntimeError as e:
            raw = np.empty(max(nbytes, 1), dtype=np.uint8)
            if self.use_graphs:
                self.use_graphs = False
                self.graphs_off_reason = f"no page-locked staging memory ({e})"
        return raw[:nbytes].view(buf.dtype)

    def __del__(self):
        rt = getattr(self, "rt", None)
        if _EXITING:
            return
        try:
            if getattr(self, "_graph", None) is not None:
                rt.graph_free(self._graph[1])
            if getattr(self, "_kernels_graph", None) is not None:
                rt.graph_free(self._kernels_graph)
            if getattr(self, "stream", None) is not None:
                rt.destroy_stream(self.stream)
        except Exception:   # interpreter shutdown, context gone
            pass
        for free, items in ((getattr(rt, "free", None), getattr(self, "_owned", ())),
                            (getattr(rt, "host_free", None), getattr(self, "_host_owned", ()))):
            for p in items:
                try:
                    free(p)
                except Exception:
                    pass

    def _upload(self, buf, a):
        a = np.ascontiguousarray(a, dtype=buf.dtype).reshape(-1)
        if a.size != buf.size:
            raise GraphcError(f"buffer {buf.name}: expected {buf.size} elements, got {a.size}")
        if a.size:
            self.rt.copy_htod(self.ptr[id(buf)], a)

    def _param_host(self, key, node, buf):
        """(flat contiguous array of the parameter's value, its address); cached while
        `p.value` is the same array and needs no conversion (then the view sees
        in-place edits)."""
        v = node.value
        c = self._pcache.get(key)
        if c is not None and c[0] is v:
            return c[1], c[2]
        a = np.ascontiguousarray(v, dtype=buf.dtype).reshape(-1)
        if a.size != buf.size:
            raise GraphcError(f"parameter {buf.name}: expected {buf.size} elements, "
                              f"got {a.size}")
        if isinstance(v, np.ndarray) and np.may_share_memory(a, v):   # a view, not a copy
            self._pcache[key] = (v, a, a.ctypes.data)
        else:
            self._pcache.pop(key, None)
        return a, a.ctypes.data

    def _sync_params(self, keep):
        """Make every parameter's device copy equal its host value: compare the host
        bytes with what the device was last given (memcmp, no transfer) and upload,
        on the stream, only those that differ.  In-place edits of `p.value` are seen."""
        hosts, jobs = [], []
        for key, (node, bufs) in self._params.items():
            a, addr = self._param_host(key, node, bufs[0])
            hosts.append((key, bufs, a, addr))
            jobs.append((self._shadow_addr[key], addr, a.nbytes) if key in self._valid else None)
        # (a parameter with no valid shadow differs by definition: no comparison)
        differs = iter(differ_jobs([j for j in jobs if j is not None]))
        copies = []
        for (key, bufs, a, addr), job in zip(hosts, jobs):
            if job is not None and not next(differs):
                continue
            keep.append(a)   # an asynchronous copy reads it until the stream synchronizes
            for b in bufs:
                if a.nbytes:
                    self.rt.copy_htod_async(self.ptr[id(b)], addr, a.nbytes, self.stream)
                self.uploads += 1
            copies.append((self._shadow_addr[key], addr, a.nbytes))
            self._valid.add(key)
        copy_jobs(copies)

    def _buf_ptr(self, buf, env):
        """Device address of a buffer; a view (inside a time loop) moves with t."""
        v = self.views.get(id(buf))
        if v is None:
            return self.ptr[id(buf)]
        t = env[("loop", v.loop.index)]
        return self._buf_ptr(v.parent, env) + (v.base + t * v.step) * buf.dtype.itemsize

    def _run(self, steps, env, each=False):
        """Launch the plan's kernels on the stream; each=True synchronizes after every
        launch, so that a failure names its kernel (the diagnosis after a failure)."""
        for st in steps:
            if isinstance(st, HostLoop):
                for v in range(st.extent):
                    env[id(st.var)] = v
                    self._run(st.steps, env, each)
                continue
            if isinstance(st, TimeLoop):
                r = st.region
                for t in (range(r.length - 1, -1, -1) if r.reverse else range(r.length)):
                    env[("loop", r.index)] = t
                    self._run(st.steps, env, each)
                continue
            if 0 in st.grid:
                continue          # an empty tensor: nothing to launch (CUDA rejects grid 0)
            args = [ctypes.c_void_p(self._buf_ptr(obj, env)) if kind == "buf"
                    else ctypes.c_longlong(env[id(obj)]) for kind, obj in st.params]
            try:
                self.rt.launch(self.fns[st.name], st.grid, st.block, args, self.stream)
                if each:
                    self.rt.stream_synchronize(self.stream)
            except CudaRuntimeError as e:
                raise CudaRuntimeError(f"kernel {st.name} (grid {st.grid}, block {st.block}) "
                                       f"failed: {e}\n  node: {_node_comment(st.node)}") from None

    def _raise_check_errors(self, refresh):
        """After the step: a bad index (fed or computed) that a check kernel recorded
        raises the reference's error (the kernels clamped it: nothing out of bounds).
        The step's device-side parameter refresh already ran: forget what the device
        holds, so that the next call uploads the (unchanged) host values again."""
        if self.prog.check_buf is None:
            return
        err = first_error(self.prog.checks, self._check_rec)
        if err is not None:
            if refresh:
                self._valid.clear()
            raise err

    def launch_all(self):
        """Launch every kernel on the data already on the device, then synchronize
        (device-side timing; no transfers, no graph)."""
        with self._lock:
            self.rt.activate()
            self._run(self.cprog.steps, {})
            self.rt.stream_synchronize(self.stream)

    def launch_all_graph(self):
        """launch_all as one CUDA graph (the kernels only: no copies, no parameter
        refresh, so it can be replayed at will), captured on first use; the bench's
        device time of the graph path.  Returns False where graphs are unavailable."""
        with self._lock:
            if not self.rt.graphs:
                return False
            self.rt.activate()
            if getattr(self, "_kernels_graph", None) is None:
                self.rt.capture_begin(self.stream)
                try:
                    self._run(self.cprog.steps, {})
                except BaseException:
                    self.rt.capture_abort(self.stream)
                    raise
                self._kernels_graph = self.rt.capture_end(self.stream)
            self.rt.graph_launch(self._kernels_graph, self.stream)
            self.rt.stream_synchronize(self.stream)
            return True

    # ---------------------------------------------------------------- one call
    def _refresh_plan(self, params):
        """Device-side parameter refresh after the kernels: (param buffer, update
        output buffer, bytes) for each updated parameter whose new value is a
        temporary (an update that is itself an external, e.g. a swap of two
        parameters, goes through the host instead: its source would be overwritten)."""
        if not params:
            return ()
        pkey = tuple(map(id, params))
        plan = self._refresh_plans.get(pkey)
        if plan is None:
            plan = self._refresh_plans[pkey] = self._make_refresh_plan(params)
        return plan

    def _make_refresh_plan(self, params):
        first = len(self.prog.outputs) - len(params)
        plan = []
        for p, ob in zip(params, self.prog.outputs[first:]):
            entry = self._params.get(id(p))
            if entry is None or id(ob) in self._external_ids:
                continue
            for pb in entry[1]:
                if pb.dtype == ob.dtype and pb.size == ob.size and pb.size:
                    plan.append((self.ptr[id(pb)], self.ptr[id(ob)], pb.size * pb.dtype.itemsize))
        return tuple(plan)

    def _enqueue(self, refresh, each=False):
        rt, s = self.rt, self.stream
        cb = self.prog.check_buf
        if cb is not None and cb.size:
            rt.copy_htod_async(self.ptr[id(cb)], self._check_init.ctypes.data,
                               self._check_init.nbytes, s)
        for (b, _), stage in zip(self._inputs, self._in_stage):
            if stage.nbytes:
                rt.copy_htod_async(self.ptr[id(b)], stage.ctypes.data, stage.nbytes, s)
        self._run(self.cprog.steps, {}, each)
        if cb is not None and cb.size:
            rt.copy_dtoh_async(self._check_rec.ctypes.data, self.ptr[id(cb)],
                               self._check_rec.nbytes, s)
        # outputs before the refresh: an output that is a parameter's own buffer must
        # show the value this call read, not the update
        for b, stage in zip(self.prog.outputs, self._out_stage):
            if stage.nbytes:
                rt.copy_dtoh_async(stage.ctypes.data, self.ptr[id(b)], stage.nbytes, s)
        for dst, src, n in refresh:
            rt.copy_dtod_async(dst, src, n, s)

    def _drop_graph(self):
        g, self._graph = self._graph, None
        if g is not None:
            try:
                self.rt.graph_free(g[1])
            except CudaRuntimeError:
                pass

    def _capture(self, refresh):
        self._drop_graph()
        self.rt.capture_begin(self.stream)
        try:
            self._enqueue(refresh)
        except BaseException:
            self.rt.capture_abort(self.stream)
            raise
        self._graph = (refresh, self.rt.capture_end(self.stream))
        self.captures += 1

    def _execute(self, refresh):
        """Run the step on the stream and wait for it: the captured graph when there
        is one for this refresh pattern (captured on the second call that has it)."""
        rt, s = self.rt, self.stream
        if self.use_graphs and self._last_key == refresh:
            if self._graph is None or self._graph[0] != refresh:
                try:
                    self._capture(refresh)
                except CudaRuntimeError as e:   # capture unsupported here: launch op by op
                    self.use_graphs = False
                    self.graphs_off_reason = f"capturing the step failed: {e}"
                    self._drop_graph()
            if self._graph is not None:
                rt.graph_launch(self._graph[1], s)
                rt.stream_synchronize(s)
                self.graph_launches += 1
                return
        self._last_key = refresh
        self._enqueue(refresh)
        rt.stream_synchronize(s)

    def _recover(self, err, params, refresh, keep):
        """After a failed step: forget the graph and what the device holds (parameters
        are uploaded again by the next call), then find the failing kernel by running
        the step again launch by launch.  If that run succeeds (the failure was
        transient), its results stand; else its error, naming the kernel, is raised."""
        self._drop_graph()
        self._valid.clear()
        self._last_key = None
        sticky = self.rt.context_error()
        if sticky is not None:
            raise CudaRuntimeError(
                f"the CUDA step failed ({err}) and left the CUDA context unusable "
                f"({sticky}): later calls in this process cannot run; rerun with "
                "GRAPHC_CUDA_GRAPHS=0 CUDA_LAUNCH_BLOCKING=1 to name the failing kernel"
            ) from None
        try:
            self._sync_params(keep)
            self._enqueue(refresh, each=True)
            self.rt.stream_synchronize(self.stream)
        except CudaRuntimeError as e:
            self._valid.clear()
            raise CudaRuntimeError(f"{e}\n  (first reported as: {err})") from None

    def __call__(self, arrays, params=None):
        """Run the graph on `arrays`; returns its outputs as new arrays.  With
        `params` (the parameters of the trailing update outputs, in order) the
        updates are written into them instead of being returned."""
        if len(arrays) != self.n_inputs:
            raise GraphcError(f"expected {self.n_inputs} inputs, got {len(arrays)}")
        with self._lock:
            jobs = []
            for (b, what), addr in zip(self._inputs, self._in_addr):
                a = arrays[what]
                if type(a) is not np.ndarray or not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                if a.dtype != b.dtype or a.size != b.size:
                    raise GraphcError(f"input buffer {b.name}: expected {b.size} elements "
                                      f"of {b.dtype}, got {a.dtype}{a.shape}")
                jobs.append((addr, a.ctypes.data, a.nbytes))
            self.rt.activate()
            copy_jobs(jobs)
            keep = []
            refresh = self._refresh_plan(params)
            try:
                self._sync_params(keep)
                self._execute(refresh)
            except CudaRuntimeError as e:
                self._recover(e, params, refresh, keep)
            del keep
            self._raise_check_errors(refresh)
            n_out = len(self.out_shapes) - (len(params) if params else 0)
            outs, jobs = [], []
            for k in range(n_out):    # new arrays (the staging buffers are the next call's)
                v = self._out_views[k]
                h = np.empty(v.shape, dtype=v.dtype)
                jobs.append((h.ctypes.data, self._out_addr[k], v.nbytes))
                outs.append(h)
            copy_jobs(jobs)
            if params:
                self._write_updates(params, n_out, refresh)
            return outs

    def _update_plan(self, params, n_out, refresh):
        on_device = {dst for dst, _, _ in refresh}
        plan = []
        for k, p in enumerate(params):
            src = self._out_views[n_out + k]
            dst = p.value
            fast = isinstance(dst, np.ndarray) and dst.dtype == src.dtype and \
                dst.shape == src.shape and dst.flags.c_contiguous and dst.flags.writeable
            entry = self._params.get(id(p))
            key = None if entry is None else id(p)
            dev = entry is not None and entry[1][0].dtype == src.dtype and \
                all(self.ptr[id(b)] in on_device for b in entry[1])
            plan.append((p, dst if fast else None, dst.ctypes.data if fast else 0,
                         self._out_addr[n_out + k], src, key, dev))
        return plan

    def _write_updates(self, params, n_out, refresh):
        """Copy the new values into the parameters; where the device already holds
        them (refreshed in the step), record that in the shadow copies, so that the
        next call uploads nothing."""
        pkey = tuple(map(id, params))
        plan = self._update_plans.get(pkey)
        if plan is None:
            plan = self._update_plans[pkey] = self._update_plan(params, n_out, refresh)
        jobs = []
        for p, dst, daddr, saddr, src, key, dev in plan:
            if dst is not None and p.value is dst:
                jobs.append((daddr, saddr, src.nbytes))
            else:       # a cast, a reshape, or a new array assigned: the checked path
                p.set_value(src)
                if dst is not None:         # p.value was replaced: plan again next time
                    self._update_plans.pop(pkey, None)
            if key is None:
                continue
            if dev:
                jobs.append((self._shadow_addr[key], saddr, src.nbytes))
                self._valid.add(key)
            else:
                self._valid.discard(key)
        copy_jobs(jobs)
