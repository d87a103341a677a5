"""Read an ONNX model and rebuild it as a graphc graph.

Values flow through the import as either a NumPy array (known when the model
is loaded: Constant nodes, integer initializers, shapes, and anything computed
only from those) or a graphc node.  Operators whose inputs are all known are
evaluated right away (with graphc's own NumPy reference), which resolves the
Shape → Gather → Concat → Reshape chains exporters emit.  Shapes with symbolic
dimensions are known too, as object arrays holding ints and symbol names; only
a few shape-arithmetic operators handle those (see `op_table.SYMBOLIC`).

Float initializers become `gc.Parameter`s (so an imported model can be
fine-tuned with gc.grad); integer and boolean initializers are constants.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict

import numpy as np

from ..ir import dtypes as dt
from ..ir.errors import GraphcError
from ..ir.graph import Graph
from ..ir.node import Node, TensorType
from .errors import OnnxImportError, UnsupportedOperatorError, require_onnx

__all__ = ["load", "OnnxModel"]


def _onnx():
    return require_onnx("gc.onnx.load")


# ONNX TensorProto element types graphc can hold.
_ELEM = {1: dt.float32, 11: dt.float64, 6: dt.int32, 7: dt.int64, 9: dt.bool_}
_ELEM_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16",
               6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
               12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16"}


# The newest default-domain opset whose operator semantics the converters follow
# (checked against ONNX's own node tests, which onnx 1.23 generates up to opset 28).
# A newer opset may change an operator's meaning, so such models are refused.
MAX_OPSET = 28

# Values the importer evaluates while loading (ConstantOfShape, Range, Expand/Tile of
# constants, any node computed only from constants, masks sized by shapes) are
# materialized in memory; a tiny model can ask for terabytes (ConstantOfShape
# [65536, 65536]).  Above this many bytes such a value is refused with an
# OnnxImportError naming the node; `load(..., max_constant_bytes=)` changes it.
MAX_CONSTANT_BYTES = 256 << 20


def elem_dtype(elem_type: int, what: str) -> np.dtype:
    if elem_type not in _ELEM:
        name = _ELEM_NAMES.get(elem_type, f"type {elem_type}")
        raise OnnxImportError(f"{what} has element type {name}; graphc supports FLOAT, DOUBLE, "
                              "INT32, INT64 and BOOL tensors")
    return _ELEM[elem_type]


# ---------------------------------------------------------------- reading
def read_model(source):
    """An onnx.ModelProto from a path, bytes or a ModelProto (never executes code)."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError
    base_dir = None
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), "the given bytes"
        elif isinstance(source, (str, os.PathLike)):
            what = os.fspath(source)
            try:
                with open(what, "rb") as fh:
                    data = fh.read()
            except OSError as e:
                raise OnnxImportError(f"cannot read ONNX model {what!r}: {e}") from None
            base_dir = os.path.dirname(os.path.abspath(what))
        elif hasattr(source, "read"):
            data, what = source.read(), "the given file object"
        else:
            raise TypeError(f"gc.onnx.load takes a path, bytes or an onnx.ModelProto, got "
                            f"{type(source).__name__}")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise OnnxImportError(f"{what} is not a valid ONNX model (protobuf parse failed: "
                                  f"{e}); the file may be truncated or corrupt") from None
        if not model.HasField("graph"):
            raise OnnxImportError(f"{what} is not a valid ONNX model: it has no graph (empty, "
                                  "truncated, or not an ONNX file)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        if base_dir is None:
            raise OnnxImportError("the model keeps weights in external data files; load it "
                                  "from its path so they can be found")
        from onnx.external_data_helper import load_external_data_for_model
        try:
            load_external_data_for_model(model, base_dir)
        except Exception as e:
            raise OnnxImportError(f"cannot load the model's external data: {e}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError and friends
        raise OnnxImportError(f"the ONNX model is invalid: {str(e).strip().splitlines()[0]}") \
            from None
    return model


def default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            v = int(o.version)
            if v > MAX_OPSET:
                raise OnnxImportError(f"the model uses ONNX opset {v}; graphc imports opsets up "
                                      f"to {MAX_OPSET} (a newer opset may change what its "
                                      "operators mean); re-export the model for an older opset")
            return v
    raise OnnxImportError("the model imports no version of the default ONNX operator set")


def _symbol(name: str) -> str:
    s = re.sub(r"\W", "_", str(name))
    if not s or s[0].isdigit():
        s = "d_" + s
    return s


# ---------------------------------------------------------------- the model
class OnnxModel:
    """An imported ONNX model: graphc inputs, outputs and parameters.

    inputs:     gc.input nodes named like the ONNX graph inputs
    outputs:    graphc nodes, in the order of the ONNX graph outputs
    parameters: the float initializers, as gc.Parameter (trainable)
    """

    def __init__(self, inputs, outputs, parameters, output_names, opset, producer=""):
        self.inputs = list(inputs)
        self.outputs = list(outputs) if outputs is not None else None
        self.parameters = list(parameters)
        self.input_names = [i.name for i in self.inputs]
        self.output_names = list(output_names)
        self.opset = opset
        self.producer = producer
        self._fn = None

    _spec = None  # (model, dims, input_shapes, [names], param cache) when deferred

    @classmethod
    def deferred(cls, model, dims, input_shapes, names, cache):
        """A model whose shape-like operands read the values of graph inputs `names`.

        It has no outputs until those values are known: `specialize(**values)`
        builds a concrete model; calling or compiling it specializes per call.
        """
        from ..tensor import input as gc_input
        inputs = []
        for vi in model.graph.input:
            if any(vi.name == t.name for t in model.graph.initializer):
                continue
            tt = vi.type.tensor_type
            shape = _input_shape(vi, dict(dims or {}), dict(input_shapes or {}))
            inputs.append(gc_input(vi.name, shape, elem_dtype(tt.elem_type,
                                                              f"graph input {vi.name!r}")))
        self = cls(inputs, None, list(cache.values()), [o.name for o in model.graph.output],
                   default_opset(model), model.producer_name)
        self._spec = (model, dims, input_shapes, set(names), cache)
        return self

    @property
    def needs_values(self) -> list:
        """Graph inputs whose values (not just shapes) the graph's structure depends on."""
        return sorted(self._spec[3]) if self._spec else []

    def specialize(self, **values) -> "OnnxModel":
        """The model with the given graph inputs fixed to these values (as constants)."""
        if self._spec is None:
            raise OnnxImportError("this model needs no input values to be built")
        model, dims, input_shapes, names, cache = self._spec
        feeds = {k: np.asarray(v) for k, v in values.items()}
        while True:
            missing = names - set(feeds)
            if missing:
                raise _ValuesNeeded(missing, f"specialize needs the values of input(s) "
                                             f"{sorted(missing)}")
            try:
                return _build(model, dims, input_shapes, feeds, cache)
            except NeedsInputValues as e:
                if e.names <= set(feeds):
                    raise OnnxImportError(f"{e.where} cannot be resolved") from None
                names |= e.names

    @property
    def graph(self) -> Graph:
        if self.outputs is None:
            raise OnnxImportError(f"the model's graph depends on the values of inputs "
                                  f"{self.needs_values}; call specialize(...) first")
        return Graph(self.outputs, self.inputs)

    def compile(self, backend="numpy", optimize=2):
        """A callable from the inputs to the list of outputs (a gc.Function when the
        model needs no input values; otherwise one that specializes per value)."""
        from ..function import compile as gc_compile
        if self.outputs is None:
            return _SpecializingFunction(self, backend, optimize)
        return gc_compile(self.inputs, list(self.outputs), backend=backend, optimize=optimize,
                          name="onnx_model")

    def __call__(self, *args, **feeds):
        """Run the model on the NumPy backend (compiled once); returns the list of outputs.

        Inputs go positionally (graph input order) or by name; use
        `compile(backend=...)` for other backends.
        """
        if self._fn is None:
            self._fn = self.compile()
        return self._fn(*args, **feeds)

    def state_dict(self) -> dict:
        return {p.name: p.value for p in self.parameters}

    def __repr__(self):
        ins = ", ".join(f"{i.name}: {i.type}" for i in self.inputs)
        outs = ", ".join(f"{n}: {o.type}" for n, o in zip(self.output_names, self.outputs))
        return (f"<OnnxModel opset {self.opset} ({ins}) -> ({outs}), "
                f"{len(self.parameters)} parameters>")


class _SpecializingFunction:
    """Calls a deferred model: builds and compiles it per distinct value of the
    inputs its structure depends on (cached)."""

    def __init__(self, model, backend, optimize):
        self.model, self.backend, self.optimize = model, backend, optimize
        self._cache: dict = {}

    def __call__(self, *args, **feeds):
        names = [i.name for i in self.model.inputs]
        if len(args) > len(names):
            raise TypeError(f"onnx_model: takes {len(names)} inputs, got {len(args)}")
        vals = dict(zip(names, args))
        vals.update(feeds)
        while True:
            key_names = sorted(self.model._spec[3])
            statics = {}
            for n in key_names:
                if n not in vals:
                    raise TypeError(f"onnx_model: missing input {n!r}")
                statics[n] = np.asarray(vals[n])
            key = tuple((n, statics[n].dtype.str, statics[n].shape, statics[n].tobytes())
                        for n in key_names)
            f = self._cache.get(key)
            if f is not None:
                break
            try:
                spec = self.model.specialize(**statics)
            except _ValuesNeeded:
                continue  # specialize widened the set of value inputs; retry with it
            f = self._cache[key] = (spec, spec.compile(self.backend, self.optimize))
            break
        spec, fn = f
        return fn(**{i.name: vals[i.name] for i in spec.inputs})


class _ValuesNeeded(OnnxImportError):
    def __init__(self, names, msg):
        super().__init__(msg)
        self.names = names


class NeedsInputValues(Exception):
    """Internal: a shape-like operand depends on these graph inputs' values."""

    def __init__(self, names, where):
        super().__init__(where)
        self.names, self.where = set(names), where


class Context:
    """What converters see: the opset, and helpers to turn values into nodes/arrays."""

    def __init__(self, opset: int, max_bytes: int = MAX_CONSTANT_BYTES):
        self.opset = opset
        self.max_bytes = max_bytes
        self.node_desc = ""

    def check_size(self, shape, dtype, what: str) -> None:
        """Refuse to materialize a load-time array of `shape` above the size limit."""
        shape = tuple(shape)
        if any(isinstance(d, str) for d in shape):
            return  # symbolic: nothing is allocated
        if any(int(d) < 0 for d in shape):
            raise self.error(f"{what} has a negative dimension {list(shape)}")
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * np.dtype(dtype).itemsize
        if nbytes > self.max_bytes:
            raise self.error(f"{what} would be a load-time constant of shape {list(shape)} "
                             f"({n} elements, {_bytes(nbytes)}), above the limit of "
                             f"{_bytes(self.max_bytes)} for values evaluated while loading; "
                             "raise it with gc.onnx.load(..., max_constant_bytes=N) if the "
                             "model really needs it")

    def error(self, msg: str) -> OnnxImportError:
        return OnnxImportError(f"{self.node_desc}: {msg}")

    def node(self, v, dtype=None) -> Node:
        """A graphc node for value `v` (arrays become constants)."""
        from ..ops.base import constant
        if isinstance(v, Node):
            return v
        if v is None:
            raise self.error("a required input is missing")
        arr = np.asarray(v)
        if arr.dtype == object:
            raise self.error(f"a shape value {list(arr.ravel())} holds symbolic dimensions and "
                             "is used as data; specialize the model with "
                             "gc.onnx.load(..., dims={symbol: size})")
        return constant(arr, dtype=dtype if dtype is not None else arr.dtype)

    def static(self, v, what: str, allow_symbols=False) -> np.ndarray:
        """The value of `v` at load time, or a clear error."""
        if isinstance(v, Node) and v.op.name == "parameter":
            return np.array(v.value)  # an initializer read as a value (e.g. Pad's constant)
        if isinstance(v, Node):
            from ..ir.graph import toposort
            leaves = [n for n in toposort([v]) if not n.inputs]
            if not any(n.op.name == "parameter" for n in leaves):
                names = {n.name for n in leaves if n.op.name == "input"}
                if names:
                    raise NeedsInputValues(names, f"{self.node_desc}: {what}")
            raise self.error(f"{what} must be known when the model is loaded (a Constant, an "
                             "initializer, or computed from shapes), but it depends on graph "
                             "inputs; specialize the model (feed shapes with input_shapes=/dims= "
                             "or fold it into a constant)")
        if v is None:
            raise self.error(f"{what} is missing")
        arr = np.asarray(v)
        if arr.dtype == object and not allow_symbols:
            raise self.error(f"{what} = {list(arr.ravel())} holds symbolic dimensions; specialize "
                             "the model with gc.onnx.load(..., dims={symbol: size})")
        return arr

    def ints(self, v, what: str, allow_symbols=False) -> list:
        arr = self.static(v, what, allow_symbols)
        return [d if isinstance(d, str) else int(d) for d in arr.ravel().tolist()]


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _attrs(node) -> dict:
    onnx = _onnx()
    from onnx import numpy_helper
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise OnnxImportError(f"attribute {a.name} refers to a function attribute")
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = numpy_helper.to_array(a.t)
        elif a.type == onnx.AttributeProto.GRAPH:
            out[a.name] = a.g
        else:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode("utf-8") for s in v]
            out[a.name] = v
    return out


def _check_supported(graph, model):
    from .op_table import OPS
    bad: OrderedDict = OrderedDict()
    for i, n in enumerate(graph.node):
        if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
            key = (n.domain or "ai.onnx", n.op_type)
            bad.setdefault(key, []).append(n.name or f"#{i}")
    if bad:
        lines = [f"  {op} (domain {dom}): {len(names)} node(s): "
                 + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                 for (dom, op), names in bad.items()]
        raise UnsupportedOperatorError(
            f"the ONNX model uses {len(bad)} operator type(s) graphc cannot import:\n"
            + "\n".join(lines), dict(bad))


def _shape_value(v):
    """A shape value: an object array while it holds symbols, int64 once it does not."""
    arr = np.asarray(v, dtype=object)
    if any(isinstance(d, str) for d in arr.ravel()):
        return arr
    return arr.astype(np.int64)


def _fold(outs, ctx):
    """Evaluate nodes that depend only on constants (load-time constant folding).

    Every value the evaluation would hold is checked against the size limit first."""
    from ..ir.graph import toposort
    from ..ops.reference import eval_graph
    res = []
    for o in outs:
        if isinstance(o, Node) and isinstance(o.type, TensorType):
            nodes = toposort([o])
            if all(n.op.name != "input" and n.op.name != "parameter" for n in nodes):
                for n in nodes:
                    if isinstance(n.type, TensorType):
                        ctx.check_size(n.shape, n.dtype, f"the {n.op.name} value it computes")
                o = eval_graph(Graph([o]), {})[0]
        res.append(o)
    return res


_BATCH = object()  # key of `dims` holding load's batch_dim
_LIMIT = object()  # key of `dims` holding load's max_constant_bytes


def _input_shape(vi, dims, input_shapes) -> tuple:
    """The graphc shape of graph input `vi` (ints and symbol names)."""
    if vi.name in input_shapes:
        return tuple(input_shapes[vi.name])
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise OnnxImportError(f"graph input {vi.name!r} has no declared shape; give it with "
                              "input_shapes={name: shape}")
    shape = []
    for k, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        elif k == 0 and dims.get(_BATCH) is not None:
            shape.append(dims[_BATCH])
        else:
            sym = _symbol(d.dim_param) if d.dim_param else _symbol(f"{vi.name}_{k}")
            shape.append(dims.get(d.dim_param, dims.get(sym, sym)))
    return tuple(shape)


def load(source, dims=None, input_shapes=None, batch_dim=None,
         max_constant_bytes=None) -> OnnxModel:
    """Import an ONNX model (path, bytes or onnx.ModelProto) as graphc graphs.

    dims:         {symbol: size} fixes symbolic (dim_param) dimensions to sizes.
    input_shapes: {input name: shape} overrides the declared shape of inputs
                  (ints or symbol names), e.g. to specialize a model whose
                  shape-computing sub-graphs depend on input sizes.
    batch_dim:    a name (or a size) for the leading dimension of every input
                  whose leading dimension is not a fixed number, unifying the
                  different names exporters give the batch ("batch_size", "N", ...).
    Dimensions with neither a value nor a name become symbols named
    `<input>_<axis>`.  Shape-like operands (Reshape's shape, Slice's bounds, ...)
    must be known when the model is loaded; when they are graph inputs, the
    returned model specializes on their values per call (`needs_values`).
    max_constant_bytes: the largest value the importer evaluates while loading
                  (default MAX_CONSTANT_BYTES, 256 MiB); a larger one raises
                  OnnxImportError naming the node.  Initializers are not limited
                  (their data is in the file), but must hold as many values as
                  their dims declare.
    The model's default-domain opset must be at most MAX_OPSET.
    """
    dims = dict(dims or {})
    if max_constant_bytes is not None:
        if isinstance(max_constant_bytes, bool) or not isinstance(max_constant_bytes, int) \
                or max_constant_bytes < 0:
            raise TypeError(f"max_constant_bytes must be a non-negative int, got "
                            f"{max_constant_bytes!r}")
        dims[_LIMIT] = max_constant_bytes
    if batch_dim is not None:
        dims[_BATCH] = batch_dim
    model = read_model(source)
    _check_supported(model.graph, model)
    cache: dict = {}
    try:
        return _build(model, dims, input_shapes, {}, cache)
    except NeedsInputValues as e:
        deferred = set(e.names)
    # Shape-like operands read graph inputs' values: specialize on them per call.
    return OnnxModel.deferred(model, dims, input_shapes, deferred, cache)


def _build(model, dims, input_shapes, static_feeds, param_cache):
    """Build graphc nodes for `model`; inputs named in static_feeds take those values."""
    from onnx import numpy_helper
    from ..tensor import Parameter, input as gc_input
    from .op_table import OPS, SYMBOLIC
    graph = model.graph
    opset = default_opset(model)
    dims = dict(dims or {})
    input_shapes = dict(input_shapes or {})
    values: dict = {}
    params = []
    init_names = set()
    for t in graph.initializer:
        init_names.add(t.name)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            raise OnnxImportError(f"initializer {t.name!r} cannot be read: {e}") from None
        if arr.dtype.kind == "f" and arr.dtype in (dt.float32, dt.float64):
            p = param_cache.get(t.name)
            if p is None:
                p = param_cache[t.name] = Parameter(np.array(arr), name=t.name)
            params.append(p)
            values[t.name] = p
        else:
            if arr.dtype == np.bool_ or arr.dtype.kind in "iu":
                if arr.dtype.kind in "iu" and arr.dtype not in (dt.int32, dt.int64):
                    elem_dtype(t.data_type, f"initializer {t.name!r}")
                values[t.name] = arr
            else:
                elem_dtype(t.data_type, f"initializer {t.name!r}")
    for t in graph.sparse_initializer:
        raise OnnxImportError(f"sparse initializer {t.values.name!r} is not supported")
    inputs = []
    for vi in graph.input:
        if vi.name in init_names:
            continue  # an initializer listed as input (IR < 4): its default value
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxImportError(f"graph input {vi.name!r} is not a tensor")
        dtype = elem_dtype(tt.elem_type, f"graph input {vi.name!r}")
        shape = _input_shape(vi, dims, input_shapes)
        if vi.name in static_feeds:
            values[vi.name] = np.asarray(static_feeds[vi.name], dtype=dtype)
        else:
            node = gc_input(vi.name, shape, dtype)
            inputs.append(node)
            values[vi.name] = node
    ctx = Context(opset, dims.get(_LIMIT, MAX_CONSTANT_BYTES))
    for i, n in enumerate(graph.node):
        ctx.node_desc = f"ONNX node {n.name or '#' + str(i)!r} ({n.op_type}, opset {opset})"
        args = []
        for name in n.input:
            if name == "":
                args.append(None)
            elif name in values:
                args.append(values[name])
            else:
                raise OnnxImportError(f"{ctx.node_desc}: input {name!r} is not produced by any "
                                      "earlier node, initializer or graph input")
        attrs = _attrs(n)
        present = [a for a in args if a is not None]
        all_static = bool(present) and not any(isinstance(a, Node) for a in present)
        symbolic = all_static and any(np.asarray(a).dtype == object for a in present)
        try:
            if symbolic and n.op_type in SYMBOLIC:
                outs = SYMBOLIC[n.op_type](ctx, args, attrs)
                outs = [_shape_value(o) for o in (outs if isinstance(outs, list) else [outs])]
            else:
                outs = OPS[n.op_type](ctx, args, attrs)
                if not isinstance(outs, (list, tuple)):
                    outs = [outs]
                if all_static or (not present and n.op_type != "RandomNormal"):
                    outs = _fold(outs, ctx)
        except (OnnxImportError, NeedsInputValues):
            raise
        except (GraphcError, ValueError, TypeError, IndexError, KeyError) as e:
            raise OnnxImportError(f"{ctx.node_desc}: {e}") from e
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for k, name in enumerate(n.output):
            if name == "":
                continue
            if k >= len(outs) or outs[k] is None:
                raise OnnxImportError(f"{ctx.node_desc}: output {k} ({name!r}) is not supported")
            values[name] = outs[k]
    outputs, names = [], []
    for vi in graph.output:
        if vi.name not in values:
            raise OnnxImportError(f"graph output {vi.name!r} is not produced by any node")
        v = values[vi.name]
        if not isinstance(v, Node):
            v = ctx.node(v)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            want = elem_dtype(vi.type.tensor_type.elem_type, f"graph output {vi.name!r}")
            if v.dtype != want:
                raise OnnxImportError(f"graph output {vi.name!r} is declared {want} but "
                                      f"computes {v.dtype}")
        outputs.append(v)
        names.append(vi.name)
    return OnnxModel(inputs, outputs, params, names, opset, model.producer_name)
