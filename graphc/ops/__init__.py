"""The op library: every op defined once (type rule, NumPy reference, gradient).

Importing this package registers every op and installs Python operators on
graph nodes.  `PUBLIC` maps the user-facing function names that the top-level
`graphc` namespace re-exports.
"""
from . import base
from . import elementwise, shape, reduce, linalg, activations, indexing, conv, pool, nn, loop
from . import operators
from .base import REGISTRY, Op, apply, as_node, constant, get_op, register

_MODULES = (elementwise, shape, reduce, linalg, activations, indexing, conv, pool, nn, loop)
PUBLIC = {name: getattr(m, name) for m in _MODULES for name in m.__all__}

operators.install()
