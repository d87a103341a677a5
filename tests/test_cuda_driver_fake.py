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

    def __init__(self):
        self.calls = []
        self.mem = {}
        self.functions = {}
        self.pending_program = None
        self.real_checked = 0

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
        return SUCCESS, b"CUDA_ERROR_FAKE"

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
        return SUCCESS, cu.CUfunction(handle)

    def cuModuleUnload(self, module):
        return (SUCCESS,)

    def cuMemAlloc(self, n):
        self._log("cuMemAlloc", n)
        a = np.zeros(n + 256, np.uint8)
        p = a.ctypes.data + (-a.ctypes.data) % 256
        self.mem[p] = a
        return SUCCESS, cu.CUdeviceptr(p)

    def cuMemFree(self, p):
        self._log("cuMemFree", p)
        self.mem.pop(int(p), None)
        return (SUCCESS,)

    def cuMemcpyHtoD(self, dst, src, n):
        self._log("cuMemcpyHtoD", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuMemcpyDtoH(self, dst, src, n):
        self._log("cuMemcpyDtoH", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuMemcpyDtoD(self, dst, src, n):
        self._log("cuMemcpyDtoD", dst, src, n)
        ctypes.memmove(int(dst), int(src), n)
        return (SUCCESS,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        self._log("cuLaunchKernel", f, gx, gy, gz, bx, by, bz, smem, stream, params, extra)
        assert bx * by * bz <= 1024 and gy <= 65535 and gz <= 65535 and smem == 0
        g = (ctypes.c_uint * 3)(gx, gy, gz)
        b = (ctypes.c_uint * 3)(bx, by, bz)
        assert self.functions[int(f)](ctypes.addressof(g), ctypes.addressof(b), params) == 0
        return (SUCCESS,)

    def cuCtxSynchronize(self):
        self._log("cuCtxSynchronize")
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


def test_driver_path_trains_an_mlp_like_numpy(fake):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((13, 6)).astype(np.float32)
    Y = rng.integers(0, 3, 13)

    def run(backend):
        r = np.random.default_rng(1)
        w1 = gc.Parameter((r.standard_normal((6, 70)) * 0.3).astype(np.float32), name="w1")
        w2 = gc.Parameter((r.standard_normal((70, 3)) * 0.3).astype(np.float32), name="w2")
        x, y = gc.input("x", (13, 6)), gc.input("y", (13,), dtype="int64")
        loss = gc.cross_entropy(gc.relu(x @ w1) @ w2, y)
        g1, g2 = gc.grad(loss, [w1, w2])
        f = gc.compile([x, y], loss, updates={w1: w1 - 0.3 * g1, w2: w2 - 0.3 * g2},
                       backend=backend)
        return [float(f(X, Y)) for _ in range(4)], f

    got, f = run("cuda")
    want, _ = run("numpy")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert isinstance(C.select_runtime(), R.DriverRuntime)
    assert C.select_runtime().arch == "sm_90"
    assert fake.real_checked == len(fake.calls)     # every call type-checked by the real binding
    runner = next(iter(f._cache.values()))
    assert runner.uploads == 2                       # parameters sent once, then kept on device
    fake.calls.clear()
    f(X, Y)
    # one step: the 2 inputs in and the label check's record reset, the parameters
    # refreshed on the device from the previous step's update outputs, kernels in order,
    # the record read back, the 3 outputs (loss, 2 updates) out
    assert fake.calls.count("cuMemcpyHtoD") == 3 and fake.calls.count("cuMemcpyDtoD") == 2
    assert fake.calls.count("cuMemcpyDtoH") == 4
    n_launch = fake.calls.count("cuLaunchKernel")
    assert n_launch == runner.cprog.launch_count() > 5
    assert fake.calls.index("cuCtxSynchronize") > max(
        k for k, c in enumerate(fake.calls) if c == "cuLaunchKernel")
    del f, runner
    import gc as pygc
    pygc.collect()
    assert "cuMemFree" in fake.calls                 # a dropped function frees its memory


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
