"""Differential fuzzer: random graphs and their gradients, every backend against a
float64 reference.

    python -m graphc.testing.fuzz --graphs 10000 --seed 0 --backends numpy,llvm,cuda-emu

For each seed, `fuzzgen.generate` makes a random well-typed recipe (elementwise ops,
broadcasting, reductions, matmul, reshape/transpose/slicing/pad/concat, softmax,
conv2d and pools with random stride/padding/dilation/groups/ceil_mode, take with
indices computed in the graph) together with its float64 value from `fuzzref`,
an evaluator written independently of graphc's ops.  The recipe is then built with
graphc in float32 and compiled on each backend, with the gradient of a random
projection of its outputs onto a scalar with respect to every float input.

What is compared, and against what:
  forward values, every backend (float32)   vs fuzzref in float64
  forward values, graphc's NumPy backend in float64  vs fuzzref (tight tolerance)
  gradients, every backend (float32)        vs graphc's NumPy backend in float64
  those float64 gradients                   vs central finite differences of fuzzref
                                              along a random direction (--fd)
A float32 mismatch counts only when the element's error exceeds both the absolute
tolerance (scaled by the output's largest reference magnitude) and the relative one.
A mismatch is re-checked by perturbing the inputs by one part in 10^6: when the
float64 reference itself moves by more than the tolerance, the case is ill-conditioned
(a near tie of a max, a cast close to an integer) and counted as such, not as a bug.

Several recipes share one compiled function (their outputs side by side), which
keeps native compiles few; a batch that fails to compile or run is split to find the
recipe at fault.  `--out-of-range` makes recipes whose last `take` gets computed
indices outside the table: every backend must raise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

import graphc as gc

from . import fuzzgen
from .fuzzgen import ref_step

RTOL, ATOL = 1e-3, 1e-4         # float32 outputs (ATOL scaled by max |reference|, >= 1)
RTOL64, ATOL64 = 1e-9, 1e-10    # graphc's float64 NumPy backend vs the float64 reference
FD_TOL = 1e-5                   # directional finite difference vs float64 gradient
BACKENDS = ("numpy", "llvm", "cuda-emu")


# ------------------------------------------------------------------ building with graphc
class GraphBuilder:
    """Builds recipe steps as graphc nodes of one float dtype."""

    def __init__(self, dtype="float32", prefix=""):
        self.dtype, self.prefix = dtype, prefix

    def input(self, vid, shape, kind):
        return gc.input(f"{self.prefix}v{vid}", tuple(shape),
                        dtype=self.dtype if kind == "f" else "int64")

    def step(self, op, a, at):
        fam, _, name = op.partition(":")
        if fam == "u":
            x = a[0]
            special = {"neg": lambda: -x, "leaky_relu": lambda: gc.leaky_relu(x, 0.1),
                       "gelu_tanh": lambda: gc.gelu(x, approximate="tanh"),
                       "sqrt_pos": lambda: gc.sqrt(gc.square(x) + 0.25),
                       "log_pos": lambda: gc.log(x * x + 0.5),
                       "recip_pos": lambda: gc.reciprocal(x * x + 1.0),
                       "scale": lambda: x * at.get("c", 1.0)}
            return special[name]() if name in special else getattr(gc, name)(x)
        if fam == "b":
            x, y = a
            return {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
                    "div_pos": lambda: x / (y * y + 0.5), "maximum": lambda: gc.maximum(x, y),
                    "minimum": lambda: gc.minimum(x, y),
                    "where_less": lambda: gc.where(gc.less(x, y), x, y * 2.0),
                    "pow_pos": lambda: (gc.abs(x) + 0.5) ** gc.tanh(y)}[name]()
        x = a[0]
        if op == "reduce":
            return getattr(gc, at["kind"])(x, axis=at["axis"], keepdims=at["keepdims"])
        if op in ("softmax", "log_softmax"):
            return getattr(gc, op)(x, axis=at["axis"])
        if op == "matmul":
            return gc.matmul(a[0], a[1])
        if op == "reshape":
            return gc.reshape(x, at["shape"])
        if op == "transpose":
            return gc.transpose(x, at["perm"])
        if op == "slice":
            return x[at["index"]]
        if op == "pad":
            return gc.pad(x, at["widths"], value=at["value"])
        if op == "concat":
            return gc.concat(a, axis=at["axis"])
        if op == "broadcast_to":
            return gc.broadcast_to(x, at["shape"])
        if op == "conv":
            return gc.conv2d(x, a[1], a[2] if len(a) > 2 else None, stride=at["stride"],
                             padding=at["padding"], dilation=at["dilation"],
                             groups=at["groups"])
        if op == "max_pool":
            return gc.max_pool2d(x, at["kernel"], stride=at["stride"], padding=at["padding"],
                                 dilation=at["dilation"], ceil_mode=at["ceil_mode"])
        if op == "avg_pool":
            return gc.avg_pool2d(x, at["kernel"], stride=at["stride"], padding=at["padding"],
                                 count_include_pad=at["count_include_pad"],
                                 ceil_mode=at["ceil_mode"])
        if op == "gap":
            return gc.global_avg_pool2d(x)
        if op == "argmax":
            return gc.argmax(x, axis=at["axis"])
        if op == "cast_idx":
            return gc.cast(gc.abs(x) * at["k"], "int64")
        if op == "imod":
            t = x * at["k"] + at["c"]
            return t - gc.div(t, at["n"]) * at["n"]
        if op == "ishift":
            return x + at["c"]
        if op == "take":
            return gc.take(x, a[1], axis=at["axis"])
        raise KeyError(op)


@dataclass
class Built:
    inputs: list          # graphc input nodes, in recipe order
    outputs: list         # forward outputs
    grads: list           # d(loss)/d(float input), in recipe order of float inputs


def build(recipe, dtype="float32", prefix="", grads=True) -> Built:
    b = GraphBuilder(dtype, prefix)
    nodes = {vid: b.input(vid, shape, kind) for vid, shape, kind, _ in recipe.inputs}
    for vid, op, args, attrs in recipe.steps:
        nodes[vid] = b.step(op, [nodes[x] for x in args], attrs)
    outs = [nodes[o] for o in recipe.outputs]
    ins = [nodes[vid] for vid, *_ in recipe.inputs]
    gs = []
    if grads and not recipe.expect_index_error:
        loss = None
        for o, p in zip(outs, recipe.proj):
            term = gc.sum(o * gc.constant(p.astype(dtype)))
            loss = term if loss is None else loss + term
        wrt = [nodes[vid] for vid, _, kind, _ in recipe.inputs if kind == "f"]
        gs = list(gc.grad(loss, wrt))
    return Built(ins, outs, gs)


def feeds(recipe, dtype="float32"):
    return [v.astype(dtype) if kind == "f" else v for _, _, kind, v in recipe.inputs]


# ------------------------------------------------------------------ reference helpers
def eval_ref(recipe, feed64):
    """Forward outputs of the recipe from fuzzref, for given float64 input values."""
    vals = {vid: v for (vid, *_), v in zip(recipe.inputs, feed64)}
    with np.errstate(all="ignore"):
        for vid, op, args, attrs in recipe.steps:
            vals[vid] = ref_step(op, [vals[a] for a in args], attrs)
    return [vals[o] for o in recipe.outputs]


def ref_loss(recipe, feed64):
    with np.errstate(invalid="ignore"):     # -inf outputs make the loss NaN: no FD then
        return float(sum(np.sum(o * p.astype(np.float64))
                         for o, p in zip(eval_ref(recipe, feed64), recipe.proj)))


def violation(got, want, rtol, atol):
    """Largest err / allowed over the elements (> 1 means a mismatch), with its index."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return np.inf, f"shape {got.shape} != reference {want.shape}"
    if got.size == 0:
        return 0.0, None
    g = got.astype(np.float64)
    same_inf = np.isinf(want) & (g == want)      # a max-pool window wholly in padding
    bad = ~(np.isfinite(g) | same_inf) | (np.isinf(want) & ~same_inf)
    if bad.any():
        k = tuple(int(i) for i in np.argwhere(bad)[0])
        return np.inf, f"at {k}: got {g[k]!r}, reference {want[k]!r}"
    g, want = np.where(same_inf, 0.0, g), np.where(same_inf, 0.0, want)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = np.abs(g - want)
    # both tolerances must be exceeded: the ratio to the larger allowance
    ratio = err / np.maximum(atol * scale, rtol * np.abs(want))
    k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return float(ratio[k]), (f"at {tuple(int(i) for i in k)}: got {g[k]!r}, "
                             f"reference {want[k]!r}")


@dataclass
class Finding:
    seed: int
    backend: str
    what: str            # "output k", "grad k", "error", "fd", "no error"
    detail: str
    ill_conditioned: bool = False

    def line(self):
        tag = "ill-conditioned" if self.ill_conditioned else "MISMATCH"
        return f"[{tag}] seed {self.seed} {self.backend} {self.what}: {self.detail}"


@dataclass
class Stats:
    graphs: int = 0
    compiles: int = 0
    compared: Counter = field(default_factory=Counter)   # backend -> values compared
    findings: list = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)   # (op, reason) refused by builder
    fd_checked: int = 0
    fd_skipped_kink: int = 0
    oob_checked: int = 0

    @property
    def mismatches(self):
        return [f for f in self.findings if not f.ill_conditioned]


# ------------------------------------------------------------------ running one batch
def _compile(inputs, outputs, backend):
    if backend == "cuda-emu":
        from graphc.backends import cuda as C
        C.set_options(emulate=True)
        try:
            f = gc.compile(inputs, outputs, backend="cuda")
        except BaseException:
            C.set_options(emulate=None)
            raise
        def run(*a):
            C.set_options(emulate=True)
            try:
                return f(*a)
            finally:
                C.set_options(emulate=None)
        C.set_options(emulate=None)
        return run
    return gc.compile(inputs, outputs, backend=backend)


def _perturbed(recipe, trial):
    rng = np.random.default_rng([recipe.seed, trial])
    out = []
    for _, _, kind, v in recipe.inputs:
        v = v.astype(np.float64) if kind == "f" else v
        if kind == "f":
            v = v * (1 + 1e-6 * rng.standard_normal(v.shape)) + 1e-7 * rng.standard_normal(v.shape)
        out.append(v)
    return out


def _forward_unstable(recipe, k):
    base = recipe.ref[recipe.outputs[k]]
    for t in range(2):
        moved = eval_ref(recipe, _perturbed(recipe, t))[k]
        if violation(moved, base, RTOL / 2, ATOL / 2)[0] > 1:
            return True
    return False


def _grad_unstable(recipe, k, f64, base):
    for t in range(2):
        moved = f64(*_perturbed(recipe, t))[len(recipe.outputs) + k]
        if violation(moved, base, RTOL / 2, ATOL / 2)[0] > 1:
            return True
    return False


def _single64(recipe):
    b = build(recipe, "float64")
    return gc.compile(b.inputs, b.outputs + b.grads, backend="numpy")


def _fd_check(recipe, grads64, stats):
    """Directional central difference of fuzzref's loss vs the float64 gradient."""
    rng = np.random.default_rng([recipe.seed, 99])
    x0 = feeds(recipe, "float64")
    fl = [i for i, (_, _, kind, _) in enumerate(recipe.inputs) if kind == "f"]
    d = {i: rng.standard_normal(x0[i].shape) for i in fl}
    h = 1e-6

    def at(s):
        return ref_loss(recipe, [x + s * d[i] if i in d else x for i, x in enumerate(x0)])
    l0 = at(0.0)
    if not np.isfinite(l0):      # an output holds -inf (a max-pool window in padding)
        return None
    lp, lm = at(h), at(-h)
    mag = sum(float(np.sum(np.abs(g) * np.abs(d[i]))) for i, g in zip(fl, grads64)) + 1e-3
    if abs((lp - l0) - (l0 - lm)) / h > 1e-3 * mag:      # a kink inside [-h, h]
        stats.fd_skipped_kink += 1
        return None
    fd = (lp - lm) / (2 * h)
    an = sum(float(np.sum(g * d[i])) for i, g in zip(fl, grads64))
    stats.fd_checked += 1
    if abs(fd - an) > FD_TOL * mag + 1e-6 * abs(fd):
        return Finding(recipe.seed, "numpy-f64", "fd",
                       f"directional derivative {an!r}, finite difference {fd!r} "
                       f"(scale {mag:.3g})")
    return None


def check_batch(recipes, backends=BACKENDS, stats=None, fd=True):
    """Compile the recipes together on each backend and compare; returns Stats."""
    stats = stats or Stats()
    stats.graphs += len(recipes)
    oob = [r for r in recipes if r.expect_index_error]
    val = [r for r in recipes if not r.expect_index_error]
    for r in oob:
        _check_oob(r, backends, stats)
    if not val:
        return stats
    # float64 gradients from graphc's NumPy backend (one graph for the batch)
    try:
        b64 = [build(r, "float64", f"g{j}_") for j, r in enumerate(val)]
        f64 = gc.compile([i for b in b64 for i in b.inputs],
                         [o for b in b64 for o in b.outputs + b.grads], backend="numpy")
        res64 = f64(*[v for r in val for v in feeds(r, "float64")])
    except Exception as e:
        if len(val) > 1:        # find the recipe at fault
            stats.graphs -= len(val)
            for r in val:
                check_batch([r], backends, stats, fd)
        else:
            stats.findings.append(_error(val[0].seed, "numpy-f64", e))
        return stats
    per64, pos = [], 0
    for r, b in zip(val, b64):
        n = len(b.outputs) + len(b.grads)
        per64.append(res64[pos:pos + n])
        pos += n
    for r, out in zip(val, per64):
        for k, o in enumerate(r.outputs):
            v, where = violation(out[k], r.ref[o], RTOL64, ATOL64)
            stats.compared["numpy-f64"] += 1
            if v > 1:
                stats.findings.append(Finding(r.seed, "numpy-f64", f"output {k}",
                                              f"{where} (x{v:.3g} the float64 tolerance)",
                                              _forward_unstable(r, k)))
        if fd:
            f = _fd_check(r, out[len(r.outputs):], stats)
            if f is not None:
                stats.findings.append(f)
    b32 = [build(r, "float32", f"g{j}_") for j, r in enumerate(val)]
    ins = [i for b in b32 for i in b.inputs]
    outs = [o for b in b32 for o in b.outputs + b.grads]
    args = [v for r in val for v in feeds(r)]
    for be in backends:
        try:
            got = _compile(ins, outs, be)(*args)
            stats.compiles += 1
        except Exception as e:
            if len(val) == 1:
                stats.findings.append(_error(val[0].seed, be, e))
            else:
                for r in val:       # find the recipe at fault
                    check_one_backend(r, be, stats)
            continue
        pos = 0
        for r, b, ref64 in zip(val, b32, per64):
            n = len(b.outputs) + len(b.grads)
            _compare(r, be, got[pos:pos + n], ref64, stats)
            pos += n
    return stats


def _error(seed, be, e):
    return Finding(seed, be, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                   if str(e) else type(e).__name__)


def check_one_backend(r, be, stats):
    b = build(r, "float32")
    try:
        got = _compile(b.inputs, b.outputs + b.grads, be)(*feeds(r))
        stats.compiles += 1
    except Exception as e:
        stats.findings.append(_error(r.seed, be, e))
        return
    _compare(r, be, got, _single64(r)(*feeds(r, "float64")), stats)


def _compare(r, be, got, ref64, stats):
    nout = len(r.outputs)
    f64 = None
    for k in range(len(got)):
        want = r.ref[r.outputs[k]] if k < nout else ref64[k]
        v, where = violation(got[k], want, RTOL, ATOL)
        stats.compared[be] += 1
        if v <= 1:
            continue
        what = f"output {k}" if k < nout else f"grad {k - nout}"
        if k < nout:
            unstable = _forward_unstable(r, k)
        else:
            f64 = f64 or _single64(r)
            unstable = _grad_unstable(r, k - nout, f64, ref64[k])
        stats.findings.append(Finding(r.seed, be, what, f"{where} (x{v:.3g} the tolerance)",
                                      unstable))


def _check_oob(r, backends, stats):
    """Every backend must raise an index error for the out-of-range computed index."""
    for be in ("numpy",) + tuple(b for b in backends if b != "numpy"):
        b = build(r, "float32", grads=False)
        stats.oob_checked += 1
        try:
            out = _compile(b.inputs, b.outputs, be)(*feeds(r))
        except (IndexError, gc.GraphcError) as e:
            if "index" not in str(e).lower() and "range" not in str(e).lower():
                stats.findings.append(Finding(r.seed, be, "error",
                                              f"raised, but not an index error: {e}"))
            continue
        stats.findings.append(Finding(r.seed, be, "no error",
                                      f"out-of-range computed index did not raise "
                                      f"(returned shape {out[0].shape})"))


# ------------------------------------------------------------------ driving many seeds
def run(seeds, backends=BACKENDS, batch=8, fd=True, out_of_range_every=0,
        emu_every=1, time_limit=None, log=None):
    """Check every seed; returns Stats.  `emu_every`: run cuda-emu on one batch in that
    many (its C++ compiles are the slowest); `out_of_range_every`: one seed in that many
    is an out-of-range recipe instead."""
    stats = Stats()
    t0 = last = time.monotonic()
    seeds = list(seeds)
    for n, start in enumerate(range(0, len(seeds), batch)):
        if time_limit is not None and time.monotonic() - t0 > time_limit:
            break
        chunk = seeds[start:start + batch]
        recipes = []
        for s in chunk:
            oob = bool(out_of_range_every) and s % out_of_range_every == 0
            try:
                r = generate(s, out_of_range=oob)
            except AssertionError as e:     # graphc's shape differs from the reference's
                stats.findings.append(Finding(s, "builder", "shape", str(e)))
                continue
            recipes.append(r)
            for op, why in r.rejected:
                stats.rejected[(op, why)] += 1
        bes = [b for b in backends if b != "cuda-emu" or n % emu_every == 0]
        before = len(stats.findings)
        check_batch(recipes, bes, stats, fd=fd)
        if log is not None:
            for f in stats.findings[before:]:
                print(f.line(), file=log, flush=True)
            if time.monotonic() - last > 60:
                last = time.monotonic()
                print(f"{stats.graphs} graphs, {len(stats.mismatches)} mismatches, "
                      f"{time.monotonic() - t0:.0f} s", file=log, flush=True)
    stats.seconds = time.monotonic() - t0
    return stats


def generate(seed, out_of_range=False):
    return fuzzgen.generate(seed, builder=GraphBuilder("float32", "chk_"),
                            out_of_range=out_of_range)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m graphc.testing.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--backends", default="numpy,llvm,cuda-emu")
    p.add_argument("--batch", type=int, default=8, help="recipes per compiled function")
    p.add_argument("--emu-every", type=int, default=4,
                   help="run cuda-emu on one batch in this many")
    p.add_argument("--out-of-range-every", type=int, default=50)
    p.add_argument("--no-fd", action="store_true")
    p.add_argument("--time-limit", type=float, default=None, help="seconds")
    p.add_argument("--json", default=None, help="write a summary here")
    p.add_argument("--replay", type=int, default=None, metavar="SEED",
                   help="check one seed alone, print its recipe and what differs")
    p.add_argument("--minimize", action="store_true",
                   help="with --replay: shrink a failing recipe to a minimal one")
    p.add_argument("--triage", default=None, metavar="SUMMARY.json",
                   help="re-check the mismatching seeds of a --json summary with their "
                        "max-pool windows in padding set apart, and minimize the rest")
    a = p.parse_args(argv)
    backends = tuple(b for b in a.backends.split(",") if b)
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if a.replay is not None:
        return _replay(a.replay, backends, a.minimize)
    if a.triage is not None:
        return _triage(a.triage)
    st = run(range(a.seed, a.seed + a.graphs), backends, a.batch, not a.no_fd,
             a.out_of_range_every, a.emu_every, a.time_limit, log=sys.stdout)
    summary = {"graphs": st.graphs, "first_seed": a.seed, "backends": list(backends),
               "batch": a.batch, "emu_every": a.emu_every, "compiles": st.compiles,
               "values_compared": dict(st.compared), "fd_checked": st.fd_checked,
               "fd_skipped_kink": st.fd_skipped_kink, "out_of_range_checked": st.oob_checked,
               "mismatches": [f.line() for f in st.mismatches],
               "ill_conditioned": [f.line() for f in st.findings if f.ill_conditioned],
               "rejected_by_builder": {f"{op}: {why}": n for (op, why), n in
                                       st.rejected.most_common()},
               "seconds": round(st.seconds, 1)}
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 1 if st.mismatches else 0


def _triage(path):
    """Sort a run's mismatches: those that vanish once the outputs holding max-pool
    windows wholly in padding are dropped (issue 13 item 5), oob (computed indices not
    checked, item 2), and the rest (minimized and printed)."""
    import re
    from .fuzzmin import minimize as shrink, without_padding_windows
    with open(path) as fh:
        lines = json.load(fh)["mismatches"]
    by_seed = {}
    for ln in lines:
        m = re.match(r"\[MISMATCH\] seed (\d+) (\S+) (.*)", ln)
        by_seed.setdefault(int(m[1]), []).append((m[2], m[3]))
    groups = Counter()
    for seed, found in sorted(by_seed.items()):
        if all(what.startswith("no error") for _, what in found):
            groups["out-of-range computed index not raised"] += 1
            continue
        bes = tuple(sorted({b for b, _ in found} & set(BACKENDS)))
        r = generate(seed)
        rest = without_padding_windows(r)
        left = [] if rest is None else check_batch([rest], bes).mismatches
        if len(rest.outputs if rest else []) < len(r.outputs) and not left:
            groups["max-pool window wholly in padding"] += 1
            continue
        groups["other"] += 1
        print(f"seed {seed}: {found}")
        for be in bes:
            print(shrink(r, be).describe())
    print(json.dumps(dict(groups), indent=1))
    return 1 if groups.get("other") else 0


def _replay(seed, backends, minimize):
    from .fuzzmin import minimize as shrink
    r = generate(seed)
    print(r.describe())
    st = check_batch([r], backends)
    for f in st.findings:
        print(f.line())
    if minimize:
        for be in sorted({f.backend for f in st.mismatches} - {"numpy-f64"}):
            small = shrink(r, be)
            print(f"minimized for {be}:")
            print(small.describe())
            for f in check_batch([small], (be,), fd=False).findings:
                print(f.line())
    return 1 if st.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
