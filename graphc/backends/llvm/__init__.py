"""LLVM JIT backend: the graph -> kernel IR -> one native entry function.

`build(graph)` lowers the (shape-concrete) graph to the kernel IR
(graphc/kernel), generates LLVM IR for every kernel plus an entry that calls
them in order over one arena, JIT-compiles it for the host CPU and returns a
runner: `runner(arrays) -> list of output arrays`.

Environment: GRAPHC_DUMP_LLVM=dir writes the kernel IR, LLVM IR (before and
after optimization) and assembly there; GRAPHC_DEBUG_BOUNDS=1 compiles a
bounds check into every load and store.
"""
from __future__ import annotations

from ...kernel.lower import lower_graph
from .runtime import compile_program, host_description

NEEDS_CONCRETE_SHAPES = True


def build(graph):
    prog = lower_graph(graph)
    return compile_program(prog, graph)


__all__ = ["build", "NEEDS_CONCRETE_SHAPES", "host_description"]
