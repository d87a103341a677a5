"""What the optimizer did, per pass: readable with print(report)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassRecord:
    name: str
    iteration: int
    nodes_before: int
    nodes_after: int
    kernels_before: int
    kernels_after: int
    changes: list
    seconds: float


@dataclass
class OptimizationReport:
    level: int
    nodes_before: int = 0
    nodes_after: int = 0
    kernels_before: int = 0
    kernels_after: int = 0
    passes: list = field(default_factory=list)
    fused: list = field(default_factory=list)       # (kind, label, number of ops)
    memory_plan: object = None
    notes: list = field(default_factory=list)

    def changed(self, name: str) -> list:
        """Every change the pass `name` made (over all iterations)."""
        return [c for p in self.passes if p.name == name for c in p.changes]

    @property
    def planned_peak_bytes(self):
        return None if self.memory_plan is None else self.memory_plan.arena_bytes

    @property
    def unplanned_bytes(self):
        return None if self.memory_plan is None else self.memory_plan.total_bytes

    def __str__(self) -> str:
        lines = [f"graphc optimizer report (optimize={self.level})",
                 f"  nodes {self.nodes_before} -> {self.nodes_after}, "
                 f"kernels {self.kernels_before} -> {self.kernels_after}"]
        if self.passes:
            lines.append(f"  {'pass':<10} {'iter':>4}  {'nodes':>13}  changes")
        for p in self.passes:
            head = (f"  {p.name:<10} {p.iteration:>4}  "
                    f"{p.nodes_before:>5} -> {p.nodes_after:<5}  {len(p.changes)}")
            lines.append(head)
            for c in p.changes[:4]:
                lines.append(f"      {c}")
            if len(p.changes) > 4:
                lines.append(f"      ... and {len(p.changes) - 4} more")
        if self.fused:
            kinds = {}
            for kind, _, _ in self.fused:
                kinds[kind] = kinds.get(kind, 0) + 1
            lines.append("  fused: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
        if self.memory_plan is not None:
            lines.append("  memory: " + self.memory_plan.summary())
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    __repr__ = __str__
