"""`gc.compile`: from symbolic inputs/outputs/updates to a callable on arrays.

The Function validates what it is fed (names, shapes, dtypes, consistent
symbolic sizes), specializes a graph with symbolic dims on the concrete sizes
of each call (cached per shape), runs the optimizer, hands the graph to a
backend, and writes parameter updates after every output has been computed.
"""
from __future__ import annotations

import threading
from bisect import bisect_left

import numpy as np

from . import input_cast
from .ir.errors import GraphBuildError
from .ir.graph import Graph, toposort
from .ir.node import Node, TensorType, user_location
from .ir.shapes import is_symbolic, shape_str, substitute
from .ops.base import as_node
from .tensor import Parameter

__all__ = ["compile", "Function", "specialize"]


def specialize(outputs, bindings: dict, inputs=()):
    """Rebuild the graph with symbols replaced by sizes; re-runs every type rule.

    Returns (new outputs, {old input id: new input node}).  Parameters and
    constants are shared, not copied.
    """
    memo: dict = {}
    for n in toposort(list(outputs) + list(inputs)):
        if n.op.name == "input":
            t = TensorType(n.dtype, substitute(n.shape, bindings))
            m = Node(n.op, (), {}, t, name=n.name, loc=n.loc)
        elif not n.inputs:
            m = n
        else:
            ins = [memo[i.id] for i in n.inputs]
            attrs = dict(n.attrs)
            for a in n.op.shape_attrs:
                attrs[a] = substitute(attrs[a], bindings)
            for a, v in attrs.items():
                if isinstance(v, Graph):  # an inner graph (loop body) specializes too
                    outs_, imap = specialize(v.outputs, bindings, v.inputs)
                    attrs[a] = Graph(outs_, [imap[i.id] for i in v.inputs])
            try:
                t = n.op.infer([i.type for i in ins], **attrs)
            except (TypeError, ValueError) as e:
                raise GraphBuildError(f"{n.op.name}: {e} (with {bindings})\n  at {n.loc}") from None
            concretize = getattr(n.op, "concretize", None)  # e.g. sum_to -> plain sums
            m = concretize(ins, attrs) if concretize else None
            if m is None:
                m = Node(n.op, ins, attrs, t, name=n.name, loc=n.loc)
        m.scope, m.role = n.scope, n.role
        memo[n.id] = m
    return [memo[o.id] for o in outputs], {i.id: memo[i.id] for i in inputs}


class Function:
    """A compiled computation.  Call it with arrays (positionally or by name).

    Thread safety: a Function may be called from several threads at once, on
    every backend.
    - Compiling for a new set of input sizes happens once, under the Function's
      lock; other threads wait for it rather than compiling the same graph again.
    - A Function with `updates` runs each call (read the parameters, compute,
      write the new values) under its lock: calls are serialized, none sees
      another's half-written parameters and no update is lost (two threads each
      taking 1,000 steps of `p += 1` leave p = 2,000).
    - A Function without updates runs calls concurrently on the NumPy backend
      (NumPy releases the GIL in its kernels).  The LLVM and CUDA backends own
      one arena per compiled shape, so calls of one shape are serialized there;
      the LLVM backend's worker threads also serve one multi-threaded call at a
      time for the whole process.
    - Separate Functions that share Parameters are not synchronized with each
      other: a function that reads parameters while another thread's training
      step writes them may see some old and some new values.  Serialize such
      calls yourself (one lock around both), as you would for a PyTorch model.
    """

    def __init__(self, inputs, outputs, updates=None, backend="numpy", optimize=2, name=None):
        from .backends import get_backend
        loc = user_location()
        self.single = isinstance(outputs, Node)
        self.outputs = [outputs] if self.single else list(outputs)
        self.inputs = [inputs] if isinstance(inputs, Node) else list(inputs)
        self.backend_name = backend
        self.backend = get_backend(backend)
        self.optimize = optimize
        self.name = name or "function"
        self.updates = self._check_updates(updates, loc)
        self._check_inputs(loc)
        self._cache: dict = {}
        # Serializes compiles and, for a function with updates, whole calls (see above).
        self._lock = threading.RLock()
        self._last_sig = None     # ((dtype, shape) per input, executable) of the last call
        self._cast_warned: set = set()   # inputs already warned about a lossy cast
        self.reports: list = []
        # Parameters a result may alias (an output that is a parameter or a view
        # of one): such results are copied before updates write in place.
        self._state = [n for n in toposort(self.outputs + [v for _, v in self.updates])
                       if isinstance(n, Parameter)]

    # ------------------------------------------------------------ validation at build
    def _check_updates(self, updates, loc):
        if updates is None:
            return []
        pairs = list(updates.items()) if isinstance(updates, dict) else list(updates)
        seen = set()
        out = []
        for p, v in pairs:
            if not isinstance(p, Parameter):
                raise TypeError(f"compile: updates keys must be Parameters, got {p!r} (at {loc})")
            if p.id in seen:
                raise ValueError(f"compile: parameter {p.label()} is updated twice (at {loc})")
            seen.add(p.id)
            if not isinstance(v, Node):
                v = as_node(v, p.dtype)
            if tuple(v.shape) != tuple(p.shape) and not is_symbolic(v.shape):
                raise ValueError(f"compile: update of {p.label()} has shape "
                                 f"{shape_str(v.shape)}, the parameter {shape_str(p.shape)} "
                                 f"(at {loc})")
            out.append((p, v))
        return out

    def _check_inputs(self, loc):
        names = set()
        for i in self.inputs:
            if not isinstance(i, Node) or i.op.name != "input":
                raise TypeError(f"compile: inputs must be gc.input(...) tensors, got {i!r} (at {loc})")
            if i.name in names:
                raise ValueError(f"compile: two inputs are named {i.name!r} (at {loc})")
            names.add(i.name)
        declared = {i.id for i in self.inputs}
        for n in toposort(self.outputs + [v for _, v in self.updates]):
            if n.op.name == "input" and n.id not in declared:
                raise ValueError(f"compile: the outputs depend on input {n.name!r}, which is not "
                                 f"in the inputs list (at {loc})")

    # ------------------------------------------------------------ calling
    def _bind(self, args, kwargs):
        if len(args) > len(self.inputs):
            raise TypeError(f"{self.name}: takes {len(self.inputs)} inputs, got {len(args)}")
        vals = dict(zip((i.name for i in self.inputs), args))
        for k, v in kwargs.items():
            if k in vals:
                raise TypeError(f"{self.name}: input {k!r} given twice")
            if k not in {i.name for i in self.inputs}:
                raise TypeError(f"{self.name}: no input named {k!r}; inputs are "
                                f"{[i.name for i in self.inputs]}")
            vals[k] = v
        missing = [i.name for i in self.inputs if i.name not in vals]
        if missing:
            raise TypeError(f"{self.name}: missing input(s) {missing}")
        arrays, bindings = [], {}
        for i in self.inputs:
            a = np.asarray(vals[i.name])
            if a.dtype != i.dtype:      # the casting rule: graphc/input_cast.py
                a = input_cast.convert(self.name, i, a, self._cast_warned)
            if a.ndim != i.ndim:
                raise ValueError(f"{self.name}: input {i.name!r} expects shape "
                                 f"{shape_str(i.shape)}, got {shape_str(a.shape)}")
            for d, s in zip(i.shape, a.shape):
                if isinstance(d, str):
                    if bindings.setdefault(d, s) != s:
                        raise ValueError(
                            f"{self.name}: input {i.name!r} has {d}={s}, but another input "
                            f"set {d}={bindings[d]} (shape {shape_str(a.shape)}, expected "
                            f"{shape_str(i.shape)})")
                elif d != s:
                    raise ValueError(f"{self.name}: input {i.name!r} expects shape "
                                     f"{shape_str(i.shape)}, got {shape_str(a.shape)}")
            arrays.append(np.require(a, requirements="C"))  # (ascontiguousarray makes 0-d 1-d)
        return arrays, bindings

    def _executable(self, bindings):
        key = tuple(sorted(bindings.items()))
        ex = self._cache.get(key)
        if ex is not None:
            return ex
        with self._lock:   # (re-entered by a call with updates, which holds it)
            return self._compile(key, bindings)

    def _compile(self, key, bindings):
        ex = self._cache.get(key)     # another thread may have compiled it meanwhile
        if ex is None:
            outs = self.outputs + [v for _, v in self.updates]
            inputs = self.inputs
            if bindings:  # every backend runs shape-concrete graphs
                outs, imap = specialize(outs, bindings, inputs)
                inputs = [imap[i.id] for i in inputs]
            graph = Graph(outs, inputs)
            from .passes import optimize
            graph, report = optimize(graph, self.optimize, n_updates=len(self.updates))
            self.reports.append(report)
            self.graph = graph
            ex = self._cache[key] = self.backend.build(graph)
        return ex

    def _fast_bind(self, args):
        """The arrays and executable of a call whose positional arguments are C-contiguous
        ndarrays with exactly the dtypes and shapes of the previous such call, else None
        (then `_bind` does the full validation)."""
        sig = self._last_sig
        if sig is None or len(args) != len(sig[0]):
            return None
        for a, (dtype, shape) in zip(args, sig[0]):
            if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape \
                    or not a.flags.c_contiguous:
                return None
        return args, sig[1]

    def __call__(self, *args, **kwargs):
        sig = self._last_sig
        if sig is not None and sig[2] and not kwargs and len(args) == len(sig[0]):
            # The streaming fast path: the previous call's dtypes and shapes, a backend
            # returning fresh outputs, no updates (see _fast_bind).
            for a, (dtype, shape) in zip(args, sig[0]):
                if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape \
                        or not a.flags.c_contiguous:
                    break
            else:
                outs = sig[1](args)
                return outs[0] if self.single else outs
        if self.updates:
            # read parameters, compute, write them: one call at a time (no lost update)
            with self._lock:
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        fast = None if kwargs else self._fast_bind(args)
        if fast is not None:
            arrays, ex = fast
        else:
            arrays, bindings = self._bind(args, kwargs)
            ex = self._executable(bindings)
            if not kwargs and all(type(a) is np.ndarray for a in args):
                plain = not self.updates and getattr(ex, "FRESH_OUTPUTS", False)
                self._last_sig = (tuple((a.dtype, a.shape) for a in arrays), ex, plain)
        if self.updates and getattr(ex, "WRITES_UPDATES", False):
            # The backend copies the new values straight into the parameters, after the
            # whole graph has run (every reader saw the old values).
            outs = ex(arrays, [p for p, _ in self.updates])
            return outs[0] if self.single else outs
        results = ex(arrays)
        n = len(self.outputs)
        if not getattr(ex, "FRESH_OUTPUTS", False):  # a backend may promise fresh arrays
            shared = _MemoryRanges([p.value for p in self._state])
            results = [r.copy() if shared.overlaps(r) else r
                       for r in (np.asarray(r) for r in results)]
        for (p, _), new in zip(self.updates, results[n:]):
            p.set_value(new)  # after every output was computed: all readers saw old values
        outs = results[:n]
        return outs[0] if self.single else outs

    def report(self):
        return self.reports[-1] if self.reports else None

    # ------------------------------------------------------------ interactive use
    def __repr__(self) -> str:
        ins = ", ".join(f"{i.name}: {i.type}" for i in self.inputs)
        outs = ", ".join(str(o.type) for o in self.outputs)
        outs = outs if self.single else f"[{outs}]"
        ups = ""
        if self.updates:
            names = [p.label() for p, _ in self.updates]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            ups = f"; updates {len(names)} parameter{'s' * (len(names) != 1)} ({shown})"
        return f"<Function {self.name!r} ({ins}) -> {outs}{ups}; backend {self.backend_name}>"

    def _repr_svg_(self):
        """Jupyter draws the computation (outputs and updates); None without graphviz."""
        from . import viz
        return viz.repr_svg(self)


class _MemoryRanges:
    """The byte ranges of some arrays, to ask whether another array may share memory
    with any of them: the same answer as `np.may_share_memory` (bounds overlap), in
    O(log n) per question instead of one call per array (a graph with thousands of
    outputs and parameters spent most of each call in those pairwise checks)."""

    def __init__(self, arrays):
        spans = sorted(_bounds(a) for a in arrays if a.size)
        self.lows = [lo for lo, _ in spans]
        self.max_high = []
        m = None
        for _, hi in spans:
            m = hi if m is None or hi > m else m
            self.max_high.append(m)

    def overlaps(self, r) -> bool:
        if not r.size or not self.lows:
            return False
        lo, hi = _bounds(r)
        k = bisect_left(self.lows, hi)  # the arrays starting before r ends
        return k > 0 and self.max_high[k - 1] > lo


try:
    from numpy.lib.array_utils import byte_bounds as _bounds   # NumPy >= 2
except ImportError:  # pragma: no cover - NumPy 1.x
    _bounds = np.byte_bounds


def compile(inputs, outputs, updates=None, backend="numpy", optimize=2, name=None) -> Function:
    """Compile `outputs` as a function of `inputs`; returns a callable `Function`.

    inputs: a gc.input node or a list of them, the arguments in order.  Every
      input the outputs read must be listed.
    outputs: a node (the call returns one array) or a list of nodes (the call
      returns a list of arrays).  Results are NumPy arrays; a scalar output is a
      0-d array (`float(result)` gives a Python number).
    updates: {Parameter: new value node}, written into the parameters after
      every output of a call has been computed (all reads see the old values);
      this is how a training step is one call.
    backend: "numpy" (the reference interpreter, always available), "llvm"
      (native CPU code through llvmlite) or "cuda" (an NVIDIA GPU).
    optimize: graph optimizer level: 0 none, 1 folding/CSE/simplification,
      2 also fusion and memory planning (default).
    name: used in error messages (default "function").

    Calling the Function: pass arrays positionally, by input name, or both:
    ``f(xb, yb)``, ``f(x=xb, y=yb)``.  Each call checks every array against its
    input: the number of dimensions and every fixed size must match (a mismatch
    is a ValueError naming the input, the expected and the given shape), and
    symbolic sizes (None, "N") must agree between inputs.  The graph is
    specialized and compiled once per set of symbolic sizes, then cached.

    Dtypes: an array of the input's dtype is used as is.  Another dtype is
    converted when NumPy calls the cast "safe" (int32 -> int64, uint8 ->
    float32); a cast within a kind that may lose values (float64 -> float32,
    int64 -> float32 or int32) is done with a gc.InputCastWarning, once per
    input, but finite values beyond the input dtype's range (float64 1e39 into
    float32) are a ValueError; any other cast (float -> int, strings, objects)
    is a TypeError.  See graphc/input_cast.py.

    Example::

        x = gc.input("x", (None, 4))
        f = gc.compile([x], gc.sum(x * x, axis=1))
        f(np.ones((2, 4), np.float32))          # array([4., 4.], dtype=float32)
    """
    return Function(inputs, outputs, updates=updates, backend=backend, optimize=optimize,
                    name=name)
