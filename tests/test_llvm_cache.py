"""The LLVM object-code cache as an attacker or a damaged disk sees it: an entry is
native code this process runs, so it must be bound to its key, come from a
directory only this user can write, and never hang, exhaust memory or crash
the process however it was damaged (cache.py, elfcheck.py)."""
import glob
import hashlib
import os
import stat
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc.backends.llvm import cache, elfcheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = np.linspace(-2, 2, 33).astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_dir_state(monkeypatch):
    # The trust decision is made once per directory and process: forget it per test.
    monkeypatch.setattr(cache, "_dirs", {})


def _entries(root):
    return sorted(glob.glob(os.path.join(str(root), "*", "*.o")))


def _compile(scale):
    x = gc.input("x", (33,))
    return gc.compile([x], x * scale - 1.0, backend="llvm")


def test_entry_copied_under_another_key_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    np.testing.assert_allclose(_compile(2.0)(V), V * 2 - 1, rtol=1e-6)
    (a,) = _entries(tmp_path)
    np.testing.assert_allclose(_compile(3.0)(V), V * 3 - 1, rtol=1e-6)
    (b,) = set(_entries(tmp_path)) - {a}
    with open(a, "rb") as f:
        entry_a = f.read()
    with open(b, "wb") as f:      # a valid entry, but of x*2-1, under x*3-1's key
        f.write(entry_a)
    np.testing.assert_allclose(_compile(3.0)(V), V * 3 - 1, rtol=1e-6)
    kb = os.path.basename(b)[:-2]
    assert cache.read(kb) is not None                      # rebuilt under its own key
    assert cache.read(kb) != cache.read(os.path.basename(a)[:-2])


def test_directory_is_owner_only_and_unsafe_ones_are_refused(monkeypatch, tmp_path):
    d = tmp_path / "new" / "cache"
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(d))
    np.testing.assert_allclose(_compile(2.0)(V), V * 2 - 1, rtol=1e-6)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    (e,) = _entries(d)
    assert stat.S_IMODE(os.stat(e).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(d / cache.SECRET_NAME).st_mode) == 0o600

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match=r"not using the LLVM object cache.*writable by "
                                            r"group or others \(mode 0o777\)"):
        np.testing.assert_allclose(_compile(2.0)(V), V * 2 - 1, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # one warning per directory, not per compile
        np.testing.assert_allclose(_compile(3.0)(V), V * 3 - 1, rtol=1e-6)
    assert os.listdir(shared) == []             # nothing written, nothing read


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a directory to another user needs root")
def test_directory_owned_by_another_user_is_refused(monkeypatch, tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4321, 4321)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(d))
    with pytest.warns(RuntimeWarning, match="owned by user 4321"):
        np.testing.assert_allclose(_compile(2.0)(V), V * 2 - 1, rtol=1e-6)
    assert os.listdir(d) == []


def test_old_format_and_foreign_entries_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    _compile(2.0)(V)
    (e,) = _entries(tmp_path)
    k = os.path.basename(e)[:-2]
    data = cache.read(k)
    assert data is not None
    with open(e, "wb") as f:      # the previous format: a checksum of the payload only
        f.write(b"GRAPHC-OBJ-1\n" + hashlib.sha256(data).digest() + data)
    assert cache.read(k) is None
    with open(e, "wb") as f:      # the right key, a digest made without the secret
        f.write(cache.MAGIC + k.encode() + hashlib.sha256(k.encode() + data).digest() + data)
    assert cache.read(k) is None
    os.chmod(e, 0o666)            # a sound entry, but anyone may rewrite it
    with open(e, "wb") as f:
        f.write(cache.MAGIC + k.encode() + cache._mac(cache._open_dir()[1], k, data) + data)
    assert cache.read(k) is None
    os.chmod(e, 0o600)
    assert cache.read(k) == data


# ------------------------------------------------------------------ in a child process
# Damaged entries that used to hang or abort the process: the compile runs in a
# child (with a time and address-space limit), which must finish with right values.
_CHILD = """
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
sys.path.insert(0, {root!r})
import graphc as gc
x = gc.input("x", (33,))
f = gc.compile([x], x * 3.0 - 1.0, backend="llvm")
v = np.linspace(-2, 2, 33).astype(np.float32)
np.testing.assert_allclose(f(v), v * 3 - 1, rtol=1e-6)
print("ok")
"""


def _child(cache_dir):
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])


def _section_of_type(data, want):
    """(offset, size) of the first section of ELF type `want` (2 symtab, 3 strtab, 4 rela)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    for i in range(shnum):
        _, typ, _, _, off, size, _, _, _, _ = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + 64 * i)
        if typ == want:
            return off, size
    raise AssertionError(f"no section of type {want}")


def _symtab_name_offset(data):
    """File offset of the st_name field of the last symbol of the object's symbol table."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    for i in range(shnum):
        _, typ, _, _, off, size, _, _, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + 64 * i)
        if typ == 2:
            return off + size - entsize
    raise AssertionError("no symbol table")


def test_corrupt_payload_with_recomputed_checksum_does_not_crash(tmp_path):
    _child(tmp_path)
    (e,) = _entries(tmp_path)
    k = os.path.basename(e)[:-2]
    with open(e, "rb") as f:
        data = f.read()[cache.HEADER:]
    bad = bytearray(data)
    struct.pack_into("<I", bad, _symtab_name_offset(data), 0x7FFFFFF0)  # past the strtab
    bad = bytes(bad)
    # as the previous format wrote it: LLVM's loader aborted the process on this
    with open(e, "wb") as f:
        f.write(b"GRAPHC-OBJ-1\n" + hashlib.sha256(bad).digest() + bad)
    _child(tmp_path)
    # with a valid key and digest (a graphc bug, or someone holding the secret): the
    # ELF check refuses it before LLVM sees it
    with open(os.path.join(tmp_path, cache.SECRET_NAME), "rb") as f:
        secret = f.read()
    with open(e, "wb") as f:
        f.write(cache.MAGIC + k.encode() + cache._mac(secret, k, bad) + bad)
    _child(tmp_path)
    with open(e, "rb") as f:
        assert f.read()[cache.HEADER:] == data          # recompiled and stored again


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "huge file"])
def test_entry_that_is_not_a_small_regular_file_is_ignored(tmp_path, kind):
    _child(tmp_path)
    (e,) = _entries(tmp_path)
    os.unlink(e)
    if kind == "fifo":
        os.mkfifo(e, 0o600)                # reading it used to block forever
    elif kind == "huge file":
        with open(e, "wb") as f:           # sparse: no disk used
            f.truncate(cache.MAX_ENTRY_BYTES + 1)
    else:
        os.symlink("/dev/zero", e)         # reading it used to never end
    _child(tmp_path)
    assert stat.S_ISREG(os.lstat(e).st_mode)   # replaced by a real entry


# ------------------------------------------------------------------ elfcheck alone
def _object(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    _compile(2.0)(V)
    (e,) = _entries(tmp_path)
    data = cache.read(os.path.basename(e)[:-2])
    elfcheck.check(data)                   # what LLVM produced passes
    return data


def test_elfcheck_refuses_tables_outside_the_file(tmp_path, monkeypatch):
    data = _object(tmp_path, monkeypatch)

    def damaged(offset, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    shoff, = struct.unpack_from("<Q", data, 0x28)
    cases = {
        "not an ELF file": data[:40],
        "section header table past the end": damaged(0x28, "<Q", len(data) - 64),
        "section-name table index": damaged(0x3E, "<H", 999),
        "lies past the end of the file": damaged(shoff + 64 + 0x20, "<Q", 1 << 40),
        "symbol name .* past the end": damaged(_symtab_name_offset(data), "<I", 0x7FFFFFF0),
        "names a section that does not exist": damaged(_symtab_name_offset(data) + 6, "<H",
                                                       500),
    }
    rela, _ = _section_of_type(data, 4)
    cases["a relocation .* names a symbol that does not exist"] = damaged(rela + 12, "<I",
                                                                          10 ** 6)
    cases["a relocation .* lies past the end of section"] = damaged(rela, "<Q", 1 << 40)
    strtab, size = _section_of_type(data, 3)
    cases["not NUL-terminated"] = damaged(strtab + size - 1, "<B", 65)
    for why, bad in cases.items():
        with pytest.raises(elfcheck.BadObject, match=why):
            elfcheck.check(bad)


def test_source_hash_covers_every_graphc_module(tmp_path):
    # An op's lowering or a pass changes the generated code as much as the code
    # generator does: editing any graphc module must give new keys.
    import shutil
    pkg = os.path.dirname(os.path.abspath(gc.__file__))
    copy = tmp_path / "graphc"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert cache.tree_hash(str(copy)) == cache.tree_hash(pkg)
    hashes = set()
    for rel in ("ops/base.py", "passes/framework.py", "kernel/lower.py"):
        with open(copy / rel, "a") as f:
            f.write("\n# edited\n")
        hashes.add(cache.tree_hash(str(copy)))
    assert len(hashes) == 3 and cache.tree_hash(pkg) not in hashes
    assert cache._source_hash() == cache.tree_hash(pkg)
