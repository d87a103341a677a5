"""Disk cache of compiled object code.

An entry is native code that this process will run, so reading one is a
matter of trust, not only of speed (docs/architecture.md, "The object-code
cache", states the model: whoever can write the cache directory can run code
in every process that uses it).

Key: SHA-256 of the kernel program (kernel IR text, buffer layout, table
slots), the thread count and profiling flag, the host CPU name and features,
graphc's version, the source of every graphc module (any of them may change
the generated code: op lowerings, passes, the code generator) and llvmlite's
version.  The kernel IR fully determines the LLVM IR we generate, so a hit
skips IR generation, optimization and code generation.

Directory: GRAPHC_CACHE_DIR, else ~/.cache/graphc/llvm; GRAPHC_CACHE=0
disables the cache.  It is created owner-only (0700).  A directory owned by
another user, or writable by group or others, is not used: one warning, and
every compile happens in memory.

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
import hmac
import os
import stat
import tempfile
import warnings

MAGIC = b"GRAPHC-OBJ-2\n"
CODEGEN_VERSION = "4"
KEY_LEN = 64                      # hex digits of a SHA-256
MAC_LEN = 32
HEADER = len(MAGIC) + KEY_LEN + MAC_LEN
MAX_ENTRY_BYTES = 256 << 20       # a training step of a large net is a few MB
SECRET_NAME = "secret.key"
SECRET_LEN = 32


def enabled() -> bool:
    return os.environ.get("GRAPHC_CACHE", "1") not in ("0", "")


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
_dirs: dict = {}                  # cache dir -> its secret (bytes), or None: not used


def _euid():
    return os.geteuid() if hasattr(os, "geteuid") else None


def _untrusted(st, what) -> str | None:
    """Why a file or directory with stat `st` cannot be trusted, or None."""
    uid = _euid()
    if uid is not None and st.st_uid != uid:
        return f"{what} is owned by user {st.st_uid}, not by this user ({uid})"
    if st.st_mode & 0o022:
        return (f"{what} is writable by group or others (mode "
                f"{oct(stat.S_IMODE(st.st_mode))})")
    return None


def _secret(d) -> bytes:
    """The directory's HMAC secret, created (atomically) at the first use."""
    path = os.path.join(d, SECRET_NAME)
    data = _read_trusted(path, SECRET_LEN)
    if data is not None and len(data) == SECRET_LEN:
        return data
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")      # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SECRET_LEN))
        if data is not None:         # a damaged secret: replace it (old entries die)
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)   # fails if another process made one meanwhile
            except FileExistsError:
                pass
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    data = _read_trusted(path, SECRET_LEN)
    if data is None or len(data) != SECRET_LEN:
        raise OSError(f"cannot read back {path}")
    return data


def _open_dir():
    """(directory, secret), or None when the cache is off or cannot be trusted."""
    if not enabled():
        return None
    d = os.path.abspath(cache_dir())
    if d in _dirs:
        s = _dirs[d]
        return (d, s) if s is not None else None
    why = None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        why = _untrusted(os.stat(d), f"the directory {d}")
        if why is None and not stat.S_ISDIR(os.stat(d).st_mode):
            why = f"{d} is not a directory"
        secret = None if why else _secret(d)
    except OSError as e:
        why, secret = f"{d} cannot be used ({e})", None
    if why is not None:
        # Whoever can write the cache can run code in this process: refuse it.
        warnings.warn(f"graphc: not using the LLVM object cache: {why}.  Anyone who can "
                      f"write there could run code in this process; compiling in memory "
                      f"instead.  Use a directory only you can write (chmod 700), or set "
                      f"GRAPHC_CACHE_DIR (GRAPHC_CACHE=0 turns the cache off).",
                      RuntimeWarning, stacklevel=4)
    _dirs[d] = secret
    return (d, secret) if secret is not None else None


def _read_trusted(path, limit) -> bytes | None:
    """The bytes of `path` if it is a regular file (not a link) owned by this user, not
    writable by others, of at most `limit` bytes; else None.  Never blocks (a FIFO),
    never reads without bound (a device)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit or _untrusted(st, path):
            return None
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:            # it grew while we read
            return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _path(d, k):
    return os.path.join(d, k[:2], k + ".o")


def _mac(secret, k, data) -> bytes:
    h = hmac.new(secret, MAGIC, hashlib.sha256)
    h.update(k.encode())
    h.update(data)
    return h.digest()


def _valid_key(k) -> bool:
    return (isinstance(k, str) and len(k) == KEY_LEN
            and all(c in "0123456789abcdef" for c in k))


# ------------------------------------------------------------------ entries
def store(k, data: bytes) -> None:
    if k is None or not _valid_key(k) or len(data) + HEADER > MAX_ENTRY_BYTES:
        return
    where = _open_dir()
    if where is None:
        return
    d, secret = where
    path = _path(d, k)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")   # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + k.encode() + _mac(secret, k, data) + data)
            os.replace(tmp, path)     # atomic: readers see the old entry or the new one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass                          # a read-only or full disk only costs speed


def read(k) -> bytes | None:
    """The object code stored under `k`, or None (no entry, or one that is not exactly
    what this user's graphc stored under this key, or not a sound ELF object)."""
    if k is None or not _valid_key(k):
        return None
    where = _open_dir()
    if where is None:
        return None
    d, secret = where
    raw = _read_trusted(_path(d, k), MAX_ENTRY_BYTES)
    if raw is None or len(raw) <= HEADER or not raw.startswith(MAGIC):
        return None
    if raw[len(MAGIC):len(MAGIC) + KEY_LEN] != k.encode():
        return None                   # an entry of another key, copied here
    data = raw[HEADER:]
    if not hmac.compare_digest(raw[len(MAGIC) + KEY_LEN:HEADER], _mac(secret, k, data)):
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
