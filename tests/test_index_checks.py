"""Run-time index and label checks: the same IndexOutOfRangeError, with the same
message, on every backend, whether the indices are fed or computed in the graph.

The native backends clamp every address a bad index makes (nothing out of
bounds is read or written) and check the index arrays in check kernels
(graphc/kernel/checks.py); these tests would have caught the silent clamping
that gave row 9 for take(t, idx + 1) with idx = [9, 0] on a 10-row table.
"""
import shutil

import numpy as np
import pytest

import graphc as gc
from graphc import IndexOutOfRangeError
from graphc.ops.base import apply

HERE = "test_index_checks.py"
RNG = np.random.default_rng(13)
HAVE_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def outcomes(inputs, outputs, feeds, backends=("numpy", "llvm"), optimize=2):
    """{backend: list of outputs or the error raised}."""
    got = {}
    for be in backends:
        f = gc.compile(inputs, outputs, backend=be, optimize=optimize)
        try:
            got[be] = f(*feeds)
        except Exception as e:       # noqa: BLE001 - compared below
            got[be] = e
    return got


def assert_same_error(got, pattern):
    """Every backend raised IndexOutOfRangeError with one message matching pattern, at
    this file's line."""
    msgs = set()
    for be, r in got.items():
        assert isinstance(r, IndexOutOfRangeError), (be, r)
        assert isinstance(r, gc.GraphcError) and isinstance(r, IndexError)
        msgs.add(str(r))
    assert len(msgs) == 1, msgs
    msg = msgs.pop()
    import re
    assert re.search(pattern, msg), msg
    assert HERE in msg, msg
    return msg


def assert_same_values(got, want):
    for be, r in got.items():
        assert not isinstance(r, Exception), (be, r)
        for a, w in zip(r, want):
            np.testing.assert_array_equal(a, w, err_msg=be)


TABLE = np.arange(30, dtype=np.float32).reshape(10, 3)


# ------------------------------------------------------------------ computed indices
def test_take_of_computed_indices_raises_like_the_reference():
    t = gc.input("t", (10, 3))
    i = gc.input("i", (2,), "int64")
    y = gc.take(t, i + 1)
    got = outcomes([t, i], [y], [TABLE, np.array([9, 0])])
    assert_same_error(got, r"^take: index out of range: index 10 at position \(0,\) is not in "
                           r"\[0, 10\) \(axis 0 of size 10\); 1 of the 2 indices is out of range "
                           r"\(values from 10 to 10\)\n  node built at .*test_index_checks")
    good = outcomes([t, i], [y], [TABLE, np.array([8, 0])])
    assert_same_values(good, [TABLE[[9, 1]]])
    f = gc.compile([t, i], y, backend="llvm")   # repeated calls (the small-input fast path)
    for _ in range(3):
        with pytest.raises(IndexOutOfRangeError, match="index 10 at position"):
            f(TABLE, np.array([9, 0]))
        np.testing.assert_array_equal(f(TABLE, np.array([3, 0])), TABLE[[4, 1]])


@pytest.mark.parametrize("make, feed, bad", [
    (lambda i: gc.cast(gc.cast(i, "float32") * 1.5, "int64"), [2, 7], 10),   # 7*1.5 -> 10
    (lambda i: i * 2, [4, 5], 10),
    (lambda i: i - 3, [5, 2], -1),
])
def test_take_of_cast_and_arithmetic_indices(make, feed, bad):
    t = gc.input("t", (10, 3))
    i = gc.input("i", (2,), "int64")
    got = outcomes([t, i], [gc.take(t, make(i))], [TABLE, np.array(feed)])
    assert_same_error(got, rf"take: index out of range: index {bad} at position \(1,\)")


def test_embedding_gradient_of_computed_indices_raises():
    # take_grad (the scatter-add) dropped an out-of-range row silently
    w = gc.input("w", (5, 3))
    i = gc.input("i", (3,), "int64")
    gw, = gc.grad(gc.sum(gc.embedding(i + 1, w) * 2.0), [w])
    got = outcomes([w, i], [gw], [np.ones((5, 3), np.float32), np.array([0, 4, 1])])
    assert_same_error(got, r"take(_grad)?: index out of range: index 5 at position \(1,\) is "
                           r"not in \[0, 5\) \(axis 0 of size 5\)")
    good = outcomes([w, i], [gw], [np.ones((5, 3), np.float32), np.array([0, 3, 0])])
    want = np.zeros((5, 3), np.float32)
    for k in (1, 4, 1):
        want[k] += 2.0
    assert_same_values(good, [want])


def test_take_grad_alone_checks_its_indices():
    g = gc.input("g", (2, 3))
    i = gc.input("i", (2,), "int64")
    like = gc.input("like", (4, 3))
    y = apply("take_grad", [g, i - 1, like], axis=0)
    got = outcomes([g, i, like], [y], [np.ones((2, 3), np.float32), np.array([0, 2]),
                                        np.zeros((4, 3), np.float32)])
    assert_same_error(got, r"^take_grad: index out of range: index -1 at position \(0,\)")


def test_one_hot_of_computed_indices_raises():
    i = gc.input("i", (2, 2), "int64")
    got = outcomes([i], [gc.one_hot(i + 1, 4)], [np.array([[0, 3], [1, 2]])])
    assert_same_error(got, r"^one_hot: index out of range: index 4 at position \(0, 1\) is not "
                           r"in \[0, 4\) \(num_classes=4\)")
    good = outcomes([i], [gc.one_hot(i + 1, 4)], [np.array([[0, 2], [1, 2]])])
    assert_same_values(good, [np.eye(4, dtype=np.float32)[[[1, 3], [2, 3]]]])


def test_count_extremes_and_first_position_over_many_blocks(monkeypatch):
    """Several check blocks (4096 positions each), a ragged last one, bad values in
    three of them; 4 threads share the blocks out: the record is the reference's."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "4")
    n = 3 * 4096 + 77
    t = gc.input("t", (10, 3))
    i = gc.input("i", (n,), "int64")
    y = gc.take(t, i * 1)
    v = RNG.integers(0, 10, n)
    v[[5000, 9000, n - 1]] = [12, -7, 10]
    got = outcomes([t, i], [y], [TABLE, v])
    assert_same_error(got, rf"index 12 at position \(5000,\) .*; 3 of the {n} indices are out "
                           r"of range \(values from -7 to 12\)")
    v[[5000, 9000, n - 1]] = 3
    assert_same_values(outcomes([t, i], [y], [TABLE, v]), [TABLE[v]])


def test_large_index_array_checked_by_all_threads(monkeypatch):
    """Big enough that every thread runs the check kernel (a share of its blocks)."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "3")
    n = 1 << 18
    t = gc.input("t", (7,))
    i = gc.input("i", (n,), "int32")
    y = gc.take(t, i + 0)
    v = RNG.integers(0, 7, n).astype(np.int32)
    f = gc.compile([t, i], y, backend="llvm")
    tv = np.arange(7, dtype=np.float32)
    for pos in (0, n // 3 + 5, n - 1):        # a bad index in each thread's share
        w = v.copy()
        w[pos] = 7
        with pytest.raises(IndexOutOfRangeError, match=rf"index 7 at position \({pos},\)"):
            f(tv, w)
        np.testing.assert_array_equal(f(tv, v), tv[v])     # the record is reset per call


def test_bad_index_never_reads_out_of_bounds(monkeypatch):
    """With every address checked (GRAPHC_DEBUG_BOUNDS=1) a bad computed index is
    reported as such: the kernels clamped it, nothing was read out of bounds."""
    monkeypatch.setenv("GRAPHC_DEBUG_BOUNDS", "1")
    t = gc.input("t", (10, 3))
    i = gc.input("i", (2,), "int64")
    f = gc.compile([t, i], [gc.take(t, i * 1000), gc.one_hot(i - 50, 3)], backend="llvm")
    with pytest.raises(IndexOutOfRangeError, match=r"take: index out of range: index 9000"):
        f(TABLE, np.array([9, 0]))


def test_fed_indices_raise_the_same_error_on_both_backends():
    """The same type for the same bad index (was GraphcError on NumPy, IndexError on
    LLVM)."""
    x = gc.input("x", (3, 5))
    i = gc.input("i", (2,), "int64")
    got = outcomes([x, i], [gc.take(x, i, axis=1)], [np.zeros((3, 5), np.float32),
                                                      np.array([-1, 2])])
    assert_same_error(got, r"^take: index out of range: index -1 at position \(0,\) is not in "
                           r"\[0, 5\) \(axis 1 of size 5\)")


# ------------------------------------------------------------------ labels
LOGITS = RNG.standard_normal((3, 4)).astype(np.float32)


@pytest.mark.parametrize("bad", [4, -1, 2 ** 40])
def test_cross_entropy_with_ignore_index_checks_labels(bad):
    x = gc.input("x", (3, 4))
    y = gc.input("y", (3,), "int64")
    loss = gc.cross_entropy(x, y, ignore_index=-100)
    got = outcomes([x, y], [loss], [LOGITS, np.array([0, bad, -100])])
    assert_same_error(got, rf"^softmax_cross_entropy: label out of range: label {bad} at "
                           r"position \(1,\) is not in \[0, 4\) \(4 classes\) and is not "
                           r"ignore_index=-100; 1 of the 3 labels is out of range")


def test_cross_entropy_ignored_labels_are_legal():
    x = gc.input("x", (3, 4))
    y = gc.input("y", (3,), "int64")
    loss = gc.cross_entropy(x, y, ignore_index=-100)
    gx, = gc.grad(loss, [x])
    lab = np.array([2, -100, 0])
    z = LOGITS.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    want = -(logp[0, 2] + logp[2, 0]) / 2
    p = np.exp(logp)
    gwant = np.zeros_like(z)
    for r, c in ((0, 2), (2, 0)):
        gwant[r] = p[r] / 2
        gwant[r, c] -= 0.5
    for be in ("numpy", "llvm"):
        v, g = gc.compile([x, y], [loss, gx], backend=be)(LOGITS, lab)
        np.testing.assert_allclose(v, want, rtol=1e-5)
        np.testing.assert_allclose(g, gwant, rtol=1e-5, atol=1e-6)


def test_cross_entropy_of_computed_labels():
    x = gc.input("x", (3, 4))
    y = gc.input("y", (3,), "int32")
    for ii in (None, -100):
        loss = gc.cross_entropy(x, y + 1, ignore_index=ii)
        got = outcomes([x, y], [loss], [LOGITS, np.array([0, 3, 1], np.int32)])
        assert_same_error(got, r"softmax_cross_entropy: label out of range: label 4 at "
                               r"position \(1,\)")


@pytest.mark.parametrize("ii", [None, -100])
def test_gradient_alone_checks_labels(ii):
    """Only the gradient compiled (not the loss): its one-hot target used to ignore a
    bad label silently, on both backends."""
    x = gc.input("x", (3, 4))
    y = gc.input("y", (3,), "int64")
    gx, = gc.grad(gc.cross_entropy(x, y, ignore_index=ii), [x])
    got = outcomes([x, y], [gx], [LOGITS, np.array([0, 4, 1])])
    assert_same_error(got, r"^softmax_cross_entropy: label out of range: label 4 at position "
                           r"\(1,\) is not in \[0, 4\)")
    lp = gc.input("lp", (3, 4))
    gl, = gc.grad(gc.nll_loss(lp, y, ignore_index=ii), [lp])
    got = outcomes([lp, y], [gl], [LOGITS, np.array([-3, 0, 1])])
    assert_same_error(got, r"^nll: label out of range: label -3 at position \(0,\)")
    good = outcomes([lp, y], [gl], [LOGITS, np.array([3, 0, 1])])
    want = np.zeros((3, 4), np.float32)
    want[[0, 1, 2], [3, 0, 1]] = -1 / 3
    for r in good.values():
        np.testing.assert_allclose(r[0], want, rtol=1e-6)


def test_nll_with_ignore_index_checks_labels():
    lp = gc.input("lp", (2, 3))
    y = gc.input("y", (2,), "int64")
    got = outcomes([lp, y], [gc.nll_loss(lp, y, ignore_index=7)],
                   [np.zeros((2, 3), np.float32), np.array([7, 3])])
    assert_same_error(got, r"^nll: label out of range: label 3 at position \(1,\) is not in "
                           r"\[0, 3\) \(3 classes\) and is not ignore_index=7")


def test_failed_step_leaves_parameters_unchanged():
    w = gc.Parameter(np.ones((4, 3), np.float32), name="w")
    x = gc.input("x", (2, 4))
    y = gc.input("y", (2,), "int64")
    loss = gc.cross_entropy(x @ w, y)
    gw, = gc.grad(loss, [w])
    for be in ("numpy", "llvm"):
        f = gc.compile([x, y], loss, updates=[(w, w - 0.5 * gw)], backend=be)
        with pytest.raises(IndexOutOfRangeError):
            f(np.ones((2, 4), np.float32), np.array([0, 3]))
        np.testing.assert_array_equal(w.value, np.ones((4, 3), np.float32))


# ------------------------------------------------------------------ fed integers
@pytest.mark.filterwarnings("ignore::graphc.InputCastWarning")  # a cast on purpose
def test_uint64_labels_keep_their_value():
    x = gc.input("x", (2, 4))
    y = gc.input("y", (2,), "int64")
    for be in ("numpy", "llvm"):
        f = gc.compile([x, y], gc.cross_entropy(x, y), backend=be)
        with pytest.raises(ValueError, match=r"input 'y': uint64 value 9223372036854775808 at "
                                             r"index \(1,\) is outside the int64 range"):
            f(np.zeros((2, 4), np.float32), np.array([0, 2 ** 63], np.uint64))
        assert np.isfinite(f(np.zeros((2, 4), np.float32), np.array([0, 3], np.uint64)))


@pytest.mark.filterwarnings("ignore::graphc.InputCastWarning")  # a cast on purpose
def test_int64_into_int32_input_does_not_wrap():
    t = gc.input("t", (10, 3))
    i = gc.input("i", (2,), "int32")
    f = gc.compile([t, i], gc.take(t, i), backend="llvm")
    with pytest.raises(ValueError, match=r"int64 value 1099511627776 at index \(1,\) is "
                                         r"outside the int32 range"):
        f(TABLE, np.array([0, 2 ** 40]))        # would wrap to 0, a valid index
    np.testing.assert_array_equal(f(TABLE, np.array([0, 9])), TABLE[[0, 9]])


# ------------------------------------------------------------------ ONNX Gather
def test_onnx_gather_indices_are_checked():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    g = helper.make_graph(
        [helper.make_node("Gather", ["t", "i"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[numpy_helper.from_array(table, "t")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    model = gc.onnx.load(m)
    for be in ("numpy", "llvm"):
        f = model.compile(backend=be)
        np.testing.assert_array_equal(f(np.array([-1, 0]))[0], table[[2, 0]])   # wraps once
        with pytest.raises(IndexOutOfRangeError, match=r"take: index out of range: index 5 "):
            f(np.array([5, 0]))                # was row 2 on llvm
        with pytest.raises(IndexOutOfRangeError, match=r"index -1 at position \(1,\)"):
            f(np.array([0, -4]))               # -4 + 3 is still negative
    assert onnx is not None


def test_onnx_one_hot_targets_are_checked():
    """NegativeLogLikelihoodLoss and GatherElements import as one-hot products: a bad
    label or index gave a zero row (a silently wrong loss or value)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def model(node, ins, out):
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in ins],
                              [helper.make_tensor_value_info(*out)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return gc.onnx.load(m)
    F, I = TensorProto.FLOAT, TensorProto.INT64
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    nll = model(helper.make_node("NegativeLogLikelihoodLoss", ["x", "t"], ["y"],
                                 reduction="none", ignore_index=-1),
                [("x", F, [2, 3]), ("t", I, [2])], ("y", F, [2]))
    ge = model(helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1),
               [("x", F, [2, 3]), ("i", I, [2, 2])], ("y", F, [2, 2]))
    for be in ("numpy", "llvm"):
        f = nll.compile(backend=be)
        np.testing.assert_array_equal(f(x, np.array([2, -1]))[0], [-2.0, 0.0])
        with pytest.raises(IndexOutOfRangeError, match=r"index 3 at position \(0,\) is not in "
                                                       r"\[0, 3\) \(num_classes=3\)"):
            f(x, np.array([3, -1]))
        g = ge.compile(backend=be)
        np.testing.assert_array_equal(g(x, np.array([[0, -1], [2, 1]]))[0], [[0, 2], [5, 4]])
        with pytest.raises(IndexOutOfRangeError, match=r"index -1 at position \(1, 0\)"):
            g(x, np.array([[0, 1], [-4, 1]]))      # -4 + 3 is still negative


# ------------------------------------------------------------------ CUDA (emulated)
@pytest.mark.skipif(not HAVE_CXX, reason="the CUDA emulator needs a host C++ compiler")
def test_cuda_generated_code_checks_computed_indices():
    from graphc.backends import cuda as C
    C.set_options(emulate=True)
    try:
        t = gc.input("t", (10, 3))
        i = gc.input("i", (3, 2000), "int64")
        x = gc.input("x", (2, 4))
        y = gc.input("y", (2,), "int64")
        gx, = gc.grad(gc.cross_entropy(x, y, ignore_index=-100), [x])
        outs = [gc.take(t, i + 1), gx]
        iv = RNG.integers(0, 9, (3, 2000))
        yv = np.array([3, -100])
        ins = [t, i, x, y]
        fc = gc.compile(ins, outs, backend="cuda")
        fn = gc.compile(ins, outs, backend="numpy")
        for k, (r, v) in enumerate(zip(fc(TABLE, iv, LOGITS[:2], yv),
                                       fn(TABLE, iv, LOGITS[:2], yv))):
            np.testing.assert_allclose(r, v, rtol=1e-6, atol=1e-7, err_msg=str(k))
        bad = iv.copy()
        bad[[1, 2], [1999, 5]] = [9, -2]
        errs = []
        for f in (fc, fn):
            with pytest.raises(IndexOutOfRangeError) as e:
                f(TABLE, bad, LOGITS[:2], yv)
            errs.append(str(e.value))
        assert errs[0] == errs[1]
        assert "index 10 at position (1, 1999)" in errs[0] and "values from -1 to 10" in errs[0]
        errs = []
        for f in (fc, fn):
            with pytest.raises(IndexOutOfRangeError) as e:
                f(TABLE, iv, LOGITS[:2], np.array([3, 4]))
            errs.append(str(e.value))
        assert errs[0] == errs[1] and "label 4 at position (1,)" in errs[0]
    finally:
        C.set_options(emulate=None)


def test_training_graph_checks_its_labels_once():
    """With the loss in the graph, the gradient's index_check is redundant (the loss
    kernel checks the same labels the same way): the optimizer drops it."""
    from graphc.ir.graph import Graph
    from graphc.kernel.lower import lower_graph
    from graphc.passes import optimize
    x = gc.input("x", (3, 4))
    y = gc.input("y", (3,), "int64")
    loss = gc.cross_entropy(x, y, ignore_index=-100)
    gx, = gc.grad(loss, [x])
    g = Graph([loss, gx], [x, y])
    def checks(gr):
        return sorted(k.name for k in lower_graph(gr).kernels if k.name.startswith("check"))
    assert checks(g) == ["check_softmax_cross_entropy"] * 2
    for level in (1, 2):
        og, rep = optimize(g, level)
        assert not any(n.op.name == "index_check" for n in og.nodes)
        assert any("already checked" in c for r in rep.passes for c in r.changes)
        assert checks(og) == ["check_softmax_cross_entropy"]
    og, _ = optimize(Graph([gx], [x, y]), 2)          # the gradient alone keeps its check
    assert checks(og) == ["check_softmax_cross_entropy"]
    got = outcomes([x, y], [loss, gx], [LOGITS, np.array([0, 9, -100])])
    assert_same_error(got, r"^softmax_cross_entropy: label out of range: label 9 at position "
                           r"\(1,\)")


@pytest.mark.parametrize("backend", ["llvm", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAVE_CXX, reason="the CUDA emulator needs a host C++ compiler"))])
def test_checks_inside_a_native_time_loop(backend):
    """Embedding and cross-entropy inside gc.scan (kernels run once per step on views
    of the inputs): the first failing step is reported, as by the reference."""
    from graphc.backends import cuda as C
    T, B = 4, 3
    w = gc.input("w", (6, 5))
    ids = gc.input("ids", (T, B), "int64")
    lab = gc.input("lab", (T, B), "int64")

    def step(h, xt):
        i, lb = xt
        h2 = gc.tanh(h + gc.embedding(i + 1, w))
        return h2, gc.cross_entropy(h2, lb, reduction="none", ignore_index=-1)
    _, ys = gc.scan(step, gc.constant(np.zeros((B, 5), np.float32)), (ids, lab))
    loss = gc.sum(ys)
    gw, = gc.grad(loss, [w])
    wv = RNG.standard_normal((6, 5)).astype(np.float32)
    iv = RNG.integers(0, 5, (T, B))
    lv = RNG.integers(0, 5, (T, B))
    lv[1, 1] = -1
    bad_i = iv.copy()
    bad_i[2, 1], bad_i[3, 0], bad_i[3, 2] = 5, -2, 5      # steps 2 and 3
    bad_l = lv.copy()
    bad_l[3, 0] = 7
    C.set_options(emulate=True)
    try:
        got = outcomes([w, ids, lab], [loss, gw], [wv, iv, lv], ("numpy", backend))
        for a, b in zip(got[backend], got["numpy"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        got = outcomes([w, ids, lab], [loss, gw], [wv, bad_i, lv], ("numpy", backend))
        assert_same_error(got, r"^take: index out of range: index 6 at position \(1,\) .*; 1 of "
                               r"the 3 indices is out of range \(values from 6 to 6\)")
        got = outcomes([w, ids, lab], [loss, gw], [wv, iv, bad_l], ("numpy", backend))
        assert_same_error(got, r"^softmax_cross_entropy: label out of range: label 7 at "
                               r"position \(0,\)")
    finally:
        C.set_options(emulate=None)


def test_ignore_index_must_fit_int64():
    x = gc.input("x", (2, 3))
    y = gc.input("y", (2,), "int64")
    with pytest.raises(gc.GraphBuildError, match=r"ignore_index 1180591620717411303424 does not "
                                                 r"fit in int64(.|\n)*test_index_checks"):
        gc.cross_entropy(x, y, ignore_index=2 ** 70)
