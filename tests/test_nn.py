"""graphc.nn: parameter discovery, initializers, layers against independent
NumPy computations, train/eval behaviour, state dicts and .npz files."""
import math
import os

import numpy as np
import pytest

import graphc as gc
from graphc import models, nn, optim

R = np.random.default_rng(0)


def run(model, x_arr, dtype="float32"):
    """Compile model's forward (in its current mode) and run it on x_arr."""
    x = gc.input("x", (None,) + x_arr.shape[1:], dtype=dtype)
    return gc.compile([x], model(x))(x_arr)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.scale = gc.Parameter(np.full((1,), 2.0, np.float32))
        self.note = "not a parameter"

    def forward(self, x):
        h = self.features(x)
        return self.head(gc.flatten(h)) * self.scale


# ------------------------------------------------------------------ discovery
def test_parameter_discovery_names_and_counts():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["scale", "features.0.weight", "features.0.bias", "features.2.weight",
                     "features.2.bias", "head.weight", "head.bias"]
    assert [n for n, _ in net.named_buffers()] == ["features.2.running_mean",
                                                   "features.2.running_var"]
    manual = 1 + (4 * 1 * 3 * 3 + 4) + (4 + 4) + (144 * 3 + 3)
    assert net.num_parameters() == manual
    assert sum(p.value.size for p in net.parameters()) == manual
    assert all(p.trainable for p in net.parameters())
    assert not any(b.trainable for b in net.buffers())
    assert list(net.state_dict()) == names[:5] + ["features.2.running_mean",
                                                  "features.2.running_var"] + names[5:]
    assert [n for n, _ in net.named_modules()] == ["", "features", "features.0", "features.1",
                                                  "features.2", "head"]
    assert net.note == "not a parameter"


def test_shared_modules_and_parameters_count_once():
    shared = nn.Linear(3, 3)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    assert len(seq.parameters()) == 2
    assert list(seq.state_dict()) == ["0.weight", "0.bias"]


def test_subclass_without_super_init_and_reassignment():
    class Bare(nn.Module):
        def __init__(self):  # forgets super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)
    m = Bare()
    assert [n for n, _ in m.named_parameters()] == ["fc.weight", "fc.bias"]
    m.fc = nn.Linear(2, 2, bias=False)
    assert [n for n, _ in m.named_parameters()] == ["fc.weight"]
    with pytest.raises(TypeError, match="fc"):
        m.fc = 3


def test_train_eval_modes_propagate():
    net = Net()
    assert net.training and net.features[2].training
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_graph_nodes_are_scoped_and_parameters_named():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = gc.input("x", (None, 4))
    y = model(x)
    assert y.scope == ("Sequential", "1:ReLU")
    assert model[0].weight.name == "0.weight"
    lin_nodes = [n for n in gc.ir.toposort([y]) if n.scope == ("Sequential", "0:Linear")]
    assert {"matmul", "add"} <= {n.op.name for n in lin_nodes}


def test_layer_shape_errors_point_at_the_users_line():
    with pytest.raises(gc.GraphBuildError, match="test_nn.py"):
        nn.Linear(4, 3)(gc.input("x", (None, 5)))


# ------------------------------------------------------------------ initializers
def test_default_linear_and_conv_init_bounds():
    nn.manual_seed(1)
    lin = nn.Linear(50, 400)
    bound = 1 / math.sqrt(50)
    w = lin.weight.value
    assert w.dtype == np.float32 and w.shape == (400, 50)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(lin.bias.value).max() <= bound
    # U(-b, b) has std b/sqrt(3)
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    conv = nn.Conv2d(3, 64, 5)
    cb = 1 / math.sqrt(3 * 5 * 5)
    assert np.abs(conv.weight.value).max() <= cb
    assert np.abs(conv.weight.value).max() > 0.99 * cb
    assert np.abs(conv.bias.value).max() <= cb


def test_initializer_statistics():
    rng = np.random.default_rng(5)
    shape = (300, 200, 3, 3)  # fan_in 1800, fan_out 2700
    ku = nn.init.kaiming_uniform(shape, nonlinearity="relu", rng=rng)
    b = math.sqrt(2.0) * math.sqrt(3.0 / 1800)
    assert np.abs(ku).max() <= b and np.abs(ku).max() > 0.999 * b
    kn = nn.init.kaiming_normal(shape, mode="fan_out", nonlinearity="relu", rng=rng)
    assert kn.std() == pytest.approx(math.sqrt(2.0 / 2700), rel=0.01)
    xn = nn.init.xavier_normal(shape, gain=2.0, rng=rng, dtype="float64")
    assert xn.dtype == np.float64
    assert xn.std() == pytest.approx(2.0 * math.sqrt(2.0 / (1800 + 2700)), rel=0.01)
    xu = nn.init.xavier_uniform((40, 60), rng=rng)
    assert np.abs(xu).max() <= math.sqrt(6.0 / 100)
    assert nn.init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert nn.init.calculate_gain("tanh") == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        nn.init.xavier_uniform((5,))


def test_in_place_initializers_and_seeding():
    p = gc.Parameter(np.zeros((4, 6), np.float32))
    nn.init.constant_(p, 0.5)
    np.testing.assert_array_equal(p.value, np.full((4, 6), 0.5, np.float32))
    nn.init.kaiming_uniform_(p, a=math.sqrt(5), rng=3)
    assert np.abs(p.value).max() <= 1 / math.sqrt(6)
    arr = np.empty((4, 6))
    nn.init.kaiming_uniform_(arr, a=math.sqrt(5), rng=3)
    np.testing.assert_array_equal(arr.astype(np.float32), p.value)
    nn.manual_seed(42)
    a = models.mlp().state_dict()
    nn.manual_seed(42)
    b = models.mlp().state_dict()
    c = models.mlp().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


# ------------------------------------------------------------------ layers vs NumPy
def test_linear_forward_matches_numpy():
    lin = nn.Linear(5, 3)
    x = R.normal(size=(7, 5)).astype(np.float32)
    want = x @ lin.weight.value.T + lin.bias.value
    np.testing.assert_allclose(run(lin, x), want, rtol=1e-5, atol=1e-6)
    nobias = nn.Linear(5, 3, bias=False)
    np.testing.assert_allclose(run(nobias, x), x @ nobias.weight.value.T, rtol=1e-5, atol=1e-6)


def test_conv2d_forward_matches_loops():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype="float64")
    x = R.normal(size=(2, 2, 7, 6))
    w, b = conv.weight.value, conv.bias.value
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = (7 + 2 - 3) // 2 + 1, (6 + 2 - 3) // 2 + 1
    want = np.zeros((2, 3, oh, ow))
    for n in range(2):
        for o in range(3):
            for i in range(oh):
                for j in range(ow):
                    want[n, o, i, j] = np.sum(xp[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * w[o]) + b[o]
    np.testing.assert_allclose(run(conv, x, "float64"), want, rtol=1e-12, atol=1e-12)


def test_pool_and_flatten_modules():
    x = R.normal(size=(2, 3, 4, 6)).astype(np.float32)
    mx = run(nn.MaxPool2d(2), x)
    np.testing.assert_array_equal(mx, x.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5)))
    av = run(nn.AvgPool2d(2), x)
    np.testing.assert_allclose(av, x.reshape(2, 3, 2, 2, 3, 2).mean(axis=(3, 5)), rtol=1e-6)
    np.testing.assert_array_equal(run(nn.Flatten(), x), x.reshape(2, -1))


def test_activation_modules():
    x = R.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(nn.ReLU(), x), np.maximum(x, 0))
    np.testing.assert_allclose(run(nn.Sigmoid(), x), 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(run(nn.Tanh(), x), np.tanh(x), rtol=1e-6)
    np.testing.assert_allclose(run(nn.LeakyReLU(0.2), x), np.where(x > 0, x, 0.2 * x), rtol=1e-6)


def test_layer_norm_and_embedding():
    ln = nn.LayerNorm(4)
    nn.init.uniform_(ln.weight, 0.5, 1.5, rng=1)
    nn.init.uniform_(ln.bias, -1, 1, rng=2)
    x = R.normal(size=(3, 4)).astype(np.float32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * ln.weight.value + ln.bias.value
    np.testing.assert_allclose(run(ln, x), want, rtol=1e-5, atol=1e-5)
    emb = nn.Embedding(10, 3)
    idx = np.array([[1, 9], [0, 1]], dtype=np.int64)
    got = run(emb, idx, "int64")
    np.testing.assert_array_equal(got, emb.weight.value[idx])
    assert emb.weight.value.std() == pytest.approx(1.0, abs=0.5)  # N(0, 1) init


def bn_reference(x, w, b, mean, var, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) \
        + b.reshape(shape)


def test_batchnorm_training_forward_uses_batch_statistics():
    bn = nn.BatchNorm2d(3, dtype="float64")
    nn.init.uniform_(bn.weight, 0.5, 2.0, rng=0)
    nn.init.uniform_(bn.bias, -1.0, 1.0, rng=1)
    x = R.normal(2.0, 3.0, size=(4, 3, 5, 5))
    m = x.mean(axis=(0, 2, 3))
    v = x.var(axis=(0, 2, 3))
    got = run(bn, x, "float64")
    np.testing.assert_allclose(got, bn_reference(x, bn.weight.value, bn.bias.value, m, v),
                               rtol=1e-10, atol=1e-10)
    bn1 = nn.BatchNorm1d(3, dtype="float64")
    x1 = R.normal(size=(6, 3))
    np.testing.assert_allclose(run(bn1, x1, "float64"),
                               (x1 - x1.mean(0)) / np.sqrt(x1.var(0) + 1e-5), rtol=1e-10)
    with pytest.raises(ValueError, match="rank"):
        bn1(gc.input("z", (None, 3, 2, 2)))


def test_batchnorm_running_stats_update_in_compiled_step_and_eval_uses_them():
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, dtype="float64"), nn.BatchNorm1d(4, momentum=0.2,
                                                                           dtype="float64"))
    x = gc.input("x", (None, 3), dtype="float64")
    opt = optim.SGD(model.parameters(), lr=0.1)
    step = opt.compile_step(lambda xx: gc.mean(gc.square(model(xx) - 1.0)), x)
    xb = R.normal(size=(8, 3))
    h = xb @ model[0].weight.value.T + model[0].bias.value   # before the update
    step(xb)
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.value, 0.2 * h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.value, 0.8 + 0.2 * h.var(0, ddof=1), rtol=1e-12)
    assert not np.allclose(model[0].weight.value @ np.ones(3), 0)  # weights were updated too
    model.eval()
    x2 = R.normal(size=(5, 3))
    h2 = x2 @ model[0].weight.value.T + model[0].bias.value
    want = bn_reference(h2, bn.weight.value, bn.bias.value, bn.running_mean.value,
                        bn.running_var.value)
    np.testing.assert_allclose(run(model, x2, "float64"), want, rtol=1e-10, atol=1e-12)
    # eval mode builds no state updates
    assert model.state_updates() == {}


def test_dropout_train_vs_eval():
    drop = nn.Dropout(0.5, rng=0)
    x_arr = np.ones((64, 32), np.float32)
    drop.eval()
    np.testing.assert_array_equal(run(drop, x_arr), x_arr)
    drop.train()
    x = gc.input("x", (None, 32))
    y = drop(x)
    ups = drop.state_updates()
    assert list(ups) == [drop.key]
    f = gc.compile([x], y, updates=ups)
    k0 = int(drop.key.value)
    a = f(x_arr)
    b = f(x_arr)
    assert int(drop.key.value) == k0 + 2               # advanced once per call
    assert set(np.unique(a)) == {0.0, 2.0}             # inverted dropout: survivors × 1/(1-p)
    assert abs((a == 0).mean() - 0.5) < 0.05
    assert not np.array_equal(a, b)                    # a new mask every step
    drop.key.set_value(np.array(k0))
    np.testing.assert_array_equal(f(x_arr), a)         # reproducible from the key
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.5)


# ------------------------------------------------------------------ state dicts and files
def test_state_dict_round_trip_gives_identical_outputs():
    nn.manual_seed(10)
    a = Net()
    b = Net()
    x = R.normal(size=(2, 1, 8, 8)).astype(np.float32)
    a.eval()
    b.eval()
    assert not np.array_equal(run(a, x), run(b, x))
    sd = a.state_dict()
    b.load_state_dict(sd)
    np.testing.assert_array_equal(run(a, x), run(b, x))
    sd["head.bias"][:] = 123.0                  # state_dict returns copies
    assert not np.any(a.head.bias.value == 123.0)


def test_save_load_npz_identical_outputs(tmp_path):
    nn.manual_seed(11)
    a = models.lenet5()
    b = models.lenet5()
    path = tmp_path / "weights"                 # written exactly here, no ".npz" added
    a.save(path)
    assert os.path.exists(path) and not os.path.exists(str(path) + ".npz")
    b.load(path)
    x = R.normal(size=(3, 1, 28, 28)).astype(np.float32)
    a.eval()
    b.eval()
    np.testing.assert_array_equal(run(a, x), run(b, x))
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(a.state_dict())


def _tamper(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    edit(d)
    np.savez(dst, **d)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("fc2.bias"), r"missing key.*fc2\.bias"),
    (lambda d: d.__setitem__("fc1.weight", np.zeros((3, 3), np.float32)),
     r"fc1\.weight.*expected shape \(120, 400\).*got \(3, 3\)"),
    (lambda d: d.__setitem__("fc9.weight", np.zeros(2, np.float32)), r"unexpected key.*fc9"),
    (lambda d: d.__setitem__("conv1.bias", np.zeros(6, np.complex64)), r"conv1\.bias.*complex"),
], ids=["missing", "shape", "extra", "dtype"])
def test_tampered_npz_raises_clear_error_and_writes_nothing(tmp_path, edit, pattern):
    nn.manual_seed(12)
    model = models.lenet5()
    good = tmp_path / "good.npz"
    model.save(good)
    bad = tmp_path / "bad.npz"
    _tamper(good, bad, edit)
    nn.init.zeros_(model.conv1.weight)
    with pytest.raises(nn.StateDictError, match=pattern) as ei:
        model.load(bad)
    assert "bad.npz" in str(ei.value)
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)
    assert not model.conv1.weight.value.any()   # nothing was loaded


def test_object_arrays_and_non_npz_files_are_refused(tmp_path):
    model = nn.Linear(2, 2)
    evil = tmp_path / "evil.npz"
    np.savez(evil, **{"weight": np.array([{"x": 1}, None], dtype=object),
                      "bias": np.zeros(2, np.float32)})
    with pytest.raises(nn.StateDictError, match=r"'weight'.*pickle"):
        model.load(evil)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip archive")
    with pytest.raises(nn.StateDictError, match="junk.npz"):
        model.load(junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(nn.StateDictError, match="single"):
        model.load(single)


def test_load_state_dict_non_strict_reports_keys():
    model = nn.Linear(2, 2)
    res = model.load_state_dict({"weight": np.eye(2, dtype=np.float32), "extra": np.zeros(1)},
                                strict=False)
    assert res.missing_keys == ["bias"] and res.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(model.weight.value, np.eye(2))


# ------------------------------------------------------------------ model zoo
def test_model_zoo_shapes_and_parameter_counts():
    lenet = models.lenet5()
    assert lenet.num_parameters() == 156 + 2416 + 48120 + 10164 + 850
    x = gc.input("x", (None, 1, 28, 28))
    assert tuple(lenet(x).shape) == ("N", 10)
    lenet32 = models.lenet5(num_classes=5, in_channels=3, input_size=32, pool="avg",
                            activation="tanh")
    assert tuple(lenet32(gc.input("x", (None, 3, 32, 32))).shape) == ("N", 5)
    m = models.mlp()
    assert m.num_parameters() == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    assert tuple(m(gc.input("x", (None, 1, 8, 8))).shape) == ("N", 10)
    assert "fc1" in repr(lenet) and "Conv2d" in repr(lenet)


def test_layers_match_torch_when_installed():
    torch = pytest.importorskip("torch")
    nn.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype="float64"),
                          nn.BatchNorm2d(3, dtype="float64"), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4, dtype="float64"))
    tmodel = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                                 torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(12, 4)).double()
    tmodel.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()},
                           strict=False)
    x = R.normal(size=(5, 2, 4, 4))
    xi = gc.input("x", (None, 2, 4, 4), dtype="float64")
    opt = optim.SGD(model.parameters(), lr=0.0)     # lr 0: only the state updates act
    step = opt.compile_step(lambda a: gc.sum(model(a)), xi, outputs=[])
    step(x)
    tmodel.train()
    tmodel(torch.tensor(x))
    bn, tbn = model[1], tmodel[1]
    np.testing.assert_allclose(bn.running_mean.value, tbn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.value, tbn.running_var.numpy(), rtol=1e-12)
    model.eval()
    tmodel.eval()
    with torch.no_grad():
        want = tmodel(torch.tensor(x)).numpy()
    np.testing.assert_allclose(run(model, x, "float64"), want, rtol=1e-10, atol=1e-12)


def test_truncated_npz_is_a_state_dict_error_naming_the_file(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "weights.npz"
    model.save(path)
    raw = path.read_bytes()
    for n in (len(raw) - 10, len(raw) // 2, 40):
        cut = tmp_path / f"cut{n}.npz"
        cut.write_bytes(raw[:n])
        with pytest.raises(nn.StateDictError, match=rf"cut{n}\.npz: .*truncated or damaged"):
            model.load(cut)


def test_float64_state_beyond_float32_range_is_refused(tmp_path):
    # like a compiled function's inputs: a finite value that would become inf is refused,
    # naming the file, the key and the index, and nothing is written
    model = nn.Linear(3, 2)
    before = model.weight.value.copy()
    sd = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    sd["weight"][1, 0] = 5e38
    sd["bias"][:] = 7.0
    path = tmp_path / "huge.npz"
    nn.save_npz(path, sd)
    with pytest.raises(nn.StateDictError, match=r"huge\.npz: state 'weight': float64 value "
                                                r"5e\+38 at index \(1, 0\) is beyond the "
                                                r"float32 range"):
        model.load(path)
    np.testing.assert_array_equal(model.weight.value, before)
    assert not (model.bias.value == 7.0).any()
    with pytest.raises(nn.StateDictError, match="state 'weight'"):
        model.load_state_dict(sd)
    sd["weight"][1, 0] = 0.25                  # in range: cast and loaded
    model.load_state_dict(sd)
    np.testing.assert_array_equal(model.weight.value, sd["weight"].astype(np.float32))
