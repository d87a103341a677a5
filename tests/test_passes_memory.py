"""Memory planning: live buffers never share bytes, the arena is never larger
than the sum of the buffers, and running a graph *inside* its planned arena
(with dead buffers poisoned) gives the interpreter's results."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import graphc as gc
from graphc.backends.numpy import run
from graphc.ir.graph import Graph
from graphc.passes import optimize, plan_memory
from test_passes_lenet import lenet_training_graph
from test_passes_property import random_feeds, random_graphs


# ------------------------------------------------------------------ independent checks
def view_root(n):
    while n.op.name == "reshape":
        n = n.inputs[0]
    return n


def lifetimes(graph):
    """Written here from scratch: buffer id -> (step written, last step read)."""
    order = graph.nodes
    step = {n.id: k for k, n in enumerate(order)}
    life = {}
    for n in order:
        if n.inputs and n.op.name != "reshape":
            life[n.id] = [step[n.id], step[n.id]]
    for n in order:
        for i in n.inputs:
            r = view_root(i)
            if r.id in life:
                life[r.id][1] = max(life[r.id][1], step[n.id])
    return life


def check_no_overlap(graph, plan):
    life = lifetimes(graph)
    nodes = {n.id: n for n in graph.nodes}
    outs = {o.id for o in graph.outputs} | {view_root(o).id for o in graph.outputs}
    planned = [k for k in plan.offsets if k not in plan.aliases]
    assert set(planned) == {k for k in life if k not in outs}
    for k in planned:
        off, nb = plan.offsets[k]
        assert nb == nodes[k].dtype.itemsize * int(np.prod(nodes[k].shape))
        assert 0 <= off and off + nb <= plan.arena_bytes
    for a_i, a in enumerate(planned):
        for b in planned[a_i + 1:]:
            (fa, la), (fb, lb) = life[a], life[b]
            if la < fb or lb < fa:
                continue
            (oa, sa), (ob, sb) = plan.offsets[a], plan.offsets[b]
            if sa == 0 or sb == 0 or oa + sa <= ob or ob + sb <= oa:
                continue
            # the one allowed overlap: b written in place over a at a's last read
            pair = (b, a) if fa < fb else (a, b)
            later, earlier = pair
            assert plan.inplace.get(later) == earlier, (nodes[a], nodes[b])
            assert life[earlier][1] == life[later][0]
            assert tuple(nodes[earlier].shape) == tuple(nodes[later].shape)
            assert nodes[later].op.elementwise or (nodes[later].op.name == "fused" and
                                                   nodes[later].attrs["kind"] == "elementwise")
    assert plan.arena_bytes <= plan.total_bytes


def run_in_arena(graph, plan, feeds):
    """Interpret `graph` storing every planned buffer in one byte arena; poison
    each buffer (NaN bytes) as soon as its lifetime ends."""
    arena = np.zeros(plan.arena_bytes, np.uint8)
    life = lifetimes(graph)
    order = graph.nodes
    ends = {}
    for k, (_, last) in life.items():
        ends.setdefault(last, []).append(k)
    vals = {}

    def read(n):
        if n.id in plan.offsets:
            off, nb = plan.offsets[n.id]
            return arena[off:off + nb].view(n.dtype).reshape(n.shape).copy()
        return vals[n.id]

    for step, n in enumerate(order):
        if n.op.name == "input":
            vals[n.id] = feeds[n.id]
        elif not n.inputs:
            vals[n.id] = n.value
        elif n.id in plan.aliases:
            pass                                  # a view: reads go to its root's bytes
        else:
            with np.errstate(all="ignore"):
                out = n.op.evaluate(*(read(i) for i in n.inputs), **n.attrs)
            if not isinstance(out, (tuple, list)):     # a loop's tuple stays as it is
                out = np.asarray(out)
            if n.id in plan.offsets:
                off, nb = plan.offsets[n.id]
                arena[off:off + nb] = np.ascontiguousarray(out).view(np.uint8).reshape(-1)
            else:
                vals[n.id] = out
        for k in ends.get(step, ()):
            if k in plan.offsets and plan.inplace.get(n.id) != k:
                off, nb = plan.offsets[k]
                arena[off:off + nb] = 0xFF        # NaN for floats: a late read shows
    return [read(o) if o.id in plan.offsets else vals[o.id] for o in graph.outputs]


# ------------------------------------------------------------------ tests
def test_chain_reuses_two_buffers_and_writes_in_place():
    x = gc.input("x", (64,), dtype="float64")
    y = x
    for k in range(8):
        y = gc.tanh(y) * 0.5 if k % 2 else gc.exp(gc.neg(y))
    g, rep = optimize(Graph([gc.sum(y)], [x]), passes=["plan_memory"])
    plan = g.memory_plan
    check_no_overlap(g, plan)
    assert plan.total_bytes == 16 * 512       # 16 ops of 64 float64
    assert plan.arena_bytes == 512          # every op writes over its dying input
    assert len(plan.inplace) == 15
    xv = np.linspace(-1, 1, 64)
    np.testing.assert_allclose(run_in_arena(g, plan, {x.id: xv})[0], run(g, {x.id: xv})[0])


def test_no_in_place_across_broadcast_or_for_non_elementwise():
    x = gc.input("x", (4, 8), dtype="float64")
    b = gc.input("b", (8,), dtype="float64")
    t = gc.exp(b)                   # (8,) read with broadcasting below
    u = gc.exp(x) + t
    m = gc.matmul(u, gc.transpose(u))
    g, _ = optimize(Graph([gc.sum(m * 2.0)], [x, b]), passes=["plan_memory"])
    plan = g.memory_plan
    check_no_overlap(g, plan)
    add = next(n for n in g.nodes if n.op.name == "add")
    assert plan.inplace.get(add.id) != next(n for n in g.nodes if n.op.name == "exp"
                                            and n.shape == (8,)).id
    mm = next(n for n in g.nodes if n.op.name == "matmul")
    assert mm.id not in plan.inplace


def test_outputs_and_update_values_live_outside_the_arena():
    x = gc.input("x", (3, 4))
    w = gc.Parameter(np.ones((4, 2), dtype=np.float32), name="w")
    h = gc.relu(x @ w)
    loss = gc.sum(h * h)
    gw = gc.grad(loss, w)
    f = gc.compile([x], [loss, h], updates={w: w - 0.1 * gw})
    f(np.ones((3, 4), dtype=np.float32))
    plan = f.graph.memory_plan
    assert plan.n_updates == 1 and plan.updates_written_after_call
    for o in f.graph.outputs:
        assert o.id not in plan.offsets and o.id in plan.external
    assert w.id in plan.external
    check_no_overlap(f.graph, plan)


def test_symbolic_shapes_give_no_plan():
    x = gc.input("x", ("N", 4))
    g, rep = optimize(Graph([gc.sum(gc.exp(x) * 2.0)], [x]), 2)
    assert g.memory_plan is None
    assert any("symbolic" in n for n in rep.notes)


def test_lenet_training_graph_plan():
    graph, feeds, n_updates = lenet_training_graph(batch=4)
    g, rep = optimize(graph, 2, n_updates=n_updates)
    plan = g.memory_plan
    check_no_overlap(g, plan)
    assert plan.arena_bytes < 0.75 * plan.total_bytes
    by_pos = {o.id: feeds[i.id] for i, o in zip(graph.inputs, g.inputs)}
    ref = run(g, by_pos)
    got = run_in_arena(g, plan, by_pos)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(random_graphs(max_steps=20), st.integers(0, 2 ** 31 - 1), st.sampled_from([1, 2]))
def test_random_graph_plans(gd, seed, lvl):
    graph, dtype = gd
    g, _ = optimize(graph, lvl) if lvl == 2 else optimize(graph, 1)
    plan = plan_memory(g)
    check_no_overlap(g, plan)
    feeds = random_feeds(g, seed, special=False)
    ref = run(g, feeds)
    got = run_in_arena(g, plan, feeds)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_loops_stay_outside_the_arena():
    """A scan's tuple result and what tuple_get reads from it are backend-owned."""
    rng = np.random.default_rng(0)
    x = gc.input("x", (5, 3, 2), dtype="float64")
    h0 = gc.input("h0", (3, 4), dtype="float64")
    w = gc.Parameter(rng.standard_normal((2, 4)), name="w")

    def step(h, xt):
        hn = gc.tanh(xt @ w + h * 0.5)
        return hn, hn
    hT, ys = gc.scan(step, h0, x)
    out = gc.sum(gc.exp(ys) * 2.0) + gc.sum(hT)
    graph = Graph([out], [x, h0])
    g, _ = optimize(graph, 2)
    plan = g.memory_plan
    loop = [n for n in g.nodes if n.op.name in ("scan", "tuple_get")]
    assert loop and all(n.id in plan.external and n.id not in plan.offsets for n in loop)
    assert plan.offsets                      # the exp/mul/sum around the loop are planned
    feeds = {x.id: rng.standard_normal((5, 3, 2)), h0.id: rng.standard_normal((3, 4))}
    ref = run(graph, feeds)[0]
    by_pos = {o.id: feeds[i.id] for i, o in zip(graph.inputs, g.inputs)}
    np.testing.assert_allclose(run(g, by_pos)[0], ref, rtol=1e-12)
    np.testing.assert_allclose(run_in_arena(g, plan, by_pos)[0], ref, rtol=1e-12)
