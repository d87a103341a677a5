"""Rendering graphs with graphviz: files, labels, clusters, roles, gradients, errors."""
import re
import types

import numpy as np
import pytest

import graphc as gc
from graphc import viz
from graphc.ir.node import Node, TensorType

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lenet_loss(batch="N"):
    """LeNet-5 (LeCun et al. 1998 shapes) from nn layers, so modules give scopes."""
    from graphc import nn
    nn.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    x = gc.input("x", (batch, 1, 28, 28))
    y = gc.input("y", (batch,), dtype="int64")
    loss = gc.cross_entropy(model(x), y)
    return model, x, y, loss


def small_net():
    rng = np.random.default_rng(0)
    x = gc.input("x", (None, 1, 6, 6))
    with gc.name_scope("block"):
        with gc.name_scope("conv"):
            w = gc.Parameter(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), name="w")
            h = gc.relu(gc.conv2d(x, w, padding=1))
        with gc.name_scope("head"):
            v = gc.Parameter(rng.standard_normal((72, 3)).astype(np.float32), name="v")
            out = gc.flatten(h) @ v
    loss = gc.mean(out * out)
    return x, w, v, loss


def svg_text_of(svg: str) -> str:
    """The visible text of an SVG (labels), HTML entities unescaped."""
    import html
    return html.unescape(" ".join(re.findall(r">([^<>]+)</text>", svg)))


# ------------------------------------------------------------------ LeNet files
def test_lenet_forward_png_and_svg(tmp_path):
    _, _, _, loss = lenet_loss()
    png = gc.render(loss, tmp_path / "fwd.png")
    assert open(png, "rb").read(8) == PNG_MAGIC
    svg_path = gc.render(loss, tmp_path / "fwd.svg", title="LeNet-5 forward")
    svg = open(svg_path).read()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    text = svg_text_of(svg)
    assert "conv2d" in text and "LeNet-5 forward" in text
    assert "conv2d_grad_weight" not in text          # forward only
    # the module scopes became clusters
    assert svg.count('class="cluster"') >= 5


def test_layer_weights_sit_in_their_layer_cluster():
    model, _, _, loss = lenet_loss()
    src = gc.to_dot(loss).source
    w = dict(model.named_parameters())["0.weight"]
    start = src.index("subgraph cluster_Sequential__0_Conv2d {")
    end = src.index("subgraph cluster_Sequential__1_ReLU {")
    assert start < src.index(f"\tn{w.id} [") < end


def test_lenet_training_graph_png_svg_names_gradient_nodes(tmp_path):
    _, _, _, loss = lenet_loss()
    png = gc.render(loss, tmp_path / "train.png", backward=True, detail="full")
    assert open(png, "rb").read(8) == PNG_MAGIC
    svg = open(gc.render(loss, tmp_path / "train.svg", backward=True, detail="full")).read()
    text = svg_text_of(svg)
    for name in ("conv2d", "conv2d_grad_input", "conv2d_grad_weight", "backward (gradients)"):
        assert name in text, name
    # the legend tells the roles apart
    assert "backward (gradient) op" in text and "forward op" in text
    # a gradient node names the parameter it is the gradient of
    assert re.search(r"grad of \S*weight", text)


def test_pdf_and_explicit_format(tmp_path):
    x, w, v, loss = small_net()
    p = gc.render(loss, tmp_path / "g.pdf")
    assert open(p, "rb").read(5) == b"%PDF-"
    p = gc.render(loss, tmp_path / "noext", format="svg")
    assert "<svg" in open(p).read()
    with pytest.raises(ValueError, match="format"):
        gc.render(loss, tmp_path / "g.jpeg2")


# ------------------------------------------------------------------ structure of the dot source
def test_labels_show_op_attrs_and_shape():
    x, w, v, loss = small_net()
    src = gc.to_dot(loss).source
    assert "conv2d" in src and "padding=1" in src
    assert "f32[N,2,6,6]" in src                       # output type with the symbolic batch
    assert "invhouse" in src and "cylinder" in src     # input and parameter styles
    # nested clusters: block contains conv and head
    assert "cluster_block" in src and "cluster_block__conv" in src
    assert "cluster_block__head" in src
    block = src.index("subgraph cluster_block {")
    inner = src.index("subgraph cluster_block__conv {")
    assert inner > block


def test_roles_coloured_apart_and_update_edges():
    x, w, v, loss = small_net()
    gw, gv = gc.grad(loss, [w, v])
    with gc.ir.role("update"):
        new_w, new_v = w - 0.1 * gw, v - 0.1 * gv
    f = gc.compile([x], [loss], updates={w: new_w, v: new_v})
    src = gc.to_dot(f).source
    fwd, bwd = viz.ROLE_STYLE["forward"]["fillcolor"], viz.ROLE_STYLE["backward"]["fillcolor"]
    assert fwd in src and bwd in src
    # each update ends in a "w <-" node inside that parameter's update cluster
    for p, val in f.updates:
        assert f"n{val.id} -> set{p.id}" in src
        assert f"<B>{p.label()} \u2190</B>" in src
    upd = src.index("subgraph cluster__update__w {")
    assert src.index(f"set{w.id} [", upd) > upd
    assert "parameter update" in src and "parameter updates" in src   # legend, cluster


def test_fused_node_drawn_as_cluster_with_inner_graph():
    a = gc.input("a", (3,))
    b = gc.input("b", (3,))
    pa, pb = gc.input("p0", (3,)), gc.input("p1", (3,))
    inner = gc.Graph([gc.relu(pa * pb + 1.0)], [pa, pb])
    fused_op = types.SimpleNamespace(name="fused")
    node = Node(fused_op, (a, b), {}, TensorType("float32", (3,)), value=inner)
    out = gc.exp(node)
    src = gc.to_dot(out).source
    assert f"cluster_fused_{node.id}" in src
    assert "relu" in src and "mul" in src and "add" in src
    # outer inputs feed the placeholders, the inner output feeds exp
    assert f"n{a.id} -> n{node.id}_{pa.id}" in src
    relu_id = inner.outputs[0].id
    assert f"n{node.id}_{relu_id} -> n{out.id}" in src
    assert "fused kernel" in src


def test_gradient_annotation_colours_by_log_magnitude(tmp_path):
    x, w, v, loss = small_net()
    big, tiny = np.full(w.shape, 10.0), np.full(v.shape, 1e-6)
    src = gc.to_dot(loss, backward=True, grad_values={w: big, "v": tiny}).source
    nw, nv = np.linalg.norm(big), np.linalg.norm(tiny)
    assert f"|grad| = {nw:.3g}" in src and f"|grad| = {nv:.3g}" in src
    # largest norm -> hottest end of the map, smallest -> coldest
    assert viz._grad_colour(1.0) in src and viz._grad_colour(0.0) in src
    assert "gradient norm (log scale)" in src
    # the gradient node of w is annotated too (parameter + its grad node)
    assert src.count(f"|grad| = {nw:.3g}") == 2
    with pytest.raises(KeyError, match="nope"):
        gc.to_dot(loss, grad_values={"nope": big})


def test_gradient_values_from_a_real_step_match_manual_gradient():
    x, w, v, loss = small_net()
    xb = np.random.default_rng(1).standard_normal((2, 1, 6, 6)).astype(np.float32)
    vals = viz.gradient_values(loss, [x], [xb])
    assert set(vals) == {w, v}
    # independent reference for d loss / d v: loss = mean(out^2), out = flat(h) @ v
    h = np.zeros((2, 2, 6, 6))
    xp = np.pad(xb.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for n in range(2):
        for c in range(2):
            for i in range(6):
                for j in range(6):
                    h[n, c, i, j] = np.sum(xp[n, 0, i:i + 3, j:j + 3] * w.value[c, 0])
    h = np.maximum(h, 0).reshape(2, -1)
    out = h @ v.value
    ref = h.T @ (2 * out / out.size)
    np.testing.assert_allclose(vals[v], ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ Jupyter + errors
def test_graph_repr_svg_returns_svg_text():
    x, w, v, loss = small_net()
    svg = gc.Graph([loss])._repr_svg_()
    assert isinstance(svg, str) and "<svg" in svg and "conv2d" in svg


def test_missing_dot_binary_gives_install_instructions(tmp_path, monkeypatch):
    x, w, v, loss = small_net()
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `dot` on PATH
    with pytest.raises(viz.GraphvizNotFoundError, match="apt-get install graphviz") as e:
        gc.render(loss, tmp_path / "x.png")
    assert "brew install graphviz" in str(e.value)
    assert not (tmp_path / "x.png").exists()
    with pytest.warns(RuntimeWarning, match="graphviz"):
        assert gc.Graph([loss])._repr_svg_() is None


def test_bad_arguments():
    x, w, v, loss = small_net()
    with pytest.raises(TypeError, match="expected a node"):
        gc.to_dot(42)
    with pytest.raises(ValueError, match="scalar loss"):
        gc.to_dot(gc.relu(x), backward=True)


def test_optimized_training_graph_draws_real_fused_kernels(tmp_path):
    from graphc import optim
    model, x, y, _ = lenet_loss()
    step = optim.SGD(model.parameters(), lr=0.05).compile_step(
        lambda a, b: gc.cross_entropy(model(a), b), x, y)
    step(np.zeros((2, 1, 28, 28), np.float32), np.array([3, 7]))
    graph = step.function.graph                   # after the optimizer (level 2)
    fused = [n for n in graph.nodes if n.op.name == "fused"]
    assert fused, "the optimizer fused nothing in LeNet's training graph"
    src = gc.to_dot(graph, detail="full").source
    for n in fused:
        assert f"cluster_fused_{n.id}" in src
    assert "conv_epilogue conv2d+add+relu" in src
    svg = open(gc.render(graph, tmp_path / "opt.svg", detail="full")).read()
    assert "fused kernel" in svg_text_of(svg)


@pytest.mark.parametrize("opt_name, kwargs", [
    ("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adam", {"lr": 1e-3})])
def test_training_step_gradient_nodes_found_and_coloured(opt_name, kwargs):
    from graphc import optim
    x, w, v, _ = small_net()
    opt = getattr(optim, opt_name)([w, v], **kwargs)
    step = opt.compile_step(lambda a: gc.mean(gc.flatten(gc.relu(gc.conv2d(a, w, padding=1)))
                                              @ v), x)
    xb = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    grads = viz.gradient_values(step.function.outputs[0], [x], [xb], params=[w, v])
    src = gc.to_dot(step, grad_values=grads, detail="full").source
    assert "grad of w" in src and "grad of v" in src
    for p, g in grads.items():
        # the parameter, its gradient node and its "p <-" node carry the norm
        assert src.count(f"|grad| = {np.linalg.norm(g):.3g}") == 3, p.label()


# ------------------------------------------------------------------ the overview of big graphs
def lenet_training_step():
    """LeNet-5's compiled training step as `graphc train lenet` draws it, with real
    gradients of one batch."""
    from graphc import cli, models
    model = models.lenet5(rng=np.random.default_rng(0))
    x = gc.input("x", (None, 1, 28, 28))
    y = gc.input("y", (None,), dtype="int64")
    step = cli.training_step(model, x, y, 5e-3, "numpy")
    loss = gc.cross_entropy(model(x), y)
    rng = np.random.default_rng(1)
    grads = viz.gradient_values(loss, [x, y], [rng.standard_normal((4, 1, 28, 28))
                                               .astype(np.float32), np.arange(4)],
                                params=model.parameters())
    return model, step, grads


def _boxes(src):
    """{bold title: dot node id} of the dot source's nodes."""
    return {t: i for i, t in re.findall(r"^\s+(\w+) \[label=<<B>([^<]*)</B>", src, flags=re.M)}


def test_default_lenet_training_step_picture_fits_2000px_with_10px_labels(tmp_path):
    _, step, grads = lenet_training_step()
    svg = open(gc.render(step, tmp_path / "step.svg", grad_values=grads)).read()
    w_pt, h_pt = map(float, re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"',
                                      svg).groups())
    scale = float(re.search(r"scale\(([\d.]+)", svg).group(1))
    px = 96 / 72                                           # graphviz draws PNGs at 96 dpi
    assert w_pt * px <= 2000 and h_pt * px <= 2000, (w_pt, h_pt)
    fonts = [float(f) for f in re.findall(r'font-size="([\d.]+)"', svg)]
    assert fonts and min(fonts) * scale * px >= 10, min(fonts)
    png = open(gc.render(step, tmp_path / "step.png", grad_values=grads), "rb").read()
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert w <= 2000 and h <= 2000, (w, h)
    assert svg.count('class="node"') < 45                  # ~420 ops, drawn as ~30 boxes


def test_overview_has_one_box_per_module_wired_in_order():
    model, step, grads = lenet_training_step()
    src = gc.to_dot(step, grad_values=grads).source
    boxes = _boxes(src)
    names = [n for n, _ in model.named_children()]
    for name in names:
        kind = type(getattr(model, name)).__name__
        assert f"{name} ({kind})" in boxes and f"gradient of {name} ({kind})" in boxes, name
    assert "optimizer update" in boxes
    for a, b in zip(names, names[1:]):                     # the forward chain, module to module
        ka, kb = (f"{n} ({type(getattr(model, n)).__name__})" for n in (a, b))
        assert re.search(rf"^\s+{boxes[ka]} -> {boxes[kb]}\b", src, flags=re.M), (a, b)
        # the gradient flows back: drawn upwards (dir=back) from b's gradient to a's
        assert re.search(rf"^\s+{boxes['gradient of ' + ka]} -> {boxes['gradient of ' + kb]} "
                         r"\[.*dir=back", src, flags=re.M), (a, b)
    upd = boxes["optimizer update"]
    assert re.search(rf"^\s+{boxes['gradient of conv1 (Conv2d)']} -> {upd}\b", src, flags=re.M)
    # each module's gradient norms, from the real batch, on its forward and gradient box
    for p, g in grads.items():
        leaf = p.label().rsplit(".", 1)[-1]
        assert src.count(f"|grad {leaf}| = {np.linalg.norm(g):.3g}") == 2, p.label()
    assert "new values of 10 parameters" in src and "and of 21 optimizer state" in src


def test_full_detail_on_request_and_small_graphs_in_full():
    _, step, _ = lenet_training_step()
    full = gc.to_dot(step, detail="full").source
    assert len(re.findall(r"^\s+n\d+ \[", full, flags=re.M)) > 300
    assert "optimizer update" not in _boxes(full)
    x, w, v, loss = small_net()                            # a few nodes: full by default
    assert gc.to_dot(loss).source == gc.to_dot(loss, detail="full").source
    modules = gc.to_dot(loss, detail="modules").source    # the overview on request
    assert "conv" in _boxes(modules) and "head" in _boxes(modules)
    with pytest.raises(ValueError, match="detail must be one of auto, modules, full"):
        gc.to_dot(loss, detail="some")


def test_legend_speaks_the_users_words():
    x, w, v, loss = small_net()
    gw, gv = gc.grad(loss, [w, v])
    with gc.ir.role("update"):
        new_w = w - 0.1 * gw
    f = gc.compile([x], [loss], updates={w: new_w})
    src = gc.to_dot(f, detail="full").source
    legend = src[src.index("\tlegend ["):]
    assert "input (data fed to each call)" in legend
    assert "parameter (weights, trained)" in legend
    for shape in ("invhouse", "cylinder", "note", "dashed)", "(cluster)"):
        assert shape not in legend, shape
