"""The trusted on-disk store behind the backends' compile caches.

A compile-cache entry is native code that this process will run (LLVM object
code, a CUDA cubin, the CUDA emulator's shared library), so reading one is a
matter of trust, not only of speed: whoever can write the cache directory can
run code in every process that uses it (docs/architecture.md, "The compile
caches", states the model).  This module is the part of that defence that
does not depend on what the payload is; each backend's cache module decides
the keys, the file names and what to do with the bytes.  It imports nothing
of graphc, so every backend may use it without importing another backend.

Directory: created owner-only (0700).  One owned by another user, or writable
by group or others, is not used: one RuntimeWarning per directory, cache and
process, and every compile happens in memory.  It holds a secret
(`secret.key`, 32 random bytes, 0600), made at the first use.

Entry: MAGIC (which cache and which kind of payload), the key (64 hex digits),
an HMAC-SHA256 of MAGIC, the key and the payload under the directory's
secret, then the payload.  Written atomically (a private temporary file, then
rename).  Read by opening without following links and without blocking,
requiring a regular file owned by this user and not writable by others, of at
most the caller's size cap, then checking the magic, the key and the digest.
Anything else -- missing, truncated, garbled, stored under another key or as
another kind, a link, a FIFO, a device -- reads as "no entry": the caller
rebuilds it, never hangs and never runs it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tempfile
import warnings

KEY_LEN = 64                      # hex digits of a SHA-256
MAC_LEN = 32
SECRET_NAME = "secret.key"
SECRET_LEN = 32


def enabled() -> bool:
    """False when GRAPHC_CACHE=0 (or empty) turns every compile cache off."""
    return os.environ.get("GRAPHC_CACHE", "1") not in ("0", "")


def valid_key(k) -> bool:
    return (isinstance(k, str) and len(k) == KEY_LEN
            and all(c in "0123456789abcdef" for c in k))


def header_len(magic: bytes) -> int:
    return len(magic) + KEY_LEN + MAC_LEN


# ------------------------------------------------------------------ the directory
def _euid():
    return os.geteuid() if hasattr(os, "geteuid") else None


def untrusted(st, what) -> str | None:
    """Why a file or directory with stat `st` cannot be trusted, or None."""
    uid = _euid()
    if uid is not None and st.st_uid != uid:
        return f"{what} is owned by user {st.st_uid}, not by this user ({uid})"
    if st.st_mode & 0o022:
        return (f"{what} is writable by group or others (mode "
                f"{oct(stat.S_IMODE(st.st_mode))})")
    return None


def read_trusted(path, limit) -> bytes | None:
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
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit or untrusted(st, path):
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


def secret(d) -> bytes:
    """The directory's HMAC secret, created (atomically) at the first use."""
    path = os.path.join(d, SECRET_NAME)
    data = read_trusted(path, SECRET_LEN)
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
    data = read_trusted(path, SECRET_LEN)
    if data is None or len(data) != SECRET_LEN:
        raise OSError(f"cannot read back {path}")
    return data


def open_dir(d, what: str, known: dict, stacklevel: int = 2):
    """(directory, secret) for the cache directory `d`, or None when it cannot be trusted.

    `what` names the cache in the warning ("the LLVM object cache"); `known` is the
    caller's memo (directory -> secret or None), so each cache decides -- and warns --
    once per directory and process."""
    d = os.path.abspath(d)
    if d in known:
        s = known[d]
        return (d, s) if s is not None else None
    why = None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
        why = untrusted(st, f"the directory {d}")
        if why is None and not stat.S_ISDIR(st.st_mode):
            why = f"{d} is not a directory"
        s = None if why else secret(d)
    except OSError as e:
        why, s = f"{d} cannot be used ({e})", None
    if why is not None:
        # Whoever can write the cache can run code in this process: refuse it.
        warnings.warn(f"graphc: not using {what}: {why}.  Anyone who can "
                      f"write there could run code in this process; compiling in memory "
                      f"instead.  Use a directory only you can write (chmod 700), or set "
                      f"GRAPHC_CACHE_DIR (GRAPHC_CACHE=0 turns the cache off).",
                      RuntimeWarning, stacklevel=stacklevel + 1)
    known[d] = s
    return (d, s) if s is not None else None


# ------------------------------------------------------------------ entries
def mac(secret_: bytes, magic: bytes, k: str, data: bytes) -> bytes:
    h = hmac.new(secret_, magic, hashlib.sha256)
    h.update(k.encode())
    h.update(data)
    return h.digest()


def store(path, magic: bytes, k: str, secret_: bytes, data: bytes, limit: int) -> None:
    """Write `data` as the entry for key `k` at `path` (atomically, mode 0600, parent
    directories 0700).  Failing to write only costs speed: errors are swallowed."""
    if not valid_key(k) or len(data) + header_len(magic) > limit:
        return
    try:
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, suffix=".tmp")   # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(magic + k.encode() + mac(secret_, magic, k, data) + data)
            os.replace(tmp, path)     # atomic: readers see the old entry or the new one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass                          # a read-only or full disk only costs speed


def read(path, magic: bytes, k: str, secret_: bytes, limit: int) -> bytes | None:
    """The payload stored at `path` for key `k`, or None: no entry, or one that is not
    exactly what this user's graphc stored there under this magic and key."""
    if not valid_key(k):
        return None
    raw = read_trusted(path, limit)
    head = header_len(magic)
    if raw is None or len(raw) <= head or not raw.startswith(magic):
        return None
    if raw[len(magic):len(magic) + KEY_LEN] != k.encode():
        return None                   # an entry of another key, copied here
    data = raw[head:]
    if not hmac.compare_digest(raw[len(magic) + KEY_LEN:head], mac(secret_, magic, k, data)):
        return None
    return data
