"""Differential fuzzing (graphc.testing.fuzz): random graphs and their gradients on
every backend against float64 references — fuzzref, an evaluator written apart from
graphc's ops, for forward values; graphc's NumPy backend in float64, itself checked
by finite differences of fuzzref, for gradients.

Bounded: a fixed range of seeds (several recipes per compiled function) plus the
seeds of tests/fuzz_seeds.txt, past failures, replayed one by one.  The long run
(>= 10,000 graphs) is recorded in docs/testing.md.
"""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from graphc.testing import fuzz as F
from graphc.testing import fuzzgen, fuzzref

HAVE_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
BACKENDS = ("numpy", "llvm") + (("cuda-emu",) if HAVE_CXX else ())
REASONS = {   # reason keys of `open=` entries in fuzz_seeds.txt (none open now)
    "maxpool-pad": "max-pool gradient with windows in padding: issue 13 item 5",
    "computed-index": "computed index checks: issue 13 item 2",
}
SEEDS_FILE = Path(__file__).with_name("fuzz_seeds.txt")


def seed_list():
    """(seed, mode, {backend: reason}, comment) for each line of fuzz_seeds.txt."""
    out = []
    for line in SEEDS_FILE.read_text().splitlines():
        body, _, comment = line.partition("#")
        if not body.strip():
            continue
        m = re.fullmatch(r"\s*(\d+)\s+(value|oob)(?:\s+open=([\w,-]+):([\w-]+))?\s*", body)
        assert m, f"bad line in {SEEDS_FILE.name}: {line!r}"
        open_on = {b: REASONS[m[4]] for b in m[3].split(",")} if m[3] else {}
        out.append((int(m[1]), m[2], open_on, comment.strip()))
    return out


def replay_cases():
    cases = []
    for seed, mode, open_on, comment in seed_list():
        for be in BACKENDS:
            marks = [pytest.mark.xfail(strict=True, reason=open_on[be])] if be in open_on else []
            cases.append(pytest.param(seed, mode, be, marks=marks, id=f"{mode}-{seed}-{be}"))
    return cases


@pytest.mark.parametrize("seed,mode,backend", replay_cases())
def test_replay_past_failure(seed, mode, backend):
    recipe = F.generate(seed, out_of_range=(mode == "oob"))
    stats = F.check_batch([recipe], (backend,))
    assert not stats.mismatches, "\n".join([recipe.describe()] +
                                           [f.line() for f in stats.mismatches])
    if mode == "oob":
        assert stats.oob_checked >= 1
    else:
        assert stats.compared[backend] == len(recipe.outputs) + sum(
            k == "f" for _, _, k, _ in recipe.inputs)


def test_fixed_seeds_every_backend():
    # 48 recipes, 16 per compiled function (the CUDA emulator, whose C++ compiles are the
    # slowest, on the first 16 only)
    stats = F.run(range(48), BACKENDS, batch=16, emu_every=3)
    assert not stats.mismatches, "\n".join(f.line() for f in stats.mismatches)
    assert stats.graphs == 48 and stats.compiles == 6 + ("cuda-emu" in BACKENDS)
    for be in BACKENDS + ("numpy-f64",):
        assert stats.compared[be] >= 16, (be, stats.compared)
    assert stats.fd_checked >= 40     # the float64 gradients themselves, by differences


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_computed_indices_raise(backend):
    recipes = [F.generate(s, out_of_range=True) for s in (1, 2, 3)]
    stats = F.Stats()
    for r in recipes:
        assert r.expect_index_error and r.steps[-1][1] == "take"
        F.check_batch([r], (backend,), stats)
    assert stats.oob_checked >= 3
    assert not stats.mismatches, "\n".join(f.line() for f in stats.mismatches)


def test_builder_accepts_every_pool_pytorch_accepts():
    # the generator drops a step graphc refuses; for pools the reference (PyTorch's
    # output-size rule) gave a non-empty result, so a refusal is a missing case (found:
    # ceil_mode windows longer than the padded input, issue 13 'Smaller', fixed on main)
    refused = [(s, op, why) for s in range(300) for op, why in F.generate(s).rejected]
    assert not refused, refused[:5]


# ------------------------------------------------------------------ the fuzzer itself
def test_generation_is_deterministic_and_covers_the_ops():
    seen, attrs = set(), set()
    for s in range(200):
        a, b = F.generate(s), F.generate(s)
        assert a.describe() == b.describe()
        for (_, _, _, va), (_, _, _, vb) in zip(a.inputs, b.inputs):
            np.testing.assert_array_equal(va, vb)
        for _, op, _, at in a.steps:
            seen.add(op.split(":")[0])
            if op == "conv":
                attrs |= {("groups>1", at["groups"] > 1), ("stride>1", max(at["stride"]) > 1),
                          ("dilation>1", max(at["dilation"]) > 1),
                          ("asym pad", at["padding"][0][0] != at["padding"][0][1])}
            if op in ("max_pool", "avg_pool"):
                attrs.add(("ceil_mode", at["ceil_mode"]))
            if op == "slice":
                attrs.add(("neg step", any(isinstance(i, slice) and (i.step or 1) < 0
                                           for i in at["index"])))
    assert seen >= {"u", "b", "reduce", "softmax", "log_softmax", "matmul", "reshape",
                    "transpose", "slice", "pad", "concat", "broadcast_to", "conv", "max_pool",
                    "avg_pool", "gap", "argmax", "cast_idx", "imod", "take"}, seen
    for k in ("groups>1", "stride>1", "dilation>1", "asym pad", "ceil_mode", "neg step"):
        assert (k, True) in attrs and (k, False) in attrs, k


def test_violation_needs_both_tolerances():
    want = np.array([1000.0, 1e-6, 0.0, -np.inf])
    ok = want.copy()
    ok[0] *= 1 + 0.9 * F.RTOL
    ok[1] += 0.9 * F.ATOL * 1000      # absolute allowance scales with max |reference|
    assert F.violation(ok.astype(np.float32), want, F.RTOL, F.ATOL)[0] <= 1
    bad = want.copy()
    bad[2] = 2 * F.ATOL * 1000
    assert F.violation(bad, want, F.RTOL, F.ATOL)[0] > 1
    assert F.violation(np.array([1.0, np.nan]), np.array([1.0, 2.0]), F.RTOL, F.ATOL)[0] > 1
    assert F.violation(np.array([np.inf]), np.array([-np.inf]), F.RTOL, F.ATOL)[0] > 1
    assert F.violation(np.zeros(3), np.zeros(4), F.RTOL, F.ATOL)[0] > 1


def test_a_wrong_reference_is_caught(monkeypatch):
    # sabotage the independent reference of tanh by 1e-2: the fuzzer must report it on
    # the numpy backend (forward) and for graphc's float64 values
    seeds = [s for s in range(200) if any(op == "u:tanh" for _, op, _, _ in
                                          F.generate(s).steps)][:4]
    assert seeds
    monkeypatch.setitem(fuzzref.UNARY, "tanh", lambda x: np.tanh(x) + 1e-2)
    stats = F.check_batch([F.generate(s) for s in seeds], ("numpy",))
    found = {(f.seed, f.backend) for f in stats.mismatches}
    assert any(b == "numpy-f64" for _, b in found) and any(b == "numpy" for _, b in found)


def test_a_wrong_gradient_is_caught_by_finite_differences(monkeypatch):
    # scale the float64 gradients graphc reports: the directional finite difference of
    # fuzzref's loss disagrees (the gradient reference is not trusted blindly)
    recipe = F.generate(7)
    stats = F.Stats()
    good = F._fd_check(recipe, F._single64(recipe)(*F.feeds(recipe, "float64"))[
        len(recipe.outputs):], stats)
    assert good is None and stats.fd_checked == 1
    grads = F._single64(recipe)(*F.feeds(recipe, "float64"))[len(recipe.outputs):]
    bad = F._fd_check(recipe, [g * 1.01 for g in grads], stats)
    assert bad is not None and bad.what == "fd"


def test_cli_summary(capsys):
    assert F.main(["--graphs", "4", "--backends", "numpy", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert '"graphs": 4' in out and '"mismatches": []' in out
    with pytest.raises(SystemExit):
        F.main(["--backends", "tpu"])


def test_reference_pool_output_size_is_pytorchs():
    # PyTorch: the last ceil_mode window must start inside the input or its left padding
    assert fuzzref.pool_out(5, 2, 2, 0, 1, True) == 3
    assert fuzzref.pool_out(4, 2, 2, 1, 1, True) == 3
    assert fuzzref.pool_out(5, 3, 2, 1, 1, False) == 3
    assert fuzzref.pool_out(1, 2, 2, 0, 1, True) == 1          # overhang: k longer than H
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(fuzzref.avg_pool2d(x, (2, 2), (2, 2), (0, 0), True, True),
                                  [[[[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2]]]])
    np.testing.assert_array_equal(fuzzref.max_pool2d(x, (1, 2), (1, 2), (0, 1), (1, 1), False),
                                  [[[[0, 2], [3, 5]]]])


def test_minimizer_keeps_the_failing_step(monkeypatch):
    from graphc.testing import fuzzmin
    seed = next(s for s in range(200) if sum(1 for _, op, _, _ in F.generate(s).steps) >= 6
                and any(op == "u:tanh" for _, op, _, _ in F.generate(s).steps))
    monkeypatch.setitem(fuzzref.UNARY, "tanh", lambda x: np.tanh(x) + 1e-2)
    r = F.generate(seed)
    small = fuzzmin.minimize(r, "numpy")
    assert fuzzmin.fails(small, "numpy")
    assert [op for _, op, _, _ in small.steps] == ["u:tanh"], small.describe()
    assert len(small.outputs) == 1


def test_padding_windows_are_generated_and_can_be_set_apart():
    from graphc.testing import fuzzmin
    seeds = [s for s, _, _, _ in seed_list() if s == 5271]
    r = F.generate(seeds[0])
    assert any(np.isneginf(r.ref[o]).any() for o in r.outputs)
    rest = fuzzmin.without_padding_windows(r)
    assert rest is None or not any(np.isneginf(rest.ref[o]).any() for o in rest.outputs)


def test_indices_float32_rounding_could_flip_are_not_generated():
    ok = fuzzgen._index_well_conditioned
    # tanh(12.24) is 1 - 4e-11 in float64 and exactly 1.0 in float32: the cast differs
    assert not ok("cast_idx", np.array([np.tanh(12.24)]), {"k": 1.0})
    assert ok("cast_idx", np.array([0.5, 2.0, -3.0]), {"k": 1.0})
    assert not ok("cast_idx", np.array([0.5, 0.3333333]), {"k": 3.0})
    assert not ok("argmax", np.array([[1.0, 1.0 - 1e-9]]), {"axis": 1})
    assert ok("argmax", np.array([[1.0, 1.0], [0.5, 2.0]]), {"axis": 1})   # exact tie: first
    assert ok("argmax", np.array([[3.0, 1.0]]), {"axis": 0})
