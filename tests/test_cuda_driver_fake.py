"""The driver-API runtime without a GPU: `DriverRuntime` and `Runner` driven
against a stand-in for `cuda.bindings.driver` whose "device" is the CPU
emulator.

Every call first goes through the *real* binding with the same arguments: the
real bindings convert (and type-check) their arguments before they try to load
libcuda, so a call that reaches "Failed to dlopen libcuda" passed its type
checks.  This checks the argument conventions of every driver call the
runtime makes (handles, integer addresses, the kernelParams pointer array),
then runs the launches on the emulator and compares with the NumPy backend.
It cannot check the driver's behaviour itself: that needs test_cuda_gpu.py on
a real GPU.
"""
import ctypes
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import runtime as R

cu = pytest.importorskip("cuda.bindings.driver")
from graphc.backends.cuda import compiler  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                       reason="the CUDA emulator needs a host C++ compiler"),
    pytest.mark.skipif(compiler.nvrtc_version() is None and compiler.nvcc_path() is None,
                       reason="no CUDA compiler (NVRTC or nvcc) to make the cubin")]

SUCCESS = cu.CUresult.CUDA_SUCCESS


def _no_libcuda():
    try:
        cu.cuInit(0)
    except RuntimeError as e:
        return "libcuda" in str(e)
    return False


# With a real driver the pass-through calls below would reach it with fake handles:
# there, test_cuda_gpu.py runs the real thing instead.
pytestmark.append(pytest.mark.skipif(not _no_libcuda(), reason="a CUDA driver is installed"))


class FakeDriver:
    """The subset of cuda.bindings.driver that DriverRuntime uses."""

    CUdevice_attribute = cu.CUdevice_attribute
    CUstreamCaptureMode = cu.CUstreamCaptureMode

    def __init__(self):
        self.calls = []
        self.mem = {}
        self.pinned = {}
        self.functions = {}
        self.nparams = {}
        self.pending_program = None
        self.real_checked = 0
        self.streams = 0
        self.capturing = {}       # stream handle -> the operations recorded so far
        self.graphs = {}          # graph handle -> operations
        self.execs = {}           # executable graph handle -> operations
        self.pending_error = None  # an asynchronous error, reported by the next synchronize
        self.fail_kernel = None   # inject: this kernel fails when it runs
        self.sticky = False       # inject: a kernel failure leaves the context unusable
        self.fail_call = {}       # inject: driver call name -> CUresult it returns once

    def _real(self, name, *args):
        """The real binding must accept these arguments (then fail to find libcuda)."""
        try:
            getattr(cu, name)(*args)
        except RuntimeError as e:
            assert "libcuda" in str(e), (name, e)
            self.real_checked += 1
            return
        except TypeError as e:
            raise AssertionError(f"{name}{args!r}: the real binding rejects the arguments: {e}")
        # a machine with a driver: the call went through for real; nothing to learn here

    def __getattr__(self, name):
        raise AttributeError(f"the fake driver has no {name}: DriverRuntime uses a new call")

    def _log(self, name, *args):
        self.calls.append(name)
        self._real(name, *args)
        return self.fail_call.pop(name, None)

    def _no_capture(self, name):
        """A synchronous call (legacy stream) while a stream captures: CUDA refuses it."""
        if self.capturing:
            raise AssertionError(f"{name} during stream capture")

    def _do(self, stream, op):
        """Run op now, or record it into the graph the stream is capturing."""
        ops = self.capturing.get(int(stream))
        if ops is not None:
            ops.append(op)
        elif self.pending_error is None or not self.sticky:
            op()

    def _is_pinned(self, p, n):
        return any(base <= p and p + n <= base + a.nbytes for base, a in self.pinned.items())

    def cuInit(self, flags):
        self._log("cuInit", flags)
        return (SUCCESS,)

    def cuDeviceGetCount(self):
        self._log("cuDeviceGetCount")
        return SUCCESS, 1

    def cuDeviceGet(self, ordinal):
        self._log("cuDeviceGet", ordinal)
        return SUCCESS, cu.CUdevice(ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        self._log("cuDevicePrimaryCtxRetain", dev)
        return SUCCESS, cu.CUcontext(1)

    def cuDevicePrimaryCtxRelease(self, dev):
        return (SUCCESS,)

    def cuCtxSetCurrent(self, ctx):
        self._log("cuCtxSetCurrent", ctx)
        return (SUCCESS,)

    def cuDeviceGetAttribute(self, attr, dev):
        self._log("cuDeviceGetAttribute", attr, dev)
        major = attr == cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        return SUCCESS, 9 if major else 0

    def cuGetErrorName(self, err):
        return SUCCESS, cu.CUresult(err).name.encode()

    def cuModuleLoadData(self, image):
        self._log("cuModuleLoadData", image)
        assert image[:4] == b"\x7fELF"        # a cubin from NVRTC
        # the "device" runs the same program on the emulator
        self.module_fns = R.EmulatorRuntime().load(self.pending_program)
        return SUCCESS, cu.CUmodule(1)

    def cuModuleGetFunction(self, module, name):
        self._log("cuModuleGetFunction", module, name)
        handle = len(self.functions) + 1
        self.functions[handle] = self.module_fns[name.decode()]
        self.nparams[handle] = next(len(la.params) for la in self.pending_program.launches
                                    if la.name == name.decode())
        self.names = getattr(self, "names", {})
        self.names[handle] = name.decode()
        return SUCCESS, cu.CUfunction(handle)

    def cuModuleUnload(self, module):
        return (SUCCESS,)

    def cuMemAlloc(self, n):
        err = self._log("cuMemAlloc", n)
        if err is not None:
            return err, None
        a = np.zeros(n + 256, np.uint8)
        p = a.ctypes.data + (-a.ctypes.data) % 256
        self.mem[p] = a
        return SUCCESS, cu.CUdeviceptr(p)

    def cuMemFree(self, p):
        self._log("cuMemFree", p)
        self.mem.pop(int(p), None)
        return (SUCCESS,)

    def cuMemHostAlloc(self, n, flags):
        err = self._log("cuMemHostAlloc", n, flags)
        if err is not None:
            return err, 0
        a = np.zeros(n, np.uint8)
        self.pinned[a.ctypes.data] = a
        return SUCCESS, a.ctypes.data

    def cuMemFreeHost(self, p):
        self._log("cuMemFreeHost", p)
        assert self.pinned.pop(int(p), None) is not None
        return (SUCCESS,)

    def cuStreamCreate(self, flags):
        self._log("cuStreamCreate", flags)
        self.streams += 1
        return SUCCESS, cu.CUstream(self.streams)

    def cuStreamDestroy(self, stream):
        self._log("cuStreamDestroy", stream)
        return (SUCCESS,)

    def _async_copy(self, name, dst, src, n, stream, host=None):
        err = self._log(name, dst, src, n, stream)
        if err is not None:
            return (err,)
        if int(stream) in self.capturing:   # a graph's memcpy node needs page-locked memory
            assert host is None or self._is_pinned(host, n), f"{name} from pageable memory"
        d, s_ = int(dst), int(src)
        self._do(stream, lambda: ctypes.memmove(d, s_, n))
        return (SUCCESS,)

    def cuMemcpyHtoDAsync(self, dst, src, n, stream):
        return self._async_copy("cuMemcpyHtoDAsync", dst, src, n, stream, host=int(src))

    def cuMemcpyDtoHAsync(self, dst, src, n, stream):
        return self._async_copy("cuMemcpyDtoHAsync", dst, src, n, stream, host=int(dst))

    def cuMemcpyDtoDAsync(self, dst, src, n, stream):
        return self._async_copy("cuMemcpyDtoDAsync", dst, src, n, stream)

    def cuStreamSynchronize(self, stream):
        self._log("cuStreamSynchronize", stream)
        assert int(stream) not in self.capturing, "synchronize during capture"
        err = self.pending_error
        if not self.sticky:
            self.pending_error = None
        return (err if err is not None else SUCCESS,)

    def cuStreamBeginCapture(self, stream, mode):
        err = self._log("cuStreamBeginCapture", stream, mode)
        if err is not None:
            return (err,)
        assert int(stream) not in self.capturing
        self.capturing[int(stream)] = []
        return (SUCCESS,)

    def cuStreamEndCapture(self, stream):
        self._log("cuStreamEndCapture", stream)
        ops = self.capturing.pop(int(stream))
        handle = len(self.graphs) + 1
        self.graphs[handle] = ops
        return SUCCESS, cu.CUgraph(handle)

    def cuGraphInstantiate(self, graph, flags):
        err = self._log("cuGraphInstantiate", graph, flags)
        if err is not None:
            return err, None
        handle = len(self.execs) + 1
        self.execs[handle] = list(self.graphs[int(graph)])
        return SUCCESS, cu.CUgraphExec(handle)

    def cuGraphDestroy(self, graph):
        self._log("cuGraphDestroy", graph)
        del self.graphs[int(graph)]
        return (SUCCESS,)

    def cuGraphExecDestroy(self, graph_exec):
        self._log("cuGraphExecDestroy", graph_exec)
        del self.execs[int(graph_exec)]
        return (SUCCESS,)

    def cuGraphLaunch(self, graph_exec, stream):
        err = self._log("cuGraphLaunch", graph_exec, stream)
        if err is not None:
            return (err,)
        for op in self.execs[int(graph_exec)]:
            if self.pending_error is not None:
                break             # the device stops at a failed kernel
            op()
        return (SUCCESS,)

    def cuMemcpyHtoD(self, dst, src, n):
        self._no_capture("cuMemcpyHtoD")
        self._log("cuMemcpyHtoD", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuMemcpyDtoH(self, dst, src, n):
        self._no_capture("cuMemcpyDtoH")
        self._log("cuMemcpyDtoH", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuMemcpyDtoD(self, dst, src, n):
        self._no_capture("cuMemcpyDtoD")
        self._log("cuMemcpyDtoD", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        self._log("cuLaunchKernel", f, gx, gy, gz, bx, by, bz, smem, stream, params, extra)
        assert bx * by * bz <= 1024 and gy <= 65535 and gz <= 65535 and smem == 0
        assert int(stream) != 0                # the runner's own stream
        # the driver copies the parameter values at the call (a graph keeps its copy)
        n = self.nparams[int(f)]
        ptrs = (ctypes.c_void_p * max(n, 1)).from_address(params)
        vals = (ctypes.c_uint64 * max(n, 1))(*[ctypes.c_uint64.from_address(ptrs[k]).value
                                               for k in range(n)])
        argv = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(vals) + 8 * k
                                               for k in range(n)])
        fn, name = self.functions[int(f)], self.names[int(f)]

        def run():
            if name == self.fail_kernel:
                self.pending_error = cu.CUresult.CUDA_ERROR_LAUNCH_FAILED
                return
            g = (ctypes.c_uint * 3)(gx, gy, gz)
            b = (ctypes.c_uint * 3)(bx, by, bz)
            assert fn(ctypes.addressof(g), ctypes.addressof(b), ctypes.addressof(argv)) == 0
        run.keep = (vals, argv)
        self._do(stream, run)
        return (SUCCESS,)

    def cuCtxSynchronize(self):
        self._no_capture("cuCtxSynchronize")
        self._log("cuCtxSynchronize")
        if self.sticky and self.pending_error is not None:
            return (self.pending_error,)
        return (SUCCESS,)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    drv = FakeDriver()
    monkeypatch.setattr(R, "_driver", lambda: drv)
    load = R.DriverRuntime.load

    def spy(self, cprog):
        drv.pending_program = cprog
        return load(self, cprog)
    monkeypatch.setattr(R.DriverRuntime, "load", spy)
    monkeypatch.setattr(C, "_driver_rt", None)
    C.set_options(emulate=False)
    yield drv
    C.set_options(emulate=None)
    monkeypatch.setattr(C, "_driver_rt", None)


def _mlp_problem():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((13, 6)).astype(np.float32)
    Y = rng.integers(0, 3, 13)

    def run(backend, steps=4, batches=None):
        r = np.random.default_rng(1)
        w1 = gc.Parameter((r.standard_normal((6, 70)) * 0.3).astype(np.float32), name="w1")
        w2 = gc.Parameter((r.standard_normal((70, 3)) * 0.3).astype(np.float32), name="w2")
        x, y = gc.input("x", (13, 6)), gc.input("y", (13,), dtype="int64")
        loss = gc.cross_entropy(gc.relu(x @ w1) @ w2, y)
        g1, g2 = gc.grad(loss, [w1, w2])
        f = gc.compile([x, y], loss, updates={w1: w1 - 0.3 * g1, w2: w2 - 0.3 * g2},
                       backend=backend)
        data = batches or [(X, Y)] * steps
        return [float(f(*b)) for b in data], f, (w1, w2)
    return X, Y, run


def test_driver_path_trains_an_mlp_like_numpy(fake):
    X, Y, run = _mlp_problem()
    got, f, _ = run("cuda")
    want, _, _ = run("numpy")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert isinstance(C.select_runtime(), R.DriverRuntime)
    assert C.select_runtime().arch == "sm_90"
    assert fake.real_checked == len(fake.calls)     # every call type-checked by the real binding
    runner = next(iter(f._cache.values()))
    assert runner.uploads == 2                       # parameters sent once, then kept on device
    # calls 2..4 ran the step captured as a CUDA graph on call 2: one cuGraphLaunch each
    assert runner.captures == 1 and runner.graph_launches == 3
    graph = next(iter(fake.execs.values()))
    # the label check's record reset, 2 inputs in, the kernels, the record and the 3
    # outputs (loss, 2 updates) out, the 2 parameters refreshed on the device
    assert runner.prog.check_buf is not None
    assert len(graph) == 1 + 2 + runner.cprog.launch_count() + 1 + 3 + 2
    fake.calls.clear()
    fake.real_checked = 0
    f(X, Y)
    # one step is one graph launch and one synchronize: no copy, no launch, no upload
    assert [c for c in fake.calls if c != "cuCtxSetCurrent"] == ["cuGraphLaunch",
                                                                 "cuStreamSynchronize"]
    assert fake.pinned                               # staging buffers are page-locked
    del f, runner
    import gc as pygc
    pygc.collect()
    assert "cuMemFree" in fake.calls                 # a dropped function frees its memory
    assert "cuMemFreeHost" in fake.calls and "cuGraphExecDestroy" in fake.calls
    assert "cuStreamDestroy" in fake.calls
    assert fake.real_checked == len(fake.calls)     # the release calls' arguments too


def test_driver_path_without_graphs_copies_asynchronously(fake, monkeypatch):
    """GRAPHC_CUDA_GRAPHS=0: the same sequence, launched op by op on the runner's stream."""
    monkeypatch.setenv("GRAPHC_CUDA_GRAPHS", "0")
    X, Y, run = _mlp_problem()
    got, f, _ = run("cuda", 3)
    want, _, _ = run("numpy", 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    runner = next(iter(f._cache.values()))
    assert runner.graph_launches == 0 and "cuGraphLaunch" not in fake.calls
    assert runner.graphs_off_reason == "GRAPHC_CUDA_GRAPHS=0"
    fake.calls.clear()
    f(X, Y)
    # one step: the label check's record reset and the 2 inputs in, the kernels in order,
    # the record and the 3 outputs (loss, 2 updates) out, the parameters refreshed on
    # the device from the update outputs, one synchronize
    assert fake.calls.count("cuMemcpyHtoDAsync") == 3 and fake.calls.count("cuMemcpyDtoDAsync") == 2
    assert fake.calls.count("cuMemcpyDtoHAsync") == 4
    assert not {"cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyDtoD"} & set(fake.calls)
    n_launch = fake.calls.count("cuLaunchKernel")
    assert n_launch == runner.cprog.launch_count() > 5
    assert fake.calls.count("cuStreamSynchronize") == 1
    assert fake.calls.index("cuStreamSynchronize") > max(
        k for k, c in enumerate(fake.calls) if c == "cuLaunchKernel")


def test_driver_path_runs_a_recurrence_in_one_launch_per_loop(fake):
    from graphc import nn
    layer = nn.GRU(3, 5, rng=np.random.default_rng(2))
    x = gc.input("x", (7, 2, 3))
    y = layer(x)[0]
    loss = gc.sum(y * y)
    outs = [y] + gc.grad(loss, [x] + list(layer.parameters()))
    v = np.random.default_rng(3).standard_normal((7, 2, 3)).astype(np.float32)
    f = gc.compile([x], outs, backend="cuda")
    got = f(v)
    want = gc.compile([x], outs, backend="numpy")(v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    runner = next(iter(f._cache.values()))
    seqs = [la for la in runner.cprog.steps if getattr(la, "time_loop", None) is not None]
    assert len(seqs) == 2                             # the forward and the reversed loop
    fake.calls.clear()
    f(v)
    # 7 steps each way, yet no time loop is left on the host: no per-step launches
    from graphc.backends.cuda.codegen import TimeLoop
    assert not [s for s in runner.cprog.steps if isinstance(s, TimeLoop)]
    assert fake.calls.count("cuLaunchKernel") == runner.cprog.launch_count() == len(
        runner.cprog.steps)


def _sgd_step(backend, B="N"):
    """A small SGD-with-momentum training step (optimizer state as parameters)."""
    from graphc import optim
    r = np.random.default_rng(7)
    w = gc.Parameter((r.standard_normal((5, 9)) * 0.4).astype(np.float32), name="w")
    b = gc.Parameter(np.zeros(9, np.float32), name="b")
    v = gc.Parameter((r.standard_normal((9, 3)) * 0.4).astype(np.float32), name="v")
    x, y = gc.input("x", (B, 5)), gc.input("y", (B,), dtype="int64")
    opt = optim.SGD([w, b, v], lr=0.2, momentum=0.9)
    step = opt.compile_step(lambda xb, yb: gc.cross_entropy(gc.tanh(xb @ w + b) @ v, yb),
                            x, y, backend=backend)
    return step, (w, b, v)


def _batches(n, sizes=(11,)):
    r = np.random.default_rng(11)
    out = []
    for k in range(n):
        m = sizes[k % len(sizes)]
        out.append((r.standard_normal((m, 5)).astype(np.float32), r.integers(0, 3, m)))
    return out


def _train(backend, batches, edit_at=None):
    step, params = _sgd_step(backend)
    losses = []
    for k, (xb, yb) in enumerate(batches):
        if k == edit_at:        # a user edit in place between steps must be seen
            params[0].value[1, :] = 0.25
        losses.append(float(step(xb, yb)))
    return losses, [p.value.copy() for p in params], step


def test_graph_replay_matches_numpy_with_changing_inputs_and_parameters(fake):
    """Changing batches, an optimizer with state, and an in-place parameter edit:
    the graph path's losses and the host-visible parameters after 6 steps are the
    NumPy backend's, and the non-graph path's."""
    batches = _batches(6)
    got, gp, step = _train("cuda", batches, edit_at=3)
    runner = next(iter(step.function._cache.values()))
    assert runner.graph_launches == 5 and runner.captures == 1   # steps 2..6
    want, wp, _ = _train("numpy", batches, edit_at=3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(gp, wp):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    n_bufs = sum(len(bufs) for _, bufs in runner._params.values())
    # the first step uploads every parameter (and momentum); the edit re-uploads one
    assert runner.uploads == n_bufs + 1


def test_graphs_off_gives_identical_results(fake, monkeypatch):
    batches = _batches(5)
    with_graph, pg, _ = _train("cuda", batches, edit_at=2)
    monkeypatch.setenv("GRAPHC_CUDA_GRAPHS", "0")
    without, pn, step = _train("cuda", batches, edit_at=2)
    assert next(iter(step.function._cache.values())).graph_launches == 0
    assert with_graph == without                       # bit for bit
    for a, b in zip(pg, pn):
        np.testing.assert_array_equal(a, b)


def test_one_graph_launch_per_call_and_a_new_shape_captures_again(fake):
    step, _ = _sgd_step("cuda")
    a, b = _batches(1, (11,))[0], _batches(1, (4,))[0]
    step(*a)                            # shape 11: first call, launched op by op
    step(*a)                            # captured, then launched
    fake.calls.clear()
    step(*a)
    assert fake.calls.count("cuGraphLaunch") == 1 and "cuLaunchKernel" not in fake.calls
    step(*b)                            # a new shape: its own runner, op by op
    fake.calls.clear()
    step(*b)                            # ... captured on its second call
    assert fake.calls.count("cuStreamBeginCapture") == 1
    assert fake.calls.count("cuGraphLaunch") == 1
    fake.calls.clear()
    step(*a)                            # back to the first shape: its graph is still there
    assert fake.calls.count("cuGraphLaunch") == 1 and "cuStreamBeginCapture" not in fake.calls
    runners = list(step.function._cache.values())
    assert len(runners) == 2 and [r.captures for r in runners] == [1, 1]
    assert [r.graph_launches for r in runners] == [3, 1]


def test_a_failing_kernel_is_named_and_the_next_call_is_not_corrupted(fake):
    batches = _batches(5)
    step, params = _sgd_step("cuda")
    ref, rparams = _sgd_step("numpy")
    for xb, yb in batches[:2]:
        step(xb, yb), ref(xb, yb)
    runner = next(iter(step.function._cache.values()))
    assert runner._graph is not None
    name = [la.name for la in runner.cprog.launches][len(runner.cprog.launches) // 2]
    fake.fail_kernel = name
    with pytest.raises(C.GraphcError, match=rf"kernel {name} .*failed.*CUDA_ERROR_LAUNCH_FAILED"
                       r"(.|\n)*node: .*built at"):
        step(*batches[2])
    before = [p.value.copy() for p in params]
    fake.fail_kernel = None
    for xb, yb in batches[2:]:
        np.testing.assert_allclose(float(step(xb, yb)), float(ref(xb, yb)), rtol=1e-5)
    for p, q in zip(params, rparams):     # the failed step changed no parameter
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(p.value, b) for p, b in zip(params, before))
    assert runner.captures == 2           # the graph was dropped and captured again


def test_a_transient_graph_launch_failure_is_retried_op_by_op(fake):
    step, params = _sgd_step("cuda")
    ref, rparams = _sgd_step("numpy")
    for xb, yb in _batches(4):
        if runner_has_graph(step):
            fake.fail_call["cuGraphLaunch"] = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        np.testing.assert_allclose(float(step(xb, yb)), float(ref(xb, yb)), rtol=1e-5)
    for p, q in zip(params, rparams):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-6)


def runner_has_graph(step):
    rs = list(step.function._cache.values())
    return bool(rs) and rs[0]._graph is not None


def test_graph_instantiation_out_of_memory_falls_back_to_launches(fake):
    step, params = _sgd_step("cuda")
    ref, _ = _sgd_step("numpy")
    fake.fail_call["cuGraphInstantiate"] = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    for xb, yb in _batches(3):
        np.testing.assert_allclose(float(step(xb, yb)), float(ref(xb, yb)), rtol=1e-5)
    runner = next(iter(step.function._cache.values()))
    assert not runner.use_graphs and runner.graph_launches == 0
    assert "cuGraphInstantiate failed: CUDA_ERROR_OUT_OF_MEMORY" in runner.graphs_off_reason
    assert not fake.capturing                      # the stream left capture mode


def test_no_pinned_memory_still_runs_without_graphs(fake):
    fake.fail_call["cuMemHostAlloc"] = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    X, Y, run = _mlp_problem()
    got, f, _ = run("cuda", 3)
    want, _, _ = run("numpy", 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    runner = next(iter(f._cache.values()))
    assert not runner.use_graphs and "page-locked" in runner.graphs_off_reason


def test_a_sticky_failure_says_the_context_is_unusable(fake):
    step, _ = _sgd_step("cuda")
    b = _batches(3)
    step(*b[0]), step(*b[1])
    fake.fail_kernel = next(iter(fake.names.values()))
    fake.sticky = True
    with pytest.raises(C.GraphcError, match="CUDA_ERROR_LAUNCH_FAILED(.|\n)*context unusable"
                       "(.|\n)*GRAPHC_CUDA_GRAPHS=0"):
        step(*b[2])


def test_device_out_of_memory_names_the_buffer(fake):
    fake.fail_call["cuMemAlloc"] = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    x = gc.input("x", (3, 4))
    f = gc.compile([x], gc.exp(x), backend="cuda")
    with pytest.raises(C.GraphcError, match=r"allocating \d+ bytes of device memory for .*"
                       "CUDA_ERROR_OUT_OF_MEMORY"):
        f(np.ones((3, 4), np.float32))


def test_updates_that_read_parameters_and_outputs_that_are_parameters(fake):
    """updates {a: b, b: a + x}: a's new value is b's own device buffer, so the
    device refresh must not overwrite b before a takes it; the output `a` shows the
    value the call read."""
    def run(backend):
        a = gc.Parameter(np.arange(4, dtype=np.float32), name="a")
        b = gc.Parameter(np.full(4, 10, np.float32), name="b")
        x = gc.input("x", (4,))
        f = gc.compile([x], [a, b * 1.0], updates={a: b, b: a + x}, backend=backend)
        outs = [f(np.full(4, k, np.float32)) for k in range(5)]
        return outs, a.value.copy(), b.value.copy(), f
    got, ga, gb, f = run("cuda")
    want, wa, wb, _ = run("numpy")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[1], w[1])
    np.testing.assert_array_equal(ga, wa)
    np.testing.assert_array_equal(gb, wb)
    assert next(iter(f._cache.values())).graph_launches == 4


def test_per_step_launches_of_an_unfused_time_loop_are_captured(fake, monkeypatch):
    """Without the fused recurrence kernels, a time loop is launched step by step with
    view pointers that move with t: the graph captures every step's launch with its
    own arguments, and replays give the NumPy backend's values for new inputs."""
    from graphc import nn
    from graphc.backends.cuda import fuse
    from graphc.backends.cuda.codegen import TimeLoop
    monkeypatch.setattr(fuse, "fuse_time_loops", lambda gen, steps: None)
    layer = nn.GRU(3, 5, rng=np.random.default_rng(2))
    x = gc.input("x", (6, 2, 3))
    y = layer(x)[0]
    outs = [y] + gc.grad(gc.sum(y * y), [x] + list(layer.parameters()))
    f = gc.compile([x], outs, backend="cuda")
    ref = gc.compile([x], outs, backend="numpy")
    r = np.random.default_rng(4)
    for _ in range(4):
        v = r.standard_normal((6, 2, 3)).astype(np.float32)
        for g, w in zip(f(v), ref(v)):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    runner = next(iter(f._cache.values()))
    assert any(isinstance(s, TimeLoop) for s in runner.cprog.steps)
    assert runner.graph_launches == 3
    n_out = len(runner.prog.outputs)
    graph = next(iter(fake.execs.values()))
    assert len(graph) == 1 + runner.cprog.launch_count() + n_out
    assert runner.cprog.launch_count() > 2 * 6          # several launches per time step


def test_the_bench_kernels_only_graph_leaves_calls_correct(fake):
    """launch_all_graph (the bench's device time of the graph path) replays the
    kernels alone: interleaved with training steps, it changes no result."""
    batches = _batches(4)
    step, params = _sgd_step("cuda")
    ref, rparams = _sgd_step("numpy")
    for xb, yb in batches:
        np.testing.assert_allclose(float(step(xb, yb)), float(ref(xb, yb)), rtol=1e-5)
        runner = next(iter(step.function._cache.values()))
        assert runner.launch_all_graph() and runner.launch_all_graph()
    assert len(fake.execs) == 2          # the step's graph and the kernels-only one
    for p, q in zip(params, rparams):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-6)


def test_a_reassigned_parameter_array_is_uploaded_and_updated(fake):
    """p.value replaced by a new array (C-ordered, then a Fortran-ordered one) between
    graph-replayed steps: the device gets it, and the updates land in the new array."""
    batches = _batches(6)

    def train(backend):
        step, (w, b, v) = _sgd_step(backend)
        out = []
        for k, (xb, yb) in enumerate(batches):
            if k == 2:
                w.value = np.full((5, 9), 0.1, np.float32)
            if k == 4:
                v.value = np.asfortranarray(np.linspace(-1, 1, 27, dtype=np.float32)
                                            .reshape(9, 3))
            out.append(float(step(xb, yb)))
        return out, [w.value.copy(), b.value.copy(), v.value.copy()], step
    got, gp, step = train("cuda")
    want, wp, _ = train("numpy")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(gp, wp):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert next(iter(step.function._cache.values())).graph_launches == 5


def test_a_bad_label_in_a_replayed_step_raises_and_changes_nothing(fake):
    """The label check's record is reset and read back inside the graph: a bad label
    raises the reference's error, no parameter changes, and later steps are right."""
    batches = _batches(5)
    step, params = _sgd_step("cuda")
    ref, rparams = _sgd_step("numpy")
    for xb, yb in batches[:3]:
        step(xb, yb), ref(xb, yb)
    runner = next(iter(step.function._cache.values()))
    assert runner._graph is not None and runner.prog.check_buf is not None
    before = [p.value.copy() for p in params]
    bad = batches[3][1].copy()
    bad[4] = 3                                   # 3 classes: labels lie in [0, 3)
    with pytest.raises(IndexError, match="out of range"):
        step(batches[3][0], bad)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.value, b)
    for xb, yb in batches[3:]:
        np.testing.assert_allclose(float(step(xb, yb)), float(ref(xb, yb)), rtol=1e-5)
    for p, q in zip(params, rparams):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-6)
    assert runner.graph_launches == 5            # the failing call was a replay too
