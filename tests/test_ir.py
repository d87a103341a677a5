"""The IR: types and shapes (with symbolic dims), nodes, graphs and rewrites."""
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.ir import (BATCH, Graph, TensorType, broadcast_shapes, clone_with_inputs,
                       normalize_shape, shape_str, toposort)
from graphc.ir import dtypes as dt
from graphc.ir import shapes as S
from graphc.ir.node import role


# --------------------------------------------------------------- types & shapes
def test_tensor_type_normalizes_dtype_and_shape():
    t = TensorType("float32", [2, None, "B", np.int64(4)])
    assert t.dtype == np.float32 and isinstance(t.dtype, np.dtype)
    assert t.shape == (2, BATCH, "B", 4) and BATCH == "N"
    assert all(type(d) in (int, str) for d in t.shape)
    assert t.ndim == 4
    assert str(t) == "float32(2, N, B, 4)"
    assert str(TensorType(np.float64, 3)) == "float64(3,)"
    assert str(TensorType("int64", ())) == "int64()"
    assert TensorType(np.int32, (2,)) == TensorType("int32", [2])
    assert hash(TensorType("bool", (1, 2))) == hash(TensorType(bool, (1, 2)))
    assert TensorType(None, ()).dtype == np.float32


@pytest.mark.parametrize("shape,exc", [
    ((2, -1), ValueError), ((2, "1x"), ValueError), ((2.0, 3), TypeError), (None, TypeError),
    ((2, [3]), TypeError),
])
def test_bad_shapes(shape, exc):
    with pytest.raises(exc):
        normalize_shape(shape)


@pytest.mark.parametrize("d", ["complex64", "float16", "uint8", "no_such_dtype"])
def test_unsupported_dtypes(d):
    with pytest.raises(TypeError, match="supports|unknown"):
        TensorType(d, (2,))


def test_dtype_promotion_table():
    assert dt.promote("int64", "float32") == np.float32
    assert dt.promote("int32", "int64") == np.int64
    assert dt.promote("bool", "int32") == np.int32
    assert dt.promote("float32", "float64") == np.float64
    assert dt.promote("bool", "bool") == np.bool_
    assert dt.is_float("float32") and not dt.is_float("int64")
    assert dt.is_int("int32") and not dt.is_int("bool")


def test_symbolic_dim_helpers():
    s = ("N", 3, "T")
    assert S.is_symbolic(s) and not S.is_symbolic((2, 3))
    assert S.symbols(s) == {"N", "T"}
    assert S.numel(s) is None and S.numel((2, 3, 4)) == 24 and S.numel(()) == 1
    assert S.substitute(s, {"N": 5}) == (5, 3, "T")
    assert S.substitute(s, {"N": 5, "T": 7}) == (5, 3, 7)
    assert shape_str(("N", 3)) == "(N, 3)" and shape_str((4,)) == "(4,)" and shape_str(()) == "()"


@pytest.mark.parametrize("shapes,want", [
    (((2, 3), (3,)), (2, 3)),
    (((2, 1), (1, 4)), (2, 4)),
    (((), (5,)), (5,)),
    (((4, 1, 3), (5, 1), (1,)), (4, 5, 3)),
    ((("N", 3), (3,)), ("N", 3)),
    ((("N", 1), (1, 4)), ("N", 4)),
    ((("N", 3), ("N", 1)), ("N", 3)),
    ((("N",), (5,)), (5,)),
    (((5,), ("N",)), (5,)),
    ((("N",), (1,)), ("N",)),
    ((), ()),
])
def test_broadcast_shapes(shapes, want):
    assert broadcast_shapes(*shapes) == want
    if not any(S.is_symbolic(s) for s in shapes) and shapes:
        assert want == np.broadcast_shapes(*shapes)


@pytest.mark.parametrize("shapes", [((2, 3), (4,)), ((2, 3), (3, 3)), (("N",), ("M",)),
                                    ((3, "N"), (2, 1))])
def test_broadcast_shapes_mismatch(shapes):
    with pytest.raises(ValueError, match="cannot be broadcast") as ei:
        broadcast_shapes(*shapes)
    for s in shapes:
        assert shape_str(s) in str(ei.value)


def test_normalize_axes():
    assert S.normalize_axes(None, 3) == (0, 1, 2)
    assert S.normalize_axes(-1, 3) == (2,)
    assert S.normalize_axes((2, -3), 3) == (0, 2)
    with pytest.raises(ValueError, match="out of range"):
        S.normalize_axes(3, 3)
    with pytest.raises(ValueError, match="repeated"):
        S.normalize_axes((0, -3), 3)
    with pytest.raises(TypeError):
        S.normalize_axis(1.0, 3)


# --------------------------------------------------------------- nodes
def test_node_properties_and_location():
    x = gc.input("x", (None, 3), "float32")
    y = x * 2.0 + 1.0
    line = sys._getframe().f_lineno - 1
    assert x.shape == ("N", 3) and x.dtype == np.float32 and x.ndim == 2
    assert x.is_leaf and not y.is_leaf
    assert x.label() == "x" and y.label().startswith("%")
    assert "add" in repr(y) and "float32(N, 3)" in repr(y)
    for n in (x, y, y.inputs[0]):
        assert "test_ir.py:" in n.loc
    assert y.loc.endswith(f"test_ir.py:{line}")
    p = gc.Parameter(np.zeros(2), name="p")
    assert "test_ir.py" in p.loc and p.is_leaf
    c = gc.constant(np.array([1.0, 2.0], np.float32))
    assert "test_ir.py" in c.loc and c.dtype == np.float32


def test_node_truth_value_raises():
    x = gc.input("x", (2,), "float32")
    with pytest.raises(TypeError, match="truth value"):
        bool(x)
    with pytest.raises(TypeError):
        if x > 0:
            pass
    with pytest.raises(TypeError):
        x and x  # noqa: B018


def test_node_equality_is_identity_and_hashable():
    x = gc.input("x", (2,), "float32")
    a, b = x + 1.0, x + 1.0
    assert a != b and a == a
    assert len({a, b, a}) == 2
    d = {a: 1}
    assert d[a] == 1 and b not in d


def test_key_equal_for_structurally_identical_nodes():
    x = gc.input("x", (2, 3), "float32")
    y = gc.input("y", (2, 3), "float32")
    x_twin = gc.input("x", (2, 3), "float32")
    assert gc.add(x, y).key() == gc.add(x, y).key()
    assert gc.add(x, y).key() != gc.add(y, x).key()
    assert gc.add(x, y).key() != gc.mul(x, y).key()
    assert gc.add(x, y).key() != gc.add(x_twin, y).key()   # inputs are distinct objects
    assert gc.sum(x, axis=0).key() == gc.sum(x, axis=0).key()
    assert gc.sum(x, axis=0).key() != gc.sum(x, axis=1).key()
    assert gc.sum(x, axis=0).key() != gc.sum(x, axis=0, keepdims=True).key()
    # constants are identified by dtype, shape and bytes
    assert gc.constant([1.0, 2.0]).key() == gc.constant([1.0, 2.0]).key()
    assert gc.constant([1.0, 2.0]).key() != gc.constant([1.0, 3.0]).key()
    assert gc.constant([1.0, 2.0], "float32").key() != gc.constant([1.0, 2.0], "float64").key()
    assert gc.constant([1.0, 2.0]).key() != gc.constant([[1.0, 2.0]]).key()
    p = gc.Parameter(np.ones(2))
    q = gc.Parameter(np.ones(2))
    assert p.key() != q.key()
    hash(gc.add(x, y).key())


def test_name_scope_and_role():
    x = gc.input("x", (2,), "float32")
    with gc.name_scope("block"):
        with gc.name_scope("inner"):
            a = gc.exp(x)
        b = a + 1.0
    c = b * 2.0
    assert a.scope == ("block", "inner") and b.scope == ("block",) and c.scope == ()
    with role("update"):
        d = c - 1.0
    assert d.role == "update" and c.role == "forward"


# --------------------------------------------------------------- graphs
def _diamond():
    x = gc.input("x", (3,), "float64")
    a = gc.exp(x)
    b = gc.log(x)
    c = a * b
    d = c + a
    return x, a, b, c, d


def test_toposort_inputs_before_users_each_once():
    x, a, b, c, d = _diamond()
    order = toposort([d, c])
    assert len(order) == len({n.id for n in order})
    pos = {n.id: k for k, n in enumerate(order)}
    for n in order:
        for i in n.inputs:
            assert pos[i.id] < pos[n.id]
    assert {x.id, a.id, b.id, c.id, d.id} <= set(pos)
    assert order[-1] is d
    # a node not reachable from the outputs is absent
    e = gc.sqrt(x)
    assert e.id not in {n.id for n in toposort([d])}


def test_toposort_deep_chain_no_recursion_limit():
    x = gc.input("x", (), "float64")
    y = x
    for _ in range(3000):
        y = gc.neg(y)
    order = toposort([y])
    assert len(order) == 3001 and order[0] is x and order[-1] is y


def test_graph_queries():
    x, a, b, c, d = _diamond()
    g = Graph([d], [x])
    assert len(g) == len(g.nodes) == len(list(g))
    counts = g.op_counts()
    assert counts["exp"] == 1 and counts["log"] == 1 and counts["mul"] == 1
    assert counts["add"] == 1 and counts["input"] == 1
    assert g.leaves() == [x] and g.leaves("input") == [x] and g.leaves("constant") == []
    users = g.users()
    assert sorted(n.op.name for n in users[a.id]) == ["add", "mul"]
    assert sorted(n.op.name for n in users[x.id]) == ["exp", "log"]


def test_graph_format_one_line_per_node():
    x = gc.input("x", (None, 3), "float32")
    y = gc.sum(gc.relu(x) * 2.0, axis=1)
    g = Graph([y], [x])
    text = g.format()
    lines = text.splitlines()
    assert len(lines) == len(g.nodes)
    for n, line in zip(g.nodes, lines):
        assert n.op.name in line
        assert str(n.type) in line
        assert line.startswith(n.label())
    assert "sum[axis=1, keepdims=False](" in text
    assert lines[-1].endswith("# output")
    assert "x = input : float32(N, 3)" in lines
    assert str(g) == text


def test_to_networkx_counts():
    pytest.importorskip("networkx")
    x, a, b, c, d = _diamond()
    nxg = Graph([d], [x]).to_networkx()
    assert nxg.number_of_nodes() == 5
    assert nxg.number_of_edges() == 6    # x→a, x→b, a→c, b→c, c→d, a→d
    sq = x * x                            # a repeated input gives two parallel edges
    nxg2 = Graph([sq]).to_networkx()
    assert nxg2.number_of_nodes() == 2 and nxg2.number_of_edges() == 2
    assert nxg.nodes[d.id]["op"] == "add"
    assert set(nxg.predecessors(c.id)) == {a.id, b.id}


def _run_graph(g, *arrays):
    from graphc.backends.numpy import build
    return build(g)(list(arrays))


def test_graph_replace_rebuilds_users_and_keeps_original():
    x, a, b, c, d = _diamond()
    g = Graph([d], [x])
    v = np.array([0.5, 1.0, 2.0])
    before = _run_graph(g, v)[0]
    np.testing.assert_allclose(before, np.exp(v) * np.log(v) + np.exp(v))
    sq = gc.sqrt(x)
    g.replace(a, sq)                              # exp(x) -> sqrt(x) everywhere
    after = _run_graph(g, v)[0]
    np.testing.assert_allclose(after, np.sqrt(v) * np.log(v) + np.sqrt(v))
    assert g.outputs[0] is not d
    assert a.id not in {n.id for n in g.nodes}
    assert d.inputs[1] is a                       # the original nodes are untouched
    assert g.op_counts().get("exp", 0) == 0
    assert b in g.nodes                           # untouched sub-graphs are shared


def test_graph_replace_all_and_output_replacement():
    x, a, b, c, d = _diamond()
    g = Graph([d, c], [x])
    g.replace_all({a.id: gc.square(x), b.id: gc.neg(x)})
    v = np.array([1.5, 2.0, 3.0])
    out_d, out_c = _run_graph(g, v)
    np.testing.assert_allclose(out_c, v * v * -v)
    np.testing.assert_allclose(out_d, v * v * -v + v * v)
    # replacing an output node itself
    g2 = Graph([d], [x])
    new = gc.exp(x)
    g2.replace(d, new)
    assert g2.outputs == [new]
    g2.replace_all({})
    assert g2.outputs == [new]


def test_clone_with_inputs_keeps_provenance():
    x = gc.input("x", (2,), "float32")
    y = gc.input("y", (2,), "float32")
    with gc.name_scope("s"):
        n = gc.add(x, x)
    m = clone_with_inputs(n, (x, y))
    assert m.inputs == (x, y) and m.op is n.op and m.type == n.type
    assert m.scope == ("s",) and m.loc == n.loc and m.role == n.role and m.id != n.id
