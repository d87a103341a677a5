"""Matrix multiply for the LLVM backend.

First version: the kernel IR's reference loop nest (i, k, j with the unit-stride
j loop vectorized by LLVM).
"""
from __future__ import annotations


def emit_gemm(em, g):
    em.stmts(g.as_loops())
