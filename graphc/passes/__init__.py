"""The graph optimizer: a pipeline of named passes over the graph IR.

    graph, report = optimize(graph, level=2)
    print(report)                      # per pass: nodes before/after, what changed

Levels:
    0  nothing
    1  fold, simplify, cse, dce, checks repeated to a fixed point (at most MAX_ITERATIONS)
    2  level 1, then fuse and plan_memory (the plan is `graph.memory_plan`)

Set GRAPHC_DUMP_PASSES=1 (or pass dump=True) to print the graph after every
pass to stderr; GRAPHC_DUMP_PASSES=<directory> writes one file per pass there.
docs/optimizer.md describes every pass and rule.
"""
from __future__ import annotations

import os
import sys
import time

from ..ir.graph import Graph
from . import checks, fold, fusion, simplify  # noqa: F401  (register the passes)
from .framework import PASSES, PassContext, count_kernels, register_pass
from .fusion import FusedOp, find_groups, inner_graph, run_inner
from .memory import MemoryPlan, plan_memory, verify_plan
from .patterns import P, Rule, X
from .report import OptimizationReport, PassRecord
from .simplify import RULES

__all__ = ["optimize", "run_pass", "PASSES", "PassContext", "OptimizationReport", "MemoryPlan",
           "plan_memory", "verify_plan", "FusedOp", "inner_graph", "run_inner", "RULES",
           "Rule", "P", "X", "count_kernels", "LEVELS"]

CLEANUP = ("fold", "simplify", "cse", "dce", "checks")
LEVELS = {0: (), 1: CLEANUP, 2: CLEANUP + ("fuse", "plan_memory")}
MAX_ITERATIONS = 10


@register_pass("plan_memory")
def _plan_memory_pass(graph: Graph, ctx):
    """Assign arena offsets to intermediate buffers (attached as graph.memory_plan)."""
    plan = plan_memory(graph, n_updates=ctx.n_updates)
    g = Graph(list(graph.outputs), list(graph.inputs))
    g.memory_plan = plan
    if plan is None:
        return g, []
    return g, [plan.summary()]


def _dump_target(dump):
    if dump is None:
        dump = os.environ.get("GRAPHC_DUMP_PASSES", "")
    if dump in (False, "", "0"):
        return None
    return dump


def _dump(target, k: int, name: str, graph: Graph) -> None:
    text = f"=== after pass {k}: {name} ({len(graph)} nodes) ===\n{graph.format()}\n"
    if target in (True, "1") or not isinstance(target, (str, os.PathLike)):
        sys.stderr.write(text)
        return
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, f"{k:02d}_{name}.txt"), "w") as f:
        f.write(text)


def run_pass(name: str, graph: Graph, ctx: PassContext | None = None):
    """Run one registered pass: (new graph, list of changes)."""
    if name not in PASSES:
        raise KeyError(f"no pass named {name!r}; passes are {sorted(PASSES)}")
    return PASSES[name].fn(graph, ctx or PassContext())


def optimize(graph: Graph, level: int = 2, *, n_updates: int = 0, nan_unsafe: bool = False,
             fold_limit: int = 1 << 20, max_fusion: int = 64, passes=None, dump=None):
    """Optimize `graph` at `level` (0, 1, 2); returns (new graph, OptimizationReport).

    The input graph is not modified.  n_updates: how many trailing outputs are
    parameter-update values.  nan_unsafe: allow x*0 -> 0 (wrong for inf/NaN x).
    passes: an explicit list of pass names instead of a level's pipeline (run once each).
    """
    if passes is None and level not in LEVELS:
        raise ValueError(f"optimize level must be one of {sorted(LEVELS)}, got {level!r}")
    ctx = PassContext(nan_unsafe=nan_unsafe, fold_limit=fold_limit, max_fusion=max_fusion,
                      n_updates=n_updates)
    report = OptimizationReport(level=level if passes is None else -1)
    report.nodes_before = len(graph)
    report.kernels_before = count_kernels(graph)
    target = _dump_target(dump)
    counter = [0]

    def step(name, g, it):
        nb, kb = len(g), count_kernels(g)
        t0 = time.perf_counter()
        g2, changes = run_pass(name, g, ctx)
        rec = PassRecord(name, it, nb, len(g2), kb, count_kernels(g2), list(changes),
                         time.perf_counter() - t0)
        report.passes.append(rec)
        counter[0] += 1
        if target is not None:
            _dump(target, counter[0], name, g2)
        return g2, changes

    g = graph
    if passes is not None:
        for name in passes:
            g, _ = step(name, g, 1)
    else:
        pipeline = LEVELS[level]
        cleanup = [p for p in pipeline if p in CLEANUP]
        if cleanup:
            for it in range(1, MAX_ITERATIONS + 1):
                any_change = False
                for name in cleanup:
                    g, changes = step(name, g, it)
                    any_change |= bool(changes)
                if not any_change:
                    break
            else:
                report.notes.append(f"cleanup passes still changing the graph after "
                                    f"{MAX_ITERATIONS} iterations (stopped)")
        for name in pipeline:
            if name not in CLEANUP:
                g, _ = step(name, g, 1)
    if g is graph:
        g = Graph(list(graph.outputs), list(graph.inputs))
    report.nodes_after = len(g)
    report.kernels_after = count_kernels(g)
    report.fused = [(n.attrs["kind"], n.attrs["label"], sum(1 for m in n.value.nodes if m.inputs))
                    for n in g.nodes if n.op.name == "fused"]
    report.memory_plan = getattr(g, "memory_plan", None)
    if report.memory_plan is None and "plan_memory" in (passes or LEVELS.get(level, ())):
        report.notes.append("no memory plan: the graph still has symbolic shapes")
    return g, report
