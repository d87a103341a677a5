"""A cheap structural check of an ELF relocatable object before LLVM loads it.

LLVM's object loader trusts the file it is given: a string-table offset past
the end of the table, a section lying outside the file or a relocation naming
a symbol that does not exist ends the process (`LLVM ERROR: st_name ... past
the end of the string table`, abort) instead of raising.  Object code from the
compile server is graphc's own; object code read back from the disk cache has
passed the entry's keyed digest (cache.py), and is checked here as well, so
that an entry that is damaged in a way the digest cannot see (or that was
written by a buggy graphc) is refused and recompiled, never handed to LLVM.

The check covers what the loader dereferences while it reads the tables:
the header, every section's extent, section names, symbol names and section
indices, string-table termination, and relocation symbols and offsets.  It
does not (cannot) judge the machine code itself: see docs/architecture.md,
"The compile caches", for the trust model.
"""
from __future__ import annotations

import platform
import struct
import sys

import numpy as np

# ELF constants (System V gABI)
_ET_REL = 1
_SHT_SYMTAB, _SHT_STRTAB, _SHT_RELA, _SHT_NOBITS, _SHT_REL, _SHT_DYNSYM = 2, 3, 4, 8, 9, 11
_SHT_SYMTAB_SHNDX = 18
_SHN_LORESERVE, _SHN_XINDEX = 0xFF00, 0xFFFF
_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21,
             "ppc64": 21, "riscv64": 243, "s390x": 22}

_SHDR = struct.Struct("<IIQQQQIIQQ")       # Elf64_Shdr
_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])
_RELA = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])
_REL = np.dtype([("offset", "<u8"), ("info", "<u8")])


class BadObject(ValueError):
    """The bytes are not an ELF object this host's loader can read safely."""


def check(data: bytes) -> None:
    """Raise BadObject unless `data` is a well-formed 64-bit little-endian ELF
    relocatable object for this machine whose tables all lie within the file."""
    n = len(data)
    if n < 64 or data[:4] != b"\x7fELF":
        raise BadObject("not an ELF file")
    if data[4] != 2 or data[5] != 1 or sys.byteorder != "little":
        raise BadObject("not a 64-bit little-endian ELF file")
    (e_type, e_machine, _ver, _entry, _phoff, e_shoff, _flags, e_ehsize, _phentsize, _phnum,
     e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if e_type != _ET_REL:
        raise BadObject(f"ELF type {e_type}, expected a relocatable object")
    want = _MACHINES.get(platform.machine().lower())
    if want is not None and e_machine != want:
        raise BadObject(f"ELF machine {e_machine}, this host is {want}")
    if e_ehsize != 64 or e_shentsize != _SHDR.size or e_shnum == 0:
        raise BadObject("unexpected ELF header or section header sizes")
    if e_shoff > n or e_shnum * _SHDR.size > n - e_shoff:
        raise BadObject("section header table past the end of the file")
    if e_shstrndx >= e_shnum:
        raise BadObject("section-name table index out of range")
    secs = [_SHDR.unpack_from(data, e_shoff + i * _SHDR.size) for i in range(e_shnum)]
    for i, (_nm, typ, _fl, _addr, off, size, link, _info, _al, _es) in enumerate(secs):
        if typ != _SHT_NOBITS and (off > n or size > n - off):
            raise BadObject(f"section {i} lies past the end of the file")
        if link >= e_shnum:
            raise BadObject(f"section {i} links to section {link} of {e_shnum}")
        if typ == _SHT_SYMTAB_SHNDX:
            raise BadObject("extended section indices are not expected")
        if typ == _SHT_STRTAB and size and data[off + size - 1] != 0:
            raise BadObject(f"string table {i} is not NUL-terminated")

    def strtab(i, what):
        """Size of string table section i (which `what` refers to)."""
        typ, size = secs[i][1], secs[i][5]
        if typ != _SHT_STRTAB:
            raise BadObject(f"{what} refers to section {i}, which is not a string table")
        return size

    names_size = strtab(e_shstrndx, "the ELF header")
    for i, s in enumerate(secs):
        if s[0] >= max(names_size, 1):
            raise BadObject(f"section {i}'s name lies past the end of its string table")
    nsyms = {}
    for i, (_nm, typ, _fl, _addr, off, size, link, _info, _al, entsize) in enumerate(secs):
        if typ not in (_SHT_SYMTAB, _SHT_DYNSYM):
            continue
        if entsize != _SYM.itemsize or size % _SYM.itemsize:
            raise BadObject(f"symbol table {i} has entries of {entsize} bytes")
        limit = strtab(link, f"symbol table {i}")
        syms = np.frombuffer(data, _SYM, size // _SYM.itemsize, off)
        if syms.size and int(syms["name"].max()) >= max(limit, 1):
            raise BadObject(f"a symbol name of symbol table {i} lies past the end of its "
                            "string table")
        idx = syms["shndx"]
        if np.any((idx >= e_shnum) & (idx < _SHN_LORESERVE)) or np.any(idx == _SHN_XINDEX):
            raise BadObject(f"a symbol of symbol table {i} names a section that does not exist")
        nsyms[i] = syms.size
    for i, (_nm, typ, _fl, _addr, off, size, link, info, _al, entsize) in enumerate(secs):
        if typ not in (_SHT_RELA, _SHT_REL):
            continue
        dt = _RELA if typ == _SHT_RELA else _REL
        if entsize != dt.itemsize or size % dt.itemsize:
            raise BadObject(f"relocation section {i} has entries of {entsize} bytes")
        if link not in nsyms:
            raise BadObject(f"relocation section {i} does not refer to a symbol table")
        if info >= e_shnum:
            raise BadObject(f"relocation section {i} applies to section {info} of {e_shnum}")
        rels = np.frombuffer(data, dt, size // dt.itemsize, off)
        if not rels.size:
            continue
        if int((rels["info"] >> np.uint64(32)).max()) >= nsyms[link]:
            raise BadObject(f"a relocation of section {i} names a symbol that does not exist")
        target = secs[info][5]
        if int(rels["offset"].max()) >= target:
            raise BadObject(f"a relocation of section {i} lies past the end of section {info}")
