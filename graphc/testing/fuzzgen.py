"""Random well-typed graphs for the differential fuzzer, as replayable recipes.

A recipe is a list of steps (op, argument value ids, attributes) over a few
inputs, generated from one integer seed.  The generator evaluates every step with
the independent float64 reference (fuzzref) as it goes, so it knows each value's
shape and can keep values finite and moderate; it also builds each step with graphc
so a step graphc's builder refuses is dropped (and counted, with the reason: a
refusal of something PyTorch accepts is a finding too).

Shapes are small and awkward on purpose (1, 2, 3, 5, 7).  Indices for `take` are
computed inside the graph (argmax, a cast of a float value), brought into range
with an in-graph floor modulo; `out_of_range=True` instead shifts them out of range,
which every backend must refuse at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import fuzzref as R

DIMS = [1, 2, 3, 4, 5, 7]
MAX_SIZE = 512          # elements in any value
MAX_ABS = 1e3           # values beyond this are dropped (float32 headroom for gradients)
UNARY = [k for k in R.UNARY if k != "scale"]
OPS = {  # op family -> weight
    "unary": 14, "binary": 14, "reduce": 7, "softmax": 4, "matmul": 6, "reshape": 5,
    "transpose": 4, "slice": 6, "pad": 3, "concat": 3, "broadcast_to": 2, "conv": 8,
    "max_pool": 6, "avg_pool": 5, "gap": 1, "take": 8,
}


@dataclass
class Recipe:
    seed: int
    inputs: list = field(default_factory=list)    # (vid, shape, kind 'f'|'i', value)
    steps: list = field(default_factory=list)     # (vid, op, arg vids, attrs)
    outputs: list = field(default_factory=list)   # vids (float)
    proj: list = field(default_factory=list)      # float32 arrays, one per output
    ref: dict = field(default_factory=dict)       # vid -> float64/int64 reference value
    rejected: list = field(default_factory=list)  # (op, reason) refused by graphc's builder
    expect_index_error: bool = False

    def describe(self) -> str:
        lines = [f"recipe seed={self.seed}"]
        for vid, shape, kind, _ in self.inputs:
            lines.append(f"  v{vid} = input{shape} {'float' if kind == 'f' else 'int64'}")
        for vid, op, args, attrs in self.steps:
            a = ", ".join(f"v{x}" for x in args)
            lines.append(f"  v{vid} = {op}({a}{', ' if attrs else ''}"
                         f"{', '.join(f'{k}={v!r}' for k, v in attrs.items())})"
                         f"  -> {self.ref[vid].shape}")
        lines.append(f"  outputs {['v%d' % o for o in self.outputs]}")
        return "\n".join(lines)


# ------------------------------------------------------------------ reference of one step
def ref_step(op, vals, attrs):
    """The float64 value of one step from its arguments' float64 values."""
    fam, _, name = op.partition(":")
    if fam == "u":
        return R.UNARY[name](vals[0], **attrs)
    if fam == "b":
        return R.BINARY[name](vals[0], vals[1])
    if op == "reduce":
        return R.reduce(attrs["kind"], vals[0], attrs["axis"], attrs["keepdims"])
    if op == "softmax":
        return R.softmax(vals[0], attrs["axis"])
    if op == "log_softmax":
        return R.log_softmax(vals[0], attrs["axis"])
    if op == "matmul":
        return np.matmul(vals[0], vals[1])
    if op == "reshape":
        return vals[0].reshape(attrs["shape"])
    if op == "transpose":
        return np.transpose(vals[0], attrs["perm"])
    if op == "slice":
        return vals[0][attrs["index"]]
    if op == "pad":
        return np.pad(vals[0], attrs["widths"], constant_values=attrs["value"])
    if op == "concat":
        return np.concatenate(vals, axis=attrs["axis"])
    if op == "broadcast_to":
        return np.broadcast_to(vals[0], attrs["shape"]).copy()
    if op == "conv":
        b = vals[2] if len(vals) > 2 else None
        return R.conv2d(vals[0], vals[1], b, attrs["stride"], attrs["padding"],
                        attrs["dilation"], attrs["groups"])
    if op == "max_pool":
        return R.max_pool2d(vals[0], attrs["kernel"], attrs["stride"], attrs["padding"],
                            attrs["dilation"], attrs["ceil_mode"])
    if op == "avg_pool":
        return R.avg_pool2d(vals[0], attrs["kernel"], attrs["stride"], attrs["padding"],
                            attrs["count_include_pad"], attrs["ceil_mode"])
    if op == "gap":
        return vals[0].mean(axis=(2, 3), keepdims=True)
    if op == "argmax":
        return np.argmax(vals[0], axis=attrs["axis"]).astype(np.int64)
    if op == "cast_idx":
        return (np.abs(vals[0]) * attrs["k"]).astype(np.int64)
    if op == "imod":
        return R.floor_mod(vals[0] * attrs["k"] + attrs["c"], attrs["n"])
    if op == "ishift":
        return vals[0] + attrs["c"]
    if op == "take":
        # an out-of-range take (expected to raise on every backend) has no value to
        # compare; clipping only gives it a shape
        mode = "clip" if attrs.get("expect_error") else "raise"
        return np.take(vals[0], vals[1], axis=attrs["axis"], mode=mode)
    raise KeyError(op)


# ------------------------------------------------------------------ the generator
class _Gen:
    def __init__(self, seed, out_of_range=False, build=None):
        self.rng = np.random.default_rng(seed)
        self.r = Recipe(seed=seed, expect_index_error=out_of_range)
        self.kind = {}
        self.next_vid = 0
        self.build = build      # callable(op, arg nodes, attrs) -> node; raises if refused
        self.nodes = {}
        self.terminal = set()     # values that may be outputs but feed no step

    # values
    def _vid(self):
        self.next_vid += 1
        return self.next_vid - 1

    def input(self, shape, kind="f", value=None):
        vid = self._vid()
        if value is None:
            value = self.rng.standard_normal(shape).astype(np.float32)
        self.r.inputs.append((vid, tuple(shape), kind, value))
        self.r.ref[vid] = value.astype(np.float64 if kind == "f" else np.int64)
        self.kind[vid] = kind
        if self.build is not None:
            self.nodes[vid] = self.build.input(vid, shape, kind)
        return vid

    def step(self, op, args, attrs=None, kind="f"):
        """Evaluate and append a step; None (and nothing appended) when refused."""
        attrs = attrs or {}
        try:
            with np.errstate(all="ignore"):
                v = ref_step(op, [self.r.ref[a] for a in args], attrs)
        except (ValueError, IndexError):
            return None
        if v.size == 0 or v.size > MAX_SIZE:
            return None
        if op in ("argmax", "cast_idx") and not _index_well_conditioned(
                op, self.r.ref[args[0]], attrs):
            return None
        terminal = False
        if kind == "f" and not (np.all(np.isfinite(v)) and np.max(np.abs(v)) <= MAX_ABS):
            # a max-pool window lying wholly in padding is -inf (PyTorch's value); such a
            # value may be an output (its gradient must still be right) but feeds no step
            finite = v[np.isfinite(v)]
            if not (op == "max_pool" and np.all(np.isfinite(v) | (v == -np.inf))
                    and (finite.size == 0 or np.max(np.abs(finite)) <= MAX_ABS)):
                return None
            terminal = True
        if self.build is not None:
            try:
                node = self.build.step(op, [self.nodes[a] for a in args], attrs)
            except (ValueError, TypeError, IndexError) as e:     # GraphBuildError included
                self.r.rejected.append((op, str(e).splitlines()[0][:160]))
                return None
            if tuple(node.shape) != v.shape:
                raise AssertionError(f"seed {self.r.seed}: {op} {attrs}: graphc shape "
                                     f"{node.shape}, reference {v.shape}")
        vid = self._vid()
        self.r.steps.append((vid, op, list(args), attrs))
        self.r.ref[vid] = v
        self.kind[vid] = kind
        if terminal:
            self.terminal.add(vid)
        if self.build is not None:
            self.nodes[vid] = node
        return vid

    def floats(self):
        return [v for v, k in self.kind.items() if k == "f" and v not in self.terminal]

    def pick(self, pred=lambda s: True):
        c = [v for v in self.floats() if pred(self.r.ref[v].shape)]
        if not c:
            return None
        # biased towards recent values so that chains grow deep
        k = int(min(self.rng.geometric(0.35), len(c)))
        return c[-k]

    def shape(self, vid):
        return self.r.ref[vid].shape

    def rand_shape(self, rank=None):
        rank = int(self.rng.integers(1, 5)) if rank is None else rank
        while True:
            s = tuple(int(self.rng.choice(DIMS)) for _ in range(rank))
            if int(np.prod(s)) <= 120:
                return s

    # families
    def f_unary(self):
        a = self.pick()
        name = str(self.rng.choice(UNARY + ["scale"]))
        if name == "exp" and np.max(self.r.ref[a]) > 4:
            name = "tanh"
        attrs = {"c": float(self.rng.choice([-2.0, 0.5, 3.0]))} if name == "scale" else {}
        return self.step("u:" + name, [a], attrs)

    def f_binary(self):
        a = self.pick()
        sa = self.shape(a)
        u = self.rng.random()
        if u < 0.35:
            b = self.pick(lambda s: _bcast_ok(s, sa))
        elif u < 0.85:
            b = self.input(self._bcast_partner(sa))
        else:
            axes = tuple(i for i in range(len(sa)) if self.rng.random() < 0.5)
            b = self.step("reduce", [a], {"kind": str(self.rng.choice(["sum", "max", "mean"])),
                                          "axis": axes or None, "keepdims": True})
        if b is None:
            return None
        args = [a, b] if self.rng.random() < 0.5 else [b, a]
        return self.step("b:" + str(self.rng.choice(list(R.BINARY))), args)

    def _bcast_partner(self, sa):
        s = [1 if self.rng.random() < 0.3 else d for d in sa]
        drop = int(self.rng.integers(0, len(s) + 1)) if self.rng.random() < 0.4 else 0
        s = s[drop:]
        if self.rng.random() < 0.2 and len(s) < 4:
            s = [int(self.rng.choice(DIMS[:4]))] + s
        return tuple(s)

    def _axis_subset(self, nd):
        if nd == 0 or self.rng.random() < 0.2:
            return None
        axes = [i for i in range(nd) if self.rng.random() < 0.5] or [int(self.rng.integers(nd))]
        return tuple(a - nd if self.rng.random() < 0.3 else a for a in axes)

    def f_reduce(self):
        a = self.pick()
        kind = str(self.rng.choice(["sum", "mean", "max", "min", "var", "logsumexp"]))
        return self.step("reduce", [a], {"kind": kind, "axis": self._axis_subset(len(self.shape(a))),
                                         "keepdims": bool(self.rng.random() < 0.4)})

    def f_softmax(self):
        a = self.pick(lambda s: len(s) >= 1)
        if a is None:
            return None
        nd = len(self.shape(a))
        op = "softmax" if self.rng.random() < 0.6 else "log_softmax"
        return self.step(op, [a], {"axis": int(self.rng.integers(-nd, nd))})

    def f_matmul(self):
        a = self.pick(lambda s: len(s) >= 2)
        if a is None:
            a = self.input(self.rand_shape(int(self.rng.integers(2, 4))))
        sa = self.shape(a)
        k, n = sa[-1], int(self.rng.choice(DIMS))
        u = self.rng.random()
        if u < 0.3:
            b = self.pick(lambda s: len(s) >= 2 and s[-2] == k and _bcast_ok(s[:-2], sa[:-2]))
        else:
            b = None
        if b is None:
            batch = sa[:-2] if u < 0.6 else tuple(1 if self.rng.random() < 0.5 else d
                                                  for d in sa[:-2])[len(sa[:-2]) // 2:]
            b = self.input(batch + (k, n))
        return self.step("matmul", [a, b] if self.rng.random() < 0.8 else [a, b])

    def f_reshape(self):
        a = self.pick()
        size = int(np.prod(self.shape(a)))
        f = _factors(size)
        self.rng.shuffle(f)
        rank = int(self.rng.integers(1, 5))
        dims = [1] * rank
        for p in f:
            dims[int(self.rng.integers(rank))] *= p
        return self.step("reshape", [a], {"shape": tuple(dims)})

    def f_transpose(self):
        a = self.pick(lambda s: len(s) >= 2)
        if a is None:
            return None
        return self.step("transpose", [a], {"perm": tuple(int(p) for p in
                                                          self.rng.permutation(len(self.shape(a))))})

    def f_slice(self):
        a = self.pick(lambda s: len(s) >= 1)
        if a is None:
            return None
        index = []
        for d in self.shape(a):
            u = self.rng.random()
            if u < 0.3:
                index.append(slice(None))
            elif u < 0.4 and d > 1:
                index.append(int(self.rng.integers(-d, d)))
            else:
                step = int(self.rng.choice([1, 1, 2, 3, -1, -2]))
                lo = lambda: None if self.rng.random() < 0.3 else int(self.rng.integers(-d - 1, d + 2))
                index.append(slice(lo(), lo(), step))
            if self.rng.random() < 0.08:
                index.append(None)
        return self.step("slice", [a], {"index": tuple(index)})

    def f_pad(self):
        a = self.pick(lambda s: 1 <= len(s) <= 4)
        if a is None:
            return None
        widths = tuple((int(self.rng.integers(0, 3)), int(self.rng.integers(0, 3)))
                       for _ in self.shape(a))
        return self.step("pad", [a], {"widths": widths,
                                      "value": float(self.rng.choice([0.0, 1.5]))})

    def f_concat(self):
        a = self.pick(lambda s: len(s) >= 1)
        if a is None:
            return None
        sa = self.shape(a)
        ax = int(self.rng.integers(len(sa)))
        other = tuple(int(self.rng.choice(DIMS[:4])) if i == ax else d for i, d in enumerate(sa))
        b = self.pick(lambda s: s == other) if self.rng.random() < 0.4 else None
        b = self.input(other) if b is None else b
        args = [a, b] if self.rng.random() < 0.5 else [b, a, b]
        return self.step("concat", args, {"axis": ax - len(sa) if self.rng.random() < 0.3 else ax})

    def f_broadcast_to(self):
        a = self.pick(lambda s: len(s) < 4)
        if a is None:
            return None
        sa = self.shape(a)
        target = tuple(int(self.rng.choice(DIMS[:4])) if d == 1 else d for d in sa)
        if self.rng.random() < 0.6:
            target = (int(self.rng.choice(DIMS[:4])),) + target
        return self.step("broadcast_to", [a], {"shape": target})

    def _image(self):
        x = self.pick(lambda s: len(s) == 4)
        if x is None or self.rng.random() < 0.3:
            x = self.input((int(self.rng.integers(1, 3)), int(self.rng.choice([1, 2, 3, 4, 6])),
                            int(self.rng.integers(1, 9)), int(self.rng.integers(1, 9))))
        return x

    def f_conv(self):
        x = self._image()
        n, c, h, w = self.shape(x)
        groups = int(self.rng.choice([g for g in (1, 2, 3, 4, 6) if c % g == 0]))
        co = groups * int(self.rng.integers(1, 4))
        kh, kw = int(self.rng.integers(1, 4)), int(self.rng.integers(1, 4))
        wt = self.input((co, c // groups, kh, kw))
        args = [x, wt] + ([self.input((co,))] if self.rng.random() < 0.5 else [])
        if self.rng.random() < 0.5:
            p = int(self.rng.integers(0, 3)), int(self.rng.integers(0, 3))
            padding = ((p[0], p[0]), (p[1], p[1]))
        else:
            padding = tuple((int(self.rng.integers(0, 3)), int(self.rng.integers(0, 3)))
                            for _ in range(2))
        attrs = {"stride": (int(self.rng.integers(1, 4)), int(self.rng.integers(1, 4))),
                 "padding": padding,
                 "dilation": (int(self.rng.integers(1, 3)), int(self.rng.integers(1, 3))),
                 "groups": groups}
        return self.step("conv", args, attrs)

    def _pool_attrs(self, dilation):
        k = (int(self.rng.integers(1, 4)), int(self.rng.integers(1, 4)))
        a = {"kernel": k,
             "stride": (int(self.rng.integers(1, 4)), int(self.rng.integers(1, 4))),
             "padding": (int(self.rng.integers(0, k[0] // 2 + 1)),
                         int(self.rng.integers(0, k[1] // 2 + 1))),
             "ceil_mode": bool(self.rng.random() < 0.5)}
        if dilation:
            a["dilation"] = (int(self.rng.integers(1, 3)), int(self.rng.integers(1, 3)))
        return a

    def f_max_pool(self):
        return self.step("max_pool", [self._image()], self._pool_attrs(True))

    def f_avg_pool(self):
        a = self._pool_attrs(False)
        a["count_include_pad"] = bool(self.rng.random() < 0.5)
        return self.step("avg_pool", [self._image()], a)

    def f_gap(self):
        return self.step("gap", [self._image()])

    def index(self, n):
        """An int64 value computed in the graph, in [0, n) (or out of it when asked)."""
        src = self.pick(lambda s: 1 <= len(s) and int(np.prod(s)) <= 60)
        if src is None:
            src = self.input(self.rand_shape(int(self.rng.integers(1, 3))))
        if self.rng.random() < 0.6:
            nd = len(self.shape(src))
            raw = self.step("argmax", [src], {"axis": int(self.rng.integers(-nd, nd))}, kind="i")
        else:
            raw = self.step("cast_idx", [src], {"k": float(self.rng.choice([1.0, 3.0]))}, kind="i")
        if raw is None:
            return None
        if self.rng.random() < 0.3 and int(self.r.ref[raw].max()) < n \
                and not self.r.expect_index_error:
            return raw
        idx = self.step("imod", [raw], {"k": int(self.rng.integers(1, 4)),
                                        "c": int(self.rng.integers(0, 5)), "n": n}, kind="i")
        if self.r.expect_index_error and idx is not None:
            # every entry out of range: [n, 2n+2) above or [-n-3, 0) below (no wrapping)
            c = int(self.rng.choice([n, n + 2, -n, -n - 3]))
            idx = self.step("ishift", [idx], {"c": c}, kind="i")
        return idx

    def f_take(self, expect_error=False):
        if self.r.expect_index_error and not expect_error:
            return None     # only the last take (the one expected to raise) is out of range
        t = self.pick(lambda s: len(s) >= 1) if self.rng.random() < 0.6 else None
        if t is None:
            t = self.input((int(self.rng.choice(DIMS[1:])), int(self.rng.choice(DIMS))))
        nd = len(self.shape(t))
        ax = int(self.rng.integers(-nd, nd))
        idx = self.index(self.shape(t)[ax])
        if idx is None:
            return None
        attrs = {"axis": ax}
        if expect_error:
            attrs["expect_error"] = True
        return self.step("take", [t, idx], attrs)


INDEX_MARGIN = 1e-4      # relative distance below which float32 rounding may flip an index


def _index_well_conditioned(op, x, attrs):
    """False when float32 rounding of x could change the integer computed from it: a
    value x*k this close to an integer (tanh(12) is 1 - 8e-11 in float64 but 1.0 in
    float32), or a maximum this close to the runner-up without being equal to it.
    Perturbing the inputs does not reveal these (a saturated function hides them)."""
    if op == "cast_idx":
        y = np.abs(x) * attrs["k"]
        frac = np.abs(y - np.round(y))
        return bool(np.all((frac == 0) | (frac > INDEX_MARGIN * np.maximum(1.0, y))))
    top2 = -np.sort(-x, axis=attrs["axis"])
    first = np.take(top2, 0, axis=attrs["axis"])
    second = np.take(top2, 1, axis=attrs["axis"]) if x.shape[attrs["axis"]] > 1 else None
    if second is None:
        return True
    gap = first - second
    return bool(np.all((gap == 0) | (gap > INDEX_MARGIN * np.maximum(1.0, np.abs(first)))))


def _bcast_ok(s, t):
    try:
        r = np.broadcast_shapes(tuple(s), tuple(t))
    except ValueError:
        return False
    return int(np.prod(r)) <= MAX_SIZE


def _factors(n):
    f, p = [], 2
    while n > 1:
        while n % p == 0:
            f.append(p)
            n //= p
        p += 1
    return f


def generate(seed: int, builder=None, out_of_range: bool = False) -> Recipe:
    """The recipe for `seed`.  `builder` (a fuzz.GraphBuilder) checks each step with
    graphc's builder as it is generated; without it, steps are not checked."""
    g = _Gen(seed, out_of_range, builder)
    rng = g.rng
    for _ in range(int(rng.integers(1, 3))):
        g.input(g.rand_shape())
    fams, w = list(OPS), np.array(list(OPS.values()), float)
    n_steps = int(rng.integers(3, 10))
    done = 0
    for _ in range(n_steps * 4):
        if done >= n_steps:
            break
        fam = str(rng.choice(fams, p=w / w.sum()))
        if getattr(g, "f_" + fam)() is not None:
            done += 1
    if out_of_range:
        for _ in range(50):
            t = g.f_take(expect_error=True)
            if t is not None:
                g.r.outputs, g.r.proj = [t], [np.ones(g.r.ref[t].shape, np.float32)]
                return g.r
        raise RuntimeError(f"seed {seed}: no out-of-range take could be generated")
    steps = [s[0] for s in g.r.steps if g.kind[s[0]] == "f"]
    terminal = [s for s in steps if s in g.terminal]
    steps = [s for s in steps if s not in g.terminal] + terminal   # a terminal is output
    if not steps:
        steps = [g.step("u:tanh", [g.floats()[0]])]
    outs = [steps[-1]]
    for _ in range(int(rng.integers(0, 3))):
        o = steps[int(rng.integers(len(steps)))]
        if o not in outs:
            outs.append(o)
    g.r.outputs = outs
    g.r.proj = [rng.standard_normal(g.r.ref[o].shape).astype(np.float32) for o in outs]
    return g.r
