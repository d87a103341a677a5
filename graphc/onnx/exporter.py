"""Write graphc forward graphs as ONNX models.

    proto = gc.onnx.export(logits, "net.onnx", inputs=[x])
    proto = gc.onnx.export(model, "net.onnx", inputs=[x])     # an nn.Module: model(x)

Inputs keep their names (symbolic dims become dim_params), parameters become
initializers named after the parameter, constants become initializers too.
Each graphc op maps to one or a few ONNX operators (`EXPORTERS`); ops with no
ONNX form (backward-only ops, loops, random dropout) raise OnnxExportError
naming every such op.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..ir import dtypes as dt
from ..ir.graph import toposort
from ..ir.node import Node
from .errors import OnnxExportError, require_onnx

__all__ = ["export", "EXPORTERS"]

_TO_ELEM = {dt.float32: 1, dt.float64: 11, dt.int32: 6, dt.int64: 7, dt.bool_: 9}
EXPORTERS: dict = {}


def exporter(*names):
    def deco(f):
        for n in names:
            EXPORTERS[n] = f
        return f
    return deco


class _Writer:
    """Accumulates ONNX nodes and initializers; hands out unique tensor names."""

    def __init__(self, opset: int):
        onnx = require_onnx("gc.onnx.export")
        self.helper = onnx.helper
        self.numpy_helper = onnx.numpy_helper
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.used: set = set()
        self.counter = 0

    def fresh(self, base: str) -> str:
        base = re.sub(r"[^\w.\-/:]", "_", base) or "t"
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def add(self, op_type, inputs, out=None, **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.counter += 1
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out],
                                                name=f"{op_type}_{self.counter}", **attrs))
        return out

    def const(self, value, dtype=None, base="const") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(arr, name))
        return name

    def ints(self, values, base="shape") -> str:
        return self.const(np.asarray(list(values), np.int64), base=base)


# ---------------------------------------------------------------- op exporters
# Each: f(w, node, names_of_inputs, out_name) -> None (adds nodes ending in out_name).
def _simple(op_type):
    def f(w, n, ins, out):
        w.add(op_type, ins, out)
    return f


for _g, _o in {"add": "Add", "sub": "Sub", "mul": "Mul", "pow": "Pow", "maximum": "Max",
               "minimum": "Min", "equal": "Equal", "less": "Less", "greater": "Greater",
               "less_equal": "LessOrEqual", "greater_equal": "GreaterOrEqual",
               "where": "Where", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh",
               "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs",
               "erf": "Erf", "reciprocal": "Reciprocal", "sign": "Sign", "matmul": "MatMul",
               "logical_not": "Not"}.items():
    exporter(_g)(_simple(_o))


@exporter("div")
def _div(w, n, ins, out):
    if n.dtype.kind != "f":
        raise OnnxExportError("integer division: graphc floors, ONNX truncates toward zero")
    w.add("Div", ins, out)


@exporter("not_equal")
def _not_equal(w, n, ins, out):
    w.add("Not", [w.add("Equal", ins)], out)


@exporter("square")
def _square(w, n, ins, out):
    w.add("Mul", [ins[0], ins[0]], out)


@exporter("leaky_relu")
def _leaky_relu(w, n, ins, out):
    w.add("LeakyRelu", ins, out, alpha=float(n.attrs["negative_slope"]))


@exporter("elu")
def _elu(w, n, ins, out):
    w.add("Elu", ins, out, alpha=float(n.attrs["alpha"]))


@exporter("gelu")
def _gelu(w, n, ins, out):
    approx = n.attrs["approximate"]
    if w.opset >= 20:
        w.add("Gelu", ins, out, approximate=approx)
        return
    x, dtype = ins[0], n.dtype
    if approx == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        x3 = w.add("Mul", [x, w.add("Mul", [x, x])])
        inner = w.add("Add", [x, w.add("Mul", [x3, w.const(0.044715, dtype)])])
        t = w.add("Tanh", [w.add("Mul", [inner, w.const(np.sqrt(2 / np.pi), dtype)])])
    else:  # 0.5·x·(1 + erf(x/√2))
        t = w.add("Erf", [w.add("Mul", [x, w.const(1 / np.sqrt(2), dtype)])])
    half_x = w.add("Mul", [x, w.const(0.5, dtype)])
    w.add("Mul", [half_x, w.add("Add", [t, w.const(1.0, dtype)])], out)


@exporter("softplus")
def _softplus(w, n, ins, out):
    beta = float(n.attrs["beta"])
    if beta == 1.0:
        w.add("Softplus", ins, out)
        return
    scaled = w.add("Mul", [ins[0], w.const(beta, n.dtype)])
    w.add("Div", [w.add("Softplus", [scaled]), w.const(beta, n.dtype)], out)


@exporter("silu")
def _silu(w, n, ins, out):
    w.add("Mul", [ins[0], w.add("Sigmoid", ins)], out)


@exporter("log_sigmoid")
def _log_sigmoid(w, n, ins, out):
    w.add("Neg", [w.add("Softplus", [w.add("Neg", ins)])], out)


@exporter("softmax")
def _softmax(w, n, ins, out):
    w.add("Softmax", ins, out, axis=int(n.attrs["axis"]))


@exporter("log_softmax")
def _log_softmax(w, n, ins, out):
    w.add("LogSoftmax", ins, out, axis=int(n.attrs["axis"]))


@exporter("transpose")
def _transpose(w, n, ins, out):
    w.add("Transpose", ins, out, perm=[int(p) for p in n.attrs["perm"]])


@exporter("reshape")
def _reshape(w, n, ins, out):
    src = tuple(n.inputs[0].shape)
    target = []
    for i, d in enumerate(n.shape):
        if isinstance(d, str):
            target.append(0 if i < len(src) and src[i] == d else -1)
        else:
            target.append(int(d))
    if target.count(-1) > 1:
        raise OnnxExportError(f"reshape {src} -> {tuple(n.shape)} moves several symbolic dims")
    w.add("Reshape", [ins[0], w.ints(target)], out)


@exporter("broadcast_to")
def _broadcast_to(w, n, ins, out):
    target = [1 if isinstance(d, str) else int(d) for d in n.shape]
    w.add("Expand", [ins[0], w.ints(target)], out)


@exporter("cast")
def _cast(w, n, ins, out):
    w.add("Cast", ins, out, to=_TO_ELEM[n.dtype])


@exporter("concat")
def _concat(w, n, ins, out):
    w.add("Concat", ins, out, axis=int(n.attrs["axis"]))


@exporter("take")
def _take(w, n, ins, out):
    w.add("Gather", ins, out, axis=int(n.attrs["axis"]))


@exporter("slice")
def _slice(w, n, ins, out):
    starts, ends, axes, steps = [], [], [], []
    for a, s in enumerate(n.attrs["spec"]):
        if s is None:
            continue
        start, step, count = s
        stop = start + step * count
        if count == 0:
            start, stop, step = 0, 0, 1
        elif stop < 0:
            stop = -(2 ** 63)  # past the front, for negative steps
        starts.append(start)
        ends.append(stop)
        axes.append(a)
        steps.append(step)
    w.add("Slice", [ins[0], w.ints(starts, "starts"), w.ints(ends, "ends"),
                    w.ints(axes, "axes"), w.ints(steps, "steps")], out)


@exporter("pad")
def _pad(w, n, ins, out):
    spec, shape = n.attrs["spec"], n.attrs["shape"]
    before, after = [], []
    for s, d, src in zip(spec, shape, n.inputs[0].shape):
        if s is None:
            before.append(0)
            after.append(0)
            continue
        start, step, count = s
        if step != 1:
            raise OnnxExportError("strided pad (the gradient of a strided slice) has no ONNX form")
        before.append(start)
        after.append(int(d) - start - count)
    value = w.const(np.asarray(n.attrs["value"], n.dtype), base="pad_value")
    w.add("Pad", [ins[0], w.ints(before + after, "pads"), value], out, mode="constant")


def _reduce(op_type, input_axes_since):
    def f(w, n, ins, out):
        axes = n.attrs["axis"]
        axes = list(range(n.inputs[0].ndim)) if axes is None else \
            [int(a) for a in ((axes,) if isinstance(axes, int) else axes)]
        keep = int(bool(n.attrs["keepdims"]))
        if not axes:
            w.add("Identity", ins, out)
        elif w.opset >= input_axes_since:
            w.add(op_type, [ins[0], w.ints(axes, "axes")], out, keepdims=keep)
        else:
            w.add(op_type, ins, out, axes=axes, keepdims=keep)
    return f


exporter("sum")(_reduce("ReduceSum", 13))
exporter("mean")(_reduce("ReduceMean", 18))
exporter("max")(_reduce("ReduceMax", 18))
exporter("min")(_reduce("ReduceMin", 18))
exporter("logsumexp")(_reduce("ReduceLogSumExp", 18))


def _pads4(padding):
    (t, b), (l, r) = padding
    return [int(t), int(l), int(b), int(r)]


@exporter("conv2d")
def _conv2d(w, n, ins, out):
    a = n.attrs
    kh, kw = n.inputs[1].shape[2:]
    w.add("Conv", ins, out, kernel_shape=[int(kh), int(kw)], strides=list(a["stride"]),
          pads=_pads4(a["padding"]), dilations=list(a["dilation"]), group=int(a["groups"]))


@exporter("conv2d_grad_input")
def _conv_transpose(w, n, ins, out):
    a = n.attrs
    g = n.inputs[0]
    kh, kw = n.inputs[1].shape[2:]
    (t, b), (l, r) = a["padding"]
    sh, sw = a["stride"]
    dh, dw = a["dilation"]
    natural = [sh * (g.shape[2] - 1) + (kh - 1) * dh + 1 - t - b,
               sw * (g.shape[3] - 1) + (kw - 1) * dw + 1 - l - r]
    out_pad = [int(s - nat) for s, nat in zip(a["input_size"], natural)]
    w.add("ConvTranspose", ins, out, kernel_shape=[int(kh), int(kw)], strides=[sh, sw],
          pads=_pads4(a["padding"]), dilations=[dh, dw], group=int(a["groups"]),
          output_padding=out_pad)


@exporter("max_pool2d")
def _max_pool(w, n, ins, out):
    a = n.attrs
    p = [int(v) for v in a["padding"]]
    w.add("MaxPool", ins, out, kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]),
          pads=p + p, dilations=list(a["dilation"]), ceil_mode=int(bool(a["ceil_mode"])))


@exporter("avg_pool2d")
def _avg_pool(w, n, ins, out):
    a = n.attrs
    p = [int(v) for v in a["padding"]]
    w.add("AveragePool", ins, out, kernel_shape=list(a["kernel_size"]),
          strides=list(a["stride"]), pads=p + p, ceil_mode=int(bool(a["ceil_mode"])),
          count_include_pad=int(bool(a["count_include_pad"])))


@exporter("numel")
def _numel(w, n, ins, out):
    shape = n.inputs[0].shape
    axes = n.attrs.get("axes")
    axes = range(len(shape)) if axes is None else axes
    dims = [shape[a] for a in axes]
    if any(isinstance(d, str) for d in dims):
        raise OnnxExportError("numel of symbolic dimensions")
    w.add("Identity", [w.const(np.asarray(int(np.prod(dims)), n.dtype))], out)


# ---------------------------------------------------------------- driver
def _value_info(helper, name, node):
    dims = [d if isinstance(d, str) else int(d) for d in node.shape]
    return helper.make_tensor_value_info(name, _TO_ELEM[node.dtype], dims)


def export(outputs, path=None, inputs=None, opset: int = 17, output_names=None,
           graph_name: str = "graphc"):
    """Write `outputs` (a node, a list of nodes, an OnnxModel, or a module called on
    `inputs`) as an ONNX model; returns the onnx.ModelProto (also saved to `path`).

    inputs: the gc.input nodes, in order (default: every input the outputs read,
    in the order they were created).  opset: 13 or later.
    """
    onnx = require_onnx("gc.onnx.export")
    helper = onnx.helper
    if opset < 13:
        raise OnnxExportError(f"export writes opset 13 or later, not {opset}")
    if hasattr(outputs, "outputs") and hasattr(outputs, "inputs") and not isinstance(outputs,
                                                                                      Node):
        inputs = outputs.inputs if inputs is None else inputs
        output_names = output_names or getattr(outputs, "output_names", None)
        outputs = outputs.outputs
    elif callable(outputs) and not isinstance(outputs, (Node, list, tuple)):
        if inputs is None:
            raise OnnxExportError("exporting a module needs inputs=[gc.input(...), ...]")
        outputs = outputs(*inputs)
    outs = [outputs] if isinstance(outputs, Node) else list(outputs)
    order = toposort(outs)
    if inputs is None:
        inputs = sorted((n for n in order if n.op.name == "input"), key=lambda n: n.id)
    inputs = list(inputs)
    declared = {i.id for i in inputs}
    missing = [n.name for n in order if n.op.name == "input" and n.id not in declared]
    if missing:
        raise OnnxExportError(f"the outputs read inputs {missing} that are not in inputs=")
    bad: dict = {}
    for n in order:
        if n.op.name not in EXPORTERS and n.op.name not in ("input", "parameter", "constant"):
            bad.setdefault(n.op.name, []).append(n.loc)
        elif getattr(n.type, "dtype", None) is not None and n.dtype not in _TO_ELEM:
            bad.setdefault(f"dtype {n.dtype}", []).append(n.loc)
    if bad:
        raise OnnxExportError("graphc ops with no ONNX export: " + "; ".join(
            f"{op} ({len(locs)}x, e.g. built at {locs[0]})" for op, locs in bad.items()))
    w = _Writer(opset)
    names: dict = {}
    graph_inputs = []
    for i in inputs:
        names[i.id] = w.fresh(i.name)
        graph_inputs.append(_value_info(helper, names[i.id], i))
    out_names = list(output_names) if output_names else \
        (["output"] if len(outs) == 1 else [f"output_{k}" for k in range(len(outs))])
    if len(out_names) != len(outs):
        raise OnnxExportError(f"{len(out_names)} output_names for {len(outs)} outputs")
    want_out = {}
    for o, nm in zip(outs, out_names):
        if nm is not None:
            want_out.setdefault(o.id, nm)
    for n in order:
        kind = n.op.name
        if kind == "input":
            continue
        if kind == "parameter":
            names[n.id] = w.const(n.value, base=n.name or "param")
            continue
        if kind == "constant":
            names[n.id] = w.const(n.value, base=n.name or "const")
            continue
        out = w.fresh(want_out.get(n.id) or n.name or f"{kind}_{n.id}")
        try:
            EXPORTERS[kind](w, n, [names[i.id] for i in n.inputs], out)
        except OnnxExportError as e:
            raise OnnxExportError(f"{kind} built at {n.loc}: {e}") from None
        names[n.id] = out
    graph_outputs, final_names = [], []
    for k, o in enumerate(outs):
        name = names[o.id]
        wanted = out_names[k]
        if name in final_names or o.op.name in ("input", "parameter", "constant") or (
                wanted is not None and wanted != name):
            name = w.add("Identity", [name], w.fresh(wanted or f"output_{k}"))
        final_names.append(name)
        graph_outputs.append(_value_info(helper, name, o))
    graph = helper.make_graph(w.nodes, graph_name, graph_inputs, graph_outputs,
                              initializer=w.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="graphc")
    model.ir_version = min(model.ir_version, 10)  # readable by current onnxruntime releases
    onnx.checker.check_model(model)
    if path is not None:
        with open(os.fspath(path), "wb") as fh:
            fh.write(model.SerializeToString())
    return model
