"""What a new user meets in an interactive session: errors that name the module
and the user's line, reprs, and the namespace (issue: first use)."""
import os
import stat

import numpy as np
import pytest

import graphc as gc
from graphc import models, nn


def test_linear_fed_wrong_features_names_the_module_and_line():
    model = models.mlp(in_features=64)
    x = gc.input("x", (None, 1, 28, 28))
    with pytest.raises(gc.GraphBuildError) as e:
        model(x)
    msg = str(e.value)
    assert msg.startswith("fc1: Linear(64->128) got input with 784 features")
    assert f"at {__file__}:" in msg


def test_linear_in_a_sequential_and_alone():
    with pytest.raises(gc.GraphBuildError, match=r"^Sequential\[1\]: Linear\(64->10\) got "
                       r"input with 784 features"):
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10))(gc.input("x", (None, 1, 28, 28)))
    with pytest.raises(gc.GraphBuildError, match=r"^Linear\(3->2\) got input with 4 features"):
        nn.Linear(3, 2)(gc.input("x", (None, 4)))


def test_lenet_fed_small_images_names_conv2():
    with pytest.raises(gc.GraphBuildError) as e:
        models.lenet5()(gc.input("x", (None, 1, 8, 8)))
    msg = str(e.value)
    assert msg.startswith("conv2: Conv2d(6->16, kernel 5x5) could not take input of shape "
                          "(N, 6, 4, 4)")
    assert f"at {__file__}:" in msg


def test_conv_fed_wrong_channels_or_rank():
    with pytest.raises(gc.GraphBuildError, match=r"^conv1: Conv2d\(1->6, kernel 5x5\) got "
                       r"input with 3 channels"):
        models.lenet5()(gc.input("x", (None, 3, 28, 28)))
    with pytest.raises(gc.GraphBuildError, match=r"NCHW"):
        nn.Conv2d(1, 2, 3)(gc.input("x", (None, 28, 28)))


def test_correct_layers_still_build_and_compute():
    lin = nn.Linear(3, 2, rng=0)
    x = gc.input("x", (None, 3))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = a.astype(np.float64) @ lin.weight.value.T.astype(np.float64) + lin.bias.value
    np.testing.assert_allclose(gc.compile([x], lin(x))(a), want, rtol=1e-6)


def test_saved_weights_get_the_same_mode_as_other_outputs(tmp_path):
    old = os.umask(0o022)
    try:
        nn.Linear(2, 2, rng=0).save(tmp_path / "w.npz")
        with open(tmp_path / "other.json", "w") as f:       # how every other output is written
            f.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "w.npz").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "other.json").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["other.json", "w.npz"]   # no temporary left


@pytest.mark.parametrize("call", ["export", "load", "zoo"])
def test_onnx_without_the_extra_says_how_to_install_it(monkeypatch, tmp_path, call):
    import sys
    x = gc.input("x", (None, 3))
    y = gc.relu(x)
    for mod in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "onnx", None)            # as if not installed
    import graphc.onnx as gonnx
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'graphc\[onnx\]'") as e:
        if call == "export":
            gonnx.export(y, str(tmp_path / "m.onnx"), inputs=[x])
        elif call == "load":
            gonnx.load(str(tmp_path / "m.onnx"))
        else:
            gonnx.zoo.resnet_like()
    assert isinstance(e.value, gc.GraphcError) and f"gc.onnx.{call}" in str(e.value)
    assert not os.listdir(tmp_path)


def test_function_repr_names_inputs_outputs_updates_backend():
    x = gc.input("x", (None, 3))
    w = gc.Parameter(np.ones((3, 2), np.float32), name="w")
    f = gc.compile([x], gc.sum(x @ w), updates={w: w * 2}, name="step")
    assert repr(f) == ("<Function 'step' (x: float32(N, 3)) -> float32(); updates 1 parameter "
                       "(w); backend numpy>")
    g = gc.compile([x], [x @ w, gc.sum(x)])
    assert repr(g) == ("<Function 'function' (x: float32(N, 3)) -> [float32(N, 2), float32()]; "
                       "backend numpy>")


def test_function_and_node_draw_themselves_in_jupyter():
    pytest.importorskip("graphviz")
    from graphc.viz import GraphvizNotFoundError
    x = gc.input("x", (None, 3))
    w = gc.Parameter(np.ones((3, 2), np.float32), name="w")
    y = gc.relu(x @ w)
    f = gc.compile([x], y, updates={w: w * 2})
    try:
        svg_node, svg_fn = y._repr_svg_(), f._repr_svg_()
    except GraphvizNotFoundError:
        pytest.skip("graphviz's dot is not installed")
    if svg_node is None:
        pytest.skip("graphviz's dot is not installed")
    assert svg_node.lstrip().startswith("<?xml") and "<svg" in svg_node and "relu" in svg_node
    assert "<svg" in svg_fn and "w" in svg_fn and svg_fn != svg_node   # the update is drawn


def test_asarray_of_a_node_is_a_clear_error():
    w = gc.Parameter(np.ones((3, 2), np.float32), name="w")
    x = gc.input("x", (None, 3))
    with pytest.raises(TypeError, match=r"np.asarray\(<Parameter w.*no values until the graph "
                       r"runs.*gc.compile.*node.value"):
        np.asarray(w)
    with pytest.raises(TypeError, match=r"np.asarray\(<matmul"):
        np.array(x @ w)
    # NumPy operators still defer to the node (ndarray + node builds a node)
    z = np.ones(3, np.float32) + gc.input("z", (3,))
    assert isinstance(z, gc.Node) and z.shape == (3,)


def test_lazy_names_are_listed_for_tab_completion():
    for name in ("nn", "optim", "data", "models", "train", "render", "to_dot", "onnx", "viz"):
        assert name in dir(gc) and name in gc.__all__, name
        assert getattr(gc, name) is not None
    assert gc.InputCastWarning in (gc.input_cast.InputCastWarning,)


def test_compile_docstring_covers_dtypes_returns_keywords():
    doc = gc.compile.__doc__
    for needle in ("float64 -> float32", "InputCastWarning", "returns one array",
                   "list of arrays", "by input name", "0-d array", "updates", "backend"):
        assert needle in doc, needle
