"""The client side of the LLVM compile server (objgen.py run as a script).

`compile(ir_text)` returns the object code for a module, compiled in a child
process started at the first compile (or earlier by `prestart`, so its start-up
overlaps with building the IR), or None when no server can be used (then the
caller compiles in process).  GRAPHC_COMPILE_SERVER=0 turns the server off.

The child inherits the environment, reads requests on its stdin and exits when
that closes (when this process ends, or at exit here).  After `fork` the child
process drops its copy of the connection and starts its own server if it
compiles.  If the server dies in the middle of a compile (LLVM crashed), the
compile raises GraphcError and the next compile starts a new server.  A
server that never says it is ready (it could not start) is given up for the
life of the process, and compiles happen in process.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading

from ...ir.errors import GraphcError
from . import objgen

_lock = threading.Lock()
_server = {"proc": None, "failed": False}

_BOOT = ("import sys, runpy; sys.path.pop(0); "
         "runpy.run_path(sys.argv[1], run_name='__main__')")


def enabled() -> bool:
    return os.environ.get("GRAPHC_COMPILE_SERVER", "1") not in ("0", "")


def _start():
    if _server["proc"] is not None or _server["failed"] or not enabled():
        return _server["proc"]
    try:
        _server["proc"] = subprocess.Popen(
            [sys.executable, "-c", _BOOT, objgen.__file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        _server["pid"] = os.getpid()
    except OSError:
        _server["failed"] = True     # e.g. no executable to start: compile in process
    return _server["proc"]


def prestart():
    """Start the server now (if it is not running) without waiting for it."""
    with _lock:
        _start()


def compile(ir_text: str):
    """Object code for `ir_text`, or None (no server: compile in this process)."""
    with _lock:
        proc = _start()
        if proc is None:
            return None
        if not _server.get("ready"):
            # The first use of a new server: it must say it is ready.  A server that
            # cannot start (no llvmlite for sys.executable, an embedding program as
            # sys.executable) is not used again: compiles happen in this process.
            try:
                hello = objgen.read_message(proc.stdout)
            except OSError:
                hello = None
            if hello != objgen.READY:
                _stop(proc)
                _server["failed"] = True
                return None
            _server["ready"] = True
        try:
            objgen.write_message(proc.stdin, ir_text.encode())
            reply = objgen.read_message(proc.stdout)
        except OSError:
            reply = None
        if reply is None:           # the server died: LLVM crashed on this module
            code = proc.poll()
            _stop(proc)
            raise GraphcError(
                f"the LLVM compile server ended (exit status {code}) while compiling a "
                f"module of {len(ir_text)} characters: LLVM crashed on it.  Set "
                f"GRAPHC_DUMP_LLVM=dir to write the IR, or GRAPHC_COMPILE_SERVER=0 to "
                f"compile in this process")
        if reply[:1] == b"o":
            return reply[1:]
        raise RuntimeError(reply[1:].decode(errors="replace"))


def _stop(proc):
    _server["proc"] = None
    _server["ready"] = False
    try:
        proc.stdin.close()
        proc.stdout.close()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


def _at_exit():
    proc = _server["proc"]
    if proc is not None and _server.get("pid") == os.getpid():
        _stop(proc)


def _after_fork_in_child():
    global _lock
    _lock = threading.Lock()
    proc = _server["proc"]
    _server["proc"] = None
    _server["ready"] = False
    if proc is not None:       # the parent's server: close our copies, never wait on it
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
