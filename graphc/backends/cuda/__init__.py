"""CUDA backend: graph -> kernel IR -> CUDA C -> NVRTC cubin -> driver API launches.

`build(graph)` lowers the (shape-concrete) graph to the shared kernel IR
(graphc/kernel), generates one CUDA C module for all its kernels
(codegen.py), and returns a runner that executes the launch plan on a
runtime:

* a real GPU (`DriverRuntime`, cuda.bindings.driver) when one is present;
* otherwise, only when asked for with GRAPHC_CUDA_EMULATE=1 (or
  `set_options(emulate=True)`), the CPU emulator (`EmulatorRuntime`), which
  runs the exact generated CUDA source built by the host C++ compiler.

Environment: GRAPHC_CUDA_EMULATE=1 selects the emulator, GRAPHC_CUDA_ARCH
(default: the device's, or sm_90) the target, GRAPHC_DUMP_CUDA=dir writes the
kernel IR, the CUDA source and the PTX there, GRAPHC_CACHE_DIR the cache root,
GRAPHC_CUDA_GRAPHS=0 turns off the one-CUDA-graph-launch-per-call replay
(runtime.Runner; docs/cuda.md, "Calls").
"""
from __future__ import annotations

import os

from ...ir.errors import GraphcError, NotLoweredError
from ...kernel.lower import lower_graph
from .codegen import CudaProgram, generate
from .compiler import DEFAULT_ARCH, CudaCompileError, compile_cuda, ptxas_report
from .runtime import DriverRuntime, EmulatorRuntime, Runner, Runtime, gpu_available

NEEDS_CONCRETE_SHAPES = True

_options = {"emulate": None, "arch": None}


def set_options(emulate=None, arch=None):
    """emulate: True (CPU emulator), False (GPU only), None (environment decides)."""
    _options.update(emulate=emulate, arch=arch)


def _want_emulator() -> bool:
    if _options["emulate"] is not None:
        return bool(_options["emulate"])
    return os.environ.get("GRAPHC_CUDA_EMULATE", "") not in ("", "0")


def generate_cuda(graph) -> CudaProgram:
    """The generated CUDA program (source + launch plan) of a shape-concrete graph."""
    try:
        prog = lower_graph(graph)
    except NotLoweredError as e:   # the shared lowering words its message for llvm
        raise NotLoweredError(str(e).replace("llvm backend", "cuda backend")) from None
    return generate(prog)


_driver_rt = None


def select_runtime() -> Runtime:
    global _driver_rt
    if _want_emulator():
        return EmulatorRuntime()
    ok, why = gpu_available()
    if not ok:
        raise GraphcError(f"the cuda backend found no usable GPU ({why}); set "
                          "GRAPHC_CUDA_EMULATE=1 to run the generated CUDA on the CPU emulator")
    if _driver_rt is None:
        _driver_rt = DriverRuntime(arch=_options["arch"] or os.environ.get("GRAPHC_CUDA_ARCH"))
    return _driver_rt


def build(graph):
    cprog = generate_cuda(graph)
    dump = os.environ.get("GRAPHC_DUMP_CUDA")
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, "graphc.kernels.txt"), "w") as f:
            f.write(cprog.prog.format())
        with open(os.path.join(dump, "graphc_kernels.cu"), "w") as f:
            f.write(cprog.source)
    return Runner(cprog, graph, select_runtime())


__all__ = ["build", "NEEDS_CONCRETE_SHAPES", "set_options", "generate_cuda", "compile_cuda",
           "ptxas_report", "CudaCompileError", "DriverRuntime", "EmulatorRuntime", "Runtime",
           "gpu_available", "DEFAULT_ARCH", "select_runtime"]
