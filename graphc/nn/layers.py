"""Layers: modules that hold parameters and build graph nodes from the ops.

Defaults follow PyTorch so results are comparable: Linear and Conv2d weights
are kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and
their biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); Embedding is N(0, 1);
BatchNorm/LayerNorm start at weight 1, bias 0.

Every layer that draws random numbers takes ``rng=`` (a Generator or an int
seed); without it the default generator of ``graphc.nn.init`` is used
(``nn.manual_seed`` resets it).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..ops import activations as A
from ..ops import conv as C
from ..ops import indexing as I
from ..ops import linalg as L
from ..ops import nn as F
from ..ops import pool as P
from ..ops import shape as S
from ..ir.errors import GraphBuildError
from ..ir.node import current_scope, user_location
from ..ir.shapes import shape_str
from ..tensor import Parameter
from . import init
from .module import Module, auto_named

__all__ = ["Identity", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm1d",
           "BatchNorm2d", "Dropout", "Flatten", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU",
           "ELU", "SiLU", "Softplus", "Softmax", "LogSoftmax", "Embedding", "LayerNorm",
           "Sequential", "ModuleList"]


def _param(arr, name):
    return auto_named(Parameter(arr, name=name))


def _module_path() -> str:
    """The dotted path of the module being built ("features.conv2"), from the name
    scopes modules open ("conv2:Conv2d"); "" for a module called on its own."""
    scopes = current_scope()
    path = ""
    for i, s in enumerate(scopes):
        if ":" not in s:
            continue
        name = s.split(":", 1)[0]
        if name.isdigit():            # a Sequential's child: "Sequential[1]"
            parent = scopes[i - 1].split(":", 1)[-1] if i else ""
            path += f"{'' if path else parent}[{name}]"
        else:
            path += f"{'.' if path else ''}{name}"
    return path


def _named_error(desc: str, detail: str) -> GraphBuildError:
    """A build error naming the module ("fc1: Linear(64->10) ...") and the user's line."""
    path = _module_path()
    return GraphBuildError(f"{path + ': ' if path else ''}{desc} {detail}\n  at {user_location()}")


def _bias_bound(fan_in):
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


class Identity(Module):
    def forward(self, x):
        return x


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype="float32", rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        self.weight = _param(init.kaiming_uniform(shape, a=math.sqrt(5), rng=rng, dtype=dtype),
                             "weight")
        if bias:
            b = _bias_bound(self.in_features)
            self.bias = _param(init.uniform((self.out_features,), -b, b, rng, dtype), "bias")
        else:
            self.bias = None

    def forward(self, x):
        desc = f"Linear({self.in_features}->{self.out_features})"
        shape = getattr(x, "shape", None)
        if shape is not None and (len(shape) == 0 or (isinstance(shape[-1], int)
                                                       and shape[-1] != self.in_features)):
            got = f"{shape[-1]} features" if len(shape) else "a scalar"
            raise _named_error(desc, f"got input with {got} (shape {shape_str(shape)}); it "
                               f"takes {self.in_features} features in the last dimension")
        return L.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Conv2d(Module):
    """2-D convolution of NCHW inputs; weight (out, in/groups, kH, kW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, dtype="float32", rng=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels {in_channels} and out_channels "
                             f"{out_channels} must be divisible by groups {groups}")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups) + k
        self.weight = _param(init.kaiming_uniform(shape, a=math.sqrt(5), rng=rng, dtype=dtype),
                             "weight")
        if bias:
            fan_in, _ = init.calculate_fan_in_and_fan_out(shape)
            b = _bias_bound(fan_in)
            self.bias = _param(init.uniform((out_channels,), -b, b, rng, dtype), "bias")
        else:
            self.bias = None

    def forward(self, x):
        kh, kw = self.kernel_size
        desc = f"Conv2d({self.in_channels}->{self.out_channels}, kernel {kh}x{kw})"
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) != 4:
            raise _named_error(desc, f"got input of shape {shape_str(shape)}; it takes NCHW "
                               f"images (N, {self.in_channels}, H, W)")
        if shape is not None and isinstance(shape[1], int) and shape[1] != self.in_channels:
            raise _named_error(desc, f"got input with {shape[1]} channels (shape "
                               f"{shape_str(shape)}); it takes {self.in_channels}")
        try:
            return C.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, groups=self.groups)
        except GraphBuildError as e:        # e.g. images too small for the kernel
            msg = str(e).split("\n  at ")[0]
            raise _named_error(desc, f"could not take input of shape {shape_str(shape)}: "
                               f"{msg}") from None

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x):
        return P.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def forward(self, x):
        return P.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            count_include_pad=self.count_include_pad, ceil_mode=self.ceil_mode)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class _BatchNorm(Module):
    """Normalizes over every axis but the channel axis (1).

    Training mode: batch statistics, and the running statistics advance by
    (1 - momentum)·running + momentum·batch (unbiased variance), registered as
    state updates that a compiled training step applies.  Eval mode: the
    running statistics.  track_running_stats=False: always batch statistics.
    """
    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype="float32"):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        c = (self.num_features,)
        if affine:
            self.weight = _param(init.ones(c, dtype), "weight")
            self.bias = _param(init.zeros(c, dtype), "bias")
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", init.zeros(c, dtype))
            self.register_buffer("running_var", init.ones(c, dtype))
        else:
            self.running_mean = self.running_var = None

    def forward(self, x):
        if self._ranks and x.ndim not in self._ranks:
            raise ValueError(f"{type(self).__name__}: expected input of rank "
                             f"{' or '.join(map(str, self._ranks))}, got shape {tuple(x.shape)}")
        use_batch = self.training or not self.track_running_stats
        y, new_mean, new_var = F.batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var,
            training=use_batch, momentum=self.momentum, eps=self.eps)
        if self.training and self.track_running_stats:
            self.register_state_update(self.running_mean, new_mean)
            self.register_state_update(self.running_var, new_var)
        return y

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) inputs."""
    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) inputs."""
    _ranks = (4,)


class Dropout(Module):
    """Inverted dropout in training mode, identity in eval mode.

    Each Dropout owns an int64 key buffer (drawn from the layer's rng); a
    compiled training step advances it by one per call, so masks change every
    step and a run is reproducible (the key saves and loads with the model).
    """

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        seed = int(init._rng(rng).integers(0, 2 ** 62))
        self.register_buffer("key", np.array(seed, dtype=np.int64))

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        calls = self.__dict__.get("_calls", 0)
        object.__setattr__(self, "_calls", calls + 1)
        y = F.dropout(x, self.p, self.key, training=True, stream=calls)
        if calls == 0:
            self.register_state_update(self.key, self.key + 1)
        return y

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return S.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# ------------------------------------------------------------------ activations
class ReLU(Module):
    def forward(self, x):
        return A.relu(x)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return A.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    def forward(self, x):
        return A.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return A.tanh(x)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return A.gelu(x, self.approximate)


class ELU(Module):
    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return A.elu(x, self.alpha)


class SiLU(Module):
    def forward(self, x):
        return A.silu(x)


class Softplus(Module):
    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, x):
        return A.softplus(x, self.beta, self.threshold)


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, self.dim)


class LogSoftmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.log_softmax(x, self.dim)


# ------------------------------------------------------------------ embedding / layer norm
class Embedding(Module):
    """Rows of weight (num_embeddings, embedding_dim) picked by integer indices."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype="float32", rng=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = _param(init.normal((self.num_embeddings, self.embedding_dim), 0.0, 1.0,
                                         rng, dtype), "weight")

    def forward(self, indices):
        return I.embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalizes over the trailing `normalized_shape` dims, then weight·y + bias."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 dtype="float32"):
        super().__init__()
        ns = (int(normalized_shape),) if isinstance(normalized_shape, (int, np.integer)) \
            else tuple(int(d) for d in normalized_shape)
        self.normalized_shape, self.eps = ns, float(eps)
        if elementwise_affine:
            self.weight = _param(init.ones(ns, dtype), "weight")
            self.bias = _param(init.zeros(ns, dtype), "bias")
        else:
            self.weight = self.bias = None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.weight is not None}"


# ------------------------------------------------------------------ containers
class Sequential(Module):
    """Children called in order.  Sequential(m0, m1, ...) names them "0", "1", ...;
    Sequential(OrderedDict(name=module, ...)) keeps the given names.  Index with
    an int (model[0]) or a slice (a new Sequential sharing the modules)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for name, m in modules[0].items():
                self.add_module(str(name), m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        items = list(self._modules.items())
        if isinstance(idx, slice):
            return Sequential(OrderedDict(items[idx]))
        if isinstance(idx, str):
            return self._modules[idx]
        return items[idx][1]

    def append(self, module: Module):
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    """A list of modules registered as children "0", "1", ... (no forward)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module):
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        vals = list(self._modules.values())
        return ModuleList(vals[idx]) if isinstance(idx, slice) else vals[idx]
