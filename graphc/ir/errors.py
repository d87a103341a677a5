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


class IndexOutOfRangeError(GraphcError, IndexError):
    """An integer index (take, embedding, one_hot) or class label (cross_entropy,
    nll_loss) outside its valid range, found when the graph ran.

    Every backend raises this same error with the same message (built by
    `index_out_of_range`): the NumPy reference from the values it sees, the native
    backends from the record their check kernels write.  It is also an IndexError,
    as NumPy's own out-of-range errors are.  Attributes: op, kind ("index" or
    "label"), value (the first bad value in row-major order), position (its position
    in the index array), size (valid values are 0..size-1), loc (the user's line
    that built the node, or None).
    """

    def __init__(self, message, info=None):
        super().__init__(message)
        self.info = dict(info or {})
        for k in ("op", "kind", "value", "position", "size", "loc"):
            setattr(self, k, self.info.get(k))

    def __reduce__(self):
        return type(self), (str(self), self.info)

    def located(self, loc) -> "IndexOutOfRangeError":
        """This error with the node's `file:line` added (itself if it has one)."""
        if self.loc is not None or loc is None:
            return self
        return IndexOutOfRangeError(f"{self}\n  node built at {loc}", dict(self.info, loc=loc))


_PLURAL = {"index": "indices", "label": "labels"}


def _unravel(flat: int, shape) -> tuple:
    out = []
    for d in reversed(tuple(shape)):
        d = max(int(d), 1)
        out.append(flat % d)
        flat //= d
    return tuple(reversed(out))


def index_out_of_range(op, size, *, shape, count, lo, hi, first_pos, first_value, kind="index",
                       what="", ignore=None, loc=None) -> IndexOutOfRangeError:
    """The error for `count` values outside [0, size) (and != ignore) in an index array
    of `shape`: values from lo to hi, the first (row-major) `first_value` at flat
    position `first_pos`.  One wording for every backend."""
    total = 1
    for d in shape:
        total *= int(d)
    pos = _unravel(int(first_pos), shape)
    allowed = f"[0, {size})" + (f" ({what})" if what else "")
    plural = _PLURAL[kind]
    msg = (f"{op}: {kind} out of range: {kind} {first_value} at position {pos} is not in "
           f"{allowed}" + (f" and is not ignore_index={ignore}" if ignore is not None else "")
           + f"; {count} of the {total} {plural} {'is' if count == 1 else 'are'} out of range "
           f"(values from {lo} to {hi})")
    if loc is not None:
        msg += f"\n  node built at {loc}"
    return IndexOutOfRangeError(msg, {"op": op, "kind": kind, "value": first_value,
                                      "position": pos, "size": size, "loc": loc})
