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
    prog = lower_graph(graph, optimize_body=_optimize_body, loops=True)
    return compile_program(prog, graph)


def _optimize_body(body):
    """Loop bodies are optimized (fused) like the graph around them."""
    from ...passes import optimize
    return optimize(body, 2)[0]


__all__ = ["build", "NEEDS_CONCRETE_SHAPES", "host_description", "runners", "profile_table"]


def runners(function) -> list:
    """The native runners a compiled gc.Function holds (one per specialized shape):
    each has .kernels() (names and FLOPs) and, with GRAPHC_PROFILE=1, .profile()."""
    return list(function._cache.values())


def profile_table(function) -> str:
    """Per-kernel time table of a function compiled with GRAPHC_PROFILE=1."""
    lines = [f"{'kernel':<32} {'MFLOP':>10} {'ms/call':>10} {'GFLOP/s':>9}"]
    for r in runners(function):
        for name, flops, sec in r.profile():
            rate = flops / sec / 1e9 if sec > 0 else 0.0
            lines.append(f"{name:<32} {flops / 1e6:>10.2f} {sec * 1e3:>10.3f} {rate:>9.1f}")
    return "\n".join(lines)
