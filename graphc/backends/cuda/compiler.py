"""CUDA C -> PTX and cubin (NVRTC in process, nvcc as fallback), `ptxas -v`
resource reports, and the host build of the same source for the emulator.

Everything compiled is cached on disk under GRAPHC_CACHE_DIR (default
~/.cache/graphc/cuda; GRAPHC_CACHE=0 disables it), keyed by a hash of the
source, the target architecture, the compiler and its version, so a graph
compiles once per machine.  Entries are written atomically (rename).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from ...ir.errors import GraphcError

DEFAULT_ARCH = "sm_90"      # H100
HERE = os.path.dirname(os.path.abspath(__file__))
EMU_HEADER = os.path.join(HERE, "gc_cuda_emu.h")
SOURCE_NAME = "graphc_kernels.cu"


class CudaCompileError(GraphcError):
    """The generated CUDA source did not compile; the message quotes the lines."""


def cache_enabled() -> bool:
    return os.environ.get("GRAPHC_CACHE", "1") not in ("0", "")


def cache_dir() -> str:
    """GRAPHC_CACHE_DIR (shared with the LLVM backend; names do not collide), else
    ~/.cache/graphc/cuda."""
    d = os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "graphc", "cuda")
    os.makedirs(d, exist_ok=True)
    return d


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _atomic_write(path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
        raise CudaCompileError("no CUDA compiler: install graphc[cuda] (cuda-bindings and "
                               "nvidia-cuda-nvrtc 13.0.x) or put nvcc on PATH")
    if use == "nvrtc":
        tag = f"nvrtc-{ver[0]}.{ver[1]}"
    else:
        tag = "nvcc-" + subprocess.run([nvcc, "--version"], capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1]
    k = _key(source, arch, tag)
    base = os.path.join(cache_dir(), "cuda-" + k)
    if cache_enabled() and os.path.exists(base + ".cubin") and os.path.exists(base + ".ptx"):
        with open(base + ".ptx", "rb") as f:
            ptx = f.read()
        with open(base + ".cubin", "rb") as f:
            cubin = f.read()
        return Compiled(ptx, cubin, arch, tag, cached=True)
    if use == "nvrtc":
        ptx, cubin, log = _nvrtc_compile(source, arch)
    else:
        ptx, cubin, log = _nvcc_compile(source, arch, nvcc)
    if cache_enabled():
        _atomic_write(base + ".ptx", ptx)
        _atomic_write(base + ".cubin", cubin)
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


def build_emulator(source: str, stubs: str) -> str:
    """Shared library of the exact CUDA `source` + launch `stubs`, built by the host C++
    compiler with the emulator header; returns its path (cached)."""
    cxx = cxx_path()
    if cxx is None:
        raise CudaCompileError("the CUDA emulator needs a host C++ compiler (g++ or clang++)")
    with open(EMU_HEADER) as f:
        header = f.read()
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = ["-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-fwrapv", "-w"]
    k = _key(source, stubs, header, ver, " ".join(flags))
    lib = os.path.join(cache_dir() if cache_enabled() else tempfile.mkdtemp(), f"emu-{k}.so")
    if os.path.exists(lib):
        return lib
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
            _atomic_write(lib, f.read())
    return lib
