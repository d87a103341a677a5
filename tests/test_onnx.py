"""gc.onnx: importing hand-built ONNX models, exporting graphc graphs, round trips.

References are written independently in NumPy (or run by onnx's reference
evaluator / onnxruntime when installed); gradients of imported models are
checked against central finite differences in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import graphc as gc  # noqa: E402
from _onnx_build import _model, _vi  # noqa: E402
from graphc.onnx import OnnxImportError, UnsupportedOperatorError  # noqa: E402

F32, F64, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64


def _np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- import
def _mlp_model(rng, dtype=np.float32, elem=F32):
    w1 = rng.standard_normal((4, 6)).astype(dtype)
    b1 = rng.standard_normal(6).astype(dtype)
    w2 = rng.standard_normal((3, 6)).astype(dtype)  # Gemm with transB=1
    b2 = rng.standard_normal(3).astype(dtype)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["z"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    m = _model(nodes, [_vi("x", elem, ["batch", 4])], [_vi("y", elem, ["batch", 3])],
               [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)])
    return m, (w1, b1, w2, b2)


def test_import_mlp_values_names_and_symbolic_batch():
    rng = np.random.default_rng(0)
    m, (w1, b1, w2, b2) = _mlp_model(rng)
    model = gc.onnx.load(m.SerializeToString())
    assert [i.name for i in model.inputs] == ["x"]
    assert model.inputs[0].shape == ("batch", 4)
    assert sorted(p.name for p in model.parameters) == ["b1", "b2", "w1", "w2"]
    assert all(isinstance(p, gc.Parameter) for p in model.parameters)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    h = np.tanh(x @ w1 + b1)
    want = _np_softmax(0.5 * (h @ w2.T) + 2.0 * b2, axis=1)
    (got,) = model(x)
    assert got.shape == (5, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (got2,) = model(x[:2])  # the symbolic batch takes another size
    np.testing.assert_allclose(got2, want[:2], rtol=1e-5, atol=1e-6)


def test_import_from_path_and_model_proto(tmp_path):
    rng = np.random.default_rng(1)
    m, _ = _mlp_model(rng)
    path = tmp_path / "mlp.onnx"
    onnx.save(m, path)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    a = gc.onnx.load(str(path))(x)[0]
    b = gc.onnx.load(m)(x)[0]
    np.testing.assert_array_equal(a, b)


def _fd_check(model, loss_fn, feeds, n_entries=6, eps=1e-6):
    """gc.grad of loss w.r.t. every parameter vs central differences (float64)."""
    loss = loss_fn(model.outputs)
    grads = gc.grad(loss, model.parameters)
    f = gc.compile(model.inputs, [loss] + list(grads))
    _, *gs = f(*feeds)
    fl = gc.compile(model.inputs, loss)
    rng = np.random.default_rng(0)
    for p, g in zip(model.parameters, gs):
        flat = p.value.reshape(-1)
        for idx in rng.choice(flat.size, size=min(n_entries, flat.size), replace=False):
            old = flat[idx]
            flat[idx] = old + eps
            up = fl(*feeds)
            flat[idx] = old - eps
            down = fl(*feeds)
            flat[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - g.reshape(-1)[idx]) <= 1e-6 + 1e-5 * abs(fd), (p.name, idx)


def test_grad_through_imported_mlp_matches_finite_differences():
    rng = np.random.default_rng(2)
    m, _ = _mlp_model(rng, np.float64, F64)
    model = gc.onnx.load(m, dims={"batch": 3})  # dims fixes the symbolic batch size
    assert model.inputs[0].shape == (3, 4)
    x = rng.standard_normal((3, 4))
    t = np.array([0, 2, 1])
    onehot = np.eye(3)[t]
    _fd_check(model, lambda outs: -gc.sum(gc.log(outs[0]) * gc.constant(onehot)), [x])


def _cnn_model(rng):
    w = rng.standard_normal((4, 2, 3, 3))
    b = rng.standard_normal(4)
    scale, bias = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    fc = rng.standard_normal((4 * 2 * 2, 3))
    shape = np.array([0, -1], np.int64)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"],
                              epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    inits = [("w", w), ("b", b), ("s", scale), ("bb", bias), ("m", mean), ("v", var),
             ("fc", fc), ("shape", shape)]
    return _model(nodes, [_vi("x", F64, ["N", 2, 4, 4])], [_vi("y", F64, ["N", 3])], inits), \
        dict(inits)


def _np_cnn(x, p):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, 4, h, wd))
    for o in range(4):
        for i in range(h):
            for j in range(wd):
                conv[:, o, i, j] = (xp[:, :, i:i + 3, j:j + 3] * p["w"][o]).sum(axis=(1, 2, 3))
        conv[:, o] += p["b"][o]
    ch = (slice(None), None, None)
    bn = (conv - p["m"][ch]) / np.sqrt(p["v"][ch] + 1e-3) * p["s"][ch] + p["bb"][ch]
    r = np.maximum(bn, 0)
    pooled = r.reshape(n, 4, h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    return pooled.reshape(n, -1) @ p["fc"]


def test_import_cnn_values_and_grad():
    rng = np.random.default_rng(3)
    m, p = _cnn_model(rng)
    model = gc.onnx.load(m)
    # integer initializers used as shapes are constants, not parameters
    assert sorted(q.name for q in model.parameters) == ["b", "bb", "fc", "m", "s", "v", "w"]
    x = rng.standard_normal((2, 2, 4, 4))
    np.testing.assert_allclose(model(x)[0], _np_cnn(x, p), rtol=1e-10, atol=1e-10)
    _fd_check(model, lambda outs: gc.sum(gc.square(outs[0])), [x])


def test_shape_chain_with_symbolic_batch_is_resolved_at_load_time():
    # the Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain exporters emit for flatten
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
                 np.array(0, np.int64))),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    m = _model(nodes, [_vi("x", F32, ["B", 3, 2])], [_vi("y", F32, ["B", 6])],
               [("ax", np.array([0], np.int64)), ("minus1", np.array([-1], np.int64))])
    model = gc.onnx.load(m)
    assert model.outputs[0].shape == ("B", 6)
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 3, 2)
    np.testing.assert_array_equal(model(x)[0], x.reshape(4, 6))


def test_shape_value_inputs_specialize_per_value():
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
               [_vi("x", F32, [2, 6]), _vi("shape", I64, [2])], [_vi("y", F32, ["a", "b"])])
    model = gc.onnx.load(m)
    assert model.needs_values == ["shape"]
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    a = model(x, np.array([3, 4]))[0]
    b = model(x, np.array([4, -1]))[0]
    np.testing.assert_array_equal(a, x.reshape(3, 4))
    np.testing.assert_array_equal(b, x.reshape(4, 3))
    spec = model.specialize(shape=np.array([12, 1]))
    assert spec.outputs[0].shape == (12, 1)


def test_old_opset_semantics():
    x = np.random.default_rng(4).standard_normal((2, 3, 4)).astype(np.float32)
    # Softmax before opset 13 coerces to 2-D at `axis`: normalize over axes 1 and 2 jointly
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=1)],
               [_vi("x", F32, [2, 3, 4])], [_vi("y", F32, [2, 3, 4])], opset=11)
    want = _np_softmax(x.reshape(2, 12), axis=1).reshape(2, 3, 4)
    np.testing.assert_allclose(gc.onnx.load(m)(x)[0], want, rtol=1e-6, atol=1e-7)
    # ... and from opset 13 on, over the one axis only
    m13 = _model([helper.make_node("Softmax", ["x"], ["y"], axis=1)],
                 [_vi("x", F32, [2, 3, 4])], [_vi("y", F32, [2, 3, 4])], opset=13)
    np.testing.assert_allclose(gc.onnx.load(m13)(x)[0], _np_softmax(x, 1), rtol=1e-6, atol=1e-7)
    # Unsqueeze/ReduceSum axes as attributes (opset 11)
    m = _model([helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
                helper.make_node("ReduceSum", ["u"], ["y"], axes=[3], keepdims=0)],
               [_vi("x", F32, [2, 3, 4])], [_vi("y", F32, [1, 2, 3])], opset=11)
    np.testing.assert_allclose(gc.onnx.load(m)(x)[0], x.sum(axis=2)[None], rtol=1e-6)


def test_lstm_import_matches_numpy_recurrence():
    rng = np.random.default_rng(5)
    t_len, batch, inp, hid = 4, 2, 3, 5
    w = rng.standard_normal((1, 4 * hid, inp)) * 0.5
    r = rng.standard_normal((1, 4 * hid, hid)) * 0.5
    b = rng.standard_normal((1, 8 * hid)) * 0.1
    m = _model([helper.make_node("LSTM", ["x", "w", "r", "b"], ["y", "yh", "yc"],
                                 hidden_size=hid)],
               [_vi("x", F64, [t_len, batch, inp])],
               [_vi("y", F64, [t_len, 1, batch, hid]), _vi("yh", F64, [1, batch, hid]),
                _vi("yc", F64, [1, batch, hid])],
               [("w", w), ("r", r), ("b", b)])
    model = gc.onnx.load(m)
    x = rng.standard_normal((t_len, batch, inp))
    y, yh, yc = model(x)

    def sig(v):
        return 1 / (1 + np.exp(-v))
    h = np.zeros((batch, hid))
    c = np.zeros((batch, hid))
    ys = []
    for t in range(t_len):
        g = x[t] @ w[0].T + h @ r[0].T + b[0, :4 * hid] + b[0, 4 * hid:]
        i, o, f, cc = (g[:, k * hid:(k + 1) * hid] for k in range(4))  # ONNX order i,o,f,c
        c = sig(f) * c + sig(i) * np.tanh(cc)
        h = sig(o) * np.tanh(c)
        ys.append(h)
    np.testing.assert_allclose(y[:, 0], np.stack(ys), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(yh[0], h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(yc[0], c, rtol=1e-10, atol=1e-12)
    _fd_check(model, lambda outs: gc.sum(outs[0] * outs[0]) + gc.sum(outs[2]), [x])


# ---------------------------------------------------------------- errors
def test_unsupported_operators_are_all_listed_before_building():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Hardmax", ["a"], ["b"], name="hm1"),
             helper.make_node("TopK", ["b", "k"], ["c", "ci"], name="top"),
             helper.make_node("Hardmax", ["c"], ["d"], name="hm2"),
             helper.make_node("MyOp", ["d"], ["y"], name="custom", domain="com.example")]
    g = helper.make_graph(nodes, "g", [_vi("x", F32, [2, 3])], [_vi("y", F32, ["k"])],
                          initializer=[numpy_helper.from_array(np.array([1], np.int64), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOperatorError) as ei:
        gc.onnx.load(m)
    msg = str(ei.value)
    assert "3 operator type(s)" in msg
    assert "Hardmax (domain ai.onnx): 2 node(s): hm1, hm2" in msg
    assert "TopK (domain ai.onnx): 1 node(s): top" in msg
    assert "MyOp (domain com.example): 1 node(s): custom" in msg
    assert "Relu" not in msg


def test_malformed_and_truncated_files_raise_clear_errors(tmp_path):
    rng = np.random.default_rng(6)
    m, _ = _mlp_model(rng)
    data = m.SerializeToString()
    with pytest.raises(OnnxImportError, match="not a valid ONNX model|invalid"):
        gc.onnx.load(data[: len(data) // 2])
    with pytest.raises(OnnxImportError, match="not a valid ONNX model"):
        gc.onnx.load(b"\x00\xff" * 10 + b"garbage")
    with pytest.raises(OnnxImportError, match="not a valid ONNX model"):
        gc.onnx.load(b"")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf at all \x80\x80")
    with pytest.raises(OnnxImportError):
        gc.onnx.load(str(bad))
    with pytest.raises(OnnxImportError, match="cannot read"):
        gc.onnx.load(str(tmp_path / "missing.onnx"))


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr))


def _huge_models():
    """~200-byte models whose load-time evaluation would allocate 16 GiB .. 8 TiB."""
    big = np.array([65536, 65536], np.int64)
    one = np.array([[1.0]], np.float32)
    yield "ConstantOfShape", _model(
        [_const("s", big), helper.make_node("ConstantOfShape", ["s"], ["y"], name="cos")],
        [], [_vi("y", F32, [65536, 65536])])
    yield "Range", _model(
        [_const("a", np.array(0, np.int64)), _const("b", np.array(2 ** 40, np.int64)),
         _const("c", np.array(1, np.int64)),
         helper.make_node("Range", ["a", "b", "c"], ["y"], name="rng")],
        [], [_vi("y", I64, [2 ** 40])])
    yield "Expand", _model(
        [_const("v", one), _const("s", big), helper.make_node("Expand", ["v", "s"], ["y"])],
        [], [_vi("y", F32, [65536, 65536])])
    yield "Tile", _model(
        [_const("v", one), _const("s", big), helper.make_node("Tile", ["v", "s"], ["y"])],
        [], [_vi("y", F32, [65536, 65536])])
    # a constant-folded elementwise op on a folded value
    yield "Add", _model(
        [_const("v", one), _const("s", big), helper.make_node("Expand", ["v", "s"], ["e"],
                                                              name="ex"),
         helper.make_node("Add", ["e", "e"], ["y"])], [], [_vi("y", F32, [65536, 65536])])


@pytest.mark.parametrize("op", ["ConstantOfShape", "Range", "Expand", "Tile", "Add"])
def test_load_time_constants_are_bounded(op):
    import resource
    m = dict(_huge_models())[op]
    assert len(m.SerializeToString()) < 400
    # under an address-space cap, so a regression fails with MemoryError, not by swapping
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 6 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        with pytest.raises(OnnxImportError) as ei:
            gc.onnx.load(m.SerializeToString())
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    msg = str(ei.value)
    assert "ONNX node" in msg and ("GiB" in msg or "TiB" in msg)
    assert "max_constant_bytes" in msg and "256.0 MiB" in msg
    where = {"ConstantOfShape": "'cos' (ConstantOfShape", "Range": "'rng' (Range",
             "Expand": "(Expand", "Tile": "(Tile", "Add": "(Expand"}[op]
    assert where in msg


def test_load_time_constant_limit_is_configurable():
    s = np.array([300, 400], np.int64)
    m = _model([_const("s", s), helper.make_node("ConstantOfShape", ["s"], ["y"], name="c")],
               [], [_vi("y", F32, [300, 400])])
    # 480,000 bytes: fine by default, refused under a 100 kB limit, with the size named
    y, = gc.onnx.load(m)()
    np.testing.assert_array_equal(y, np.zeros((300, 400), np.float32))
    with pytest.raises(OnnxImportError, match=r"'c' \(ConstantOfShape.*\[300, 400\] "
                                              r"\(120000 elements, 468.8 KiB\)"):
        gc.onnx.load(m, max_constant_bytes=100_000)
    y, = gc.onnx.load(m, max_constant_bytes=480_000)()
    assert y.shape == (300, 400)
    # Range's size is computed from its bounds before anything is allocated
    r = _model([_const("a", np.array(10, np.int64)), _const("b", np.array(-5, np.int64)),
                _const("c", np.array(-4, np.int64)), helper.make_node("Range", ["a", "b", "c"],
                                                                      ["y"])],
               [], [_vi("y", I64, [4])])
    y, = gc.onnx.load(r, max_constant_bytes=32)()
    np.testing.assert_array_equal(y, [10, 6, 2, -2])
    with pytest.raises(OnnxImportError, match="Range's output.*4 elements"):
        gc.onnx.load(r, max_constant_bytes=31)
    with pytest.raises(TypeError, match="max_constant_bytes"):
        gc.onnx.load(m, max_constant_bytes=-1)


def test_initializers_declaring_more_than_they_hold_are_refused(tmp_path):
    """A tensor declaring 65536 x 65536 values but holding 8 bytes (inline or in an
    external file) is refused before anything of the declared size is allocated."""
    import resource
    import onnx as onnx_mod

    def model(t, elem):
        return _model([helper.make_node("Identity", ["w"], ["y"])], [],
                      [_vi("y", elem, [65536, 65536])], ()), t

    cases = []
    for elem, field in ((F32, "float_data"), (I64, "int64_data")):
        t = TensorProto(name="w", data_type=elem, dims=[65536, 65536], raw_data=b"\0" * 8)
        cases.append(("raw", elem, t))
        t = TensorProto(name="w", data_type=elem, dims=[65536, 65536])
        getattr(t, field).append(1)
        cases.append((field, elem, t))
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    ext = TensorProto(name="w", data_type=F32, dims=[65536, 65536],
                      data_location=TensorProto.EXTERNAL)
    ext.external_data.add(key="location", value="w.bin")
    cases.append(("external", F32, ext))
    ext2 = TensorProto()
    ext2.CopyFrom(ext)
    ext2.external_data.add(key="length", value=str(1 << 40))
    cases.append(("external length", F32, ext2))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 6 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        for what, elem, t in cases:
            m, _ = model(t, elem)
            m.graph.initializer.append(t)
            path = tmp_path / f"{what.replace(' ', '_')}.onnx"
            onnx_mod.save(m, str(path))
            with pytest.raises(OnnxImportError, match="too small for the declared shape|"
                                                      "exceeds available data") as ei:
                gc.onnx.load(str(path))
            assert "'w'" in str(ei.value) or "w)" in str(ei.value), (what, str(ei.value))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_edge_pad_builds_in_constant_time():
    """Edge padding is the edge row broadcast, not one node per padded row: a pad of
    10^9 rows loads at once (the list of 10^9 copies it built ran out of memory)."""
    import resource
    pads = np.array([0, 3, 0, 10 ** 9], np.int64)
    m = _model([_const("p", pads), helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")],
               [_vi("x", F32, [2, 3])], [_vi("y", F32, [2, 6 + 10 ** 9 - 3])])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 6 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        model = gc.onnx.load(m)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert model.outputs[0].shape == (2, 3 + 3 + 10 ** 9)
    # small pads: the values of np.pad(mode="edge")
    small = _model([_const("p", np.array([1, 2, 0, 3], np.int64)),
                    helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")],
                   [_vi("x", F32, [2, 3])], [_vi("y", F32, [3, 8])])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y, = gc.onnx.load(small)(x)
    np.testing.assert_array_equal(y, np.pad(x, ((1, 0), (2, 3)), mode="edge"))


def test_newer_opset_than_implemented_is_refused():
    from graphc.onnx.importer import MAX_OPSET
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    for v in (1000, MAX_OPSET + 1):
        m = _model(nodes, [_vi("x", F32, [2])], [_vi("y", F32, [2])], opset=v)
        with pytest.raises(OnnxImportError, match=f"opset {v}; graphc imports opsets up to "
                                                  f"{MAX_OPSET}"):
            gc.onnx.load(m)
    m = _model(nodes, [_vi("x", F32, [2])], [_vi("y", F32, [2])], opset=MAX_OPSET)
    y, = gc.onnx.load(m)(np.array([-1.0, 2.0], np.float32))
    np.testing.assert_array_equal(y, [0.0, 2.0])


def test_unsupported_dtype_and_unknown_shape_inputs():
    m = _model([helper.make_node("Identity", ["x"], ["y"])],
               [_vi("x", TensorProto.FLOAT16, [2])], [_vi("y", TensorProto.FLOAT16, [2])])
    with pytest.raises(OnnxImportError, match="FLOAT16"):
        gc.onnx.load(m)


def test_shape_input_from_parameters_is_a_clear_error():
    # a Reshape target computed from a float initializer cannot be known at load time
    nodes = [helper.make_node("Cast", ["sf"], ["s"], to=I64),
             helper.make_node("Reshape", ["x", "s"], ["y"])]
    m = _model(nodes, [_vi("x", F32, [2, 6])], [_vi("y", F32, [3, 4])],
               [("sf", np.array([3.0, 4.0], np.float32))])
    with pytest.raises(OnnxImportError, match="Reshape.*must be known when the model is loaded"):
        gc.onnx.load(m)


# ---------------------------------------------------------------- export
def _lenet():
    try:
        from graphc import models
    except ImportError:  # pragma: no cover - graphc.models is another module of the project
        return None
    return models.lenet5(rng=np.random.default_rng(7))


def test_lenet5_export_reference_evaluator_and_round_trip(tmp_path):
    net = _lenet()
    x = gc.input("x", ("N", 1, 28, 28))
    if net is not None:
        logits = net(x)
    else:  # pragma: no cover - graphc.models not available
        pytest.skip("graphc.models.lenet5 is not available")
    path = tmp_path / "lenet.onnx"
    proto = gc.onnx.export(logits, path, inputs=[x])
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    xb = np.random.default_rng(8).standard_normal((3, 1, 28, 28)).astype(np.float32)
    want = gc.compile([x], logits)(xb)
    ref = ReferenceEvaluator(proto).run(None, {"x": xb})[0]
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    back = gc.onnx.load(path)
    assert len(back.parameters) == len(list(net.parameters()))
    np.testing.assert_allclose(back(xb)[0], want, rtol=1e-6, atol=1e-6)


def test_lenet5_export_runs_on_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net = _lenet()
    if net is None:  # pragma: no cover
        pytest.skip("graphc.models.lenet5 is not available")
    x = gc.input("x", ("N", 1, 28, 28))
    logits = net(x)
    path = tmp_path / "lenet.onnx"
    gc.onnx.export(logits, path, inputs=[x])
    xb = np.random.default_rng(9).standard_normal((2, 1, 28, 28)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": xb})[0]
    np.testing.assert_allclose(got, gc.compile([x], logits)(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [13, 18, 20])
def test_export_many_ops_matches_reference_evaluator(opset):
    rng = np.random.default_rng(10)
    x = gc.input("x", ("N", 3, 6, 6))
    v = gc.input("v", ("N", 5))
    w = gc.Parameter(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), name="w")
    c = gc.conv2d(x, w, stride=2, padding=((1, 0), (0, 1)))
    outs = [
        gc.avg_pool2d(c, 2, stride=1, padding=1, count_include_pad=False),
        gc.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True),
        gc.log_softmax(gc.leaky_relu(v, 0.2), axis=1),
        gc.softmax(gc.elu(v) * 2.0 - 1.0, axis=-1),
        gc.gelu(v), gc.gelu(v, approximate="tanh"), gc.silu(v), gc.softplus(v, beta=2.0),
        gc.log_sigmoid(v), gc.sigmoid(v) / (gc.abs(v) + 1.0), gc.sqrt(gc.square(v) + 1.0),
        gc.mean(v, axis=1, keepdims=True), gc.max(v, axis=0), gc.sum(v), gc.logsumexp(v, 1),
        gc.concat([v, gc.exp(-v)], axis=1), v[:, 1:5:2], v[:, ::-1],
        gc.pad(v, ((0, 0), (2, 1)), value=3.0), gc.take(v, np.array([4, 0]), axis=1),
        gc.where(gc.greater(v, 0.0), v, gc.erf(v)), gc.cast(gc.greater(v, 0.0), "float32"),
        gc.broadcast_to(gc.reshape(v, ("N", 1, 5)), ("N", 2, 5)), gc.flatten(x),
        gc.transpose(x, (0, 2, 3, 1)), gc.minimum(gc.maximum(v, -0.5), 0.5), gc.tanh(v) ** 2.0,
        gc.conv2d_grad_input(c, w, (6, 6), stride=2, padding=((1, 0), (0, 1))),
    ]
    proto = gc.onnx.export(outs, None, inputs=[x, v], opset=opset)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == opset
    xb = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    vb = rng.standard_normal((2, 5)).astype(np.float32)
    want = gc.compile([x, v], outs)(xb, vb)
    got = ReferenceEvaluator(proto).run(None, {"x": xb, "v": vb})
    for k, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape, k
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=str(k))
    back = gc.onnx.load(proto)(xb, vb)
    for k, (g, e) in enumerate(zip(back, want)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=str(k))
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for k, (g, e) in enumerate(zip(sess.run(None, {"x": xb, "v": vb}), want)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_export_rejects_ops_without_onnx_form():
    v = gc.input("v", (3,))
    g = gc.grad(gc.sum(gc.max_pool2d(gc.reshape(v, (1, 1, 1, 3)), (1, 2), stride=1)), [v])[0]
    with pytest.raises(gc.onnx.OnnxExportError, match="max_pool2d_grad"):
        gc.onnx.export(g, None, inputs=[v])
    with pytest.raises(gc.onnx.OnnxExportError, match="not in inputs"):
        gc.onnx.export(gc.relu(v), None, inputs=[])


def test_batch_dim_unifies_and_fixes_leading_dims():
    m = _model([helper.make_node("Add", ["a", "b"], ["y"])],
               [_vi("a", F32, ["batch_size", 3]), _vi("b", F32, [None, 3])],
               [_vi("y", F32, ["batch_size", 3])])
    # without batch_dim the leading dims are different symbols, which do not broadcast
    with pytest.raises(OnnxImportError, match=r"\(Add, opset 17\).*batch_size, 3\), \(b_0, 3"):
        gc.onnx.load(m)
    model = gc.onnx.load(m, batch_dim="N")
    assert [i.shape for i in model.inputs] == [("N", 3), ("N", 3)]
    a, b = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(model(a, b)[0], a + b)
    fixed = gc.onnx.load(m, batch_dim=2)
    assert fixed.outputs[0].shape == (2, 3)
    with pytest.raises(ValueError, match="expects shape"):
        fixed.compile()(np.ones((3, 3), np.float32), np.ones((3, 3), np.float32))


def test_export_module_and_imported_model(tmp_path):
    net = _lenet()
    if net is None:  # pragma: no cover
        pytest.skip("graphc.models.lenet5 is not available")
    x = gc.input("x", (None, 1, 28, 28))
    xb = np.random.default_rng(14).standard_normal((2, 1, 28, 28)).astype(np.float32)
    want = gc.compile([x], net(x))(xb)
    gc.onnx.export(net, tmp_path / "a.onnx", inputs=[x])  # a module is called on inputs
    model = gc.onnx.load(tmp_path / "a.onnx")
    proto = gc.onnx.export(model, tmp_path / "b.onnx", output_names=["logits"])
    assert [o.name for o in proto.graph.output] == ["logits"]
    np.testing.assert_allclose(ReferenceEvaluator(proto).run(None, {"x": xb})[0], want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gc.onnx.load(tmp_path / "b.onnx")(xb)[0], want,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("pads,ceil,cip,dil,strides", [
    ([0, 1, 2, 0], 0, 0, [1, 1], [2, 1]),      # asymmetric pads (explicit padding path)
    ([1, 1, 1, 1], 1, 1, [1, 1], [2, 2]),      # ceil mode, count_include_pad
    ([0, 0, 0, 0], 1, 0, [2, 2], [2, 2]),      # dilated (AveragePool: depthwise conv path)
    ([1, 0, 1, 1], 1, 0, [2, 1], [3, 2]),
    ([2, 1, 2, 1], 0, 1, [1, 2], [1, 2]),      # pads more than half the kernel
])
def test_pool_geometries_match_onnxruntime(kind, pads, ceil, cip, dil, strides):
    attrs = dict(kernel_shape=[3, 2], strides=strides, pads=pads, ceil_mode=ceil,
                 dilations=dil)
    if kind == "AveragePool":
        attrs["count_include_pad"] = cip
    m = _model([helper.make_node(kind, ["x"], ["y"], **attrs)],
               [_vi("x", F32, [2, 3, 7, 8])], [_vi("y", F32, ["n", "c", "h", "w"])], opset=19)
    x = np.random.default_rng(15).standard_normal((2, 3, 7, 8)).astype(np.float32)
    try:
        import onnxruntime as ort
        want = ort.InferenceSession(m.SerializeToString(), providers=[
            "CPUExecutionProvider"]).run(None, {"x": x})[0]
    except ImportError:
        if ceil and dil != [1, 1] and kind == "AveragePool":
            pytest.skip("onnx's reference evaluator mis-sizes dilated ceil-mode average pools")
        want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    got = gc.onnx.load(m)(x)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _np_conv3d(x, w, b, pads, strides, dil, group):
    """Direct loops over output positions (independent of graphc's 2-D decomposition)."""
    n, c, *size = x.shape
    o, cg, *k = w.shape
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple((pads[i], pads[i + 3]) for i in range(3)))
    out = [(xp.shape[2 + i] - (k[i] - 1) * dil[i] - 1) // strides[i] + 1 for i in range(3)]
    y = np.zeros((n, o, *out))
    og = o // group
    for oc in range(o):
        g = oc // og
        for idx in np.ndindex(*out):
            sl = tuple(slice(idx[i] * strides[i], idx[i] * strides[i] + (k[i] - 1) * dil[i] + 1,
                             dil[i]) for i in range(3))
            patch = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + sl]
            y[(slice(None), oc) + idx] = (patch * w[oc]).sum(axis=(1, 2, 3, 4)) + b[oc]
    return y


def test_conv3d_matches_direct_loops():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((2, 4, 5, 6, 5))
    w = rng.standard_normal((6, 2, 2, 3, 2))
    b = rng.standard_normal(6)
    attrs = dict(pads=[1, 0, 1, 0, 1, 1], strides=[2, 1, 2], dilations=[1, 2, 1], group=2)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
               [_vi("x", F64, [2, 4, 5, 6, 5])], [_vi("y", F64, ["a", "b", "c", "d", "e"])],
               [("w", w), ("b", b)])
    want = _np_conv3d(x, w, b, attrs["pads"], attrs["strides"], attrs["dilations"], 2)
    got = gc.onnx.load(m)(x)[0]
    assert got.shape == want.shape == (2, 6, 3, 3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["MaxPool", "AveragePool"])
def test_pool3d_asymmetric_ceil_matches_onnxruntime(kind):
    ort = pytest.importorskip("onnxruntime")
    attrs = dict(kernel_shape=[2, 3, 2], strides=[2, 2, 1], pads=[1, 0, 0, 0, 1, 1],
                 ceil_mode=1)
    if kind == "AveragePool":
        attrs["count_include_pad"] = 0
    m = _model([helper.make_node(kind, ["x"], ["y"], **attrs)],
               [_vi("x", F32, [1, 2, 5, 6, 4])], [_vi("y", F32, ["a", "b", "c", "d", "e"])])
    x = np.random.default_rng(17).standard_normal((1, 2, 5, 6, 4)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=[
        "CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = gc.onnx.load(m)(x)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
