"""The CUDA backend's compile cache as an attacker or a damaged disk sees it: a cubin
and the emulator's shared library are native code this process runs, so an entry
must be bound to its full key, come from a directory only this user can write,
and never hang or exhaust memory however it was damaged (compiler.py, on
graphc/diskcache.py).  Runs without a GPU: NVRTC compiles the cubins, the host
C++ compiler the emulator's libraries.

The emulator cases run in a child process: a library already loaded in this
process would be found by path and hide what is on disk."""
import glob
import os
import shutil
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_CXX = compiler.cxx_path() is not None
HAVE_NVRTC = compiler.nvrtc_version() is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="the CUDA emulator needs g++/clang++")
needs_nvrtc = pytest.mark.skipif(not HAVE_NVRTC,
                                 reason="NVRTC (cuda-bindings + nvidia-cuda-nvrtc) not installed")

V = np.linspace(-2, 2, 33).astype(np.float32)


def kernel(scale):
    return ('extern "C" __global__ void k(float* a) {\n'
            f'  a[threadIdx.x] = a[threadIdx.x] * {scale:.1f}f - 1.0f;\n'
            '}\n')


@pytest.fixture(autouse=True)
def _fresh_dir_state(monkeypatch):
    # The trust decision is made once per directory and process: forget it per test.
    if hasattr(compiler, "_dirs"):
        monkeypatch.setattr(compiler, "_dirs", {})


def _one(pattern, before=()):
    (path,) = set(glob.glob(pattern)) - set(before)
    return path


def _payload(entry_path, magic_start=b"\x7fELF"):
    """The library or cubin inside an entry file, whatever its header."""
    with open(entry_path, "rb") as f:
        data = f.read()
    return data[data.index(magic_start):]


# ------------------------------------------------------------------ cubin and PTX
@needs_nvrtc
def test_cubin_entry_copied_under_another_key_or_tampered_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    a = compiler.compile_cuda(kernel(2), arch="sm_80")
    cub_a = _one(str(tmp_path / "*.cubin"))
    ptx_a = cub_a[:-len(".cubin")] + ".ptx"
    b = compiler.compile_cuda(kernel(3), arch="sm_80")
    cub_b = _one(str(tmp_path / "*.cubin"), [cub_a])
    ptx_b = cub_b[:-len(".cubin")] + ".ptx"
    assert b"2.0" not in b.ptx and a.ptx != b.ptx
    assert compiler.compile_cuda(kernel(3), arch="sm_80").cached      # a sound entry is used

    # a valid entry of kernel(2), copied under kernel(3)'s key
    shutil.copyfile(cub_a, cub_b)
    shutil.copyfile(ptx_a, ptx_b)
    got = compiler.compile_cuda(kernel(3), arch="sm_80")
    assert not got.cached and got.ptx == b.ptx and got.cubin == b.cubin
    again = compiler.compile_cuda(kernel(3), arch="sm_80")       # stored again, own key
    assert again.cached and again.cubin == b.cubin

    # the previous (unkeyed) format: the bare cubin and PTX of another kernel
    with open(cub_b, "wb") as f:
        f.write(a.cubin)
    with open(ptx_b, "wb") as f:
        f.write(a.ptx)
    got = compiler.compile_cuda(kernel(3), arch="sm_80")
    assert not got.cached and got.cubin == b.cubin and got.ptx == b.ptx

    # one byte of the stored cubin changed, header kept
    with open(cub_b, "rb") as f:
        raw = bytearray(f.read())
    raw[-8] ^= 0xFF
    with open(cub_b, "wb") as f:
        f.write(bytes(raw))
    got = compiler.compile_cuda(kernel(3), arch="sm_80")
    assert not got.cached and got.cubin == b.cubin

    # a cubin entry does not pass for the PTX of the same key (the kind is bound too)
    shutil.copyfile(cub_b, ptx_b)
    got = compiler.compile_cuda(kernel(3), arch="sm_80")
    assert not got.cached and got.ptx == b.ptx


# ------------------------------------------------------------------ in a child process
_CHILD = """
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.path.insert(0, {root!r})
import graphc as gc
from graphc.backends import cuda as C
from graphc.backends.cuda import compiler
what, scale = sys.argv[1], float(sys.argv[2])
if what == "emulator":
    C.set_options(emulate=True)
    x = gc.input("x", (33,))
    f = gc.compile([x], x * scale - 1.0, backend="cuda")
    v = np.linspace(-2, 2, 33).astype(np.float32)
    np.testing.assert_allclose(f(v), v * scale - 1, rtol=1e-6)
else:
    src = {kernel!r}.replace("SCALE", "%.1f" % scale)
    got = compiler.compile_cuda(src, arch="sm_80")
    import os
    os.environ["GRAPHC_CACHE"] = "0"
    want = compiler.compile_cuda(src, arch="sm_80")
    assert got.ptx == want.ptx and got.cubin == want.cubin
print("ok")
"""


def _child(cache_dir, what, scale):
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    code = _CHILD.format(root=ROOT, kernel=kernel(9).replace("9.0", "SCALE"))
    try:
        p = subprocess.run([sys.executable, "-c", code, what, str(scale)], env=env,
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the compile hung on the damaged cache entry")
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])


@needs_cxx
def test_emulator_library_copied_under_another_key_is_refused(tmp_path):
    _child(tmp_path, "emulator", 2.0)
    lib_a = _one(str(tmp_path / "emu-*.so"))
    _child(tmp_path, "emulator", 3.0)
    lib_b = _one(str(tmp_path / "emu-*.so"), [lib_a])
    shutil.copyfile(lib_a, lib_b)        # x*2-1's library under x*3-1's key
    _child(tmp_path, "emulator", 3.0)    # right values: refused and rebuilt
    with open(lib_b, "rb") as f:
        assert f.read() != _payload(lib_a)
    with open(lib_b, "wb") as f:         # the previous format: the bare library
        f.write(_payload(lib_a))
    _child(tmp_path, "emulator", 3.0)
    with open(lib_b, "rb") as f:
        assert f.read() != _payload(lib_a)   # replaced by a keyed entry


@pytest.mark.parametrize("entry,kind", [("emulator", "fifo"), ("cubin", "fifo"),
                                        ("cubin", "symlink to /dev/zero")])
def test_entry_that_is_not_a_small_regular_file_does_not_hang(tmp_path, entry, kind):
    if entry == "emulator" and not HAVE_CXX or entry == "cubin" and not HAVE_NVRTC:
        pytest.skip("no compiler for this kind of entry")
    _child(tmp_path, entry, 3.0)
    e = _one(str(tmp_path / ("emu-*.so" if entry == "emulator" else "cuda-*.cubin")))
    os.unlink(e)
    if kind == "fifo":
        os.mkfifo(e, 0o600)              # opening it used to block forever
    else:
        os.symlink("/dev/zero", e)       # reading it used to never end
    _child(tmp_path, entry, 3.0)
    assert stat.S_ISREG(os.lstat(e).st_mode)   # replaced by a real entry


# ------------------------------------------------------------------ the directory
@needs_cxx
def test_directory_is_owner_only_and_unsafe_ones_are_refused(tmp_path, monkeypatch):
    C.set_options(emulate=True)
    try:
        d = tmp_path / "new" / "cache"
        monkeypatch.setenv("GRAPHC_CACHE_DIR", str(d))
        x = gc.input("x", (33,))
        f = gc.compile([x], x * 2.0 - 1.0, backend="cuda")
        np.testing.assert_allclose(f(V), V * 2 - 1, rtol=1e-6)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        names = os.listdir(d)
        assert sorted(n.split("-")[0] for n in names) == ["emu", "secret.key"], names
        for n in names:                  # nothing but the entry and the secret left behind
            assert stat.S_IMODE(os.stat(d / n).st_mode) == 0o600

        shared = tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        monkeypatch.setenv("GRAPHC_CACHE_DIR", str(shared))
        with pytest.warns(RuntimeWarning, match=r"not using the CUDA compile cache.*writable "
                                                r"by group or others \(mode 0o777\)"):
            f = gc.compile([x], x * 4.0 - 1.0, backend="cuda")
            np.testing.assert_allclose(f(V), V * 4 - 1, rtol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # one warning per directory, not per compile
            f = gc.compile([x], x * 5.0 - 1.0, backend="cuda")
            np.testing.assert_allclose(f(V), V * 5 - 1, rtol=1e-6)
        assert os.listdir(shared) == []         # nothing written, nothing read
    finally:
        C.set_options(emulate=None)


# ------------------------------------------------------------------ install hints
def test_install_hints_quote_the_extra(monkeypatch):
    # `pip install graphc[cuda]` unquoted is a glob pattern in zsh ("no matches found")
    from graphc.backends.cuda import runtime as R
    monkeypatch.setattr(R, "_driver", lambda: None)
    ok, why = R.gpu_available()
    assert not ok and "pip install 'graphc[cuda]'" in why
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: None)
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    with pytest.raises(compiler.CudaCompileError, match=r"pip install 'graphc\[cuda\]'"):
        compiler.compile_cuda(kernel(2))
