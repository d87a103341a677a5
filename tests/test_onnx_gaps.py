"""Issue 19's import gaps: LRN, Mod (and other operators folded at load time before
the unsupported-operator scan), ConstantOfShape/Expand with shapes computed from a
symbolic batch, and the clear errors for bad input of each.

References: independent NumPy loops (LRN), NumPy's mod/fmod, and onnxruntime
(when installed) on the same hand-built models.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphc as gc  # noqa: E402
from _onnx_build import _model, _vi  # noqa: E402
from graphc.ir.errors import GraphcError  # noqa: E402
from graphc.onnx import OnnxImportError, UnsupportedOperatorError  # noqa: E402

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(19)


def _ort(m, feeds):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _lrn_loop(x, size, alpha, beta, bias):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    n_, c_, h_, w_ = x.shape
    for n in range(n_):
        for c in range(c_):
            js = [j for j in range(c - lo, c + hi + 1) if 0 <= j < c_]
            for i in range(h_):
                for k in range(w_):
                    s = sum(x[n, j, i, k] ** 2 for j in js)
                    out[n, c, i, k] = x[n, c, i, k] / (bias + alpha / size * s) ** beta
    return out


# ---------------------------------------------------------------- LRN
def _lrn_net(size, c=6):
    # Conv -> LRN -> Relu, as AlexNet's first block (reduced)
    w = RNG.standard_normal((c, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("LRN", ["h"], ["n"], name="norm1", size=size, alpha=1e-2,
                              beta=0.75, bias=2.0),
             helper.make_node("Relu", ["n"], ["y"])]
    return _model(nodes, [_vi("x", F32, ["N", 3, 5, 5])], [_vi("y", F32, ["N", c, 5, 5])],
                  [("w", w)]), w


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_lrn_model_matches_onnxruntime_and_loop_reference(backend):
    if backend == "llvm":
        pytest.importorskip("llvmlite")
    m, w = _lrn_net(5)
    f = gc.onnx.load(m).compile(backend)
    for n in (1, 3):
        x = RNG.standard_normal((n, 3, 5, 5)).astype(np.float32)
        (got,) = f(x)
        (want,) = _ort(m, {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # the conv output through an independent loop LRN
        (h,) = gc.onnx.load(_model(m.graph.node[:1], list(m.graph.input),
                                   [_vi("h", F32, ["N", 6, 5, 5])], [("w", w)]))(x)
        np.testing.assert_allclose(got, np.maximum(_lrn_loop(h, 5, 1e-2, 0.75, 2.0), 0),
                                   rtol=1e-5, atol=1e-6)


def test_lrn_even_size_follows_the_onnx_window():
    # ONNX's window for an even size: floor((size-1)/2) channels before, ceil after
    m, w = _lrn_net(4)
    x = RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)
    (got,) = gc.onnx.load(m)(x)
    (h,) = gc.onnx.load(_model(m.graph.node[:1], list(m.graph.input),
                               [_vi("h", F32, ["N", 6, 5, 5])], [("w", w)]))(x)
    np.testing.assert_allclose(got, np.maximum(_lrn_loop(h, 4, 1e-2, 0.75, 2.0), 0),
                               rtol=1e-5, atol=1e-6)


def test_imported_lrn_trains():
    # the conv weight's gradient through LRN against central differences (float64)
    m, w = _lrn_net(3)
    model = gc.onnx.load(m)
    x = RNG.standard_normal((2, 3, 5, 5))
    (p,) = model.parameters

    def loss_of(wv):
        p.value = wv.astype(np.float32)
        return float(np.sum(model(x.astype(np.float32))[0].astype(np.float64) ** 2))
    s = gc.sum(gc.square(model.outputs[0]))
    (gw,) = gc.grad(s, [p])
    g = gc.compile(model.inputs, gw)(x.astype(np.float32))
    w0 = w.astype(np.float64)
    for idx in [(0, 0, 0, 0), (3, 1, 2, 1), (5, 2, 1, 1)]:
        e = np.zeros_like(w0)
        e[idx] = 1e-2
        fd = (loss_of(w0 + e) - loss_of(w0 - e)) / 2e-2
        np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-3)
    p.value = w


@pytest.mark.parametrize("size", [0, -1])
def test_lrn_bad_size_names_the_node(size):
    m, _ = _lrn_net(3)
    for a in m.graph.node[1].attribute:
        if a.name == "size":
            a.i = size
    with pytest.raises(OnnxImportError, match=r"'norm1' \(LRN.*size must be a positive int"):
        gc.onnx.load(m)


# ---------------------------------------------------------------- Mod and load-time folding
def _mha_like_reshape(mod_value):
    # PyTorch's MultiheadAttention export computes head sizes with Mod of constants;
    # the result feeds a Reshape target.
    nodes = [helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
                 np.array(8, np.int64))),
             helper.make_node("Constant", [], ["h"], value=numpy_helper.from_array(
                 np.array(mod_value, np.int64))),
             helper.make_node("Mod", ["e", "h"], ["r"], name="head_rem"),
             helper.make_node("Add", ["r", "four"], ["hd"]),
             helper.make_node("Unsqueeze", ["hd", "zero"], ["hd1"]),
             helper.make_node("Concat", ["m1", "hd1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [("four", np.array(4, np.int64)), ("zero", np.array([0], np.int64)),
             ("m1", np.array([-1], np.int64))]
    return _model(nodes, [_vi("x", F32, [4, 6])], [_vi("y", F32, [4, 6])], inits)


def test_mod_of_constants_is_folded_at_load():
    m = _mha_like_reshape(3)          # 8 % 3 + 4 = 6: reshape (4, 6) to (-1, 6)
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    (y,) = gc.onnx.load(m)(x)
    np.testing.assert_array_equal(y, x.reshape(-1, 6))


def test_integer_mod_by_zero_constant_names_the_node():
    with pytest.raises(OnnxImportError, match=r"'head_rem' \(Mod.*integer Mod by zero"):
        gc.onnx.load(_mha_like_reshape(0))


def test_unconverted_operator_of_constants_folds_before_the_scan():
    # ReduceProd has no graphc converter; of a shape known at load time it is folded
    # with ONNX's reference, so the model imports (Flatten-like reshape).
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "one", "big"], ["tail"]),
             helper.make_node("ReduceProd", ["tail"], ["p"], keepdims=1, name="numel"),
             helper.make_node("Concat", ["m1", "p"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [("one", np.array([1], np.int64)), ("big", np.array([99], np.int64)),
             ("m1", np.array([-1], np.int64))]
    m = _model(nodes, [_vi("x", F32, [2, 3, 4])], [_vi("y", F32, [2, 12])], inits)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    (y,) = gc.onnx.load(m)(x)
    np.testing.assert_array_equal(y, x.reshape(2, 12))
    # the same operator on run-time data is still reported, with every other one
    nodes = [helper.make_node("ReduceProd", ["x"], ["p"], name="rp"),
             helper.make_node("Hardmax", ["p"], ["y"], name="hm")]
    m = _model(nodes, [_vi("x", F32, [2, 3])], [_vi("y", F32, [1, 1])])
    with pytest.raises(UnsupportedOperatorError) as ei:
        gc.onnx.load(m)
    assert "ReduceProd (domain ai.onnx): 1 node(s): rp" in str(ei.value)
    assert "Hardmax (domain ai.onnx): 1 node(s): hm" in str(ei.value)
    # a random operator is never folded into a constant, even of known inputs
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=F32),
             helper.make_node("RandomUniformLike", ["sf"], ["r"], name="noise"),
             helper.make_node("Add", ["x", "r"], ["y"])]
    m = _model(nodes, [_vi("x", F32, [2])], [_vi("y", F32, [2])])
    with pytest.raises(UnsupportedOperatorError, match="RandomUniformLike.*noise"):
        gc.onnx.load(m)


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype,elem", [(np.int64, I64), (np.int32, TensorProto.INT32),
                                        (np.float32, F32), (np.float64, TensorProto.DOUBLE)])
def test_mod_at_run_time_matches_numpy(fmod, dtype, elem):
    # (ONNX asks fmod=1 for floats, but its own node tests and NumPy define both)
    a = np.array([-7, 7, -7, 7, 9, -9, 0, 5, 13, -13], dtype)
    b = np.array([3, -3, -3, 3, 4, 4, 5, 7, 5, -4], dtype)
    if np.dtype(dtype).kind == "f":
        a = a + np.array([0.25, -0.5, 0.75, 0.1, 0, 0.3, 0, 0.2, 0.6, 0.9], dtype)
    m = _model([helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)],
               [_vi("a", elem, [10]), _vi("b", elem, [10])], [_vi("y", elem, [10])])
    want = np.fmod(a, b) if fmod else np.mod(a, b)
    for backend in ("numpy", "llvm"):
        if backend == "llvm" and not _has_llvm():
            continue
        (got,) = gc.onnx.load(m).compile(backend)(a, b)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _has_llvm():
    try:
        import graphc.backends.llvm  # noqa: F401  (importable: the backend is usable)
        return True
    except Exception:
        return False


def test_integer_mod_by_a_constant_zero_divisor_names_the_node():
    m = _model([helper.make_node("Mod", ["a", "b"], ["y"], name="wrap")],
               [_vi("a", I64, [3])], [_vi("y", I64, [3])],
               [("b", np.array([2, 0, 3], np.int64))])
    with pytest.raises(OnnxImportError, match=r"'wrap' \(Mod.*integer Mod by zero"):
        gc.onnx.load(m)


# ---------------------------------------------------------------- symbolic batch shapes
H, IN = 4, 3


def _dynamic_lstm(shape_from="x"):
    """A batch-first input (as after torch's Embedding) transposed into an LSTM whose
    initial_h / initial_c = ConstantOfShape([1, Shape(x)[0], H]), and a bias Expand-ed
    to (batch, H) from the same computed shape, as torch exports do.  shape_from="m"
    computes that batch from a second input instead (a contradiction when the sizes
    differ)."""
    w = (RNG.standard_normal((1, 4 * H, IN)) * 0.5).astype(np.float32)
    r = (RNG.standard_normal((1, 4 * H, H)) * 0.5).astype(np.float32)
    bvec = RNG.standard_normal((H,)).astype(np.float32)
    nodes = [helper.make_node("Shape", [shape_from], ["sx"]),
             helper.make_node("Gather", ["sx", "bax"], ["nb"], axis=0),
             helper.make_node("Unsqueeze", ["nb", "zero"], ["nb1"]),
             helper.make_node("Concat", ["one", "nb1", "hid"], ["hshape"], axis=0),
             helper.make_node("ConstantOfShape", ["hshape"], ["h0"], name="zeros_h",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("ConstantOfShape", ["hshape"], ["c0"], name="zeros_c"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R", "", "", "h0", "c0"], ["Y", "Yh"],
                              hidden_size=H, name="lstm"),
             helper.make_node("Concat", ["nb1", "hid"], ["eshape"], axis=0),
             helper.make_node("Expand", ["bvec", "eshape"], ["bias"], name="bias_expand"),
             helper.make_node("Squeeze", ["Yh", "zero"], ["hl"]),
             helper.make_node("Add", ["hl", "bias"], ["y"])]
    inits = [("bax", np.array(0, np.int64)), ("zero", np.array([0], np.int64)),
             ("one", np.array([1], np.int64)), ("hid", np.array([H], np.int64)),
             ("W", w), ("R", r), ("bvec", bvec)]
    inputs = [_vi("x", F32, ["batch", 5, IN])]
    if shape_from == "m":
        inputs.append(_vi("m", F32, ["M", 2]))
    return _model(nodes, inputs, [_vi("y", F32, ["batch", H])], inits)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_constant_of_shape_and_expand_from_a_symbolic_batch(backend):
    if backend == "llvm" and not _has_llvm():
        pytest.skip("llvm backend unavailable")
    m = _dynamic_lstm()
    model = gc.onnx.load(m, batch_dim="N")
    assert model.inputs[0].shape == ("N", 5, IN)
    f = model.compile(backend)
    for n in (2, 5):
        x = RNG.standard_normal((n, 5, IN)).astype(np.float32)
        (got,) = f(x)
        (want,) = _ort(m, {"x": x})
        assert got.shape == (n, H)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_constant_of_shape_symbolic_needs_no_materialized_value():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(
                 np.array([3], np.int64))),
             helper.make_node("Cast", ["z"], ["zf"], to=F32),
             helper.make_node("Mul", ["x", "zf"], ["y"])]
    m = _model(nodes, [_vi("x", F32, ["N", 2])], [_vi("y", F32, ["N", 2])])
    model = gc.onnx.load(m)
    x = RNG.standard_normal((3, 2)).astype(np.float32)
    np.testing.assert_allclose(model(x)[0], 3 * x)


def test_symbolic_shape_contradicting_the_input_is_a_clear_error():
    # initial_h's batch is computed from another input's size "M": the LSTM's batch is
    # "batch", and the import refuses to mix them, naming the node and both shapes.
    m = _dynamic_lstm(shape_from="m")
    with pytest.raises(OnnxImportError, match=r"'lstm' \(LSTM.*\(batch, 16\), \(M, 16\)"):
        gc.onnx.load(m)
    # batch_dim unifies the two leading dimensions: the import succeeds, and a call
    # whose sizes contradict the shared symbol is refused, naming the symbol
    f = gc.onnx.load(m, batch_dim="N").compile()
    x = RNG.standard_normal((2, 5, IN)).astype(np.float32)
    (got,) = f(x, RNG.standard_normal((2, 2)).astype(np.float32))   # consistent: runs
    assert got.shape == (2, H)
    with pytest.raises((ValueError, GraphcError), match="input 'm' has N=3, but another "
                       "input set N=2"):
        f(x, RNG.standard_normal((3, 2)).astype(np.float32))


def test_range_and_arithmetic_on_a_symbolic_size_specialize_per_call():
    # position ids = Range(0, Shape(x)[1], 1) gathered from a table, and a Reshape
    # whose target multiplies the batch symbol: both need the symbols' sizes, so
    # the model is built per call from the sizes its inputs give them.
    table = RNG.standard_normal((16, 3)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
             helper.make_node("Range", ["zero", "t", "step"], ["pos"], name="positions"),
             helper.make_node("Gather", ["table", "pos"], ["pe"], axis=0),
             helper.make_node("Add", ["x", "pe"], ["h"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Mul", ["n", "t"], ["nt"], name="rows"),
             helper.make_node("Unsqueeze", ["nt", "ax0"], ["nt1"]),
             helper.make_node("Concat", ["nt1", "three"], ["shape"], axis=0),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    inits = [("zero", np.array(0, np.int64)), ("one", np.array(1, np.int64)),
             ("step", np.array(1, np.int64)), ("ax0", np.array([0], np.int64)),
             ("three", np.array([3], np.int64)), ("table", table)]
    m = _model(nodes, [_vi("x", F32, ["N", "T", 3])], [_vi("y", F32, ["NT", 3])], inits)
    model = gc.onnx.load(m)
    assert model.needs_sizes
    with pytest.raises(OnnxImportError, match="depends on the sizes"):
        model.graph
    for backend in ("numpy", "llvm") if _has_llvm() else ("numpy",):
        f = model.compile(backend)
        for n, t in ((2, 5), (3, 7), (2, 5)):
            x = RNG.standard_normal((n, t, 3)).astype(np.float32)
            (got,) = f(x)
            (want,) = _ort(m, {"x": x})
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got, (x + table[:t]).reshape(n * t, 3), rtol=1e-6)
    # a size beyond the table is an error naming the Gather's index range, not garbage
    with pytest.raises(GraphcError):
        model(RNG.standard_normal((1, 17, 3)).astype(np.float32))


def test_lstm_with_a_symbolic_sequence_length_specializes_per_call():
    m = _dynamic_lstm()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    model = gc.onnx.load(m, batch_dim="N")
    f = model.compile()
    for n, t in ((2, 3), (1, 6)):
        x = RNG.standard_normal((n, t, IN)).astype(np.float32)
        (got,) = f(x)
        (want,) = _ort(m, {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_float_mod_at_run_time_edge_values():
    # C's fmod and NumPy's mod on infinities, NaNs and zero divisors, and a quotient
    # beyond int64 (no overflowing cast)
    a = np.array([3.5, -3.5, np.inf, 1.0, np.nan, 1.0, 1e30, -7.0], np.float64)
    b = np.array([np.inf, -np.inf, 2.0, 0.0, 2.0, np.nan, 3.0, 1e-300], np.float64)
    for fmod in (0, 1):
        m = _model([helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)],
                   [_vi("a", TensorProto.DOUBLE, [8]), _vi("b", TensorProto.DOUBLE, [8])],
                   [_vi("y", TensorProto.DOUBLE, [8])])
        with np.errstate(all="ignore"):
            want = np.fmod(a, b) if fmod else np.mod(a, b)
        (got,) = gc.onnx.load(m)(a, b)
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), ~ok)
        # 1e30 mod 3 and -7 mod 1e-300: quotients beyond 2**52 are already integers in
        # float64, and the remainder is off by up to a's rounding (documented)
        with np.errstate(all="ignore"):
            close = ok & (np.abs(a / b) < 2.0 ** 52)
        np.testing.assert_allclose(got[close], want[close], rtol=1e-12)
        assert abs(got[6] - want[6]) <= np.spacing(1e30) * 4
        assert abs(got[7] - want[7]) <= np.spacing(7.0) * 4


def test_unsupported_operator_after_a_symbol_sized_node_is_reported_at_load():
    # Range over a symbolic size makes the model build per call; an unsupported
    # operator on run-time data is still reported when the model is loaded
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=F32),
             helper.make_node("Add", ["x", "rf"], ["h"]),
             helper.make_node("Hardmax", ["h"], ["y"], name="hm")]
    inits = [("zero", np.array(0, np.int64)), ("one", np.array(1, np.int64))]
    m = _model(nodes, [_vi("x", F32, ["N"])], [_vi("y", F32, ["N"])], inits)
    with pytest.raises(UnsupportedOperatorError, match="Hardmax.*hm"):
        gc.onnx.load(m)
    # without the Hardmax, it loads and runs per size
    m = _model(nodes[:-1], [_vi("x", F32, ["N"])], [_vi("h", F32, ["N"])], inits)
    x = RNG.standard_normal(4).astype(np.float32)
    np.testing.assert_allclose(gc.onnx.load(m)(x)[0], x + np.arange(4))


def test_imported_alexnet_like_model_trains():
    # LRN's gradient in a whole AlexNet-style network: a few SGD steps on the
    # imported parameters lower the loss on a fixed batch
    from graphc.onnx.zoo import alexnet_like
    model = gc.onnx.load(alexnet_like(), dims={"N": 4})
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = gc.input("labels", (4,), dtype="int64")
    loss = gc.cross_entropy(gc.log(model.outputs[0]), labels)   # the model ends in Softmax
    params = [p for p in model.parameters if p.value.ndim > 1]
    grads = gc.grad(loss, params)
    step = gc.compile(model.inputs + [labels], loss,
                      updates={p: p - 0.05 * g for p, g in zip(params, grads)})
    y = np.array([1, 3, 5, 7])
    losses = [float(step(x, y)) for _ in range(4)]
    assert losses[-1] < losses[0] * 0.9, losses
