"""Errors that point at the user's code."""
from __future__ import annotations


class GraphcError(Exception):
    """Base class of graphc's own errors."""


class GraphBuildError(GraphcError, ValueError):
    """An op was applied to inputs its type rule rejects.

    The message names the op, the input shapes and dtypes, and the file and
    line of the user's code that built the node.
    """


class NotLoweredError(GraphcError, NotImplementedError):
    """A backend met an op it cannot compile yet."""
