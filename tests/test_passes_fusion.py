"""Fusion rules around reductions (docs/optimizer.md, "Fusion"): the groups the
optimizer forms, their count, and their values on the NumPy interpreter and the
LLVM backend against independent NumPy formulas.

Tolerances: float32 reductions of n terms within 2 n eps sum|terms| (plus a few
ulp for the elementwise ops around them); exact where nothing is reduced.
"""
import numpy as np
import pytest

import graphc as gc
from graphc.ir.graph import Graph
from graphc.kernel import lower_graph
from graphc.passes import count_kernels, optimize

RNG = np.random.default_rng(5)
EPS = np.finfo(np.float32).eps


def fused(g):
    return [(n.attrs["kind"], n.attrs["label"]) for n in g.nodes if n.op.name == "fused"]


def both_backends(ins, out, feeds):
    """(NumPy-interpreter result, LLVM result) of the optimized graph."""
    return (gc.compile(ins, out, backend="numpy")(*feeds),
            gc.compile(ins, out, backend="llvm")(*feeds))


def close(got, want, n_terms, scale):
    tol = (2 * n_terms + 8) * EPS * scale
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= tol), (got, want)


# ------------------------------------------------------------------ reduction epilogues
def test_bias_gradient_and_sgd_update_become_one_reduce_kernel():
    g = gc.input("g", (16, 12))
    b = gc.Parameter(RNG.standard_normal(12).astype(np.float32), name="b")
    bgrad = gc.reshape(gc.sum(g, axis=0, keepdims=True), (12,))   # what autodiff builds
    upd = b - 0.1 * bgrad
    og, rep = optimize(Graph([upd], [g]), 2)
    assert fused(og) == [("reduce", "sum+mul+sub")]
    assert count_kernels(og) == 1 and rep.kernels_before == 3     # sum, mul, sub (reshape is a view)
    assert rep.changed("simplify")            # reshape(sum keepdims) -> sum
    gv = RNG.standard_normal((16, 12)).astype(np.float32)
    want = b.value.astype(np.float64) - 0.1 * np.array(
        [sum(float(gv[i, j]) for i in range(16)) for j in range(12)])
    for got in both_backends([g], upd, [gv]):
        close(got, want, 16, 0.1 * np.abs(gv).sum(0) + np.abs(b.value))


@pytest.mark.parametrize("case", ["inner_reduced", "inner_kept", "keepdims", "big_total",
                                  "small_total"])
def test_reduction_epilogues_lower_to_one_kernel(case):
    x = gc.input("x", (9, 31))
    b = gc.input("b", (31,))
    c = gc.input("c", (9,))
    big = gc.input("big", (300, 300))
    xv = RNG.standard_normal((9, 31)).astype(np.float32)
    bv = RNG.standard_normal(31).astype(np.float32)
    cv = RNG.standard_normal(9).astype(np.float32)
    bigv = RNG.standard_normal((300, 300)).astype(np.float32)
    x64, b64, c64, big64 = (a.astype(np.float64) for a in (xv, bv, cv, bigv))
    if case == "inner_reduced":
        out = c - 0.5 * gc.sum(gc.square(x - b), axis=1)
        terms = (x64 - b64) ** 2
        want, n, scale = c64 - 0.5 * terms.sum(1), 31, 0.5 * terms.sum(1) + np.abs(c64)
        label = "sub+square+sum+mul+sub"
    elif case == "inner_kept":
        out = b * 2.0 - gc.mean(gc.abs(x) * 3.0, axis=0)
        terms = np.abs(x64) * 3
        want, n, scale = b64 * 2 - terms.sum(0) / 9, 9, terms.sum(0) / 9 + 2 * np.abs(b64)
        label = "mul+abs+mul+mean+sub"
    elif case == "keepdims":
        out = gc.tanh(gc.max(x * b, axis=1, keepdims=True)) + 1.0
        want, n, scale = np.tanh((x64 * b64).max(1, keepdims=True)) + 1, 1, 2.0
        label = "mul+max+tanh+add"
    elif case == "big_total":     # large full reductions run in chunks: the epilogue too
        out = gc.sqrt(gc.mean(gc.square(big)) + 1e-5)
        want, n, scale = np.sqrt((big64 ** 2).mean() + 1e-5), 90000, 1.0
        label = "square+mean+add+sqrt"
    else:
        out = gc.exp(gc.sum(x)) * 2.0
        want, n, scale = np.exp(x64.sum()) * 2, 279, np.exp(x64.sum()) * 2 * np.abs(x64).sum()
        label = "sum+exp+mul"
    ins = [x, b, c, big]
    og, _ = optimize(Graph([out], ins), 2)
    assert fused(og) == [("reduce", label)]
    assert len(lower_graph(og).kernels) == (2 if case == "big_total" else 1)
    for got in both_backends(ins, out, [xv, bv, cv, bigv]):
        close(got, want, n, scale)


def test_value_read_before_and_after_the_reduction_stays_materialized():
    x = gc.input("x", (6, 5))
    s = gc.input("s", ())
    k = gc.exp(s)                                    # one element: fusable on both sides
    out = gc.sum(x * k, axis=1) * k
    og, _ = optimize(Graph([out], [x, s]), 2)
    assert [n.op.name for n in og.nodes if n.inputs] == ["exp", "fused"]
    assert fused(og) == [("reduce", "mul+sum+mul")]
    xv = RNG.standard_normal((6, 5)).astype(np.float32)
    sv = np.float32(0.3)
    want = (xv.astype(np.float64) * np.exp(0.3)).sum(1) * np.exp(0.3)
    for got in both_backends([x, s], out, [xv, sv]):
        close(got, want, 5, np.exp(0.6) * np.abs(xv).sum(1))


def test_reduction_with_another_reader_is_not_an_epilogue():
    x = gc.input("x", (6, 5))
    r = gc.sum(x, axis=1)
    outs = [gc.relu(r), r * 2.0]                     # r read by two groups
    og, _ = optimize(Graph(outs, [x]), 2)
    assert sorted(n.op.name for n in og.nodes if n.inputs) == ["mul", "relu", "sum"]
    assert fused(og) == []


def test_reshape_of_keepdims_reduction_with_two_readers_is_kept():
    """Rewriting would compute the reduction twice (keepdims and not)."""
    x = gc.input("x", (4, 3))
    s = gc.sum(x, axis=0, keepdims=True)
    outs = [gc.reshape(s, (3,)), x - s]
    og, rep = optimize(Graph(outs, [x]), 1)
    assert [n.op.name for n in og.nodes if n.inputs].count("sum") == 1
    xv = RNG.standard_normal((4, 3)).astype(np.float32)
    col = np.array([sum(float(xv[i, j]) for i in range(4)) for j in range(3)])
    for got in (gc.compile([x], outs, backend=be)(xv) for be in ("numpy", "llvm")):
        close(got[0], col, 4, np.abs(xv).sum(0))
        close(got[1], xv - col, 4, np.abs(xv).sum(0) + np.abs(xv))


# ------------------------------------------------------------------ recomputed prologues
def test_reduction_recomputes_a_prologue_that_an_elementwise_group_also_reads():
    """sum(square(x - c), 0) reads x and c; x - c then fuses into 3 * (x - c)."""
    x = gc.input("x", (8, 6))
    c = gc.input("c", (6,))
    d = x - c
    outs = [gc.sum(gc.square(d), axis=0), d * 3.0]
    og, rep = optimize(Graph(outs, [x, c]), 2)
    assert fused(og) == [("reduce", "sub+square+sum"), ("elementwise", "sub+mul")]
    assert any("sum" in c_ and "recomputes 2 elementwise ops" in c_
               for c_ in rep.passes[-2].changes)
    assert rep.kernels_before == 4 and rep.kernels_after == 2
    xv = RNG.standard_normal((8, 6)).astype(np.float32)
    cv = RNG.standard_normal(6).astype(np.float32)
    dv = xv.astype(np.float64) - cv
    for be in ("numpy", "llvm"):
        got = gc.compile([x, c], outs, backend=be)(xv, cv)
        close(got[0], (dv ** 2).sum(0), 8, (dv ** 2).sum(0))
        np.testing.assert_allclose(got[1], dv * 3, rtol=4 * EPS)


# ------------------------------------------------------------------ row kernels
def test_layer_norm_is_one_row_kernel():
    """mean, variance and normalization: per row, two loops into scalars, one out."""
    x = gc.input("x", (8, 32))
    w = gc.Parameter(RNG.standard_normal(32).astype(np.float32), name="w")
    b = gc.Parameter(RNG.standard_normal(32).astype(np.float32), name="b")
    y = gc.layer_norm(x, 32, w, b)
    og, rep = optimize(Graph([y], [x]), 2)
    assert fused(og) == [("reduce", "mean+sub+square+mean+add+...(10 ops)")]
    assert rep.kernels_before == 10 and rep.kernels_after == 1
    assert [k.name for k in lower_graph(og).kernels] == ["fused_rows"]
    xv = (RNG.standard_normal((8, 32)) * 3 + 1).astype(np.float32)
    x64 = xv.astype(np.float64)
    mu = np.array([sum(row) / 32 for row in x64])[:, None]
    var = np.array([sum((v - m) ** 2 for v in row) / 32 for row, m in zip(x64, mu[:, 0])])
    want = (x64 - mu) / np.sqrt(var[:, None] + 1e-5) * w.value + b.value
    for got in both_backends([x], y, [xv]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(w.value).max())


def test_decomposed_softmax_is_one_row_kernel():
    x = gc.input("x", (6, 10))
    e = gc.exp(x - gc.max(x, axis=1, keepdims=True))
    y = e / gc.sum(e, axis=1, keepdims=True)
    og, rep = optimize(Graph([y], [x]), 2)
    assert fused(og) == [("reduce", "max+sub+exp+sum+div")]
    assert rep.kernels_before == 5 and rep.kernels_after == 1
    xv = (RNG.standard_normal((6, 10)) * 50).astype(np.float32)
    for got in both_backends([x], y, [xv]):
        np.testing.assert_allclose(got, _softmax_rows(xv), rtol=64 * EPS, atol=1e-7)


def test_row_kernel_over_two_trailing_axes():
    """Normalizing each (3, 4) slice of a (2, 3, 4) tensor (instance-norm-like)."""
    x = gc.input("x", (2, 3, 4))
    mu = gc.mean(x, axis=(1, 2), keepdims=True)
    rng_ = gc.max(gc.abs(x - mu), axis=(-2, -1), keepdims=True)
    y = (x - mu) / (rng_ + 1.0)
    og, rep = optimize(Graph([y], [x]), 2)
    assert [k for k, _ in fused(og)] == ["reduce"] and rep.kernels_after == 1
    xv = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    x64 = xv.astype(np.float64)
    want = np.empty_like(x64)
    for k in range(2):
        m = sum(x64[k].ravel()) / 12
        r = max(abs(v - m) for v in x64[k].ravel())
        want[k] = (x64[k] - m) / (r + 1)
    for got in both_backends([x], y, [xv]):
        np.testing.assert_allclose(got, want, rtol=64 * EPS, atol=64 * EPS)


def test_row_value_read_outside_is_not_merged():
    """The mean is also an output: it stays its own kernel (and so does the rest)."""
    x = gc.input("x", (5, 7))
    mu = gc.mean(x, axis=1, keepdims=True)
    y = gc.tanh(x - mu)
    og, rep = optimize(Graph([y, mu], [x]), 2)
    assert [n.op.name for n in og.nodes if n.inputs] == ["mean", "fused"]
    assert fused(og) == [("elementwise", "sub+tanh")]
    xv = RNG.standard_normal((5, 7)).astype(np.float32)
    m = np.array([sum(r) / 7 for r in xv.astype(np.float64)])[:, None]
    for be in ("numpy", "llvm"):
        gy, gm = gc.compile([x], [y, mu], backend=be)(xv)
        close(gm, m, 7, np.abs(xv).sum(1, keepdims=True) / 7)
        np.testing.assert_allclose(gy, np.tanh(xv - m), rtol=16 * EPS, atol=16 * EPS)


def test_prologue_read_by_a_matmul_is_not_recomputed():
    x = gc.input("x", (4, 5))
    w = gc.input("w", (5, 3))
    h = gc.tanh(x)
    outs = [gc.sum(h, axis=1), h @ w]
    og, rep = optimize(Graph(outs, [x, w]), 2)
    assert sorted(n.op.name for n in og.nodes if n.inputs) == ["matmul", "sum", "tanh"]
    assert not any("recomputes" in c for p in rep.passes for c in p.changes)


def test_recomputation_is_bounded_by_max_fusion():
    """A reduction recomputes at most max_fusion // 2 ops (here 3 > 1: none)."""
    x = gc.input("x", (4, 6))
    d = gc.tanh(gc.sigmoid(x))
    outs = [gc.sum(gc.square(d), axis=1), d * 2.0]
    g0 = Graph(outs, [x])
    og, rep = optimize(g0, 2, max_fusion=2)
    assert not any("recomputes" in c for p in rep.passes for c in p.changes)
    og, rep = optimize(g0, 2)
    assert any("recomputes 3" in c for p in rep.passes for c in p.changes)
    assert rep.kernels_after == 2
    xv = RNG.standard_normal((4, 6)).astype(np.float32)
    dv = np.tanh(1 / (1 + np.exp(-xv.astype(np.float64))))
    for got in (gc.compile([x], outs, backend=be)(xv) for be in ("numpy", "llvm")):
        close(got[0], (dv ** 2).sum(1), 6, (dv ** 2).sum(1))
        close(got[1], dv * 2, 0, 2 * np.abs(dv))


# ------------------------------------------------------------------ softmax-family rows
def _softmax_rows(z):
    z = z.astype(np.float64)
    out = np.empty_like(z)
    for k, row in enumerate(z):
        e = [np.exp(v - max(row)) for v in row]
        out[k] = [v / sum(e) for v in e]
    return out


def test_softmax_with_elementwise_epilogue_is_one_kernel():
    z = gc.input("z", (8, 10))
    t = gc.input("t", (8, 10))
    outs = {"softmax": gc.softmax(z, axis=1) * t - 1.0,
            "log_softmax": gc.log_softmax(z, axis=-1) * 2.0 + t}
    zv = (RNG.standard_normal((8, 10)) * 400).astype(np.float32)     # overflows naively
    tv = RNG.standard_normal((8, 10)).astype(np.float32)
    sm = _softmax_rows(zv)
    wants = {"softmax": sm * tv - 1.0,
             "log_softmax": np.array([[(v - max(r) - np.log(sum(np.exp(u - max(r)) for u in r)))
                                       for v in r] for r in zv.astype(np.float64)]) * 2.0 + tv}
    for name, out in outs.items():
        og, rep = optimize(Graph([out], [z, t]), 2)
        assert fused(og) == [("reduce", f"{name}+mul+{'sub' if name == 'softmax' else 'add'}")]
        assert [k.name for k in lower_graph(og).kernels] == [f"fused_{name}"]
        for got in both_backends([z, t], out, [zv, tv]):
            assert np.all(np.isfinite(got))
            if name == "softmax":
                np.testing.assert_allclose(got, wants[name], rtol=64 * EPS, atol=64 * EPS)
            else:   # log_softmax: ~eps relative to the row's logit range
                np.testing.assert_allclose(got, wants[name], rtol=64 * EPS, atol=2e3 * 8 * EPS)


def test_cross_entropy_gradient_fuses_softmax_and_the_onehot_difference():
    z = gc.input("z", (6, 5))
    y = gc.input("y", (6,), dtype="int64")
    loss = gc.cross_entropy(z, y)
    (dz,) = gc.grad(loss, [z])
    og, rep = optimize(Graph([loss, dz], [z, y]), 2)
    assert [k for k, _ in fused(og)] == ["reduce", "reduce"]
    labels = sorted(lbl for _, lbl in fused(og))
    assert labels[0].startswith("softmax+") and labels[1] == "softmax_cross_entropy+mean"
    assert rep.kernels_after == 2
    zv = (RNG.standard_normal((6, 5)) * 3).astype(np.float32)
    yv = RNG.integers(0, 5, 6)
    sm = _softmax_rows(zv)
    want_loss = np.mean([-np.log(sm[k, yv[k]]) for k in range(6)])
    want_dz = (sm - np.eye(5)[yv]) / 6
    for be in ("numpy", "llvm"):
        got_loss, got_dz = gc.compile([z, y], [loss, dz], backend=be)(zv, yv)
        close(got_loss, want_loss, 6, 2 * want_loss)
        np.testing.assert_allclose(got_dz, want_dz, rtol=64 * EPS, atol=64 * EPS)


@pytest.mark.parametrize("variant", ["mean", "weighted_sum", "smoothing", "ignore_index"])
def test_loss_reductions_of_softmax_cross_entropy(variant):
    z = gc.input("z", (7, 4))
    y = gc.input("y", (7,), dtype="int64")
    w = gc.input("w", (7,))
    zv = (RNG.standard_normal((7, 4)) * 600).astype(np.float32)     # exp overflows naively
    yv = RNG.integers(0, 4, 7)
    yv[2] = 3
    wv = RNG.random(7).astype(np.float32)
    z64 = zv.astype(np.float64)
    lse = np.array([max(r) + np.log(sum(np.exp(v - max(r)) for v in r)) for r in z64])
    nll = lse - z64[np.arange(7), yv]
    if variant == "mean":
        out, want, kernels = gc.cross_entropy(z, y), nll.mean(), ["fused_softmax_cross_entropy_mean"]
    elif variant == "weighted_sum":
        per = gc.cross_entropy(z, y, reduction="none")
        out = gc.sum(per * w) * 0.5 + 1.0
        want, kernels = (nll * wv).sum() * 0.5 + 1, ["fused_softmax_cross_entropy_sum"]
    elif variant == "smoothing":
        out = gc.cross_entropy(z, y, label_smoothing=0.2)
        smooth = lse - z64.mean(1)
        want, kernels = (0.8 * nll + 0.2 * smooth).mean(), ["fused_softmax_cross_entropy_mean"]
    else:      # mean over the samples whose label is not 3: two reductions, two kernels
        out = gc.cross_entropy(z, y, ignore_index=3)
        keep = yv != 3
        want = nll[keep].sum() / keep.sum()
        kernels = ["fused_softmax_cross_entropy_sum", "fused_sum_epilogue"]
    og, _ = optimize(Graph([out], [z, y, w]), 2)
    # (and the labels' range check, before the loss kernel)
    kernels = ["check_softmax_cross_entropy"] + kernels
    assert sorted(k.name for k in lower_graph(og).kernels) == sorted(kernels)
    for got in both_backends([z, y, w], out, [zv, yv, wv]):
        assert np.isfinite(got)
        close(got, want, 7 * 4, np.abs(nll).sum() + np.abs(lse).sum() + 1)


# ------------------------------------------------------------------ the CUDA backend
def test_new_fused_kernels_on_the_cuda_emulator():
    """The CUDA backend compiles the same kernels (through its CPU emulator)."""
    import shutil
    if not any(shutil.which(cc) for cc in ("g++", "clang++", "c++")):
        pytest.skip("the CUDA emulator needs a host C++ compiler")
    from graphc.backends import cuda as C
    x = gc.input("x", (9, 31))
    b = gc.input("b", (31,))
    lab = gc.input("lab", (9,), dtype="int64")
    w = gc.Parameter(RNG.standard_normal(31).astype(np.float32), name="w")
    outs = [b * 2.0 - gc.mean(gc.abs(x) * 3.0, axis=0),            # reduction epilogue
            gc.layer_norm(x, 31, w),                                   # row kernel
            gc.softmax(x) * b - 1.0,                                   # softmax rows
            gc.cross_entropy(x, lab)] + gc.grad(gc.cross_entropy(x, lab), [x])
    xv = RNG.standard_normal((9, 31)).astype(np.float32)
    bv = RNG.standard_normal(31).astype(np.float32)
    yv = RNG.integers(0, 31, 9)
    want = gc.compile([x, b, lab], outs, optimize=0)(xv, bv, yv)
    C.set_options(emulate=True)
    try:
        f = gc.compile([x, b, lab], outs, backend="cuda")
        got = f(xv, bv, yv)
    finally:
        C.set_options(emulate=None)
    assert len(fused(f.graph)) >= 5
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=32 * 31 * EPS, atol=32 * 31 * EPS)


def test_row_group_reduces_one_set_of_axes():
    """A reduction over other axes is not merged (it stays its own kernel)."""
    x = gc.input("x", (3, 4, 5))
    a = gc.mean(x, axis=2, keepdims=True)             # (3, 4, 1): the row group's axes
    c = gc.max(x, axis=(1, 2), keepdims=True)         # (3, 1, 1): other axes
    y = (x - a) * c
    og, rep = optimize(Graph([y], [x]), 2)
    assert sorted(n.op.name for n in og.nodes if n.inputs) == ["fused", "max"]
    assert fused(og) == [("reduce", "mean+sub+mul")]
    xv = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    x64 = xv.astype(np.float64)
    want = (x64 - x64.mean(2, keepdims=True)) * x64.max((1, 2), keepdims=True)
    for got in both_backends([x], y, [xv]):
        np.testing.assert_allclose(got, want, rtol=64 * EPS, atol=64 * EPS * 4)


def test_large_loss_reduction_stays_two_parallel_kernels():
    """Logits of more than 2**16 elements: the fused loss would run its rows serially."""
    for n, want in ((1024, ["fused"]), (1025, ["softmax_cross_entropy", "mean"])):
        z = gc.input("z", (n, 64))
        y = gc.input("y", (n,), dtype="int64")
        og, _ = optimize(Graph([gc.cross_entropy(z, y)], [z, y]), 2)
        assert [m.op.name for m in og.nodes if m.inputs] == want
