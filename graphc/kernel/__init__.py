"""Kernel IR: backend-neutral loop nests that graph ops lower to (see ir.py)."""
from .ir import (Assign, BinOp, Buffer, Cast, Const, Expr, Gemm, If, Kernel, Load, Local, Loop,
                 Select, Store, UnOp, Var)
from .lower import LOWER, Program, lower_graph

__all__ = ["Assign", "BinOp", "Buffer", "Cast", "Const", "Expr", "Gemm", "If", "Kernel", "Load",
           "Local", "Loop", "Select", "Store", "UnOp", "Var", "LOWER", "Program", "lower_graph"]
