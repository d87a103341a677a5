"""Memory planning: place every intermediate buffer in one arena, reusing dead ones.

The schedule is the graph's topological order (`graph.nodes`), the order the
backends run nodes in.  Step k runs node k.

Buffers.  Every non-leaf node that is not a graph output gets a buffer of
nbytes = numel * itemsize.  Leaves (inputs, parameters, constants) live outside
the arena, and so do graph outputs: they must outlive the call.  A `reshape`
is a view: it owns no buffer, it aliases its input's (a backend that copies
instead writes the same bytes to the same place, which is also correct), and
it keeps that buffer alive for as long as the view is read.  A buffer one of
whose views is an output is itself external.

Lifetimes.  A buffer is live from the step that writes it to the last step
that reads it or any view of it (inclusive).  Two buffers whose lifetimes
overlap never overlap in memory -- except in-place pairs, below.

Reuse.  Buffers are placed in schedule order; each takes the best-fitting free
block (smallest that is large enough, lowest offset on ties), else the end of
the arena grows.  A buffer is freed after its last reader's step, so a node's
output never overlaps an input it is still reading.

In place.  An elementwise node (a plain elementwise op, or a fused node of
kind "elementwise") writes its output into the buffer of an input when that
input is an arena buffer whose last reader is this node, with the same shape
and itemsize (so element i is read before element i is written, by the same
iteration).

Parameter updates.  Update values are graph outputs (the last `n_updates`),
so they never share memory with anything; the Function copies them into the
parameters after the call returns, once every reader of the old value has run.
The plan records this as `updates_written_after_call = True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from ..ir.graph import Graph
from ..ir.node import TensorType
from ..ir.shapes import is_symbolic

ALIGN = 64
VIEW_OPS = frozenset({"reshape", "index_check"})   # index_check: its input, checked


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class MemoryPlan:
    """Where each intermediate lives: node id -> (offset, nbytes) in one arena."""
    offsets: dict                       # node id -> (offset, nbytes), views included
    arena_bytes: int                    # size of the arena: the planned peak
    total_bytes: int                    # sum of all intermediate buffers (no reuse)
    live_peak_bytes: int                # most bytes live at once (a lower bound)
    lifetimes: dict                     # buffer node id -> (first step, last step)
    schedule: list                      # node ids in execution order
    inplace: dict = field(default_factory=dict)    # node id -> id of the input it overwrites
    aliases: dict = field(default_factory=dict)    # view node id -> id of the buffer it views
    external: set = field(default_factory=set)     # ids living outside the arena
    n_updates: int = 0
    updates_written_after_call: bool = True
    alignment: int = ALIGN

    def __getitem__(self, node_id):
        return self.offsets[node_id]

    def __contains__(self, node_id):
        return node_id in self.offsets

    def summary(self) -> str:
        saved = 1 - self.arena_bytes / self.total_bytes if self.total_bytes else 0.0
        return (f"planned peak {_fmt(self.arena_bytes)} vs {_fmt(self.total_bytes)} sum of "
                f"{len(self.lifetimes)} intermediates ({saved:.0%} saved; live lower bound "
                f"{_fmt(self.live_peak_bytes)}); {len(self.inplace)} in place, "
                f"{len(self.aliases)} views")


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def nbytes(node) -> int:
    return prod(node.shape) * node.dtype.itemsize


def _can_write_in_place(n) -> bool:
    if n.op.name == "fused":
        return n.attrs["kind"] == "elementwise"
    return bool(n.op.elementwise)


class _FreeList:
    """Free blocks of the arena as sorted (offset, size); merges neighbours."""

    def __init__(self):
        self.blocks: list = []
        self.end = 0

    def take(self, size: int) -> int:
        best = None
        for k, (off, sz) in enumerate(self.blocks):
            if sz >= size and (best is None or sz < self.blocks[best][1]):
                best = k
        if best is not None:
            off, sz = self.blocks.pop(best)
            if sz > size:
                self.blocks.insert(best, (off + size, sz - size))
            return off
        if self.blocks and sum(self.blocks[-1]) == self.end:   # grow the last free block
            off, _ = self.blocks.pop()
            self.end = off + size
            return off
        off = self.end
        self.end += size
        return off

    def give(self, off: int, size: int) -> None:
        self.blocks.append((off, size))
        self.blocks.sort()
        merged = []
        for o, s in self.blocks:
            if merged and sum(merged[-1]) == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self.blocks = merged


def plan_memory(graph: Graph, n_updates: int = 0, inplace: bool = True):
    """A MemoryPlan for graph's schedule, or None when a shape is still symbolic."""
    order = graph.nodes
    if any(isinstance(n.type, TensorType) and is_symbolic(n.shape) for n in order):
        return None
    step = {n.id: k for k, n in enumerate(order)}
    out_ids = {o.id for o in graph.outputs}

    root = {}
    for n in order:
        root[n.id] = root[n.inputs[0].id] if n.op.name in VIEW_OPS and n.inputs else n.id
    # Leaves, and tuple-valued nodes (a loop's results) with what is read out of them,
    # live outside the arena: the backend owns them for the whole call.
    external = {n.id for n in order if not n.inputs or not isinstance(n.type, TensorType)
                or n.op.name == "tuple_get"}
    external |= {root[o] for o in out_ids} | out_ids
    planned = [n for n in order if n.inputs and root[n.id] == n.id and n.id not in external]
    external |= {n.id for n in order if root[n.id] in external}

    last = {n.id: step[n.id] for n in planned}
    for n in order:
        for i in n.inputs:
            r = root[i.id]
            if r in last:
                last[r] = max(last[r], step[n.id])
    aliases = {n.id: root[n.id] for n in order
               if root[n.id] != n.id and root[n.id] in last}

    # In-place: n takes over the slot of an input that dies at n.
    slot_of: dict = {}          # buffer id -> slot id (the id of the slot's first buffer)
    slot_last: dict = {}
    in_place: dict = {}
    for n in planned:
        slot = n.id
        if inplace and _can_write_in_place(n):
            for i in n.inputs:
                if (i.id in last and root[i.id] == i.id and last[i.id] == step[n.id]
                        and tuple(i.shape) == tuple(n.shape)
                        and i.dtype.itemsize == n.dtype.itemsize
                        and slot_last.get(slot_of[i.id]) == step[n.id]):
                    slot = slot_of[i.id]
                    in_place[n.id] = i.id
                    break
        slot_of[n.id] = slot
        slot_last[slot] = last[n.id] if slot == n.id else max(slot_last[slot], last[n.id])

    size = {s: _align(nbytes(n)) for n in planned for s in [n.id] if slot_of[n.id] == n.id}
    free = _FreeList()
    where: dict = {}
    frees_at: dict = {}
    for s, l in slot_last.items():
        frees_at.setdefault(l, []).append(s)
    live = peak_live = 0
    for n in order:
        k = step[n.id]
        if n.id in size:
            where[n.id] = free.take(size[n.id]) if size[n.id] else 0
            live += size[n.id]
            peak_live = max(peak_live, live)
        for s in frees_at.get(k, ()):
            if size[s]:
                free.give(where[s], size[s])
            live -= size[s]

    offsets = {n.id: (where[slot_of[n.id]], nbytes(n)) for n in planned}
    for v, r in aliases.items():
        offsets[v] = (offsets[r][0], offsets[r][1])
    lifetimes = {n.id: (step[n.id], last[n.id]) for n in planned}
    return MemoryPlan(offsets=offsets, arena_bytes=free.end,
                      total_bytes=sum(_align(nbytes(n)) for n in planned),
                      live_peak_bytes=peak_live, lifetimes=lifetimes,
                      schedule=[n.id for n in order], inplace=in_place, aliases=aliases,
                      external=external, n_updates=n_updates)


def verify_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Raise AssertionError if two buffers that are live at once share bytes.

    Checks every pair of planned buffers; in-place pairs may share bytes only
    where the later node overwrites the earlier at the earlier's last step.
    """
    ids = list(plan.lifetimes)
    nodes = {n.id: n for n in graph.nodes}
    shared_ok = set()
    for n, i in plan.inplace.items():
        shared_ok.add((n, i))
    # in-place chains: a -> b -> c share one slot; consecutive links are the legal overlaps
    for a_i, a in enumerate(ids):
        fa, la = plan.lifetimes[a]
        oa, sa = plan.offsets[a]
        assert oa + sa <= plan.arena_bytes, f"buffer of {nodes[a]!r} exceeds the arena"
        for b in ids[a_i + 1:]:
            fb, lb = plan.lifetimes[b]
            if lb < fa or la < fb:
                continue
            ob, sb = plan.offsets[b]
            if sa == 0 or sb == 0 or ob + sb <= oa or oa + sa <= ob:
                continue
            if (a, b) in shared_ok or (b, a) in shared_ok:
                first, second = (a, b) if fa <= fb else (b, a)
                if plan.lifetimes[first][1] == plan.lifetimes[second][0]:
                    continue
            raise AssertionError(f"live buffers overlap: {nodes[a]!r} [{fa}, {la}] at "
                                 f"{oa}+{sa} and {nodes[b]!r} [{fb}, {lb}] at {ob}+{sb}")
