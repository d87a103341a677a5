"""Indexing and shape-manipulation ops: forward against independent NumPy code,
gradients against finite differences, build-time and run-time errors."""
import numpy as np
import pytest

import graphc as gc

HERE = "test_ops_indexing.py"
rng = np.random.default_rng(0)


def run(inputs, outputs, *arrays):
    return gc.compile(inputs, outputs)(*arrays)


# ------------------------------------------------------------------ getitem
E = Ellipsis
INDEXES = [
    1, -1, (slice(None), slice(1, 3)), slice(None, None, 2), slice(None, None, -1),
    (E, 0), (None, slice(None), 1), (slice(1, -1), slice(None, None, 3), None),
    slice(3, 1), (slice(None), slice(4, 4)), (slice(None, None, -2), E, slice(-2, None)),
    (2, -1, 3), (E,), (slice(-100, 100),), (slice(None), slice(None, None, -3), slice(5, 0, -2)),
    (None, E, None), (np.int64(1), slice(np.int32(0), 2)), (E, slice(None, None, -1), 2),
    (slice(3, None, -3), slice(4, None, -4)),  # strided runs that end exactly at 0
]
IDS = [repr(i).replace("slice", "s").replace("Ellipsis", "...") for i in INDEXES]


@pytest.mark.parametrize("idx", INDEXES, ids=IDS)
def test_getitem_forward(idx):
    a = rng.standard_normal((4, 5, 6)).astype(np.float32)
    x = gc.input("x", a.shape)
    y = x[idx]
    expect = a[idx]  # NumPy's own basic indexing is the independent reference
    assert tuple(y.shape) == expect.shape
    out = run([x], y, a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("idx", INDEXES, ids=IDS)
def test_getitem_grad(idx):
    a = rng.standard_normal((4, 5, 6))
    gc.check_grad(lambda t: t[idx] * 2.0, [a])


def test_getitem_grad_values_scatter_into_zeros():
    a = rng.standard_normal((5, 4))
    x = gc.input("x", a.shape, "float64")
    gx = gc.grad(gc.sum(x[::-2, 1:3] * 3.0), x)
    expect = np.zeros_like(a)
    for i in (4, 2, 0):
        for j in (1, 2):
            expect[i, j] = 3.0
    np.testing.assert_array_equal(run([x], gx, a), expect)


def test_getitem_second_derivative():
    a = rng.standard_normal((6, 5))

    def first_grad(t):
        # d/dt sum(t[1:5:2, ::-1] ** 3) = 3 t**2 at the selected entries, 0 elsewhere
        return gc.grad(gc.sum(t[1:5:2, ::-1] ** 3.0), t)
    gc.check_grad(first_grad, [a])
    x = gc.input("x", a.shape, "float64")
    expect = np.zeros_like(a)
    expect[1:5:2, :] = 3 * a[1:5:2, :] ** 2
    np.testing.assert_allclose(run([x], first_grad(x), a), expect, rtol=1e-12)


def test_getitem_int_tensor_and_no_grad_through_int():
    a = np.arange(24, dtype=np.int64).reshape(4, 6)
    x = gc.input("x", a.shape, "int64")
    out = run([x], x[1:, ::-2], a)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, a[1:, ::-2])


def test_getitem_out_of_range_int_is_build_error():
    x = gc.input("x", (3, 4))
    with pytest.raises(gc.GraphBuildError, match=r"getitem: index 3 is out of range") as e:
        x[3]
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"getitem: index -5 .*axis 1 of size 4") as e:
        x[0, -5]
    assert HERE in str(e.value)


@pytest.mark.parametrize("idx, msg", [
    ((0, 0, 0), "too many indices"),
    ((E, 0, E), "single ellipsis"),
    ((slice(None, None, 0),), "step cannot be zero"),
    ([0, 1], "gc.take"),
    (True, "boolean index"),
    (1.5, "unsupported index"),
])
def test_getitem_bad_indices(idx, msg):
    x = gc.input("x", (3, 4))
    with pytest.raises(gc.GraphBuildError, match=msg) as e:
        x[idx]
    assert "getitem" in str(e.value) and HERE in str(e.value)


def test_iterating_and_unpacking_a_tensor_stops_at_its_length():
    a = rng.standard_normal((3, 2)).astype(np.float32)
    x = gc.input("x", a.shape)
    rows = list(x)
    assert len(rows) == 3
    p, q, r = x
    for o, e in zip(run([x], [p, q, r], a), a):
        np.testing.assert_array_equal(o, e)
    with pytest.raises(IndexError):
        x[3]


def test_getitem_with_tensor_index_points_to_take():
    x = gc.input("x", (3, 4))
    i = gc.input("i", (2,), "int64")
    with pytest.raises(gc.GraphBuildError, match="getitem.*gc.take") as e:
        x[i]
    assert HERE in str(e.value)


def test_getitem_symbolic_batch_dim():
    x = gc.input("x", (None, 5), "float64")
    y = x[:, 1:3]
    assert y.shape == ("N", 2)
    z = x[..., ::-1, None]
    assert z.shape == ("N", 5, 1)
    gx = gc.grad(gc.sum(y * y), x)
    f = gc.compile([x], [y, z, gx])
    for n in (2, 7):
        a = rng.standard_normal((n, 5))
        yv, zv, gv = f(a)
        np.testing.assert_array_equal(yv, a[:, 1:3])
        np.testing.assert_array_equal(zv, a[:, ::-1, None])
        expect = np.zeros_like(a)
        expect[:, 1:3] = 2 * a[:, 1:3]
        np.testing.assert_allclose(gv, expect, rtol=1e-12)


@pytest.mark.parametrize("idx", [0, slice(1, 3), slice(None, None, -1), -1])
def test_getitem_symbolic_dim_other_slices_error(idx):
    x = gc.input("x", (None, 5))
    with pytest.raises(gc.GraphBuildError, match="getitem: cannot (slice|index) symbolic "
                                                 "dimension 'N'") as e:
        x[idx]
    assert HERE in str(e.value)


# ------------------------------------------------------------------ take / embedding
def _take_loop(a, idx, axis):
    """Independent reference: explicit loop over index positions."""
    pre, post = a.shape[:axis], a.shape[axis + 1:]
    out = np.empty(pre + idx.shape + post, a.dtype)
    for pos in np.ndindex(*idx.shape):
        sel = (slice(None),) * axis + (int(idx[pos]),)
        out[(slice(None),) * axis + pos] = a[sel]
    return out


@pytest.mark.parametrize("axis, ishape", [(0, (3,)), (1, (2, 3)), (2, ()), (-1, (4,))])
def test_take_forward(axis, ishape):
    a = rng.standard_normal((4, 5, 3)).astype(np.float32)
    ax = axis % 3
    idx = rng.integers(0, a.shape[ax], ishape)
    x = gc.input("x", a.shape)
    if ishape == ():
        # a 0-d index as a constant (gc.compile currently feeds 0-d inputs as shape (1,))
        y = gc.take(x, gc.constant(idx), axis=axis)
        out = run([x], y, a)
    else:
        i = gc.input("i", ishape, "int64")
        y = gc.take(x, i, axis=axis)
        out = run([x, i], y, a, idx)
    assert y.shape == a.shape[:ax] + ishape + a.shape[ax + 1:]
    np.testing.assert_array_equal(out, _take_loop(a, idx, ax))


def test_take_int32_indices_and_gather_alias():
    a = rng.standard_normal((6, 2))
    idx = np.array([5, 0, 5], np.int32)
    x = gc.input("x", a.shape, "float64")
    i = gc.input("i", idx.shape, "int32")
    np.testing.assert_array_equal(run([x, i], gc.gather(x, i), a, idx), a[[5, 0, 5]])


def test_take_grad_accumulates_repeated_indices():
    a = rng.standard_normal((5, 3))
    idx = np.array([[1, 3, 1], [1, 0, 4]])
    gc.check_grad(lambda t, i: gc.take(t, i, axis=0), [a, idx])
    x = gc.input("x", a.shape, "float64")
    i = gc.input("i", idx.shape, "int64")
    w = rng.standard_normal((2, 3, 3))
    gx = gc.grad(gc.sum(gc.take(x, i) * gc.constant(w, "float64")), x)
    expect = np.zeros_like(a)
    for p in range(2):
        for q in range(3):
            expect[idx[p, q]] += w[p, q]
    np.testing.assert_allclose(run([x, i], gx, a, idx), expect, rtol=1e-12)


def test_take_grad_along_middle_axis_and_second_derivative():
    a = rng.standard_normal((2, 4, 3))
    idx = np.array([2, 2, 0])
    gc.check_grad(lambda t, i: gc.take(t, i, axis=1), [a, idx])
    gc.check_grad(lambda t, i: gc.grad(gc.sum(gc.take(t, i, axis=1) ** 3.0), t), [a, idx])


def test_take_along_symbolic_axis_grad():
    x = gc.input("x", (None, 3), "float64")
    i = gc.input("i", (4,), "int64")
    gx = gc.grad(gc.sum(gc.take(x, i) ** 2.0), x)
    f = gc.compile([x, i], gx)
    idx = np.array([4, 0, 4, 1])
    for n in (5, 6):
        a = rng.standard_normal((n, 3))
        expect = np.zeros_like(a)
        for k in idx:
            expect[k] += 2 * a[k]
        np.testing.assert_allclose(f(a, idx), expect, rtol=1e-12)
    with pytest.raises(gc.GraphcError, match=r"take.*index out of range.*\[0, 4\)"):
        f(rng.standard_normal((4, 3)), idx)


def test_embedding_forward_and_grad():
    weight = rng.standard_normal((7, 4))
    idx = np.array([[0, 6, 6], [3, 0, 1]])
    w = gc.input("w", weight.shape, "float64")
    i = gc.input("i", idx.shape, "int64")
    out = run([i, w], gc.embedding(i, w), idx, weight)
    assert out.shape == (2, 3, 4)
    for p in range(2):
        for q in range(3):
            np.testing.assert_array_equal(out[p, q], weight[idx[p, q]])
    gc.check_grad(lambda ii, ww: gc.embedding(ii, ww), [idx, weight])


def test_embedding_symbolic_batch():
    w = gc.Parameter(rng.standard_normal((10, 3)).astype(np.float32), name="emb")
    i = gc.input("i", (None, 2), "int64")
    y = gc.embedding(i, w)
    assert y.shape == ("N", 2, 3)
    f = gc.compile([i], y)
    for n in (1, 4):
        idx = rng.integers(0, 10, (n, 2))
        np.testing.assert_array_equal(f(idx), w.value[idx])


@pytest.mark.parametrize("bad", [np.array([0, 5]), np.array([-1, 2])])
def test_take_out_of_range_raises_at_run_time(bad):
    x = gc.input("x", (5, 2))
    i = gc.input("i", (2,), "int64")
    f = gc.compile([x, i], gc.take(x, i))
    with pytest.raises(gc.IndexOutOfRangeError, match=r"take: index out of range.*\[0, 5\)") as e:
        f(np.zeros((5, 2), np.float32), bad)
    assert isinstance(e.value, gc.GraphcError) and isinstance(e.value, IndexError)
    assert e.value.value == bad[(bad < 0) | (bad >= 5)][0] and e.value.size == 5
    assert HERE in e.value.loc


def test_take_grad_out_of_range_raises_at_run_time():
    x = gc.input("x", (3,), "float64")
    i = gc.input("i", (2,), "int64")
    gx = gc.grad(gc.sum(gc.take(x, i)), x)
    f = gc.compile([x, i], gx)
    np.testing.assert_array_equal(f(np.zeros(3), np.array([2, 2])), [0, 0, 2])
    with pytest.raises(gc.GraphcError, match=r"take.*index out of range.*values from 3 to 3"):
        f(np.zeros(3), np.array([0, 3]))


def test_take_build_errors():
    x = gc.input("x", (3, 4))
    with pytest.raises(gc.GraphBuildError, match="take: indices must be int32 or int64") as e:
        gc.take(x, gc.input("f", (2,)))
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="take: axis 2 is out of range") as e:
        gc.take(x, gc.input("i", (2,), "int64"), axis=2)
    assert HERE in str(e.value)


# ------------------------------------------------------------------ squeeze / unsqueeze
def test_squeeze_unsqueeze():
    a = rng.standard_normal((1, 3, 1, 2)).astype(np.float32)
    x = gc.input("x", a.shape)
    outs = [gc.squeeze(x), gc.squeeze(x, 2), gc.squeeze(x, (0, -2)), gc.unsqueeze(x, 0),
            gc.unsqueeze(x, -1), gc.expand_dims(x, (1, 3))]
    expect = [a.reshape(3, 2), a.reshape(1, 3, 2), a.reshape(3, 2), a.reshape(1, 1, 3, 1, 2),
              a.reshape(1, 3, 1, 2, 1), a.reshape(1, 1, 3, 1, 1, 2)]
    for o, e in zip(run([x], outs, a), expect):
        assert o.shape == e.shape
        np.testing.assert_array_equal(o, e)
    gc.check_grad(lambda t: gc.unsqueeze(gc.squeeze(t, 0), 1), [a.astype(np.float64)])


def test_squeeze_errors():
    x = gc.input("x", (1, 3))
    with pytest.raises(gc.GraphBuildError, match="squeeze: cannot squeeze axis 1 of size 3") as e:
        gc.squeeze(x, 1)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="squeeze: .*out of range") as e:
        gc.squeeze(x, 2)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="unsqueeze: .*out of range") as e:
        gc.unsqueeze(x, 4)
    assert HERE in str(e.value)


def test_squeeze_keeps_symbolic_dims():
    x = gc.input("x", (None, 1, 4))
    assert gc.squeeze(x).shape == ("N", 4)
    assert gc.unsqueeze(x, 1).shape == ("N", 1, 1, 4)
    with pytest.raises(gc.GraphBuildError, match="squeeze: cannot squeeze axis 0"):
        gc.squeeze(x, 0)


# ------------------------------------------------------------------ concat / stack / split
def test_concat_forward_promotes_and_grads():
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.standard_normal((2, 1)).astype(np.float64)
    c = np.arange(4, dtype=np.int64).reshape(2, 2)
    xa, xb, xc = gc.input("a", a.shape), gc.input("b", b.shape, "float64"), \
        gc.input("c", c.shape, "int64")
    y = gc.concat([xa, xb, xc], axis=-1)
    assert y.shape == (2, 6) and y.dtype == np.float64
    out = run([xa, xb, xc], y, a, b, c)
    expect = np.empty((2, 6))
    expect[:, :3], expect[:, 3:4], expect[:, 4:] = a, b, c
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expect)
    gc.check_grad(lambda p, q, r: gc.concatenate([p, q, r], axis=1),
                  [a.astype(np.float64), b, c])


def test_concat_grad_values_and_second_derivative():
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 3))
    xa, xb = gc.input("a", a.shape, "float64"), gc.input("b", b.shape, "float64")
    w = rng.standard_normal((6, 3))
    ga, gb = gc.grad(gc.sum(gc.concat([xa, xb]) * gc.constant(w, "float64")), [xa, xb])
    oa, ob = run([xa, xb], [ga, gb], a, b)
    np.testing.assert_array_equal(oa, w[:2])
    np.testing.assert_array_equal(ob, w[2:])
    gc.check_grad(lambda p, q: gc.grad(gc.sum(gc.concat([p, q]) ** 3.0), q), [a, b])


def test_concat_shape_errors_name_the_input():
    xs = [gc.input("a", (2, 3)), gc.input("b", (2, 3)), gc.input("c", (4, 3))]
    with pytest.raises(gc.GraphBuildError,
                       match=r"concat: input 2 has shape \(4, 3\).*axis 0") as e:
        gc.concat(xs, axis=1)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"concat: input 1 has rank 1") as e:
        gc.concat([xs[0], gc.input("d", (3,))])
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"concat: axis 2 is out of range") as e:
        gc.concat(xs, axis=2)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"concat: needs at least one"):
        gc.concat([])


def test_concat_symbolic_batch():
    x = gc.input("x", (None, 2), "float64")
    z = gc.input("z", (None, 3), "float64")
    y = gc.concat([x, z], axis=1)
    assert y.shape == ("N", 5)
    with pytest.raises(gc.GraphBuildError, match="concat: input 0 has symbolic size 'N'") as e:
        gc.concat([x, x], axis=0)
    assert HERE in str(e.value)
    f = gc.compile([x, z], y)
    for n in (1, 3):
        a, b = rng.standard_normal((n, 2)), rng.standard_normal((n, 3))
        np.testing.assert_array_equal(f(a, b), np.hstack([a, b]))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack(axis):
    arrs = [rng.standard_normal((3, 2)) for _ in range(4)]
    xs = [gc.input(f"x{k}", (3, 2), "float64") for k in range(4)]
    y = gc.stack(xs, axis=axis)
    out = run(xs, y, *arrs)
    ax = axis % 3
    expect_shape = [3, 2]
    expect_shape.insert(ax, 4)
    assert out.shape == tuple(expect_shape) == tuple(y.shape)
    for k in range(4):
        np.testing.assert_array_equal(np.take(out, k, axis=ax), arrs[k])
    gc.check_grad(lambda *t: gc.stack(list(t), axis=axis), arrs)


def test_stack_errors():
    with pytest.raises(gc.GraphBuildError, match=r"stack: .*input 1 has \(3, 1\)") as e:
        gc.stack([gc.input("a", (3, 2)), gc.input("b", (3, 1))])
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"stack: axis 3 is out of range") as e:
        gc.stack([gc.input("a", (3, 2))], axis=3)
    assert HERE in str(e.value)


def test_split():
    a = rng.standard_normal((2, 7))
    x = gc.input("x", a.shape, "float64")
    parts = gc.split(x, [2, 0, 5], axis=1)
    assert [p.shape for p in parts] == [(2, 2), (2, 0), (2, 5)]
    outs = run([x], parts, a)
    np.testing.assert_array_equal(outs[0], a[:, :2])
    assert outs[1].shape == (2, 0)
    np.testing.assert_array_equal(outs[2], a[:, 2:])
    halves = run([x], gc.split(x, 2, axis=0), a)
    np.testing.assert_array_equal(halves[1], a[1:])
    gc.check_grad(lambda t: gc.split(t, [3, 4], axis=-1)[1] * 2.0, [a])
    with pytest.raises(gc.GraphBuildError, match="split: .*7 cannot be split into 2") as e:
        gc.split(x, 2, axis=1)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match=r"split: sizes \[3, 3\] must .*sum") as e:
        gc.split(x, [3, 3], axis=1)
    assert HERE in str(e.value)


# ------------------------------------------------------------------ pad
def _pad_ref(a, pairs, value):
    out = np.full(tuple(d + b + e for d, (b, e) in zip(a.shape, pairs)), value, a.dtype)
    for idx in np.ndindex(*a.shape):
        out[tuple(i + b for i, (b, _) in zip(idx, pairs))] = a[idx]
    return out


@pytest.mark.parametrize("pw, pairs", [
    (1, ((1, 1), (1, 1))), ((2, 0), ((2, 0), (2, 0))), (((0, 1), (3, 2)), ((0, 1), (3, 2))),
    (((1, 2),), ((1, 2), (1, 2))), (0, ((0, 0), (0, 0))),
])
def test_pad_forward_and_grad(pw, pairs):
    a = rng.standard_normal((3, 2)).astype(np.float32)
    x = gc.input("x", a.shape)
    out = run([x], gc.pad(x, pw, value=-1.5), a)
    np.testing.assert_array_equal(out, _pad_ref(a, pairs, np.float32(-1.5)))
    gc.check_grad(lambda t: gc.pad(t, pw, 2.0), [a.astype(np.float64)])


def test_pad_int_tensor_and_second_derivative():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    x = gc.input("x", a.shape, "int32")
    out = run([x], gc.pad(x, ((1, 0), (0, 2)), value=7), a)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, _pad_ref(a, ((1, 0), (0, 2)), 7))
    b = rng.standard_normal((2, 3))
    gc.check_grad(lambda t: gc.grad(gc.sum(gc.pad(t, 1) ** 3.0), t), [b])


def test_pad_errors():
    x = gc.input("x", (2, 3))
    with pytest.raises(gc.GraphBuildError, match="pad: .*negative width") as e:
        gc.pad(x, ((0, -1), (0, 0)))
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="pad: pad_width") as e:
        gc.pad(x, ((1, 1), (1, 1), (1, 1)))
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="pad: cannot pad symbolic dimension 'N'") as e:
        gc.pad(gc.input("y", (None, 3)), 1)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="pad: pad value 0.5 cannot be stored") as e:
        gc.pad(gc.input("i", (2,), "int64"), 1, value=0.5)
    assert HERE in str(e.value)


def test_pad_symbolic_batch():
    x = gc.input("x", (None, 3), "float64")
    y = gc.pad(x, ((0, 0), (2, 1)))
    assert y.shape == ("N", 6)
    f = gc.compile([x], [y, gc.grad(gc.sum(y * y), x)])
    for n in (2, 5):
        a = rng.standard_normal((n, 3))
        yv, gv = f(a)
        np.testing.assert_array_equal(yv, _pad_ref(a, ((0, 0), (2, 1)), 0.0))
        np.testing.assert_allclose(gv, 2 * a, rtol=1e-12)


# ------------------------------------------------------------------ tile / repeat
def test_tile_and_repeat():
    a = rng.standard_normal((2, 3))
    x = gc.input("x", a.shape, "float64")
    cases = [(gc.tile(x, (2, 3)), np.block([[a] * 3] * 2)),
             (gc.tile(x, (2, 1, 1)), np.stack([a, a])),
             (gc.repeat(x, 2, axis=1), np.array([[r[j // 2] for j in range(6)] for r in a])),
             (gc.repeat(x, 3), np.array([v for v in a.ravel() for _ in range(3)]))]
    outs = run([x], [c[0] for c in cases], a)
    for o, (_, e) in zip(outs, cases):
        np.testing.assert_array_equal(o, e)
    gc.check_grad(lambda t: gc.tile(t, (1, 2)), [a])
    gc.check_grad(lambda t: gc.repeat(t, 2, axis=0), [a])


# ------------------------------------------------------------------ one_hot
def test_one_hot():
    idx = np.array([[0, 3], [2, 2]])
    i = gc.input("i", idx.shape, "int64")
    y = gc.one_hot(i, 4)
    assert y.shape == (2, 2, 4) and y.dtype == np.float32
    out = run([i], y, idx)
    expect = np.zeros((2, 2, 4), np.float32)
    for p in range(2):
        for q in range(2):
            expect[p, q, idx[p, q]] = 1.0
    np.testing.assert_array_equal(out, expect)
    assert run([i], gc.one_hot(i, 5, dtype="int32"), idx).dtype == np.int32


def test_one_hot_errors():
    i = gc.input("i", (2,), "int64")
    f = gc.compile([i], gc.one_hot(i, 3))
    with pytest.raises(gc.GraphcError, match=r"one_hot: index out of range.*\[0, 3\)"):
        f(np.array([1, 3]))
    with pytest.raises(gc.GraphBuildError, match="one_hot: num_classes must be a positive") as e:
        gc.one_hot(i, 0)
    assert HERE in str(e.value)
    with pytest.raises(gc.GraphBuildError, match="one_hot: indices must be int") as e:
        gc.one_hot(gc.input("f", (2,)), 3)
    assert HERE in str(e.value)


def test_one_hot_is_not_differentiable_but_usable_in_loss():
    logits = rng.standard_normal((3, 4))
    labels = np.array([0, 3, 1])
    # sum(logits * one_hot) picks logits[k, labels[k]]: its gradient is the one-hot matrix
    gc.check_grad(lambda z, y: gc.sum(z * gc.one_hot(y, 4, dtype="float64")), [logits, labels])
