"""CUDA C -> PTX and cubin (NVRTC in process, nvcc as fallback), `ptxas -v`
resource reports, and the host build of the same source for the emulator.

Everything compiled is cached on disk under GRAPHC_CACHE_DIR (default
~/.cache/graphc/cuda; GRAPHC_CACHE=0 disables it), keyed by the SHA-256 of the
source, the target architecture, the compiler and its version, so a graph
compiles once per machine.  A cubin and the emulator's library are native
code this process runs, so the cache is graphc/diskcache.py's trusted store
(docs/architecture.md, "The compile caches"): an owner-only directory (one
writable by others is refused with a warning), entries bound to their full
key and kind by an HMAC under the directory's secret, read without following
links, without blocking and up to a size cap.  An entry that fails any check
is rebuilt.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from ... import diskcache
from ...ir.errors import GraphcError

DEFAULT_ARCH = "sm_90"      # H100
HERE = os.path.dirname(os.path.abspath(__file__))
EMU_HEADER = os.path.join(HERE, "gc_cuda_emu.h")
SOURCE_NAME = "graphc_kernels.cu"

# One magic per kind of entry: the digest covers it, so a PTX entry cannot pass for a
# cubin, nor a cubin for an emulator library, under the same key.
PTX_MAGIC = b"GRAPHC-CUDA-PTX-1\n"
CUBIN_MAGIC = b"GRAPHC-CUDA-CUBIN-1\n"
EMU_MAGIC = b"GRAPHC-CUDA-EMU-1\n"
MAX_ENTRY_BYTES = 256 << 20       # a large graph's module is a few MB


class CudaCompileError(GraphcError):
    """The generated CUDA source did not compile; the message quotes the lines."""


def cache_enabled() -> bool:
    return diskcache.enabled()


def cache_dir() -> str:
    """GRAPHC_CACHE_DIR (shared with the LLVM backend; names do not collide), else
    ~/.cache/graphc/cuda."""
    return os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                              ".cache", "graphc", "cuda")


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


_dirs: dict = {}                  # cache dir -> its secret, or None: not trusted, not used


def _open_cache():
    """(directory, secret), or None when the cache is off or its directory is not trusted
    (then one RuntimeWarning per directory and process)."""
    if not cache_enabled():
        return None
    return diskcache.open_dir(cache_dir(), "the CUDA compile cache", _dirs, stacklevel=5)


def _cache_read(name, magic, k) -> bytes | None:
    where = _open_cache()
    if where is None:
        return None
    d, secret = where
    return diskcache.read(os.path.join(d, name), magic, k, secret, MAX_ENTRY_BYTES)


def _cache_store(name, magic, k, data: bytes) -> None:
    where = _open_cache()
    if where is not None:
        d, secret = where
        diskcache.store(os.path.join(d, name), magic, k, secret, data, MAX_ENTRY_BYTES)


def quote_errors(log: str, source: str, name=SOURCE_NAME, context=2) -> str:
    """The compiler log followed by the generated lines it points at."""
    lines = source.splitlines()
    nums = sorted({int(m.group(1)) for m in re.finditer(
        re.escape(name) + r"[(:](\d+)", log)})
    out = [log.strip()]
    for n in nums[:5]:
        out.append(f"--- {name} around line {n}:")
        for k in range(max(1, n - context), min(len(lines), n + context) + 1):
            out.append(f"{'>' if k == n else ' '}{k:5d} | {lines[k - 1]}")
    return "\n".join(out)


# ------------------------------------------------------------------ NVRTC / nvcc
def nvrtc_version():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return None
    err, major, minor = nvrtc.nvrtcVersion()
    return (major, minor) if int(err) == 0 else None


def nvcc_path():
    for p in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if p and os.path.exists(p):
            return p
    return None


def _check(err, what):
    if int(err) != 0:
        from cuda.bindings import nvrtc
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise CudaCompileError(f"NVRTC {what} failed: {msg.decode() if msg else err}")


def _nvrtc_compile(source: str, arch: str):
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), SOURCE_NAME.encode(), 0, [], [])
    _check(err, "create")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-lineinfo"]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\0 ").decode(errors="replace")
        if int(res) != 0:
            raise CudaCompileError("NVRTC could not compile the generated CUDA source:\n"
                                   + quote_errors(log, source))
        err, n = nvrtc.nvrtcGetPTXSize(prog)
        _check(err, "PTX size")
        ptx = b" " * n
        _check(nvrtc.nvrtcGetPTX(prog, ptx)[0], "get PTX")
        err, n = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "cubin size")
        cubin = b" " * n
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin)[0], "get cubin")
        return ptx.rstrip(b"\0"), cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvcc_compile(source: str, arch: str, nvcc: str):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, SOURCE_NAME)
        with open(src, "w") as f:
            f.write(source)
        outs = {}
        for kind in ("ptx", "cubin"):
            out = os.path.join(d, f"k.{kind}")
            r = subprocess.run([nvcc, f"-arch={arch}", "--std=c++17", "-lineinfo", f"--{kind}",
                                src, "-o", out], capture_output=True, text=True)
            if r.returncode:
                raise CudaCompileError("nvcc could not compile the generated CUDA source:\n"
                                       + quote_errors(r.stderr + r.stdout, source))
            with open(out, "rb") as f:
                outs[kind] = f.read()
        return outs["ptx"], outs["cubin"], ""


@dataclass
class Compiled:
    ptx: bytes
    cubin: bytes
    arch: str
    compiler: str
    log: str = ""
    cached: bool = False


def compile_cuda(source: str, arch: str = DEFAULT_ARCH, prefer: str = "nvrtc") -> Compiled:
    """PTX and cubin of `source` for `arch` (cached)."""
    ver = nvrtc_version()
    nvcc = nvcc_path()
    use = "nvrtc" if ver is not None and (prefer == "nvrtc" or nvcc is None) else "nvcc"
    if use == "nvcc" and nvcc is None:
        raise CudaCompileError("no CUDA compiler: pip install 'graphc[cuda]' (cuda-bindings "
                               "and nvidia-cuda-nvrtc 13.0.x) or put nvcc on PATH")
    if use == "nvrtc":
        tag = f"nvrtc-{ver[0]}.{ver[1]}"
    else:
        tag = "nvcc-" + subprocess.run([nvcc, "--version"], capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1]
    k = _key(source, arch, tag)
    ptx = _cache_read(f"cuda-{k}.ptx", PTX_MAGIC, k)
    cubin = _cache_read(f"cuda-{k}.cubin", CUBIN_MAGIC, k) if ptx is not None else None
    if cubin is not None:
        return Compiled(ptx, cubin, arch, tag, cached=True)
    if use == "nvrtc":
        ptx, cubin, log = _nvrtc_compile(source, arch)
    else:
        ptx, cubin, log = _nvcc_compile(source, arch, nvcc)
    _cache_store(f"cuda-{k}.ptx", PTX_MAGIC, k, ptx)
    _cache_store(f"cuda-{k}.cubin", CUBIN_MAGIC, k, cubin)
    return Compiled(ptx, cubin, arch, tag, log)


# ------------------------------------------------------------------ ptxas -v
@dataclass
class KernelResources:
    name: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    barriers: int = 0
    lines: list = field(default_factory=list)


def ptxas_path():
    for p in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if p and os.path.exists(p):
            return p
    return None


def ptxas_report(ptx: bytes, arch: str = DEFAULT_ARCH) -> dict:
    """{kernel name: KernelResources} from `ptxas -v` on the PTX."""
    exe = ptxas_path()
    if exe is None:
        raise CudaCompileError("ptxas not found")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "wb") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode:
        raise CudaCompileError(f"ptxas failed:\n{r.stderr}")
    return parse_ptxas(r.stderr + r.stdout)


def parse_ptxas(text: str) -> dict:
    """Resources per kernel (entry function).  Non-inlined device functions that
    ptxas also reports (e.g. libdevice's __internal_accurate_pow) are skipped:
    their figures belong to no launch."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '?([\w$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), KernelResources(m.group(1)))
            cur.lines.append(line.strip())
            continue
        m = re.search(r"Function properties for '?([\w$]+)'?", line)
        if m:
            cur = out.get(m.group(1))
            if cur is not None:
                cur.lines.append(line.strip())
            continue
        if cur is None:
            continue
        cur.lines.append(line.strip())
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur.stack_bytes, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            cur.barriers = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            cur.shared_bytes = int(s.group(1)) if s else 0
    return out


# ------------------------------------------------------------------ emulator build
def cxx_path():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_emulator(source: str, stubs: str, reuse: bool = True) -> bytes:
    """The bytes of a shared library of the exact CUDA `source` + launch `stubs`, built
    by the host C++ compiler with the emulator header (cached; `reuse=False` rebuilds
    and replaces the entry).  Load it with load_library."""
    cxx = cxx_path()
    if cxx is None:
        raise CudaCompileError("the CUDA emulator needs a host C++ compiler (g++ or clang++)")
    with open(EMU_HEADER) as f:
        header = f.read()
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = ["-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-fwrapv", "-w"]
    k = _key(source, stubs, header, ver, " ".join(flags))
    name = f"emu-{k}.so"
    if reuse:
        data = _cache_read(name, EMU_MAGIC, k)
        if data is not None:
            return data
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, SOURCE_NAME)
        with open(src, "w") as f:
            f.write(source)
        main = os.path.join(d, "graphc_emu_main.cpp")
        with open(main, "w") as f:
            f.write(f'#include "{SOURCE_NAME}"\n' + stubs)
        tmp = os.path.join(d, "lib.so")
        r = subprocess.run([cxx, *flags, "-include", EMU_HEADER, main, "-o", tmp, "-lm"],
                           capture_output=True, text=True, cwd=d)
        if r.returncode:
            raise CudaCompileError("the host compiler could not build the generated CUDA source "
                                   "for the emulator:\n" + quote_errors(r.stderr, source))
        with open(tmp, "rb") as f:
            data = f.read()
    _cache_store(name, EMU_MAGIC, k, data)
    return data


def load_library(data: bytes) -> ctypes.CDLL:
    """Load the shared library `data` (build_emulator's bytes) into this process.

    ctypes loads from a path, and a path in the cache could be rewritten between our
    check and the loader's open; so the verified bytes go to a fresh private directory
    (mkdtemp: 0700, ours), are loaded from there and unlinked at once: what is loaded
    is exactly what was verified.  The directory is made in the (trusted) cache
    directory when there is one -- the filesystem the library was loaded from
    before, which a noexec /tmp is not -- else in the system's temporary directory."""
    where = _open_cache()
    try:
        d = tempfile.mkdtemp(prefix="emu-load-", dir=where[0] if where else None)
    except OSError:
        d = tempfile.mkdtemp(prefix="graphc-emu-")
    path = os.path.join(d, "lib.so")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(path)
    finally:
        for rm, p in ((os.unlink, path), (os.rmdir, d)):
            try:
                rm(p)
            except OSError:
                pass
