"""conv2d and its gradient ops: forward against an independent loop
implementation, gradients against finite differences, type-rule errors."""
import itertools
import zlib

import numpy as np
import pytest

import graphc as gc


# ------------------------------------------------------------------ independent reference
def naive_conv2d(x, w, b, stride, pads, dilation, groups):
    """Direct loops over the definition (cross-correlation, zero padding).

    pads = ((top, bottom), (left, right)); the channel sum is vectorized."""
    n_, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    (pt, pb), (pl, pr) = pads
    xp = np.zeros((n_, c_in, h + pt + pb, wd + pl + pr), dtype=np.float64)
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = c_out // groups
    y = np.zeros((n_, c_out, oh, ow))
    for n in range(n_):
        for o in range(c_out):
            grp = o // og
            chans = slice(grp * cg, (grp + 1) * cg)
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0
                    for k in range(kh):
                        for m in range(kw):
                            acc += np.dot(xp[n, chans, i * sh + k * dh, j * sw + m * dw],
                                          w[o, :, k, m])
                    y[n, o, i, j] = acc + (b[o] if b is not None else 0.0)
    return y


def explicit_pads(padding, kernel, dilation):
    """Independent resolution of the padding spec to ((top, bottom), (left, right))."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":  # PyTorch: total d*(k-1), the odd one extra at the end
        out = []
        for k, d in zip(kernel, dilation):
            t = d * (k - 1)
            out.append((t // 2, t - t // 2))
        return tuple(out)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return ((padding[0], padding[0]), (padding[1], padding[1]))


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def run_conv(x, w, b, **kw):
    xi = gc.input("x", x.shape, x.dtype)
    wi = gc.input("w", w.shape, w.dtype)
    ins, args = [xi, wi], [x, w]
    bi = None
    if b is not None:
        bi = gc.input("b", b.shape, b.dtype)
        ins.append(bi)
        args.append(b)
    return gc.compile(ins, gc.conv2d(xi, wi, bi, **kw))(*args)


# ------------------------------------------------------------------ the course's worked example
def test_course_worked_example():
    image = np.array([[1, 2, 3, 4, 5],
                      [6, 7, 8, 9, 10],
                      [5, 4, 3, 2, 1],
                      [10, 9, 8, 7, 6]], dtype=np.float32)
    kernel = np.array([[1, 0, -1],
                       [0, 1, -1],
                       [2, 0, 1]], dtype=np.float32)
    x = gc.input("image", (1, 1, 4, 5))
    y = gc.conv2d(x, gc.constant(kernel.reshape(1, 1, 3, 3)), padding=0, stride=1)
    assert y.shape == (1, 1, 2, 3)
    out = gc.compile([x], y)(image.reshape(1, 1, 4, 5))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [[10, 7, 4], [27, 24, 21]])


# ------------------------------------------------------------------ forward sweep
KERNELS = [(3, 3), (5, 3), (2, 4), (1, 1), (3, 2)]
IMAGES = [(7, 9), (11, 7), (8, 13), (9, 5)]
GROUPS = [1, 2, "depthwise"]


def _cases():
    cases = []
    for idx, (stride, padding, dilation, groups) in enumerate(itertools.product(
            [1, 2, 3], [0, 1, 2, (1, 2), "same", "valid"], [1, 2], GROUPS)):
        if padding == "same" and stride != 1:
            continue  # an error, tested below
        kernel = KERNELS[idx % len(KERNELS)]
        h, w = IMAGES[idx % len(IMAGES)]
        ext = [dilation * (k - 1) + 1 for k in kernel]
        h, w = max(h, ext[0]), max(w, ext[1])       # make the kernel fit without padding
        if groups == 1:
            c_in, c_out, g = (1, 3, 1) if idx % 2 else (3, 2, 1)
        elif groups == 2:
            c_in, c_out, g = 4, 6, 2
        else:
            c_in = 3
            c_out, g = (3 if idx % 2 else 6), 3    # depthwise, channel multiplier 1 or 2
        dtype = np.float64 if idx % 3 == 0 else np.float32
        cases.append(dict(stride=stride, padding=padding, dilation=dilation, groups=g,
                          kernel=kernel, hw=(h, w), c_in=c_in, c_out=c_out,
                          bias=idx % 2 == 0, dtype=dtype, batch=1 if idx % 4 < 2 else 3))
    return cases


def _case_id(c):
    return (f"s{c['stride']}-p{c['padding']}-d{c['dilation']}-g{c['groups']}-k{c['kernel']}"
            f"-{c['c_in']}to{c['c_out']}-{c['hw']}-b{int(c['bias'])}-"
            f"{np.dtype(c['dtype']).name}-n{c['batch']}").replace(" ", "")


def _check_forward(c, seed):
    rng = np.random.default_rng(seed)
    dtype = c["dtype"]
    x = rng.standard_normal((c["batch"], c["c_in"]) + c["hw"]).astype(dtype)
    w = rng.standard_normal((c["c_out"], c["c_in"] // c["groups"]) + c["kernel"]).astype(dtype)
    b = rng.standard_normal(c["c_out"]).astype(dtype) if c["bias"] else None
    out = run_conv(x, w, b, stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                   groups=c["groups"])
    pads = explicit_pads(c["padding"], c["kernel"], as_pair(c["dilation"]))
    ref = naive_conv2d(x.astype(np.float64), w.astype(np.float64),
                       None if b is None else b.astype(np.float64), as_pair(c["stride"]), pads,
                       as_pair(c["dilation"]), c["groups"])
    assert out.dtype == dtype
    assert out.shape == ref.shape
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    if c["padding"] == "same":
        assert out.shape[2:] == c["hw"]


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_forward_matches_loops(case):
    _check_forward(case, seed=zlib.crc32(_case_id(case).encode()))


@pytest.mark.parametrize("case", [
    # awkward sizes: 1x1 everything, primes, kernel as large as the image, non-square strides
    dict(stride=1, padding=0, dilation=1, groups=1, kernel=(1, 1), hw=(1, 1), c_in=1, c_out=1),
    dict(stride=1, padding=0, dilation=1, groups=1, kernel=(7, 5), hw=(7, 5), c_in=2, c_out=3),
    dict(stride=(2, 3), padding=(0, 1), dilation=(1, 2), groups=1, kernel=(3, 2), hw=(13, 11),
         c_in=5, c_out=7),
    dict(stride=(3, 1), padding=((1, 0), (0, 2)), dilation=1, groups=1, kernel=(2, 3),
         hw=(5, 4), c_in=1, c_out=2),
    dict(stride=1, padding="same", dilation=(2, 1), groups=1, kernel=(4, 2), hw=(6, 7), c_in=2,
         c_out=1),
    dict(stride=1, padding=3, dilation=1, groups=5, kernel=(1, 1), hw=(1, 2), c_in=5, c_out=5),
], ids=lambda c: _case_id(dict(c, bias=True, dtype=np.float64, batch=3)))
def test_forward_awkward_sizes(case):
    case = dict(case, bias=True, dtype=np.float64, batch=3)
    if isinstance(case["padding"], tuple) and isinstance(case["padding"][0], tuple):
        # explicit (top, bottom), (left, right) padding: compare against the loops directly
        rng = np.random.default_rng(1)
        x = rng.standard_normal((3, case["c_in"]) + case["hw"])
        w = rng.standard_normal((case["c_out"], case["c_in"]) + case["kernel"])
        out = run_conv(x, w, None, stride=case["stride"], padding=case["padding"])
        ref = naive_conv2d(x, w, None, as_pair(case["stride"]), case["padding"], (1, 1), 1)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    else:
        _check_forward(case, seed=2)


def test_same_padding_even_kernel_pads_bottom_right():
    # A 2x2 kernel that picks the top-left tap: "same" pads one row/col at the end,
    # so output[i, j] = x[i, j] exactly (PyTorch's convention).
    x = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4)
    w = np.array([[[[1.0, 0.0], [0.0, 0.0]]]])
    np.testing.assert_array_equal(run_conv(x, w, None, padding="same"), x)
    # ...and the bottom-right tap reads the zero padding on the last row/column.
    w2 = np.array([[[[0.0, 0.0], [0.0, 1.0]]]])
    expected = np.zeros_like(x)
    expected[0, 0, :2, :3] = x[0, 0, 1:, 1:]
    np.testing.assert_array_equal(run_conv(x, w2, None, padding="same"), expected)


def test_mixed_precision_promotes():
    x = np.ones((1, 1, 3, 3), np.float32)
    w = np.ones((1, 1, 2, 2), np.float64)
    out = run_conv(x, w, None)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), 4.0))


# ------------------------------------------------------------------ gradients
GRAD_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1, xs=(2, 2, 5, 6), ws=(3, 2, 3, 3)),
    dict(stride=2, padding=1, dilation=1, groups=1, xs=(2, 3, 6, 5), ws=(2, 3, 3, 2)),
    dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=1, xs=(1, 2, 8, 7),
         ws=(2, 2, 2, 3)),
    dict(stride=1, padding="same", dilation=2, groups=2, xs=(2, 4, 5, 5), ws=(4, 2, 2, 3)),
    dict(stride=3, padding=0, dilation=1, groups=3, xs=(2, 3, 7, 8), ws=(6, 1, 3, 3)),
]


@pytest.mark.parametrize("c", GRAD_CASES, ids=lambda c: f"s{c['stride']}-p{c['padding']}-"
                                                        f"d{c['dilation']}-g{c['groups']}")
def test_gradients_wrt_input_weight_bias(c):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(c["xs"])
    w = rng.standard_normal(c["ws"])
    b = rng.standard_normal(c["ws"][0])
    kw = {k: c[k] for k in ("stride", "padding", "dilation", "groups")}
    gc.check_grad(lambda x, w, b: gc.conv2d(x, w, b, **kw), [x, w, b], max_entries=24)


def test_bias_gradient_is_sum_over_batch_and_space():
    x = gc.input("x", (2, 1, 4, 4), "float64")
    w = gc.Parameter(np.ones((3, 1, 2, 2)))
    b = gc.Parameter(np.zeros(3))
    y = gc.conv2d(x, w, b)
    r = np.arange(2 * 3 * 3 * 3, dtype=np.float64).reshape(2, 3, 3, 3)
    db = gc.grad(gc.sum(y * gc.constant(r)), b)
    np.testing.assert_allclose(gc.compile([x], db)(np.zeros((2, 1, 4, 4))), r.sum(axis=(0, 2, 3)))


def test_gradient_ops_against_loops():
    # conv2d_grad_input / conv2d_grad_weight compute the adjoints: check them by the
    # defining identity <conv(x, w), g> = <x, grad_input(g, w)> = <w, grad_weight(x, g)>,
    # with the conv itself computed by the independent loops.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 2))
    attrs = dict(stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=2)
    y = naive_conv2d(x, w, None, (2, 3), ((1, 1), (0, 0)), (1, 2), 2)
    g = rng.standard_normal(y.shape)
    gi = gc.input("g", g.shape, "float64")
    wi = gc.input("w", w.shape, "float64")
    xi = gc.input("x", x.shape, "float64")
    dx = gc.conv2d_grad_input(gi, wi, x.shape[2:], **attrs)
    dw = gc.conv2d_grad_weight(xi, gi, w.shape[2:], **attrs)
    dx_v, dw_v = gc.compile([gi, wi, xi], [dx, dw])(g, w, x)
    assert dx_v.shape == x.shape and dw_v.shape == w.shape
    # every entry, via unit vectors on the loop reference (small enough here)
    for idx in [(0, 0, 0, 0), (1, 3, 8, 7), (0, 2, 4, 1), (1, 1, 8, 0)]:
        e = np.zeros_like(x)
        e[idx] = 1.0
        assert dx_v[idx] == pytest.approx(np.sum(naive_conv2d(e, w, None, (2, 3), ((1, 1), (0, 0)),
                                                               (1, 2), 2) * g), abs=1e-12)
    for idx in [(0, 0, 0, 0), (5, 1, 2, 1), (3, 0, 1, 0)]:
        e = np.zeros_like(w)
        e[idx] = 1.0
        assert dw_v[idx] == pytest.approx(np.sum(naive_conv2d(x, e, None, (2, 3), ((1, 1), (0, 0)),
                                                               (1, 2), 2) * g), abs=1e-12)
    # and the full inner products
    assert np.sum(x * dx_v) == pytest.approx(np.sum(y * g), rel=1e-12)
    assert np.sum(w * dw_v) == pytest.approx(np.sum(y * g), rel=1e-12)


def test_grad_input_size_disambiguates_stride():
    # With stride 2, inputs of height 4 and 5 both give 2 output rows (kernel 2).
    g = np.ones((1, 1, 2, 2))
    w = np.ones((1, 1, 2, 2))
    for h in (4, 5):
        gi = gc.input("g", g.shape, "float64")
        dx = gc.compile([gi], gc.conv2d_grad_input(gi, gc.constant(w), (h, 4), stride=2))(g)
        assert dx.shape == (1, 1, h, 4)
        expected = np.zeros((h, 4))
        expected[:4, :4] = 1.0
        np.testing.assert_array_equal(dx[0, 0], expected)


@pytest.mark.parametrize("c", GRAD_CASES[:4:3], ids=["plain", "same-grouped"])
def test_second_derivatives(c):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(c["xs"])
    w = rng.standard_normal(c["ws"])
    kw = {k: c[k] for k in ("stride", "padding", "dilation", "groups")}

    def loss(x, w):
        y = gc.conv2d(x, w, **kw)
        return gc.sum(y * y * y)  # cubic, so the Hessian depends on x and w

    gc.check_grad(lambda x, w: gc.grad(loss(x, w), x), [x, w], max_entries=16)
    gc.check_grad(lambda x, w: gc.grad(loss(x, w), w), [x, w], max_entries=16)


# ------------------------------------------------------------------ symbolic batch
def test_symbolic_batch_two_sizes():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 2, 3, 3))
    b = rng.standard_normal(4)
    x = gc.input("x", (None, 2, 6, 5), "float64")
    y = gc.conv2d(x, gc.constant(w), gc.constant(b), stride=2, padding=1)
    assert y.shape == ("N", 4, 3, 3)
    loss = gc.sum(y * y)
    dx = gc.grad(loss, x)
    assert dx.shape == ("N", 2, 6, 5)
    f = gc.compile([x], [y, dx])
    for n in (1, 4):
        xv = rng.standard_normal((n, 2, 6, 5))
        yv, dxv = f(xv)
        ref = naive_conv2d(xv, w, b, (2, 2), ((1, 1), (1, 1)), (1, 1), 1)
        np.testing.assert_allclose(yv, ref, rtol=1e-12, atol=1e-12)
        assert dxv.shape == (n, 2, 6, 5)


def test_only_batch_may_be_symbolic():
    x = gc.input("x", (None, "C", 6, 6))
    with pytest.raises(gc.GraphBuildError, match="symbolic") as e:
        gc.conv2d(x, gc.constant(np.ones((1, 1, 3, 3), np.float32)))
    assert "test_ops_conv.py" in str(e.value)


# ------------------------------------------------------------------ errors
def test_channel_mismatch_error_names_shapes_and_line():
    x = gc.input("x", (2, 3, 8, 8))
    w = gc.constant(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(gc.GraphBuildError, match=r"channel mismatch") as e:
        gc.conv2d(x, w)
    msg = str(e.value)
    assert "(2, 3, 8, 8)" in msg and "(4, 2, 3, 3)" in msg
    assert "test_ops_conv.py" in msg


def test_groups_must_divide_output_channels():
    x = gc.input("x", (1, 4, 8, 8))
    w = gc.constant(np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(gc.GraphBuildError, match=r"not divisible by groups=2") as e:
        gc.conv2d(x, w, groups=2)
    assert "(3, 2, 3, 3)" in str(e.value) and "test_ops_conv.py" in str(e.value)


def test_same_padding_with_stride_2_errors():
    x = gc.input("x", (1, 1, 8, 8))
    w = gc.constant(np.ones((1, 1, 3, 3), np.float32))
    with pytest.raises(gc.GraphBuildError, match=r"same.*stride 1") as e:
        gc.conv2d(x, w, stride=2, padding="same")
    assert "test_ops_conv.py" in str(e.value)


def test_kernel_larger_than_padded_input():
    x = gc.input("x", (1, 1, 4, 6))
    w = gc.constant(np.ones((1, 1, 5, 3), np.float32))
    with pytest.raises(gc.GraphBuildError, match=r"larger than the padded input H 4") as e:
        gc.conv2d(x, w)
    assert "test_ops_conv.py" in str(e.value)
    assert gc.conv2d(x, w, padding=1).shape == (1, 1, 2, 6)  # padding makes it fit
    with pytest.raises(gc.GraphBuildError, match=r"dilation 2"):
        gc.conv2d(x, gc.constant(np.ones((1, 1, 3, 3), np.float32)), dilation=2)


@pytest.mark.parametrize("xs, ws, pattern", [
    ((3, 8, 8), (1, 3, 3, 3), r"input must be 4-D"),
    ((1, 3, 8, 8), (3, 3, 3), r"weight must be 4-D"),
])
def test_rank_errors(xs, ws, pattern):
    x = gc.input("x", xs)
    with pytest.raises(gc.GraphBuildError, match=pattern) as e:
        gc.conv2d(x, gc.constant(np.ones(ws, np.float32)))
    assert "test_ops_conv.py" in str(e.value)


@pytest.mark.parametrize("kw, pattern", [
    (dict(stride=0), r"stride must be >= 1"),
    (dict(padding=-1), r"padding must be >= 0"),
    (dict(dilation=(1, 0)), r"dilation must be >= 1"),
    (dict(groups=0), r"groups must be a positive int"),
    (dict(padding="full"), r"padding must be"),
])
def test_bad_attributes(kw, pattern):
    x = gc.input("x", (1, 2, 8, 8))
    with pytest.raises(gc.GraphBuildError, match=pattern) as e:
        gc.conv2d(x, gc.constant(np.ones((2, 2, 3, 3), np.float32)), **kw)
    assert "test_ops_conv.py" in str(e.value)


def test_bias_shape_error():
    x = gc.input("x", (1, 2, 8, 8))
    w = gc.constant(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(gc.GraphBuildError, match=r"bias must have shape \(4,\)") as e:
        gc.conv2d(x, w, gc.constant(np.ones(3, np.float32)))
    assert "test_ops_conv.py" in str(e.value)


def test_integer_input_rejected():
    x = gc.input("x", (1, 1, 4, 4), "int64")
    with pytest.raises(gc.GraphBuildError, match="float"):
        gc.conv2d(x, gc.constant(np.ones((1, 1, 2, 2), np.float32)))


# ------------------------------------------------------------------ optional oracle
def test_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    for stride, padding, dilation, groups in [(1, 0, 1, 1), (2, 1, 1, 2), (1, "same", 2, 1),
                                              ((2, 1), (0, 2), (1, 2), 4)]:
        x = rng.standard_normal((3, 4, 10, 9))
        w = rng.standard_normal((8, 4 // groups, 3, 2))
        b = rng.standard_normal(8)
        ours = run_conv(x, w, b, stride=stride, padding=padding, dilation=dilation,
                        groups=groups)
        theirs = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                          stride=stride, padding=padding, dilation=dilation,
                          groups=groups).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
