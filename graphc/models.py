"""A small model zoo built from graphc.nn layers.

- ``lenet5``: LeCun et al. 1998's LeNet-5 shape for 28×28 (or 32×32) images.
- ``mlp``: a multilayer perceptron (flattens its input first).
"""
from __future__ import annotations

from collections import OrderedDict

from . import nn

__all__ = ["lenet5", "mlp", "LeNet5", "MLP"]


class LeNet5(nn.Sequential):
    """The Sequential `lenet5` returns (its own class, so pictures and reprs say LeNet5)."""


class MLP(nn.Sequential):
    """The Sequential `mlp` returns."""

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "silu": nn.SiLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from "
                         f"{sorted(_ACTIVATIONS)}") from None


def lenet5(num_classes: int = 10, in_channels: int = 1, activation: str = "relu",
           pool: str = "max", input_size: int = 28, rng=None) -> LeNet5:
    """LeNet-5: conv 6@5×5, pool 2, conv 16@5×5, pool 2, flatten, 120, 84, num_classes.

    For 28×28 inputs the first convolution pads by 2 (so the feature maps are
    28 → 14 → 10 → 5, as for the original 32×32 inputs without padding);
    input_size=32 uses no padding.  pool: "max" or "avg".  Children are named
    conv1, act1, pool1, conv2, act2, pool2, flatten, fc1, act3, fc2, act4, fc3.
    """
    if input_size not in (28, 32):
        raise ValueError(f"lenet5: input_size must be 28 or 32, got {input_size}")
    if pool not in ("max", "avg"):
        raise ValueError(f"lenet5: pool must be 'max' or 'avg', got {pool!r}")
    Pool = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    pad = 2 if input_size == 28 else 0
    return LeNet5(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 6, 5, padding=pad, rng=rng)),
        ("act1", _activation(activation)),
        ("pool1", Pool(2)),
        ("conv2", nn.Conv2d(6, 16, 5, rng=rng)),
        ("act2", _activation(activation)),
        ("pool2", Pool(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120, rng=rng)),
        ("act3", _activation(activation)),
        ("fc2", nn.Linear(120, 84, rng=rng)),
        ("act4", _activation(activation)),
        ("fc3", nn.Linear(84, num_classes, rng=rng)),
    ]))


def mlp(in_features: int = 64, hidden=(128, 64), num_classes: int = 10,
        activation: str = "relu", dropout: float = 0.0, rng=None) -> MLP:
    """Flatten, then Linear + activation (+ Dropout) per hidden size, then Linear.

    Children: flatten, fc1, act1, [drop1,] fc2, ..., fc<k+1> (the classifier).
    """
    layers = [("flatten", nn.Flatten())]
    prev = in_features
    for i, h in enumerate(hidden, start=1):
        layers.append((f"fc{i}", nn.Linear(prev, h, rng=rng)))
        layers.append((f"act{i}", _activation(activation)))
        if dropout:
            layers.append((f"drop{i}", nn.Dropout(dropout, rng=rng)))
        prev = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(prev, num_classes, rng=rng)))
    return MLP(OrderedDict(layers))
