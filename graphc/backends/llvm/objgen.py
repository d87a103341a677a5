"""LLVM IR text -> object code, in this process or in a compile server.

This file imports nothing from graphc (only llvmlite), so the compile server
can run it as a plain script: `python objgen.py` serves requests on its stdin
and stdout.  The JIT (runtime.py) sends each module's IR there and loads the
object code that comes back (as it loads a disk-cache entry).  Why a separate
process: optimizing and generating code for a training step makes a process
touch ~35 MB of libLLVM's code and leaves ~7 MB of LLVM heap behind for good
(fragmented, so malloc_trim cannot return it), which a training loop then
carries for its whole life; and a crash inside LLVM ends the server, not the
user's program.  The server starts at the first compile and ends with the
process (its stdin closes).

Protocol (binary, both ways): an 8-byte little-endian length, then that many
bytes.  The server first sends READY once its LLVM target is set up.  Request:
the IR text (UTF-8).  Reply: one status byte (b"o": the object file follows;
b"e": an error message follows), then the payload.
"""
from __future__ import annotations

import struct
import sys
import threading

from llvmlite import binding as llvm

_lock = threading.Lock()
_state = {}
READY = b"graphc-objgen 1 ready"


def target() -> dict:
    """The host target, initialised once per process."""
    with _lock:
        if not _state:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            cpu = llvm.get_host_cpu_name()
            feats = llvm.get_host_cpu_features().flatten()
            tgt = llvm.Target.from_default_triple()
            tm = tgt.create_target_machine(cpu=cpu, features=feats, opt=3, jit=True)
            _state.update(layout=str(tm.target_data), target=tgt, cpu=cpu, features=feats,
                          tm=tm, triple=llvm.get_process_triple(),
                          avx512="+avx512f" in feats.split(","), engines=[])
        return _state


def new_target_machine():
    s = target()
    return s["target"].create_target_machine(cpu=s["cpu"], features=s["features"], opt=3,
                                             jit=True)


def optimize(mod):
    """The O3 pipeline (loop and SLP vectorization, unrolling) for the host CPU."""
    s = target()
    # One pass builder per process (llvmlite's objects are not safe to re-create freely:
    # building a second one after the first was freed crashed here).
    with _lock:
        if "pb" not in s:
            pto = llvm.create_pipeline_tuning_options(speed_level=3)
            pto.loop_vectorization = True
            pto.slp_vectorization = True
            pto.loop_unrolling = True
            s["pto"] = pto
            s["pb"] = llvm.create_pass_builder(s["tm"], pto)
        pb = s["pb"]
        pm = pb.getModulePassManager()
        pm.run(mod, pb)


def parse(ir_text: str):
    """(context, verified module) for the host; the private context keeps every type
    and constant of a graph from staying interned for the life of the process."""
    s = target()
    ctx = llvm.create_context()
    mod = llvm.parse_assembly(ir_text, context=ctx)
    mod.triple = s["triple"]
    mod.data_layout = s["layout"]
    mod.verify()
    return ctx, mod


def codegen(mod):
    """(engine, [object bytes]) for an optimized module: MCJIT generates the code and
    hands over the object file (no second code generation to get it)."""
    # MCJIT takes ownership of its target machine (frees it with the engine): give each
    # engine its own.
    engine = llvm.create_mcjit_compiler(mod, new_target_machine())
    objects = []
    engine.set_object_cache(lambda m, data: objects.append(bytes(data)), None)
    engine.finalize_object()
    return engine, objects


def load_object(data: bytes, entry="entry"):
    """(engine, address of `entry`) for object code (a compile's or a disk-cache
    entry's), or None if LLVM refuses it."""
    s = target()
    try:
        mod = llvm.parse_assembly("")
        mod.triple = s["triple"]
        engine = llvm.create_mcjit_compiler(mod, new_target_machine())
        engine.add_object_file(llvm.ObjectFileRef.from_data(data))
        engine.finalize_object()
        addr = engine.get_function_address(entry)
    except Exception:
        return None
    return (engine, addr) if addr else None


def object_code(ir_text: str) -> bytes:
    ctx, mod = parse(ir_text)
    optimize(mod)
    engine, objects = codegen(mod)
    if len(objects) != 1:
        raise RuntimeError(f"expected one object file from MCJIT, got {len(objects)}")
    engine.close()
    return objects[0]


def _read(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_message(stream):
    head = _read(stream, 8)
    if head is None:
        return None
    (n,) = struct.unpack("<Q", head)
    return _read(stream, n)


def write_message(stream, payload: bytes):
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def serve(inp=None, out=None):
    inp = inp or sys.stdin.buffer
    out = out or sys.stdout.buffer
    target()
    try:
        write_message(out, READY)
        while True:
            req = read_message(inp)
            if req is None:
                return          # the client went away
            try:
                reply = b"o" + object_code(req.decode())
            except Exception as e:   # reported to the client, which raises it there
                reply = b"e" + f"{type(e).__name__}: {e}".encode()
            write_message(out, reply)
    except (BrokenPipeError, ConnectionError):
        return                  # the client went away while we wrote


if __name__ == "__main__":
    serve()
