"""graphc.distributed pieces that run in one process (no MPI needed).

The real multi-rank jobs are in test_distributed_mpi.py.  Here: sharding
against graphc.data's batches, bucket planning and packing, the data-parallel
step on one rank against optimizer.compile_step (same update rule, same
state), the structure check with a fake two-rank communicator, launcher
detection and the error paths.
"""
import sys
from collections import OrderedDict

import numpy as np
import pytest

import graphc as gc
from graphc import data, nn, optim
from graphc import distributed as dist
from graphc.distributed import env as dist_env


def small_mlp(seed, dtype="float64", dropout=0.0, batchnorm=False):
    rng = np.random.default_rng(seed)
    layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(64, 12, dtype=dtype, rng=rng))]
    if batchnorm:
        layers.append(("bn", nn.BatchNorm1d(12, dtype=dtype)))
    layers.append(("act", nn.Tanh()))
    if dropout:
        layers.append(("drop", nn.Dropout(dropout, rng=rng)))
    layers.append(("fc2", nn.Linear(12, 10, dtype=dtype, rng=rng)))
    return nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def digits():
    X, Y = data.load_digits("train")
    return X[:200].astype(np.float64), Y[:200]


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize("n, size", [(10, 3), (7, 7), (2, 4), (0, 2), (32, 2)])
def test_shard_bounds_cover_disjointly_and_balance(n, size):
    owner = [-1] * n
    lens = []
    for r in range(size):
        lo, hi = dist.shard_bounds(n, r, size)
        lens.append(hi - lo)
        for i in range(lo, hi):
            assert owner[i] == -1
            owner[i] = r
    assert -1 not in owner
    assert owner == sorted(owner)                 # contiguous, in rank order
    assert max(lens) - min(lens) <= 1


def test_shard_batches_split_each_global_batch_of_the_single_process_order():
    n, size, B = 23, 3, 10
    X = np.arange(n * 2).reshape(n, 2) * 1.5
    Y = np.arange(n) + 100
    for epoch in range(2):
        single = list(data.batches((X, Y), B, seed=7, epoch=epoch))
        per_rank = [list(dist.shard_batches((X, Y), B, seed=7, epoch=epoch, rank=r, size=size))
                    for r in range(size)]
        assert all(len(p) == len(single) == 3 for p in per_rank)   # same number of steps
        for b, (xb, yb) in enumerate(single):
            pieces = [per_rank[r][b] for r in range(size)]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), xb)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), yb)
        # last global batch has 3 samples: one each
        assert [len(per_rank[r][2][1]) for r in range(size)] == [1, 1, 1]
        seen = np.concatenate([p[1] for r in range(size) for p in per_rank[r]])
        assert sorted(seen.tolist()) == list(range(100, 100 + n))   # each sample once
    e0 = np.concatenate([p[1] for p in dist.shard_batches((X, Y), B, seed=7, epoch=0,
                                                          rank=0, size=size)])
    e1 = np.concatenate([p[1] for p in dist.shard_batches((X, Y), B, seed=7, epoch=1,
                                                          rank=0, size=size)])
    assert e0.tolist() != e1.tolist()            # reshuffled per epoch


def test_shard_batches_short_last_batch_leaves_some_ranks_empty():
    X = np.arange(9.0)[:, None]
    pieces = [list(dist.shard_batches((X,), 4, shuffle=False, rank=r, size=4)) for r in range(4)]
    assert [len(p) for p in pieces] == [3, 3, 3, 3]
    assert [len(p[2][0]) for p in pieces] == [1, 0, 0, 0]
    assert pieces[0][2][0].tolist() == [[8.0]]
    assert pieces[3][1][0].tolist() == [[7.0]]


def test_distributed_loader_is_a_reiterable_epoch_source():
    X = np.arange(20.0)[:, None]
    dl = dist.DistributedLoader((X,), 6, seed=3)
    assert (dl.rank, dl.size, len(dl)) == (0, 1, 4)
    a = [b[0].ravel().tolist() for b in dl]
    b = [b[0].ravel().tolist() for b in dl]
    assert a != b and sorted(sum(a, [])) == sorted(sum(b, [])) == list(range(20))
    dl.set_epoch(0)
    assert [x[0].ravel().tolist() for x in dl] == a
    assert len(dist.DistributedLoader((X,), 6, drop_last=True)) == 3
    with pytest.raises(ValueError, match="same leading length"):
        dist.DistributedLoader((X, np.zeros(3)), 4)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        next(dist.shard_batches((X,), 4, rank=2, size=2))


# ------------------------------------------------------------------ buckets
def test_buckets_reverse_order_byte_cap_and_dtype_split():
    specs = [((3, 4), "float32"), ((4,), "float32"), ((100,), "float32"), ((5,), "float64"),
             ((2, 2), "float32")]
    b = dist.GradientBuckets(specs, dist.LocalComm(), bucket_bytes=420)
    # Filled in reverse parameter order: 4 (f32, 16 B); 3 is f64 -> new bucket; 2 (f32,
    # 400 B) -> new bucket; 1 (16 B) still fits (416 <= 420); 0 (48 B) does not -> new.
    members = [[m[0] for m in bk.members] for bk in b.buckets]
    assert members == [[4], [3], [2, 1], [0]]
    assert [bk.dtype for bk in b.buckets] == [np.float32, np.float64, np.float32, np.float32]
    assert b.buckets[-1].meta == 2                # count and loss ride in the last bucket
    assert b.nbytes == 4 * (12 + 4 + 100 + 4 + 2) + 8 * 5
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(d) for s, d in specs]
    views, total, loss_sum = b.reduce(grads, 3, 0.5)
    assert (total, loss_sum) == (3.0, 1.5)
    for g, v in zip(grads, views):
        assert v.shape == g.shape and v.dtype == g.dtype
        np.testing.assert_array_equal(v, g * g.dtype.type(3))
    views, total, loss_sum = b.reduce(None, 0, 0.0)     # a rank without samples
    assert total == 0 and all(not v.any() for v in views)


def test_buckets_half_precision_gets_a_float64_meta_bucket():
    b = dist.GradientBuckets([((3,), "float16")], dist.LocalComm())
    assert [bk.dtype for bk in b.buckets] == [np.float16, np.float64]
    views, total, loss_sum = b.reduce([np.ones(3, np.float16)], 1000, 2.25)
    assert (total, loss_sum) == (1000.0, 2250.0)
    with pytest.raises(ValueError, match="bucket_bytes"):
        dist.GradientBuckets([((3,), "float32")], dist.LocalComm(), bucket_bytes=0)


# ------------------------------------------------------------------ the step on one rank
def _states(model, opt):
    return {**{f"m.{k}": v.copy() for k, v in model.state_dict().items()},
            **{f"o.{k}": np.array(v).copy() for k, v in opt.state_dict().items()}}


def _train(make_opt, digits, use_dist, batch_sizes=(16, 16, 7, 16), extra=False, **mkw):
    X, Y = digits
    model = small_mlp(0, **mkw)
    opt = make_opt(model.parameters())
    x = gc.input("x", (None, 1, 8, 8), dtype="float64")
    y = gc.input("y", (None,), dtype="int64")

    def loss_fn(xb, yb):
        logits = model(xb)
        loss = gc.cross_entropy(logits, yb)
        return (loss, logits) if extra else loss
    if use_dist == "wrap":
        step = dist.DistributedStep.from_train_step(opt.compile_step(loss_fn, x, y),
                                                    bucket_bytes=500)
    elif use_dist:
        step = dist.DistributedStep(opt, loss_fn, x, y, bucket_bytes=500)
    else:
        step = opt.compile_step(loss_fn, x, y)
    outs, start = [], 0
    for b in batch_sizes:
        outs.append(step(X[start:start + b], Y[start:start + b]))
        start += b
    return _states(model, opt), outs


@pytest.mark.parametrize("make_opt", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
    lambda ps: optim.Adam(ps, lr=0.01, amsgrad=True),
    lambda ps: optim.AdamW(ps, lr=0.01),
], ids=["sgd-momentum", "sgd-nesterov-wd", "adam-amsgrad", "adamw"])
@pytest.mark.parametrize("how", [True, "wrap"], ids=["DistributedStep", "from_train_step"])
def test_one_rank_step_equals_compile_step(digits, make_opt, how):
    ref, ref_losses = _train(make_opt, digits, False)
    got, losses = _train(make_opt, digits, how)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-13, atol=1e-15, err_msg=k)
    assert int(got["o.step"]) == 4
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-14)
    assert all(isinstance(v, np.float64) for v in losses)


def test_step_returns_local_extras_and_runs_model_state_updates(digits):
    make = lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    ref, ref_outs = _train(make, digits, False, extra=True, dropout=0.3, batchnorm=True)
    got, outs = _train(make, digits, True, extra=True, dropout=0.3, batchnorm=True)
    for k in ref:       # dropout key advanced, batch-norm running statistics updated
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-13, atol=1e-15, err_msg=k)
    assert int(got["m.drop.key"]) == int(ref["m.drop.key"])
    for (l1, e1), (l2, e2) in zip(outs, ref_outs):
        assert l1 == pytest.approx(l2, rel=1e-14)
        np.testing.assert_allclose(e1, e2, rtol=1e-13, atol=1e-15)


def test_step_bookkeeping_and_errors(digits):
    X, Y = digits
    model = small_mlp(1, dtype="float32")
    opt = optim.SGD(model.parameters(), lr=0.1)
    x = gc.input("x", (None, 1, 8, 8))
    y = gc.input("y", (None,), dtype="int64")
    step = dist.DistributedStep(opt, lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    n_params = sum(p.value.size for p in model.parameters())
    assert step.bytes_per_step == 4 * (n_params + 2)
    assert step.buckets.num_buckets == 1 and "rank 0 of 1" in repr(step)
    loss = step(X[:8].astype(np.float32), Y[:8])
    assert isinstance(loss, np.float32) and step.steps == 1
    with pytest.raises(dist.DistributedError, match="no rank had any samples"):
        step(X[:0].astype(np.float32), Y[:0])
    with pytest.raises(ValueError, match="expects shape"):   # one rank: a plain error
        step(X[:4, :, :4].astype(np.float32), Y[:4])
    with pytest.raises(TypeError, match="pass the graph inputs"):
        dist.DistributedStep(opt, lambda: None)
    other = gc.Parameter(np.ones(3, np.float32), name="other")
    with pytest.raises(ValueError, match="depends on none"):
        dist.DistributedStep(optim.SGD([other], lr=0.1),
                             lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    with pytest.raises(ValueError, match="float scalar"):
        dist.DistributedStep(opt, lambda xb, yb: model(xb), x, y)


# ------------------------------------------------------------------ consistency across ranks
class FakeComm:
    """Rank 0 of 2, where rank 1 reports `other` in allgather."""

    def __init__(self, other):
        self.other = other
        self.calls = 0

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, obj):
        self.calls += 1
        return [obj, self.other[self.calls - 1]]


def test_structure_check_names_the_first_difference():
    ma, mb = small_mlp(0), small_mlp(0, dtype="float32")
    for m, d in ((ma, "float64"), (mb, "float32")):
        m(gc.input("x", (None, 1, 8, 8), dtype=d))     # (the first call names parameters)
    a, b = ma.parameters(), mb.parameters()
    h, desc = dist.structure_signature(a)
    assert desc[0] == "0: fc1.weight (12, 64) float64"
    hb, descb = dist.structure_signature(b)
    assert dist.check_structure(a, FakeComm([h])) == h
    with pytest.raises(dist.DistributedError,
                       match=r"ranks \[1\] disagree.*rank 0 has \[0: fc1.weight \(12, 64\) "
                             r"float64\], rank 1 has \[0: fc1.weight \(12, 64\) float32\]"):
        dist.check_structure(a, FakeComm([hb, descb]))
    hc, descc = dist.structure_signature(a[:2])
    with pytest.raises(dist.DistributedError, match="rank 0 has 4 entries, rank 1 has 2"):
        dist.check_structure(a, FakeComm([hc, descc]))
    # hyperparameters count too (a different momentum would diverge silently)
    hs, descs = dist.structure_signature(a, extra=["SGD(momentum=0.8)"])
    with pytest.raises(dist.DistributedError, match=r"rank 0 has \[SGD\(momentum=0.9\)\], "
                                                    r"rank 1 has \[SGD\(momentum=0.8\)\]"):
        dist.check_structure(a, FakeComm([hs, descs]), extra=["SGD(momentum=0.9)"])


# ------------------------------------------------------------------ environment
def test_launcher_detection(monkeypatch):
    for var in dist_env._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert dist.launched_size() == 1 and not dist.is_distributed()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert dist.launched_size() == 4 and dist.is_distributed()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert not dist.is_distributed()


def test_launched_without_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dist_env, "_world", None)
    monkeypatch.setenv("PMI_SIZE", "3")
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # import mpi4py -> ImportError
    with pytest.raises(dist.DistributedError, match="3 ranks, but mpi4py is not installed.*"
                                                    r"graphc\[mpi\]"):
        dist.get_comm()


def test_single_process_helpers_are_identities(tmp_path, capsys):
    assert not dist.is_distributed()
    step = object()
    assert dist.maybe_wrap(step) is step
    X = np.zeros((4, 2))
    assert dist.maybe_shard([X], 2)[0] is X
    assert dist.allreduce_mean(3.0, weight=2) == 3.0
    assert dist.reduce_metrics({"a": 1.5, "b": -2}) == {"a": 1.5, "b": -2.0}
    np.testing.assert_array_equal(dist.allreduce_sum([1, 2]), [1.0, 2.0])
    model = small_mlp(0)
    path = dist.save_checkpoint(model, tmp_path / "m.npz")
    assert path == str(tmp_path / "m.npz")
    np.testing.assert_array_equal(np.load(path)["fc2.bias"], model.fc2.bias.value)
    X, Y = data.load_digits("test")
    from graphc.train import evaluate
    assert dist.evaluate(model, (X[:50], Y[:50])) == evaluate(model, (X[:50], Y[:50]))
    with pytest.raises(ZeroDivisionError):    # one rank: nothing to abort, the error stays
        with dist.guard():
            1 / 0
    with pytest.raises(RuntimeError, match="boom"):
        dist.abort("step failed", exc=RuntimeError("boom"))
    assert "rank 0 of 1: step failed" in capsys.readouterr().err


def test_docs_example_runs_as_one_rank(tmp_path, monkeypatch, capsys):
    """docs/distributed.md's Python block runs (one rank, no launcher) and says so."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "distributed.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.M | re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/distributed.md", "exec"), {})
    out = capsys.readouterr().out
    assert "epoch 2: loss" in out and (tmp_path / "mlp.npz").exists()


def test_scaling_model_of_the_benchmark():
    from graphc.distributed import bench
    # 2·ceil(log2 n)·α + 2(n-1)/n·bytes/β, written out for n = 8 and n = 5
    assert bench.allreduce_model_s(1e6, 8, 1e-5, 1e9) == pytest.approx(6e-5 + 1.75e-3)
    assert bench.allreduce_model_s(1e6, 5, 1e-5, 1e9) == pytest.approx(6e-5 + 1.6e-3)
    assert bench.allreduce_model_s(1e6, 1, 1e-5, 1e9) == 0.0
    alpha, beta = bench.fit_alpha_beta({m: 3e-6 + m / 2e9 for m in (8, 1024, 65536, 1 << 20)})
    assert alpha == pytest.approx(3e-6, rel=1e-6) and beta == pytest.approx(2e9, rel=1e-6)
    summary = {"median_s": {"compute": 2e-3, "update": 1e-3}, "batch_per_rank": 32,
               "allreduce_payload_bytes": 250_000}
    table = bench.projection(summary, ranks=(4,), links=(("test link", 1e-5, 1e9),))
    # allreduce = 4·10 µs + 1.5·250 kB / 1 GB/s = 0.415 ms; step 3.415 ms
    assert "| test link (10 µs, 1 GB/s) | 4 | 0.41 | 3.42 | 37,482 | 88% |" in table
