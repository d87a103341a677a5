"""Disk cache of compiled object code.

An entry is native code that this process will run, so reading one is a
matter of trust, not only of speed (docs/architecture.md, "The compile
caches", states the model: whoever can write the cache directory can run code
in every process that uses it).

Key: SHA-256 of the kernel program (kernel IR text, buffer layout, table
slots), the thread count and profiling flag, the host CPU name and features,
graphc's version, the source of every graphc module (any of them may change
the generated code: op lowerings, passes, the code generator) and llvmlite's
version.  The kernel IR fully determines the LLVM IR we generate, so a hit
skips IR generation, optimization and code generation.

Directory: GRAPHC_CACHE_DIR, else ~/.cache/graphc/llvm; GRAPHC_CACHE=0
disables the cache.  The directory rules, the entry format and the bounded
read below are graphc/diskcache.py's, shared with the CUDA backend's cache.
The directory is created owner-only (0700).  One owned by another user, or
writable by group or others, is not used: one warning, and every compile
happens in memory.

Entry file `<key[:2]>/<key>.o`: MAGIC, the key (64 hex digits), an HMAC-SHA256
of the key and the payload under a per-directory secret (`secret.key`, 32
random bytes, mode 0600), then the payload (the object file).  Reading opens
the file without following links and without blocking, requires a regular
file owned by this user and not writable by others, of at most
MAX_ENTRY_BYTES, checks the key and the digest, and checks the payload's ELF
structure (elfcheck.py) before LLVM sees it.  Anything else -- missing,
truncated, garbled, stored under another key, a link, a FIFO, a device -- is
ignored and rebuilt; it never hangs or crashes the process.
"""
from __future__ import annotations

import hashlib
import os

from ... import diskcache
from ...diskcache import KEY_LEN, MAC_LEN, SECRET_LEN, SECRET_NAME  # noqa: F401 (re-exported)

MAGIC = b"GRAPHC-OBJ-2\n"
CODEGEN_VERSION = "4"
HEADER = diskcache.header_len(MAGIC)
MAX_ENTRY_BYTES = 256 << 20       # a training step of a large net is a few MB

enabled = diskcache.enabled


def cache_dir() -> str:
    d = os.environ.get("GRAPHC_CACHE_DIR")
    if not d:
        d = os.path.join(os.path.expanduser("~"), ".cache", "graphc", "llvm")
    return d


_SRC_HASH = []


def _source_hash() -> str:
    """Hash of graphc's own source: editing anything that can change generated code --
    an op's lowering, a pass, the kernel IR, the code generator -- invalidates old
    entries.  Computed once per process."""
    if not _SRC_HASH:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _SRC_HASH.append(tree_hash(root))
    return _SRC_HASH[0]


def tree_hash(root) -> str:
    """SHA-256 of every .py file under `root`, with its relative path."""
    h = hashlib.sha256()
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = [s for s in subdirs if s != "__pycache__"]
        files += [os.path.join(d, nm) for nm in names if nm.endswith(".py")]
    for path in sorted(files):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


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


# ------------------------------------------------------------------ the directory
# The directory's trust check, its secret, the entry format and the bounded read are
# shared with the CUDA backend's cache (graphc/diskcache.py).
_dirs: dict = {}                  # cache dir -> its secret (bytes), or None: not used


def _open_dir():
    """(directory, secret), or None when the cache is off or cannot be trusted."""
    if not enabled():
        return None
    return diskcache.open_dir(cache_dir(), "the LLVM object cache", _dirs, stacklevel=4)


def _path(d, k):
    return os.path.join(d, k[:2], k + ".o")


def _mac(secret, k, data) -> bytes:
    return diskcache.mac(secret, MAGIC, k, data)


# ------------------------------------------------------------------ entries
def store(k, data: bytes) -> None:
    if k is None or not diskcache.valid_key(k) or len(data) + HEADER > MAX_ENTRY_BYTES:
        return
    where = _open_dir()
    if where is None:
        return
    d, secret = where
    diskcache.store(_path(d, k), MAGIC, k, secret, data, MAX_ENTRY_BYTES)


def read(k) -> bytes | None:
    """The object code stored under `k`, or None (no entry, or one that is not exactly
    what this user's graphc stored under this key, or not a sound ELF object)."""
    if k is None or not diskcache.valid_key(k):
        return None
    where = _open_dir()
    if where is None:
        return None
    d, secret = where
    data = diskcache.read(_path(d, k), MAGIC, k, secret, MAX_ENTRY_BYTES)
    if data is None:
        return None
    from .elfcheck import BadObject, check
    try:
        check(data)
    except BadObject:
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
