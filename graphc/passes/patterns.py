"""A small pattern language for rewrite rules: (pattern, replacement) pairs.

    P("neg", P("neg", X("x")))            matches neg(neg(x)) and binds x
    P("add", X("x"), Zero())              matches x + 0 (either order: add is commutative)
    P("transpose", P("transpose", X("x"), name="inner"), name="outer")

A pattern matches a node when the op name matches (None: any op), the
sub-patterns match the inputs (for commutative binary ops in either order),
and the optional predicate `where(node)` holds.  `name=` binds the matched
node under that name.  A rule's replacement is a function
`build(node, bindings) -> Node | None` (None declines the rewrite).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMMUTATIVE = frozenset({"add", "mul", "maximum", "minimum", "equal", "not_equal"})


class Pattern:
    def match(self, node, b: dict) -> bool:
        raise NotImplementedError


class P(Pattern):
    """Match an op applied to sub-patterns."""

    def __init__(self, op, *args, name=None, where=None):
        self.ops = (op,) if isinstance(op, str) or op is None else tuple(op)
        self.args = args
        self.name = name
        self.where = where

    def match(self, node, b):
        if self.ops != (None,) and node.op.name not in self.ops:
            return False
        if self.args:
            if len(node.inputs) != len(self.args):
                return False
            orders = [node.inputs]
            if node.op.name in COMMUTATIVE and len(node.inputs) == 2:
                orders.append(node.inputs[::-1])
            for ins in orders:
                trial = dict(b)
                if all(p.match(i, trial) for p, i in zip(self.args, ins)):
                    b.clear()
                    b.update(trial)
                    break
            else:
                return False
        if self.where is not None and not self.where(node):
            return False
        if self.name:
            if self.name in b and b[self.name] is not node:
                return False
            b[self.name] = node
        return True


class X(Pattern):
    """Any node, bound under `name` (a repeated name must bind the same node)."""

    def __init__(self, name, where=None):
        self.name = name
        self.where = where

    def match(self, node, b):
        if self.where is not None and not self.where(node):
            return False
        if self.name in b:
            return b[self.name] is node
        b[self.name] = node
        return True


def constant_value(node):
    """The array a node is known to hold everywhere, seen through broadcast_to."""
    while node.op.name == "broadcast_to":
        node = node.inputs[0]
    return node.value if node.op.name == "constant" else None


def is_filled(node, v) -> bool:
    c = constant_value(node)
    return c is not None and c.size > 0 and bool(np.all(c == v))


def Const(v, name=None):
    """A constant (possibly broadcast) whose every element equals v."""
    return X(name or f"_const{v}", where=lambda n: is_filled(n, v))


@dataclass
class Rule:
    name: str
    pattern: Pattern
    build: object
    enabled: object = None  # predicate on the PassContext (None: always on)

    def __post_init__(self):
        # The op names the pattern's root can match (None: any), so a pass can skip
        # the rule for other nodes without running the matcher.
        p = self.pattern
        self.root_ops = frozenset(p.ops) if isinstance(p, P) and p.ops != (None,) else None

    def may_match(self, node) -> bool:
        return self.root_ops is None or node.op.name in self.root_ops

    def apply(self, node, state=None):
        if not self.may_match(node):
            return None
        b: dict = dict(state or {})
        if not self.pattern.match(node, b):
            return None
        return self.build(node, b)
