"""graphc's intermediate representation: dtypes, shapes, typed nodes, graphs."""
from . import dtypes
from .dtypes import as_dtype, promote
from .errors import GraphBuildError, GraphcError, IndexOutOfRangeError, NotLoweredError
from .graph import Graph, clone_with_inputs, toposort
from .node import Node, TensorType, TupleType, current_role, name_scope, role, user_location
from .shapes import BATCH, broadcast_shapes, normalize_shape, shape_str
