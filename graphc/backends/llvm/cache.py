"""Disk cache of compiled object code.

Key: SHA-256 of the kernel program (kernel IR text, buffer layout, table
slots), the thread count and profiling flag, the host CPU name and features,
graphc's version, the code generator's version and llvmlite's version.  The
kernel IR fully determines the LLVM IR we generate, so a hit skips IR
generation, optimization and code generation.

Entry file: magic, SHA-256 of the payload, payload (the object file).  A
missing, truncated or corrupt entry (checksum mismatch, or an object LLVM
refuses) is ignored and rebuilt; it never crashes the process.  Directory:
GRAPHC_CACHE_DIR, else ~/.cache/graphc/llvm; GRAPHC_CACHE=0 disables it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

MAGIC = b"GRAPHC-OBJ-1\n"
CODEGEN_VERSION = "4"


def enabled() -> bool:
    return os.environ.get("GRAPHC_CACHE", "1") not in ("0", "")


def cache_dir() -> str:
    d = os.environ.get("GRAPHC_CACHE_DIR")
    if not d:
        d = os.path.join(os.path.expanduser("~"), ".cache", "graphc", "llvm")
    return d


_SRC_HASH = []


def _source_hash() -> str:
    """Hash of the code generator's own source: editing it invalidates old entries."""
    if not _SRC_HASH:
        h = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        kdir = os.path.join(os.path.dirname(os.path.dirname(here)), "kernel")
        for d in (here, kdir):
            for name in sorted(os.listdir(d)):
                if name.endswith(".py"):
                    with open(os.path.join(d, name), "rb") as f:
                        h.update(f.read())
        _SRC_HASH.append(h.hexdigest())
    return _SRC_HASH[0]


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _target_parts(target) -> list:
    import llvmlite
    return [CODEGEN_VERSION, _source_hash(), llvmlite.__version__, target["cpu"],
            target["features"], target["triple"]]


def key(prog, calls, nthreads, profile, target) -> str | None:
    if not enabled():
        return None
    import graphc
    return _digest(_target_parts(target) + [
        graphc.__version__, str(nthreads), str(bool(profile)), repr(calls),
        repr([(b.dtype.str, b.size, b.scope) for b, _ in prog.externals])]
        + [k.format() for k in prog.kernels])


def text_key(text: str, target) -> str | None:
    """Key for a module given as LLVM IR text (the worker pool's), same inputs otherwise."""
    if not enabled():
        return None
    return _digest(_target_parts(target) + [text])


def _path(k):
    return os.path.join(cache_dir(), k[:2], k + ".o")


def store(k, data: bytes) -> None:
    if k is None:
        return
    path = _path(k)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).digest() + data)
        os.replace(tmp, path)     # atomic: readers see the old entry or the new one
    except OSError:
        pass                      # a read-only or full disk only costs speed


def read(k) -> bytes | None:
    try:
        with open(_path(k), "rb") as f:
            raw = f.read()
    except OSError:
        return None
    head = len(MAGIC) + 32
    if len(raw) <= head or not raw.startswith(MAGIC):
        return None
    data = raw[head:]
    if hashlib.sha256(data).digest() != raw[len(MAGIC):head]:
        return None
    return data


def load(k):
    """(engine, entry address) from the cache, or None."""
    if k is None:
        return None
    data = read(k)
    if data is None:
        return None
    from .objgen import load_object
    return load_object(data, "entry")
