"""Backends: each turns an (optimized, shape-concrete) graph into a runnable.

A backend module exposes `build(graph) -> runner`, where `runner(feeds)` takes
one array per `graph.inputs` entry and returns one array per `graph.outputs`
entry.  Backends never import one another; the NumPy interpreter is the
reference every other backend is tested against.
"""
from __future__ import annotations

import importlib

_BACKENDS = {"numpy": "graphc.backends.numpy", "llvm": "graphc.backends.llvm",
             "cuda": "graphc.backends.cuda"}


def get_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    try:
        return importlib.import_module(_BACKENDS[name])
    except ImportError as e:
        raise ValueError(f"backend {name!r} is not available: {e}") from None
